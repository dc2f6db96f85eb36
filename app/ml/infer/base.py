"""What every inference backend answers, and the errors it may raise; no torch import here.

``InferenceBackend.classify(ref, texts, ...)`` returns one ``Prediction`` per text with the same
fields whichever engine ran it: the in-process transformers backend (``app.ml.infer.hf_backend``)
or a vLLM OpenAI-compatible server (``app.ml.infer.vllm_backend``), chosen by the
``INFERENCE_BACKEND`` setting. The shape follows LLaMA-Factory's ``chat/base_engine.py``: an
abstract engine with one entry point per task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.domain.labels import LabelSet

Mode = Literal["score", "generate"]
MODES = ("score", "generate")
# How score mode scores a label: its distinguishing prefix ("trie") or its whole answer ("full").
Strategy = Literal["trie", "full"]
STRATEGIES = ("trie", "full")


@dataclass
class TopLabel:
    intent_id: int
    label: str
    score: float  # probability of this label among the label set


@dataclass
class Prediction:
    intent_id: int | None  # None: a generated answer that names no label (never in score mode)
    label: str | None
    confidence: float | None  # probability of the chosen label (score mode); None for generation
    top_k: list[TopLabel]
    raw_output: str | None  # the generated text (generate mode); None in score mode
    latency_ms: float  # the batch's wall time divided by its size
    mode: str


@dataclass(frozen=True)
class ModelRef:
    """A servable model. Two refs with the same ``key`` but another ``version`` are different models."""

    key: str
    version: str
    base_model_dir: Path
    adapter_dir: Path | None
    system_prompt: str
    label_set: LabelSet
    quantization: str = "auto"
    # Prompt tokens at most, as in training (TrainingConfig.max_input_length); None = no truncation.
    max_input_length: int | None = None
    # "lm": the adapter (or base) scores the label set's answers; "linear": a linear head in adapter_dir
    # reads the frozen base model's hidden states (app.ml.models.linear_head)
    head: str = "lm"

    def __post_init__(self):
        object.__setattr__(self, "base_model_dir", Path(self.base_model_dir))
        if self.adapter_dir is not None:
            object.__setattr__(self, "adapter_dir", Path(self.adapter_dir))


class PromptTooLongError(ValueError):
    """The prompt without any dialogue (system prompt + label list) does not fit the ref's max input length."""


class BackendUnavailableError(RuntimeError):
    """The inference engine cannot answer now (server down, queue full): retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class AdapterUnavailableError(LookupError):
    """The engine cannot load the model's adapter (files missing or unreadable where the engine runs)."""


class UnsupportedRequestError(ValueError):
    """The engine cannot express this request (e.g. a label set or mode it does not support)."""


class InferenceBackend(ABC):
    """One engine that classifies dialogues for any ``ModelRef``."""

    name: str = "abstract"

    @abstractmethod
    def classify(self, ref: ModelRef, texts: list[str], *, top_k: int = 5, mode: Mode = "score",
                 strategy: Strategy = "trie", batch_size: int = 8) -> list[Prediction]:
        """One prediction per text, in order; score mode always names a label of ``ref.label_set``."""

    def get(self, ref: ModelRef) -> "BoundClassifier":
        """``ref`` bound to this backend, with the ``classify(texts, ...)`` of an ``IntentClassifier``."""
        return BoundClassifier(self, ref)

    def close(self) -> None:
        """Release what the backend holds (models, connections)."""

    def clear(self) -> None:
        """Release loaded models (a worker calls it before training); the backend stays usable."""
        self.close()


class BoundClassifier:
    def __init__(self, backend: InferenceBackend, ref: ModelRef):
        self.backend, self.ref = backend, ref

    def classify(self, texts: list[str], *, mode: Mode = "score", top_k: int = 5, batch_size: int = 8,
                 strategy: Strategy = "trie", **_ignored) -> list[Prediction]:
        return self.backend.classify(self.ref, texts, top_k=top_k, mode=mode, strategy=strategy,
                                     batch_size=batch_size)

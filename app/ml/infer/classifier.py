"""What the API and the worker call to classify dialogues with a fine-tuned (or zero-shot) model.

- ``ModelRef`` names a servable model: a base model directory, an optional LoRA adapter, the system
  prompt and label set it was trained with, and a ``version`` that changes whenever the adapter is
  retrained or replaced.
- ``IntentClassifier`` classifies texts with one ref, by label scoring (``mode="score"``, default:
  ``app.ml.infer.scoring``, prefix computed once) or by free generation (``mode="generate"``: the upstream
  baseline, ``app.ml.infer.generation``).
- ``ClassifierRegistry`` keeps classifiers ready: each base model is loaded once and every adapter
  on it is a named peft adapter of that one model (a linear-head model, ``ModelRef.head == "linear"``,
  is the plain base model with its head, ``app.ml.models.linear_head``) (``load_adapter`` / ``set_adapter`` /
  ``delete_adapter``), least recently used ones evicted beyond ``max_adapters``. Requests on one
  base model go through its ``MicroBatcher`` (``app.ml.infer.batching``): concurrent requests on the
  same adapter share forwards, requests on different adapters run one after the other ("activate my
  adapter + forward" under the base's lock), so each gets its own adapter's answers.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.domain.labels import LabelSet
from app.ml.infer.base import (  # noqa: F401 - re-exported: the classifier's public types
    MODES,
    AdapterUnavailableError,
    UnsupportedRequestError,
    Mode,
    ModelRef,
    Prediction,
    PromptTooLongError,
    TopLabel,
)
from app.ml.infer.batching import MicroBatcher
from app.ml.infer.generation import DEFAULT_MAX_NEW_TOKENS, generate_answers
from app.ml.models.linear_head import LinearHead
from app.ml.infer.scoring import ANSWER_SCORINGS, AnswerScoring, LabelScorer, label_distribution, render_prompt_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    """Cross-request micro-batching per base model (``app.ml.infer.batching``)."""

    window_s: float = 0.002
    max_batch_texts: int = 16
    max_pending: int = 0  # 0: unbounded (a worker's evaluation waits instead of being refused)
    retry_after_s: int = 1


def check_prompt_fits(tokenizer, ref: ModelRef) -> None:
    """Refuse a ref whose label list leaves no room for a dialogue within ``max_input_length``."""
    if ref.max_input_length is None:
        return
    fixed = len(render_prompt_ids(tokenizer, ref.system_prompt, ""))
    if fixed >= ref.max_input_length:
        raise PromptTooLongError(
            f"the prompt without a dialogue (system prompt with {len(ref.label_set)} labels) is {fixed} tokens, "
            f"which leaves no room for a dialogue within the max input length of {ref.max_input_length} tokens"
        )


class _BaseModelSlot:
    """One loaded base model and the peft adapters attached to it.

    ``lock`` must be held around adapter changes and around "activate + forward": peft's active
    adapter is state of the shared model.
    """

    def __init__(self, loaded, batching: BatchingConfig | None = None):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.quantization = loaded.quantization
        self.device = loaded.device
        self.lock = threading.RLock()
        self.adapters: set[str] = set()
        batching = batching or BatchingConfig()
        self.batcher = MicroBatcher(window_s=batching.window_s, max_batch_texts=batching.max_batch_texts,
                                    max_pending=batching.max_pending, retry_after_s=batching.retry_after_s,
                                    name="classify-batcher")

    def attach(self, name: str, adapter_dir: Path) -> None:
        with self.lock:
            with warnings.catch_warnings():
                # peft warns that a model with an adapter gets another one: exactly what is meant here.
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                self.model.load_adapter(str(adapter_dir), adapter_name=name, hotswap=False)
            self.adapters.add(name)
            # Serve in eval mode (LoRA dropout off) whatever state the injection left modules in.
            self.model.eval()

    def detach(self, name: str) -> None:
        with self.lock:
            if name in self.adapters:
                with warnings.catch_warnings():
                    # "Adapter X was active which is now deleted": the next call activates its own.
                    warnings.filterwarnings("ignore", message=".*which is now deleted.*")
                    self.model.delete_adapter(name)
                self.adapters.discard(name)

    def activate(self, name: str | None) -> None:
        """Make ``name`` the only active adapter; ``None`` = the plain base model (zero-shot)."""
        if not getattr(self.model, "_hf_peft_config_loaded", False):
            if name is not None:
                raise RuntimeError(f"adapter {name} is not loaded")
            return
        if name is None:
            self.model.disable_adapters()
        else:
            self.model.enable_adapters()
            self.model.set_adapter(name)

    def release(self) -> None:
        """Drop the model; the batcher must be closed first (outside ``lock``: its thread may wait on it)."""
        self.model = None
        self.tokenizer = None


class IntentClassifier:
    """One model (+ adapter) ready to classify. Get it from ``ClassifierRegistry.get``.

    Scoring state (the label tokens and the system prompt's keys/values) belongs to this ref's
    adapter and is built on first use. A classifier evicted from the registry while a caller still
    holds it keeps working: each batch then re-attaches its adapter from disk, rebuilds the prefix
    and detaches again (slow, but never another adapter's answers).
    """

    def __init__(self, ref: ModelRef, slot: _BaseModelSlot, adapter_name: str | None, head: LinearHead | None = None):
        self.ref = ref
        self._slot = slot
        self._adapter_name = adapter_name
        self._evicted = False
        self._scorer = LabelScorer(
            slot.model, slot.tokenizer, ref.system_prompt, ref.label_set, max_input_length=ref.max_input_length,
            head=head,
        )

    @property
    def adapter_name(self) -> str | None:
        return self._adapter_name

    @property
    def model(self):
        return self._slot.model

    @property
    def tokenizer(self):
        return self._slot.tokenizer

    def classify(
        self,
        texts: list[str],
        *,
        mode: Mode = "score",
        top_k: int = 5,
        batch_size: int = 8,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        strategy: AnswerScoring = "trie",
    ) -> list[Prediction]:
        """Predictions for ``texts``; in score mode ``strategy`` says how a label is scored
        (``trie``: its distinguishing prefix, ``full``: its whole answer; ``app.ml.infer.scoring``).

        Each ``batch_size`` texts go to the base model's micro-batcher, where they may share a forward
        with other callers' texts on the same adapter (``QueueFullError`` when its queue is full).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (use {' or '.join(MODES)})")
        if strategy not in ANSWER_SCORINGS:
            raise ValueError(f"unknown strategy '{strategy}' (use {' or '.join(ANSWER_SCORINGS)})")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if mode == "generate" and self._scorer.head is not None:
            raise UnsupportedRequestError(f"model '{self.ref.key}' classifies with a linear head: it answers in "
                                          "score mode only (it was never trained to write answers)")
        group = (id(self), mode, strategy if mode == "score" else None, max_new_tokens if mode == "generate" else None)

        def run(batch: list[str]) -> list:
            return self._run_batch(batch, mode, strategy, max_new_tokens)

        # Submitted together so that one caller's chunks can also share forwards with each other.
        futures = [self._slot.batcher.submit(group, list(texts[start : start + batch_size]), run)
                   for start in range(0, len(texts), batch_size)]
        predictions: list[Prediction] = []
        for future in futures:
            for raw, latency_ms in future.result():
                predictions.append(self._prediction(raw, mode, top_k, latency_ms))
        return predictions

    def _run_batch(self, batch: list[str], mode: str, strategy: AnswerScoring, max_new_tokens: int) -> list:
        """(raw result, latency ms) per text: a row of label probabilities, or a generated answer."""
        with self._slot.lock:
            began = time.perf_counter()
            temporary = self._attach_if_evicted()
            try:
                self._slot.activate(self._adapter_name)
                if mode == "score":
                    probs = label_distribution(self._scorer.score(batch, batch_size=len(batch), answers=strategy))
                    made = list(probs)
                else:
                    made = self._generate(batch, max_new_tokens)
            finally:
                if temporary:
                    self._slot.detach(self._adapter_name)
            elapsed_ms = (time.perf_counter() - began) * 1000.0
        return [(raw, elapsed_ms / len(batch)) for raw in made]

    def _prediction(self, raw, mode: str, top_k: int, latency_ms: float) -> Prediction:
        if mode != "score":
            return Prediction(raw.label_id, raw.label_name, None, [], raw.text, latency_ms, "generate")
        ids, names = self._scorer.candidates.label_ids, self._scorer.candidates.label_names
        k = max(1, min(top_k, len(ids)))
        values, order = raw.topk(k)
        top = [TopLabel(ids[j], names[j], float(p)) for p, j in zip(values.tolist(), order.tolist())]
        return Prediction(top[0].intent_id, top[0].label, top[0].score, top if top_k > 0 else [], None, latency_ms,
                          "score")

    def _attach_if_evicted(self) -> bool:
        if not self._evicted or self._adapter_name is None or self._adapter_name in self._slot.adapters:
            return False
        if self._slot.model is None:
            raise RuntimeError(f"the base model of '{self.ref.key}' was unloaded; get the classifier again")
        self._slot.attach(self._adapter_name, self.ref.adapter_dir)
        self._scorer.reset()  # the adapter on disk may have changed since the prefix was built
        return True

    def _generate(self, batch: list[str], max_new_tokens: int) -> list:
        return generate_answers(
            self._slot.model,
            self._slot.tokenizer,
            self.ref.system_prompt,
            self.ref.label_set,
            batch,
            max_new_tokens=max_new_tokens,
            batch_size=len(batch),
            max_input_length=self.ref.max_input_length,
        )


@dataclass
class _Entry:
    classifier: IntentClassifier
    base_key: tuple[str, str]


@dataclass
class RegistryStats:
    loaded_keys: list[str] = field(default_factory=list)  # least recently used first
    base_models: list[str] = field(default_factory=list)
    loads: int = 0  # adapters (and zero-shot refs) made ready since start
    evictions: int = 0


class ClassifierRegistry:
    """LRU cache of ready classifiers over shared base models; thread-safe.

    ``max_adapters`` counts the refs kept ready (zero-shot refs included: they hold a prefix cache).
    A ref whose ``version`` (or any other field) changed for a known ``key`` replaces the old one:
    its adapter weights and prefix cache are loaded again. Base models no ready ref uses are
    unloaded when another base is needed.
    """

    def __init__(self, max_adapters: int = 2, device: str | None = None, batching: BatchingConfig | None = None):
        if max_adapters < 1:
            raise ValueError("max_adapters must be >= 1")
        self.max_adapters = max_adapters
        self.device = device
        self.batching = batching or BatchingConfig()
        self._lock = threading.RLock()
        self._bases: dict[tuple[str, str], _BaseModelSlot] = {}
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._names = itertools.count(1)
        self._loads = 0
        self._evictions = 0

    def get(self, ref: ModelRef) -> IntentClassifier:
        with self._lock:
            entry = self._entries.get(ref.key)
            if entry is not None and entry.classifier.ref == ref:
                self._entries.move_to_end(ref.key)
                return entry.classifier
            if entry is not None:
                log.info("model %s changed (version %s -> %s): reloading", ref.key, entry.classifier.ref.version, ref.version)
                self._evict(ref.key)
            base_key = (str(ref.base_model_dir.resolve()), ref.quantization)
            slot = self._base(base_key, ref)
            check_prompt_fits(slot.tokenizer, ref)
            name, head = None, None
            if ref.head == "linear":  # the frozen base model (no adapter) and a head read from the model's folder
                try:
                    head = LinearHead.load(ref.adapter_dir)
                except Exception as exc:  # noqa: BLE001 - missing, unreadable or corrupt (SafetensorError)
                    raise AdapterUnavailableError(f"the linear head of '{ref.key}' cannot be read: {exc}") from None
            elif ref.adapter_dir is not None:
                name = f"adapter_{next(self._names)}"
                slot.attach(name, ref.adapter_dir)
            classifier = IntentClassifier(ref, slot, name, head)
            self._entries[ref.key] = _Entry(classifier, base_key)
            self._loads += 1
            while len(self._entries) > self.max_adapters:
                self._evict(next(iter(self._entries)))
            return classifier

    def evict(self, key: str) -> bool:
        """Forget ``key`` (e.g. its model was deleted). Returns whether it was loaded."""
        with self._lock:
            if key not in self._entries:
                return False
            self._evict(key)
            return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._evict(key)
            for base_key in list(self._bases):
                self._unload_base(base_key)

    def stats(self) -> RegistryStats:
        with self._lock:
            return RegistryStats(list(self._entries), [k[0] for k in self._bases], self._loads, self._evictions)

    def _evict(self, key: str) -> None:
        entry = self._entries.pop(key)
        classifier = entry.classifier
        classifier._evicted = True
        if classifier.adapter_name is not None:
            self._bases[entry.base_key].detach(classifier.adapter_name)
        self._evictions += 1

    def _base(self, base_key: tuple[str, str], ref: ModelRef) -> _BaseModelSlot:
        slot = self._bases.get(base_key)
        if slot is not None:
            return slot
        in_use = {entry.base_key for entry in self._entries.values()}
        for other in [k for k in self._bases if k not in in_use]:
            self._unload_base(other)
        from app.ml.models.loading import load_base_model

        log.info("loading base model %s (quantization %s)", ref.base_model_dir, ref.quantization)
        loaded = load_base_model(ref.base_model_dir, quantization=ref.quantization, device=self.device)
        slot = _BaseModelSlot(loaded, self.batching)
        self._bases[base_key] = slot
        return slot

    def _unload_base(self, base_key: tuple[str, str]) -> None:
        slot = self._bases.pop(base_key)
        slot.batcher.close()
        with slot.lock:
            slot.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

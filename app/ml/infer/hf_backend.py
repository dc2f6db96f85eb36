"""The in-process backend: transformers + peft in this process (``ClassifierRegistry``), the default."""

from __future__ import annotations

from app.ml.infer.base import BackendUnavailableError, InferenceBackend, Mode, ModelRef, Prediction, Strategy
from app.ml.infer.batching import QueueFullError
from app.ml.infer.classifier import BatchingConfig, ClassifierRegistry


class HFBackend(InferenceBackend):
    name = "hf"

    def __init__(self, max_adapters: int = 2, device: str | None = None, batching: BatchingConfig | None = None):
        self.registry = ClassifierRegistry(max_adapters=max_adapters, device=device, batching=batching)

    @classmethod
    def from_settings(cls, settings, *, bounded_queue: bool) -> "HFBackend":
        """The API bounds each base model's queue (503 beyond it); a worker's evaluations wait instead."""
        batching = BatchingConfig(window_s=settings.classify_batch_window_ms / 1000.0,
                                  max_batch_texts=settings.classify_max_batch_texts,
                                  max_pending=settings.classify_queue_size if bounded_queue else 0,
                                  retry_after_s=settings.classify_retry_after_seconds)
        return cls(max_adapters=settings.adapter_cache_size, device=settings.device, batching=batching)

    def get(self, ref: ModelRef):
        return self.registry.get(ref)

    def classify(self, ref: ModelRef, texts: list[str], *, top_k: int = 5, mode: Mode = "score",
                 strategy: Strategy = "trie", batch_size: int = 8) -> list[Prediction]:
        try:
            return self.registry.get(ref).classify(texts, mode=mode, top_k=top_k, strategy=strategy,
                                                   batch_size=batch_size)
        except QueueFullError as exc:
            raise BackendUnavailableError(str(exc), retry_after=exc.retry_after) from None

    def clear(self) -> None:
        self.registry.clear()

    def stats(self):
        return self.registry.stats()

    def close(self) -> None:
        self.registry.clear()

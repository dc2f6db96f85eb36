"""The inference backend a process uses, from Settings (INFERENCE_BACKEND, VLLM_URL)."""

from __future__ import annotations

from app.core.config import Settings


def make_backend(settings: Settings, *, bounded_queue: bool):
    """hf: transformers in this process; vllm: a vLLM server (this process loads no model, imports no torch)."""
    if settings.inference_backend == "vllm":
        from app.ml.infer.vllm_backend import VLLMBackend

        return VLLMBackend.from_settings(settings, bounded_queue=bounded_queue)
    from app.ml.infer.hf_backend import HFBackend

    return HFBackend.from_settings(settings, bounded_queue=bounded_queue)

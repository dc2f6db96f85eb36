"""What a loaded model is, whatever wraps it: the questions training and serving both ask of an architecture.

Kept apart from ``app.ml.train`` and ``app.ml.infer`` so that neither stage imports the other.
"""

from __future__ import annotations


def unwrap_causal_lm(model):
    """The transformers causal LM inside a PeftModel (LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def has_sliding_attention(config) -> bool:
    """Whether some layer attends through a sliding window (a prefix cache would then see a different mask).

    A ``sliding_window`` without ``use_sliding_window`` counts as used (Mistral has no such switch).
    """
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return True
    layer_types = getattr(config, "layer_types", None)
    return bool(layer_types) and any(t != "full_attention" for t in layer_types)

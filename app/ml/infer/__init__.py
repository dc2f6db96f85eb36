"""Inference: KV prefix, label scoring, generation, classifier registry, backends."""

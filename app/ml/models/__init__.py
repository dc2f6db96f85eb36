"""Base models: registry, offline preparation (GGUF -> transformers), loading, introspection."""

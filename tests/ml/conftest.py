"""Shared fixtures for the ML tests: the tiny random GLM-4 model, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Glm4ForCausalLM + GLM-4-style tokenizer (app.ml.tiny); read-only for tests."""
    from app.ml.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-glm4"))

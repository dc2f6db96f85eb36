"""The transformers internals that app.ml.train.shared_prefix and app.ml.infer.scoring rely on.

pyproject.toml pins transformers to the minor release these were verified against. When that pin is
raised, this file says at once which internal moved, instead of a shared-prefix loss that quietly
differs from the naive one (test_shared_prefix.py checks that equality end to end).
"""

from __future__ import annotations

import inspect

import pytest
import transformers
from packaging.version import Version

from app.ml.train import shared_prefix

VERIFIED = Version("5.23")


def test_transformers_is_the_verified_minor_release():
    installed = Version(transformers.__version__)
    assert (installed.major, installed.minor) == (VERIFIED.major, VERIFIED.minor), (
        f"transformers {installed} is not the verified {VERIFIED}: re-check app/ml/train/shared_prefix.py "
        "and app/ml/infer/scoring.py against its cache and checkpointing code, then raise the pin"
    )


def test_cache_layers_are_built_the_way_the_prefix_caches_build_them():
    from transformers.cache_utils import Cache, DynamicLayer

    init = inspect.signature(Cache.__init__).parameters
    assert {"layers", "layer_class_to_replicate"} <= set(init), "Cache(layers=..., layer_class_to_replicate=...) moved"
    for method in ("update", "get_seq_length"):
        assert callable(getattr(DynamicLayer, method, None)), f"DynamicLayer.{method} moved"
    assert "is_initialized" in inspect.getsource(DynamicLayer), "DynamicLayer.is_initialized moved"


def test_checkpointed_layers_still_drop_the_cache_unless_told_otherwise():
    from transformers.modeling_layers import GradientCheckpointingLayer

    source = inspect.getsource(GradientCheckpointingLayer)
    assert "_can_checkpoint_with_cache" in source, (
        "GradientCheckpointingLayer no longer reads _can_checkpoint_with_cache: "
        "shared_prefix._cache_kept_under_checkpointing would silently do nothing"
    )


@pytest.mark.parametrize("name", ["_PrefixRecorder", "_ReadOnlyPrefixCache", "_RecordingLayer", "_PrefixLayer"])
def test_prefix_cache_classes_subclass_the_current_bases(name):
    from transformers.cache_utils import Cache, DynamicLayer

    cls = getattr(shared_prefix, name)
    assert issubclass(cls, Cache if name.endswith(("Recorder", "Cache")) else DynamicLayer)

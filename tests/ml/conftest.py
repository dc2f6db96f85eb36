"""Shared fixtures for the ML tests: the tiny random GLM-4 model, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Dialogues of different lengths (padding inside a batch) and openings (BPE merges at the prefix boundary).
SCORING_TEXTS = [
    "您好请讲[SEP]我要开通流量包",
    "喂[SEP]您好[SEP]帮我查一下这个月的话费为什么扣了五十八块钱还有那个彩铃我也没订过",
    "A",
    "您好请讲[SEP]宽带老是断网[SEP]请问是哪个小区[SEP]学校宿舍",
    "取消",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Glm4ForCausalLM + GLM-4-style tokenizer (app.ml.models.tiny); read-only for tests."""
    from app.ml.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-glm4"))


def make_random_lora_adapter(base_dir, out_dir, seed: int, scale: float = 0.5):
    """A LoRA adapter on q/k/v/o with random lora_B (so it changes outputs), dropout on (eval must disable it).

    ``scale`` is lora_B's standard deviation: 0.5 wrecks a real model (fine for the tiny one); comparing
    two engines on Qwen needs a milder one, or float rounding decides the answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


# The tiny model as loaded for scoring tests, plain and with a random LoRA adapter (a module's own copy).
@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from app.ml.models.loading import load_base_model

    loaded = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, tmp_path_factory):
    """The tiny model with a random LoRA adapter, as served: a peft model in eval mode."""
    from peft import PeftModel

    from app.ml.models.loading import load_base_model

    adapter = make_random_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=1)
    loaded = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    return model, loaded.tokenizer

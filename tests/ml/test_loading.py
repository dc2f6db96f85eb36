"""Loading a base model: device/dtype/quantisation decisions, and the 4-bit CPU training trap."""

from __future__ import annotations

import pytest
import torch

from app.ml.models.loading import (
    ensure_pad_token,
    load_base_model,
    resolve_compute_dtype,
    resolve_device,
    resolve_quantization,
)


def test_resolve_device_defaults_to_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_compute_dtype_auto_is_fp32_on_cpu_and_explicit_names_map():
    cpu = torch.device("cpu")
    assert resolve_compute_dtype("auto", cpu) is torch.float32
    assert resolve_compute_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_compute_dtype("int8", cpu)


def test_quantization_auto_is_none_on_cpu_but_4bit_can_be_asked_for():
    cpu = torch.device("cpu")
    assert resolve_quantization("auto", cpu) == "none"
    assert resolve_quantization("none", cpu) == "none"
    assert resolve_quantization("4bit", cpu) == "4bit"  # bitsandbytes >= 0.48 has a CPU backend
    with pytest.raises(ValueError):
        resolve_quantization("8bit", cpu)


def test_inference_load_is_frozen_eval_and_padded(tiny_model_dir):
    loaded = load_base_model(tiny_model_dir, quantization="none")
    assert loaded.quantization == "none"
    assert loaded.dtype is torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token_id is not None


def test_training_load_enables_non_reentrant_checkpointing(tiny_model_dir):
    loaded = load_base_model(tiny_model_dir, quantization="none", for_training=True, gradient_checkpointing=True)
    layers = loaded.model.model.layers
    assert loaded.model.training
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords["use_reentrant"] is False for layer in layers)
    assert loaded.model.config.use_cache is False


def test_4bit_cpu_training_survives_a_no_grad_forward(tiny_model_dir):
    """The bitsandbytes CPU trap: an eval pass must not break a later training step."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    loaded = load_base_model(tiny_model_dir, quantization="4bit", for_training=True)
    linear4 = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert loaded.quantization == "4bit" and linear4
    assert all(m.support_avx512bf16_for_cpu is False for m in linear4)

    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 500, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's is 0 at init (B = 0)
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base_model(tmp_path)


def test_ensure_pad_token_falls_back_to_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id

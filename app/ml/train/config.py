"""Training hyperparameters: one typed model shared by the API (validation), the worker and the trainer.

Defaults are the seed recipe (``configs/cmcc34_qlora_system_prompt.yaml``); a job overrides any field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.config import CONFIGS_DIR


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Quantisation: "4bit" = NF4 + double quant (QLoRA); "none" = LoRA on a full-precision base;
    # "auto" = 4bit on CUDA; none on CPU, where 4-bit measured no faster and noticeably worse on a
    # GGUF-sourced base (see app.ml.models.loading).
    quantization: Literal["auto", "4bit", "none"] = "auto"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(64, ge=1)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)

    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    per_device_train_batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides num_train_epochs")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    lr_scheduler_type: str = "linear"
    weight_decay: float = Field(0.0, ge=0.0)
    max_input_length: int = Field(1024, ge=16)
    max_output_length: int = Field(256, ge=4)
    save_steps: int = Field(500, ge=1)
    logging_steps: int = Field(50, ge=1)
    gradient_checkpointing: bool = True
    # Run the system-prompt prefix once per batch and expand its keys/values (app.ml.train.shared_prefix).
    shared_prefix: bool = True
    seed: int = 42

    @model_validator(mode="after")
    def _check_steps(self):
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (use epochs) or > 0")
        return self


def load_config_file(name_or_path: str) -> tuple[dict, str | None]:
    """Read a YAML recipe from ``configs/`` (by name) or a path; returns its ``hyperparameters`` mapping."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config '{name_or_path}' not found (looked in {CONFIGS_DIR})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return dict(data.get("hyperparameters", {})), data.get("base_model")


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_training_config(config_name: str, overrides: dict | None) -> tuple[TrainingConfig, str | None]:
    """Recipe from ``configs/`` merged with per-job overrides, validated."""
    base, base_model = load_config_file(config_name)
    return TrainingConfig(**{**base, **(overrides or {})}), base_model

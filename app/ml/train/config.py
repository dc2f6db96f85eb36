"""Training hyperparameters: one typed model shared by the API (validation), the worker and the trainer.

Defaults are the seed recipe (``configs/cmcc34_qlora_system_prompt.yaml``); a job overrides any field.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator, model_validator

from app.core.config import CONFIGS_DIR

GPU_RECIPE = "cmcc34_qlora_system_prompt"  # the seed recipe: GLM-4-9B in 4-bit, needs a GPU
CPU_RECIPE = "cpu_small"  # the embedded default model on a CPU in minutes

# transformers' SchedulerType values that run with no lr_scheduler_kwargs and without evaluation metrics
# (reduce_lr_on_plateau and greedy need metrics, the *_min_lr ones min_lr, warmup_stable_decay its decay steps).
LrSchedulerType = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt"]
ClassBalance = Literal["none", "sqrt", "balanced"]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$", max_length=200)]


class TrainingConfig(BaseModel):
    # allow_inf_nan: JSON bodies may carry Infinity/NaN, which no hyperparameter can use.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    quantization: Literal["auto", "4bit", "none"] = Field(
        "auto", description="4bit: NF4 base (QLoRA); none: LoRA on a full-precision base; auto: 4bit on CUDA, "
        "none on a CPU (where 4-bit measured no faster and worse on a GGUF-sourced base)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the quantisation constants too (QLoRA)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the matmuls: auto = bfloat16 on a GPU that has it, else float32")

    head: Literal["lm", "linear"] = Field(
        "lm", description="lm: a LoRA adapter learns to write the answer, served by label scoring or generation; "
        "linear: a linear classification head (logistic regression) on the frozen base model's hidden states, "
        "one forward per dialogue and no LoRA: the CPU recipe that learns real data in minutes "
        "(app.ml.train.linear_head; the lora_*, learning-rate and step fields do not apply)")
    head_c: float = Field(0.05, gt=0, le=1e6, description="linear head: inverse L2 strength of the logistic "
                          "regression (scikit-learn's C; smaller = stronger regularisation)")

    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    lora_alpha: int = Field(64, ge=1, le=16384, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=64,
        description="Module names the LoRA layers wrap; checked against the base model at POST /jobs")

    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate")
    per_device_train_batch_size: int = Field(4, ge=1, le=1024, description="Dialogues per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024,
                                             description="Forward passes per optimizer step (effective batch)")
    # Upper bounds of steps and epochs are settings (MAX_TRAIN_STEPS, MAX_TRAIN_EPOCHS), checked per job.
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the dataset (unless max_steps > 0); "
                                    "at most MAX_TRAIN_EPOCHS")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; > 0 overrides num_train_epochs; "
                           "at most MAX_TRAIN_STEPS")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the steps spent warming up the rate")
    lr_scheduler_type: LrSchedulerType = Field("linear", description="transformers learning-rate schedule")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    max_input_length: int = Field(1024, ge=16, le=131072, description="Prompt tokens per dialogue at most (longer "
                                  "dialogues lose their end); the model is served with the same cut")
    max_output_length: int = Field(256, ge=4, le=8192, description="Answer tokens per sample at most")
    save_steps: int = Field(500, ge=1, le=2**31 - 1, description="Checkpoint every this many steps (resume point)")
    logging_steps: int = Field(50, ge=1, le=2**31 - 1, description="Report loss and progress every this many steps")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward: less memory, "
                                         "about a third more compute")
    shared_prefix: bool = Field(True, description="Run the system-prompt prefix once per batch and expand its "
                                "keys/values (app.ml.train.shared_prefix); exact, and about half the tokens")
    deepspeed: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = Field(
        None, description="A DeepSpeed config in configs/deepspeed/ (zero2, zero3) for a job on several GPUs "
        "(docs/deploy.md); none: plain DDP. Needs the deepspeed package on the workers")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed (numpy's range: set_seed seeds numpy too)")

    class_balance: ClassBalance = Field(
        "none", description="How often each intent is drawn in training: none = as in the data; sqrt = a class's "
        "share proportional to the square root of its row count; balanced = every class equally often "
        "(class-weighted sampling with replacement; see app.ml.train.balance)")
    eval_every_steps: int = Field(0, ge=0, le=2**31 - 1, description="With a validation dataset: label-score a "
                                  "sample of it every this many optimizer steps (and at the last step), record "
                                  "accuracy / macro-F1 and keep the best adapter by macro-F1; 0 = off")
    eval_max_samples: int = Field(64, ge=1, le=100000, description="Validation dialogues scored at each of those "
                                  "evaluations at most (a fixed, seeded sample)")
    early_stopping_patience: int = Field(0, ge=0, le=100000, description="Stop after this many evaluations in a "
                                         "row without a better macro-F1 (needs eval_every_steps); 0 = never")

    @model_validator(mode="after")
    def _check_steps(self):
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (use epochs) or > 0")
        return self

    @field_validator("deepspeed")
    @classmethod
    def _known_deepspeed_config(cls, name: str | None) -> str | None:
        if name is not None and name not in available_deepspeed_configs():
            raise ValueError(f"no DeepSpeed config '{name}' in configs/deepspeed/; available: "
                             f"{available_deepspeed_configs()}")
        return name


def _overrides_model() -> type[BaseModel]:
    """TrainingConfig with every field optional: what a job may override, each field with its type, bounds
    and description, so the OpenAPI document (Swagger) lists every knob."""
    fields = {}
    for name, info in TrainingConfig.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (annotation | None, Field(None, description=info.description))
    return create_model("TrainingOverrides", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


TrainingOverrides = _overrides_model()


def load_config_file(name_or_path: str) -> tuple[dict, str | None]:
    """Read a YAML recipe from ``configs/`` (by name) or a path; returns its ``hyperparameters`` mapping."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config '{name_or_path}' not found (looked in {CONFIGS_DIR})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return dict(data.get("hyperparameters", {})), data.get("base_model")


def default_config_name(settings) -> str:
    """DEFAULT_CONFIG when set, else the recipe for the hardware here: the seed recipe with a GPU, the CPU one without."""
    if settings.default_config:
        return settings.default_config
    return GPU_RECIPE if _cuda_here(settings.device) else CPU_RECIPE


def _cuda_here(device: str | None) -> bool:
    if device:
        return device.startswith("cuda")
    return _torch_sees_cuda()


@lru_cache(maxsize=1)
def _torch_sees_cuda() -> bool:
    import torch  # first call only: the worker on this machine makes the same choice (app.ml.models.loading)

    return torch.cuda.is_available()


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def deepspeed_config_path(name: str) -> Path:
    return CONFIGS_DIR / "deepspeed" / f"{name}.json"


def available_deepspeed_configs() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "deepspeed").glob("*.json"))


def resolve_training_config(config_name: str, overrides: dict | None) -> tuple[TrainingConfig, str | None]:
    """Recipe from ``configs/`` merged with per-job overrides, validated."""
    base, base_model = load_config_file(config_name)
    return TrainingConfig(**{**base, **(overrides or {})}), base_model

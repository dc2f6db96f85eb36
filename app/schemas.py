"""Typed request/response schemas of the REST API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.ml.train.config import TrainingConfig


class LabelOut(BaseModel):
    id: int
    name: str
    count: int | None = None


class DatasetOut(BaseModel):
    id: str
    name: str
    original_filename: str | None
    format: str = Field(description="cmcc_csv | text_label_csv | chat_jsonl")
    chat_style: str | None = Field(None, description="chat_jsonl only: system_prompt | legacy_template | mixed")
    n_rows: int
    n_labels: int
    labels: list[LabelOut]
    stats: dict[str, Any] = Field(description="imbalance (min/max per class, ratio) and token figures")
    system_prompt: str
    size_bytes: int
    created_at: datetime


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str
    validation_dataset_id: str | None = None
    base_model: str | None = Field(None, description="A base model name from GET /models (default: the config's).")
    config: str | None = Field(None, description="A recipe in configs/ (default: DEFAULT_CONFIG, else "
                               "cmcc34_qlora_system_prompt with a GPU and cpu_small without one).")
    hyperparameters: dict[str, Any] | None = Field(
        None, description="Overrides of the recipe's hyperparameters; see TrainingConfig.",
        examples=[{"max_steps": 30, "learning_rate": 0.0004}],
    )


class Progress(BaseModel):
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    epoch: float | None = None
    done: int | None = Field(None, description="evaluation jobs: samples done")
    total: int | None = Field(None, description="evaluation jobs: samples in all")


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    kind: Literal["train", "evaluate"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    dataset_id: str
    validation_dataset_id: str | None
    base_model: str | None
    config: str | None
    hyperparameters: dict[str, Any]
    target_model_id: str | None = None
    progress: Progress
    error: JobError | None
    cancel_requested: bool
    attempts: int
    model_id: str | None
    report_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class JobEventOut(BaseModel):
    id: int
    created_at: datetime
    kind: str
    message: str
    data: dict[str, Any]


class BaseModelOut(BaseModel):
    name: str
    kind: Literal["base"] = "base"
    architecture: str
    source: str
    description: str
    default: bool = False
    prepared: bool
    available: bool = Field(True, description="can be prepared here without installing anything")
    hub_id: str | None = None


class FineTunedModelOut(BaseModel):
    id: str
    kind: Literal["adapter"] = "adapter"
    name: str
    base_model: str
    job_id: str | None
    dataset_id: str | None
    quantization: str
    labels: list[LabelOut]
    metrics: dict[str, Any]
    created_at: datetime
    loss_curve_url: str | None = None


class ModelsOut(BaseModel):
    base_models: list[BaseModelOut]
    adapters: list[FineTunedModelOut]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A fine-tuned model id (adapter) or a base model name (zero-shot).")
    text: str | None = Field(None, min_length=1)
    texts: list[str] | None = Field(None, min_length=1, max_length=256)
    mode: Literal["score", "generate"] = Field(
        "score", description="score: rank the model's labels (always a valid label); generate: free text, parsed."
    )
    top_k: int = Field(5, ge=1, le=100)
    labels: list[list] | None = Field(
        None, description="Zero-shot on a base model only: [[id, name], ...]; default the CMCC-34 labels."
    )

    @model_validator(mode="after")
    def _one_of_text_texts(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        for i, t in enumerate(self.texts or []):
            if not t.strip():
                raise ValueError(f"texts[{i}] is empty")
        return self


class TopLabelOut(BaseModel):
    intent_id: int
    label: str
    score: float


class PredictionOut(BaseModel):
    text: str
    intent_id: int | None
    label: str | None
    confidence: float | None
    top_k: list[TopLabelOut]
    raw_output: str | None = None
    parsed: bool
    latency_ms: float


class ClassifyResponse(BaseModel):
    model: str
    mode: str
    predictions: list[PredictionOut]
    latency_ms: float


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dataset_id: str
    mode: Literal["score", "generate"] = "score"


class ReportOut(BaseModel):
    id: str
    model_id: str
    dataset_id: str
    job_id: str | None
    mode: str
    created_at: datetime
    summary: dict[str, Any]
    confusion_matrix_url: str


__all__ = [name for name in dir() if name[0].isupper()] + ["TrainingConfig"]

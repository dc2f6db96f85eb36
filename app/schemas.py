"""Typed request/response schemas of the REST API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    computed_field,
    field_validator,
    model_validator,
)

from app.domain.labels import MAX_LABEL_ID
from app.domain.prompt import MAX_LABEL_NAME_CHARS, check_label_name
from app.domain.resources import JobResources
from app.ml.train.config import TrainingConfig, TrainingOverrides


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC (app.models.utcnow)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# A time in UTC, with its offset: the RFC 3339 date-time the OpenAPI document promises.
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]


# --- errors: the one body every 4xx has ----------------------------------------------------


class FieldError(BaseModel):
    field: str = Field(description="The field, e.g. 'labels[2]' or 'hyperparameters.max_steps'.")
    message: str
    type: str = Field(description="The kind of problem (pydantic's error type), e.g. 'missing', 'int_type'.")


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, naming the field (and the row of an upload).")
    field: str | None = Field(None, description="The field at fault, when one is.")
    row: int | None = Field(None, description="Uploads: the 1-based row (line) at fault.")
    errors: list[FieldError] | None = Field(None, description="Request validation: every problem found.")


class ErrorResponse(BaseModel):
    """The body of every error answer (4xx) of the API."""

    detail: ErrorDetail


# --- request bodies ----------------------------------------------------------------------


def _lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where ``value`` holds a lone UTF-16 surrogate (valid JSON, not encodable text), or None."""
    if isinstance(value, str):
        return path if any(0xD800 <= ord(c) <= 0xDFFF for c in value) else None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if (found := _lone_surrogate_path(item, f"{path}[{i}]")) is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            for found in (_lone_surrogate_path(key, f"{path}.{key!a}"), _lone_surrogate_path(item, f"{path}.{key}")):
                if found is not None:
                    return found
    return None


class RequestBody(BaseModel):
    """A JSON request body: unknown fields and text that is not valid Unicode are refused (422)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info):
        found = _lone_surrogate_path(value, info.field_name)
        if found is not None:
            raise ValueError(f"{found} holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text")
        return value



class LabelOut(BaseModel):
    id: int
    name: str
    count: int | None = None


def _labels_of(pairs: list, counts: dict | None = None) -> list[dict]:
    """``[[id, name], ...]`` as stored → LabelOut fields (with each label's row count where known)."""
    return [{"id": i, "name": n, **({"count": counts.get(str(i), 0)} if counts is not None else {})}
            for i, n in pairs]


class DatasetOut(BaseModel):
    """Read from a ``Dataset`` row (from_attributes)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    original_filename: str | None
    format: str = Field(description="cmcc_csv | text_label_csv | chat_jsonl")
    chat_style: str | None = Field(None, description="chat_jsonl only: system_prompt | legacy_template | mixed")
    n_rows: int
    labels: list[LabelOut]
    stats: dict[str, Any] = Field(description="imbalance (min/max per class, ratio) and token figures")
    system_prompt: str
    size_bytes: int
    created_at: UtcDateTime

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, row: Any) -> Any:
        if isinstance(row, dict) or not hasattr(row, "label_set"):
            return row
        fields = {name: getattr(row, name) for name in cls.model_fields if name != "labels"}
        return {**fields, "labels": _labels_of(row.label_set, row.label_counts or {})}

    @computed_field
    @property
    def n_labels(self) -> int:
        return len(self.labels)


class JobCreate(RequestBody):
    dataset_id: str
    validation_dataset_id: str | None = None
    base_model: str | None = Field(None, description="A base model name from GET /models (default: the config's).")
    config: str | None = Field(None, description="A recipe in configs/ (default: DEFAULT_CONFIG, else "
                               "cmcc34_qlora_system_prompt with a GPU and cpu_small without one).")
    hyperparameters: TrainingOverrides | None = Field(
        None, description="Overrides of the recipe's hyperparameters (any subset).",
        examples=[{"max_steps": 30, "learning_rate": 0.0004}],
    )
    resources: JobResources | None = Field(
        None, description="Where and how wide the training runs: GPUs (one torchrun process each), CPU "
                          "processes, worker labels. Default: all the GPUs of any worker, or one CPU process.",
        examples=[{"gpus": 2, "labels": ["gpu"]}])


class Progress(BaseModel):
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    epoch: float | None = None
    done: int | None = Field(None, description="evaluation jobs: samples done")
    total: int | None = Field(None, description="evaluation jobs: samples in all")
    phase: str | None = Field(None, description="linear-head training: the dialogues being read ('training set', "
                              "'validation set')")
    features_done: int | None = Field(None, description="linear-head training: dialogues of that phase read")
    features_total: int | None = Field(None, description="linear-head training: dialogues of that phase in all")


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    """Read from a ``Job`` row (from_attributes)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: Literal["train", "evaluate"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    dataset_id: str
    validation_dataset_id: str | None
    base_model: str | None
    config: str | None = Field(validation_alias=AliasChoices("config", "config_name"))
    hyperparameters: dict[str, Any]
    resources: JobResources = Field(default_factory=JobResources)
    target_model_id: str | None = None
    progress: Progress
    error: JobError | None = None
    cancel_requested: bool
    attempts: int
    model_id: str | None
    report_id: str | None
    created_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None
    heartbeat_at: UtcDateTime | None

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, row: Any) -> Any:
        if isinstance(row, dict) or not hasattr(row, "config_name"):
            return row
        fields = {name: getattr(row, name) for name in cls.model_fields if hasattr(row, name)}
        fields["config"] = row.config_name
        fields["hyperparameters"] = row.hyperparameters or {}
        fields["resources"] = row.resources or {}
        # Progress keeps the keys it knows: training steps and evaluation counts share one JSON column.
        fields["progress"] = {k: v for k, v in (row.progress or {}).items() if k in Progress.model_fields}
        fields["error"] = ({"code": row.error_code or "error", "message": row.error_message or ""}
                           if row.status == "failed" else None)
        return fields


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: UtcDateTime
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
    """Read from a ``FineTunedModel`` row (from_attributes)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: Literal["adapter"] = "adapter"
    name: str
    base_model: str
    job_id: str | None
    dataset_id: str | None
    quantization: str = Field(description="as trained; the base model is served the same way")
    max_input_length: int | None = Field(None, description="dialogues are cut to this many prompt tokens, as in "
                                         "training (None: the serving limit)")
    head: Literal["lm", "linear"] = Field("lm", description="lm: a LoRA adapter scored by its answers (or "
                                          "generating them); linear: a linear head on the frozen base model")
    labels: list[LabelOut] = Field(validation_alias=AliasChoices("labels", "label_set"))
    metrics: dict[str, Any]
    created_at: UtcDateTime

    @field_validator("labels", mode="before")
    @classmethod
    def _label_pairs(cls, value: Any) -> Any:
        return _labels_of(value) if value and isinstance(value[0], (list, tuple)) else value

    @computed_field
    @property
    def loss_curve_url(self) -> str:
        return f"/models/{self.id}/loss_curve.png"


class ModelsOut(BaseModel):
    base_models: list[BaseModelOut]
    adapters: list[FineTunedModelOut]


MAX_ZERO_SHOT_LABELS = 200


LabelName = Annotated[
    StrictStr, Field(min_length=1, max_length=MAX_LABEL_NAME_CHARS), AfterValidator(check_label_name)
]
LabelId = Annotated[StrictInt, Field(ge=0, le=MAX_LABEL_ID)]
ModelName = Annotated[str, Field(min_length=1, max_length=200)]
DatasetId = Annotated[str, Field(min_length=1, max_length=200)]


class ClassifyRequest(RequestBody):
    model: ModelName = Field(description="A fine-tuned model id (adapter) or a base model name (zero-shot).")
    text: str | None = Field(None, min_length=1, description="One dialogue (turns joined by [SEP]).")
    texts: list[str] | None = Field(
        None, min_length=1,
        description="Several dialogues. At most CLASSIFY_MAX_TEXTS of at most CLASSIFY_MAX_TEXT_CHARS characters "
                    "each (settings; 413 beyond); a dialogue is cut to the model's max input length in tokens.",
    )
    mode: Literal["score", "generate"] = Field(
        "score", description="score: rank the model's labels (always a valid label); generate: free text, parsed."
    )
    top_k: int = Field(5, ge=1, le=100)
    strategy: Literal["trie", "full"] | None = Field(
        None, description="Score mode: trie reads the distribution decoding constrained to the label set samples "
                          "from (the dialogue runs, then the label trie's few branching tokens); full scores each "
                          "label's whole answer (in-process backend only). Default: CLASSIFY_STRATEGY (trie).")
    labels: list[tuple[LabelId, LabelName]] | None = Field(
        None, min_length=1, max_length=MAX_ZERO_SHOT_LABELS,
        description="Zero-shot on a base model only: [[id, name], ...] with unique integer ids and unique names; "
                    "a name's whitespace runs become one space, and it may not be empty, be over "
                    f"{MAX_LABEL_NAME_CHARS} characters, hold a control or invisible character or '意图：', or start "
                    "like an id ('3：'), as for uploads; default the CMCC-34 labels.",
        examples=[[[0, "办理开通"], [1, "办理取消"]]],
    )

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[tuple[int, str]] | None):
        seen_ids: dict[int, int] = {}
        seen_names: dict[str, int] = {}
        for index, (label_id, name) in enumerate(labels or []):
            if label_id in seen_ids:
                raise ValueError(f"labels[{index}] repeats the id {label_id} of labels[{seen_ids[label_id]}]")
            if name in seen_names:
                raise ValueError(f"labels[{index}] repeats the name of labels[{seen_names[name]}]")
            seen_ids[label_id], seen_names[name] = index, index
        return labels

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, text: str | None):
        if text is not None and not text.strip():
            raise ValueError("text is empty")
        return text

    @field_validator("texts")
    @classmethod
    def _texts_not_blank(cls, texts: list[str] | None):
        for i, t in enumerate(texts or []):
            if not t.strip():
                raise ValueError(f"texts[{i}] is empty")
        return texts

    @model_validator(mode="after")
    def _one_of_text_texts(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        return self

    @property
    def all_texts(self) -> list[str]:
        return self.texts if self.texts is not None else [self.text]


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
    strategy: str | None = None  # score mode's label scoring (trie or full); None for generate
    predictions: list[PredictionOut]
    latency_ms: float


class EvaluationCreate(RequestBody):
    model: ModelName = Field(description="A fine-tuned model id (adapter) or a base model name (zero-shot).")
    dataset_id: DatasetId = Field(description="A dataset whose label ids and names are the model's.")
    mode: Literal["score", "generate"] = "score"


class ReportOut(BaseModel):
    """Read from a ``Report`` row (from_attributes)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    model_id: str
    dataset_id: str
    job_id: str | None
    mode: str
    created_at: UtcDateTime
    summary: dict[str, Any]

    @computed_field
    @property
    def confusion_matrix_url(self) -> str:
        return f"/reports/{self.id}/confusion_matrix.png"

    @computed_field(description="score-mode reports: the reliability diagram of the confidences (else null)")
    @property
    def reliability_diagram_url(self) -> str | None:
        if (self.summary or {}).get("ece") is None:
            return None
        return f"/reports/{self.id}/reliability_diagram.png"


class WrongPredictionOut(BaseModel):
    index: int = Field(description="Position of the dialogue in the evaluated dataset")
    text: str
    true_id: int
    true_label: str
    pred_id: int
    pred_label: str
    confidence: float | None = None


class FailedPredictionOut(BaseModel):
    index: int = Field(description="Position of the dialogue in the evaluated dataset")
    text: str
    true_id: int
    true_label: str
    raw_output: str | None = Field(None, description="The generated answer that named no label")


class ReportDetailOut(ReportOut):
    metrics: dict[str, Any] = Field(description="accuracy, macro/weighted F1, per class, confused pairs, timing; "
                                    "baseline (TF-IDF + logistic regression trained on the model's training "
                                    "dataset, same rows) and lift (model minus baseline); calibration and ece "
                                    "(score mode); files")


__all__ = [name for name in dir() if name[0].isupper()] + ["TrainingConfig"]


class WorkerHealthOut(BaseModel):
    id: str
    hostname: str
    pid: int | None = None
    current_job_id: str | None = None
    labels: list[str] = Field(default_factory=list, description="WORKER_LABELS: it runs jobs that ask for these")
    last_seen_seconds_ago: float
    alive: bool = Field(description="seen within stale_after_seconds (and, on this host, its process exists)")


class WorkersHealthOut(BaseModel):
    live: int
    stale_after_seconds: float
    items: list[WorkerHealthOut]


class QueueHealthOut(BaseModel):
    queued: int
    oldest_queued_seconds: float | None = None
    running: int
    running_with_stale_heartbeat: int


class HealthOut(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    ready: bool = Field(description="a live worker has polled or heartbeat recently")
    workers: WorkersHealthOut
    queue: QueueHealthOut


class RecipeOut(BaseModel):
    name: str = Field(description="The name to give as a job's 'config'.")
    base_model: str | None = Field(None, description="The recipe's base model (a job may name another).")
    default: bool = Field(description="the recipe of a job that names none (DEFAULT_CONFIG, else by hardware)")
    hyperparameters: dict[str, Any]


class LossPoint(BaseModel):
    step: int
    loss: float


class ValidationPoint(BaseModel):
    step: int
    accuracy: float
    macro_f1: float
    n_samples: int = Field(0, description="validation dialogues scored")


class LossHistoryOut(BaseModel):
    model_id: str
    points: list[LossPoint] = Field(description="training loss at each logged step (empty for an older adapter)")
    validation: list[ValidationPoint] = Field(
        default_factory=list, description="validation accuracy / macro-F1 of the evaluations during training "
        "(eval_every_steps; empty without them)")
    best_step: int | None = Field(None, description="the step whose adapter was kept (best validation macro-F1)")

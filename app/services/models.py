"""Model registry: base models (app.ml.models.registry) and fine-tuned adapters (database rows)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.domain.artifacts import LOSS_CURVE_FILENAME
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.models import FineTunedModel, Job, new_id
from app.services.errors import NotFoundError, UnprocessableError
from app.services.rows import get_row


def list_adapters(session: Session) -> list[FineTunedModel]:
    return list(session.scalars(select(FineTunedModel).order_by(FineTunedModel.created_at.desc())))


def get_adapter(session: Session, model_id: str) -> FineTunedModel:
    return get_row(session, FineTunedModel, model_id, "model")


def loss_curve_file(settings: Settings, model: FineTunedModel) -> Path:
    path = settings.resolve_stored_path(model.adapter_path) / LOSS_CURVE_FILENAME
    if not path.is_file():
        raise NotFoundError(f"model '{model.id}' has no loss curve")
    return path


def _adapter_metadata(settings: Settings, model: FineTunedModel) -> dict:
    from app.domain.artifacts import ADAPTER_METADATA_FILENAME

    meta = settings.resolve_stored_path(model.adapter_path) / ADAPTER_METADATA_FILENAME
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}


def loss_history(settings: Settings, model: FineTunedModel) -> list[dict]:
    """The training loss at each logged step, as the trainer stored it beside the adapter."""
    return _adapter_metadata(settings, model).get("loss_history") or []


def validation_history(settings: Settings, model: FineTunedModel) -> list[dict]:
    """The evaluations during training ({"step", "accuracy", "macro_f1", "n_samples"}); [] without them."""
    return _adapter_metadata(settings, model).get("validation_history") or []


def list_base_models(settings: Settings) -> list[dict]:
    from app.ml.models.registry import list_base_models as registry_listing

    return registry_listing(settings)


def resolve_model_ref(session: Session, settings: Settings, model: str, *, labels: list | None = None):
    """A ModelRef for a fine-tuned adapter id or, for zero-shot, a base model name."""
    from app.ml.infer.base import ModelRef
    from app.ml.models.registry import BaseModelError, get_spec, resolve_base_model

    adapter = session.get(FineTunedModel, model)
    try:
        if adapter is not None:
            return adapter_model_ref(settings, adapter)
        get_spec(model, settings)
        label_set = LabelSet.from_pairs(labels) if labels else CMCC34_LABEL_SET
        base_dir = resolve_base_model(model, settings)
        return ModelRef(key=f"base:{model}", version=f"base:{model}", base_model_dir=base_dir, adapter_dir=None,
                        system_prompt=build_system_prompt(label_set), label_set=label_set, quantization="auto",
                        max_input_length=settings.classify_max_input_length)
    except BaseModelError as exc:
        raise UnprocessableError(f"model '{model}' is neither a fine-tuned model id nor a usable base model: {exc}",
                                 field="model") from None


def adapter_model_ref(settings: Settings, model: FineTunedModel):
    """A ModelRef for an adapter, served as it was trained: its row (registered, or built but not yet
    stored, for the validation run of the job that trained it) is the one source of its serving settings.

    Raises BaseModelError when its base model cannot be had."""
    from app.ml.infer.base import ModelRef
    from app.ml.models.registry import resolve_base_model

    adapter_dir = settings.resolve_stored_path(model.adapter_path)
    if not adapter_dir.is_dir():
        raise NotFoundError(f"model '{model.id}': adapter files are missing at {adapter_dir}")
    return ModelRef(
        key=model.id, version=f"{model.id}:{_mtime(adapter_dir)}",
        base_model_dir=resolve_base_model(model.base_model, settings),
        adapter_dir=adapter_dir, system_prompt=model.system_prompt,
        label_set=LabelSet.from_pairs(model.label_set),
        # the base is loaded as in training (a 4-bit-trained adapter on a 4-bit base)
        quantization=model.quantization,
        # dialogues are cut at serving exactly as they were in training (a recipe without a limit: the
        # serving limit)
        max_input_length=model.max_input_length or settings.classify_max_input_length,
        head=model.head or "lm",
    )


def _mtime(path: Path) -> int:
    from app.ml.models.linear_head import LINEAR_HEAD_FILENAME

    for name in ("adapter_model.safetensors", LINEAR_HEAD_FILENAME):
        weights = path / name
        if weights.exists():
            return int(weights.stat().st_mtime_ns)
    return 0


def planned_model_id(session: Session, job: Job) -> str:
    """The id the model of training job ``job`` has or will have: fixed by the job, so that the report an
    evaluation writes before registration, and a job run again, name the same model."""
    existing = session.scalar(select(FineTunedModel.id).where(FineTunedModel.job_id == job.id))
    return existing or f"ft_{job.id.removeprefix('job_')}"


def adapter_row(settings: Settings, *, base_model: str, adapter_dir: Path, label_set: list, system_prompt: str,
                quantization: str, max_input_length: int | None, metrics: dict | None = None,
                head: str = "lm", job: Job | None = None, model_id: str | None = None, name: str | None = None,
                dataset_id: str | None = None, session: Session | None = None) -> FineTunedModel:
    """The model row of an adapter folder, not added to any session. A training job's adapter gets the
    job's planned id; its folder is stored relative to DATA_DIR (moving DATA_DIR keeps every row valid)."""
    if model_id is None:
        model_id = planned_model_id(session, job) if job is not None and session is not None else new_id("ft")
    dataset_id = dataset_id or (job.dataset_id if job is not None else None)
    return FineTunedModel(
        id=model_id, name=name or f"{base_model}-{dataset_id or model_id}", base_model=base_model,
        job_id=job.id if job is not None else None, dataset_id=dataset_id,
        adapter_path=settings.stored_path(adapter_dir), label_set=[list(pair) for pair in label_set],
        system_prompt=system_prompt, quantization=quantization, max_input_length=max_input_length,
        head=head, metrics=metrics or {},
    )


def register_adapter(session: Session, settings: Settings, **fields) -> FineTunedModel:
    """Register an adapter folder as a servable model (fields: ``adapter_row``'s); not committed.

    The one way a model row is made, by the worker, the benchmarks and the tests alike. Idempotent per
    training job: a job run again after its worker died gets the row it already has (models.job_id is
    unique)."""
    job = fields.get("job")
    if job is not None:
        existing = session.scalar(select(FineTunedModel).where(FineTunedModel.job_id == job.id))
        if existing is not None:
            return existing
    model = adapter_row(settings, session=session, **fields)
    session.add(model)
    session.flush()
    return model

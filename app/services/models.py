"""Model registry: base models (app.ml.models.registry) and fine-tuned adapters (database rows)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import LabelSet, build_system_prompt
from app.models import FineTunedModel
from app.services.errors import NotFoundError, UnprocessableError
from app.services.rows import get_row


def list_adapters(session: Session) -> list[FineTunedModel]:
    return list(session.scalars(select(FineTunedModel).order_by(FineTunedModel.created_at.desc())))


def get_adapter(session: Session, model_id: str) -> FineTunedModel:
    return get_row(session, FineTunedModel, model_id, "model")


def loss_history(model: FineTunedModel) -> list[dict]:
    """The training loss at each logged step, as the trainer stored it beside the adapter."""
    meta = Path(model.adapter_path) / "intent_tuner.json"
    if not meta.is_file():
        return []
    return json.loads(meta.read_text(encoding="utf-8")).get("loss_history") or []


def list_base_models(settings: Settings) -> list[dict]:
    from app.ml.models.registry import list_base_models as registry_listing

    return registry_listing(settings)


def resolve_model_ref(session: Session, settings: Settings, model: str, *, labels: list | None = None):
    """A ModelRef for a fine-tuned adapter id or, for zero-shot, a base model name."""
    from app.ml.models.registry import BaseModelError, get_spec, resolve_base_model
    from app.ml.infer.classifier import ModelRef

    adapter = session.get(FineTunedModel, model)
    try:
        if adapter is not None:
            return adapter_model_ref(settings, model_id=adapter.id, base_model=adapter.base_model,
                                     adapter_dir=Path(adapter.adapter_path), system_prompt=adapter.system_prompt,
                                     label_set=adapter.label_set)
        get_spec(model, settings)
        label_set = LabelSet.from_pairs(labels) if labels else CMCC34_LABEL_SET
        base_dir = resolve_base_model(model, settings)
        return ModelRef(key=f"base:{model}", version=f"base:{model}", base_model_dir=base_dir, adapter_dir=None,
                        system_prompt=build_system_prompt(label_set), label_set=label_set, quantization="auto",
                        max_input_length=settings.classify_max_input_length)
    except BaseModelError as exc:
        raise UnprocessableError(f"model '{model}' is neither a fine-tuned model id nor a usable base model: {exc}",
                                 field="model") from None


def adapter_model_ref(settings: Settings, *, model_id: str, base_model: str, adapter_dir: Path, system_prompt: str,
                      label_set: list):
    """A ModelRef for an adapter folder (registered, or just trained and evaluated before it is registered).

    Raises BaseModelError when its base model cannot be had."""
    from app.ml.models.registry import resolve_base_model
    from app.ml.infer.classifier import ModelRef

    if not adapter_dir.is_dir():
        raise NotFoundError(f"model '{model_id}': adapter files are missing at {adapter_dir}")
    trained_with = _training_config(adapter_dir)
    return ModelRef(
        key=model_id, version=f"{model_id}:{_mtime(adapter_dir)}",
        base_model_dir=resolve_base_model(base_model, settings),
        adapter_dir=adapter_dir, system_prompt=system_prompt,
        label_set=LabelSet.from_pairs(label_set),
        # one base model in memory serves every adapter on it: 4-bit where "auto" picks it
        quantization="auto",
        # dialogues are cut at serving exactly as they were in training (a recipe without a limit: the
        # serving limit)
        max_input_length=trained_with.get("max_input_length") or settings.classify_max_input_length,
    )


def _training_config(adapter_dir: Path) -> dict:
    meta = adapter_dir / "intent_tuner.json"
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text(encoding="utf-8")).get("training_config") or {}


def _mtime(path: Path) -> int:
    weights = path / "adapter_model.safetensors"
    return int(weights.stat().st_mtime_ns) if weights.exists() else 0

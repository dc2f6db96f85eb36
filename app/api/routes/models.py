from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.deps import SessionDep, SettingsDep
from app.api.errors import error_responses
from app.api.presenters import adapter_out
from app.schemas import BaseModelOut, FineTunedModelOut, LossHistoryOut, LossPoint, ModelsOut
from app.services import models as service
from app.services.errors import NotFoundError

router = APIRouter(prefix="/models", tags=["models"])

_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The image (PNG)."}}


@router.get("", response_model=ModelsOut, summary="Base models (registry) and fine-tuned adapters")
def list_models(session: SessionDep, settings: SettingsDep) -> ModelsOut:
    base = [BaseModelOut(**{k: v for k, v in m.items() if k in BaseModelOut.model_fields})
            for m in service.list_base_models(settings)]
    return ModelsOut(base_models=base, adapters=[adapter_out(m) for m in service.list_adapters(session)])


@router.get("/{model_id}", response_model=FineTunedModelOut, responses=error_responses(404, 422))
def get_model(model_id: str, session: SessionDep) -> FineTunedModelOut:
    return adapter_out(service.get_adapter(session, model_id))


@router.get("/{model_id}/loss_curve.png", response_class=FileResponse,
            responses={**_PNG, **error_responses(404, 422)})
def loss_curve(model_id: str, session: SessionDep) -> FileResponse:
    path = Path(service.get_adapter(session, model_id).adapter_path) / "loss_curve.png"
    if not path.is_file():
        raise NotFoundError(f"model '{model_id}' has no loss curve")
    return FileResponse(path, media_type="image/png")


@router.get("/{model_id}/loss_history", response_model=LossHistoryOut, responses=error_responses(404, 422),
            summary="Training loss by step (the numbers behind loss_curve.png)")
def loss_history(model_id: str, session: SessionDep) -> LossHistoryOut:
    points = service.loss_history(service.get_adapter(session, model_id))
    return LossHistoryOut(model_id=model_id, points=[LossPoint(**p) for p in points])

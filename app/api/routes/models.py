from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.deps import SessionDep, SettingsDep
from app.api.errors import error_responses
from app.schemas import BaseModelOut, FineTunedModelOut, LossHistoryOut, LossPoint, ValidationPoint, ModelsOut
from app.services import models as service

router = APIRouter(prefix="/models", tags=["models"])

_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The image (PNG)."}}


@router.get("", response_model=ModelsOut, summary="Base models (registry) and fine-tuned adapters")
def list_models(session: SessionDep, settings: SettingsDep) -> ModelsOut:
    base = [BaseModelOut(**{k: v for k, v in m.items() if k in BaseModelOut.model_fields})
            for m in service.list_base_models(settings)]
    adapters = [FineTunedModelOut.model_validate(m) for m in service.list_adapters(session)]
    return ModelsOut(base_models=base, adapters=adapters)


@router.get("/{model_id}", response_model=FineTunedModelOut, responses=error_responses(404, 422))
def get_model(model_id: str, session: SessionDep) -> FineTunedModelOut:
    return FineTunedModelOut.model_validate(service.get_adapter(session, model_id))


@router.get("/{model_id}/loss_curve.png", response_class=FileResponse,
            responses={**_PNG, **error_responses(404, 422)})
def loss_curve(model_id: str, session: SessionDep, settings: SettingsDep) -> FileResponse:
    return FileResponse(service.loss_curve_file(settings, service.get_adapter(session, model_id)), media_type="image/png")


@router.get("/{model_id}/loss_history", response_model=LossHistoryOut, responses=error_responses(404, 422),
            summary="Training loss by step, and validation accuracy / macro-F1 where the job evaluated during "
                    "training (the numbers behind loss_curve.png)")
def loss_history(model_id: str, session: SessionDep, settings: SettingsDep) -> LossHistoryOut:
    model = service.get_adapter(session, model_id)
    points = service.loss_history(settings, model)
    return LossHistoryOut(model_id=model_id, points=[LossPoint(**p) for p in points],
                          validation=[ValidationPoint(**v) for v in service.validation_history(settings, model)],
                          best_step=(model.metrics or {}).get("best_step"))

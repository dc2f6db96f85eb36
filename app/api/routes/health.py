from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import SessionDep, SettingsDep
from app.schemas import HealthOut
from app.services.worker_registry import health_summary

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut,
            summary="Liveness of the API, with the workers' liveness and the queue")
def health(session: SessionDep, settings: SettingsDep) -> HealthOut:
    session.execute(text("SELECT 1"))
    return HealthOut(status="ok", **health_summary(session, settings))


@router.get("/health/ready", response_model=HealthOut,
            summary="Ready when a live worker has polled or heartbeat recently; else 503",
            responses={503: {"model": HealthOut, "description": "no live worker: queued jobs would wait"}})
def ready(session: SessionDep, settings: SettingsDep):
    summary = health_summary(session, settings)
    if not summary["ready"]:
        return JSONResponse(status_code=503, content=HealthOut(status="not_ready", **summary).model_dump(mode="json"))
    return HealthOut(status="ready", **summary)

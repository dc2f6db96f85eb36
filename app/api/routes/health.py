from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import SessionDep, SettingsDep
from app.services.worker_registry import health_summary

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness of the API, with the workers' liveness and the queue")
def health(session: SessionDep, settings: SettingsDep) -> dict:
    session.execute(text("SELECT 1"))
    return {"status": "ok", **health_summary(session, settings)}


@router.get("/health/ready", summary="Ready when a live worker has polled or heartbeat recently; else 503",
            responses={503: {"description": "no live worker: queued jobs would wait"}})
def ready(session: SessionDep, settings: SettingsDep):
    summary = health_summary(session, settings)
    if not summary["ready"]:
        return JSONResponse(status_code=503, content={"status": "not_ready", **summary})
    return {"status": "ready", **summary}

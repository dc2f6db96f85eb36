from fastapi import APIRouter, Query, status

from app.api.deps import SessionDep, SettingsDep
from app.api.errors import error_responses
from app.schemas import JobCreate, JobEventOut, JobOut
from app.services import jobs as service

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut,
             responses=error_responses(400, 404, 409, 413, 422))
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep) -> JobOut:
    job = service.create_training_job(
        session, settings, dataset_id=body.dataset_id, validation_dataset_id=body.validation_dataset_id,
        base_model=body.base_model, config=body.config,
        hyperparameters=body.hyperparameters.model_dump(exclude_none=True) if body.hyperparameters else None,
        resources=body.resources,
    )
    return JobOut.model_validate(job)


@router.get("", response_model=list[JobOut], responses=error_responses(422))
def list_jobs(session: SessionDep, status: str | None = None, limit: int = Query(100, ge=1, le=1000)) -> list[JobOut]:
    return [JobOut.model_validate(j) for j in service.list_jobs(session, status, limit)]


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404, 422))
def get_job(job_id: str, session: SessionDep) -> JobOut:
    return JobOut.model_validate(service.get_job(session, job_id))


@router.get("/{job_id}/events", response_model=list[JobEventOut], responses=error_responses(404, 422))
def job_events(job_id: str, session: SessionDep,
               after_id: int = Query(0, ge=0, le=2**63 - 1, description="events with a larger id (a 64-bit id)")
               ) -> list[JobEventOut]:
    return [JobEventOut.model_validate(e) for e in service.list_events(session, job_id, after_id)]


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409, 422))
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    return JobOut.model_validate(service.cancel_job(session, job_id))

from fastapi import APIRouter, status

from app.api.deps import SessionDep, SettingsDep
from app.api.errors import error_responses
from app.schemas import EvaluationCreate, JobOut
from app.services import jobs as service

router = APIRouter(prefix="/evaluations", tags=["reports"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut,
             responses=error_responses(400, 404, 413, 422),
             summary="Evaluate a model on a dataset (runs in the worker; the job's report_id names the report)")
def create_evaluation(body: EvaluationCreate, session: SessionDep, settings: SettingsDep) -> JobOut:
    job = service.create_evaluation_job(session, settings, model=body.model, dataset_id=body.dataset_id, mode=body.mode)
    return JobOut.model_validate(job)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404, 422))
def get_evaluation(job_id: str, session: SessionDep) -> JobOut:
    return JobOut.model_validate(service.get_job(session, job_id, kind="evaluate"))

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.deps import SessionDep
from app.api.errors import error_responses
from app.api.presenters import report_out
from app.schemas import ReportDetailOut, ReportOut
from app.services import reports as service

router = APIRouter(prefix="/reports", tags=["reports"])

_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The image (PNG)."}}


@router.get("", response_model=list[ReportOut], responses=error_responses(422))
def list_reports(session: SessionDep, model_id: str | None = None) -> list[ReportOut]:
    return [report_out(r) for r in service.list_reports(session, model_id)]


@router.get("/{report_id}", response_model=ReportDetailOut, responses=error_responses(404, 422),
            summary="All metrics of a report (accuracy, F1s, per-class, confused pairs, timing)")
def get_report(report_id: str, session: SessionDep) -> ReportDetailOut:
    report = service.get_report(session, report_id)
    return ReportDetailOut(**report_out(report).model_dump(), metrics=service.report_metrics(report))


@router.get("/{report_id}/confusion_matrix.png", response_class=FileResponse,
            responses={**_PNG, **error_responses(404, 422)})
def confusion_matrix(report_id: str, session: SessionDep) -> FileResponse:
    report = service.get_report(session, report_id)
    return FileResponse(service.report_file(report, "confusion_matrix.png"), media_type="image/png")


@router.get("/{report_id}/errors", response_model=list[dict[str, Any]], responses=error_responses(404, 422),
            summary="Wrong predictions with predicted and true labels")
def errors(report_id: str, session: SessionDep) -> list:
    return service.read_report_json(service.get_report(session, report_id), "error_predictions.json")


@router.get("/{report_id}/failed", response_model=list[dict[str, Any]], responses=error_responses(404, 422),
            summary="Predictions that could not be parsed (generate mode), with the sample")
def failed(report_id: str, session: SessionDep) -> list:
    return service.read_report_json(service.get_report(session, report_id), "failed_predictions.json")

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.deps import SessionDep
from app.api.presenters import report_out
from app.schemas import ReportOut
from app.services import reports as service

router = APIRouter(prefix="/reports", tags=["reports"])


@router.get("", response_model=list[ReportOut])
def list_reports(session: SessionDep, model_id: str | None = None) -> list[ReportOut]:
    return [report_out(r) for r in service.list_reports(session, model_id)]


@router.get("/{report_id}", summary="All metrics of a report (accuracy, F1s, per-class, confused pairs, timing)")
def get_report(report_id: str, session: SessionDep) -> dict:
    report = service.get_report(session, report_id)
    return {**report_out(report).model_dump(mode="json"), "metrics": service.report_metrics(report)}


@router.get("/{report_id}/confusion_matrix.png", response_class=FileResponse)
def confusion_matrix(report_id: str, session: SessionDep) -> FileResponse:
    report = service.get_report(session, report_id)
    return FileResponse(service.report_file(report, "confusion_matrix.png"), media_type="image/png")


@router.get("/{report_id}/errors", summary="Wrong predictions with predicted and true labels")
def errors(report_id: str, session: SessionDep) -> list:
    return service.read_report_json(service.get_report(session, report_id), "error_predictions.json")


@router.get("/{report_id}/failed", summary="Predictions that could not be parsed (generate mode), with the sample")
def failed(report_id: str, session: SessionDep) -> list:
    return service.read_report_json(service.get_report(session, report_id), "failed_predictions.json")

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.deps import SessionDep, SettingsDep
from app.api.errors import error_responses
from app.schemas import FailedPredictionOut, ReportDetailOut, ReportOut, WrongPredictionOut
from app.services import reports as service

router = APIRouter(prefix="/reports", tags=["reports"])

_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The image (PNG)."}}


@router.get("", response_model=list[ReportOut], responses=error_responses(422))
def list_reports(session: SessionDep, model_id: str | None = None) -> list[ReportOut]:
    return [ReportOut.model_validate(r) for r in service.list_reports(session, model_id)]


@router.get("/{report_id}", response_model=ReportDetailOut, responses=error_responses(404, 422),
            summary="All metrics of a report (accuracy, F1s, per-class, confused pairs, timing)")
def get_report(report_id: str, session: SessionDep, settings: SettingsDep) -> ReportDetailOut:
    report = service.get_report(session, report_id)
    return ReportDetailOut(**ReportOut.model_validate(report).model_dump(exclude={"confusion_matrix_url",
                                                                                  "reliability_diagram_url"}),
                           metrics=service.report_metrics(settings, report))


@router.get("/{report_id}/confusion_matrix.png", response_class=FileResponse,
            responses={**_PNG, **error_responses(404, 422)})
def confusion_matrix(report_id: str, session: SessionDep, settings: SettingsDep) -> FileResponse:
    report = service.get_report(session, report_id)
    return FileResponse(service.confusion_matrix_file(settings, report), media_type="image/png")


@router.get("/{report_id}/reliability_diagram.png", response_class=FileResponse,
            responses={**_PNG, **error_responses(404, 422)},
            summary="Score-mode reports: accuracy against confidence per bin (calibration, ECE in the metrics)")
def reliability_diagram(report_id: str, session: SessionDep, settings: SettingsDep) -> FileResponse:
    report = service.get_report(session, report_id)
    return FileResponse(service.reliability_diagram_file(settings, report), media_type="image/png")


@router.get("/{report_id}/errors", response_model=list[WrongPredictionOut], responses=error_responses(404, 422),
            summary="Wrong predictions with predicted and true labels")
def errors(report_id: str, session: SessionDep, settings: SettingsDep) -> list[WrongPredictionOut]:
    return service.wrong_predictions(settings, service.get_report(session, report_id))


@router.get("/{report_id}/failed", response_model=list[FailedPredictionOut], responses=error_responses(404, 422),
            summary="Predictions that could not be parsed (generate mode), with the sample")
def failed(report_id: str, session: SessionDep, settings: SettingsDep) -> list[FailedPredictionOut]:
    return service.failed_predictions(settings, service.get_report(session, report_id))

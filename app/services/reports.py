"""Evaluation reports: rows in the database, files in DATA_DIR/reports/<id>/."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.domain.artifacts import (
    CONFUSION_MATRIX_FILENAME,
    RELIABILITY_DIAGRAM_FILENAME,
    REPORT_DETAIL_FILENAME,
    REPORT_ERRORS_FILENAME,
    REPORT_FAILED_FILENAME,
    REPORT_RESULTS_FILENAME,
)
from app.models import Report, new_id
from app.services.errors import NotFoundError
from app.services.rows import get_row

SUMMARY_KEYS = ("n_samples", "accuracy", "macro_f1", "weighted_f1", "success_rate", "n_failed",
                "evaluation_seconds", "seconds_per_sample", "mode", "baseline", "lift", "ece", "files")


def new_report_dir(settings: Settings) -> tuple[str, Path]:
    report_id = new_id("rep")
    return report_id, settings.reports_dir / report_id


def record_report(session: Session, settings: Settings, *, report_id: str, report_dir: Path, report: dict,
                  model_id: str, dataset_id: str, job_id: str | None) -> Report:
    """Add the report's row; the caller commits it together with the job's end (app.services.queue.complete_job)."""
    row = Report(id=report_id, model_id=model_id, dataset_id=dataset_id, job_id=job_id, mode=report.get("mode", "score"),
                 path=settings.stored_path(report_dir), summary={k: report.get(k) for k in SUMMARY_KEYS})
    session.add(row)
    session.flush()
    return row


def list_reports(session: Session, model_id: str | None = None) -> list[Report]:
    query = select(Report).order_by(Report.created_at.desc())
    if model_id:
        query = query.where(Report.model_id == model_id)
    return list(session.scalars(query))


def get_report(session: Session, report_id: str) -> Report:
    return get_row(session, Report, report_id, "report")


def report_dir(settings: Settings, report: Report) -> Path:
    return settings.resolve_stored_path(report.path)


def report_file(settings: Settings, report: Report, name: str) -> Path:
    path = report_dir(settings, report) / name
    if not path.is_file():
        raise NotFoundError(f"report '{report.id}' has no {name}")
    return path


def confusion_matrix_file(settings: Settings, report: Report) -> Path:
    return report_file(settings, report, CONFUSION_MATRIX_FILENAME)


def reliability_diagram_file(settings: Settings, report: Report) -> Path:
    return report_file(settings, report, RELIABILITY_DIAGRAM_FILENAME)


def _read_json(settings: Settings, report: Report, name: str) -> dict | list:
    return json.loads(report_file(settings, report, name).read_text(encoding="utf-8"))


def report_metrics(settings: Settings, report: Report) -> dict:
    """Everything GET /reports/{id} shows: the headline metrics plus per-class figures and confusions."""
    return {**_read_json(settings, report, REPORT_RESULTS_FILENAME), **_read_json(settings, report, REPORT_DETAIL_FILENAME)}


def wrong_predictions(settings: Settings, report: Report) -> list[dict]:
    return _read_json(settings, report, REPORT_ERRORS_FILENAME)


def failed_predictions(settings: Settings, report: Report) -> list[dict]:
    return _read_json(settings, report, REPORT_FAILED_FILENAME)

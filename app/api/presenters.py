"""ORM rows → response schemas (kept out of the routes so they stay thin)."""

from app.models import Dataset, FineTunedModel, Job, JobEvent, Report
from app.schemas import DatasetOut, FineTunedModelOut, JobError, JobEventOut, JobOut, LabelOut, Progress, ReportOut


def dataset_out(d: Dataset) -> DatasetOut:
    labels = [LabelOut(id=i, name=n, count=d.label_counts.get(str(i), 0)) for i, n in d.label_set]
    return DatasetOut(id=d.id, name=d.name, original_filename=d.original_filename, format=d.format,
                      chat_style=d.chat_style, n_rows=d.n_rows, n_labels=len(labels), labels=labels, stats=d.stats,
                      system_prompt=d.system_prompt, size_bytes=d.size_bytes, created_at=d.created_at)


def job_out(j: Job) -> JobOut:
    error = JobError(code=j.error_code or "error", message=j.error_message or "") if j.status == "failed" else None
    return JobOut(id=j.id, kind=j.kind, status=j.status, dataset_id=j.dataset_id,
                  validation_dataset_id=j.validation_dataset_id, base_model=j.base_model, config=j.config_name,
                  hyperparameters=j.hyperparameters or {}, target_model_id=j.target_model_id,
                  progress=Progress(**{k: v for k, v in (j.progress or {}).items() if k in Progress.model_fields}),
                  error=error, cancel_requested=j.cancel_requested, attempts=j.attempts, model_id=j.model_id,
                  report_id=j.report_id, created_at=j.created_at, started_at=j.started_at,
                  finished_at=j.finished_at, heartbeat_at=j.heartbeat_at)


def event_out(e: JobEvent) -> JobEventOut:
    return JobEventOut(id=e.id, created_at=e.created_at, kind=e.kind, message=e.message, data=e.data or {})


def adapter_out(m: FineTunedModel) -> FineTunedModelOut:
    return FineTunedModelOut(id=m.id, name=m.name, base_model=m.base_model, job_id=m.job_id, dataset_id=m.dataset_id,
                             quantization=m.quantization, labels=[LabelOut(id=i, name=n) for i, n in m.label_set],
                             metrics=m.metrics or {}, created_at=m.created_at,
                             loss_curve_url=f"/models/{m.id}/loss_curve.png")


def report_out(r: Report) -> ReportOut:
    return ReportOut(id=r.id, model_id=r.model_id, dataset_id=r.dataset_id, job_id=r.job_id, mode=r.mode,
                     created_at=r.created_at, summary=r.summary or {},
                     confusion_matrix_url=f"/reports/{r.id}/confusion_matrix.png")

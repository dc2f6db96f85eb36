"""SQLAlchemy ORM tables. The schema is created and upgraded only by Alembic (``migrations/``)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python, on every database.

    SQLite stores no offset and hands back naive datetimes; PostgreSQL's timestamptz hands back the
    session's zone. Values are converted to UTC on the way in and marked UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware UTC times (app.models.utcnow)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    original_filename: Mapped[str | None] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(40))
    chat_style: Mapped[str | None] = mapped_column(String(40))
    n_rows: Mapped[int] = mapped_column(Integer)
    label_set: Mapped[list] = mapped_column(JSON)  # [[id, name], ...]
    label_counts: Mapped[dict] = mapped_column(JSON)  # {"id": count}
    stats: Mapped[dict] = mapped_column(JSON)  # imbalance and token figures
    system_prompt: Mapped[str] = mapped_column(Text)  # stored once per dataset, not per row
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), default="train")  # train | evaluate
    status: Mapped[str] = mapped_column(String(20), index=True)  # queued|running|succeeded|failed|cancelled
    dataset_id: Mapped[str] = mapped_column(String(40), ForeignKey("datasets.id"))
    validation_dataset_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("datasets.id"))
    base_model: Mapped[str | None] = mapped_column(String(200))
    config_name: Mapped[str | None] = mapped_column(String(200))
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)
    # evaluate jobs: which model, which mode
    target_model_id: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # What the job asks of its worker: {"gpus": n, "processes": n, "labels": [...]} (app.schemas.JobResources).
    resources: Mapped[dict | None] = mapped_column(JSON, default=dict)
    # resources.labels as one canonical string (app.domain.labels): a worker claims a job only when it has them all.
    required_labels: Mapped[str] = mapped_column(String(200), default="", server_default="")
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    model_id: Mapped[str | None] = mapped_column(String(40))
    report_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_jobs_status_required_labels", "status", "required_labels"),)


class JobEvent(Base):
    __tablename__ = "job_events"

    # 64-bit ids (GET /jobs/{id}/events?after_id=); SQLite's INTEGER PRIMARY KEY already is one.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict] = mapped_column(JSON, default=dict)


class FineTunedModel(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(200))
    # One model per training job: a job run again after its worker died registers nothing new.
    __table_args__ = (UniqueConstraint("job_id", name="uq_models_job_id"),)
    job_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("jobs.id"))
    dataset_id: Mapped[str | None] = mapped_column(String(40))
    adapter_path: Mapped[str] = mapped_column(String(500))  # relative to DATA_DIR (Settings.stored_path)
    label_set: Mapped[list] = mapped_column(JSON)
    system_prompt: Mapped[str] = mapped_column(Text)
    quantization: Mapped[str] = mapped_column(String(20))  # as trained: the base is served the same way
    # Dialogues are cut to this many prompt tokens in training, and so in serving (None: the serving limit).
    max_input_length: Mapped[int | None] = mapped_column(Integer)
    # "lm": a LoRA adapter, scored by its answers; "linear": a linear head on the frozen base (app.ml.models.linear_head)
    head: Mapped[str] = mapped_column(String(20), default="lm", server_default="lm")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Report(Base):
    __tablename__ = "reports"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[str] = mapped_column(String(40))
    __table_args__ = (UniqueConstraint("job_id", name="uq_reports_job_id"),)  # one report per job
    job_id: Mapped[str | None] = mapped_column(String(40))
    mode: Mapped[str] = mapped_column(String(20))
    path: Mapped[str] = mapped_column(String(500))  # relative to DATA_DIR (Settings.stored_path)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerRow(Base):
    """A worker process as it last reported itself: liveness is ``last_seen_at``, written on every poll and
    heartbeat (a worker on another host is judged by it, never by its pid)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:random, as in jobs.worker_id
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    current_job_id: Mapped[str | None] = mapped_column(String(40))
    labels: Mapped[str] = mapped_column(String(200), default="", server_default="")  # canonical, as jobs'


JOB_TERMINAL = ("succeeded", "failed", "cancelled")
__all__ = ["Base", "Dataset", "Job", "JobEvent", "FineTunedModel", "Report", "WorkerRow", "new_id", "utcnow", "JOB_TERMINAL"]

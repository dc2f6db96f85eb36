"""Job lifecycle in the database: queued → running → succeeded | failed | cancelled.

The API creates and cancels jobs; workers claim them atomically, heartbeat, report progress
and events, and finish them. A job whose worker died is found by its stale heartbeat (or a dead
pid on this host) and requeued to resume from its checkpoint, or failed after too many attempts:
no job stays ``running`` forever.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.ml.training_config import available_configs, resolve_training_config
from app.models import JOB_TERMINAL, FineTunedModel, Job, JobEvent, new_id, utcnow
from app.services.datasets import get_dataset, label_set_of
from app.services.errors import ConflictError, UnprocessableError
from app.services.label_sets import check_labels_match
from app.services.rows import get_row


def _as_utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # SQLite returns naive datetimes
    return value


def create_training_job(session: Session, settings: Settings, *, dataset_id: str, validation_dataset_id: str | None,
                        base_model: str | None, config: str | None, hyperparameters: dict | None) -> Job:
    dataset = get_dataset(session, dataset_id)
    if validation_dataset_id:
        validation = get_dataset(session, validation_dataset_id)
        check_labels_match(dataset.label_set, validation.label_set, field="validation_dataset_id",
                           known_as="the training dataset", given_as="the validation dataset")
    config_name = config or settings.default_config
    if config_name not in available_configs():
        raise UnprocessableError(f"unknown config '{config_name}'; available: {available_configs()}", field="config")
    try:
        training_config, recipe_base_model = resolve_training_config(config_name, hyperparameters)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in ("hyperparameters", *first["loc"]))
        raise UnprocessableError(f"{first['msg']}", field=field) from None
    base = base_model or recipe_base_model or settings.default_base_model
    _check_base_model(base, settings)
    job = Job(
        id=new_id("job"), kind="train", status="queued", dataset_id=dataset.id,
        validation_dataset_id=validation_dataset_id, base_model=base, config_name=config_name,
        hyperparameters=training_config.model_dump(), progress={},
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, "queued", f"training job queued on dataset {dataset.id} ({dataset.n_rows} rows, "
              f"{len(label_set_of(dataset))} labels), base model {base}, config {config_name}")
    session.commit()
    return job


def create_evaluation_job(session: Session, settings: Settings, *, model: str, dataset_id: str, mode: str,
                          claimed_by: str | None = None) -> Job:
    """Queue an evaluation, or with ``claimed_by`` create it already running for that worker (the CLI runs
    it in-process; a job inserted as queued could be claimed by a ``make serve`` worker as well)."""
    from app.services.models import resolve_model_ref

    dataset = get_dataset(session, dataset_id)
    ref = resolve_model_ref(session, settings, model, labels=dataset.label_set)
    check_labels_match(ref.label_set.to_pairs(), dataset.label_set, field="dataset_id",
                       known_as=f"model '{model}'", given_as=f"dataset '{dataset.id}'")
    job = Job(id=new_id("job"), kind="evaluate", status="queued", dataset_id=dataset.id, target_model_id=model,
              params={"mode": mode}, hyperparameters={}, progress={})
    if claimed_by:
        now = utcnow()
        job.status, job.worker_id, job.heartbeat_at, job.started_at, job.attempts = "running", claimed_by, now, now, 1
    session.add(job)
    session.flush()
    add_event(session, job.id, "queued", f"evaluation of '{model}' on dataset {dataset.id} queued ({mode})")
    if claimed_by:
        add_event(session, job.id, "started", f"run in-process by {claimed_by}")
    session.commit()
    return job


def _check_base_model(name: str, settings: Settings) -> None:
    from app.ml.base_models import BaseModelError, get_spec

    try:
        get_spec(name, settings)
    except BaseModelError as exc:
        raise UnprocessableError(str(exc), field="base_model") from None


def list_jobs(session: Session, status: str | None = None, limit: int = 100) -> list[Job]:
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status:
        query = query.where(Job.status == status)
    return list(session.scalars(query))


def get_job(session: Session, job_id: str) -> Job:
    return get_row(session, Job, job_id, "job")


def list_events(session: Session, job_id: str, after_id: int = 0) -> list[JobEvent]:
    get_job(session, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id)
    return list(session.scalars(query))


def cancel_job(session: Session, job_id: str) -> Job:
    job = get_job(session, job_id)
    if job.status in JOB_TERMINAL:
        raise ConflictError(f"job '{job_id}' is already {job.status}")
    # A queued job is cancelled at once (only if still queued: a worker may be claiming it).
    cancelled = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
    ).rowcount
    if cancelled:
        add_event(session, job_id, "cancelled", "cancelled before it started")
    else:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        add_event(session, job_id, "cancel_requested", "cancel requested; the worker stops within one step")
    session.commit()
    session.refresh(job)
    return job


# --- used by workers ------------------------------------------------------------------------


def add_event(session: Session, job_id: str, kind: str, message: str, data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data or {}))


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('w')[2:10]}"


def claim_next_job(session: Session, worker_id: str) -> Job | None:
    """Atomically move the oldest queued job to running for this worker (one UPDATE ... WHERE status='queued')."""
    while True:
        candidate = session.scalar(select(Job.id).where(Job.status == "queued").order_by(Job.created_at).limit(1))
        if candidate is None:
            return None
        now = utcnow()
        claimed = session.execute(
            update(Job).where(Job.id == candidate, Job.status == "queued")
            .values(status="running", worker_id=worker_id, heartbeat_at=now, started_at=now,
                    attempts=Job.attempts + 1)
        ).rowcount
        session.commit()
        if claimed:
            job = session.get(Job, candidate)
            session.refresh(job)
            add_event(session, job.id, "started", f"claimed by worker {worker_id} (attempt {job.attempts})")
            session.commit()
            return job


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    """Record liveness; returns whether cancellation was requested."""
    session.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id).values(heartbeat_at=utcnow()))
    session.commit()
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_progress(session: Session, job_id: str, progress: dict) -> None:
    """Merge ``progress`` into the job's progress (training steps and evaluation counts live side by side)."""
    current = session.scalar(select(Job.progress).where(Job.id == job_id)) or {}
    session.execute(update(Job).where(Job.id == job_id).values(progress={**current, **progress}, heartbeat_at=utcnow()))
    session.commit()


def finish_job(session: Session, job_id: str, status: str, *, error_code: str | None = None,
               error_message: str | None = None, model_id: str | None = None, report_id: str | None = None) -> None:
    assert status in JOB_TERMINAL
    values = dict(status=status, finished_at=utcnow(), error_code=error_code, error_message=error_message)
    if model_id:
        values["model_id"] = model_id
    if report_id:
        values["report_id"] = report_id
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    message = error_message if status == "failed" else f"job {status}"
    add_event(session, job_id, status, message or status, {"error_code": error_code} if error_code else {})
    session.commit()


def requeue_job(session: Session, job_id: str, message: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(status="queued", worker_id=None))
    add_event(session, job_id, "interrupted", message)
    session.commit()


def _pid_dead_here(worker_id: str | None) -> bool:
    """True when worker_id names a process on this host that no longer exists."""
    if not worker_id or worker_id.count(":") < 2:
        return False
    host, pid, _ = worker_id.split(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_orphaned_jobs(session: Session, settings: Settings) -> list[str]:
    """Requeue (to resume from its checkpoint) or fail every running job whose worker is gone."""
    stale_before = utcnow() - timedelta(seconds=settings.worker_stale_seconds)
    recovered = []
    for job in session.scalars(select(Job).where(Job.status == "running")):
        beat = _as_utc(job.heartbeat_at)
        if not (_pid_dead_here(job.worker_id) or beat is None or beat < stale_before):
            continue
        if job.cancel_requested:
            new_status, message = "cancelled", "worker died after a cancel request; job cancelled"
        elif job.attempts >= settings.max_job_attempts:
            new_status, message = "failed", (f"worker {job.worker_id} died and the job already ran "
                                             f"{job.attempts} times; giving up")
        else:
            new_status, message = "queued", f"worker {job.worker_id} died; requeued to resume from its last checkpoint"
        changed = session.execute(
            update(Job).where(Job.id == job.id, Job.status == "running", Job.worker_id == job.worker_id)
            .values(status=new_status, worker_id=None,
                    error_code="worker_lost" if new_status == "failed" else None,
                    error_message=message if new_status == "failed" else None,
                    finished_at=utcnow() if new_status != "queued" else None)
        ).rowcount
        if changed:
            add_event(session, job.id, "recovered" if new_status == "queued" else new_status, message)
            recovered.append(job.id)
    session.commit()
    return recovered


def register_model(session: Session, *, job: Job, adapter_path: str, label_set: list, system_prompt: str,
                   quantization: str, metrics: dict, name: str | None = None) -> FineTunedModel:
    model = FineTunedModel(
        id=new_id("ft"), name=name or f"{job.base_model}-{job.dataset_id}", base_model=job.base_model,
        job_id=job.id, dataset_id=job.dataset_id, adapter_path=adapter_path, label_set=label_set,
        system_prompt=system_prompt, quantization=quantization, metrics=metrics,
    )
    session.add(model)
    session.commit()
    return model

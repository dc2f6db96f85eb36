"""Job lifecycle in the database: queued → running → succeeded | failed | cancelled.

The API creates and cancels jobs; workers claim them atomically, heartbeat, report progress
and events, and finish them. A job whose worker died is found by its stale heartbeat (or a dead
pid on this host) and requeued to resume from its checkpoint, or failed after too many attempts:
no job stays ``running`` forever.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.ml.train.config import TrainingConfig, available_configs, default_config_name, resolve_training_config
from app.models import JOB_TERMINAL, Dataset, FineTunedModel, Job, JobEvent, new_id, utcnow
from app.services.datasets import get_dataset, label_set_of
from app.services.errors import ConflictError, NotFoundError, UnprocessableError
from app.services.label_sets import check_labels_match
from app.services.rows import get_row


def as_utc(value: datetime | None) -> datetime | None:
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
    config_name = config or default_config_name(settings)
    if config_name not in available_configs():
        raise UnprocessableError(f"unknown config '{config_name}'; available: {available_configs()}", field="config")
    try:
        training_config, recipe_base_model = resolve_training_config(config_name, hyperparameters)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in ("hyperparameters", *first["loc"]))
        raise UnprocessableError(f"{first['msg']}", field=field) from None
    _check_limits(training_config, dataset.n_rows, settings)
    base = base_model or recipe_base_model or settings.default_base_model
    _check_base_model(base, settings, from_config=None if base_model else config_name)
    _check_target_modules(base, training_config, settings)
    job = Job(
        id=new_id("job"), kind="train", status="queued", dataset_id=dataset.id,
        validation_dataset_id=validation_dataset_id, base_model=base, config_name=config_name,
        hyperparameters=training_config.model_dump(), progress={},
    )
    message = (f"training job queued on dataset {dataset.id} ({dataset.n_rows} rows, "
               f"{len(label_set_of(dataset))} labels), base model {base}, config {config_name}")
    return _insert_job(session, job, message)


def _insert_job(session: Session, job: Job, message: str, *, started_by: str | None = None) -> Job:
    """Insert ``job`` and its first event(s). Its datasets may be deleted by a concurrent request between
    our look-up and this insert: the foreign key refuses the row, and the caller gets the 404 it would
    have got a moment later, not a 500."""
    session.add(job)
    try:
        session.flush()
        add_event(session, job.id, "queued", message)
        if started_by:
            add_event(session, job.id, "started", f"run in-process by {started_by}")
        session.commit()
    except IntegrityError:
        session.rollback()
        for dataset_id in (job.dataset_id, job.validation_dataset_id):
            if dataset_id and session.get(Dataset, dataset_id) is None:
                raise NotFoundError(f"dataset '{dataset_id}' not found (deleted while the job was being created)") \
                    from None
        raise ConflictError("the job could not be stored: a row it refers to changed meanwhile; try again") from None
    return job


def _check_limits(config: TrainingConfig, n_rows: int, settings: Settings) -> None:
    """Steps and epochs within MAX_TRAIN_STEPS / MAX_TRAIN_EPOCHS (a job past them would hold a worker for days)."""
    if config.max_steps > settings.max_train_steps:
        raise UnprocessableError(f"max_steps {config.max_steps} is over the limit of {settings.max_train_steps} "
                                 "(MAX_TRAIN_STEPS)", field="hyperparameters.max_steps")
    if config.num_train_epochs > settings.max_train_epochs:  # also with max_steps: the Trainer still reads it
        raise UnprocessableError(f"num_train_epochs {config.num_train_epochs} is over the limit of "
                                 f"{settings.max_train_epochs} (MAX_TRAIN_EPOCHS)", field="hyperparameters.num_train_epochs")
    if config.max_steps > 0:
        return
    per_epoch = math.ceil(n_rows / (config.per_device_train_batch_size * config.gradient_accumulation_steps))
    steps = math.ceil(per_epoch * config.num_train_epochs)
    if steps > settings.max_train_steps:
        raise UnprocessableError(
            f"num_train_epochs {config.num_train_epochs} on {n_rows} rows is {steps} steps, over the limit of "
            f"{settings.max_train_steps} (MAX_TRAIN_STEPS); set fewer epochs or max_steps",
            field="hyperparameters.num_train_epochs")


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
    return _insert_job(session, job, f"evaluation of '{model}' on dataset {dataset.id} queued ({mode})",
                       started_by=claimed_by)


def _check_base_model(name: str, settings: Settings, *, from_config: str | None) -> None:
    """Refuse a job whose base model cannot be had on this machine, saying what to install or set."""
    from app.ml.models.registry import BaseModelError, check_available

    try:
        check_available(name, settings)
    except BaseModelError as exc:
        origin = f" (the base model of config '{from_config}'; choose another config or base_model)" \
            if from_config else ""
        raise UnprocessableError(f"{exc}{origin}", field="base_model") from None


def _check_target_modules(base: str, config: TrainingConfig, settings: Settings) -> None:
    """LoRA targets the base model lacks are refused here when its module names are known without loading
    it (a prepared folder's safetensors headers, else a registered architecture); otherwise the worker
    checks them before training."""
    from app.ml.models.registry import get_spec, prepared_path
    from app.ml.models.target_modules import (
        KNOWN_MATRIX_MODULES,
        describe,
        matrix_module_names,
        unknown_for_architecture,
        unknown_target_modules,
    )

    architecture = get_spec(base, settings).architecture
    folder = prepared_path(base, settings)
    names = matrix_module_names(folder) if folder is not None else None
    if names is not None:
        unknown, known = unknown_target_modules(config.target_modules, names), describe(names)
    else:
        unknown = unknown_for_architecture(config.target_modules, architecture)
        known = describe(KNOWN_MATRIX_MODULES.get(architecture, frozenset()))
    if unknown:
        raise UnprocessableError(f"target_modules {unknown} are not modules of base model '{base}' "
                                 f"({architecture}); it has: {known}", field="hyperparameters.target_modules")


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
    """Record liveness; returns whether the worker should stop: cancellation was requested, or the job is no
    longer running for this worker (it was found orphaned and handed to another: it must not run twice)."""
    ours = session.execute(
        update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(heartbeat_at=utcnow())
    ).rowcount
    session.commit()
    return not ours or bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_progress(session: Session, job_id: str, progress: dict) -> None:
    """Merge ``progress`` into the job's progress (training steps and evaluation counts live side by side)."""
    current = session.scalar(select(Job.progress).where(Job.id == job_id)) or {}
    session.execute(update(Job).where(Job.id == job_id).values(progress={**current, **progress}, heartbeat_at=utcnow()))
    session.commit()


def _end_job(session: Session, job_id: str, worker_id: str | None, status: str, **values) -> bool:
    """Set a terminal status; with ``worker_id`` only while the job still runs for that worker (one whose
    job was found orphaned and handed to another records nothing). Not committed."""
    query = update(Job).where(Job.id == job_id)
    if worker_id is not None:
        query = query.where(Job.worker_id == worker_id, Job.status == "running")
    return bool(session.execute(query.values(status=status, finished_at=utcnow(), **values)).rowcount)


def finish_job(session: Session, job_id: str, status: str, *, worker_id: str | None = None,
               error_code: str | None = None, error_message: str | None = None) -> bool:
    """End a job as failed or cancelled (``complete_job`` succeeds one); returns whether it was ended."""
    assert status in JOB_TERMINAL
    if not _end_job(session, job_id, worker_id, status, error_code=error_code, error_message=error_message):
        session.rollback()
        return False
    message = error_message if status == "failed" else f"job {status}"
    add_event(session, job_id, status, message or status, {"error_code": error_code} if error_code else {})
    session.commit()
    return True


def complete_job(session: Session, job_id: str, worker_id: str | None, *, model: dict | None = None,
                 report: dict | None = None) -> bool:
    """Succeed a job and store what it produced in one transaction: the job ends ``succeeded`` with its model
    and report, or nothing is stored (a failed, cancelled or lost job leaves no model behind).

    ``model``: register_model's fields; ``report``: record_report's (report_id, report_dir, report,
    model_id, dataset_id)."""
    job = get_job(session, job_id)
    model_id = planned_model_id(session, job) if model else None
    report_id = report["report_id"] if report else None
    if not _end_job(session, job_id, worker_id, "succeeded", error_code=None, error_message=None,
                    model_id=model_id, report_id=report_id):
        session.rollback()
        return False
    if model:
        registered = register_model(session, job=job, **model)
        add_event(session, job_id, "model_registered", f"adapter registered as model {registered.id}",
                  {"model_id": registered.id, "adapter_dir": registered.adapter_path})
    if report:
        from app.services.reports import record_report

        summary = report["report"]
        record_report(session, job_id=job_id, **report)
        add_event(session, job_id, "report", f"report {report_id}: accuracy {summary['accuracy']:.4f}, "
                  f"macro-F1 {summary['macro_f1']:.4f} on {summary['n_samples']} dialogues",
                  {"report_id": report_id, "accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"]})
    add_event(session, job_id, "succeeded", "job succeeded")
    session.commit()
    return True


def requeue_job(session: Session, job_id: str, worker_id: str, message: str) -> None:
    requeued = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running", Job.worker_id == worker_id)
        .values(status="queued", worker_id=None)
    ).rowcount
    if requeued:
        add_event(session, job_id, "interrupted", message)
    session.commit()


def pid_dead_here(worker_id: str | None) -> bool:
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
        beat = as_utc(job.heartbeat_at)
        if not (pid_dead_here(job.worker_id) or beat is None or beat < stale_before):
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


def planned_model_id(session: Session, job: Job) -> str:
    """The id the model of training job ``job`` has or will have: fixed by the job, so that the report an
    evaluation writes before registration, and a job run again, name the same model."""
    existing = session.scalar(select(FineTunedModel.id).where(FineTunedModel.job_id == job.id))
    return existing or f"ft_{job.id.removeprefix('job_')}"


def register_model(session: Session, *, job: Job, adapter_path: str, label_set: list, system_prompt: str,
                   quantization: str, metrics: dict, name: str | None = None) -> FineTunedModel:
    """The model row of training job ``job``, created once (models.job_id is unique); not committed."""
    existing = session.scalar(select(FineTunedModel).where(FineTunedModel.job_id == job.id))
    if existing is not None:
        return existing
    model = FineTunedModel(
        id=planned_model_id(session, job), name=name or f"{job.base_model}-{job.dataset_id}",
        base_model=job.base_model, job_id=job.id, dataset_id=job.dataset_id, adapter_path=adapter_path,
        label_set=label_set, system_prompt=system_prompt, quantization=quantization, metrics=metrics,
    )
    session.add(model)
    session.flush()
    return model

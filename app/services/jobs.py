"""Job lifecycle in the database: queued → running → succeeded | failed | cancelled.

The API creates and cancels jobs; workers claim them atomically, heartbeat, report progress
and events, and finish them. A job whose worker died is found by its stale heartbeat (or a dead
pid on this host) and requeued to resume from its checkpoint, or failed after too many attempts:
no job stays ``running`` forever.
"""

from __future__ import annotations

import math

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.domain.resources import JobResources, canonical_labels
from app.ml.train.config import TrainingConfig, available_configs, default_config_name, resolve_training_config
from app.models import JOB_TERMINAL, Dataset, Job, JobEvent, new_id, utcnow
from app.services.datasets import get_dataset, label_set_of
from app.services.errors import ConflictError, NotFoundError, UnprocessableError, field_path
from app.services.label_sets import check_labels_match
from app.services.rows import get_row


def create_training_job(session: Session, settings: Settings, *, dataset_id: str, validation_dataset_id: str | None,
                        base_model: str | None, config: str | None, hyperparameters: dict | None,
                        resources: JobResources | None = None) -> Job:
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
        field = field_path(("hyperparameters", *first["loc"]))
        raise UnprocessableError(f"{first['msg']}", field=field) from None
    _check_limits(training_config, dataset.n_rows, settings)
    _check_validation_options(training_config, validation_dataset_id)
    resources = resources or JobResources()
    if training_config.head == "linear" and ((resources.gpus or 1) > 1 or (resources.processes or 1) > 1):
        raise UnprocessableError("a linear head trains in one process: resources.gpus / processes must be 1",
                                 field="resources")
    check_backend_serves(settings, training_config.head, field="hyperparameters.head")
    base = base_model or recipe_base_model or settings.default_base_model
    _check_base_model(base, settings, from_config=None if base_model else config_name)
    if training_config.head == "lm":  # a linear head wraps no module
        _check_target_modules(base, training_config, settings)
    job = Job(
        id=new_id("job"), kind="train", status="queued", dataset_id=dataset.id,
        validation_dataset_id=validation_dataset_id, base_model=base, config_name=config_name,
        hyperparameters=training_config.model_dump(), progress={},
        resources=resources.model_dump(exclude_defaults=True), required_labels=canonical_labels(resources.labels),
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


def check_backend_serves(settings: Settings, head: str, *, field: str) -> None:
    """The vLLM backend cannot run a linear head (workers evaluate through it too): refuse such jobs at once."""
    if head != "lm" and settings.inference_backend == "vllm":
        raise UnprocessableError("linear-head models are served in-process only and this deployment serves through "
                                 "vLLM (INFERENCE_BACKEND=vllm): train a LoRA adapter (head \"lm\") instead",
                                 field=field)


def _check_validation_options(config: TrainingConfig, validation_dataset_id: str | None) -> None:
    """Evaluation during training needs a validation set; early stopping counts those evaluations."""
    if config.eval_every_steps and not validation_dataset_id:
        raise UnprocessableError("eval_every_steps needs a validation_dataset_id to evaluate on",
                                 field="hyperparameters.eval_every_steps")
    if config.early_stopping_patience and not config.eval_every_steps:
        raise UnprocessableError("early_stopping_patience needs eval_every_steps > 0 (it counts evaluations "
                                 "without a better macro-F1)", field="hyperparameters.early_stopping_patience")


def create_evaluation_job(session: Session, settings: Settings, *, model: str, dataset_id: str, mode: str,
                          claimed_by: str | None = None) -> Job:
    """Queue an evaluation, or with ``claimed_by`` create it already running for that worker (the CLI runs
    it in-process; a job inserted as queued could be claimed by a ``make serve`` worker as well)."""
    from app.services.classify import check_mode_supported
    from app.services.models import resolve_model_ref

    dataset = get_dataset(session, dataset_id)
    ref = resolve_model_ref(session, settings, model, labels=dataset.label_set)
    check_labels_match(ref.label_set.to_pairs(), dataset.label_set, field="dataset_id",
                       known_as=f"model '{model}'", given_as=f"dataset '{dataset.id}'")
    check_mode_supported(ref, mode, model)
    check_backend_serves(settings, ref.head, field="model")
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


def get_job(session: Session, job_id: str, *, kind: str | None = None) -> Job:
    """The job ``job_id``; with ``kind``, only a job of that kind (an evaluation id is not a training job)."""
    job = get_row(session, Job, job_id, "job")
    if kind is not None and job.kind != kind:
        label = {"evaluate": "evaluation", "train": "training job"}.get(kind, f"{kind} job")
        raise NotFoundError(f"{label} '{job_id}' not found ('{job_id}' is a {job.kind} job)")
    return job


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


def add_event(session: Session, job_id: str, kind: str, message: str, data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data or {}))

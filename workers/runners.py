"""What a worker does for each kind of job. Same ml code as the API (app.ml), state via app.services."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from app.core.config import Settings
from app.core.db import session_scope
from app.ml.train.config import TrainingConfig
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from app.services import reports as report_service
from app.services.errors import ServiceError
from app.services.models import adapter_model_ref, resolve_model_ref

log = logging.getLogger("intent_tuner.worker")
TRAIN_LOG_FIELDS = ("step", "max_steps", "epoch", "loss", "learning_rate", "tokens_per_second", "steps_per_second")
_classifiers = None  # one registry per worker process: adapters stay loaded between evaluation jobs


class JobFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class JobCancelled(Exception):
    pass


@dataclass
class JobOutcome:
    """What a job produced, stored only when the job succeeds (app.services.jobs.complete_job)."""

    model: dict | None = None  # register_model's fields
    report: dict | None = None  # record_report's fields


def _event(settings: Settings, job_id: str, kind: str, message: str, data: dict | None = None) -> None:
    with session_scope(settings) as session:
        job_service.add_event(session, job_id, kind, message, data)
    log.info("[%s] %s: %s", job_id, kind, message)


def run_job(settings: Settings, job_id: str, *, should_stop: Callable[[], bool]) -> JobOutcome:
    with session_scope(settings) as session:
        job = job_service.get_job(session, job_id)
        session.expunge(job)
    if job.kind == "train":
        return run_training(settings, job, should_stop)
    if job.kind == "evaluate":
        with session_scope(settings) as session:
            dataset = dataset_service.get_dataset(session, job.dataset_id)
            try:
                ref = resolve_model_ref(session, settings, job.target_model_id, labels=dataset.label_set)
            except ServiceError as exc:
                raise JobFailure("model_unavailable", exc.message) from None
        report = run_evaluation(settings, job_id=job.id, ref=ref, model_id=job.target_model_id,
                                dataset_id=job.dataset_id, mode=job.params.get("mode", "score"), should_stop=should_stop)
        return JobOutcome(report=report)
    raise JobFailure("unknown_job_kind", f"unknown job kind '{job.kind}'")


def _resolve_base_model(settings: Settings, name: str, job_id: str):
    from app.ml.models.registry import BaseModelError, resolve_base_model

    _event(settings, job_id, "base_model", f"resolving base model '{name}' (prepared once, then cached)")
    try:  # preparing it (join, verify, convert) takes minutes the first time: each stage is an event
        return resolve_base_model(name, settings,
                                  progress=lambda message: _event(settings, job_id, "base_model", message))
    except BaseModelError as exc:
        raise JobFailure("base_model_unavailable", str(exc)) from None


def run_training(settings: Settings, job, should_stop: Callable[[], bool]) -> JobOutcome:
    from app.ml.train.trainer import TrainingHooks, train_adapter

    with session_scope(settings) as session:
        dataset = dataset_service.get_dataset(session, job.dataset_id)
        label_set, system_prompt = dataset_service.label_set_of(dataset), dataset.system_prompt
    records = dataset_service.load_records(settings, job.dataset_id)
    config = TrainingConfig(**job.hyperparameters)
    base_dir = _resolve_base_model(settings, job.base_model, job.id)
    job_dir = settings.jobs_dir / job.id

    def on_log(metrics: dict) -> None:
        # The progress holds the latest figures; a train_log event per logged step keeps the loss curve
        # (the console draws it live from the events it polls).
        with session_scope(settings) as session:
            job_service.add_event(session, job.id, "train_log",
                                  f"step {metrics['step']}/{metrics['max_steps']}: loss {metrics['loss']:.4f}",
                                  {k: metrics.get(k) for k in TRAIN_LOG_FIELDS})
            job_service.set_progress(session, job.id, metrics)

    hooks = TrainingHooks(
        on_log=on_log,
        on_event=lambda kind, message, data=None: _event(settings, job.id, kind, message, data),
        should_stop=should_stop,
    )
    try:
        result = train_adapter(base_model_dir=base_dir, base_model_name=job.base_model, records=records,
                               label_set=label_set, system_prompt=system_prompt, config=config, job_dir=job_dir,
                               hooks=hooks, device=settings.device)
    except ValueError as exc:  # the trainer's own checks: data or recipe that cannot be trained as asked
        raise JobFailure("invalid_training_input", str(exc)) from None
    except (MemoryError, RuntimeError) as exc:
        if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
            raise JobFailure("out_of_memory", f"{exc}; lower per_device_train_batch_size or max_input_length") from None
        raise
    if result.cancelled:
        raise JobCancelled(f"cancelled at step {result.steps}; checkpoints kept under {job_dir / 'checkpoints'}")

    with session_scope(settings) as session:
        model_id = job_service.planned_model_id(session, job_service.get_job(session, job.id))
        job_service.set_progress(session, job.id, {"step": result.steps})
    model = dict(adapter_path=str(result.adapter_dir), label_set=label_set.to_pairs(), system_prompt=system_prompt,
                 quantization=result.quantization,
                 metrics={"final_loss": result.final_loss, "steps": result.steps,
                          "train_runtime_s": result.train_runtime_s, **result.metrics})
    report = None
    if job.validation_dataset_id:
        # The model is registered only with the job's success: evaluate the adapter folder itself.
        from app.ml.models.registry import BaseModelError

        try:
            ref = adapter_model_ref(settings, model_id=model_id, base_model=job.base_model,
                                    adapter_dir=result.adapter_dir, system_prompt=system_prompt,
                                    label_set=label_set.to_pairs())
        except (BaseModelError, ServiceError) as exc:
            raise JobFailure("model_unavailable", str(exc)) from None
        report = run_evaluation(settings, job_id=job.id, ref=ref, model_id=model_id,
                                dataset_id=job.validation_dataset_id, mode="score", should_stop=should_stop)
    return JobOutcome(model=model, report=report)


def run_evaluation(settings: Settings, *, job_id: str, ref, model_id: str, dataset_id: str, mode: str,
                   should_stop: Callable[[], bool]) -> dict:
    """Evaluate ``ref`` on a dataset and write the report's files; returns the report's row fields (the
    row is stored with the job's success)."""
    from app.ml.infer.classifier import ClassifierRegistry
    from app.ml.eval.files import write_report
    from app.ml.eval.run import evaluate_records

    global _classifiers
    if _classifiers is None:
        _classifiers = ClassifierRegistry(max_adapters=settings.adapter_cache_size, device=settings.device)
    records = dataset_service.load_records(settings, dataset_id)
    _event(settings, job_id, "evaluation_started", f"evaluating '{model_id}' on {len(records)} dialogues ({mode})")
    last_write, last_tenth, started = [0.0], [0], time.monotonic()

    def progress(done: int, total: int) -> None:
        if should_stop():
            raise JobCancelled(f"evaluation cancelled after {done}/{total} dialogues")
        now = time.monotonic()
        if now - last_write[0] > 2 or done == total:
            last_write[0] = now
            with session_scope(settings) as session:
                job_service.set_progress(session, job_id, {"done": done, "total": total})
        # Thousands of dialogues take a while: every tenth done is an event (the log, the event list, the CLI).
        tenth = done * 10 // total
        if last_tenth[0] < tenth < 10:
            last_tenth[0] = tenth
            _event(settings, job_id, "evaluation_progress",
                   f"evaluated {done}/{total} dialogues in {now - started:.0f} s", {"done": done, "total": total})

    report = evaluate_records(_classifiers.get(ref), records, ref.label_set, mode=mode, progress=progress)
    report_id, report_dir = report_service.new_report_dir(settings)
    write_report(report, report_dir)
    return dict(report_id=report_id, report_dir=report_dir, report=report, model_id=model_id, dataset_id=dataset_id)

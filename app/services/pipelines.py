"""The use cases a worker runs: train → evaluate on the validation set → register, and evaluate a model.

Same ml code as the API (``app.ml``), state through the services. ``run_claimed_job`` takes a job this
process claimed to its end: a heartbeat thread keeps it alive and turns a cancel request (or the loss
of the job to another worker) into a stop at the next step; what the job produced is stored only when
it succeeds; a crash fails it, never leaves it ``running``; a shutdown requeues it to resume from its
checkpoint. Training itself runs in a child process, or a torchrun group of them for several GPUs
(``app.services.training_process``): a segfault or an out-of-memory kill there fails the job, and
this process goes on polling. Evaluation runs here, with this process's classifiers.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.core.config import Settings
from app.core.db import session_scope
from app.domain.artifacts import CHECKPOINTS_DIRNAME
from app.ml.train.config import TrainingConfig
from app.models import FineTunedModel
from app.services import datasets as dataset_service
from app.services import jobs as job_service
from app.services import queue
from app.services import reports as report_service
from app.services import worker_registry
from app.services.errors import ServiceError
from app.services.models import adapter_model_ref, adapter_row, resolve_model_ref

log = logging.getLogger("intent_tuner.worker")


class JobFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class JobCancelled(Exception):
    pass


@dataclass
class JobOutcome:
    """What a job produced, stored only when the job succeeds (app.services.queue.complete_job)."""

    model: dict | None = None  # register_adapter's fields
    report: dict | None = None  # record_report's fields


class Classifiers:
    """The one classifier registry of a process that runs jobs: made on first use, released before a
    training run so that loaded evaluation models never sit in memory beside the model being trained."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._registry = None

    def get(self):
        if self._registry is None:  # the inference backend: ``.get(ref).classify(...)`` on either engine
            from app.services.inference import make_backend

            self._registry = make_backend(self.settings, bounded_queue=False)
        return self._registry

    def release(self) -> None:
        if self._registry is not None:
            self._registry.clear()
            self._registry = None
            import gc

            gc.collect()
            from app.ml.models.loading import release_accelerator_memory

            release_accelerator_memory()


class Heartbeat(threading.Thread):
    def __init__(self, settings: Settings, job_id: str, worker_id: str, *, announce: bool = True):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.settings, self.job_id, self.worker_id, self.announce = settings, job_id, worker_id, announce
        self.cancel_requested = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                with session_scope(self.settings) as session:
                    if self.announce:
                        worker_registry.touch_worker(session, self.worker_id, self.job_id,
                                                     labels=self.settings.worker_labels)
                    if queue.heartbeat(session, self.job_id, self.worker_id):
                        self.cancel_requested.set()
            except Exception:  # a busy database must not kill the job; the next beat retries
                log.exception("heartbeat failed")
            self._stop.wait(self.settings.worker_heartbeat_seconds)

    def stop(self) -> None:
        self._stop.set()


def run_claimed_job(settings: Settings, job_id: str, worker_id: str, *, classifiers: Classifiers,
                    shutdown: threading.Event, announce: bool = True) -> str:
    """Run job ``job_id`` (already ``running`` for ``worker_id``) to its end; returns the status it got."""
    heartbeat = Heartbeat(settings, job_id, worker_id, announce=announce)
    heartbeat.start()
    should_stop = lambda: heartbeat.cancel_requested.is_set() or shutdown.is_set()  # noqa: E731
    try:
        outcome = run_job(settings, job_id, should_stop=should_stop, classifiers=classifiers, worker_id=worker_id)
    except JobCancelled as exc:
        if shutdown.is_set() and not heartbeat.cancel_requested.is_set():
            # Stopped by SIGTERM, not by the user: requeue so another worker resumes it.
            with session_scope(settings) as session:
                queue.requeue_job(session, job_id, worker_id, "worker shut down; requeued to resume from its checkpoint")
            return "queued"
        return _finish(settings, job_id, worker_id, "cancelled", error_message=str(exc) or None)
    except JobFailure as exc:
        log.error("job %s failed: %s", job_id, exc)
        return _finish(settings, job_id, worker_id, "failed", error_code=exc.code, error_message=str(exc))
    except Exception as exc:  # any crash ends the job as failed, never running forever
        log.exception("job %s crashed", job_id)
        return _finish(settings, job_id, worker_id, "failed", error_code="internal_error",
                       error_message=f"{type(exc).__name__}: {exc}")
    else:
        with session_scope(settings) as session:
            ended = queue.complete_job(session, settings, job_id, worker_id, model=outcome.model, report=outcome.report)
        _log_end(job_id, "succeeded", ended)
        if ended and outcome.model is not None:
            # The adapter is registered: its checkpoints can no longer be resumed from, only take space.
            shutil.rmtree(settings.jobs_dir / job_id / CHECKPOINTS_DIRNAME, ignore_errors=True)
        return "succeeded"
    finally:
        heartbeat.stop()


def _finish(settings: Settings, job_id: str, worker_id: str, status: str, **kwargs) -> str:
    with session_scope(settings) as session:
        ended = queue.finish_job(session, job_id, status, worker_id=worker_id, **kwargs)
    _log_end(job_id, status, ended)
    return status


def _log_end(job_id: str, status: str, ended: bool) -> None:
    if ended:
        log.info("job %s %s", job_id, status)
    else:
        log.warning("job %s was handed to another worker meanwhile; this run's result (%s) is dropped", job_id, status)


def _event(settings: Settings, job_id: str, kind: str, message: str, data: dict | None = None) -> None:
    with session_scope(settings) as session:
        job_service.add_event(session, job_id, kind, message, data)
    log.info("[%s] %s: %s", job_id, kind, message)


def run_job(settings: Settings, job_id: str, *, should_stop: Callable[[], bool], classifiers: Classifiers,
            worker_id: str) -> JobOutcome:
    with session_scope(settings) as session:
        job = job_service.get_job(session, job_id)
        session.expunge(job)
    if job.kind == "train":
        classifiers.release()
        return run_training(settings, job, should_stop, classifiers, worker_id)
    if job.kind == "evaluate":
        with session_scope(settings) as session:
            dataset = dataset_service.get_dataset(session, job.dataset_id)
            try:
                ref = resolve_model_ref(session, settings, job.target_model_id, labels=dataset.label_set)
            except ServiceError as exc:
                raise JobFailure("model_unavailable", exc.message) from None
            adapter = session.get(FineTunedModel, job.target_model_id)  # None: a base model, zero-shot
            train_dataset_id = adapter.dataset_id if adapter is not None else None
        report = run_evaluation(settings, job_id=job.id, ref=ref, model_id=job.target_model_id,
                                dataset_id=job.dataset_id, mode=job.params.get("mode", "score"),
                                should_stop=should_stop, classifiers=classifiers,
                                train_dataset_id=train_dataset_id)
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


def run_training(settings: Settings, job, should_stop: Callable[[], bool], classifiers: Classifiers,
                 worker_id: str) -> JobOutcome:
    from app.ml.train.trainer import finished_training
    from app.services.training_process import (
        TrainingProcessError,
        plan_processes,
        run_training_process,
        visible_gpus,
    )

    with session_scope(settings) as session:
        dataset = dataset_service.get_dataset(session, job.dataset_id)
        label_set, system_prompt = dataset_service.label_set_of(dataset), dataset.system_prompt
    config = TrainingConfig(**job.hyperparameters)
    job_dir = settings.jobs_dir / job.id
    result = finished_training(job_dir)
    if result is not None:  # the worker died after training, while evaluating: no process to start
        _event(settings, job.id, "training_done", f"training already finished at step {result.steps}; its adapter "
               "is kept, nothing is trained again", {"step": result.steps, "adapter_dir": str(result.adapter_dir)})
    else:
        try:
            gpus = visible_gpus(settings.device)
            # a linear head is one forward per dialogue in one process: one GPU of those the worker sees
            plan = plan_processes(job.resources, gpus[:1] if config.head == "linear" else gpus)
        except TrainingProcessError as exc:
            raise JobFailure(exc.code, str(exc)) from None
        base_dir = _resolve_base_model(settings, job.base_model, job.id)  # prepared here once, not by every rank
        _event(settings, job.id, "training_process", f"training in {plan.describe()}",
               {"processes": plan.processes, "gpus": list(plan.gpus), "backend": plan.backend})
        spec = dict(base_model=job.base_model, base_model_dir=str(base_dir), dataset_id=job.dataset_id,
                    label_set=label_set.to_pairs(), system_prompt=system_prompt, hyperparameters=job.hyperparameters,
                    # evaluations during training score a sample of the validation set
                    validation_dataset_id=job.validation_dataset_id if config.eval_every_steps else None)
        try:
            result = run_training_process(settings, job_id=job.id, worker_id=worker_id, plan=plan, spec=spec,
                                          should_stop=should_stop)
        except TrainingProcessError as exc:
            raise JobFailure(exc.code, str(exc)) from None
    if result.cancelled:
        raise JobCancelled(f"cancelled at step {result.steps}; checkpoints kept under {job_dir / CHECKPOINTS_DIRNAME}")

    with session_scope(settings) as session:
        job_row = job_service.get_job(session, job.id)
        queue.set_progress(session, job.id, {"step": result.steps})
        model = dict(base_model=job.base_model, adapter_dir=result.adapter_dir, label_set=label_set.to_pairs(),
                     system_prompt=system_prompt, quantization=result.quantization,
                     max_input_length=config.max_input_length, head=config.head,
                     metrics={"final_loss": result.final_loss, "steps": result.steps,
                              "train_runtime_s": result.train_runtime_s, **result.metrics})
        # The row the model will have; stored only with the job's success (complete_job).
        planned = adapter_row(settings, session=session, job=job_row, **model)
        session.expunge_all()
    report = None
    if job.validation_dataset_id:
        from app.ml.models.registry import BaseModelError

        try:
            ref = adapter_model_ref(settings, planned)
        except (BaseModelError, ServiceError) as exc:
            raise JobFailure("model_unavailable", str(exc)) from None
        report = run_evaluation(settings, job_id=job.id, ref=ref, model_id=planned.id,
                                dataset_id=job.validation_dataset_id, mode="score", should_stop=should_stop,
                                classifiers=classifiers, train_dataset_id=job.dataset_id)
    return JobOutcome(model=model, report=report)


def run_evaluation(settings: Settings, *, job_id: str, ref, model_id: str, dataset_id: str, mode: str,
                   should_stop: Callable[[], bool], classifiers: Classifiers,
                   train_dataset_id: str | None = None) -> dict:
    """Evaluate ``ref`` on a dataset and write the report's files; returns the report's row fields (the
    row is stored with the job's success).

    A fine-tuned model (``train_dataset_id``: the dataset it was trained on) is set beside the TF-IDF +
    logistic-regression baseline trained on that dataset and scored on the same rows: the report's
    ``baseline`` holds its figures and ``lift`` the model's minus the baseline's (accuracy, macro-F1,
    weighted-F1). A zero-shot base model has no training dataset and no baseline."""
    from app.ml.eval.files import write_report
    from app.ml.eval.run import evaluate_records

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
                queue.set_progress(session, job_id, {"done": done, "total": total})
        # Thousands of dialogues take a while: every tenth done is an event (the log, the event list, the CLI).
        tenth = done * 10 // total
        if last_tenth[0] < tenth < 10:
            last_tenth[0] = tenth
            _event(settings, job_id, "evaluation_progress",
                   f"evaluated {done}/{total} dialogues in {now - started:.0f} s", {"done": done, "total": total})

    report = evaluate_records(classifiers.get().get(ref), records, ref.label_set, mode=mode, progress=progress)
    _add_baseline(settings, job_id, report, records, ref.label_set, train_dataset_id)
    report_id, report_dir = report_service.new_report_dir(settings)
    write_report(report, report_dir)
    return dict(report_id=report_id, report_dir=report_dir, report=report, model_id=model_id, dataset_id=dataset_id)


def _add_baseline(settings: Settings, job_id: str, report: dict, records: list, label_set,
                  train_dataset_id: str | None) -> None:
    """``report["baseline"]`` and ``report["lift"]`` (see run_evaluation); a baseline that cannot be had
    (no training dataset, deleted, a single label) leaves them None with the reason in ``baseline_error``."""
    from app.ml.eval.baseline import compare_with_baseline

    report["baseline"] = report["lift"] = report["baseline_error"] = None
    if train_dataset_id is None:
        report["baseline_error"] = "the model has no training dataset (zero-shot base model)"
        return
    try:
        train_records = dataset_service.load_records(settings, train_dataset_id)
        baseline = compare_with_baseline(report, train_records, records, label_set)
    except Exception as exc:  # noqa: BLE001 - the model's own report stands without its baseline
        log.warning("baseline for %s not computed: %s", job_id, exc)
        report["baseline_error"] = f"no baseline from dataset {train_dataset_id}: {exc}"
        _event(settings, job_id, "warning", report["baseline_error"])
        return
    report["lift"] = baseline.pop("lift")
    report["baseline"] = {"train_dataset_id": train_dataset_id, **baseline}
    lift = report["lift"]
    _event(settings, job_id, "baseline",
           f"TF-IDF baseline (trained on {train_dataset_id}, {baseline['n_train']} rows): accuracy "
           f"{baseline['accuracy']:.4f}, macro-F1 {baseline['macro_f1']:.4f}; the model's lift: accuracy "
           f"{lift['accuracy']:+.4f}, macro-F1 {lift['macro_f1']:+.4f}, weighted-F1 {lift['weighted_f1']:+.4f}",
           {"baseline": report["baseline"], "lift": lift})

"""The worker side of the job queue: claim, heartbeat, progress, finish, requeue, recover.

Every transition is one conditional UPDATE, so two workers never run one job: a claim only moves a
``queued`` job (on PostgreSQL the candidate row is taken with ``FOR UPDATE SKIP LOCKED``), and a worker
records an outcome only while the job still runs for it (one found orphaned by its stale heartbeat and
handed to another records nothing). A job whose worker died is found by that heartbeat (or a dead pid
on this host and pid namespace) and requeued to resume from its checkpoint, or failed after too many
attempts: no job stays ``running`` forever. Workers may run on many hosts sharing the database and
DATA_DIR; a worker claims only jobs whose ``resources.labels`` it has (WORKER_LABELS).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import is_postgresql
from app.domain.resources import claimable_label_sets
from app.models import JOB_TERMINAL, Job, new_id, utcnow
from app.services.jobs import add_event, get_job
from app.services.models import planned_model_id, register_adapter
from app.services.reports import record_report


def host_key() -> str:
    """This host as worker ids name it: the host name, and the pid namespace where it can be read. Two
    containers may share a host name but never a pid namespace, and a pid means something only inside its
    own: a worker judges another one's liveness by its pid only when this key matches, else by heartbeat."""
    host = socket.gethostname()
    try:
        return f"{host}#{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def worker_identity() -> str:
    return f"{host_key()}:{os.getpid()}:{new_id('w')[2:10]}"


def claim_next_job(session: Session, worker_id: str, labels: str = "") -> Job | None:
    """Atomically move the oldest queued job this worker may run (it has all the job's ``resources.labels``;
    ``labels`` is the worker's canonical label string) to running for this worker.

    On PostgreSQL the candidate row is locked with ``SELECT ... FOR UPDATE SKIP LOCKED``: workers claiming
    at once each get a different job without waiting on one another. On SQLite (one writer at a time) the
    conditional ``UPDATE ... WHERE status = 'queued'`` decides, and a worker that lost the race tries the next.
    """
    while True:
        query = (select(Job.id).where(Job.status == "queued", Job.required_labels.in_(claimable_label_sets(labels)))
                 .order_by(Job.created_at, Job.id).limit(1))
        if is_postgresql(session):
            query = query.with_for_update(skip_locked=True)
        candidate = session.scalar(query)
        if candidate is None:
            session.rollback()  # ends the transaction (and any row lock) at once
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


def set_progress(session: Session, job_id: str, progress: dict, *, worker_id: str | None = None) -> bool:
    """Merge ``progress`` into the job's progress (training steps and evaluation counts live side by side);
    with ``worker_id`` only while the job still runs for that worker (a training process left behind by a
    worker that lost its job must not overwrite its successor's progress)."""
    query = select(Job.progress).where(Job.id == job_id)
    if worker_id is not None:
        query = query.where(Job.worker_id == worker_id, Job.status == "running")
    current = session.execute(query).first()
    if current is None:
        session.rollback()
        return False
    scope = update(Job).where(Job.id == job_id)
    if worker_id is not None:
        scope = scope.where(Job.worker_id == worker_id, Job.status == "running")
    updated = session.execute(scope.values(progress={**(current[0] or {}), **progress}, heartbeat_at=utcnow()))
    session.commit()
    return bool(updated.rowcount)


# What a train_log event keeps of a logged training step.
TRAIN_LOG_FIELDS = ("step", "max_steps", "epoch", "loss", "learning_rate", "tokens_per_second", "steps_per_second")


def record_training_log(session: Session, job_id: str, metrics: dict, *, worker_id: str | None = None) -> bool:
    """A logged training step: its figures become the job's progress, and a ``train_log`` event keeps them
    (the loss curve survives a reload; the console draws it live from the events it polls). With
    ``worker_id`` only while the job still runs for that worker, as ``set_progress``."""
    if not set_progress(session, job_id, metrics, worker_id=worker_id):
        return False
    add_event(session, job_id, "train_log", f"step {metrics['step']}/{metrics['max_steps']}: loss {metrics['loss']:.4f}",
              {k: metrics.get(k) for k in TRAIN_LOG_FIELDS})
    session.commit()
    return True


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


def complete_job(session: Session, settings: Settings, job_id: str, worker_id: str | None, *,
                 model: dict | None = None, report: dict | None = None) -> bool:
    """Succeed a job and store what it produced in one transaction: the job ends ``succeeded`` with its model
    and report, or nothing is stored (a failed, cancelled or lost job leaves no model behind).

    ``model``: ``register_adapter``'s fields; ``report``: ``record_report``'s (report_id, report_dir, report,
    model_id, dataset_id)."""
    job = get_job(session, job_id)
    model_id = planned_model_id(session, job) if model else None
    report_id = report["report_id"] if report else None
    if not _end_job(session, job_id, worker_id, "succeeded", error_code=None, error_message=None,
                    model_id=model_id, report_id=report_id):
        session.rollback()
        return False
    if model:
        registered = register_adapter(session, settings, job=job, **model)
        add_event(session, job_id, "model_registered", f"adapter registered as model {registered.id}",
                  {"model_id": registered.id, "adapter_dir": registered.adapter_path})
    if report:
        summary = report["report"]
        record_report(session, settings, job_id=job_id, **report)
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
    """True when worker_id names a process of this host (and pid namespace) that no longer exists."""
    if not worker_id or worker_id.count(":") < 2:
        return False
    host, pid, _ = worker_id.split(":", 2)
    # Ids without a namespace part are from workers of older versions: their host name alone decides.
    here = host_key() if "#" in host else socket.gethostname()
    if host != here or not pid.isdigit():
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
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.worker_stale_seconds)
    recovered = []
    for job in session.scalars(select(Job).where(Job.status == "running")):
        beat = job.heartbeat_at
        if pid_dead_here(job.worker_id):
            why = "its process is gone"
        elif beat is None or beat < stale_before:
            why = f"no heartbeat for {(now - beat).total_seconds():.0f} s" if beat else "no heartbeat"
        else:
            continue
        if job.cancel_requested:
            new_status, message = "cancelled", f"worker died after a cancel request ({why}); job cancelled"
        elif job.attempts >= settings.max_job_attempts:
            new_status, message = "failed", (f"worker {job.worker_id} died ({why}) and the job already ran "
                                             f"{job.attempts} times; giving up")
        else:
            new_status, message = "queued", (f"worker {job.worker_id} died ({why}); requeued to resume from its "
                                             "last checkpoint")
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

"""The job worker: claims queued jobs from the shared database and runs them one at a time.

A heartbeat thread keeps ``heartbeat_at`` fresh and turns a cancel request (or the loss of the
job to another worker) into an event the running job polls every step. Every poll and heartbeat
also marks the worker itself alive (``workers.last_seen_at``, read by ``/health``). On start (and
every poll) orphaned jobs are recovered, so a worker killed mid-job costs at most the work since
its last checkpoint; what a job produced is stored only when it succeeds.
"""

from __future__ import annotations

import logging
import signal
import threading

from app.core.config import Settings
from app.core.db import run_migrations, session_scope
from app.services import jobs as job_service
from app.services import worker_registry
from workers.runners import JobCancelled, JobFailure, run_job

log = logging.getLogger("intent_tuner.worker")


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
                        worker_registry.touch_worker(session, self.worker_id, self.job_id)
                    if job_service.heartbeat(session, self.job_id, self.worker_id):
                        self.cancel_requested.set()
            except Exception:  # a busy database must not kill the job; the next beat retries
                log.exception("heartbeat failed")
            self._stop.wait(self.settings.worker_heartbeat_seconds)

    def stop(self) -> None:
        self._stop.set()


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.worker_id = job_service.worker_identity()
        self._shutdown = threading.Event()
        self._polling = False  # True in run_forever: only a polling worker counts as live in /health

    def request_shutdown(self, *_args) -> None:
        log.info("shutdown requested; finishing the current step")
        self._shutdown.set()

    def run_forever(self, *, exit_when_idle: bool = False, max_jobs: int | None = None) -> int:
        run_migrations(self.settings)
        log.info("worker %s polling %s", self.worker_id, self.settings.sqlalchemy_url)
        done = 0
        self._polling = True
        try:
            while not self._shutdown.is_set():
                if max_jobs is not None and done >= max_jobs:
                    break
                with session_scope(self.settings) as session:
                    worker_registry.touch_worker(session, self.worker_id)
                    for job_id in job_service.recover_orphaned_jobs(session, self.settings):
                        log.warning("recovered orphaned job %s", job_id)
                    job = job_service.claim_next_job(session, self.worker_id)
                if job is None:
                    if exit_when_idle:
                        break
                    self._shutdown.wait(self.settings.worker_poll_seconds)
                    continue
                self.run_one(job.id)
                done += 1
        finally:
            self._polling = False
            with session_scope(self.settings) as session:
                worker_registry.forget_worker(session, self.worker_id)
        return done

    def run_one(self, job_id: str) -> None:
        heartbeat = Heartbeat(self.settings, job_id, self.worker_id, announce=self._polling)
        heartbeat.start()
        should_stop = lambda: heartbeat.cancel_requested.is_set() or self._shutdown.is_set()  # noqa: E731
        try:
            outcome = run_job(self.settings, job_id, should_stop=should_stop)
        except JobCancelled as exc:
            if self._shutdown.is_set() and not heartbeat.cancel_requested.is_set():
                # Stopped by SIGTERM, not by the user: requeue so another worker resumes it.
                with session_scope(self.settings) as session:
                    job_service.requeue_job(session, job_id, self.worker_id,
                                            "worker shut down; requeued to resume from its checkpoint")
            else:
                self._finish(job_id, "cancelled", error_message=str(exc) or None)
        except JobFailure as exc:
            log.error("job %s failed: %s", job_id, exc)
            self._finish(job_id, "failed", error_code=exc.code, error_message=str(exc))
        except Exception as exc:  # any crash ends the job as failed, never running forever
            log.exception("job %s crashed", job_id)
            self._finish(job_id, "failed", error_code="internal_error", error_message=f"{type(exc).__name__}: {exc}")
        else:
            with session_scope(self.settings) as session:
                ended = job_service.complete_job(session, job_id, self.worker_id, model=outcome.model,
                                                 report=outcome.report)
            self._log_end(job_id, "succeeded", ended)
        finally:
            heartbeat.stop()

    def _finish(self, job_id: str, status: str, **kwargs) -> None:
        with session_scope(self.settings) as session:
            ended = job_service.finish_job(session, job_id, status, worker_id=self.worker_id, **kwargs)
        self._log_end(job_id, status, ended)

    @staticmethod
    def _log_end(job_id: str, status: str, ended: bool) -> None:
        if ended:
            log.info("job %s %s", job_id, status)
        else:
            log.warning("job %s was handed to another worker meanwhile; this run's result (%s) is dropped",
                        job_id, status)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from app.core.config import get_settings

    parser = argparse.ArgumentParser(prog="python -m workers", description="Run intent-tuner jobs from the database.")
    parser.add_argument("--once", action="store_true", help="exit when no job is queued")
    parser.add_argument("--max-jobs", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(get_settings())
    signal.signal(signal.SIGTERM, worker.request_shutdown)
    signal.signal(signal.SIGINT, worker.request_shutdown)
    worker.run_forever(exit_when_idle=args.once, max_jobs=args.max_jobs)
    return 0



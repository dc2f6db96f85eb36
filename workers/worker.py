"""The job worker: a thin loop that claims queued jobs from the shared database and runs them one at a time.

Each poll marks the worker alive (``workers.last_seen_at``, read by ``/health``), recovers jobs whose
worker died (requeued to resume from their checkpoint) and claims the oldest queued job; running it
is ``app.services.pipelines.run_claimed_job``. SIGTERM/SIGINT stop after the current step and
requeue the job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from app.core.config import Settings
from app.core.db import display_url, run_migrations, session_scope
from app.domain.resources import parse_labels
from app.services import pipelines, queue, worker_registry

log = logging.getLogger("intent_tuner.worker")


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.labels = parse_labels(settings.worker_labels)  # WORKER_LABELS, canonical; a bad one stops the start
        self.worker_id = queue.worker_identity()
        self.classifiers = pipelines.Classifiers(settings)  # this process's one classifier registry
        self._shutdown = threading.Event()
        self._gpu_locks: list = []  # held for the worker's lifetime (WORKER_GPUS)

    def request_shutdown(self, *_args) -> None:
        log.info("shutdown requested; finishing the current step")
        self._shutdown.set()

    def reserve_gpus(self) -> None:
        """WORKER_GPUS=n: take n free GPUs of those visible, before anything here touches CUDA; the jobs and
        the training processes of this worker then see those alone."""
        if not self.settings.worker_gpus:
            return
        from app.services.gpu_reservation import list_gpus, reserve_gpus

        gpus, self._gpu_locks = reserve_gpus(self.settings.data_dir, self.settings.worker_gpus, list_gpus())
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        log.info("worker %s took GPU(s) %s", self.worker_id, ", ".join(gpus))

    def run_forever(self, *, exit_when_idle: bool = False, max_jobs: int | None = None) -> int:
        run_migrations(self.settings)
        self.reserve_gpus()
        log.info("worker %s (labels: %s) polling %s", self.worker_id, self.labels or "none",
                 display_url(self.settings))
        done = 0
        try:
            while not self._shutdown.is_set():
                if max_jobs is not None and done >= max_jobs:
                    break
                with session_scope(self.settings) as session:
                    worker_registry.touch_worker(session, self.worker_id, labels=self.labels)
                    for job_id in queue.recover_orphaned_jobs(session, self.settings):
                        log.warning("recovered orphaned job %s", job_id)
                    job = queue.claim_next_job(session, self.worker_id, self.labels)
                if job is None:
                    if exit_when_idle:
                        break
                    self._shutdown.wait(self.settings.worker_poll_seconds)
                    continue
                pipelines.run_claimed_job(self.settings, job.id, self.worker_id, classifiers=self.classifiers,
                                          shutdown=self._shutdown)
                done += 1
        finally:
            with session_scope(self.settings) as session:
                worker_registry.forget_worker(session, self.worker_id)
        return done


def main(argv: list[str] | None = None) -> int:
    import argparse

    from app.core.config import get_settings

    parser = argparse.ArgumentParser(prog="python -m workers", description="Run intent-tuner jobs from the database.")
    parser.add_argument("--once", action="store_true", help="exit when no job is queued")
    parser.add_argument("--max-jobs", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker = Worker(get_settings())
    except ValueError as exc:  # WORKER_LABELS that are not labels: say so, not a traceback
        parser.exit(2, f"python -m workers: WORKER_LABELS: {exc}\n")
    signal.signal(signal.SIGTERM, worker.request_shutdown)
    signal.signal(signal.SIGINT, worker.request_shutdown)
    worker.run_forever(exit_when_idle=args.once, max_jobs=args.max_jobs)
    return 0

"""`make serve`: the API (uvicorn, PORT) and SERVE_WORKERS worker processes sharing DATA_DIR's database.

Each worker is supervised: one that dies (killed, out of memory, crashed) is started again after a
back-off that doubles from WORKER_RESTART_MIN_SECONDS up to WORKER_RESTART_MAX_SECONDS and resets once
a worker has run that long. The new worker requeues the job its predecessor was running (its pid is
gone), which resumes from its last checkpoint. ``/health`` shows the workers and ``/health/ready``
fails while none is live.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import uvicorn

from app.core.config import Settings, get_settings
from app.core.db import run_migrations

log = logging.getLogger("intent_tuner.serve")


class WorkerSupervisor(threading.Thread):
    """Keeps one ``python -m workers`` child running until :meth:`stop`."""

    def __init__(self, settings: Settings, index: int = 0):
        super().__init__(daemon=True, name=f"worker-supervisor-{index}")
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        backoff = self.settings.worker_restart_min_seconds
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = subprocess.Popen([sys.executable, "-m", "workers"], env=os.environ.copy())
            started = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= self.settings.worker_restart_max_seconds:
                backoff = self.settings.worker_restart_min_seconds  # it ran well for a while: start afresh
            log.error("worker pid %s exited with %s; restarting it in %.1f s", self.process.pid, code, backoff)
            if self._stopping.wait(backoff):
                return
            self.restarts += 1
            backoff = min(backoff * 2, self.settings.worker_restart_max_seconds)

    def stop(self, timeout: float = 30) -> None:
        """Stop supervising and shut the worker down (SIGTERM: it requeues its job), killing it after ``timeout``."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    run_migrations(settings)  # once, before any process starts
    supervisors = [WorkerSupervisor(settings, i) for i in range(settings.serve_workers)]
    for supervisor in supervisors:
        supervisor.start()
    try:
        uvicorn.run("app.main:create_app", factory=True, host=settings.host, port=settings.port)
    finally:
        for supervisor in supervisors:
            supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

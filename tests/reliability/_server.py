"""A real API process for the tests that need one: uvicorn on a free 127.0.0.1 port, stopped by the test."""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from tests.support import free_port, wait_for, worker_env


@dataclass
class Server:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def api_server(settings, **env: str):
    """``uvicorn app.main:create_app`` with DATA_DIR of ``settings`` and ``env`` (API_KEY, TMPDIR, ...)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = settings.data_dir / f"api-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            env=worker_env(settings, DEFAULT_BASE_MODEL="tiny-glm4", DEFAULT_CONFIG="tiny_test", **env),
            stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, port)
    try:
        wait_for(lambda: _answers(server) or process.poll() is not None, 120, "the API to start")
        assert process.poll() is None, log_path.read_text()
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


def _answers(server: Server) -> bool:
    try:
        return httpx.get(server.url + "/health", timeout=5).status_code in (200, 503)
    except httpx.TransportError:
        return False

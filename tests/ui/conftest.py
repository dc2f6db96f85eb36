"""A real server (uvicorn + a `python -m workers` process, SQLite in a temporary DATA_DIR, the tiny model)
and Debian's Chromium driven by Playwright, for the console's browser tests (`make test-ui`).

Playwright never downloads a browser here: it drives /usr/bin/chromium, headless, with a fresh profile.
Every request a page makes is watched: one to anything but this server fails the test, and so does an
uncaught JavaScript error.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

try:
    import playwright  # noqa: F401
except ImportError:  # `make test` runs without it (these tests are deselected there); `make test-ui` installs it
    collect_ignore_glob = ["test_*.py"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The API and (optionally) one worker, as `make serve` would run them, on 127.0.0.1."""

    def __init__(self, data_dir: Path, *, api_key: str | None = None, worker: bool = True):
        self.data_dir, self.port = data_dir, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATA_DIR": str(data_dir), "DEFAULT_BASE_MODEL": "tiny-glm4",
                    "DEFAULT_CONFIG": "tiny_test", "WORKER_POLL_SECONDS": "0.3", "WORKER_HEARTBEAT_SECONDS": "1",
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.env.pop("API_KEY", None)
        if api_key:
            self.env["API_KEY"] = api_key
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.with_worker = worker

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.data_dir.parent / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.processes.append(subprocess.Popen([sys.executable, *args], cwd=PROJECT_ROOT, env=self.env,
                                                   stdout=out, stderr=subprocess.STDOUT))

    def start(self) -> "Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("api", ["-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                            "--port", str(self.port), "--log-level", "warning"])
        if self.with_worker:
            self._spawn("worker", ["-m", "workers"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = httpx.get(f"{self.url}/health", timeout=2).json()
                if health["ready"] or not self.with_worker:
                    return self
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not become ready:\n{self.tail()}")

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in self.logs
                         if log.exists())

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def start_server(tmp_path):
    started: list[Server] = []

    def start(**kwargs) -> Server:
        server = Server(tmp_path / f"server{len(started)}" / "data", **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def playwright_instance():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test-ui` installs Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or (parts.scheme in ("http", "https") and parts.hostname in LOCAL_HOSTS)


class Browser:
    """One fresh Chromium profile whose pages may only talk to this machine: every other request is
    recorded (the test fails) and aborted inside the browser, so nothing leaves the machine."""

    def __init__(self, context):
        self.context = context
        self.foreign_requests: list[str] = []
        self.page_errors: list[str] = []
        context.on("request", self._check_request)
        context.route("**/*", self._route)

    def _check_request(self, request) -> None:
        if not is_local(request.url) and request.url not in self.foreign_requests:
            self.foreign_requests.append(request.url)

    def _route(self, route) -> None:
        if is_local(route.request.url):
            route.continue_()
        else:
            self._check_request(route.request)
            route.abort()

    def new_page(self):
        page = self.context.new_page()
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        return page


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.ui_call_failed = report.failed
    return report


@pytest.fixture
def browser(request, playwright_instance, tmp_path):
    profile = tmp_path / "chromium-profile"
    context = playwright_instance.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1360, "height": 900}, locale="en-US")
    wrapped = Browser(context)
    try:
        yield wrapped
        if getattr(request.node, "ui_call_failed", False):  # what the page showed when it failed
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            for index, page in enumerate(context.pages):
                page.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}-{index}.png"), full_page=True)
    finally:
        context.close()
    assert not wrapped.foreign_requests, f"the console requested non-local URLs: {wrapped.foreign_requests}"
    assert not wrapped.page_errors, f"uncaught errors in the page: {wrapped.page_errors}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS

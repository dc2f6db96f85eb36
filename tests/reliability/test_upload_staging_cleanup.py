"""A process killed mid-upload leaves its `.partial` staging folder; the next start-up removes it at once,
while an upload in flight in another live process keeps its folder and completes (issue 9, item 10).

Two real API processes upload while the test holds SQLite's write lock, so each upload stops with its
staging folder written, waiting to insert its row. One is killed with SIGKILL; then the app starts.
"""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from app.data.sample import generate_sample_dialogues, to_cmcc_csv
from app.main import create_app
from tests.support import wait_for, write_lock
from tests.reliability._server import api_server

pytestmark = pytest.mark.timeout(300)

ROWS = to_cmcc_csv(generate_sample_dialogues(2, seed=5, labels=list(range(4)))).encode()


def _start_upload(server) -> dict:
    """Upload in a thread (it waits on the database lock); the answer lands in the returned dict."""
    answer: dict = {}

    def send():
        try:
            answer["response"] = httpx.post(server.url + "/datasets", files={"file": ("train.csv", ROWS)}, timeout=120)
        except httpx.TransportError as exc:
            answer["error"] = exc

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    answer["thread"] = thread
    return answer


def _staged(settings) -> set[str]:
    """Staging folders whose records are written: the upload then only waits to insert its row."""
    return {p.name for p in settings.datasets_dir.glob(".*.partial") if (p / "records.jsonl").exists()}


def test_start_up_removes_the_staging_of_a_killed_upload_and_keeps_one_in_flight(settings):
    with api_server(settings) as doomed, api_server(settings) as alive:
        with write_lock(settings):
            killed_upload = _start_upload(doomed)
            orphan = wait_for(lambda: _staged(settings), 120, "the first upload to stage")
            in_flight_upload = _start_upload(alive)
            in_flight = wait_for(lambda: _staged(settings) - orphan, 120, "the second upload to stage")
            os.kill(doomed.process.pid, signal.SIGKILL)
            doomed.process.wait(30)
            killed_upload["thread"].join(60)
            assert "error" in killed_upload  # the connection died with its process
            assert _staged(settings) == orphan | in_flight

            with TestClient(create_app(settings)):  # start-up, while the other upload still waits
                left = {p.name for p in settings.datasets_dir.iterdir()}
            assert not orphan & left, left  # gone at once, with its lock file
            assert not any(name.startswith(tuple(orphan)) for name in left), left
            assert in_flight <= left

        in_flight_upload["thread"].join(120)
        response = in_flight_upload["response"]
        assert response.status_code == 201, response.text
        assert {p.name for p in settings.datasets_dir.iterdir()} == {response.json()["id"]}

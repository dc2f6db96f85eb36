"""`make serve` supervises its worker: kill -9 the worker child and a new one takes over, the interrupted
job resumes and finishes, and /health shows it all; /health/ready is 503 while no worker is live
(issue 9, item 3)."""

from __future__ import annotations

import os
import signal
import threading
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest

from app.core.db import run_migrations, session_scope
from app.models import utcnow
from tests.support import TERMINAL, free_port, wait_for, worker_env, write_lock

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def served(settings):
    """``python -m app.serve`` on a free port with a tiny DATA_DIR; stopped (with its worker) by the test."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = worker_env(settings, PORT=str(port), HOST="127.0.0.1", WORKER_RESTART_MIN_SECONDS="0.2",
                     WORKER_STALE_SECONDS="10", DEFAULT_CONFIG="tiny_test")
    log = open(settings.data_dir / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "app.serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        yield process, client
    finally:
        client.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the session we started: serve and any worker left
        except ProcessLookupError:
            pass


def _health(client) -> dict | None:
    try:
        response = client.get("/health")
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def _live_pids(client) -> set[int]:
    health = _health(client) or {"workers": {"items": []}}
    return {w["pid"] for w in health["workers"]["items"] if w["alive"]}


def test_serve_restarts_a_killed_worker_and_the_job_resumes(served, settings):
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    process, client = served
    first_pid = next(iter(wait_for(lambda: _live_pids(client), 120, "a live worker")))
    assert client.get("/health/ready").status_code == 200

    rows = to_cmcc_csv(generate_sample_dialogues(3, seed=11, labels=list(range(8)))).encode()
    dataset = client.post("/datasets", files={"file": ("train.csv", rows, "text/csv")}).json()["id"]
    job_id = client.post("/jobs", json={"dataset_id": dataset, "hyperparameters": {
        "max_steps": 40, "save_steps": 5}}).json()["id"]
    wait_for(lambda: (client.get(f"/jobs/{job_id}").json()["progress"].get("step") or 0) >= 1, 300,
             "the job to train")
    with write_lock(settings) as db:  # the worker cannot finish the job while we kill it
        status, worker_id = db.execute("SELECT status, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert status == "running" and worker_id.split(":")[1] == str(first_pid)
        os.kill(first_pid, signal.SIGKILL)

    second_pid = next(iter(wait_for(lambda: _live_pids(client) - {first_pid}, 120, "a restarted worker")))
    assert process.poll() is None and second_pid != first_pid
    job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in TERMINAL and j, 300,
                   "the interrupted job to finish")
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["progress"]["step"] == 40
    kinds = [e["kind"] for e in client.get(f"/jobs/{job_id}/events").json()]
    assert kinds.count("recovered") == 1 and kinds[-1] == "succeeded"

    health = client.get("/health").json()
    by_pid = {w["pid"]: w for w in health["workers"]["items"]}
    assert by_pid[second_pid]["alive"] and not by_pid.get(first_pid, {"alive": False})["alive"]
    assert health["queue"] == {"queued": 0, "oldest_queued_seconds": None, "running": 0,
                               "running_with_stale_heartbeat": 0}
    assert client.get("/health/ready").status_code == 200


def _add_worker(settings, worker_id: str, pid: int, seen_ago: float) -> None:
    from app.models import WorkerRow

    with session_scope(settings) as session:
        session.add(WorkerRow(id=worker_id, hostname=worker_id.split(":")[0], pid=pid,
                              last_seen_at=utcnow() - timedelta(seconds=seen_ago)))


def test_readiness_fails_without_a_live_worker(client, settings):
    """A worker is live when seen within WORKER_STALE_SECONDS and, on this host, its process exists."""
    not_ready = client.get("/health/ready")
    assert not_ready.status_code == 503
    assert not_ready.json()["workers"] == {"live": 0, "stale_after_seconds": settings.worker_stale_seconds,
                                           "items": []}
    assert client.get("/health").status_code == 200  # the API itself is alive

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    _add_worker(settings, f"{host}:{dead.pid}:dead", dead.pid, seen_ago=0)  # seen just now, process gone
    _add_worker(settings, "other-host:7:quiet", 7, seen_ago=settings.worker_stale_seconds + 5)  # heartbeat stale
    assert client.get("/health/ready").status_code == 503

    _add_worker(settings, "other-host:8:busy", 8, seen_ago=1)  # another host, heard from a second ago
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    alive = {w["id"]: w["alive"] for w in ready.json()["workers"]["items"]}
    assert alive == {f"{host}:{dead.pid}:dead": False, "other-host:7:quiet": False, "other-host:8:busy": True}


def test_health_reports_the_queue(client, settings):
    from tests.conftest import upload
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    dataset = upload(client, to_cmcc_csv(generate_sample_dialogues(2, seed=3)).encode()).json()["id"]
    for _ in range(2):
        assert client.post("/jobs", json={"dataset_id": dataset}).status_code == 201
    queue = client.get("/health").json()["queue"]
    assert queue["queued"] == 2 and queue["running"] == 0 and queue["oldest_queued_seconds"] >= 0


def test_a_worker_marks_itself_alive_while_polling_and_leaves_when_stopped(settings):
    from app.models import WorkerRow

    run_migrations(settings)
    log = open(settings.data_dir / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "workers"], env=worker_env(settings), stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        def seen():
            with session_scope(settings) as session:
                return [(w.pid, w.last_seen_at) for w in session.query(WorkerRow).all()]

        (pid, first_seen), = wait_for(seen, 120, "the worker's row")
        assert pid == worker.pid
        wait_for(lambda: seen() and seen()[0][1] > first_seen, 60, "a later poll")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert seen() == []
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_a_job_run_in_process_does_not_count_as_a_live_worker(client, settings):
    """`intent-tuner evaluate` runs its job in-process; it takes no queued job, so /health must not list it."""
    from app.models import WorkerRow
    from app.services import jobs as job_service
    from tests.conftest import upload
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv
    from app.services import pipelines, queue

    dataset = upload(client, to_cmcc_csv(generate_sample_dialogues(1, seed=3, labels=[0, 1])).encode()).json()["id"]
    worker_id = queue.worker_identity()
    with session_scope(settings) as session:
        job_id = job_service.create_evaluation_job(session, settings, model="tiny-glm4", dataset_id=dataset,
                                                   mode="score", claimed_by=worker_id).id
    pipelines.run_claimed_job(settings, job_id, worker_id, classifiers=pipelines.Classifiers(settings),
                              shutdown=threading.Event(), announce=False)
    assert client.get(f"/evaluations/{job_id}").json()["status"] == "succeeded"
    with session_scope(settings) as session:
        assert session.query(WorkerRow).count() == 0
    assert client.get("/health/ready").status_code == 503

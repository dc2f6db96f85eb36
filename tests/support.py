"""Shared by the tests that drive real processes: worker processes, datasets, waiting and DB locks."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager

from tests.conftest import upload

TERMINAL = ("succeeded", "failed", "cancelled")


def make_datasets(client, *, per_label_train: int = 3, per_label_val: int = 1, labels: int = 8) -> tuple[str, str]:
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    ids = list(range(labels))
    train = to_cmcc_csv(generate_sample_dialogues(per_label_train, seed=11, labels=ids)).encode()
    val = to_cmcc_csv(generate_sample_dialogues(per_label_val, seed=12, labels=ids)).encode()
    return upload(client, train, "train.csv").json()["id"], upload(client, val, "val.csv").json()["id"]


def worker_env(settings, **extra: str) -> dict:
    return {**os.environ, "DATA_DIR": str(settings.data_dir), "WORKER_POLL_SECONDS": "0.2",
            "WORKER_HEARTBEAT_SECONDS": "0.5", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}


def start_worker(settings) -> subprocess.Popen:
    log = open(settings.data_dir / f"worker-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "workers"], env=worker_env(settings), stdout=log,
                            stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def write_lock(settings):
    """Hold SQLite's write lock: every write of another process waits (readers go on, WAL)."""
    connection = sqlite3.connect(settings.data_dir / "intent_tuner.db", timeout=60, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield connection
    finally:
        connection.execute("ROLLBACK")
        connection.close()

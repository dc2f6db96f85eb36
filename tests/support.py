"""Shared by the tests that drive real processes: worker processes, datasets, waiting and DB locks."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager

from tests.conftest import database_env, upload

TERMINAL = ("succeeded", "failed", "cancelled")


def make_datasets(client, *, per_label_train: int = 3, per_label_val: int = 1, labels: int = 8) -> tuple[str, str]:
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    ids = list(range(labels))
    train = to_cmcc_csv(generate_sample_dialogues(per_label_train, seed=11, labels=ids)).encode()
    val = to_cmcc_csv(generate_sample_dialogues(per_label_val, seed=12, labels=ids)).encode()
    return upload(client, train, "train.csv").json()["id"], upload(client, val, "val.csv").json()["id"]


def worker_env(settings, **extra: str) -> dict:
    return {**os.environ, **database_env(settings), "WORKER_POLL_SECONDS": "0.2",
            "WORKER_HEARTBEAT_SECONDS": "0.5", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}


def start_worker(settings, *, prefix: list[str] = (), new_session: bool = False, **env: str) -> subprocess.Popen:
    """``python -m workers`` on the test's database (``prefix``: e.g. unshare; ``env``: more settings)."""
    log = open(settings.data_dir / f"worker-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen([*prefix, sys.executable, "-m", "workers"], env=worker_env(settings, **env), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=new_session)


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


def unshare_pid_prefix() -> list[str] | None:
    """A command prefix that runs a process in a new pid namespace (as in another container of the same
    host name), or None where util-linux unshare is missing or not allowed."""
    for prefix in (["unshare", "--pid", "--fork", "--kill-child"],
                   ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LockedDatabase:
    """The connection that holds the lock; ``execute`` takes SQLite's ``?`` placeholders on both databases."""

    def __init__(self, connection, placeholder: str):
        self.connection, self.placeholder = connection, placeholder

    def execute(self, sql: str, params: tuple = ()):
        return self.connection.execute(sql.replace("?", self.placeholder), params)


@contextmanager
def write_lock(settings):
    """Hold the database's write lock: every write of another process waits (readers go on).

    SQLite: its one write lock (WAL readers go on). PostgreSQL: every table locked IN EXCLUSIVE MODE,
    which lets plain reads through and makes every write (and every SELECT ... FOR UPDATE) wait."""
    if settings.database_url and settings.database_url.startswith("postgresql"):
        import psycopg
        from sqlalchemy import make_url

        url = make_url(settings.database_url)
        connection = psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                     dbname=url.database)
        try:
            connection.execute("LOCK TABLE datasets, jobs, job_events, models, reports, workers IN EXCLUSIVE MODE")
            yield _LockedDatabase(connection, "%s")
        finally:
            connection.rollback()
            connection.close()
        return
    connection = sqlite3.connect(settings.data_dir / "intent_tuner.db", timeout=60, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield _LockedDatabase(connection, "?")
    finally:
        connection.execute("ROLLBACK")
        connection.close()

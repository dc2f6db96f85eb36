"""Fixtures for service tests: a real FastAPI app on a real SQLite file in a temporary DATA_DIR.

``TEST_DATABASE=postgres`` (as ``make test-scale`` runs the API and worker suites) gives every test a fresh
database on a throw-away PostgreSQL server instead (``tests/pg.py``); SQLite is the default.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TEST_DATABASE = os.environ.get("TEST_DATABASE", "sqlite")
if TEST_DATABASE not in ("sqlite", "postgres"):
    raise ValueError(f"TEST_DATABASE={TEST_DATABASE!r}: use sqlite or postgres")


def pytest_report_header(config):
    return f"test database: {TEST_DATABASE}"


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL server in a temporary directory for the whole session, deleted after."""
    from tests.pg import start_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def database_url(request) -> str | None:
    """None (SQLite in DATA_DIR), or with TEST_DATABASE=postgres a new empty PostgreSQL database."""
    if TEST_DATABASE != "postgres":
        return None
    return request.getfixturevalue("postgres_cluster").create_database()


@pytest.fixture
def settings(tmp_path, database_url):
    from app.core.config import Settings
    from app.core.db import dispose_engine

    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, worker_poll_seconds=0.2,
                        worker_heartbeat_seconds=0.5, default_base_model="tiny-glm4", default_config="tiny_test")
    yield settings
    dispose_engine(settings)


def database_env(settings) -> dict:
    """The environment a worker or API process needs to reach the test's database."""
    return {"DATA_DIR": str(settings.data_dir), **({"DATABASE_URL": settings.database_url}
                                                   if settings.database_url else {})}


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def sample_csv() -> bytes:
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    return to_cmcc_csv(generate_sample_dialogues(per_label=2, seed=3)).encode("utf-8")


def upload(client, content: bytes, filename: str = "data.csv", name: str | None = None):
    data = {"name": name} if name else {}
    return client.post("/datasets", files={"file": (filename, content, "application/octet-stream")}, data=data)

"""Fixtures for service tests: a real FastAPI app on a real SQLite file in a temporary DATA_DIR."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def settings(tmp_path):
    from app.core.config import Settings

    return Settings(data_dir=tmp_path / "data", worker_poll_seconds=0.2, worker_heartbeat_seconds=0.5,
                    default_base_model="tiny-glm4", default_config="tiny_test")


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

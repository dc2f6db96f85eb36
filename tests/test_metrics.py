"""GET /metrics after real activity (a tiny training job with its validation report, a classify call, a
queued job, a worker's running job), parsed by prometheus-client's own parser; and its key setting."""

from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import upload

pytestmark = pytest.mark.timeout(600)

TEXT = "您好请讲[SEP]我想开通一个流量包"


def scrape(client, **kwargs) -> dict:
    """{family name: {frozenset(labels.items()) | sample name: value}} of one scrape."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = {(sample.name, frozenset(sample.labels.items())): sample.value
                                 for sample in family.samples}
    return families


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    return families[family][(sample or family, frozenset(labels.items()))]


def _datasets(client):
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    train = upload(client, to_cmcc_csv(generate_sample_dialogues(2, seed=21, labels=list(range(6)))).encode(),
                   "train.csv").json()["id"]
    val = upload(client, to_cmcc_csv(generate_sample_dialogues(2, seed=22, labels=list(range(6)))).encode(),
                 "val.csv").json()["id"]
    return train, val


def test_metrics_after_training_classifying_and_queueing(client, settings):
    from app.core.db import session_scope
    from app.services import queue as job_service
    from app.services.worker_registry import touch_worker
    from workers.worker import Worker

    train_id, val_id = _datasets(client)
    job = client.post("/jobs", json={"dataset_id": train_id, "validation_dataset_id": val_id,
                                     "hyperparameters": {"max_steps": 4}}).json()
    assert Worker(settings).run_forever(exit_when_idle=True) == 1
    job = client.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    model_id = job["model_id"]
    report = client.get(f"/reports/{job['report_id']}").json()

    # What the worker recorded on the way: each logged step (the console's loss curve) with its throughput,
    # and the base model's preparation.
    events = client.get(f"/jobs/{job['id']}/events").json()
    steps = [e["data"] for e in events if e["kind"] == "train_log"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["loss"] > 0 and s["steps_per_second"] > 0 and s["tokens_per_second"] > 0 for s in steps)
    assert any(e["kind"] == "base_model" and e["message"].startswith("prepared tiny-glm4") for e in events)
    # 12 validation dialogues in batches of 8: the first batch is 6/10 of the way, an event.
    assert [e["data"] for e in events if e["kind"] == "evaluation_progress"] == [{"done": 8, "total": 12}]
    assert job["progress"]["steps_per_second"] > 0
    history = client.get(f"/models/{model_id}/loss_history").json()
    assert [(p["step"], p["loss"]) for p in history["points"]] == [(s["step"], s["loss"]) for s in steps]

    answer = client.post("/classify", json={"model": model_id, "texts": [TEXT, TEXT + "[SEP]五十块的"], "top_k": 2})
    assert answer.status_code == 200, answer.text
    assert client.get("/jobs/job_does_not_exist").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    queued = client.post("/jobs", json={"dataset_id": train_id, "hyperparameters": {"max_steps": 4}}).json()

    families = scrape(client)
    assert value(families, "intent_tuner_database_up") == 1
    assert value(families, "intent_tuner_jobs", state="succeeded", kind="train") == 1
    assert value(families, "intent_tuner_jobs", state="queued", kind="train") == 1
    assert value(families, "intent_tuner_jobs", state="running", kind="evaluate") == 0
    assert value(families, "intent_tuner_queue_depth") == 1
    assert value(families, "intent_tuner_queue_oldest_age_seconds") > 0
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert value(families, f"intent_tuner_evaluation_{key}", model=model_id, dataset=val_id) == \
            pytest.approx(report["summary"][key])
    assert value(families, "intent_tuner_classify_texts", "intent_tuner_classify_texts_total",
                 model=model_id, backend="transformers") == 2
    assert value(families, "intent_tuner_classify_request_duration_seconds",
                 "intent_tuner_classify_request_duration_seconds_count", model=model_id, backend="transformers") == 1
    requests = families["intent_tuner_http_request_duration_seconds"]
    routes = {dict(labels)["route"] for (_, labels) in requests}
    assert {"/datasets", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events", "/classify", "<unmatched>"} <= routes
    assert not any(job["id"] in route or "job_does_not_exist" in route for route in routes)  # templates only
    assert value(families, "intent_tuner_http_requests", "intent_tuner_http_requests_total",
                 method="GET", route="/jobs/{job_id}", status="404") == 1
    assert value(families, "intent_tuner_http_requests", "intent_tuner_http_requests_total",
                 method="POST", route="/classify", status="200") == 1

    # A worker elsewhere claims the queued job and reports progress through the shared database: its
    # heartbeat and the running job's throughput reach this process's scrape.
    worker_id = "gpu-host-7:4242:abcd1234"
    with session_scope(settings) as session:
        touch_worker(session, worker_id, queued["id"])
        assert job_service.claim_next_job(session, worker_id).id == queued["id"]
        job_service.set_progress(session, queued["id"], {"step": 3, "max_steps": 12, "steps_per_second": 1.5,
                                                         "tokens_per_second": 812.0, "eta_seconds": 6.0})
    families = scrape(client)
    assert value(families, "intent_tuner_queue_depth") == 0
    assert value(families, "intent_tuner_jobs", state="running", kind="train") == 1
    # (the in-process worker's heartbeat thread may re-mark it alive just after it left: count what /health counts)
    assert value(families, "intent_tuner_workers_live") == client.get("/health").json()["workers"]["live"] >= 1
    assert 0 <= value(families, "intent_tuner_worker_heartbeat_age_seconds", worker=worker_id,
                      hostname=socket.gethostname()) < settings.worker_stale_seconds
    running = {"job": queued["id"], "kind": "train", "model": "tiny-glm4"}
    assert value(families, "intent_tuner_job_steps_per_second", **running) == 1.5
    assert value(families, "intent_tuner_job_tokens_per_second", **running) == 812.0
    assert value(families, "intent_tuner_job_eta_seconds", **running) == 6.0
    assert value(families, "intent_tuner_job_progress_ratio", **running) == 0.25


def test_metrics_are_open_unless_metrics_require_key(tmp_path):
    from app.core.config import Settings
    from app.main import create_app

    open_settings = Settings(data_dir=tmp_path / "open", api_key="s3cret")
    with TestClient(create_app(open_settings)) as client:
        assert client.get("/datasets").status_code == 401  # the API is protected ...
        assert scrape(client)["intent_tuner_database_up"]  # ... the scrape is not, by default

    closed = Settings(data_dir=tmp_path / "closed", api_key="s3cret", metrics_require_key=True)
    with TestClient(create_app(closed)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["detail"]["message"] == "missing or wrong bearer API key"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert scrape(client, headers={"Authorization": "Bearer s3cret"})["intent_tuner_database_up"]


def test_openmetrics_when_the_scraper_asks_for_it(client):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_grafana_dashboard_queries_only_metrics_the_service_exposes(client):
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy/grafana/intent-tuner.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queried = {re.sub(r"_(total|bucket|count|sum)$", "", name) for expr in exprs
               for name in re.findall(r"\bintent_tuner_\w+", expr)}
    exposed = set(scrape(client))
    assert len(queried) >= 12 and queried <= exposed, queried - exposed

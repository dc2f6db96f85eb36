"""A worker killed while it evaluates the validation set: the resumed job does not train again, registers
one model and writes its report (issue 9, item 2)."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.support import TERMINAL, make_datasets, start_worker, stop, wait_for, write_lock

pytestmark = pytest.mark.timeout(600)

MAX_STEPS = 5


def _freeze_mid_evaluation(settings, job_id: str, worker, seconds: float = 300):
    """Return holding the database's write lock at a moment the worker is provably mid-evaluation.

    Evaluation writes its progress after every batch and always after the last one, so a job whose
    stored progress says ``done < total`` while we hold the write lock cannot finish evaluating until
    we let go: the kill that follows lands inside the evaluation, not before or after it.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker exited on its own"
        lock = write_lock(settings)
        connection = lock.__enter__()
        status, progress = connection.execute("SELECT status, progress FROM jobs WHERE id = ?", (job_id,)).fetchone()
        progress = (json.loads(progress) if isinstance(progress, str) else progress) or {}
        assert status not in TERMINAL, f"the job ended ({status}) before its evaluation could be interrupted"
        if progress.get("total") and progress.get("done", 0) < progress["total"]:
            return lock, progress
        lock.__exit__(None, None, None)
        time.sleep(0.05)
    raise AssertionError("the worker never reached the evaluation")


def test_worker_killed_while_validating_resumes_with_the_evaluation(client, settings):
    train_id, val_id = make_datasets(client, per_label_val=4)  # 32 dialogues: 4 evaluation batches
    job_id = client.post("/jobs", json={
        "dataset_id": train_id, "validation_dataset_id": val_id, "base_model": "tiny-glm4", "config": "tiny_test",
        "hyperparameters": {"max_steps": MAX_STEPS, "save_steps": MAX_STEPS}}).json()["id"]

    first = start_worker(settings)
    try:
        lock, progress = _freeze_mid_evaluation(settings, job_id, first)
        try:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            lock.__exit__(None, None, None)
    finally:
        stop(first)
    assert 0 < progress["done"] < progress["total"] == 32
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"  # nobody has noticed yet

    second = start_worker(settings)
    try:
        job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in TERMINAL and j, 300,
                       "the resumed job to finish")
    finally:
        stop(second)

    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    models = [m for m in client.get("/models").json()["adapters"] if m["job_id"] == job_id]
    assert [m["id"] for m in models] == [job["model_id"]], "one model per training job"
    assert job["progress"]["step"] == MAX_STEPS
    assert not (settings.jobs_dir / job_id / "checkpoints").exists()  # removed once the model is registered
    meta = json.loads((settings.jobs_dir / job_id / "adapter" / "intent_tuner.json").read_text(encoding="utf-8"))
    assert meta["metrics"]["global_step"] == MAX_STEPS

    events = client.get(f"/jobs/{job_id}/events").json()
    after_recovery = [e["kind"] for e in events[[e["kind"] for e in events].index("recovered"):]]
    assert "model_loaded" not in after_recovery and "resumed" not in after_recovery, after_recovery
    assert after_recovery.count("evaluation_started") == 1 and after_recovery[-1] == "succeeded"
    report = client.get(f"/reports/{job['report_id']}")
    assert report.status_code == 200 and report.json()["metrics"]["n_samples"] == 32
    assert [r["id"] for r in client.get("/reports", params={"model_id": job["model_id"]}).json()] == [job["report_id"]]

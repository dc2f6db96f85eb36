"""Job lifecycle, atomic claiming by racing workers, and recovery of jobs whose worker died."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from app.core.db import run_migrations, session_scope
from app.models import Dataset, Job, JobEvent, new_id, utcnow
from app.services import queue
from tests.conftest import upload


def _dataset(client, sample_csv) -> str:
    return upload(client, sample_csv).json()["id"]


def test_create_job_uses_recipe_defaults_and_overrides(client, sample_csv):
    dataset_id = _dataset(client, sample_csv)
    response = client.post("/jobs", json={"dataset_id": dataset_id, "config": "cmcc34_qlora_system_prompt",
                                          "base_model": "tiny-glm4", "hyperparameters": {"lora_r": 8}})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["kind"] == "train"
    hp = job["hyperparameters"]
    assert (hp["lora_r"], hp["lora_alpha"], hp["lora_dropout"]) == (8, 64, 0.1)
    assert hp["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (hp["quantization"], hp["bnb_4bit_quant_type"], hp["bnb_4bit_use_double_quant"]) == ("4bit", "nf4", True)
    assert (hp["learning_rate"], hp["per_device_train_batch_size"]) == (2e-4, 4)
    assert (hp["max_input_length"], hp["max_output_length"], hp["save_steps"], hp["logging_steps"]) == (1024, 256, 500, 50)
    assert client.get(f"/jobs/{job['id']}").json()["id"] == job["id"]
    assert [e["kind"] for e in client.get(f"/jobs/{job['id']}/events").json()] == ["queued"]
    assert [j["id"] for j in client.get("/jobs").json()] == [job["id"]]


@pytest.mark.parametrize("body,status,field", [
    ({"hyperparameters": {"lora_r": 0}}, 422, "hyperparameters.lora_r"),
    ({"hyperparameters": {"learning_rate": -1}}, 422, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"no_such_knob": 1}}, 422, "hyperparameters.no_such_knob"),
    ({"config": "nope"}, 422, "config"),
    ({"base_model": "no-such-model"}, 422, "base_model"),
    ({"dataset_id": "ds_missing"}, 404, None),
])
def test_invalid_job_requests_name_the_field(client, sample_csv, body, status, field):
    payload = {"dataset_id": _dataset(client, sample_csv), **body}
    response = client.post("/jobs", json=payload)
    assert response.status_code == status, response.text
    if field:
        assert response.json()["detail"]["field"] == field
    assert client.get("/jobs").json() == []


def test_validation_dataset_with_unknown_labels_is_rejected(client, sample_csv):
    train = _dataset(client, sample_csv)
    other = upload(client, "text,label\n您好,外星人\n再见,火星\n".encode()).json()["id"]
    response = client.post("/jobs", json={"dataset_id": train, "validation_dataset_id": other})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "validation_dataset_id"


def test_cancel_queued_job_then_cancel_again_conflicts(client, sample_csv):
    job_id = client.post("/jobs", json={"dataset_id": _dataset(client, sample_csv)}).json()["id"]
    cancelled = client.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 409
    assert client.post("/jobs/job_nope/cancel").status_code == 404


def test_job_resources_are_stored_and_shown(client, sample_csv):
    dataset_id = _dataset(client, sample_csv)
    job = client.post("/jobs", json={"dataset_id": dataset_id, "resources": {"gpus": 2, "labels": ["gpu", "a100"]}})
    assert job.status_code == 201, job.text
    assert job.json()["resources"] == {"gpus": 2, "processes": None, "labels": ["gpu", "a100"]}
    plain = client.post("/jobs", json={"dataset_id": dataset_id}).json()
    assert plain["resources"] == {"gpus": None, "processes": None, "labels": []}


@pytest.mark.parametrize("resources,field", [
    ({"gpus": 0}, "resources.gpus"),
    ({"processes": 65}, "resources.processes"),
    ({"gpus": 1, "processes": 2}, "resources"),
    ({"labels": ["GPU"]}, "resources.labels[0]"),
    ({"labels": [f"l{i}" for i in range(9)]}, "resources.labels"),
    ({"cores": 4}, "resources.cores"),
])
def test_invalid_resources_name_the_field(client, sample_csv, resources, field):
    response = client.post("/jobs", json={"dataset_id": _dataset(client, sample_csv), "resources": resources})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == field
    assert client.get("/jobs").json() == []


def test_dataset_in_use_cannot_be_deleted(client, sample_csv):
    dataset_id = _dataset(client, sample_csv)
    client.post("/jobs", json={"dataset_id": dataset_id})
    assert client.delete(f"/datasets/{dataset_id}").status_code == 409


# --- claiming and recovery, on the database directly ----------------------------------------


def _insert_jobs(settings, n: int, **fields) -> list[str]:
    run_migrations(settings)
    ids = []
    with session_scope(settings) as session:
        dataset = Dataset(id=new_id("ds"), name="d", format="cmcc_csv", n_rows=1, label_set=[[0, "a"], [1, "b"]],
                          label_counts={}, stats={}, system_prompt="p", size_bytes=1)
        session.add(dataset)
        session.flush()
        for _ in range(n):
            job = Job(id=new_id("job"), kind="train", status=fields.get("status", "queued"), dataset_id=dataset.id,
                      hyperparameters={}, progress={}, worker_id=fields.get("worker_id"),
                      attempts=fields.get("attempts", 0), heartbeat_at=fields.get("heartbeat_at"),
                      required_labels=fields.get("required_labels", ""))
            session.add(job)
            ids.append(job.id)
    return ids


def _claim_until_empty(data_dir: str, database_url: str | None, out_path: str) -> None:
    from app.core.config import Settings

    settings = Settings(data_dir=data_dir, database_url=database_url)
    worker_id = queue.worker_identity()
    claimed = []
    while True:
        with session_scope(settings) as session:
            job = queue.claim_next_job(session, worker_id)
            if job is None:
                break
            claimed.append(job.id)
            queue.finish_job(session, job.id, "succeeded")
    with open(out_path, "w") as out:
        out.write("\n".join(claimed))


def test_two_workers_racing_run_each_job_once(settings, tmp_path):
    ids = _insert_jobs(settings, 40)
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"claims{i}.txt" for i in range(2)]
    workers = [ctx.Process(target=_claim_until_empty, args=(str(settings.data_dir), settings.database_url, str(o))) for o in outs]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    claims = [line for o in outs for line in o.read_text().splitlines() if line]
    assert sorted(claims) == sorted(ids), "every job claimed exactly once"
    with session_scope(settings) as session:
        jobs = session.query(Job).all()
        assert {j.status for j in jobs} == {"succeeded"} and {j.attempts for j in jobs} == {1}


def test_workers_claim_only_the_jobs_whose_labels_they_have(settings):
    plain, gpu, a100 = (_insert_jobs(settings, 1, required_labels=labels)[0] for labels in ("", "gpu", "a100,gpu"))

    def claim(labels: str):
        with session_scope(settings) as session:
            job = queue.claim_next_job(session, queue.worker_identity(), labels)
            return job.id if job else None

    assert claim("cpu") == plain  # a job without labels runs anywhere
    assert claim("cpu") is None  # the gpu jobs wait for a gpu worker
    assert claim("gpu") == gpu
    assert claim("gpu") is None  # the a100 job needs both labels
    assert claim("a100,gpu,fast") == a100


def test_job_of_a_dead_worker_is_requeued_then_failed_after_max_attempts(settings):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_worker = f"{os.uname().nodename}:{dead.pid}:deadbeef"
    requeue, give_up = _insert_jobs(settings, 1, status="running", worker_id=dead_worker, attempts=1,
                                    heartbeat_at=utcnow())[0], None
    give_up = _insert_jobs(settings, 1, status="running", worker_id=dead_worker, attempts=settings.max_job_attempts,
                           heartbeat_at=utcnow())[0]
    live = _insert_jobs(settings, 1, status="running", worker_id=f"{os.uname().nodename}:{os.getppid()}:alive",
                        attempts=1, heartbeat_at=utcnow())[0]
    stale = _insert_jobs(settings, 1, status="running", worker_id="elsewhere:1:x", attempts=1,
                         heartbeat_at=utcnow() - timedelta(seconds=settings.worker_stale_seconds + 5))[0]
    with session_scope(settings) as session:
        recovered = queue.recover_orphaned_jobs(session, settings)
    assert sorted(recovered) == sorted([requeue, give_up, stale])
    with session_scope(settings) as session:
        status = {j.id: (j.status, j.error_code) for j in session.query(Job).all()}
        kinds = {e.job_id: e.kind for e in session.query(JobEvent).all()}
        messages = {e.job_id: e.message for e in session.query(JobEvent).all()}
    assert status[requeue] == ("queued", None) and kinds[requeue] == "recovered"
    assert "its process is gone" in messages[requeue]
    assert status[stale] == ("queued", None) and "no heartbeat for" in messages[stale]
    assert status[give_up] == ("failed", "worker_lost")
    assert status[live] == ("running", None)


def test_an_evaluation_id_names_only_evaluation_jobs(client, sample_csv):
    dataset_id = upload(client, sample_csv).json()["id"]
    job_id = client.post("/jobs", json={"dataset_id": dataset_id}).json()["id"]
    response = client.get(f"/evaluations/{job_id}")
    assert response.status_code == 404
    assert f"'{job_id}' is a train job" in response.json()["detail"]["message"]
    assert client.get(f"/jobs/{job_id}").status_code == 200


def test_a_pid_counts_only_in_its_own_pid_namespace():
    """Two containers may share a host name, never a pid namespace: a worker in another one is judged by its
    heartbeat, even when its pid names no process here (it would be taken for dead and its job run twice)."""
    from tests.support import unshare_pid_prefix

    prefix = unshare_pid_prefix()
    if prefix is None:
        pytest.skip("unshare cannot make a pid namespace here")
    inner = subprocess.run([*prefix, sys.executable, "-c", "from app.services.queue import worker_identity; "
                            "print(worker_identity())"], capture_output=True, text=True, check=True).stdout.strip()
    host, _, rest = inner.split(":", 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert host.split("#")[0] == os.uname().nodename
    assert not queue.pid_dead_here(f"{host}:{dead.pid}:{rest}")  # a pid that exists only over there
    assert queue.pid_dead_here(f"{queue.host_key()}:{dead.pid}:{rest}")  # the same pid here: dead


def test_a_worker_refuses_worker_labels_that_are_not_labels(settings):
    env = {**os.environ, "DATA_DIR": str(settings.data_dir), "WORKER_LABELS": "gpu, A 100"}
    result = subprocess.run([sys.executable, "-m", "workers", "--once"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "WORKER_LABELS" in result.stderr and "'a 100'" in result.stderr

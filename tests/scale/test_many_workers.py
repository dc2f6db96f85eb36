"""Several worker processes share one PostgreSQL database and one DATA_DIR: 3 workers run 60 jobs, each exactly
once; a worker in a pid namespace of its own (as in another container, or on another host) killed with -9 is
found by its heartbeat, and another worker resumes its training from the checkpoint."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import upload
from tests.support import TERMINAL, make_datasets, start_worker, stop, unshare_pid_prefix, wait_for

pytestmark = pytest.mark.timeout(900)

N_WORKERS, N_JOBS = 3, 60


def _live_workers(client) -> list[dict]:
    return [w for w in client.get("/health").json()["workers"]["items"] if w["alive"]]


def test_three_workers_run_sixty_jobs_each_exactly_once(client, settings):
    """Evaluation jobs of the tiny base model on 4 dialogues: cheap, and each one is claimed, run and recorded
    through the same queue as training. Every job runs once (one claim, attempt 1) and every worker takes part."""
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    rows = to_cmcc_csv(generate_sample_dialogues(2, seed=21, labels=[0, 1])).encode()
    dataset_id = upload(client, rows, "two_labels.csv").json()["id"]
    workers = [start_worker(settings, WORKER_LABELS="cpu") for _ in range(N_WORKERS)]
    try:
        wait_for(lambda: len(_live_workers(client)) == N_WORKERS, 180, "three live workers")
        ids = []
        for _ in range(N_JOBS):
            response = client.post("/evaluations", json={"model": "tiny-glm4", "dataset_id": dataset_id})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        wait_for(lambda: all(client.get(f"/jobs/{i}").json()["status"] in TERMINAL for i in ids), 600,
                 "every job to end")
        assert all(w.poll() is None for w in workers)
    finally:
        for worker in workers:
            stop(worker)

    claimed_by = {}
    for job_id in ids:
        job = client.get(f"/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        started = [e for e in client.get(f"/jobs/{job_id}/events").json() if e["kind"] == "started"]
        assert len(started) == 1, started
        claimed_by[job_id] = started[0]["message"].split()[3]
    assert len(set(claimed_by.values())) == N_WORKERS, "every worker ran jobs"
    reports = client.get("/reports", params={"model_id": "tiny-glm4"}).json()
    assert sorted(r["job_id"] for r in reports) == sorted(ids)  # one report per job, none twice


def test_a_worker_killed_elsewhere_is_found_by_its_heartbeat_and_its_job_resumed(client, settings):
    """The first worker runs in a pid namespace of its own: the others cannot judge its pid, only its
    heartbeat. Killed with -9 after a checkpoint, its job is requeued once the heartbeat is WORKER_STALE_SECONDS
    old and resumed from that checkpoint by another worker."""
    from app.ml.train.trainer import checkpoint_step, latest_checkpoint

    prefix = unshare_pid_prefix()
    if prefix is None:
        pytest.skip("unshare cannot make a pid namespace here")
    train_id, _ = make_datasets(client, labels=4)
    max_steps = 60
    job_id = client.post("/jobs", json={"dataset_id": train_id, "config": "tiny_test",
                                        "hyperparameters": {"max_steps": max_steps, "save_steps": 5}}).json()["id"]
    checkpoints = settings.jobs_dir / job_id / "checkpoints"
    stale = {"WORKER_STALE_SECONDS": "4"}
    elsewhere = start_worker(settings, prefix=prefix, **stale)
    others = []
    try:
        wait_for(lambda: latest_checkpoint(checkpoints), 300, "a first complete checkpoint")
        others = [start_worker(settings, **stale) for _ in range(2)]
        wait_for(lambda: len(_live_workers(client)) == 3, 180, "the two other workers")
        first_worker = client.get(f"/jobs/{job_id}").json()
        elsewhere.send_signal(signal.SIGKILL)  # unshare --kill-child: the namespace and all in it die
        elsewhere.wait(30)
        killed_at = checkpoint_step(latest_checkpoint(checkpoints))
        if killed_at >= max_steps:
            pytest.skip("the job finished before its worker could be killed (machine too fast for this test)")
        job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in TERMINAL and j, 600,
                       "the job to be resumed and finish")
    finally:
        for worker in (elsewhere, *others):
            stop(worker)
    assert first_worker["status"] == "running"
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["progress"]["step"] == max_steps
    events = client.get(f"/jobs/{job_id}/events").json()
    recovered = [e["message"] for e in events if e["kind"] == "recovered"]
    assert len(recovered) == 1 and "no heartbeat for" in recovered[0], recovered
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] == killed_at
    started = [e["message"].split()[3] for e in events if e["kind"] == "started"]
    assert len(started) == 2 and started[0] != started[1]

"""Training in child processes of the worker, several under torchrun (DDP over gloo on this CPU): the same loss
trajectory as one process at the same global batch, cancel across ranks, resume after kill -9 of every process
of the run, and a training process that segfaults or is killed fails its job while the worker lives on."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support import TERMINAL, make_datasets, start_worker, stop, wait_for

pytestmark = pytest.mark.timeout(900)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _training_ranks(worker_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker's training processes (not the torchrun agent that starts them)."""
    ranks = {}
    for pid in _descendants(worker_pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "app.services.training_process" in args and "rank" in args and _alive(pid):
            ranks[int(_environ(pid).get("RANK", "0"))] = pid
    return ranks


def _job(client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()


def _ended(client, job_id: str, seconds: float = 300) -> dict:
    return wait_for(lambda: (j := _job(client, job_id))["status"] in TERMINAL and j, seconds, f"job {job_id} to end")


def _post(client, dataset_id: str, resources: dict, **hyperparameters) -> str:
    response = client.post("/jobs", json={"dataset_id": dataset_id, "config": "tiny_test", "resources": resources,
                                          "hyperparameters": hyperparameters})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _losses(settings, job_id: str) -> list[tuple[int, float]]:
    meta = json.loads((settings.jobs_dir / job_id / "adapter" / "intent_tuner.json").read_text(encoding="utf-8"))
    return [(entry["step"], entry["loss"]) for entry in meta["loss_history"]]


def test_two_gloo_processes_follow_the_one_process_loss_trajectory(client, settings):
    """Same global batch (4 = 1 x 4 = 2 x 2), same seed: the same losses step by step. Gradients not averaged
    over the ranks, or averaged with the wrong scale, make the two curves part within a few steps."""
    from workers.worker import Worker

    train_id, _ = make_datasets(client, per_label_train=4, labels=4)
    single = _post(client, train_id, {"processes": 1}, max_steps=8, per_device_train_batch_size=4, save_steps=100)
    double = _post(client, train_id, {"processes": 2}, max_steps=8, per_device_train_batch_size=2, save_steps=100)
    assert Worker(settings).run_forever(exit_when_idle=True) == 2

    for job_id in (single, double):
        assert _job(client, job_id)["status"] == "succeeded", _job(client, job_id)["error"]
    one, two = _losses(settings, single), _losses(settings, double)
    assert [step for step, _ in one] == [step for step, _ in two] == list(range(1, 9))
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-3)
    assert one[-1][1] < one[0][1]

    events = client.get(f"/jobs/{double}/events").json()
    kinds = [e["kind"] for e in events]
    assert kinds.count("model_loaded") == 1 and kinds.count("finished") == 1  # rank 0 alone reports
    launched = next(e for e in events if e["kind"] == "training_process")
    assert launched["data"] == {"processes": 2, "gpus": [], "backend": "gloo"}
    meta = json.loads((settings.jobs_dir / double / "adapter" / "intent_tuner.json").read_text(encoding="utf-8"))
    assert meta["metrics"]["processes"] == 2
    assert _job(client, double)["progress"]["step"] == 8


def test_two_processes_resume_after_kill_9_of_every_process_of_the_run(client, settings):
    """The worker and its torchrun processes (agent and ranks, each in a process group of its own) all get
    SIGKILL at once after a checkpoint; the next worker resumes from it, and the finished curve is the one of a run never
    interrupted."""
    from app.ml.train.trainer import checkpoint_step, latest_checkpoint
    from workers.worker import Worker

    train_id, _ = make_datasets(client, per_label_train=4, labels=4)
    max_steps = 24
    job_id = _post(client, train_id, {"processes": 2}, max_steps=max_steps, save_steps=4,
                   per_device_train_batch_size=2)
    checkpoints = settings.jobs_dir / job_id / "checkpoints"
    worker = start_worker(settings, new_session=True)  # its process group is its own to kill
    try:
        wait_for(lambda: latest_checkpoint(checkpoints), 300, "a first complete checkpoint")
        ranks = wait_for(lambda: len(r := _training_ranks(worker.pid)) == 2 and r, 60, "both ranks")
        processes = [worker.pid, *_descendants(worker.pid)]
        groups = {os.getpgid(pid) for pid in processes if _alive(pid)}
        assert os.getpgrp() not in groups  # the worker's, the torchrun agent's, each rank's (torchrun's setsid)
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        worker.wait(30)
        wait_for(lambda: not any(_alive(pid) for pid in processes), 30, "every process of the run to be gone")
    finally:
        stop(worker)
    killed_at = checkpoint_step(latest_checkpoint(checkpoints))
    assert sorted(ranks) == [0, 1]
    if killed_at >= max_steps:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    assert _job(client, job_id)["status"] == "running"  # nobody has noticed yet

    reference = _post(client, train_id, {"processes": 2}, max_steps=max_steps, save_steps=100,
                      per_device_train_batch_size=2)  # queued after: the resumed job is claimed first
    assert Worker(settings).run_forever(exit_when_idle=True) == 2
    job = _job(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["progress"]["step"] == max_steps
    events = client.get(f"/jobs/{job_id}/events").json()
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] == killed_at
    assert "its process is gone" in next(e["message"] for e in events if e["kind"] == "recovered")
    assert _job(client, reference)["status"] == "succeeded"
    resumed_curve, reference_curve = _losses(settings, job_id), _losses(settings, reference)
    assert [step for step, _ in resumed_curve] == list(range(1, max_steps + 1))
    assert [loss for _, loss in resumed_curve] == pytest.approx([loss for _, loss in reference_curve], rel=1e-3)


def test_one_worker_outlives_its_training_processes(client, settings):
    """One worker, one job after the other: a cancel reaches both ranks; a rank that segfaults and a process
    killed as by the OOM killer fail their jobs, naming the signal; the worker then trains the next job."""
    train_id, _ = make_datasets(client, labels=2)
    worker = start_worker(settings)
    try:
        started = lambda job_id: (_job(client, job_id)["progress"].get("step") or 0) >= 1  # noqa: E731

        cancelled = _post(client, train_id, {"processes": 2}, max_steps=5000, save_steps=3)
        wait_for(lambda: started(cancelled), 300, "the 2-process run to train")
        assert client.post(f"/jobs/{cancelled}/cancel").status_code == 200
        job = _ended(client, cancelled)
        assert job["status"] == "cancelled" and job["progress"]["step"] < 5000, job
        wait_for(lambda: not _training_ranks(worker.pid), 60, "the ranks to exit")

        segfault = _post(client, train_id, {"processes": 2}, max_steps=5000, save_steps=1000)
        wait_for(lambda: started(segfault), 300, "the next 2-process run to train")
        os.kill(_training_ranks(worker.pid)[1], signal.SIGSEGV)
        job = _ended(client, segfault)
        assert job["status"] == "failed" and job["error"]["code"] == "training_process_died", job
        assert "rank 1 of 2" in job["error"]["message"] and "SIGSEGV" in job["error"]["message"]

        killed = _post(client, train_id, {}, max_steps=5000, save_steps=1000)
        wait_for(lambda: started(killed), 300, "a 1-process run to train")
        os.kill(_training_ranks(worker.pid)[0], signal.SIGKILL)
        job = _ended(client, killed)
        assert job["status"] == "failed" and "SIGKILL" in job["error"]["message"], job
        assert "out of memory" in job["error"]["message"]

        after = _post(client, train_id, {}, max_steps=2)
        job = _ended(client, after)
        assert job["status"] == "succeeded", job["error"]
        assert worker.poll() is None
    finally:
        stop(worker)
    claimed_by = {e["message"].split()[3] for j in (cancelled, segfault, killed, after)
                  for e in client.get(f"/jobs/{j}/events").json() if e["kind"] == "started"}
    assert len(claimed_by) == 1  # one worker ran them all

"""How wide a training runs on a worker (resources → processes and GPUs), decided before anything is loaded."""

from __future__ import annotations

import pytest

from app.services.training_process import ProcessPlan, TrainingProcessError, plan_processes
from tests.conftest import upload


@pytest.mark.parametrize("resources,gpus,plan", [
    ({}, [], ProcessPlan(1)),
    ({"processes": 2}, [], ProcessPlan(2)),
    ({}, ["0", "1", "2"], ProcessPlan(3, ("0", "1", "2"))),  # default: every GPU the worker sees
    ({"gpus": 2}, ["3", "5", "7"], ProcessPlan(2, ("3", "5"))),
    ({"processes": 1}, ["0", "1"], ProcessPlan(1, ("0",))),
    (None, [], ProcessPlan(1)),
])
def test_a_job_gets_the_processes_it_asks_for(resources, gpus, plan):
    assert plan_processes(resources, gpus) == plan
    assert plan.backend == ("nccl" if plan.gpus else "gloo")


@pytest.mark.parametrize("resources,gpus", [({"gpus": 1}, []), ({"gpus": 4}, ["0", "1"]), ({"processes": 3}, ["0"])])
def test_more_gpus_than_the_worker_sees_is_refused(resources, gpus):
    with pytest.raises(TrainingProcessError) as raised:
        plan_processes(resources, gpus)
    assert raised.value.code == "insufficient_gpus" and "GPU" in str(raised.value)


def test_a_cpu_worker_fails_a_gpu_job_at_once_and_goes_on(client, settings, sample_csv):
    from workers.worker import Worker

    dataset_id = upload(client, sample_csv).json()["id"]
    gpu_job = client.post("/jobs", json={"dataset_id": dataset_id, "resources": {"gpus": 2}}).json()["id"]
    settings.device = "cpu"
    assert Worker(settings).run_forever(exit_when_idle=True) == 1
    job = client.get(f"/jobs/{gpu_job}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "insufficient_gpus"
    assert "asks for 2 GPUs; this worker has none" in job["error"]["message"]
    kinds = [e["kind"] for e in client.get(f"/jobs/{gpu_job}/events").json()]
    assert "base_model" not in kinds and "training_process" not in kinds  # refused before any work

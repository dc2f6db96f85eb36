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


def test_workers_that_see_the_same_gpus_each_take_their_own(tmp_path):
    """WORKER_GPUS: replicas that all see every GPU of a host lock different ones (locks named by GPU UUID)."""
    from app.services.gpu_reservation import reserve_gpus

    host = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
    first, first_locks = reserve_gpus(tmp_path, 1, host)
    second, second_locks = reserve_gpus(tmp_path, 2, host)
    assert first == ["GPU-aaaa"] and second == ["GPU-bbbb", "GPU-cccc"]
    with pytest.raises(RuntimeError, match="only 0 of the 3 GPUs"):
        reserve_gpus(tmp_path, 1, host)
    for lock in first_locks:
        lock.release()  # a worker that exits (or is killed) frees its GPU for the next one
    assert reserve_gpus(tmp_path, 1, host)[0] == ["GPU-aaaa"]


def test_a_deepspeed_config_must_be_one_of_the_project_and_installed(client, sample_csv, tmp_path):
    """hyperparameters.deepspeed names a file of configs/deepspeed/ (422 otherwise); a worker without the
    deepspeed package refuses it before loading the model (DeepSpeed itself is not installed here)."""
    from app.data.formats import Record
    from app.domain.prompt import LabelSet
    from app.ml.train.config import TrainingConfig
    from app.ml.train.trainer import train_adapter

    dataset_id = upload(client, sample_csv).json()["id"]
    refused = client.post("/jobs", json={"dataset_id": dataset_id, "hyperparameters": {"deepspeed": "zero9"}})
    assert refused.status_code == 422 and refused.json()["detail"]["field"] == "hyperparameters.deepspeed"
    assert "zero2" in refused.json()["detail"]["message"]
    accepted = client.post("/jobs", json={"dataset_id": dataset_id, "hyperparameters": {"deepspeed": "zero3"}})
    assert accepted.status_code == 201 and accepted.json()["hyperparameters"]["deepspeed"] == "zero3"

    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    with pytest.raises(ValueError, match="pip install deepspeed"):
        train_adapter(base_model_dir=tmp_path / "not-loaded", base_model_name="x", records=[Record("d", 0)],
                      label_set=LabelSet.from_pairs([(0, "a")]), system_prompt="p",
                      config=TrainingConfig(deepspeed="zero2"), job_dir=tmp_path / "job")


@pytest.mark.parametrize("peer", [
    {"exitcode": -15, "report": None},  # torchrun stopped rank 0 first
    {"exitcode": 1, "report": {"code": "training_crashed", "message": "RuntimeError: [gloo] Connection closed"}},
])
def test_the_rank_that_died_is_named_not_the_peer_it_took_down(tmp_path, peer):
    """Rank 1 segfaults; rank 0 is either stopped by torchrun or fails in its next collective first (a race):
    the job's error names rank 1 and its signal either way."""
    import json

    from app.services.training_process import FAILURES_FILENAME, _failure

    if peer["report"]:
        (tmp_path / "error-rank0.json").write_text(json.dumps(peer["report"]))
    (tmp_path / FAILURES_FILENAME).write_text(json.dumps([{"rank": 0, "pid": 10, "exitcode": peer["exitcode"]},
                                                          {"rank": 1, "pid": 11, "exitcode": -11}]))
    error = _failure(tmp_path, 1, ProcessPlan(2))
    assert error.code == "training_process_died"
    assert str(error) == "training process rank 1 of 2 (pid 11) was killed by SIGSEGV (exit code -11); rank 0 ended with it"


def test_a_rank_that_says_why_it_failed_is_believed(tmp_path):
    import json

    from app.services.training_process import FAILURES_FILENAME, _failure

    (tmp_path / "error-rank0.json").write_text(json.dumps({"code": "training_crashed", "message": "collective"}))
    (tmp_path / "error-rank1.json").write_text(json.dumps({"code": "out_of_memory", "message": "CUDA out of memory"}))
    (tmp_path / FAILURES_FILENAME).write_text(json.dumps([{"rank": 1, "pid": 11, "exitcode": 1},
                                                          {"rank": 0, "pid": 10, "exitcode": 1}]))
    error = _failure(tmp_path, 1, ProcessPlan(2))
    assert (error.code, str(error)) == ("out_of_memory", "CUDA out of memory")

"""Through the API and a real worker: train on the tiny GLM-4, cancel mid-run, kill -9 and resume, report, classify."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import upload
from tests.support import make_datasets, start_worker, stop, wait_for

pytestmark = pytest.mark.timeout(600)


def _checkpoints(settings, job_id) -> list[int]:
    folder = settings.data_dir / "jobs" / job_id / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")) if folder.exists() else []


def test_training_job_end_to_end_in_process_worker(client, settings):
    from workers.worker import Worker

    train_id, val_id = make_datasets(client)
    job = client.post("/jobs", json={"dataset_id": train_id, "validation_dataset_id": val_id,
                                     "base_model": "tiny-glm4", "config": "tiny_test",
                                     "hyperparameters": {"max_steps": 24, "save_steps": 8}}).json()
    assert Worker(settings).run_forever(exit_when_idle=True) == 1

    job = client.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == 24 and job["progress"]["max_steps"] == 24
    assert job["model_id"] and job["report_id"]
    kinds = [e["kind"] for e in client.get(f"/jobs/{job['id']}/events").json()]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded"
    assert "model_registered" in kinds and "report" in kinds

    model = client.get(f"/models/{job['model_id']}").json()
    assert model["base_model"] == "tiny-glm4" and len(model["labels"]) == 8
    adapter_dir = settings.data_dir / "jobs" / job["id"] / "adapter"
    meta = json.loads((adapter_dir / "intent_tuner.json").read_text(encoding="utf-8"))
    # loss falls: compare the first and last logged losses of the run
    losses = [entry["loss"] for entry in meta["loss_history"] if "loss" in entry]
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    # the model is registered: its checkpoints could only be resumed from by a job that is over
    assert _checkpoints(settings, job["id"]) == [] and not (adapter_dir.parent / "checkpoints").exists()
    assert meta["label_set"] == [[lab["id"], lab["name"]] for lab in model["labels"]]
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert client.get(model["loss_curve_url"]).headers["content-type"] == "image/png"
    listed = client.get("/models").json()
    assert [a["id"] for a in listed["adapters"]] == [job["model_id"]]
    assert any(b["name"] == "tiny-glm4" for b in listed["base_models"])

    report = client.get(f"/reports/{job['report_id']}").json()
    metrics = report["metrics"]
    assert metrics["n_samples"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    assert len(metrics["per_class"]) == 8 and metrics["success_rate"] == 1.0
    png = client.get(f"/reports/{job['report_id']}/confusion_matrix.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(client.get(f"/reports/{job['report_id']}/errors").json(), list)
    assert client.get(f"/reports/{job['report_id']}/failed").json() == []
    for name in ("failed_predictions.json", "error_predictions.json", "detailed_analysis.json", "confusion_matrix.png"):
        assert (settings.reports_dir / job["report_id"] / name).is_file()

    answer = client.post("/classify", json={"model": job["model_id"], "texts": ["您好请讲[SEP]我要开通流量包",
                                                                              "您好[SEP]帮我取消彩铃"]})
    assert answer.status_code == 200, answer.text
    label_ids = {lab["id"] for lab in model["labels"]}
    for prediction in answer.json()["predictions"]:
        assert prediction["intent_id"] in label_ids and prediction["parsed"]
        assert 0 < prediction["confidence"] <= 1 and len(prediction["top_k"]) == 5


def test_4bit_qlora_job_on_cpu_through_the_api(client, settings):
    """quantization "4bit" on a CPU: bitsandbytes NF4 base, LoRA on top; the job and model record it."""
    from workers.worker import Worker

    train_id, val_id = make_datasets(client, per_label_train=2, labels=4)
    job = client.post("/jobs", json={"dataset_id": train_id, "validation_dataset_id": val_id,
                                     "base_model": "tiny-glm4", "config": "tiny_test",
                                     "hyperparameters": {"quantization": "4bit", "max_steps": 3, "save_steps": 2,
                                                         "logging_steps": 1}}).json()
    assert Worker(settings).run_forever(exit_when_idle=True) == 1

    job = client.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    listed = client.get(f"/jobs/{job['id']}/events").json()
    events = {e["kind"]: e for e in listed}
    assert events["model_loaded"]["data"]["quantization"] == "4bit"
    assert [e["data"]["step"] for e in listed if e["kind"] == "checkpoint_saved"] == [2, 3]
    model = client.get(f"/models/{job['model_id']}").json()
    assert model["quantization"] == "4bit"
    assert client.get(f"/reports/{job['report_id']}").json()["metrics"]["success_rate"] == 1.0


def test_linear_head_job_through_the_api(client, settings):
    """head "linear": features from the frozen base, a logistic regression, served by /classify in score mode;
    the model row says so, generation is refused up front, the report has its baseline."""
    from workers.worker import Worker

    train_id, val_id = make_datasets(client, per_label_train=4, labels=4)
    refused = client.post("/jobs", json={"dataset_id": train_id, "base_model": "tiny-glm4", "config": "tiny_test",
                                         "hyperparameters": {"head": "linear"}, "resources": {"processes": 2}})
    assert refused.status_code == 422 and refused.json()["detail"]["field"] == "resources"
    job = client.post("/jobs", json={"dataset_id": train_id, "validation_dataset_id": val_id,
                                     "base_model": "tiny-glm4", "config": "tiny_test",
                                     "hyperparameters": {"head": "linear", "eval_every_steps": 1}}).json()
    assert Worker(settings).run_forever(exit_when_idle=True) == 1

    job = client.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    progress = job["progress"]
    assert progress["phase"] == "validation set" and progress["features_done"] == progress["features_total"] == 4
    events = client.get(f"/jobs/{job['id']}/events").json()
    kinds = [e["kind"] for e in events]
    assert "features" in kinds and "validation" in kinds and kinds[-1] == "succeeded"
    model = client.get(f"/models/{job['model_id']}").json()
    assert model["head"] == "linear" and model["metrics"]["head"] == "linear"
    report = client.get(f"/reports/{job['report_id']}").json()
    assert report["metrics"]["n_samples"] == 4 and "baseline" in report["metrics"]

    answer = client.post("/classify", json={"model": job["model_id"], "texts": ["您好请讲[SEP]我要开通流量包"],
                                            "top_k": 4})
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["predictions"][0]
    assert prediction["intent_id"] == prediction["top_k"][0]["intent_id"]
    assert {t["intent_id"] for t in prediction["top_k"]} == {lab["id"] for lab in model["labels"]}
    assert sum(t["score"] for t in prediction["top_k"]) == pytest.approx(1.0, abs=1e-5)  # the head's softmax
    generated = client.post("/classify", json={"model": job["model_id"], "texts": ["取消"], "mode": "generate"})
    assert generated.status_code == 422 and "score mode only" in generated.json()["detail"]["message"]
    evaluation = client.post("/evaluations", json={"model": job["model_id"], "dataset_id": val_id, "mode": "generate"})
    assert evaluation.status_code == 422 and evaluation.json()["detail"]["field"] == "mode"

    # A deployment that serves through vLLM cannot run a linear head: such jobs are refused at once.
    from app.services.jobs import check_backend_serves
    from app.services.errors import UnprocessableError

    with pytest.raises(UnprocessableError, match="in-process only"):
        check_backend_serves(settings.model_copy(update={"inference_backend": "vllm"}), "linear", field="model")
    check_backend_serves(settings, "linear", field="model")  # the in-process default serves it


def _legacy_jsonl(per_label: int, labels: int) -> bytes:
    """The old upstream format: instruction template pasted into each user message, 2 messages."""
    from app.domain.cmcc34 import CMCC34_LABELS
    from app.data.sample import generate_sample_dialogues
    from app.domain.prompt import format_answer

    template = "你是客服意图识别专家。分析对话内容，判断用户最终意图。\n输出格式：意图：[选择最合适的意图]\n\n对话："
    lines = [json.dumps({"messages": [{"role": "user", "content": template + row.dialogue},
                                      {"role": "assistant", "content": format_answer(row.label_id,
                                                                                     CMCC34_LABELS[row.label_id])}]},
                        ensure_ascii=False)
             for row in generate_sample_dialogues(per_label, seed=13, labels=list(range(labels)))]
    return "\n".join(lines).encode()


def test_evaluation_job_on_legacy_dataset_and_generate_mode_count_unparseable(client, settings):
    from workers.worker import Worker

    train_id, _ = make_datasets(client, labels=4)
    legacy = upload(client, _legacy_jsonl(1, 4), "legacy.jsonl").json()
    assert legacy["chat_style"] == "legacy_template"
    val_id = legacy["id"]
    job = client.post("/jobs", json={"dataset_id": train_id, "base_model": "tiny-glm4", "config": "tiny_test",
                                     "hyperparameters": {"max_steps": 4}}).json()
    Worker(settings).run_forever(exit_when_idle=True)
    model_id = client.get(f"/jobs/{job['id']}").json()["model_id"]
    evaluation = client.post("/evaluations", json={"model": model_id, "dataset_id": val_id, "mode": "generate"})
    assert evaluation.status_code == 201, evaluation.text
    Worker(settings).run_forever(exit_when_idle=True)
    done = client.get(f"/evaluations/{evaluation.json()['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    metrics = client.get(f"/reports/{done['report_id']}").json()["metrics"]
    assert metrics["mode"] == "generate" and metrics["n_samples"] == 4
    failed = client.get(f"/reports/{done['report_id']}/failed").json()
    assert metrics["n_failed"] == len(failed)
    assert metrics["success_rate"] == pytest.approx(1 - len(failed) / 4)
    assert [r["id"] for r in client.get("/reports", params={"model_id": model_id}).json()] == [done["report_id"]]


def test_cancel_a_running_job_keeps_its_checkpoint(client, settings):
    train_id, _ = make_datasets(client)
    job_id = client.post("/jobs", json={"dataset_id": train_id, "base_model": "tiny-glm4", "config": "tiny_test",
                                        "hyperparameters": {"max_steps": 5000, "save_steps": 5}}).json()["id"]
    worker = start_worker(settings)
    try:
        wait_for(lambda: _checkpoints(settings, job_id), 300, "a first checkpoint")
        assert client.post(f"/jobs/{job_id}/cancel").json()["cancel_requested"]
        job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] != "running" and j, 120,
                    "the job to stop")
    finally:
        stop(worker)
    assert job["status"] == "cancelled" and job["model_id"] is None
    assert job["progress"]["step"] < 5000
    assert _checkpoints(settings, job_id)
    assert not (settings.data_dir / "jobs" / job_id / "adapter").exists()
    kinds = [e["kind"] for e in client.get(f"/jobs/{job_id}/events").json()]
    assert "cancel_requested" in kinds and kinds[-1] == "cancelled"


def test_worker_killed_mid_job_resumes_from_checkpoint(client, settings):
    from app.ml.train.trainer import checkpoint_step, latest_checkpoint

    train_id, _ = make_datasets(client)
    max_steps, save_steps = 60, 10
    job_id = client.post("/jobs", json={"dataset_id": train_id, "base_model": "tiny-glm4", "config": "tiny_test",
                                        "hyperparameters": {"max_steps": max_steps, "save_steps": save_steps}}).json()["id"]
    checkpoints = settings.data_dir / "jobs" / job_id / "checkpoints"
    first = start_worker(settings)
    try:
        # A complete checkpoint: killed while writing its first one, the job would rightly start over.
        wait_for(lambda: latest_checkpoint(checkpoints), 300, "a first complete checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        stop(first)
    killed_at = checkpoint_step(latest_checkpoint(checkpoints))
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"  # nobody has noticed yet
    if killed_at >= max_steps:
        pytest.skip("the worker finished before it could be killed (machine too fast for this test)")

    second = start_worker(settings)
    try:
        job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in
                    ("succeeded", "failed", "cancelled") and j, 300, "the resumed job to finish")
    finally:
        stop(second)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["progress"]["step"] == max_steps
    events = client.get(f"/jobs/{job_id}/events").json()
    kinds = [e["kind"] for e in events]
    assert "recovered" in kinds
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert resumed and str(killed_at) in resumed[0]["message"]
    # the resumed run trained only the remaining steps: after it resumed, checkpoints were saved at every
    # save_steps past the one it was killed after, and at no step before (a run from step 0 would save 10, 20...)
    after = events[events.index(resumed[0]):]
    saved = [e["data"]["step"] for e in after if e["kind"] == "checkpoint_saved"]
    assert saved == list(range(killed_at + save_steps, max_steps + 1, save_steps))
    assert Path(settings.data_dir / "jobs" / job_id / "adapter" / "adapter_model.safetensors").is_file()

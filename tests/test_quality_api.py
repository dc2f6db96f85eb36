"""Through the API and a real worker on the tiny GLM-4: class_balance and validation during training are job
options (validated, recorded), and every report of a fine-tuned model carries the TF-IDF baseline's lift and,
in score mode, its calibration."""

from __future__ import annotations

import pytest

from tests.support import make_datasets

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("hyperparameters,validation,field", [
    ({"class_balance": "oversample"}, True, "hyperparameters.class_balance"),
    ({"eval_every_steps": -1}, True, "hyperparameters.eval_every_steps"),
    ({"eval_max_samples": 0}, True, "hyperparameters.eval_max_samples"),
    ({"early_stopping_patience": -2}, True, "hyperparameters.early_stopping_patience"),
    ({"eval_every_steps": 5}, False, "hyperparameters.eval_every_steps"),  # nothing to evaluate on
    ({"early_stopping_patience": 2}, True, "hyperparameters.early_stopping_patience"),  # no evaluations to count
])
def test_invalid_quality_options_are_a_422_naming_the_field(client, hyperparameters, validation, field):
    train_id, val_id = make_datasets(client, per_label_train=1, labels=2)
    body = {"dataset_id": train_id, "base_model": "tiny-glm4", "config": "tiny_test",
            "hyperparameters": hyperparameters}
    if validation:
        body["validation_dataset_id"] = val_id
    response = client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == field
    assert client.get("/jobs").json() == []


def test_training_job_with_quality_options_reports_baseline_lift_calibration_and_validation(client, settings):
    from workers.worker import Worker

    train_id, val_id = make_datasets(client, per_label_train=3, per_label_val=2, labels=4)
    job = client.post("/jobs", json={
        "dataset_id": train_id, "validation_dataset_id": val_id, "base_model": "tiny-glm4", "config": "tiny_test",
        "hyperparameters": {"max_steps": 8, "save_steps": 4, "class_balance": "sqrt", "eval_every_steps": 4,
                            "eval_max_samples": 5},
    })
    assert job.status_code == 201, job.text
    job = job.json()
    hp = job["hyperparameters"]  # recorded in the job
    assert (hp["class_balance"], hp["eval_every_steps"], hp["eval_max_samples"], hp["early_stopping_patience"]) == \
        ("sqrt", 4, 5, 0)
    assert Worker(settings).run_forever(exit_when_idle=True) == 1
    job = client.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]

    events = client.get(f"/jobs/{job['id']}/events").json()
    kinds = [e["kind"] for e in events]
    validations = [e["data"] for e in events if e["kind"] == "validation"]
    assert [v["step"] for v in validations] == [4, 8] and all(v["n_samples"] == 5 for v in validations)
    assert "class_balance" in kinds and "best_checkpoint" in kinds and "baseline" in kinds
    best = next(e["data"] for e in events if e["kind"] == "best_checkpoint")
    f1s = [v["macro_f1"] for v in validations]
    assert best["step"] == validations[f1s.index(max(f1s))]["step"]

    model = client.get(f"/models/{job['model_id']}").json()
    assert model["metrics"]["best_step"] == best["step"] and model["metrics"]["class_balance"] == "sqrt"
    history = client.get(f"/models/{job['model_id']}/loss_history").json()
    assert [v["step"] for v in history["validation"]] == [4, 8] and history["best_step"] == best["step"]
    assert [v["macro_f1"] for v in history["validation"]] == f1s

    # The report: the model and the baseline on the same 8 validation rows, side by side.
    listed = client.get("/reports").json()
    assert [r["id"] for r in listed] == [job["report_id"]]
    summary = listed[0]["summary"]
    report = client.get(f"/reports/{job['report_id']}").json()
    metrics = report["metrics"]
    baseline = metrics["baseline"]
    assert baseline["train_dataset_id"] == train_id and baseline["n_train"] == 12 and baseline["n_samples"] == 8
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        assert metrics["lift"][name] == pytest.approx(metrics[name] - baseline[name])
        assert summary["lift"][name] == pytest.approx(metrics["lift"][name])
    assert summary["baseline"]["accuracy"] == baseline["accuracy"]
    # The baseline is really trained on the training rows: the keyword dialogues are easy for it.
    assert baseline["accuracy"] >= 0.5

    # Score mode: calibration, and the reliability diagram among the report's files.
    assert metrics["ece"] == pytest.approx(metrics["calibration"]["ece"]) and 0 <= metrics["ece"] <= 1
    assert sum(b["count"] for b in metrics["calibration"]["bins"]) == 8
    assert "reliability_diagram.png" in metrics["files"] and summary["ece"] == metrics["ece"]
    url = listed[0]["reliability_diagram_url"]
    assert url == f"/reports/{job['report_id']}/reliability_diagram.png"
    png = client.get(url)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    # An evaluation job of the registered model gets the baseline of its training dataset as well.
    evaluation = client.post("/evaluations", json={"model": job["model_id"], "dataset_id": val_id, "mode": "generate"})
    assert evaluation.status_code in (200, 201, 202), evaluation.text
    assert Worker(settings).run_forever(exit_when_idle=True) == 1
    generated = next(r for r in client.get("/reports").json() if r["id"] != job["report_id"])
    assert generated["summary"]["baseline"]["train_dataset_id"] == train_id
    assert generated["summary"]["baseline"]["accuracy"] == pytest.approx(baseline["accuracy"])  # same rows, same fit
    assert generated["summary"]["ece"] is None and generated["reliability_diagram_url"] is None
    assert client.get(f"/reports/{generated['id']}/reliability_diagram.png").status_code == 404

"""What the database stores survives a re-read and a move: UTC-aware times, paths relative to DATA_DIR, and a
model's serving settings in its row."""

from __future__ import annotations

import shutil
from datetime import timezone

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import session_scope
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.main import create_app
from app.ml.eval.files import write_report
from app.ml.eval.metrics import build_report
from app.ml.eval.plots import plot_loss_curve
from app.models import FineTunedModel, Job, Report
from app.services import reports as report_service
from app.services.models import register_adapter, resolve_model_ref
from tests.conftest import upload

LABELS = LabelSet.from_pairs([(0, "办理取消"), (1, "办理开通")])


def test_timestamps_come_back_utc_aware_from_a_fresh_session(client, settings, sample_csv):
    created = client.post("/jobs", json={"dataset_id": upload(client, sample_csv).json()["id"]}).json()
    read = client.get(f"/jobs/{created['id']}").json()
    assert read["created_at"] == created["created_at"] and read["created_at"].endswith(("+00:00", "Z"))
    with session_scope(settings) as session:
        job = session.get(Job, created["id"])
        assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timezone.utc.utcoffset(None)


def _adapter_and_report(settings: Settings) -> tuple[str, str]:
    adapter_dir = settings.jobs_dir / "job_moved" / "adapter"
    adapter_dir.mkdir(parents=True)
    plot_loss_curve([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], adapter_dir / "loss_curve.png")
    report = build_report(y_true=[0, 1], y_pred=[0, 0], label_set=LABELS, texts=["a", "b"], raw_outputs=None,
                          elapsed_seconds=1.0, mode="score", confidences=[0.9, 0.6])
    with session_scope(settings) as session:
        model = register_adapter(session, settings, base_model="tiny-glm4", adapter_dir=adapter_dir,
                                 label_set=LABELS.to_pairs(), system_prompt=build_system_prompt(LABELS),
                                 quantization="4bit", max_input_length=96)
        report_id, report_dir = report_service.new_report_dir(settings)
        write_report(report, report_dir)
        report_service.record_report(session, settings, report_id=report_id, report_dir=report_dir, report=report,
                                     model_id=model.id, dataset_id="ds_x", job_id=None)
        return model.id, report_id


def test_paths_are_stored_relative_so_a_moved_data_dir_keeps_working(tmp_path):
    before = Settings(data_dir=tmp_path / "before" / "data")
    with TestClient(create_app(before)):
        model_id, report_id = _adapter_and_report(before)
    with session_scope(before) as session:
        assert session.get(FineTunedModel, model_id).adapter_path == "jobs/job_moved/adapter"
        assert session.get(Report, report_id).path == f"reports/{report_id}"

    after = Settings(data_dir=tmp_path / "after" / "data")
    shutil.move(str(before.data_dir), str(after.data_dir))
    with TestClient(create_app(after)) as client:
        assert client.get(f"/models/{model_id}/loss_curve.png").headers["content-type"] == "image/png"
        assert client.get(f"/reports/{report_id}/confusion_matrix.png").status_code == 200
        assert client.get(f"/reports/{report_id}").json()["metrics"]["n_samples"] == 2
        assert client.get(f"/reports/{report_id}/errors").json()[0]["true_label"] == "办理开通"


def test_a_model_is_served_with_the_settings_of_its_row(client, settings):
    model_id, _ = _adapter_and_report(settings)
    with session_scope(settings) as session:
        ref = resolve_model_ref(session, settings, model_id)
    # trained 4-bit with dialogues cut at 96 tokens: served on a 4-bit base with the same cut
    assert (ref.quantization, ref.max_input_length) == ("4bit", 96)
    listed = client.get(f"/models/{model_id}").json()
    assert (listed["quantization"], listed["max_input_length"]) == ("4bit", 96)

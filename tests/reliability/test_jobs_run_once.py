"""No job runs twice: a finished training is never redone, a job handed to another worker records nothing
from the first, one model and one report per job, and a failed job leaves no model (issue 9, items 2 and 5)."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta

import pytest

from app.core.db import run_migrations, session_scope
from app.data.sample import generate_sample_dialogues
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.domain.records import Record
from app.models import Dataset, FineTunedModel, Job, JobEvent, new_id, utcnow
from app.services import queue
from tests.support import make_datasets

pytestmark = pytest.mark.timeout(600)

LABELS = LabelSet.from_pairs([(i, f"意图{i}") for i in range(4)])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from app.ml.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-glm4"))


def _train(tiny_model, job_dir, events: list, **overrides):
    from app.ml.train.config import resolve_training_config
    from app.ml.train.trainer import TrainingHooks, train_adapter

    rows = generate_sample_dialogues(per_label=6, seed=5, labels=list(range(4)))  # 24 rows: 6 batches of 4
    config, _ = resolve_training_config("tiny_test", {"max_steps": 5, "save_steps": 5, "logging_steps": 1,
                                                      **overrides})
    return train_adapter(base_model_dir=tiny_model, base_model_name="tiny-glm4",
                         records=[Record(r.dialogue, r.label_id) for r in rows], label_set=LABELS,
                         system_prompt=build_system_prompt(LABELS), config=config, job_dir=job_dir,
                         hooks=TrainingHooks(on_event=lambda kind, message, data: events.append((kind, data))))


def test_a_finished_training_is_not_trained_again(tiny_model, tmp_path):
    first = _train(tiny_model, tmp_path, [])
    assert first.steps == 5 and not first.cancelled
    weights = (first.adapter_dir / "adapter_model.safetensors").read_bytes()

    events: list = []
    again = _train(tiny_model, tmp_path, events)
    assert [kind for kind, _ in events] == ["training_done"]  # no model loaded, no step run
    assert again.adapter_dir == first.adapter_dir and again.steps == 5
    assert again.final_loss == first.final_loss and again.loss_history == first.loss_history
    assert (again.adapter_dir / "adapter_model.safetensors").read_bytes() == weights
    assert not list(tmp_path.glob(".*partial*"))


def test_killed_after_the_last_checkpoint_the_adapter_is_written_without_another_step(tiny_model, tmp_path):
    """max_steps 5 stops mid-epoch (6 batches): resumed, Trainer.train would run a sixth step."""
    first = _train(tiny_model, tmp_path, [])
    checkpoint = tmp_path / "checkpoints" / "checkpoint-5"
    shutil.rmtree(first.adapter_dir)  # the worker died after the final checkpoint, before the adapter

    events: list = []
    resumed = _train(tiny_model, tmp_path, events)
    assert resumed.steps == 5 and resumed.metrics["global_step"] == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-5"]
    assert "checkpoint_saved" not in [kind for kind, _ in events]
    assert (resumed.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (checkpoint / "adapter_model.safetensors").read_bytes()
    meta = json.loads((resumed.adapter_dir / "intent_tuner.json").read_text(encoding="utf-8"))
    assert meta["metrics"]["global_step"] == 5 and len(meta["loss_history"]) == 5


def _running_job(settings, worker_id: str, **fields) -> str:
    run_migrations(settings)
    with session_scope(settings) as session:
        dataset = Dataset(id=new_id("ds"), name="d", format="cmcc_csv", n_rows=1, label_set=[[0, "a"]],
                          label_counts={}, stats={}, system_prompt="p", size_bytes=1)
        session.add(dataset)
        session.flush()
        job = Job(id=new_id("job"), kind="train", status="running", dataset_id=dataset.id, base_model="tiny-glm4",
                  hyperparameters={}, progress={}, worker_id=worker_id, attempts=1, heartbeat_at=utcnow(), **fields)
        session.add(job)
        return job.id


def test_a_job_handed_to_another_worker_keeps_nothing_from_the_first(settings):
    """The first worker's heartbeat went stale (not dead: stuck); the job went to a second worker. The first
    one learns it lost the job and its late result is dropped: the job does not run twice."""
    job_id = _running_job(settings, "elsewhere:1:first")
    with session_scope(settings) as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=settings.worker_stale_seconds + 1)
    with session_scope(settings) as session:
        assert queue.recover_orphaned_jobs(session, settings) == [job_id]
        assert queue.claim_next_job(session, "elsewhere:2:second").id == job_id

    model = dict(base_model="tiny-glm4", adapter_dir=settings.jobs_dir / job_id / "adapter", label_set=[[0, "a"]],
                 system_prompt="p", quantization="none", max_input_length=None, metrics={})
    with session_scope(settings) as session:
        assert queue.heartbeat(session, job_id, "elsewhere:1:first") is True  # stop: not yours any more
        assert queue.complete_job(session, settings, job_id, "elsewhere:1:first", model=model) is False
        assert queue.finish_job(session, job_id, "failed", worker_id="elsewhere:1:first",
                                      error_code="x", error_message="late") is False
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.worker_id, job.model_id) == ("running", "elsewhere:2:second", None)
        assert session.query(FineTunedModel).count() == 0
        assert queue.heartbeat(session, job_id, "elsewhere:2:second") is False
        assert queue.complete_job(session, settings, job_id, "elsewhere:2:second", model=model) is True
        assert queue.complete_job(session, settings, job_id, "elsewhere:2:second", model=model) is False
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        models = session.query(FineTunedModel).all()
        assert job.status == "succeeded" and [m.id for m in models] == [job.model_id]
        assert [e.kind for e in session.query(JobEvent).filter_by(job_id=job_id)][-2:] == ["model_registered",
                                                                                          "succeeded"]


def test_a_job_whose_evaluation_fails_leaves_no_model(client, settings):
    from workers.worker import Worker

    train_id, val_id = make_datasets(client, labels=4)
    job_id = client.post("/jobs", json={"dataset_id": train_id, "validation_dataset_id": val_id,
                                        "config": "tiny_test", "hyperparameters": {"max_steps": 2}}).json()["id"]
    (settings.datasets_dir / val_id / "records.jsonl").write_text("not json\n", encoding="utf-8")  # a broken disk
    assert Worker(settings).run_forever(exit_when_idle=True) == 1

    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["model_id"] is None and job["report_id"] is None
    assert client.get("/models").json()["adapters"] == []
    assert "model_registered" not in [e["kind"] for e in client.get(f"/jobs/{job_id}/events").json()]


def test_upgrade_keeps_one_model_per_job_from_a_database_that_has_two(settings, tmp_path):
    """Databases written before the fix may hold two models of one job: the oldest keeps the link."""
    from datetime import datetime, timezone

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from app.core.config import PROJECT_ROOT

    settings.data_dir.mkdir(parents=True)
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.sqlalchemy_url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "0001")
    day = lambda n: datetime(2026, 11, n, tzinfo=timezone.utc)  # noqa: E731
    engine = create_engine(settings.sqlalchemy_url)
    with engine.begin() as db:
        db.execute(text("INSERT INTO datasets VALUES ('ds_1','d',NULL,'cmcc_csv',NULL,1,'[]','{}','{}','p',1,:at)"),
                   {"at": day(1)})
        db.execute(text("INSERT INTO jobs (id, kind, status, dataset_id, hyperparameters, params, progress, "
                        "cancel_requested, attempts, created_at) VALUES ('job_1','train','succeeded','ds_1','{}','{}',"
                        "'{}',:no,2,:at)"), {"no": False, "at": day(1)})
        for model_id, created in (("ft_new", day(2)), ("ft_old", day(1))):
            db.execute(text("INSERT INTO models VALUES (:id, 'm', 'tiny-glm4', 'job_1', 'ds_1', '/a', '[]', 'p', "
                            "'none', '{}', :at)"), {"id": model_id, "at": created})
    engine.dispose()

    run_migrations(settings)
    with session_scope(settings) as session:
        links = {m.id: m.job_id for m in session.query(FineTunedModel).all()}
    assert links == {"ft_old": "job_1", "ft_new": None}

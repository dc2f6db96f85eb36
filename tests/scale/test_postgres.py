"""PostgreSQL as the database of API and workers: migrations on an empty database and from an older one,
the ORM and the migrations agree, timestamps come back timezone-aware UTC whatever the session's zone,
claims skip rows another worker has locked, event ids are 64-bit."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, inspect, select, text

from app.core.db import get_engine, run_migrations, session_scope
from app.models import Base, Dataset, Job, JobEvent, new_id, utcnow
from app.services import queue

pytestmark = pytest.mark.timeout(300)


def _alembic(settings):
    from alembic.config import Config

    from app.core.config import PROJECT_ROOT

    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.sqlalchemy_url)
    cfg.attributes["configure_logger"] = False
    return cfg


def _dataset(session) -> str:
    dataset = Dataset(id=new_id("ds"), name="d", format="cmcc_csv", n_rows=1, label_set=[[0, "a"], [1, "b"]],
                      label_counts={}, stats={}, system_prompt="p", size_bytes=1)
    session.add(dataset)
    session.flush()
    return dataset.id


def test_migrations_build_on_an_empty_database_the_schema_the_models_declare(settings):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    run_migrations(settings)
    engine = get_engine(settings)
    assert engine.dialect.name == "postgresql"
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        columns = {c["name"]: c for c in inspect(connection).get_columns("jobs")}
        event_id = {c["name"]: c for c in inspect(connection).get_columns("job_events")}["id"]
    assert differences == []
    assert all(columns[name]["type"].timezone for name in ("created_at", "started_at", "finished_at", "heartbeat_at"))
    assert str(event_id["type"]) == "BIGINT"


def test_upgrade_from_an_older_database_keeps_its_rows_and_downgrade_works(settings):
    from alembic import command

    cfg = _alembic(settings)
    command.upgrade(cfg, "0003")
    engine = create_engine(settings.sqlalchemy_url)
    with engine.begin() as db:
        db.execute(text("INSERT INTO datasets VALUES ('ds_1','d',NULL,'cmcc_csv',NULL,1,'[]','{}','{}','p',1,:at)"),
                   {"at": datetime(2026, 11, 1, tzinfo=timezone.utc)})
        db.execute(text("INSERT INTO jobs (id, kind, status, dataset_id, hyperparameters, params, progress, "
                        "cancel_requested, attempts, created_at) VALUES ('job_1','train','queued','ds_1','{}','{}',"
                        "'{}',false,0,:at)"), {"at": datetime(2026, 11, 1, tzinfo=timezone.utc)})
    engine.dispose()

    run_migrations(settings)
    command.downgrade(cfg, "0003")  # and back: both directions run on PostgreSQL
    run_migrations(settings)
    with session_scope(settings) as session:
        job = session.get(Job, "job_1")
        assert (job.required_labels, job.resources) == ("", None)
        assert queue.claim_next_job(session, "h:1:w").id == "job_1"  # an old job is claimed by any worker
        session.add(JobEvent(id=2**40, job_id="job_1", kind="x", message="64-bit id"))
    with session_scope(settings) as session:
        assert session.get(JobEvent, 2**40).message == "64-bit id"
        session.add(JobEvent(job_id="job_1", kind="y", message="next"))  # the sequence goes on from its own value


def test_timestamps_are_utc_aware_whatever_the_session_time_zone(settings):
    run_migrations(settings)
    stamp = datetime(2026, 11, 29, 8, 30, tzinfo=timezone(timedelta(hours=8)))  # 00:30 UTC
    with session_scope(settings) as session:
        session.execute(text("SET TIME ZONE 'America/Los_Angeles'"))
        job = Job(id=new_id("job"), kind="train", status="queued", dataset_id=_dataset(session),
                  hyperparameters={}, progress={}, created_at=stamp)
        session.add(job)
        job_id = job.id
    with session_scope(settings) as session:
        session.execute(text("SET TIME ZONE 'Asia/Tokyo'"))
        read = session.get(Job, job_id).created_at
        raw = session.scalar(text("SELECT created_at::text FROM jobs WHERE id = :id"), {"id": job_id})
    assert read == stamp and read.tzinfo == timezone.utc and read.hour == 0
    assert raw.endswith("+09")  # stored as timestamptz: the server renders it in the session's zone


def test_a_claim_skips_the_job_another_worker_has_locked(settings):
    """FOR UPDATE SKIP LOCKED: while one worker's claim holds the oldest queued row, another claims the next
    one at once instead of waiting for the first to commit (a plain UPDATE would wait on the row lock)."""
    run_migrations(settings)
    with session_scope(settings) as session:
        dataset_id = _dataset(session)
        ids = []
        for age in (20, 10):
            job = Job(id=new_id("job"), kind="train", status="queued", dataset_id=dataset_id, hyperparameters={},
                      progress={}, created_at=utcnow() - timedelta(seconds=age))
            session.add(job)
            ids.append(job.id)
    holder = get_engine(settings).connect()
    try:
        holder.execute(select(Job.id).where(Job.id == ids[0]).with_for_update())  # the first worker, mid-claim
        claimed: list = []

        def second_worker() -> None:
            with session_scope(settings) as session:
                session.execute(text("SET lock_timeout = '5s'"))
                claimed.append(queue.claim_next_job(session, "h:2:second").id)

        thread = threading.Thread(target=second_worker)
        thread.start()
        thread.join(30)
        assert claimed == [ids[1]]
    finally:
        holder.rollback()
        holder.close()
    with session_scope(settings) as session:
        assert queue.claim_next_job(session, "h:1:first").id == ids[0]
        assert queue.claim_next_job(session, "h:1:first") is None

"""Which workers are alive and what the queue holds: workers write ``last_seen_at`` on every poll and
heartbeat; ``/health`` reads it. A worker is live when it was seen within ``worker_stale_seconds`` and,
on this host, its process still exists (one on another host is judged by its heartbeat alone)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.domain.resources import parse_labels
from app.models import Job, WorkerRow, utcnow
from app.services.queue import pid_dead_here

FORGET_AFTER = timedelta(days=1)  # rows of workers not seen for this long are dropped


def touch_worker(session: Session, worker_id: str, current_job_id: str | None = None, labels: str = "") -> None:
    """Record that ``worker_id`` is alive now (and what it runs; ``labels``: its canonical labels)."""
    now = utcnow()
    updated = session.execute(
        update(WorkerRow).where(WorkerRow.id == worker_id).values(last_seen_at=now, current_job_id=current_job_id)
    ).rowcount
    if not updated:
        session.add(WorkerRow(id=worker_id, hostname=socket.gethostname(), pid=os.getpid(), started_at=now,
                              last_seen_at=now, current_job_id=current_job_id, labels=parse_labels(labels)))
        gone = [row.id for row in session.scalars(select(WorkerRow).where(WorkerRow.id != worker_id))
                if pid_dead_here(row.id) or row.last_seen_at < now - FORGET_AFTER]
        if gone:  # workers of this host that died (their jobs are recovered by heartbeat/pid) or long silent
            session.execute(delete(WorkerRow).where(WorkerRow.id.in_(gone)))
    session.commit()


def forget_worker(session: Session, worker_id: str) -> None:
    session.execute(delete(WorkerRow).where(WorkerRow.id == worker_id))
    session.commit()


def health_summary(session: Session, settings: Settings) -> dict:
    """Workers seen in the last day with their liveness, and the queue: what ``/health`` reports."""
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.worker_stale_seconds)
    workers = []
    for row in session.scalars(select(WorkerRow).where(WorkerRow.last_seen_at >= now - FORGET_AFTER)
                               .order_by(WorkerRow.last_seen_at.desc())):
        seen = row.last_seen_at
        workers.append({
            "id": row.id, "hostname": row.hostname, "pid": row.pid, "current_job_id": row.current_job_id,
            "labels": [label for label in (row.labels or "").split(",") if label],
            "last_seen_seconds_ago": round((now - seen).total_seconds(), 3),
            "alive": seen >= stale_before and not pid_dead_here(row.id),
        })
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    oldest_queued = session.scalar(select(func.min(Job.created_at)).where(Job.status == "queued"))
    stale_running = session.scalar(select(func.count()).select_from(Job).where(
        Job.status == "running", (Job.heartbeat_at.is_(None)) | (Job.heartbeat_at < stale_before)))
    live = sum(w["alive"] for w in workers)
    return {
        "ready": live > 0,
        "workers": {"live": live, "stale_after_seconds": settings.worker_stale_seconds, "items": workers},
        "queue": {
            "queued": counts.get("queued", 0),
            "oldest_queued_seconds": round((now - oldest_queued).total_seconds(), 3) if oldest_queued else None,
            "running": counts.get("running", 0),
            "running_with_stale_heartbeat": stale_running,
        },
    }

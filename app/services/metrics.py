"""Prometheus metrics of one API process (prometheus-client, one registry per app).

Two kinds live side by side in the registry:

- what this process measures itself: request latency per route template, classify texts and latency per
  model and backend (``ServiceMetrics.observe_*``);
- what the workers do, read from the shared database at scrape time by ``DatabaseCollector``: jobs by
  state, the queue, worker heartbeats, training throughput of running jobs, the last evaluation of each
  model. Workers may run on other hosts; the database is what they share, so no multiprocess files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_factory
from app.models import Job, Report
from app.services.worker_registry import health_summary

log = logging.getLogger("intent_tuner.metrics")

PREFIX = "intent_tuner"
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_KINDS = ("train", "evaluate")
# Request latency: from a health probe (ms) to an upload or a cold model load (a minute).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CLASSIFY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class DatabaseCollector:
    """Gauges computed from the database at each scrape (a prometheus-client custom collector)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_database_up", "1 when the database answered this scrape's queries")
        try:
            with session_factory(self.settings)() as session:
                families = list(self._families(session))
        except Exception:  # a scrape must still answer (and say so) when the database does not
            log.exception("metrics: database query failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, session: Session) -> Iterator[Metric]:
        summary = health_summary(session, self.settings)

        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by state and kind", labels=["state", "kind"])
        counts = {(kind, status): n for kind, status, n in
                  session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))}
        for kind in JOB_KINDS:
            for state in JOB_STATES:
                jobs.add_metric([state, kind], counts.get((kind, state), 0))
        yield jobs

        queue = summary["queue"]
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Jobs queued, waiting for a worker", value=queue["queued"])
        yield GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds",
                                "Age of the oldest queued job (0 when none waits)",
                                value=queue["oldest_queued_seconds"] or 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_jobs_running_stale_heartbeat",
                                "Running jobs whose heartbeat is older than WORKER_STALE_SECONDS",
                                value=queue["running_with_stale_heartbeat"])

        workers = summary["workers"]
        yield GaugeMetricFamily(f"{PREFIX}_workers_live", "Workers seen within WORKER_STALE_SECONDS",
                                value=workers["live"])
        age = GaugeMetricFamily(f"{PREFIX}_worker_heartbeat_age_seconds",
                                "Seconds since each worker last polled or heartbeat", labels=["worker", "hostname"])
        for worker in workers["items"]:
            age.add_metric([worker["id"], worker["hostname"]], worker["last_seen_seconds_ago"])
        yield age

        yield from self._running_jobs(session)
        yield from self._last_evaluations(session)

    @staticmethod
    def _running_jobs(session: Session) -> Iterator[Metric]:
        labels = ["job", "kind", "model"]  # model: the base model trained, or the model evaluated
        steps = GaugeMetricFamily(f"{PREFIX}_job_steps_per_second",
                                  "Optimizer steps per second of a running training job", labels=labels)
        tokens = GaugeMetricFamily(f"{PREFIX}_job_tokens_per_second",
                                   "Training tokens per second of a running training job", labels=labels)
        done = GaugeMetricFamily(f"{PREFIX}_job_progress_ratio",
                                 "Share done of a running job's current phase (training steps or dialogues "
                                 "evaluated), 0..1", labels=labels)
        eta = GaugeMetricFamily(f"{PREFIX}_job_eta_seconds", "Estimated seconds of training left", labels=labels)
        for job in session.scalars(select(Job).where(Job.status == "running")):
            progress = job.progress or {}
            values = [job.id, job.kind, job.base_model or job.target_model_id or ""]
            evaluating = bool(progress.get("total"))
            if job.kind == "train" and not evaluating:
                if progress.get("steps_per_second") is not None:
                    steps.add_metric(values, progress["steps_per_second"])
                if progress.get("tokens_per_second") is not None:
                    tokens.add_metric(values, progress["tokens_per_second"])
                if progress.get("eta_seconds") is not None:
                    eta.add_metric(values, progress["eta_seconds"])
            if evaluating:
                done.add_metric(values, progress.get("done", 0) / progress["total"])
            elif progress.get("max_steps"):
                done.add_metric(values, min(progress.get("step", 0) / progress["max_steps"], 1.0))
        yield from (steps, tokens, done, eta)

    @staticmethod
    def _last_evaluations(session: Session) -> Iterator[Metric]:
        labels = ["model", "dataset"]
        families = {key: GaugeMetricFamily(f"{PREFIX}_evaluation_{key}",
                                           f"{title} of the newest report of a model on a dataset", labels=labels)
                    for key, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"),
                                       ("weighted_f1", "Weighted F1"))}
        newest = select(Report.model_id, Report.dataset_id, func.max(Report.created_at).label("created_at")) \
            .group_by(Report.model_id, Report.dataset_id).subquery()
        rows = session.scalars(select(Report).join(newest, (Report.model_id == newest.c.model_id)
                                                   & (Report.dataset_id == newest.c.dataset_id)
                                                   & (Report.created_at == newest.c.created_at)))
        for report in rows:
            for key, family in families.items():
                value = (report.summary or {}).get(key)
                if value is not None:
                    family.add_metric([report.model_id, report.dataset_id], value)
        yield from families.values()


class ServiceMetrics:
    """The metrics registry of one API process, with what it measures itself."""

    def __init__(self, settings: Settings):
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route template and status code",
                                ["method", "route", "status"], registry=self.registry)
        self.classify_texts = Counter(f"{PREFIX}_classify_texts", "Dialogues classified", ["model", "backend"],
                                      registry=self.registry)
        self.classify_duration = Histogram(
            f"{PREFIX}_classify_request_duration_seconds", "Latency of a /classify request (all its dialogues)",
            ["model", "backend"], buckets=CLASSIFY_BUCKETS, registry=self.registry)
        self.registry.register(DatabaseCollector(settings))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.request_duration.labels(method, route).observe(seconds)
        self.requests.labels(method, route, str(status)).inc()

    def observe_classify(self, model: str, backend: str, texts: int, seconds: float) -> None:
        self.classify_texts.labels(model, backend).inc(texts)
        self.classify_duration.labels(model, backend).observe(seconds)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper's Accept header asks for (text 0.0.4 by default,
        OpenMetrics when asked), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def backend_name(backend) -> str:
    """The engine behind an inference backend (``app.ml.infer.base``), for the ``backend`` label:
    transformers (in-process) or vllm."""
    name = str(getattr(backend, "name", None) or "hf")
    return "transformers" if name == "hf" else name

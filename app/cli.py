"""`intent-tuner` command line: prepare base models, classify and evaluate from the shell.

It drives the same services and ml code as the API, against DATA_DIR's database.
"""

from __future__ import annotations

import argparse
import json
import sys

from app.core.config import get_settings
from app.core.db import run_migrations, session_scope


def _prepare(args) -> int:
    """Prepare a base model once: progress on stderr, its folder on stdout."""
    import time

    from app.ml.models.registry import BaseModelError, resolve_base_model

    settings = get_settings()
    name = args.name or settings.default_base_model
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        path = resolve_base_model(name, settings, progress=progress)
    except BaseModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    progress(f"{name} ready")
    print(path)
    return 0


def _models(_args) -> int:
    """List the base models this machine knows: * marks the default."""
    from app.ml.models.registry import list_base_models

    for row in list_base_models(get_settings()):
        state = "prepared" if row["prepared"] else ("available" if row["available"] else "not available")
        mark = "*" if row["default"] else " "
        print(f"{mark} {row['name']:<28} {row['source']:<10} {state:<14} {row.get('path', '')}")
    return 0


def _classify(args) -> int:
    from app.ml.infer.classifier import ClassifierRegistry
    from app.services.classify import check_mode_supported
    from app.services.errors import UnprocessableError
    from app.services.models import resolve_model_ref

    settings = get_settings()
    run_migrations(settings)
    texts = list(args.text) or [line.strip() for line in sys.stdin if line.strip()]
    with session_scope(settings) as session:
        ref = resolve_model_ref(session, settings, args.model)
    try:
        check_mode_supported(ref, args.mode, args.model)
    except UnprocessableError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    classifier = ClassifierRegistry(max_adapters=1, device=settings.device).get(ref)
    from tqdm import tqdm

    for start in tqdm(range(0, len(texts), args.batch_size), desc="classify", unit="batch", file=sys.stderr):
        batch = texts[start:start + args.batch_size]
        for text, p in zip(batch, classifier.classify(batch, mode=args.mode, top_k=args.top_k)):
            print(json.dumps({"text": text, "intent_id": p.intent_id, "label": p.label, "confidence": p.confidence,
                              "raw_output": p.raw_output, "latency_ms": p.latency_ms}, ensure_ascii=False))
    return 0


def _evaluate(args) -> int:
    import threading

    from app.services import jobs as job_service
    from app.services import pipelines, queue
    from app.services.reports import get_report, report_dir

    settings = get_settings()
    run_migrations(settings)
    # The job is created already running for this process (a queued one could also be claimed by a served
    # worker), then run with the heartbeat, cancel and final status a served worker gives it.
    worker_id = queue.worker_identity()
    with session_scope(settings) as session:
        job_id = job_service.create_evaluation_job(session, settings, model=args.model, dataset_id=args.dataset,
                                                   mode=args.mode, claimed_by=worker_id).id
    pipelines.run_claimed_job(settings, job_id, worker_id, classifiers=pipelines.Classifiers(settings),
                              shutdown=threading.Event(), announce=False)
    with session_scope(settings) as session:
        job = job_service.get_job(session, job_id)
        if job.status != "succeeded":
            print(f"evaluation job {job_id} {job.status}: {job.error_message}", file=sys.stderr)
            return 1
        report = get_report(session, job.report_id)
        print(json.dumps({"report_id": report.id, "path": str(report_dir(settings, report)), **report.summary},
                         ensure_ascii=False, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intent-tuner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-model", help="prepare a base model once (join, verify, convert, cache)")
    prep.add_argument("name", nargs="?", default=None, help="registry name (default: the embedded default)")
    prep.set_defaults(func=_prepare)

    sub.add_parser("models", help="list the base models and whether each is prepared or can be").set_defaults(func=_models)

    cls = sub.add_parser("classify", help="classify dialogues (arguments, or one per line on stdin)")
    cls.add_argument("--model", required=True, help="fine-tuned model id or base model name")
    cls.add_argument("--mode", choices=["score", "generate"], default="score")
    cls.add_argument("--top-k", type=int, default=3)
    cls.add_argument("--batch-size", type=int, default=8)
    cls.add_argument("text", nargs="*")
    cls.set_defaults(func=_classify)

    ev = sub.add_parser("evaluate", help="evaluate a model on an uploaded dataset and write a report")
    ev.add_argument("--model", required=True)
    ev.add_argument("--dataset", required=True, help="dataset id (POST /datasets)")
    ev.add_argument("--mode", choices=["score", "generate"], default="score")
    ev.set_defaults(func=_evaluate)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

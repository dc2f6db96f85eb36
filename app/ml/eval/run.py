"""Run a classifier over records in length-sorted batches, with progress, and build the report."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from app.domain.labels import LabelSet
from app.domain.records import Record
from app.ml.eval.metrics import build_report


def evaluate_records(
    classifier,
    records: list[Record],
    label_set: LabelSet,
    *,
    mode: str = "score",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    show_progress_bar: bool = True,
) -> dict:
    """Classify ``records`` with ``classifier`` (an ``IntentClassifier``) and build the report.

    ``progress(done, total)`` is called after every batch (the worker stores it on the job); a
    tqdm bar on stderr shows the same for people watching a console.
    """
    from tqdm.auto import tqdm

    texts = [r.dialogue for r in records]
    total = len(texts)
    # Batches of similar length pad least; predictions go back to the records' order.
    order = sorted(range(total), key=lambda i: len(texts[i]))
    predictions: list = [None] * total
    began = time.perf_counter()
    with tqdm(total=total, desc=f"evaluate ({mode})", unit="text", file=sys.stderr,
              disable=not show_progress_bar, mininterval=2.0) as bar:
        for start in range(0, total, batch_size):
            indices = order[start : start + batch_size]
            batch = [texts[i] for i in indices]
            for i, prediction in zip(indices, classifier.classify(batch, mode=mode, batch_size=batch_size)):
                predictions[i] = prediction
            bar.update(len(batch))
            if progress is not None:
                progress(start + len(batch), total)
    elapsed = time.perf_counter() - began
    return build_report(
        y_true=[r.label_id for r in records],
        y_pred=[p.intent_id for p in predictions],
        label_set=label_set,
        texts=texts,
        raw_outputs=[p.raw_output for p in predictions],
        confidences=[p.confidence for p in predictions],
        elapsed_seconds=elapsed,
        mode=mode,
    )

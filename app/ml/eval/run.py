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


def score_accuracy_macro_f1(model, tokenizer, system_prompt: str, label_set: LabelSet, records: list[Record], *,
                            max_input_length: int | None, batch_size: int = 8) -> tuple[float, float]:
    """Accuracy and macro-F1 of ``model`` (a causal LM or a peft model, as it is now) on ``records``, by label
    scoring, for evaluations during training (``app.ml.train.validation``): no classifier registry, no report.

    Macro-F1 as the reports compute it (``app.ml.eval.metrics.build_report``): over the classes present
    in the truth or the predictions.
    """
    import torch

    from app.ml.infer.scoring import LabelScorer

    was_training = model.training
    model.eval()
    try:
        scorer = LabelScorer(model, tokenizer, system_prompt, label_set, max_input_length=max_input_length)
        with torch.no_grad():
            # The trie: the dialogue and a few label tokens per text, what /classify answers with by default.
            scores = scorer.score([r.dialogue for r in records], batch_size=batch_size, answers="trie")
    finally:
        if was_training:
            model.train()
    ids = scorer.candidates.label_ids
    return accuracy_macro_f1([r.label_id for r in records], [ids[int(i)] for i in scores.argmax(dim=-1).tolist()])


def accuracy_macro_f1(y_true: list[int], y_pred: list[int]) -> tuple[float, float]:
    """Accuracy and macro-F1 over the classes present in the truth or the predictions (as the reports)."""
    from sklearn.metrics import accuracy_score, f1_score

    present = sorted(set(y_true) | set(y_pred))
    return (float(accuracy_score(y_true, y_pred)),
            float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)))

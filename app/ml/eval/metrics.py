"""Evaluation reports: metrics, per-class table, errors, confusion, written as JSON + a confusion-matrix PNG.

Failed predictions (a generated answer that names no label) count as WRONG in every metric. The
upstream evaluation excluded them, which inflates accuracy exactly when a model is bad at following
the output format. Here a failure is mapped to a sentinel class outside the label set: it lowers
the recall of its true class and the accuracy, and is no label's false positive. Precision, recall
and F1 are averaged over the classes present in the truth or the (valid) predictions, as
scikit-learn does by default; classes of the label set that appear nowhere are listed in
``per_class`` with support 0 but do not drag the macro average down.
"""

from __future__ import annotations

from app.domain.labels import LabelSet

MOST_CONFUSED = 10


def _sentinel(label_set: LabelSet) -> int:
    return min(label_set.ids) - 1


def build_report(
    *,
    y_true: list[int],
    y_pred: list[int | None],
    label_set: LabelSet,
    texts: list[str],
    raw_outputs: list[str | None] | None,
    elapsed_seconds: float,
    mode: str,
    confidences: list[float | None] | None = None,
) -> dict:
    """A JSON-ready report of predictions ``y_pred`` (None = failed) against ``y_true``."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    n = len(y_true)
    if not (len(y_pred) == len(texts) == n):
        raise ValueError(f"y_true ({n}), y_pred ({len(y_pred)}) and texts ({len(texts)}) differ in length")
    for name, extra in (("raw_outputs", raw_outputs), ("confidences", confidences)):
        if extra is not None and len(extra) != n:
            raise ValueError(f"{name} has {len(extra)} items for {n} samples")
    known = set(label_set.ids)
    unknown = sorted({y for y in y_true if y not in known})
    if unknown:
        raise ValueError(f"true labels {unknown} are not in the label set")
    # A predicted id outside the set is as unusable as an unparsed answer.
    valid_pred = [p if p in known else None for p in y_pred]
    sentinel = _sentinel(label_set)
    mapped = [sentinel if p is None else p for p in valid_pred]
    present = set(y_true) | {p for p in valid_pred if p is not None}
    metric_labels = [i for i in label_set.ids if i in present]

    report: dict = {
        "mode": mode,
        "n_samples": n,
        "accuracy": float(accuracy_score(y_true, mapped)) if n else 0.0,
    }
    for average in ("macro", "weighted"):
        if n:
            p, r, f, _ = precision_recall_fscore_support(
                y_true, mapped, labels=metric_labels, average=average, zero_division=0
            )
        else:
            p = r = f = 0.0
        report[f"{average}_precision"] = float(p)
        report[f"{average}_recall"] = float(r)
        report[f"{average}_f1"] = float(f)

    n_failed = sum(p is None for p in valid_pred)
    report["n_failed"] = n_failed
    report["success_rate"] = (n - n_failed) / n if n else 0.0
    report["evaluation_seconds"] = float(elapsed_seconds)
    report["seconds_per_sample"] = float(elapsed_seconds) / n if n else 0.0
    report["metric_labels"] = metric_labels

    ids = label_set.ids
    if n:
        p_all, r_all, f_all, s_all = precision_recall_fscore_support(
            y_true, mapped, labels=ids, average=None, zero_division=0
        )
        matrix = confusion_matrix(y_true, mapped, labels=ids).tolist()
    else:
        p_all = r_all = f_all = s_all = [0] * len(ids)
        matrix = [[0] * len(ids) for _ in ids]
    failed_by_class = {i: 0 for i in ids}
    for t, p in zip(y_true, valid_pred):
        if p is None:
            failed_by_class[t] += 1
    report["per_class"] = [
        {
            "intent_id": label_id,
            "label": label_set.name_of(label_id),
            "precision": float(p_all[k]),
            "recall": float(r_all[k]),
            "f1": float(f_all[k]),
            "support": int(s_all[k]),
            "n_failed": failed_by_class[label_id],
        }
        for k, label_id in enumerate(ids)
    ]
    report["confusion_matrix"] = matrix
    report["confusion_labels"] = ids
    pairs = [
        (matrix[i][j], ids[i], ids[j])
        for i in range(len(ids))
        for j in range(len(ids))
        if i != j and matrix[i][j] > 0
    ]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    report["most_confused_pairs"] = [
        {
            "true_id": t,
            "true_label": label_set.name_of(t),
            "pred_id": p,
            "pred_label": label_set.name_of(p),
            "count": count,
        }
        for count, t, p in pairs[:MOST_CONFUSED]
    ]

    report["failed_predictions"] = [
        {
            "index": k,
            "text": texts[k],
            "true_id": y_true[k],
            "true_label": label_set.name_of(y_true[k]),
            "raw_output": raw_outputs[k] if raw_outputs is not None else None,
        }
        for k in range(n)
        if valid_pred[k] is None
    ]
    report["wrong_predictions"] = [
        {
            "index": k,
            "text": texts[k],
            "true_id": y_true[k],
            "true_label": label_set.name_of(y_true[k]),
            "pred_id": valid_pred[k],
            "pred_label": label_set.name_of(valid_pred[k]),
            "confidence": confidences[k] if confidences is not None else None,
        }
        for k in range(n)
        if valid_pred[k] is not None and valid_pred[k] != y_true[k]
    ]
    return report

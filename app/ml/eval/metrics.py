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
CALIBRATION_BINS = 10


def calibration(confidences: list[float], correct: list[bool], n_bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and the reliability table of predictions' confidences.

    ``n_bins`` equal-width bins of confidence, right-closed: (0, 1/M], (1/M, 2/M], ..., with 0 in the
    first. ECE = sum over bins of |bin| / n * |accuracy(bin) - mean confidence(bin)| (Guo et al. 2017):
    0 when the model is right as often as it says, up to 1. Empty bins hold None and weigh nothing.
    """
    import numpy as np

    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} outcomes")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    conf = np.asarray(confidences, dtype=float)
    hits = np.asarray(correct, dtype=float)
    if conf.size and (np.isnan(conf).any() or conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must be probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], conf, side="left")  # c in (edge[k], edge[k+1]] -> k
    n = conf.size
    bins, ece = [], 0.0
    for k in range(n_bins):
        members = index == k
        count = int(members.sum())
        accuracy = float(hits[members].mean()) if count else None
        confidence = float(conf[members].mean()) if count else None
        if count:
            ece += count / n * abs(accuracy - confidence)
        bins.append({"lower": float(edges[k]), "upper": float(edges[k + 1]), "count": count,
                     "accuracy": accuracy, "confidence": confidence})
    return {"ece": float(ece), "n_bins": n_bins, "n_samples": n, "bins": bins}


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
    # Calibration where every prediction has a probability (score mode): does 0.8 mean right 80% of the time?
    if n and confidences is not None and all(c is not None for c in confidences):
        report["calibration"] = calibration([float(c) for c in confidences],
                                            [p is not None and p == t for p, t in zip(valid_pred, y_true)])
        report["ece"] = report["calibration"]["ece"]
    else:
        report["calibration"] = None
        report["ece"] = None
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

"""A report's files: the metrics and its lists as JSON, the confusion matrix as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from app.domain.artifacts import (
    CONFUSION_MATRIX_FILENAME,
    RELIABILITY_DIAGRAM_FILENAME,
    REPORT_DETAIL_FILENAME,
    REPORT_ERRORS_FILENAME,
    REPORT_FAILED_FILENAME,
    REPORT_RESULTS_FILENAME,
)
from app.domain.labels import LabelSet

_DETAIL_KEYS = ("per_class", "most_confused_pairs", "confusion_matrix", "confusion_labels")
_LIST_KEYS = ("failed_predictions", "wrong_predictions")


def write_report(report: dict, report_dir: Path, label_set: LabelSet | None = None) -> dict[str, Path]:
    """Write the report's files into ``report_dir``; returns {name: path}.

    ``results.json`` (the metrics), ``failed_predictions.json``, ``error_predictions.json``,
    ``detailed_analysis.json`` (per-class, confused pairs, confusion matrix) and
    ``confusion_matrix.png``, and ``reliability_diagram.png`` when the report has a calibration (score
    mode). ``results.json`` lists the report's files under ``files``. The label set for the plot is taken from ``per_class`` unless given.
    """
    from app.ml.eval.plots import plot_confusion_matrix, plot_reliability_diagram

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in report.items() if k not in _DETAIL_KEYS and k not in _LIST_KEYS}
    names = [REPORT_RESULTS_FILENAME, REPORT_FAILED_FILENAME, REPORT_ERRORS_FILENAME, REPORT_DETAIL_FILENAME,
             CONFUSION_MATRIX_FILENAME]
    if report.get("calibration"):
        names.append(RELIABILITY_DIAGRAM_FILENAME)
    metrics["files"] = report["files"] = names
    files = {
        "results": (report_dir / REPORT_RESULTS_FILENAME, metrics),
        "failed_predictions": (report_dir / REPORT_FAILED_FILENAME, report["failed_predictions"]),
        "error_predictions": (report_dir / REPORT_ERRORS_FILENAME, report["wrong_predictions"]),
        "detailed_analysis": (report_dir / REPORT_DETAIL_FILENAME, {k: report[k] for k in _DETAIL_KEYS}),
    }
    written: dict[str, Path] = {}
    for name, (path, payload) in files.items():
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")
        written[name] = path
    if label_set is None:
        label_set = LabelSet.from_pairs([(c["intent_id"], c["label"]) for c in report["per_class"]])
    written["confusion_matrix"] = plot_confusion_matrix(report["confusion_matrix"], label_set, report_dir / CONFUSION_MATRIX_FILENAME)
    if report.get("calibration"):
        written["reliability_diagram"] = plot_reliability_diagram(report["calibration"],
                                                                  report_dir / RELIABILITY_DIAGRAM_FILENAME)
    return written

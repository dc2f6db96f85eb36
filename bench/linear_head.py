"""Section 5's linear-head part: the product's ``head: linear`` recipe against the TF-IDF baseline.

Each class-balance mode trains a head with ``app.ml.train.trainer.train_adapter`` (the code a job runs),
with validation on the held-out rows. The first run reads the dialogues (its time is the recipe's whole
cost: model load, features of the training and held-out rows, fit); the others reuse its feature
checkpoints, as a resumed job would, so they cost a fit each. From the same features:

- the learning curve: the head fitted on the first N training rows (the order the baseline uses), both
  scored on the held-out rows;
- 5-fold cross-validation over the real rows (fold k holds out the k-th real row of every intent that has
  more than one), training on the other real rows plus the synthetic training rows: 5x the held-out
  predictions of the single split, so a steadier figure for both sides.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.domain.labels import LabelSet
from bench.data import Split

HEAD_CONFIGS = {"head": "none", "head-balanced": "balanced", "head-sqrt": "sqrt"}  # name -> class_balance
FOLDS = 5


@dataclass
class HeadRun:
    name: str
    class_balance: str
    seconds: float | None = None  # train_adapter's wall time
    accuracy: float | None = None  # on the held-out rows
    macro_f1: float | None = None
    error: str | None = None


@dataclass
class HeadResults:
    recipe: str
    hyper: dict
    runs: list[HeadRun] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # {"rows", "head_accuracy", "head_macro_f1", "baseline_*"}
    cv: dict | None = None  # {"folds", "held_out", "head": (acc, f1), "head_balanced": ..., "baseline": ...}


def _load_features(store_dir: Path, name: str):
    import torch
    from safetensors.torch import load_file

    parts = sorted(store_dir.glob(f"{name}-*.safetensors"))
    return torch.cat([load_file(str(p))["features"] for p in parts])


def _score_head(features, labels, test_features, test_labels, label_set, c, mode) -> tuple[float, float]:
    from app.ml.eval.run import accuracy_macro_f1
    from app.ml.train.linear_head import fit_linear_head

    head, _ = fit_linear_head(features, labels, label_set, c=c, class_balance=mode)
    return accuracy_macro_f1(test_labels, head.predict_ids(test_features))


def run_heads(split: Split, label_set: LabelSet, system_prompt: str, base_model_name: str, base_model_dir: Path,
              recipe: str, overrides: dict, names: list[str], job_dir: Path, *, real_dialogues: set[str] | None,
              curve_points: list[int], device: str | None = None, progress=print) -> HeadResults:
    import contextlib
    import sys

    from app.domain.artifacts import ADAPTER_DIRNAME, CHECKPOINTS_DIRNAME
    from app.ml.train.config import resolve_training_config
    from app.ml.train.linear_head import FEATURES_DIRNAME
    from app.ml.train.trainer import TrainingHooks, train_adapter
    from bench.quality import baseline_point

    base_config, _ = resolve_training_config(recipe, overrides)
    results = HeadResults(recipe, {k: getattr(base_config, k) for k in ("head", "head_c", "max_input_length",
                                                                          "per_device_train_batch_size")})
    shutil.rmtree(job_dir, ignore_errors=True)

    def on_event(kind: str, message: str, data: dict) -> None:
        if kind in ("features", "validation", "resumed", "model_loaded"):
            progress(f"[quality] linear head: {message}")

    for name in names:
        run = HeadRun(name, HEAD_CONFIGS[name])
        results.runs.append(run)
        config, _ = resolve_training_config(recipe, {**overrides, "class_balance": run.class_balance,
                                                     "eval_every_steps": 1})
        shutil.rmtree(job_dir / ADAPTER_DIRNAME, ignore_errors=True)  # train again; the features are kept
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                training = train_adapter(base_model_dir=base_model_dir, base_model_name=base_model_name,
                                         records=split.train, label_set=label_set, system_prompt=system_prompt,
                                         config=config, job_dir=job_dir, hooks=TrainingHooks(on_event=on_event),
                                         device=device, validation_records=split.held_out)
        except Exception as exc:  # noqa: BLE001 - the section reports what it could not measure
            run.error = f"{type(exc).__name__}: {exc}"
            continue
        run.seconds = time.perf_counter() - started
        run.accuracy = training.validation_history[0]["accuracy"]
        run.macro_f1 = training.validation_history[0]["macro_f1"]
        progress(f"[quality] linear head, class_balance={run.class_balance}: accuracy {run.accuracy:.3f}, "
                 f"macro-F1 {run.macro_f1:.3f} in {run.seconds:.0f} s")
    if all(r.error for r in results.runs):
        return results

    store = job_dir / CHECKPOINTS_DIRNAME / FEATURES_DIRNAME
    train_x, held_x = _load_features(store, "train"), _load_features(store, "validation")
    train_y, held_y = [r.label_id for r in split.train], [r.label_id for r in split.held_out]
    c = base_config.head_c
    for n in curve_points:
        if len(set(train_y[:n])) < 2:
            continue
        head = _score_head(train_x[:n], train_y[:n], held_x, held_y, label_set, c, "none")
        base = baseline_point(split, n, label_set)
        results.curve.append({"rows": n, "head_accuracy": head[0], "head_macro_f1": head[1],
                              "baseline_accuracy": base["accuracy"], "baseline_macro_f1": base["macro_f1"]})

    if real_dialogues:
        results.cv = _cross_validate(split, train_x, held_x, label_set, c, real_dialogues)
    return results


def _cross_validate(split: Split, train_x, held_x, label_set: LabelSet, c: float, real_dialogues: set[str]) -> dict:
    import torch

    rows = list(split.train) + list(split.held_out)
    x = torch.cat([train_x, held_x])
    is_real = [r.dialogue in real_dialogues for r in rows]
    by_label: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if is_real[i]:
            by_label.setdefault(r.label_id, []).append(i)
    folds: list[list[int]] = [[] for _ in range(FOLDS)]
    for members in by_label.values():
        if len(members) > 1:
            for k, i in enumerate(members):
                folds[k % FOLDS].append(i)
    synthetic_train = [i for i in range(len(split.train)) if not is_real[i]]
    truth: list[int] = []
    predicted = {"head": [], "head_balanced": [], "baseline": []}
    from app.ml.eval.baseline import fit_baseline, predict_ids
    from app.ml.eval.run import accuracy_macro_f1
    from app.ml.train.linear_head import fit_linear_head

    for fold in folds:
        test = set(fold)
        train_idx = [i for i in range(len(rows)) if is_real[i] and i not in test] + synthetic_train
        labels = [rows[i].label_id for i in train_idx]
        truth += [rows[i].label_id for i in fold]
        for key, mode in (("head", "none"), ("head_balanced", "balanced")):
            head, _ = fit_linear_head(x[train_idx], labels, label_set, c=c, class_balance=mode)
            predicted[key] += head.predict_ids(x[fold])
        baseline = fit_baseline([rows[i] for i in train_idx])
        predicted["baseline"] += predict_ids(baseline, [rows[i].dialogue for i in fold])
    return {"folds": FOLDS, "held_out": len(truth),
            **{key: accuracy_macro_f1(truth, values) for key, values in predicted.items()}}


def head_data(results: HeadResults) -> dict:
    return {"recipe": results.recipe, "hyper": results.hyper, "curve": results.curve, "cv": results.cv,
            "runs": [vars(r) for r in results.runs]}


def load_head_results(path: Path) -> HeadResults:
    """What ``run_quality_section`` saved (``<work-dir>/quality/head.json``), to render it again."""
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    results = HeadResults(data["recipe"], data["hyper"], curve=data["curve"], cv=data["cv"])
    results.runs = [HeadRun(**run) for run in data["runs"]]
    return results

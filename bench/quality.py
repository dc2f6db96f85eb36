"""Section 5: quality on held-out real CMCC-34 rows: the linear head, class balance and the learning curve.

Same split as section 4 (``bench.data.stratified_split``), scored on its held-out rows from the real file.
Linear-head configurations (``bench.linear_head``) train the product's ``head: linear`` recipe per
class-balance mode, then fit it on growing prefixes of the training rows (its learning curve) and
cross-validate it over the real rows, each beside the TF-IDF baseline on the same rows. LoRA configurations
each train one adapter with ``app.ml.train.trainer.train_adapter`` and validation during training on the
held-out rows (``eval_every_steps``, ``eval_max_samples`` = all of them): the ``validation`` events give the
adapter's accuracy / macro-F1 after every ``eval_every_steps`` optimizer steps (label scoring, the serving
path), so one run per configuration yields its learning curve. The TF-IDF + logistic-regression baseline
(``app.ml.eval.baseline``) is fitted on growing prefixes of the same (shuffled) training rows, as many
rows as the adapter had drawn at each point (all of them once the adapter has drawn more), and scored
on the same held-out rows. Configurations differ from their recipe only as their table says.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.domain.labels import LabelSet
from bench.data import Split
from bench.report import SectionResult, Table, new_figure, save_figure


@dataclass(frozen=True)
class QualityConfig:
    name: str  # shown in the tables
    overrides: dict  # over the section's base overrides


# What a name on --quality-configs means (the base is the recipe with the section's step budget).
CONFIGS = {
    "none": QualityConfig("class_balance=none", {"class_balance": "none"}),
    "balanced": QualityConfig("class_balance=balanced", {"class_balance": "balanced"}),
    "sqrt": QualityConfig("class_balance=sqrt", {"class_balance": "sqrt"}),
    "balanced-lr3e-4": QualityConfig("class_balance=balanced, learning_rate=3e-4",
                                     {"class_balance": "balanced", "learning_rate": 3e-4}),
    "balanced-r32": QualityConfig("class_balance=balanced, lora_r=32, lora_alpha=64",
                                  {"class_balance": "balanced", "lora_r": 32, "lora_alpha": 64}),
}


@dataclass
class ConfigRun:
    config: QualityConfig
    hyper: dict
    train_seconds: float | None = None
    steps: int = 0
    batch: int = 0
    final_loss: float | None = None
    curve: list[dict] = field(default_factory=list)  # {"step", "samples", "accuracy", "macro_f1"}
    error: str | None = None


EVAL_BATCH = 2  # dialogues label-scored at once in the validation during training

SHOWN = ("class_balance", "learning_rate", "lora_r", "lora_alpha", "per_device_train_batch_size",
         "gradient_accumulation_steps", "max_steps", "eval_every_steps", "max_input_length")


def baseline_point(split: Split, n_rows: int, label_set: LabelSet) -> dict | None:
    """The baseline fitted on the first ``n_rows`` training rows, scored on the held-out rows."""
    from app.ml.eval.baseline import fit_baseline, predict_ids
    from app.ml.eval.metrics import build_report

    rows = split.train[:n_rows]
    if len({r.label_id for r in rows}) < 2:
        return None
    model = fit_baseline(rows)
    y_pred = predict_ids(model, [r.dialogue for r in split.held_out])
    report = build_report(y_true=[r.label_id for r in split.held_out], y_pred=y_pred, label_set=label_set,
                          texts=[r.dialogue for r in split.held_out], raw_outputs=None, elapsed_seconds=0.0,
                          mode="baseline")
    return {"rows": len(rows), "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def train_one(split: Split, label_set: LabelSet, system_prompt: str, base_model_name: str, base_model_dir: Path,
              recipe: str, base_overrides: dict, config: QualityConfig, job_dir: Path, *, device: str | None,
              progress=print) -> ConfigRun:
    from app.ml.train.config import resolve_training_config
    from app.ml.train.trainer import TrainingHooks, train_adapter

    overrides = {**base_overrides, **config.overrides, "eval_max_samples": max(1, len(split.held_out))}
    training_config, _ = resolve_training_config(recipe, overrides)
    run = ConfigRun(config, {k: getattr(training_config, k) for k in SHOWN})
    run.batch = training_config.per_device_train_batch_size * training_config.gradient_accumulation_steps
    shutil.rmtree(job_dir, ignore_errors=True)  # never resume a previous run's checkpoints

    def on_log(record: dict) -> None:
        progress(f"[quality] {config.name}: step {record['step']}/{record['max_steps']} loss {record['loss']:.3f}")

    def on_event(kind: str, message: str, data: dict) -> None:
        if kind in ("validation", "best_checkpoint", "class_balance", "early_stopped"):
            progress(f"[quality] {config.name}: {message}")

    # Validation scores 34 candidate answers per dialogue with full-vocabulary logits: at its default batch
    # of 8 dialogues the process was OOM-killed on the shared 23.5 GiB machine; score 2 at a time.
    import functools

    from app.ml.train import validation

    scorer = validation.score_accuracy_macro_f1
    validation.score_accuracy_macro_f1 = functools.partial(scorer, batch_size=EVAL_BATCH)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log dicts on stdout
            training = train_adapter(base_model_dir=base_model_dir, base_model_name=base_model_name,
                                     records=split.train, label_set=label_set, system_prompt=system_prompt,
                                     config=training_config, job_dir=job_dir,
                                     hooks=TrainingHooks(on_log=on_log, on_event=on_event), device=device,
                                     validation_records=split.held_out)
    except Exception as exc:  # noqa: BLE001 - the section reports what it could not measure
        run.error = f"{type(exc).__name__}: {exc}"
        return run
    finally:
        validation.score_accuracy_macro_f1 = scorer
    run.train_seconds, run.steps, run.final_loss = training.train_runtime_s, training.steps, training.final_loss
    run.curve = [{"step": e["step"], "samples": e["step"] * run.batch, "accuracy": e["accuracy"],
                  "macro_f1": e["macro_f1"]} for e in training.validation_history]
    return run


def run_quality_section(split: Split | None, label_set: LabelSet, system_prompt: str, base_model_name: str,
                        base_model_dir: Path, recipe: str, base_overrides: dict, config_names: list[str],
                        plot_path: Path, work_dir: Path, *, device: str | None = None,
                        skip_reason: str | None = None, real_dialogues: set[str] | None = None,
                        head_recipe: str | None = None, head_overrides: dict | None = None,
                        progress=print) -> SectionResult:
    """``config_names``: LoRA configurations (``CONFIGS``) and linear-head ones (``bench.linear_head.HEAD_CONFIGS``,
    trained with ``head_recipe`` + ``head_overrides``)."""
    started = time.perf_counter()
    result = SectionResult("quality", "5. Quality on held-out real CMCC-34 rows: linear head, class balance, learning curve")
    if split is None:
        result.skipped.append(f"not measured: {skip_reason or 'no data'}")
        result.seconds = time.perf_counter() - started
        return result
    if real_dialogues is not None:
        # Only the held-out rows from the real file (the synthetic held-out rows are left out).
        real = [r for r in split.held_out if r.dialogue in real_dialogues]
        if real:
            split = Split(split.train, real, f"{split.description}; of the held-out rows only the {len(real)} "
                                             "real ones are scored here")
    result.intro = [__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(), f"Split: {split.description}."]
    result.intro.append(f"Recipe: `configs/{recipe}.yaml`, overridden with {base_overrides}, then per configuration.")

    raw_dir = work_dir / "quality"
    raw_dir.mkdir(parents=True, exist_ok=True)
    from bench.linear_head import HEAD_CONFIGS, head_data, run_heads

    heads = None
    head_names = [n for n in config_names if n in HEAD_CONFIGS]
    if head_names:
        result.intro.append(f"Linear head: `configs/{head_recipe}.yaml`, overridden with {head_overrides}.")
        n_train = len(split.train)
        points = sorted({n for n in (16, 32, 64, 128) if n < n_train} | {n_train})
        heads = run_heads(split, label_set, system_prompt, base_model_name, base_model_dir, head_recipe,
                          head_overrides or {}, head_names, work_dir / "quality-job-head", real_dialogues=real_dialogues,
                          curve_points=points, device=device, progress=progress)
        (raw_dir / "head.json").write_text(json.dumps(head_data(heads), indent=1, default=str), encoding="utf-8")
    runs: list[ConfigRun] = []
    for name in [n for n in config_names if n not in HEAD_CONFIGS]:
        config = CONFIGS[name]
        progress(f"[quality] training {config.name}")
        run = train_one(split, label_set, system_prompt, base_model_name, base_model_dir, recipe, base_overrides,
                        config, work_dir / f"quality-job-{name}", device=device, progress=progress)
        runs.append(run)
        # Written as soon as measured: a run cut short still leaves its figures.
        (raw_dir / f"{name}.json").write_text(json.dumps(_run_data(run), indent=1, default=str), encoding="utf-8")
    return render_quality(result, split, label_set, runs, plot_path, started, heads)


def render_quality(result: SectionResult, split: Split, label_set: LabelSet, runs: list[ConfigRun], plot_path: Path,
                   started: float, heads=None) -> SectionResult:
    """The tables, plot and raw figures of measured ``runs`` (also from their saved JSON: ``load_run``) and of
    the linear-head runs (``bench.linear_head.HeadResults``)."""
    if heads is not None:
        _render_heads(result, heads, len(split.held_out))
    for run in runs:
        if run.error:
            result.skipped.append(f"not measured: {run.config.name}: {run.error}")

    # The baseline at the same numbers of training rows as the adapter's evaluation points, plus a few more.
    n_train = len(split.train)
    points = {min(p["samples"], n_train) for run in runs for p in run.curve}
    points |= {n for n in (16, 32, 64, 128) if n < n_train} | {n_train}
    baseline = {n: baseline_point(split, n, label_set) for n in sorted(points)}
    full = baseline[n_train]

    summary_rows = []
    for run in runs:
        if run.error or not run.curve:
            continue
        last = run.curve[-1]
        best = max(run.curve, key=lambda p: (p["macro_f1"], -p["step"]))
        summary_rows.append([
            run.config.name, run.steps, f"{run.steps * run.batch} ({run.steps * run.batch / n_train:.2f} epochs)",
            run.train_seconds, run.final_loss, last["accuracy"], last["macro_f1"], f"{best['macro_f1']:.3f} (step {best['step']})",
            full["macro_f1"] if full else None,
            "yes" if full and last["macro_f1"] > full["macro_f1"] else "no"])
    result.tables.append(Table(
        ["adapter configuration", "steps", "samples drawn", "training time incl. evaluations (s)",
         "last training loss", "accuracy (last step)", "macro-F1 (last step)", "best macro-F1 during training",
         "baseline macro-F1 (all rows)", "adapter beats baseline"],
        summary_rows, caption=f"{len(split.held_out)} held-out rows; baseline on all {n_train} training rows: "
                              + (f"accuracy {full['accuracy']:.3f}, macro-F1 {full['macro_f1']:.3f}" if full else "–")))
    curve_rows = []
    for run in runs:
        for p in run.curve:
            b = baseline.get(min(p["samples"], n_train))
            curve_rows.append([run.config.name, p["step"], p["samples"], p["accuracy"], p["macro_f1"],
                               b["rows"] if b else None, b["accuracy"] if b else None, b["macro_f1"] if b else None])
    for n, b in baseline.items():
        if b and not any(min(p["samples"], n_train) == n for run in runs for p in run.curve):
            curve_rows.append(["(baseline only)", None, n, None, None, b["rows"], b["accuracy"], b["macro_f1"]])
    result.tables.append(Table(
        ["adapter configuration", "step", "training samples seen", "adapter accuracy", "adapter macro-F1",
         "baseline training rows", "baseline accuracy", "baseline macro-F1"],
        curve_rows, caption="Learning curve (adapter: validation during training on the held-out rows; "
                            "baseline: fitted on the first N training rows)"))
    for run in runs:
        if not run.error:
            result.notes.append(f"`{run.config.name}`: " + ", ".join(f"{k}={v}" for k, v in run.hyper.items()) + ".")

    fig, axes = new_figure(1, width_per_panel=6.5, height=3.6)
    ax = axes[0]
    xs = [n for n, b in baseline.items() if b]
    max_seen = max([p["samples"] for run in runs for p in run.curve] + xs)
    if xs:
        ys = [baseline[n]["macro_f1"] for n in xs]
        ax.plot(xs, ys, "s-", color="gray", label="TF-IDF + LR baseline (first N rows)")
        if max_seen > xs[-1]:
            ax.plot([xs[-1], max_seen], [ys[-1], ys[-1]], ":", color="gray", label="baseline, all rows")
    for run in runs:
        if run.curve:
            ax.plot([p["samples"] for p in run.curve], [p["macro_f1"] for p in run.curve], "o-",
                    label=f"LoRA adapter, {run.config.name}")
    if heads is not None and heads.curve:
        ax.plot([p["rows"] for p in heads.curve], [p["head_macro_f1"] for p in heads.curve], "D-", color="tab:green",
                label="linear head on the frozen base (first N rows)")
    ax.set_xlabel("training samples seen", fontsize=8)
    ax.set_ylabel("macro-F1 on held-out rows", fontsize=8)
    ax.set_title(f"Learning curve, held-out CMCC-34 ({len(split.held_out)} rows)", fontsize=9)
    ax.set_ylim(0, 1.0)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    result.plot = save_figure(fig, plot_path)

    result.notes.append(
        "The adapter's points are measured on the very rows the best checkpoint is chosen on, so \"best macro-F1 "
        "during training\" is an optimistic figure; the last step's is not selected. Samples seen = steps x "
        "batch; with class balancing the draws repeat rare rows, so they are not distinct rows. The adapter "
        "reads each dialogue cut to `max_input_length`; the baseline reads the whole dialogue.")
    result.data = {"split": split.description, "held_out": len(split.held_out), "train": n_train,
                   "runs": [_run_data(r) for r in runs],
                   "head": _head_data(heads),
                   "baseline": {str(n): b for n, b in baseline.items()}}
    result.seconds = time.perf_counter() - started
    return result


def _head_data(heads) -> dict | None:
    from bench.linear_head import head_data

    return head_data(heads) if heads is not None else None


def _render_heads(result: SectionResult, heads, n_held_out: int) -> None:
    for run in heads.runs:
        if run.error:
            result.skipped.append(f"not measured: linear head, class_balance={run.class_balance}: {run.error}")
    full = heads.curve[-1] if heads.curve else None
    rows = []
    for run in heads.runs:
        if run.error:
            continue
        rows.append([f"linear head, class_balance={run.class_balance}", run.seconds, run.accuracy, run.macro_f1,
                     full["baseline_accuracy"] if full else None, full["baseline_macro_f1"] if full else None,
                     "yes" if full and run.macro_f1 > full["baseline_macro_f1"] else "no"])
    result.tables.append(Table(
        ["configuration", "training time (s): load, read, fit", "accuracy", "macro-F1", "baseline accuracy",
         "baseline macro-F1", "beats the baseline's macro-F1"], rows,
        caption=f"Linear head (`head: linear`, the product's training code) on the {n_held_out} held-out real rows, "
                "beside the TF-IDF baseline fitted on the same training rows"))
    if heads.cv:
        cv = heads.cv
        result.tables.append(Table(
            ["classifier", "accuracy", "macro-F1"],
            [["linear head, class_balance=none", *cv["head"]], ["linear head, class_balance=balanced", *cv["head_balanced"]],
             ["TF-IDF + LR baseline", *cv["baseline"]]],
            caption=f"{cv['folds']}-fold cross-validation over the real rows ({cv['held_out']} held-out predictions "
                    "in all; each fold trains on the other real rows plus the synthetic training rows)"))
    if heads.curve:
        result.tables.append(Table(
            ["training rows", "linear head accuracy", "linear head macro-F1", "baseline accuracy", "baseline macro-F1"],
            [[p["rows"], p["head_accuracy"], p["head_macro_f1"], p["baseline_accuracy"], p["baseline_macro_f1"]]
             for p in heads.curve],
            caption="Learning curve of the linear head and the baseline, both fitted on the first N training rows"))
    result.notes.append("Linear head: " + ", ".join(f"{k}={v}" for k, v in heads.hyper.items()) + ". The first "
                        "configuration's time is the recipe's whole cost (model load, features of the training and "
                        "held-out rows, fit); the others reuse its feature checkpoints and cost a fit.")


def load_run(path: Path) -> ConfigRun:
    """A configuration's figures as ``run_quality_section`` saved them (``<work-dir>/quality/<name>.json``)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    run = ConfigRun(QualityConfig(data["name"], data["overrides"]), data["hyper"])
    for key in ("steps", "batch", "train_seconds", "final_loss", "curve", "error"):
        setattr(run, key, data[key])
    return run


def _run_data(run: ConfigRun) -> dict:
    return {"name": run.config.name, "overrides": run.config.overrides, "hyper": run.hyper, "steps": run.steps,
            "batch": run.batch, "train_seconds": run.train_seconds, "final_loss": run.final_loss,
            "curve": run.curve, "error": run.error}

"""Section 4: accuracy and macro-F1 on held-out CMCC-34 rows, fine-tuned adapter vs TF-IDF baseline.

Both are trained on the same training rows (``bench.data.stratified_split``). The adapter is
trained with ``app.ml.train.trainer.train_adapter`` (shared prefix on) from the project's CPU recipe
with a step budget, and evaluated with label scoring (``app.ml.eval.run.evaluate_records``,
``mode="score"``); the baseline is ``app.ml.eval.baseline``. Metrics come from the same
``app.ml.eval.metrics.build_report`` for both.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.domain.labels import LabelSet
from app.domain.records import Record
from bench.data import Split
from bench.report import SectionResult, Table, bar_group, new_figure, save_figure


@dataclass
class AccuracyRun:
    name: str
    trained_on: str
    train_seconds: float | None
    eval_seconds_per_text: float | None
    report: dict


def evaluate_baseline(split: Split, label_set: LabelSet) -> AccuracyRun:
    from app.ml.eval.baseline import fit_baseline, predict
    from app.ml.eval.metrics import build_report

    began = time.perf_counter()
    model = fit_baseline(split.train)
    trained = time.perf_counter() - began
    began = time.perf_counter()
    predictions = predict(model, [r.dialogue for r in split.held_out])
    elapsed = time.perf_counter() - began
    report = build_report(
        y_true=[r.label_id for r in split.held_out], y_pred=[p.label_id for p in predictions], label_set=label_set,
        texts=[r.dialogue for r in split.held_out], raw_outputs=None, elapsed_seconds=elapsed, mode="baseline",
        confidences=[p.confidence for p in predictions],
    )
    return AccuracyRun("TF-IDF char 1-3-grams + logistic regression", f"all {len(split.train)} training rows",
                       trained, elapsed / max(1, len(split.held_out)), report)


def train_bench_adapter(split: Split, label_set: LabelSet, system_prompt: str, base_model_name: str,
                        base_model_dir: Path, config, job_dir: Path, *, device: str | None, progress=print):
    from app.ml.train.trainer import TrainingHooks, train_adapter

    shutil.rmtree(job_dir, ignore_errors=True)  # never resume a previous run's checkpoints

    def on_log(record: dict) -> None:
        progress(f"[accuracy] step {record['step']}/{record['max_steps']} loss {record['loss']:.3f} "
                 f"({record['samples_per_second']:.2f} samples/s)")

    # The Trainer prints its log dicts on stdout, where bench.run writes the report.
    with contextlib.redirect_stdout(sys.stderr):
        return train_adapter(base_model_dir=base_model_dir, base_model_name=base_model_name, records=split.train,
                             label_set=label_set, system_prompt=system_prompt, config=config, job_dir=job_dir,
                             hooks=TrainingHooks(on_log=on_log), device=device)


def evaluate_with_classifier(ref, records: list[Record], label_set: LabelSet, *, device: str | None) -> tuple[dict, float]:
    from app.ml.eval.run import evaluate_records
    from app.ml.infer.classifier import ClassifierRegistry

    registry = ClassifierRegistry(max_adapters=1, device=device)
    try:
        classifier = registry.get(ref)
        began = time.perf_counter()
        report = evaluate_records(classifier, records, label_set, mode="score", batch_size=8, show_progress_bar=False)
        return report, time.perf_counter() - began
    finally:
        registry.clear()


def run_accuracy_section(split: Split | None, label_set: LabelSet, system_prompt: str, base_model_name: str,
                         base_model_dir: Path, config, plot_path: Path, work_dir: Path, *,
                         device: str | None = None, zero_shot: bool = False, skip_reason: str | None = None,
                         progress=print) -> tuple[SectionResult, object | None]:
    """Returns the section and the training result (its adapter is reused by the classify section)."""
    from app.ml.infer.classifier import ModelRef

    started = time.perf_counter()
    result = SectionResult("accuracy", "4. Accuracy on held-out CMCC-34 rows: fine-tuned adapter vs TF-IDF baseline")
    if split is None:
        result.skipped.append(f"not measured: {skip_reason or 'no data'}")
        result.seconds = time.perf_counter() - started
        return result, None

    runs: list[AccuracyRun] = []
    progress("[accuracy] baseline")
    runs.append(evaluate_baseline(split, label_set))

    training = None
    progress(f"[accuracy] training the adapter ({config.max_steps} steps)")
    try:
        training = train_bench_adapter(split, label_set, system_prompt, base_model_name, base_model_dir, config,
                                       work_dir / "accuracy-job", device=device, progress=progress)
        batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
        seen = training.steps * batch
        # As the API serves a trained adapter (app.services.models.resolve_model_ref): dialogues cut
        # at the training max_input_length.
        ref = ModelRef(key="bench-adapter", version="1", base_model_dir=base_model_dir,
                       adapter_dir=training.adapter_dir, system_prompt=system_prompt, label_set=label_set,
                       quantization="auto", max_input_length=config.max_input_length)
        progress(f"[accuracy] evaluating the adapter on {len(split.held_out)} rows (score mode)")
        report, elapsed = evaluate_with_classifier(ref, split.held_out, label_set, device=device)
        runs.append(AccuracyRun(
            f"LoRA adapter on {base_model_name}, label scoring",
            f"{training.steps} steps x {batch} = {seen} samples drawn from the "
            f"{len(split.train)} training rows ({seen / len(split.train):.2f} epochs)",
            training.train_runtime_s, elapsed / len(split.held_out), report))
    except Exception as exc:  # noqa: BLE001 - the section reports what it could not measure
        result.skipped.append(f"not measured: the fine-tuned adapter: {type(exc).__name__}: {exc}")

    if zero_shot:
        progress(f"[accuracy] evaluating the base model zero-shot on {len(split.held_out)} rows")
        try:
            ref = ModelRef(key="bench-zero-shot", version="1", base_model_dir=base_model_dir, adapter_dir=None,
                           system_prompt=system_prompt, label_set=label_set, quantization="auto")
            report, elapsed = evaluate_with_classifier(ref, split.held_out, label_set, device=device)
            runs.append(AccuracyRun(f"{base_model_name} zero-shot (no adapter), label scoring", "nothing", None,
                                    elapsed / len(split.held_out), report))
        except Exception as exc:  # noqa: BLE001
            result.skipped.append(f"not measured: zero-shot base model: {type(exc).__name__}: {exc}")

    n_classes = len({r.label_id for r in split.held_out})
    result.intro = [
        __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        f"Split: {split.description}. The held-out rows cover {n_classes} intents (chance accuracy ~{1 / n_classes:.1%}).",
    ]
    shown = ("quantization", "compute_dtype", "lora_r", "lora_alpha", "lora_dropout", "learning_rate",
             "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "max_input_length", "gradient_checkpointing", "shared_prefix")
    result.intro.append("Adapter hyperparameters: " + ", ".join(f"{k}={getattr(config, k)}" for k in shown) + ".")
    if training is not None:
        loss = f"{training.final_loss:.3f}" if training.final_loss is not None else "–"
        result.intro.append(f"The adapter trained {training.train_runtime_s:.0f} s; last logged training loss {loss}.")
    result.tables.append(Table(
        ["system", "trained on", "training time (s)", "eval s/text", "accuracy", "macro-F1", "failed"],
        [[r.name, r.trained_on, r.train_seconds, r.eval_seconds_per_text, r.report["accuracy"], r.report["macro_f1"],
          r.report["n_failed"]] for r in runs],
        caption=f"{len(split.held_out)} held-out rows",
    ))
    fig, axes = new_figure(1, width_per_panel=6.5)
    bar_group(axes[0], ["accuracy", "macro-F1"],
              {_short_name(r.name): [r.report["accuracy"], r.report["macro_f1"]] for r in runs},
              ylabel="on held-out rows", title=f"Held-out CMCC-34 ({len(split.held_out)} rows)", value_format="{:.2f}")
    axes[0].set_ylim(0, 1.05)
    result.plot = save_figure(fig, plot_path)
    result.notes.append(
        "Macro-F1 averages over the intents present in the held-out truth or the predictions "
        "(`app.ml.eval.metrics.build_report`). The held-out part is small (one real row per intent plus a few "
        "synthetic ones), so one row moves accuracy by several points; the adapter's budget is a few minutes "
        "of CPU, far from a full fine-tune. The adapter reads each dialogue cut to its training "
        "`max_input_length` (as the API serves it); the baseline reads the whole dialogue.")
    result.data = {"split": split.description, "runs": [
        {"name": r.name, "trained_on": r.trained_on, "train_seconds": r.train_seconds,
         "eval_seconds_per_text": r.eval_seconds_per_text,
         **{k: r.report[k] for k in ("accuracy", "macro_f1", "weighted_f1", "n_failed", "n_samples")}} for r in runs]}
    result.seconds = time.perf_counter() - started
    return result, training


def _short_name(name: str) -> str:
    if name.startswith("TF-IDF"):
        return "TF-IDF + LR"
    if "zero-shot" in name:
        return "zero-shot"
    return "LoRA adapter"

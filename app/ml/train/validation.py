"""Validation during training: label-score a fixed sample of the validation set every N steps, keep the
adapter of the best macro-F1, stop early when it no longer improves.

``ValidationCallback`` is a ``TrainerCallback`` and nothing else in the trainer depends on it: the trainer
adds it when ``eval_every_steps`` > 0 and a validation set is given, and asks ``best_validation`` at the
end which weights to save.

- Fast: label scoring (``app.ml.eval.run.score_accuracy_macro_f1``: the serving path) on at most
  ``eval_max_samples`` dialogues, drawn once with the run's seed, on the very model being trained (put in
  eval mode for the pass: no dropout, no activation checkpointing, no gradients).
- Recorded: every evaluation is a ``{"step", "val_accuracy", "val_macro_f1", "val_samples"}`` entry of the
  Trainer's ``log_history`` (so it is in every checkpoint's ``trainer_state.json``, and a resumed run knows
  the evaluations before its checkpoint) and a ``validation`` event.
- Best: when the macro-F1 beats every earlier one (ties keep the earlier step), the LoRA weights are
  written to ``checkpoints/best/step-N/`` (into a temporary folder renamed into place). After every
  checkpoint the snapshots other than the best so far are removed. On resume, snapshots of steps after
  the checkpoint are dropped (those steps run again), and the best is the best entry of the restored
  history, whose snapshot is therefore on disk.
- Early stopping: after ``early_stopping_patience`` evaluations in a row without a better macro-F1 the
  run stops and saves a checkpoint there (a ``{"step", "early_stopped": True}`` history entry), so a
  worker that dies before the adapter is written finds the run over instead of training on.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from app.domain.labels import LabelSet
from app.domain.records import Record
from app.ml.eval.run import score_accuracy_macro_f1

BEST_DIRNAME = "best"
_STEP_PREFIX = "step-"
_WEIGHTS = "adapter_model.safetensors"


def validation_sample(records: list[Record], max_samples: int, seed: int) -> list[Record]:
    """At most ``max_samples`` records, a seeded random subset kept in dataset order."""
    if len(records) <= max_samples:
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), max_samples))
    return [records[i] for i in chosen]


@dataclass(frozen=True)
class BestValidation:
    step: int
    accuracy: float
    macro_f1: float
    snapshot: Path


def validation_entries(log_history: list[dict]) -> list[dict]:
    return [e for e in log_history if "val_macro_f1" in e and "step" in e]


def early_stopped(log_history: list[dict]) -> int | None:
    """The step at which the run stopped early, per its history, else None."""
    return next((int(e["step"]) for e in log_history if e.get("early_stopped")), None)


def _best_entry(entries: list[dict]) -> dict | None:
    best = None
    for entry in entries:  # strictly better only: a tie keeps the earlier (fewer steps) adapter
        if best is None or entry["val_macro_f1"] > best["val_macro_f1"]:
            best = entry
    return best


def best_validation(log_history: list[dict], checkpoints_dir: Path) -> BestValidation | None:
    """The evaluation with the best macro-F1 in ``log_history`` and its snapshot folder, or None."""
    best = _best_entry(validation_entries(log_history))
    if best is None:
        return None
    return BestValidation(step=int(best["step"]), accuracy=float(best["val_accuracy"]),
                          macro_f1=float(best["val_macro_f1"]),
                          snapshot=_snapshot_dir(checkpoints_dir, int(best["step"])))


def _snapshot_dir(checkpoints_dir: Path, step: int) -> Path:
    return Path(checkpoints_dir) / BEST_DIRNAME / f"{_STEP_PREFIX}{step}"


def _snapshots(checkpoints_dir: Path) -> dict[int, Path]:
    folder = Path(checkpoints_dir) / BEST_DIRNAME
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        suffix = path.name.removeprefix(_STEP_PREFIX)
        if path.name.startswith(_STEP_PREFIX) and suffix.isdigit() and (path / _WEIGHTS).is_file():
            found[int(suffix)] = path
    return found


def load_snapshot(model, snapshot: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(snapshot) / _WEIGHTS)))


def _save_snapshot(model, snapshot: Path, record: dict) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    staging = snapshot.with_name(f".{snapshot.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(staging / _WEIGHTS))
    (staging / "validation.json").write_text(json.dumps(record), encoding="utf-8")
    shutil.rmtree(snapshot, ignore_errors=True)
    staging.rename(snapshot)


class ValidationCallback(TrainerCallback):
    """Evaluates every ``every`` optimizer steps and at the last one (see the module docstring).

    ``on_event(kind, message, data)`` gets a ``validation`` event per evaluation and ``early_stopped``;
    ``skip()`` True (a cancel was requested this step) skips the evaluation.
    """

    def __init__(self, *, model, tokenizer, system_prompt: str, label_set: LabelSet, records: list[Record],
                 every: int, patience: int, max_input_length: int | None, checkpoints_dir: Path,
                 on_event: Callable[[str, str, dict], None], skip: Callable[[], bool] = lambda: False):
        self.model, self.tokenizer, self.system_prompt, self.label_set = model, tokenizer, system_prompt, label_set
        self.records, self.every, self.patience = records, every, patience
        self.max_input_length, self.checkpoints_dir = max_input_length, Path(checkpoints_dir)
        self.on_event, self.skip = on_event, skip
        self.best: dict | None = None
        self.since_best = 0
        self.stopped_early = False

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run: the evaluations before its checkpoint are in the restored history.
        entries = [e for e in validation_entries(state.log_history) if e["step"] <= state.global_step]
        self.best = _best_entry(entries)
        self.since_best = sum(1 for e in entries if self.best is not None and e["step"] > self.best["step"])
        if not state.is_world_process_zero:
            return
        for step, path in _snapshots(self.checkpoints_dir).items():
            if step > state.global_step:  # written after the checkpoint: that step runs again
                shutil.rmtree(path, ignore_errors=True)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.skip() or not (step % self.every == 0 or step >= state.max_steps):
            return
        accuracy, macro_f1 = score_accuracy_macro_f1(
            self.model, self.tokenizer, self.system_prompt, self.label_set, self.records,
            max_input_length=self.max_input_length)
        record = {"step": step, "val_accuracy": accuracy, "val_macro_f1": macro_f1, "val_samples": len(self.records)}
        state.log_history.append(record)
        improved = self.best is None or macro_f1 > self.best["val_macro_f1"]
        # Under several processes every rank scores the same sample with the same weights (so all take the
        # same early-stopping decision); the first one alone writes files and events.
        writer = state.is_world_process_zero
        if improved:
            if writer:
                _save_snapshot(self.model, _snapshot_dir(self.checkpoints_dir, step), record)
            self.best, self.since_best = record, 0
        else:
            self.since_best += 1
        if writer:
            self.on_event("validation", f"step {step}: validation accuracy {accuracy:.4f}, macro-F1 {macro_f1:.4f} "
                          f"on {len(self.records)} dialogues" + (" (best so far)" if improved else ""),
                          {"step": step, "accuracy": accuracy, "macro_f1": macro_f1, "n_samples": len(self.records),
                           "best_step": self.best["step"], "best_macro_f1": self.best["val_macro_f1"],
                           "improved": improved})
        if self.patience and self.since_best >= self.patience and step < state.max_steps:
            self.stopped_early = True
            state.log_history.append({"step": step, "early_stopped": True})
            control.should_training_stop = True
            control.should_save = True  # the stop is a checkpoint: a restarted worker finds the run over
            if writer:
                self.on_event("early_stopped", f"early stopping at step {step}: no better macro-F1 in "
                              f"{self.since_best} evaluations (best {self.best['val_macro_f1']:.4f} at step "
                              f"{self.best['step']})", {"step": step, "best_step": self.best["step"],
                                                        "best_macro_f1": self.best["val_macro_f1"]})

    def on_save(self, args, state, control, **kwargs):
        # The checkpoint at this step is complete: only the best snapshot so far can still be needed.
        if not state.is_world_process_zero:
            return
        keep = self.best["step"] if self.best is not None else None
        for step, path in _snapshots(self.checkpoints_dir).items():
            if step != keep:
                shutil.rmtree(path, ignore_errors=True)

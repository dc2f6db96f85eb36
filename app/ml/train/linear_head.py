"""Train a linear classification head on a frozen base model (``TrainingConfig.head = "linear"``).

Why: on a 2-core CPU a LoRA adapter on the embedded 0.5B model does not learn CMCC-34's 34 intents from a
few hundred dialogues within the demo's minutes, while a logistic regression on the frozen model's hidden
states beats the TF-IDF baseline there (docs/benchmarks.md §5). The work is one forward per dialogue
(no backward, no optimizer state) and a second of scikit-learn.

1. Features: ``LabelScorer.features`` (the serving code itself) over the training dialogues, a batch of
   ``per_device_train_batch_size`` at a time. Every batch is a checkpoint (``checkpoints/features/``,
   written to a temporary name then renamed), tagged with a fingerprint of what produced it (base model,
   system prompt, input cut, dialogues): a worker that dies resumes after the last batch it wrote, and
   features of other data are never reused.
2. Fit: standardisation + ``LogisticRegression(C=head_c)``; ``class_balance`` weighs the rows as the
   sampler would draw them (``app.ml.train.balance.sample_weights``).
3. With a validation set and ``eval_every_steps`` > 0: the features of its seeded sample of
   ``eval_max_samples`` the same way, then accuracy / macro-F1 as a ``validation`` event and entry (the
   head has one fit, so one evaluation).
4. Saved like an adapter (``job_dir/adapter``: ``linear_head.safetensors``, the tokenizer and
   ``intent_tuner.json`` with ``"head": "linear"``), staged and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from app.domain.artifacts import (
    ADAPTER_DIRNAME,
    ADAPTER_METADATA_FILENAME,
    CHECKPOINTS_DIRNAME,
)
from app.domain.labels import LabelSet
from app.domain.records import Record
from app.ml.models.linear_head import LinearHead
from app.ml.models.loading import load_base_model
from app.ml.train.balance import sample_weights
from app.ml.train.config import TrainingConfig
from app.ml.train.trainer import TrainingHooks, TrainingResult, _answers, _distributed
from app.ml.train.validation import validation_sample

FEATURES_DIRNAME = "features"


class _Cancelled(Exception):
    pass


FEATURES_VERSION = "mean-final-hidden-1"  # what LabelScorer.features computes; change it when that changes


def _fingerprint(base_model_name: str, system_prompt: str, config: TrainingConfig, loaded, texts: list[str]) -> str:
    """What produced a feature batch: the model as loaded (a job moved from a GPU to a CPU worker loads it
    otherwise under quantization "auto"), the prompt, the cut, the batch size (parts are keyed by their start
    row) and the dialogues."""
    digest = hashlib.sha256()
    for part in (FEATURES_VERSION, base_model_name, system_prompt, str(config.max_input_length),
                 loaded.quantization, str(loaded.dtype), str(config.per_device_train_batch_size), *texts):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


class FeatureStore:
    """Feature batches of one named text list under ``directory``, valid for one fingerprint."""

    def __init__(self, directory: Path, name: str, fingerprint: str):
        self.directory, self.name, self.fingerprint = Path(directory), name, fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / f"{name}.json"
        try:
            known = json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):  # absent, or cut short by a kill: start over
            known = None
        if known != fingerprint:  # other data or settings: nothing here can be reused
            for part in self.directory.glob(f"{name}-*.safetensors"):
                part.unlink()
            staging = manifest.with_name(f".{manifest.name}.partial")
            staging.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
            os.replace(staging, manifest)

    def _part(self, start: int) -> Path:
        return self.directory / f"{self.name}-{start:07d}.safetensors"

    def done(self, batch: int, total: int) -> list[torch.Tensor]:
        """The batches already written, in order, up to the first gap."""
        from safetensors.torch import load_file

        parts = []
        for start in range(0, total, batch):
            path = self._part(start)
            if not path.is_file():
                break
            parts.append(load_file(str(path))["features"])
        return parts

    def write(self, start: int, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._part(start)
        staging = path.with_name(f".{path.name}.partial")
        save_file({"features": features.contiguous()}, str(staging))
        os.replace(staging, path)


def extract_features(scorer, texts: list[str], store: FeatureStore, *, batch: int, hooks: TrainingHooks,
                     phase: str) -> torch.Tensor:
    """Features of ``texts`` (``scorer.features``), reusing and writing ``store``'s batches."""
    parts = store.done(batch, len(texts))
    done = min(len(texts), len(parts) * batch)
    if done:
        hooks.on_event("resumed", f"{phase}: {done}/{len(texts)} dialogues read before, kept",
                       {"phase": phase, "done": done, "total": len(texts)})
    started, first, last_tenth = time.monotonic(), done, done * 10 // max(1, len(texts))
    for start in range(done, len(texts), batch):
        if hooks.should_stop():
            raise _Cancelled(phase)
        features = scorer.features(texts[start : start + batch], batch_size=batch)
        store.write(start, features)
        parts.append(features)
        done = min(len(texts), start + batch)
        elapsed = time.monotonic() - started
        eta = elapsed / (done - first) * (len(texts) - done)
        hooks.on_progress({"phase": phase, "features_done": done, "features_total": len(texts),
                           "eta_seconds": round(eta, 1)})
        tenth = done * 10 // len(texts)
        if tenth > last_tenth:
            last_tenth = tenth
            hooks.on_event("features", f"{phase}: read {done}/{len(texts)} dialogues in {elapsed:.0f} s "
                           f"(~{eta:.0f} s left)", {"phase": phase, "done": done, "total": len(texts)})
    return torch.cat(parts) if parts else torch.zeros((0, 0))


def fit_linear_head(features: torch.Tensor, label_ids: list[int], label_set: LabelSet, *, c: float,
                    class_balance: str) -> tuple[LinearHead, float]:
    """A logistic regression on standardised ``features``, as a head over every label of ``label_set``
    (a label with no training row gets a large negative bias); returns it and its weighted training log-loss."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    if len(set(label_ids)) < 2:
        raise ValueError("a linear head needs training rows of at least two intents")
    x = features.double().numpy()
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    weights = np.asarray(sample_weights(label_ids, class_balance))
    weights *= len(weights) / weights.sum()  # mean weight 1: C means the same whatever the balance
    with warnings.catch_warnings():
        # "more unique classes than half the samples": a few rows per intent is this head's normal case
        warnings.filterwarnings("ignore", message=".*number of unique classes.*", category=UserWarning)
        model = LogisticRegression(C=c, max_iter=2000).fit(z, label_ids, sample_weight=weights)
    loss = float(log_loss(label_ids, model.predict_proba(z), sample_weight=weights, labels=model.classes_))
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # scikit-learn keeps one row for two classes: sigmoid(w.x + b) = softmax([0, w.x + b])
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    classes = [int(c) for c in model.classes_]
    hidden = x.shape[1]
    weight = torch.zeros((len(label_set), hidden), dtype=torch.float32)
    bias = torch.full((len(label_set),), float(intercept.min()) - 30.0, dtype=torch.float32)
    for row, label in enumerate(label_set.ids):
        if label in classes:
            weight[row] = torch.from_numpy(coef[classes.index(label)]).float()
            bias[row] = float(intercept[classes.index(label)])
    scale = torch.from_numpy(scaler.scale_).float()
    return LinearHead(list(label_set.ids), torch.from_numpy(scaler.mean_).float(), scale, weight, bias), loss


def train_linear_head(
    *,
    base_model_dir: Path,
    base_model_name: str,
    records: list[Record],
    label_set: LabelSet,
    system_prompt: str,
    config: TrainingConfig,
    job_dir: Path,
    hooks: TrainingHooks,
    device: str | None = None,
    validation_records: list[Record] | None = None,
) -> TrainingResult:
    """Train and save a linear head (see the module docstring); ``train_adapter`` calls it for ``head="linear"``."""
    from app.ml.eval.run import accuracy_macro_f1
    from app.ml.infer.scoring import LabelScorer

    if _distributed() and torch.distributed.get_world_size() > 1:
        raise ValueError("a linear head trains in one process (set resources.processes / gpus to 1)")
    if not records:
        raise ValueError("no training records")
    _answers(records, label_set)  # every label is in the set
    validating = bool(config.eval_every_steps and validation_records)
    if validating:
        _answers(validation_records, label_set)
        validation_records = validation_sample(validation_records, config.eval_max_samples, config.seed)
    if len({r.label_id for r in records}) < 2:
        raise ValueError("a linear head needs training rows of at least two intents")

    loaded = load_base_model(Path(base_model_dir), quantization=config.quantization,
                             compute_dtype=config.compute_dtype, device=device,
                             bnb_quant_type=config.bnb_4bit_quant_type, double_quant=config.bnb_4bit_use_double_quant)
    hooks.on_event("model_loaded", f"{base_model_name} loaded on {loaded.device} ({loaded.quantization}, "
                   f"{str(loaded.dtype).removeprefix('torch.')}), frozen: training a linear head",
                   {"base_model": base_model_name, "quantization": loaded.quantization, "dtype": str(loaded.dtype),
                    "device": str(loaded.device), "head": "linear"})
    scorer = LabelScorer(loaded.model, loaded.tokenizer, system_prompt, label_set,
                         max_input_length=config.max_input_length)
    store_dir = Path(job_dir) / CHECKPOINTS_DIRNAME / FEATURES_DIRNAME
    batch = config.per_device_train_batch_size
    texts = [r.dialogue for r in records]
    started = time.monotonic()
    try:
        with torch.inference_mode():
            train_store = FeatureStore(store_dir, "train",
                                       _fingerprint(base_model_name, system_prompt, config, loaded, texts))
            features = extract_features(scorer, texts, train_store, batch=batch, hooks=hooks, phase="training set")
            if validating:
                val_texts = [r.dialogue for r in validation_records]
                val_store = FeatureStore(store_dir, "validation",
                                         _fingerprint(base_model_name, system_prompt, config, loaded, val_texts))
                val_features = extract_features(scorer, val_texts, val_store, batch=batch, hooks=hooks,
                                                phase="validation set")
    except _Cancelled as stopped:
        hooks.on_event("cancelled", f"cancelled while reading the {stopped}; the batches read are kept", {"step": 0})
        return TrainingResult(None, True, 0, None, time.monotonic() - started, loaded.quantization)

    label_ids = [r.label_id for r in records]
    head, loss = fit_linear_head(features, label_ids, label_set, c=config.head_c, class_balance=config.class_balance)
    runtime = time.monotonic() - started
    hooks.on_log({"step": 1, "max_steps": 1, "epoch": 1.0, "loss": loss, "learning_rate": None,
                  "samples_per_second": len(texts) / runtime if runtime > 0 else None, "eta_seconds": 0})
    history = [{"step": 1, "loss": loss}]
    validation_history = []
    if validating:
        accuracy, macro_f1 = accuracy_macro_f1([r.label_id for r in validation_records], head.predict_ids(val_features))
        validation_history = [{"step": 1, "accuracy": accuracy, "macro_f1": macro_f1,
                               "n_samples": len(validation_records)}]
        hooks.on_event("validation", f"validation: accuracy {accuracy:.4f}, macro-F1 {macro_f1:.4f} on "
                       f"{len(validation_records)} dialogues", validation_history[0])
    counts = {str(label): n for label, n in sorted(Counter(label_ids).items())}
    metrics = {
        "global_step": 1, "max_steps": 1, "final_loss": loss, "train_runtime": runtime, "head": "linear",
        "head_c": config.head_c, "n_samples": len(texts), "feature_size": int(features.shape[1]),
        "samples_per_second": len(texts) / runtime if runtime > 0 else None, "device": str(loaded.device),
        "dtype": str(loaded.dtype), "processes": 1, "class_balance": config.class_balance,
        "samples_per_class": counts, "trainable_parameters": int(head.weight.numel() + head.bias.numel()),
        "fallback_texts": scorer.fallback_texts,
    }
    if validation_history:
        metrics.update(best_step=1, best_val_accuracy=validation_history[0]["accuracy"],
                       best_val_macro_f1=validation_history[0]["macro_f1"])

    adapter_dir = Path(job_dir) / ADAPTER_DIRNAME
    staging = Path(job_dir) / f".{ADAPTER_DIRNAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a worker killed while saving
    staging.mkdir(parents=True)
    head.save(staging)
    loaded.tokenizer.save_pretrained(str(staging))
    (staging / ADAPTER_METADATA_FILENAME).write_text(json.dumps({
        "head": "linear", "system_prompt": system_prompt, "label_set": label_set.to_pairs(),
        "base_model": base_model_name, "training_config": config.model_dump(), "quantization": loaded.quantization,
        "metrics": metrics, "loss_history": history, "validation_history": validation_history,
    }, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.rename(staging, adapter_dir)
    hooks.on_event("finished", f"linear head trained on {len(texts)} dialogues (training log-loss {loss:.4f})",
                   {"step": 1, "adapter_dir": str(adapter_dir), "final_loss": loss})
    return TrainingResult(adapter_dir, False, 1, loss, runtime, loaded.quantization, history, metrics,
                          validation_history)

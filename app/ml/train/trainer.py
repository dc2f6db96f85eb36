"""The training job: LoRA/QLoRA fine-tuning of a base model on (dialogue, intent) records.

``train_adapter`` is everything a worker calls: load the base (4-bit where it pays, see
``app.ml.models.loading``), encode the records with the model's chat template (``app.ml.text.encoding``),
attach LoRA, and train with the Hugging Face ``Trainer``, which brings checkpoints (adapter,
optimizer, scheduler, RNG state) and exact resumption for free. The loss is computed by
``app.ml.train.shared_prefix``: the system prompt runs once per batch when the model supports it, the
ordinary full batch otherwise; both compute logits only where there is a label.

A job is a directory: ``checkpoints/checkpoint-N`` while it runs (a restarted worker resumes
from the newest complete one, losing at most ``save_steps``), ``adapter/`` when it succeeds
(adapter weights + config, tokenizer, ``intent_tuner.json`` metadata, ``loss_curve.png``). The
adapter folder is written aside and renamed into place, so its presence means the training is
done: a job run again (its worker died while evaluating) never trains a second time.
The caller observes and steers it through ``TrainingHooks``: log records, events, and a
cancel flag polled after every optimizer step.

Under ``torchrun`` (``WORLD_SIZE`` > 1, one process per GPU, or gloo on CPU) every rank calls
``train_adapter`` alike: the Trainer runs DDP, the loss goes through the DDP wrapper so gradients are
averaged, every rank computes its own batch's shared prefix, the cancel flag is agreed by all ranks at
each step, and rank 0 alone writes checkpoints (the Trainer's rule) and the adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# app.ml.models.loading first: it silences a bitsandbytes log line emitted when transformers imports it.
from app.ml.models.loading import LoadedModel, load_base_model  # isort: skip

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from app.domain.artifacts import (
    ADAPTER_DIRNAME,
    ADAPTER_METADATA_FILENAME,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIRNAME,
    LOSS_CURVE_FILENAME,
)
from app.domain.labels import LabelSet
from app.domain.prompt import format_answer
from app.domain.records import Record
from app.ml.text.encoding import ChatCollator, EncodedDataset, encode_dataset
from app.ml.train.balance import ClassBalancedSampler, class_shares, sample_weights
from app.ml.train.config import TrainingConfig, deepspeed_config_path
from app.ml.train.shared_prefix import (
    naive_loss,
    shared_prefix_loss,
    supports_shared_prefix,
)
from app.ml.train.validation import (
    ValidationCallback,
    best_validation,
    early_stopped,
    load_snapshot,
    validation_entries,
    validation_sample,
)

logger = logging.getLogger(__name__)

_TRAINER_STATE = "trainer_state.json"  # written last by Trainer: its presence marks a complete checkpoint


def _noop(*_args, **_kwargs) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class TrainingHooks:
    """How a caller follows and steers a run (all optional; called from the training thread).

    - ``on_log(record)`` every ``logging_steps``: step, max_steps, epoch, loss, learning_rate,
      tokens_per_second, samples_per_second, steps_per_second, eta_seconds.
    - ``on_event(kind, message, data)``: "model_loaded", "dataset_encoded", "resumed",
      "checkpoint_saved", "cancelled", "finished", "training_done" (finished earlier: nothing
      trained), "warning", "class_balance", and with a validation set "validation" (every
      ``eval_every_steps``), "early_stopped", "best_checkpoint".
    - ``should_stop()`` polled after every optimizer step (and before training starts): True
      cancels the run within one step; checkpoints are kept, no adapter is written.
    - ``on_progress(progress)``: progress of work before any step (a linear head reading its
      dialogues: phase, features_done, features_total, eta_seconds).
    """

    on_log: Callable[[dict], None] = _noop
    on_event: Callable[[str, str, dict], None] = _noop
    should_stop: Callable[[], bool] = _never
    on_progress: Callable[[dict], None] = _noop


@dataclass
class TrainingResult:
    adapter_dir: Path | None  # None when cancelled
    cancelled: bool
    steps: int  # optimizer steps done (global step, counting steps before a resume)
    final_loss: float | None  # the last logged training loss
    train_runtime_s: float  # wall time of this call's training loop
    quantization: str  # "4bit" | "none", as used
    loss_history: list[dict] = field(default_factory=list)  # [{"step", "loss"}], including before a resume
    metrics: dict = field(default_factory=dict)
    # [{"step", "accuracy", "macro_f1", "n_samples"}]: the evaluations during training (eval_every_steps)
    validation_history: list[dict] = field(default_factory=list)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` (a worker killed mid-save leaves an incomplete one)."""
    if not checkpoints_dir.is_dir():
        return None
    complete = []
    for path in checkpoints_dir.iterdir():
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            if (path / _TRAINER_STATE).is_file():
                complete.append((int(suffix), path))
    return max(complete)[1] if complete else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def finished_training(job_dir: Path) -> TrainingResult | None:
    """The result of a training that already finished in ``job_dir`` (its adapter is in place), else None."""
    adapter_dir = Path(job_dir) / ADAPTER_DIRNAME
    meta_path = adapter_dir / ADAPTER_METADATA_FILENAME
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    metrics = meta.get("metrics") or {}
    return TrainingResult(
        adapter_dir=adapter_dir, cancelled=False, steps=int(metrics.get("global_step") or 0),
        final_loss=metrics.get("final_loss"), train_runtime_s=float(metrics.get("train_runtime") or 0.0),
        quantization=meta.get("quantization", "none"), loss_history=meta.get("loss_history") or [], metrics=metrics,
        validation_history=meta.get("validation_history") or [],
    )


def _final_checkpoint_state(checkpoint: Path | None) -> dict | None:
    """trainer_state.json of ``checkpoint`` when it was saved at the run's last step (or where it stopped
    early), else None."""
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / _TRAINER_STATE).read_text(encoding="utf-8"))
    if 0 < state.get("max_steps", 0) <= state.get("global_step", 0):
        return state
    if early_stopped(state.get("log_history") or []) == state.get("global_step"):
        return state
    return None


def _load_checkpoint_adapter(model, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


class _ListDataset(torch.utils.data.Dataset):
    """The encoded samples; remembers the label of each row fetched, in order (what class_balance changes)."""

    def __init__(self, items: list[dict], label_ids: list[int]):
        self.items, self.label_ids = items, label_ids
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        self.fetched.append(self.label_ids[index])
        return self.items[index]

    def drawn_per_class(self, consumed: int) -> dict[str, int]:
        """Rows of each label among the first ``consumed`` fetched (the data loader fetches one batch ahead)."""
        counts: dict[int, int] = {}
        for label in self.fetched[:consumed]:
            counts[label] = counts.get(label, 0) + 1
        return {str(k): v for k, v in sorted(counts.items())}


@dataclass
class _Throughput:
    """Tokens and samples the loss has consumed (tokens as a naive batch counts them, without padding).

    Under DDP each rank counts its own batches; ``processes`` scales them to an estimate for all ranks."""

    tokens: int = 0
    samples: int = 0
    processes: int = 1

    def add(self, batch: dict) -> None:
        if "prefix_ids" in batch:
            n = batch["suffix_ids"].shape[0]
            tokens = int(batch["prefix_ids"].numel()) * n + int(batch["suffix_mask"].sum())
        else:
            n = batch["input_ids"].shape[0]
            tokens = int(batch["attention_mask"].sum())
        self.tokens += tokens * self.processes
        self.samples += n * self.processes


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on any (a collective: every rank must call it)."""
    if not _distributed():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def _is_wrapper(model) -> bool:
    """DDP, FSDP (v1) or a DeepSpeed engine: a wrapper whose own forward must run for its hooks to work."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, FullyShardedDataParallel)) \
        or type(model).__name__ == "DeepSpeedEngine"


def _loss_through_wrapper(model, loss_fn, inputs: dict, num_items_in_batch):
    """Call ``loss_fn(unwrapped, **inputs)`` through ``model``'s own forward when it is wrapped.

    DistributedDataParallel averages gradients only for a forward that went through its wrapper (its
    forward arms the reducer for the coming backward); FSDP and DeepSpeed gather sharded weights in theirs.
    These losses call the decoder directly, so the inner module's forward is swapped for the loss for the
    length of one wrapped call.
    """
    if not _is_wrapper(model):
        return loss_fn(model, num_items_in_batch=num_items_in_batch, **inputs)
    inner = model.module
    missing = object()
    saved = inner.__dict__.get("forward", missing)  # accelerate may have patched it (mixed precision)
    inner.forward = lambda **batch: loss_fn(inner, num_items_in_batch=num_items_in_batch, **batch)
    try:
        return model(**inputs)
    finally:
        if saved is missing:
            del inner.forward
        else:
            inner.forward = saved


class _IntentTrainer(Trainer):
    """``Trainer`` whose loss is ``shared_prefix_loss`` or ``naive_loss`` (chosen by the batch's shape)."""

    def __init__(self, *args, throughput: _Throughput, sample_weights: list[float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.throughput = throughput
        self.sample_weights = sample_weights

    def _get_train_sampler(self, train_dataset=None):
        # class_balance (app.ml.train.balance): weighted draws instead of one pass in random order.
        if self.sample_weights is None:
            return super()._get_train_sampler(train_dataset)
        return ClassBalancedSampler(self.sample_weights, seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Normalised by the item count of the whole accumulated batch when the Trainer gives it.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        loss_fn = shared_prefix_loss if "prefix_ids" in inputs else naive_loss
        # Trainer autocasts by patching model.forward; these losses call the decoder directly.
        with self.accelerator.autocast():
            loss = _loss_through_wrapper(model, loss_fn, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                and self.accelerator.num_processes > 1:
            # num_items_in_batch counts the tokens of all ranks, and DDP averages the ranks' gradients: the
            # Trainer's own loss is scaled back the same way (Trainer.compute_loss).
            loss = loss * self.accelerator.num_processes
        self.throughput.add(inputs)
        return (loss, None) if return_outputs else loss


class _ProgressCallback(TrainerCallback):
    """Forwards Trainer logs as progress records (with throughput and ETA) and saves as events."""

    def __init__(self, hooks: TrainingHooks, throughput: _Throughput, checkpoints_dir: Path):
        self.hooks, self.throughput, self.checkpoints_dir = hooks, throughput, checkpoints_dir
        self.start_time = self.window_time = time.monotonic()
        self.start_step = self.window_step = 0
        self.window_tokens = self.window_samples = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.window_time = time.monotonic()
        self.start_step = self.window_step = state.global_step
        self.window_tokens, self.window_samples = self.throughput.tokens, self.throughput.samples

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now = time.monotonic()
        window = max(now - self.window_time, 1e-9)
        done = state.global_step - self.start_step
        per_step = (now - self.start_time) / done if done > 0 else None
        record = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": state.epoch,
            "loss": float(logs["loss"]),
            "learning_rate": logs.get("learning_rate"),
            "tokens_per_second": (self.throughput.tokens - self.window_tokens) / window,
            "samples_per_second": (self.throughput.samples - self.window_samples) / window,
            "steps_per_second": (state.global_step - self.window_step) / window,
            "eta_seconds": per_step * (state.max_steps - state.global_step) if per_step is not None else None,
        }
        self.window_time, self.window_step = now, state.global_step
        self.window_tokens, self.window_samples = self.throughput.tokens, self.throughput.samples
        self.hooks.on_log(record)

    def on_save(self, args, state, control, **kwargs):
        path = self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        self.hooks.on_event("checkpoint_saved", f"checkpoint saved at step {state.global_step}",
                            {"step": state.global_step, "path": str(path)})


class _CancelCallback(TrainerCallback):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.cancelled = False

    def on_step_end(self, args, state, control, **kwargs):
        # All ranks must stop at the same step (a rank that went on would wait for the others forever).
        if _any_rank(self.should_stop(), args.device):
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = False  # cancel now, not after a checkpoint write


def _answers(records: list[Record], label_set: LabelSet) -> list[tuple[str, str]]:
    pairs = []
    for index, record in enumerate(records):
        try:
            name = label_set.name_of(record.label_id)
        except KeyError:
            raise ValueError(f"record {index} has label id {record.label_id}, which is not in the label set") from None
        pairs.append((record.dialogue, format_answer(record.label_id, name)))
    return pairs


def _lora_config(config: TrainingConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _training_arguments(config: TrainingConfig, output_dir: Path, loaded: LoadedModel) -> TrainingArguments:
    on_cpu = loaded.device.type == "cpu"
    mixed = loaded.dtype if loaded.dtype in (torch.bfloat16, torch.float16) else None
    distributed = {}
    if _distributed():
        # Every LoRA weight takes part in every step: DDP need not search the graph for unused ones.
        distributed = {"ddp_backend": "gloo" if on_cpu else None, "ddp_find_unused_parameters": False}
    if config.deepspeed:
        _check_deepspeed(config)
        distributed["deepspeed"] = str(deepspeed_config_path(config.deepspeed))
    return TrainingArguments(
        **distributed,
        output_dir=str(output_dir),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        report_to="none",
        seed=config.seed,
        bf16=mixed is torch.bfloat16,
        fp16=mixed is torch.float16 and not on_cpu,
        use_cpu=on_cpu,
        # Checkpointing (non-reentrant) is set up by load_base_model; the Trainer must not redo it.
        activation_checkpointing=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=not on_cpu,
        disable_tqdm=False,  # the worker log shows the progress bar
    )


def _check_deepspeed(config: TrainingConfig) -> None:
    import importlib.util

    if config.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"hyperparameters.deepspeed '{config.deepspeed}' needs the deepspeed package on the "
                         "worker (pip install deepspeed)")


def _loss_history(log_history: list[dict]) -> list[dict]:
    return [{"step": int(e["step"]), "loss": float(e["loss"])} for e in log_history if "loss" in e and "step" in e]


def _validation_history(log_history: list[dict]) -> list[dict]:
    return [{"step": int(e["step"]), "accuracy": float(e["val_accuracy"]), "macro_f1": float(e["val_macro_f1"]),
             "n_samples": int(e.get("val_samples") or 0)} for e in validation_entries(log_history)]


def train_adapter(
    *,
    base_model_dir: Path,
    base_model_name: str,
    records: list[Record],
    label_set: LabelSet,
    system_prompt: str,
    config: TrainingConfig,
    job_dir: Path,
    hooks: TrainingHooks | None = None,
    device: str | None = None,
    validation_records: list[Record] | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on ``records`` and save it under ``job_dir/adapter`` (see the module docstring);
    with ``config.head == "linear"`` a linear head on the frozen model instead (``app.ml.train.linear_head``).

    Resumes from ``job_dir/checkpoints`` when a checkpoint exists. Raises on bad input (an empty
    dataset, a label outside ``label_set``, a prompt longer than ``max_input_length``).
    With ``validation_records`` and ``config.eval_every_steps`` > 0, a sample of them is label-scored
    during training and the adapter saved is the one of the best macro-F1 (``app.ml.train.validation``).
    """
    from peft import get_peft_model

    hooks = hooks or TrainingHooks()
    job_dir = Path(job_dir)
    checkpoints_dir = job_dir / CHECKPOINTS_DIRNAME
    done = finished_training(job_dir)
    if done is not None:
        hooks.on_event("training_done", f"training already finished at step {done.steps}; its adapter is kept, "
                       "nothing is trained again", {"step": done.steps, "adapter_dir": str(done.adapter_dir)})
        return done
    if config.head == "linear":
        from app.ml.train.linear_head import train_linear_head

        return train_linear_head(base_model_dir=base_model_dir, base_model_name=base_model_name, records=records,
                                 label_set=label_set, system_prompt=system_prompt, config=config, job_dir=job_dir,
                                 hooks=hooks, device=device, validation_records=validation_records)
    if not records:
        raise ValueError("no training records")
    pairs = _answers(records, label_set)
    _check_deepspeed(config)
    validating = bool(config.eval_every_steps and validation_records)
    if validating:
        _answers(validation_records, label_set)  # the same check: every validation label is in the set
    check_target_modules(Path(base_model_dir), config.target_modules)
    set_seed(config.seed)

    loaded = load_base_model(
        Path(base_model_dir),
        quantization=config.quantization,
        compute_dtype=config.compute_dtype,
        device=device,
        for_training=True,
        bnb_quant_type=config.bnb_4bit_quant_type,
        double_quant=config.bnb_4bit_use_double_quant,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    with warnings.catch_warnings():
        # peft reads the deprecated ``is_gradient_checkpointing``; nothing for a job log to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(loaded.model, _lora_config(config))
    trainable, total = model.get_nb_trainable_parameters()
    use_shared_prefix = config.shared_prefix and supports_shared_prefix(model)
    hooks.on_event(
        "model_loaded",
        f"{base_model_name} loaded on {loaded.device} ({loaded.quantization}, {str(loaded.dtype).removeprefix('torch.')})",
        {
            "base_model": base_model_name, "quantization": loaded.quantization, "dtype": str(loaded.dtype),
            "device": str(loaded.device), "trainable_parameters": trainable, "total_parameters": total,
            "shared_prefix": use_shared_prefix,
        },
    )

    encoded: EncodedDataset = encode_dataset(
        loaded.tokenizer, system_prompt, pairs,
        max_input_length=config.max_input_length, max_output_length=config.max_output_length,
    )
    hooks.on_event(
        "dataset_encoded",
        f"{len(encoded.samples)} samples encoded ({encoded.n_truncated} truncated), "
        f"{len(encoded.prefix_ids)} shared prefix tokens",
        {**encoded.stats, "n_truncated": encoded.n_truncated},
    )
    if _any_rank(hooks.should_stop(), loaded.device):
        hooks.on_event("cancelled", "cancelled before training started", {"step": 0})
        return TrainingResult(None, True, 0, None, 0.0, loaded.quantization)

    label_ids = [r.label_id for r in records]
    dataset = _ListDataset([{"input_ids": s.input_ids, "labels": s.labels} for s in encoded.samples], label_ids)
    weights = None
    if config.class_balance != "none":
        weights = sample_weights(label_ids, config.class_balance)
        shares = class_shares(label_ids, config.class_balance)
        hooks.on_event("class_balance", f"class_balance={config.class_balance}: rarest class drawn "
                       f"{min(shares.values()):.1%}, commonest {max(shares.values()):.1%} of the time",
                       {"mode": config.class_balance, "shares": {str(k): v for k, v in shares.items()}})
    collator = ChatCollator(
        pad_token_id=loaded.tokenizer.pad_token_id,
        prefix_length=len(encoded.prefix_ids) if use_shared_prefix else 0,
    )
    processes = torch.distributed.get_world_size() if _distributed() else 1
    throughput = _Throughput(processes=processes)
    cancel = _CancelCallback(hooks.should_stop)
    callbacks = [_ProgressCallback(hooks, throughput, checkpoints_dir), cancel]
    if validating:
        sample = validation_sample(validation_records, config.eval_max_samples, config.seed)
        callbacks.append(ValidationCallback(
            model=model, tokenizer=loaded.tokenizer, system_prompt=system_prompt, label_set=label_set,
            records=sample, every=config.eval_every_steps, patience=config.early_stopping_patience,
            max_input_length=config.max_input_length, checkpoints_dir=checkpoints_dir,
            on_event=hooks.on_event, skip=lambda: cancel.cancelled))
    trainer = _IntentTrainer(
        model=model,
        args=_training_arguments(config, checkpoints_dir, loaded),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
        throughput=throughput,
        sample_weights=weights,
    )

    resume_from = latest_checkpoint(checkpoints_dir)
    if resume_from is not None:
        hooks.on_event("resumed", f"resuming from {resume_from.name}",
                       {"step": checkpoint_step(resume_from), "path": str(resume_from)})
    started = time.monotonic()
    final_state = _final_checkpoint_state(resume_from)
    if final_state is not None:
        # Killed after the last checkpoint, before the adapter was written: there is no step left, and
        # Trainer.train would run one more when the run stopped mid-epoch. Take the checkpoint's weights.
        _load_checkpoint_adapter(model, resume_from)
        log_history, global_step, max_steps = final_state["log_history"], final_state["global_step"], \
            final_state["max_steps"]
        train_metrics = {}
    else:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        log_history, global_step, max_steps = trainer.state.log_history, trainer.state.global_step, \
            trainer.state.max_steps
        train_metrics = output.metrics
    runtime = time.monotonic() - started

    history = _loss_history(log_history)
    validation_history = _validation_history(log_history)
    final_loss = history[-1]["loss"] if history else None
    metrics = {
        **{k: v for k, v in train_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        "global_step": global_step,
        "max_steps": max_steps,
        "final_loss": final_loss,
        "tokens_per_second": throughput.tokens / runtime if runtime > 0 else None,
        "samples_per_second": throughput.samples / runtime if runtime > 0 else None,
        "shared_prefix": use_shared_prefix,
        "prefix_tokens": len(encoded.prefix_ids),
        "n_samples": len(encoded.samples),
        "n_truncated": encoded.n_truncated,
        "trainable_parameters": trainable,
        "device": str(loaded.device),
        "processes": processes,
        "dtype": str(loaded.dtype),
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else None,
        "class_balance": config.class_balance,
        "samples_per_class": dataset.drawn_per_class(throughput.samples),  # trained on by this call
        "early_stopped_at": early_stopped(log_history),
    }
    if cancel.cancelled:
        hooks.on_event("cancelled", f"cancelled at step {global_step}", {"step": global_step})
        return TrainingResult(None, True, global_step, final_loss, runtime, loaded.quantization, history, metrics,
                              validation_history)

    best = best_validation(log_history, checkpoints_dir) if validating else None
    if best is not None:
        if (best.snapshot / "adapter_model.safetensors").is_file():
            load_snapshot(model, best.snapshot)  # the registered adapter is the best one, not the last
            metrics.update(best_step=best.step, best_val_accuracy=best.accuracy, best_val_macro_f1=best.macro_f1)
            hooks.on_event("best_checkpoint", f"keeping the adapter of step {best.step} (validation macro-F1 "
                           f"{best.macro_f1:.4f}, accuracy {best.accuracy:.4f}) of {global_step} steps",
                           {"step": best.step, "macro_f1": best.macro_f1, "accuracy": best.accuracy,
                            "last_step": global_step})
        else:
            hooks.on_event("warning", f"the best adapter (step {best.step}) is missing at {best.snapshot}; "
                           f"keeping the last one (step {global_step})", {"step": best.step})

    adapter_dir = job_dir / ADAPTER_DIRNAME
    if trainer.args.process_index == 0:  # one writer: the other ranks hold the same weights
        staging = job_dir / f".{ADAPTER_DIRNAME}.partial"
        shutil.rmtree(staging, ignore_errors=True)  # left by a worker killed while saving
        save_adapter(
            model, loaded.tokenizer, staging,
            metadata={
                "system_prompt": system_prompt,
                "label_set": label_set.to_pairs(),
                "base_model": base_model_name,
                "training_config": config.model_dump(),
                "quantization": loaded.quantization,
                "metrics": metrics,
                "loss_history": history,
                "validation_history": validation_history,
            },
        )
        _write_loss_curve(history, staging / LOSS_CURVE_FILENAME, hooks, validation_history)
        shutil.rmtree(adapter_dir, ignore_errors=True)  # without its metadata it is incomplete (older versions)
        os.rename(staging, adapter_dir)  # complete by construction: the marker that training is done
    if _distributed():
        torch.distributed.barrier()  # every rank returns once the adapter is in place
    hooks.on_event("finished", f"training finished at step {global_step}",
                   {"step": global_step, "adapter_dir": str(adapter_dir), "final_loss": final_loss})
    return TrainingResult(adapter_dir, False, global_step, final_loss, runtime, loaded.quantization, history, metrics,
                          validation_history)


def check_target_modules(base_model_dir: Path, target_modules: list[str]) -> None:
    """Refuse LoRA targets the base model does not have, before anything is loaded."""
    from app.ml.models.target_modules import (
        describe,
        matrix_module_names,
        unknown_target_modules,
    )

    names = matrix_module_names(base_model_dir)
    if names is None:
        return  # no safetensors to read: peft names what it cannot find when the adapter is attached
    unknown = unknown_target_modules(list(target_modules), names)
    if unknown:
        raise ValueError(f"target_modules {unknown} are not modules of this base model; it has: {describe(names)}")


def save_adapter(model, tokenizer, adapter_dir: Path, *, metadata: dict) -> None:
    """Adapter weights + config (peft), the tokenizer, and ``intent_tuner.json`` (how to serve it)."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    (adapter_dir / ADAPTER_METADATA_FILENAME).write_text(
        json.dumps(metadata, ensure_ascii=False, indent=2, default=str), encoding="utf-8"
    )


def _write_loss_curve(history: list[dict], path: Path, hooks: TrainingHooks,
                      validation: list[dict] | None = None) -> None:
    """Plot the loss curve; a missing or failing plotter never fails a finished training."""
    try:
        from app.ml.eval.plots import plot_loss_curve
    except ImportError as exc:
        hooks.on_event("warning", f"loss curve not written: {exc}", {})
        return
    try:
        plot_loss_curve(history, path, validation=validation)
    except Exception as exc:  # noqa: BLE001 - the adapter is already saved; report and go on
        logger.exception("loss curve plot failed")
        hooks.on_event("warning", f"loss curve not written: {exc}", {})

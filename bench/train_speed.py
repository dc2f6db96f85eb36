"""Section 2: training speed and peak memory, naive batch vs shared prefix, LoRA on the same model.

Each (model, batch size, path) runs in a fresh Python process (``python -m bench.train_speed``): the
model is loaded, LoRA attached (r=16, alpha=64, q/k/v/o, dropout 0 so both paths compute the same
loss), then ``warmup`` + ``steps`` optimizer steps run on the same batches of real samples (the
CMCC system prompt as is + one dialogue + its answer each). Beside each speed-up stands its token
bound: the tokens a naive step runs over those the shared-prefix step runs (padding excluded). A step is forward + backward +
AdamW step, timed after the warm-up steps. Separate processes keep one path's allocator state
from hiding the other's peak memory (see ``bench.memory``).

The losses are ``app.ml.train.shared_prefix.naive_loss`` (every sample runs its whole sequence; what
``app.ml.train.trainer`` falls back to) and ``shared_prefix_loss`` (the prefix runs once per batch):
the two code paths ``train_adapter`` chooses between.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BATCH_SIZE = 4  # the default
PATHS = ("naive", "shared")


@dataclass(frozen=True)
class ModelChoice:
    """A model to benchmark. ``kind``: "pretrained" (a transformers folder) or "random-glm4" (a
    Glm4ForCausalLM built from ``glm4_size`` with random weights and ``tokenizer_dir``'s tokenizer)."""

    label: str  # shown in the report
    kind: str
    model_dir: str
    glm4_size: dict | None = None
    warmup: int = 1
    steps: int = 3
    # Non-reentrant activation checkpointing, as the production recipe trains (both paths alike).
    checkpointing: bool = False
    batch_size: int = BATCH_SIZE

    @property
    def key(self) -> str:
        return f"{self.label}, batch {self.batch_size}"


# ~22M non-embedding parameters (+ 2 x 78M for the 152k-token Qwen vocabulary, which costs memory but
# little compute: logits are computed only where there is a label). Its step is ~15x cheaper than
# the 0.5B model's on a CPU, so it gets more measured steps within the budget.
MID_GLM4 = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 64, "intermediate_size": 1408}


@dataclass
class PathRun:
    model: str
    path: str
    ok: bool
    error: str | None = None
    step_seconds: list[float] = field(default_factory=list)  # measured steps only, wall clock
    step_cpu_seconds: list[float] = field(default_factory=list)  # the same steps, CPU time of all threads
    warmup_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step, warm-up included
    tokens_per_step: list[int] = field(default_factory=list)  # tokens run through the model, measured steps
    memory_kind: str | None = None
    memory_baseline_bytes: int | None = None
    memory_peak_bytes: int | None = None
    parameters: int | None = None
    non_embedding_parameters: int | None = None
    trainable_parameters: int | None = None
    prefix_tokens: int | None = None
    mean_suffix_tokens: float | None = None
    device: str | None = None
    dtype: str | None = None
    supports_shared_prefix: bool | None = None
    checkpointing: bool | None = None
    batch_size: int = BATCH_SIZE

    @property
    def seconds_per_step(self) -> float | None:
        return statistics.fmean(self.step_seconds) if self.step_seconds else None

    @property
    def cpu_seconds_per_step(self) -> float | None:
        return statistics.fmean(self.step_cpu_seconds) if self.step_cpu_seconds else None

    @property
    def samples_per_second(self) -> float | None:
        total = sum(self.step_seconds)
        return self.batch_size * len(self.step_seconds) / total if total > 0 else None

    @property
    def memory_delta_bytes(self) -> int | None:
        if self.memory_peak_bytes is None or self.memory_baseline_bytes is None:
            return None
        return max(0, self.memory_peak_bytes - self.memory_baseline_bytes)


# ------------------------------------------------------------------------------ the worker process


def _build_model(choice: ModelChoice, device: str | None):
    import torch

    from app.ml.models.loading import load_base_model, load_tokenizer, resolve_device

    if choice.kind == "pretrained":
        loaded = load_base_model(Path(choice.model_dir), quantization="none", compute_dtype="float32",
                                 device=device, for_training=True, gradient_checkpointing=choice.checkpointing)
        return loaded.model, loaded.tokenizer, loaded.device
    if choice.kind == "random-glm4":
        from transformers import Glm4Config, Glm4ForCausalLM

        tokenizer = load_tokenizer(Path(choice.model_dir))
        target = resolve_device(device)
        torch.manual_seed(0)
        config = Glm4Config(
            vocab_size=len(tokenizer), max_position_embeddings=8192, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
            **(choice.glm4_size or MID_GLM4),
        )
        model = Glm4ForCausalLM(config).to(target)
        for param in model.parameters():
            param.requires_grad_(False)
        if choice.checkpointing:  # the same call load_base_model makes
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        return model, tokenizer, target
    raise ValueError(f"unknown model kind {choice.kind!r}")


def run_path(choice: ModelChoice, path: str, batches: list[list[tuple[str, str]]], system_prompt: str,
             device: str | None = None) -> PathRun:
    """Load the model, attach LoRA and time ``choice.warmup + choice.steps`` steps of ``path``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.ml.text.encoding import ChatCollator, assistant_turn, encode_sample, shared_prefix_ids
    from app.ml.train.shared_prefix import naive_loss, shared_prefix_loss, supports_shared_prefix
    from bench.memory import PeakMemoryMeter

    run = PathRun(model=choice.label, path=path, ok=False, checkpointing=choice.checkpointing,
                  batch_size=choice.batch_size)
    model, tokenizer, target = _build_model(choice, device)
    embeddings = sum(m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    run.parameters = sum(p.numel() for p in model.parameters())
    run.non_embedding_parameters = run.parameters - embeddings
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=64, lora_dropout=0.0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    run.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.device, run.dtype = str(target), str(next(model.parameters()).dtype).removeprefix("torch.")
    run.supports_shared_prefix = supports_shared_prefix(model)
    if path == "shared" and not run.supports_shared_prefix:
        run.error = "the model does not support the shared-prefix loss"
        return run

    prefix = shared_prefix_ids(tokenizer, system_prompt)
    turn = assistant_turn(tokenizer, system_prompt)
    run.prefix_tokens = len(prefix)
    collator = ChatCollator(pad_token_id=tokenizer.pad_token_id, prefix_length=len(prefix) if path == "shared" else 0)
    encoded, suffix_lengths = [], []
    for batch in batches:
        samples = [encode_sample(tokenizer, system_prompt, d, a, max_input_length=4096, max_output_length=64,
                                 prefix_ids=prefix, turn=turn) for d, a in batch]
        suffix_lengths += [len(s.input_ids) - len(prefix) for s in samples]
        encoded.append({k: v.to(target) for k, v in collator(
            [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]).items()})
    run.mean_suffix_tokens = statistics.fmean(suffix_lengths)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    def step(inputs: dict) -> float:
        optimizer.zero_grad(set_to_none=True)
        if path == "shared":
            loss = shared_prefix_loss(model, **inputs)
        else:
            loss = naive_loss(model, **inputs)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    meter = PeakMemoryMeter(target)
    with meter:
        for index, inputs in enumerate(encoded):
            sync()
            began, began_cpu = time.perf_counter(), time.process_time()
            run.losses.append(step(inputs))
            sync()
            elapsed = time.perf_counter() - began
            if index < choice.warmup:
                run.warmup_seconds.append(elapsed)
            else:
                run.step_seconds.append(elapsed)
                run.step_cpu_seconds.append(time.process_time() - began_cpu)
                if path == "shared":
                    run.tokens_per_step.append(len(prefix) + int(inputs["suffix_mask"].sum()))
                else:
                    run.tokens_per_step.append(int(inputs["attention_mask"].sum()))
    memory = meter.result()
    run.memory_kind, run.memory_baseline_bytes, run.memory_peak_bytes = memory.kind, memory.baseline_bytes, memory.peak_bytes
    run.ok = True
    return run


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One (model, path) training-speed measurement; JSON out.")
    parser.add_argument("--job", required=True, help="JSON file: choice, path, batches, system_prompt, device")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    job = json.loads(Path(args.job).read_text(encoding="utf-8"))
    choice = ModelChoice(**job["choice"])
    batches = [[tuple(pair) for pair in batch] for batch in job["batches"]]
    try:
        run = run_path(choice, job["path"], batches, job["system_prompt"], job.get("device"))
    except Exception as exc:  # noqa: BLE001 - reported as "not measured" by the parent
        run = PathRun(model=choice.label, path=job["path"], ok=False, error=f"{type(exc).__name__}: {exc}",
                      batch_size=choice.batch_size)
    Path(args.out).write_text(json.dumps(asdict(run)), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------ the parent side


def pick_batches(pairs: list[tuple[str, str]], n_batches: int, batch_size: int = BATCH_SIZE,
                 seed: int = 0) -> list[list[tuple[str, str]]]:
    """``n_batches`` batches of ``batch_size`` distinct samples (the same for both paths)."""
    rng = random.Random(seed)
    chosen = rng.sample(pairs, min(len(pairs), n_batches * batch_size))
    while len(chosen) < n_batches * batch_size:
        chosen.append(rng.choice(pairs))
    return [chosen[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def measure_in_subprocess(choice: ModelChoice, path: str, pairs: list[tuple[str, str]], system_prompt: str,
                          work_dir: Path, *, device: str | None = None, timeout_s: float = 1200) -> PathRun:
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{choice.label}-b{choice.batch_size}-{path}".replace(" ", "_").replace("/", "_")
    job_file, out_file = work_dir / f"{stem}.job.json", work_dir / f"{stem}.out.json"
    out_file.unlink(missing_ok=True)
    batches = pick_batches(pairs, choice.warmup + choice.steps, choice.batch_size)
    job_file.write_text(json.dumps({"choice": asdict(choice), "path": path, "batches": batches,
                                    "system_prompt": system_prompt, "device": device}, ensure_ascii=False),
                        encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.train_speed", "--job", str(job_file), "--out", str(out_file)],
                              cwd=str(Path(__file__).resolve().parents[1]), env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return PathRun(model=choice.label, path=path, ok=False, error=f"timed out after {timeout_s:.0f} s",
                       batch_size=choice.batch_size)
    if not out_file.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        return PathRun(model=choice.label, path=path, ok=False, batch_size=choice.batch_size,
                       error=f"worker exited with {proc.returncode}: {' / '.join(tail)}")
    return PathRun(**json.loads(out_file.read_text(encoding="utf-8")))


def measure_in_process(choice: ModelChoice, path: str, pairs: list[tuple[str, str]], system_prompt: str, *,
                       device: str | None = None) -> PathRun:
    """Like ``measure_in_subprocess`` without the fresh process (``--quick``: no start-up cost, but the
    second path's memory figure is then not isolated from the first's)."""
    try:
        return run_path(choice, path, pick_batches(pairs, choice.warmup + choice.steps, choice.batch_size),
                        system_prompt, device)
    except Exception as exc:  # noqa: BLE001
        return PathRun(model=choice.label, path=path, ok=False, error=f"{type(exc).__name__}: {exc}",
                       batch_size=choice.batch_size)


def _mean_tokens(run: PathRun) -> float | None:
    return statistics.fmean(run.tokens_per_step) if run.ok and run.tokens_per_step else None


def run_train_section(choices: list[ModelChoice], pairs: list[tuple[str, str]], system_prompt: str,
                      plot_path: Path, work_dir: Path, *, device: str | None = None, isolate: bool = True,
                      progress=print) -> "SectionResult":
    from bench.report import SectionResult, Table, bar_group, new_figure, ratio, save_figure

    started = time.perf_counter()
    result = SectionResult("train", "2. Training speed and peak memory: naive vs shared prefix")
    runs: dict[str, dict[str, PathRun]] = {}
    for choice in choices:
        runs[choice.key] = {}
        for path in PATHS:
            progress(f"[train] {choice.key}: {path} ({choice.warmup} warm-up + {choice.steps} measured steps)")
            if isolate:
                run = measure_in_subprocess(choice, path, pairs, system_prompt, work_dir, device=device)
            else:
                run = measure_in_process(choice, path, pairs, system_prompt, device=device)
            runs[choice.key][path] = run
            if not run.ok:
                result.skipped.append(f"not measured: {choice.key}, {path} path: {run.error}")
            else:
                progress(f"[train]   {run.seconds_per_step:.2f} s/step, losses {[round(x, 4) for x in run.losses]}")

    any_run = next((r for by_path in runs.values() for r in by_path.values() if r.ok), None)
    memory_label = "peak GPU memory allocated, delta (MiB)" if any_run and any_run.memory_kind == "cuda_allocated" \
        else "peak RSS delta (MiB)"
    rows = []
    bounds: dict[str, float | None] = {}
    for choice in choices:
        naive, shared = runs[choice.key]["naive"], runs[choice.key]["shared"]
        bound = ratio(_mean_tokens(naive), _mean_tokens(shared))
        bounds[choice.key] = bound
        for run in (naive, shared):
            if not run.ok:
                continue
            other_is_naive = run.path == "shared" and naive.ok
            cpu_speedup = ratio(naive.cpu_seconds_per_step, run.cpu_seconds_per_step) if other_is_naive else None
            rows.append([
                choice.label,
                _millions(run.non_embedding_parameters, run.parameters),
                "yes" if run.checkpointing else "no",
                run.batch_size,
                run.path,
                _mean_tokens(run),
                run.seconds_per_step,
                run.cpu_seconds_per_step,
                run.samples_per_second,
                run.memory_delta_bytes / 2**20 if run.memory_delta_bytes is not None else None,
                run.losses[0] if run.losses else None,
                _times(ratio(naive.seconds_per_step, run.seconds_per_step)) if other_is_naive else "1.00x (ref.)",
                _times(cpu_speedup) if other_is_naive else "",
                _times(bound) if other_is_naive else "",
                f"{100 * cpu_speedup / bound:.0f}%" if cpu_speedup and bound else "",
                _times(ratio(run.memory_delta_bytes, naive.memory_delta_bytes)) if other_is_naive else "",
            ])
    if any_run is not None:
        how = ("Each (model, batch size, path) runs in a fresh Python process" if isolate
               else "Both paths run one after the other in this process (`--quick`)")
        batch_sizes = sorted({c.batch_size for c in choices})
        result.intro = [
            f"{how}: the model is loaded, LoRA attached (r=16, alpha=64, q/k/v/o, dropout 0 so both paths compute "
            "the same loss), then warm-up + measured optimizer steps run on the same batches of real samples (the "
            "system prompt as is + one dialogue + its answer each). A step is forward + backward + AdamW step. The "
            "two losses are the two code paths `train_adapter` chooses between: `app.ml.train.shared_prefix."
            "naive_loss` (every sample runs its whole sequence) and `shared_prefix_loss` (the prefix runs once per "
            "batch, its keys/values expanded over the suffixes, which run packed into as few rows as fit the "
            "longest: `shared_prefix.pack_rows`).",
            f"System prompt: the CMCC-34 prompt as is, **{any_run.prefix_tokens} tokens** of shared prefix; "
            f"suffix (user turn + answer) {any_run.mean_suffix_tokens:.0f} tokens on average over the batches used. "
            f"Batch sizes {', '.join(map(str, batch_sizes))}; {any_run.device}, {any_run.dtype}, LoRA r=16 on q/k/v/o "
            f"({any_run.trainable_parameters / 1e6:.2f}M trainable parameters for the first model); activation "
            "checkpointing as the table says (the same for both paths of a model). **Token bound**: the tokens a "
            "naive step runs over those the shared-prefix step runs (real tokens, padding excluded): the speed-up "
            "if time followed tokens; 'of bound' is the CPU-time speed-up over it. Target to report against: "
            ">= 90% of the bound.",
        ]
        result.tables.append(Table(
            ["model", "params (non-emb. / total)", "activation checkpointing", "batch", "path", "tokens run per step",
             "s/step (wall)", "CPU s/step", "samples/s", memory_label, "loss, step 1", "speed-up (wall)",
             "speed-up (CPU time)", "token bound", "of bound (CPU)", "memory vs naive"],
            rows,
        ))
        fig, axes = new_figure(2)
        keys = [c.key for c in choices]
        ticks = [f"{c.label.split(' (')[0]}\nbatch {c.batch_size}" for c in choices]
        bar_group(axes[0], ticks, {
            "speed-up (CPU time)": [ratio(runs[k]["naive"].cpu_seconds_per_step, runs[k]["shared"].cpu_seconds_per_step)
                                    if runs[k]["naive"].ok and runs[k]["shared"].ok else None for k in keys],
            "token bound": [bounds[k] for k in keys]},
            ylabel="x naive", title="Shared prefix: speed-up and its token bound", value_format="{:.2f}")
        bar_group(axes[1], ticks, {path: [runs[k][path].memory_delta_bytes / 2**20
                                          if runs[k][path].ok and runs[k][path].memory_delta_bytes is not None
                                          else None for k in keys] for path in PATHS},
                  ylabel="MiB", title=memory_label, value_format="{:.0f}")
        result.plot = save_figure(fig, plot_path)
        result.notes = [
            "\"loss, step 1\" is the loss of the same first batch on both paths (same weights, no dropout): equal "
            "losses show that the shared-prefix path computes the same thing. \"CPU s/step\" is the process CPU time "
            "(all threads): on a machine shared with other work it moves less than wall time. Step times are the mean "
            "over the measured steps; each path runs the same batches.",
            "The bound grows with the batch (the prefix is run once for more samples). Time can beat it: the naive "
            "batch also pads every sample to the longest, and its larger activations run slower per token on a CPU.",
        ]
        if not isolate:
            result.notes.append("Both paths ran in one process (`--quick`): the second path's memory figure "
                                "is not isolated from the first's.")
    result.data = {key: {path: asdict(run) for path, run in by_path.items()} for key, by_path in runs.items()}
    result.seconds = time.perf_counter() - started
    return result


def _millions(non_embedding: int | None, total: int | None) -> str | None:
    if non_embedding is None or total is None:
        return None
    return f"{non_embedding / 1e6:.0f}M / {total / 1e6:.0f}M"


def _times(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "–"


if __name__ == "__main__":
    raise SystemExit(_worker_main())

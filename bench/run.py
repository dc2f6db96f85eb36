"""``python -m bench.run`` (``make bench``): the side-by-side benchmarks, written to ``docs/benchmarks.md``.

Sections (``--sections``, all by default):

1. ``tokens``: tokens per sample, old template vs system prompt vs shared prefix;
2. ``train``: training samples/s and peak memory, naive vs shared prefix (LoRA, batch 4, and 4/8/16 on a
   mid-size GLM-4), each speed-up beside its token bound;
3. ``classify``: serving: generation, full-answer and trie scoring, micro-batcher vs lock, vLLM
   (guided choice and through the API) at 1, 4 and 16 clients (``bench/serving.py``);
4. ``accuracy``: held-out accuracy/macro-F1, fine-tuned adapter vs a TF-IDF baseline;
5. ``quality``: class balance on/off and the learning curve, adapter vs baseline (``bench.quality``).

Every comparison runs both sides in this one process tree on the same model. A benchmark prints
figures and never fails on a threshold; what it cannot measure it reports as "not measured: <why>".
``--quick`` runs everything on the tiny random GLM-4 with tiny sizes (the smoke test uses it):
its figures show that the machinery works, not how fast anything is. ``--update`` (``make bench
SECTIONS=train``) re-runs only the named sections and replaces them in the existing report, each
replaced section headed by its own date, machine and versions; the others stay as their run wrote them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.data import REPO_ROOT, default_cmcc_dir  # noqa: E402

SECTIONS = ("tokens", "train", "classify", "accuracy", "quality")
TINY = "tiny-glm4"


@dataclass(frozen=True)
class Sizes:
    """How much each section does; ``--quick`` shrinks everything."""

    token_rows: int | None  # rows per file in the token count (None: all)
    train_warmup: int
    train_steps: int  # measured steps per path on the default model
    mid_model: bool  # also measure a mid-size random GLM-4 (cheaper steps, more of them)
    mid_steps: int
    mid_batch_sizes: tuple[int, ...]  # the mid model's batch sizes: how the speed-up grows with the batch
    train_batch_sizes: tuple[int, ...]  # the default model's
    classify_requests: int  # dialogues per serving row
    serving_train_steps: int  # the serving section's own adapter when the accuracy section did not run
    accuracy_steps: int | None  # None: the recipe's own max_steps
    accuracy_dialogue_tokens: int | None  # max_input_length = shared prefix + this (None: the recipe's)
    zero_shot: bool
    quality_steps: int = 16  # optimizer steps per configuration in 'quality'
    quality_eval_every: int = 4
    # bench.linear_head.HEAD_CONFIGS and bench.quality.CONFIGS names (LoRA runs cost ~15 min each on 2 cores)
    quality_configs: str = "head,head-balanced,head-sqrt"


# Sized for < ~25 min on the 2-core development machine when it is not shared with other work
# (a 0.5B-model LoRA step on batch 4 with the ~520-token prompt takes tens of seconds there).
FULL = Sizes(token_rows=None, train_warmup=1, train_steps=1, mid_model=True, mid_steps=3, mid_batch_sizes=(4, 8, 16),
             train_batch_sizes=(4,), classify_requests=16, serving_train_steps=8, accuracy_steps=None, accuracy_dialogue_tokens=128,
             zero_shot=False)
QUICK = Sizes(token_rows=24, train_warmup=1, train_steps=1, mid_model=False, mid_steps=1, mid_batch_sizes=(),
              train_batch_sizes=(4, 8), classify_requests=2, serving_train_steps=1, accuracy_steps=2, accuracy_dialogue_tokens=128,
              zero_shot=False, quality_steps=2, quality_eval_every=1, quality_configs="head,head-balanced,none,balanced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, tiny sizes (seconds; for the smoke test)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="markdown report")
    parser.add_argument("--img-dir", type=Path, default=None, help="plots (default: img/ beside --out)")
    parser.add_argument("--model", default=None, help="base model name (default: the settings' default; --quick: tiny-glm4)")
    parser.add_argument("--dataset-dir", type=Path, default=default_cmcc_dir(), help="CMCC-34 CSV folder")
    parser.add_argument("--data-dir", type=Path, default=None, help="service DATA_DIR holding prepared base models")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench" / "out", help="scratch (adapters, raw JSON)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--train-steps", type=int, default=None, help="measured training steps per path")
    parser.add_argument("--accuracy-steps", type=int, default=None, help="optimizer steps of the benchmark adapter")
    parser.add_argument("--classify-requests", type=int, default=None, help="dialogues per serving row")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows of the serving section")
    parser.add_argument("--serving-vllm-only", action="store_true", help="'classify': only the vLLM rows")
    parser.add_argument("--serving-adapter", type=Path, default=None,
                        help="'classify': serve this adapter (a job's adapter/ folder) instead of training one")
    parser.add_argument("--no-mid-model", action="store_true", help="skip the mid-size random GLM-4 in 'train'")
    parser.add_argument("--dialogue-tokens", type=int, default=None,
                        help="'accuracy'/'quality': max_input_length = shared prefix + this many dialogue tokens")
    parser.add_argument("--quality-configs", default=None, help="'quality' configurations (bench.quality.CONFIGS)")
    parser.add_argument("--quality-overrides", type=json.loads, default=None,
                        help="'quality': JSON object of training options over the recipe for every configuration")
    parser.add_argument("--quality-steps", type=int, default=None, help="optimizer steps per 'quality' configuration")
    parser.add_argument("--quality-eval-every", type=int, default=None, help="'quality': evaluate every N steps")
    parser.add_argument("--zero-shot", action="store_true", help="also evaluate the base model zero-shot in 'accuracy'")
    parser.add_argument("--update", action="store_true",
                        help="replace only these sections in the existing --out report (the others are kept)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    from dataclasses import replace

    sizes = QUICK if args.quick else FULL
    overrides = {}
    if args.train_steps is not None:
        overrides["train_steps"] = args.train_steps
    if args.accuracy_steps is not None:
        overrides["accuracy_steps"] = args.accuracy_steps
    if args.classify_requests is not None:
        overrides["classify_requests"] = args.classify_requests
    if args.dialogue_tokens is not None:
        overrides["accuracy_dialogue_tokens"] = args.dialogue_tokens
    for name in ("quality_configs", "quality_steps", "quality_eval_every"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_mid_model:
        overrides["mid_model"] = False
    if args.zero_shot:
        overrides["zero_shot"] = True
    return replace(sizes, **overrides)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_for(args)
    began = time.perf_counter()

    from app.core.config import Settings, get_settings
    from app.domain.cmcc34 import CMCC34_LABEL_SET
    from app.ml.models.registry import resolve_base_model
    from app.domain.prompt import build_system_prompt, format_answer
    from bench.data import CMCC_FILES, read_rows, stratified_split, token_sources
    from bench.env import describe_environment
    from bench.report import SectionResult

    settings = Settings(data_dir=args.data_dir) if args.data_dir else get_settings()
    model_name = args.model or (TINY if args.quick else settings.default_base_model)
    out: Path = args.out.resolve()
    img_dir = (args.img_dir or out.parent / "img").resolve()
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    prefix = "quick_" if args.quick else ""
    environment = describe_environment()
    label_set = CMCC34_LABEL_SET
    system_prompt = build_system_prompt(label_set)

    log(f"[bench] preparing base model {model_name}")
    model_dir = resolve_base_model(model_name, settings, progress=log)
    cmcc_dir = args.dataset_dir if args.dataset_dir and args.dataset_dir.is_dir() else None
    sources = token_sources(cmcc_dir)
    results: dict[str, SectionResult] = {}

    if "tokens" in args.sections:
        from app.ml.models.loading import load_tokenizer
        from bench.tokens import run_tokens_section

        log("[tokens] counting")
        results["tokens"] = run_tokens_section(load_tokenizer(model_dir), model_name, label_set, sources,
                                               img_dir / f"{prefix}tokens.png", limit=sizes.token_rows)

    if "train" in args.sections:
        from bench.train_speed import MID_GLM4, ModelChoice, run_train_section

        choices = []
        if sizes.mid_model:
            choices += [ModelChoice(label="random GLM-4 mid (Qwen tokenizer)", kind="random-glm4",
                                    model_dir=str(model_dir), glm4_size=MID_GLM4, warmup=sizes.train_warmup,
                                    steps=sizes.mid_steps, batch_size=batch) for batch in sizes.mid_batch_sizes]
        # Checkpointing on the real model: its naive batch keeps >12 GB of activations otherwise, more than
        # a 24 GiB machine shared with other work can spare.
        choices += [ModelChoice(label=model_name, kind="pretrained", model_dir=str(model_dir),
                                warmup=sizes.train_warmup, steps=sizes.train_steps, checkpointing=True,
                                batch_size=batch) for batch in sizes.train_batch_sizes]
        train_rows = sources[0].records
        pairs = [(r.dialogue, format_answer(r.label_id, label_set.name_of(r.label_id))) for r in train_rows]
        section = run_train_section(choices, pairs, system_prompt, img_dir / f"{prefix}train.png",
                                    work_dir / "train", device=args.device, isolate=not args.quick, progress=log)
        section.intro.append(f"Samples: batches drawn (seed 0) from {sources[0].name} (`{sources[0].path.name}`).")
        results["train"] = section

    split = None
    real_dialogues = None
    skip_reason = None
    real_files = {name: cmcc_dir / f for name, f in CMCC_FILES.items()} if cmcc_dir else {}
    if cmcc_dir is not None and all(p.is_file() for p in real_files.values()):
        real = read_rows(real_files["real 5-shot"], "real", real=True).records
        synthetic = read_rows(real_files["synthetic (GLM-4)"], "synthetic", real=True).records
        split = stratified_split(real, synthetic)
        real_dialogues = {r.dialogue for r in real}
        if args.quick:
            split.train, split.held_out = split.train[:16], split.held_out[:4]
            split.description += " (--quick: only the first 16 train / 4 held-out rows used)"
    else:
        skip_reason = f"the CMCC-34 files {', '.join(CMCC_FILES.values())} are not in {args.dataset_dir}"

    training = None
    if "accuracy" in args.sections:
        from app.ml.train.config import resolve_training_config
        from bench.accuracy import run_accuracy_section

        from app.ml.text.encoding import shared_prefix_ids
        from app.ml.models.loading import load_tokenizer

        recipe = "tiny_test" if model_name == TINY else "cpu_small"
        # The recipe as `make demo` trains it, save for checkpoints (none needed), a log line per step and,
        # within the time budget, real dialogues (about twice the bundled sample's length) cut shorter.
        overrides = {"save_steps": 10**6, "logging_steps": 1}
        if sizes.accuracy_steps is not None:
            overrides["max_steps"] = sizes.accuracy_steps
        if sizes.accuracy_dialogue_tokens is not None:
            # Room for the system prompt as this tokenizer renders it plus the first part of each dialogue
            # (a prompt over the limit loses the END of its dialogue; the request is usually stated early).
            prefix_tokens = len(shared_prefix_ids(load_tokenizer(model_dir), system_prompt))
            overrides["max_input_length"] = prefix_tokens + sizes.accuracy_dialogue_tokens
        config, _ = resolve_training_config(recipe, overrides)
        section, training = run_accuracy_section(
            split, label_set, system_prompt, model_name, model_dir, config, img_dir / f"{prefix}accuracy.png",
            work_dir, device=args.device, zero_shot=sizes.zero_shot, skip_reason=skip_reason, progress=log)
        section.intro.append(f"Recipe: `configs/{recipe}.yaml`, overridden with {overrides}.")
        results["accuracy"] = section

    if "quality" in args.sections:
        from app.ml.models.loading import load_tokenizer
        from app.ml.text.encoding import shared_prefix_ids
        from bench.quality import run_quality_section

        recipe = "tiny_test" if model_name == TINY else "cpu_small"
        prefix_tokens = len(shared_prefix_ids(load_tokenizer(model_dir), system_prompt))
        overrides = {"save_steps": 10**6, "logging_steps": 1, "max_steps": sizes.quality_steps,
                     "eval_every_steps": sizes.quality_eval_every,
                     "max_input_length": prefix_tokens + (sizes.accuracy_dialogue_tokens or 128),
                     **(args.quality_overrides or {})}
        head_recipe = "tiny_test" if model_name == TINY else "cpu_linear_head"
        head_overrides = {"head": "linear", "save_steps": 10**6}
        results["quality"] = run_quality_section(
            split, label_set, system_prompt, model_name, model_dir, recipe, overrides,
            [c for c in sizes.quality_configs.split(",") if c], img_dir / f"{prefix}quality.png", work_dir,
            device=args.device, skip_reason=skip_reason, real_dialogues=real_dialogues, head_recipe=head_recipe,
            head_overrides=head_overrides, progress=log)

    if "classify" in args.sections:
        from bench.serving import AdapterUnderTest, run_serving_section

        pool = split.held_out if split is not None else sources[0].records
        n = sizes.classify_requests
        records, warmup_text = pool[:n], pool[n % len(pool)].dialogue if len(pool) > n else pool[-1].dialogue
        if args.serving_adapter is not None:
            from app.ml.train.trainer import finished_training

            training = finished_training(args.serving_adapter.parent)
            config = None
        if training is None or training.adapter_dir is None:
            from app.ml.train.config import resolve_training_config
            from bench.accuracy import train_bench_adapter
            from bench.data import Split

            from app.ml.models.loading import load_tokenizer
            from app.ml.text.encoding import shared_prefix_ids

            recipe = "tiny_test" if model_name == TINY else "cpu_small"
            # Enough for the answer format (what serving's costs depend on), in a few minutes: small batches,
            # dialogues cut as the accuracy section cuts them.
            prefix_tokens = len(shared_prefix_ids(load_tokenizer(model_dir), system_prompt))
            config, _ = resolve_training_config(recipe, {
                "max_steps": sizes.serving_train_steps, "save_steps": 10**6, "logging_steps": 1,
                "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                "max_input_length": prefix_tokens + (sizes.accuracy_dialogue_tokens or 128)})
            train_rows = split.train if split is not None else sources[0].records
            log(f"[serving] training a {config.max_steps}-step adapter to serve")
            training = train_bench_adapter(Split(train=train_rows, held_out=[], description=""), label_set,
                                           system_prompt, model_name, model_dir, config, work_dir / "serving-adapter",
                                           device=args.device, progress=log)
        adapter = AdapterUnderTest(training.adapter_dir, model_name, system_prompt, label_set, training.quantization,
                                   f"a LoRA adapter trained {training.steps} steps "
                                   + ("by an earlier run (`--serving-adapter`)" if args.serving_adapter is not None
                                      else "in this run"),
                                   max_input_length=(config.max_input_length if config is not None else
                                                     _trained_max_input_length(training.adapter_dir)))
        results["classify"] = run_serving_section(model_name, model_dir, records, warmup_text, label_set,
                                                  img_dir / f"{prefix}serving.png", work_dir, adapter=adapter,
                                                  device=args.device, progress=log,
                                                  vllm_skipped_by="--quick" if args.quick else
                                                  "--no-vllm" if args.no_vllm else None,
                                                  vllm_only=args.serving_vllm_only)

    total = time.perf_counter() - began
    if args.update and out.is_file():
        markdown = update_sections(out.read_text(encoding="utf-8"), results, environment, args, out.parent)
    else:
        markdown = render(results, environment, model_name, args, total, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown, encoding="utf-8")
    raw = {key: {"seconds": r.seconds, "skipped": r.skipped, "data": r.data} for key, r in results.items()}
    (work_dir / f"{prefix}results.json").write_text(json.dumps(raw, ensure_ascii=False, indent=1, default=str),
                                                   encoding="utf-8")
    print(markdown)
    log(f"[bench] wrote {out} in {total:.0f} s")
    return 0


def _trained_max_input_length(adapter_dir: Path) -> int | None:
    from app.domain.artifacts import ADAPTER_METADATA_FILENAME

    meta = json.loads((Path(adapter_dir) / ADAPTER_METADATA_FILENAME).read_text(encoding="utf-8"))
    return (meta.get("training_config") or {}).get("max_input_length")


def render(results: dict, environment, model_name: str, args: argparse.Namespace, total_seconds: float,
           report_dir: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`python -m bench.run"
        + (" --quick" if args.quick else "")
        + (f" --sections {','.join(args.sections)}" if list(args.sections) != list(SECTIONS) else "")
        + "`). Each comparison ran both sides in the same run on the same model; the figures below are from "
          "that one run and are not edited by hand.",
        "",
        *environment.markdown_lines(),
        f"- Base model: {model_name}; total wall time {total_seconds / 60:.1f} min",
        "",
    ]
    if args.quick:
        lines += ["> `--quick`: tiny random model and tiny sizes. These figures only show that the benchmark runs.", ""]
    if environment.gpu is None:
        lines += ["> CPU only, and the machine is shared with other work: wall-clock figures can swing by a "
                  "large factor between runs. Ratios measured side by side are more stable than absolute times.", ""]
    for key in SECTIONS:
        if key in results:
            lines += [results[key].markdown(report_dir), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_sections(existing: str, results: dict, environment, args: argparse.Namespace, report_dir: Path) -> str:
    """``existing`` with each section of ``results`` replaced (or appended at the end), headed by
    the run it comes from: a report whose sections were measured on different days says so in each."""
    import re

    command = f"python -m bench.run --sections {','.join(args.sections)} --update"
    parts = re.split(r"(?m)^(?=## )", existing)
    head, sections = parts[0], parts[1:]
    for key in SECTIONS:
        if key not in results:
            continue
        body = results[key].markdown(report_dir)
        title_line, _, rest = body.partition("\n")
        provenance = [f"_This section was re-run alone (`{command}`); its run:_", "", *environment.markdown_lines()]
        if environment.gpu is None:
            provenance += ["", "> CPU only, on a machine shared with other work: ratios measured side by side are "
                               "more stable than absolute times."]
        replacement = "\n".join([title_line, "", *provenance, rest]).rstrip() + "\n\n"
        title = title_line.strip()
        number = title.split()[1]  # "## 3. ..." : a section keeps its number when its title changes
        at = next((i for i, section in enumerate(sections) if section.split()[1:2] == [number]), None)
        if at is None:
            sections.append(replacement)
        else:
            sections[at] = replacement
    return (head + "".join(sections)).rstrip() + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

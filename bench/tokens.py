"""Section 1: tokens computed per sample, old template vs system prompt vs shared prefix.

Counted with the benchmarked model's own tokenizer and chat template, on whole rendered
conversations (template tokens included):

(a) old 2-message template: the instruction template (the same text as our system prompt) pasted
    into every user turn, then the dialogue, then the answer. A template that adds a default
    system message when none is given (Qwen's does) adds it here too: that is what it renders.
(b) system prompt, fed naively: [system, user, assistant] per sample, the prefix run every time.
(c) shared prefix: what is computed per sample when the prefix runs once per batch of 4 in
    training (prefix/4 + suffix), and at serving time with the prefix's keys/values cached once
    per model (the prompt suffix only; the answer tokens are scored, not counted here).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt, format_answer, format_user_turn
from app.ml.text.encoding import (
    assistant_turn,
    encode_prompt,
    encode_sample,
    shared_prefix_ids,
)
from bench.data import NamedRows
from bench.report import (
    SectionResult,
    Table,
    bar_group,
    new_figure,
    percentile,
    save_figure,
)

TRAIN_BATCH = 4
_NO_TRUNCATION = 1 << 20

METHODS = (
    ("a", "(a) old template in every user turn"),
    ("b", "(b) system prompt, naive (prefix per sample)"),
    ("c_train", f"(c) shared prefix, training (prefix/{TRAIN_BATCH} + suffix)"),
    ("serve_full", "serving: full prompt per request (generate)"),
    ("c_serve", "(c) serving: suffix only (prefix cached per model)"),
)


def legacy_messages(system_prompt: str, dialogue: str, answer: str) -> list[dict]:
    """The upstream 2-message sample: template text + dialogue in the user turn, then the answer."""
    return [
        {"role": "user", "content": f"{system_prompt}\n\n{format_user_turn(dialogue)}"},
        {"role": "assistant", "content": answer},
    ]


@dataclass
class SampleTokens:
    a: int
    b: int
    c_train: float
    serve_full: int
    c_serve: int


def count_sample(tokenizer, system_prompt: str, dialogue: str, answer: str, prefix: list[int], turn) -> SampleTokens:
    legacy = tokenizer.apply_chat_template(legacy_messages(system_prompt, dialogue, answer), tokenize=False)
    legacy_len = len(tokenizer(legacy, add_special_tokens=False)["input_ids"])
    sample = encode_sample(tokenizer, system_prompt, dialogue, answer, max_input_length=_NO_TRUNCATION,
                           max_output_length=_NO_TRUNCATION, prefix_ids=prefix, turn=turn)
    prompt = encode_prompt(tokenizer, system_prompt, dialogue, max_input_length=_NO_TRUNCATION, prefix_ids=prefix)
    p, full = len(prefix), len(sample.input_ids)
    return SampleTokens(
        a=legacy_len,
        b=full,
        c_train=p / TRAIN_BATCH + (full - p),
        serve_full=len(prompt.input_ids),
        c_serve=len(prompt.input_ids) - p,
    )


def summarise(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values),
    }


def run_tokens_section(tokenizer, model_name: str, label_set: LabelSet, sources: list[NamedRows],
                       plot_path: Path, *, limit: int | None = None) -> SectionResult:
    started = time.perf_counter()
    system_prompt = build_system_prompt(label_set)
    prefix = shared_prefix_ids(tokenizer, system_prompt)
    turn = assistant_turn(tokenizer, system_prompt)
    system_alone = len(tokenizer(system_prompt, add_special_tokens=False)["input_ids"])
    result = SectionResult("tokens", "1. Tokens per sample")
    result.intro = [
        f"Tokenizer and chat template of **{model_name}**. System prompt (CMCC-34, {len(label_set)} intents): "
        f"{len(system_prompt)} characters, {system_alone} tokens on its own, **{len(prefix)} tokens of shared "
        f"prefix** once rendered by the chat template (the common token prefix of all prompts).",
        "Counted on whole rendered conversations (template tokens included):\n"
        "- (a) old 2-message template: the instruction template (the same text as the system prompt) pasted "
        "into every user turn before the dialogue, then the answer. A template that adds a default system "
        "message when none is given (Qwen's does) adds it here too: that is what it renders.\n"
        "- (b) system prompt fed naively: [system, user, assistant] per sample, the prefix run every time.\n"
        f"- (c) shared prefix: computed per sample when the prefix runs once per batch of {TRAIN_BATCH} in "
        "training (prefix/4 + suffix), and at serving time with the prefix keys/values cached once per model "
        "(the prompt suffix only; the candidate answers scored after it are not counted here).",
    ]
    data: dict = {"model": model_name, "prefix_tokens": len(prefix), "system_prompt_tokens": system_alone,
                  "system_prompt_chars": len(system_prompt), "sources": {}}
    for source in sources:
        records = source.records[:limit] if limit else source.records
        counts = [count_sample(tokenizer, system_prompt, r.dialogue, format_answer(r.label_id, label_set.name_of(r.label_id)),
                               prefix, turn) for r in records]
        stats = {key: summarise([getattr(c, key) for c in counts]) for key, _ in METHODS}
        data["sources"][source.name] = {"rows": len(records), "path": str(source.path), **stats}
        base = stats["b"]["mean"]
        result.tables.append(Table(
            ["method", "mean", "p50", "p95", "max", "mean vs (b)"],
            [[label, s["mean"], s["p50"], s["p95"], s["max"], f"{s['mean'] / base:.2f}x"]
             for (key, label), s in ((m, stats[m[0]]) for m in METHODS)],
            caption=f"**{source.name}** ({len(records)} rows, `{source.path.name}`): tokens per sample",
        ))
    fig, axes = new_figure(1, width_per_panel=7.5, height=3.4)
    groups = [_short(label) for _, label in METHODS]
    bar_group(axes[0], groups,
              {name: [v[key]["mean"] for key, _ in METHODS] for name, v in data["sources"].items()},
              ylabel="tokens per sample (mean)", title=f"Tokens computed per sample ({model_name})", value_format="{:.0f}")
    result.plot = save_figure(fig, plot_path)
    result.notes = [
        "Reading: (b) vs (a) is the gain of moving the template into a system prompt (none by itself: the "
        "same tokens, minus any default system message the template adds); (c) is what sharing the prefix "
        "saves. Serving with the cached prefix computes only the dialogue, the template's turn markers and "
        "the candidate answers."
    ]
    result.data = data
    result.seconds = time.perf_counter() - started
    return result


def _short(label: str) -> str:
    return {
        METHODS[0][1]: "(a) old template",
        METHODS[1][1]: "(b) naive sys.",
        METHODS[2][1]: f"(c) shared, train b={TRAIN_BATCH}",
        METHODS[3][1]: "serve: full",
        METHODS[4][1]: "(c) serve: cached",
    }[label]

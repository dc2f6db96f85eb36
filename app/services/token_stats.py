"""Token figures of a dataset under the default base model's tokenizer (when it is prepared locally).

They show what the shared system prompt costs: a naive implementation feeds it with every sample,
the shared-prefix path computes it once per batch (training) or once per model (serving).
"""

from __future__ import annotations

import logging
import statistics
from functools import lru_cache
from pathlib import Path

from app.core.config import Settings
from app.domain.labels import LabelSet
from app.domain.prompt import format_answer, format_user_turn
from app.domain.records import Record

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _default_tokenizer(settings: Settings):
    """The default base model's tokenizer if it is already prepared; never prepares or downloads."""
    try:
        from app.ml.models.registry import resolve_base_model

        path = resolve_base_model(settings.default_base_model, settings, prepare=False)
        tokenizer = _tokenizer(str(Path(path)))
    except Exception as exc:  # not prepared yet, unreadable, or no registry: figures in characters only
        log.debug("no tokenizer for token figures: %s", exc)
        return None, None
    return tokenizer, settings.default_base_model


def token_figures(records: list[Record], system_prompt: str, label_set: LabelSet, settings: Settings) -> dict | None:
    tokenizer, name = _default_tokenizer(settings)
    if tokenizer is None:
        return None
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompt_tokens = count(system_prompt)
    answers = {lab.id: count(format_answer(lab.id, lab.name)) for lab in label_set}
    sample_tokens = [count(format_user_turn(r.dialogue)) + answers[r.label_id] for r in records]
    mean_sample = statistics.fmean(sample_tokens)
    sorted_tokens = sorted(sample_tokens)
    return {
        "tokenizer": name,
        "system_prompt_tokens": prompt_tokens,
        "sample_tokens_mean": round(mean_sample, 1),
        "sample_tokens_p95": sorted_tokens[int(0.95 * (len(sorted_tokens) - 1))],
        "sample_tokens_max": sorted_tokens[-1],
        "naive_tokens_per_sample_mean": round(prompt_tokens + mean_sample, 1),
        "system_prompt_share": round(prompt_tokens / (prompt_tokens + mean_sample), 3),
    }

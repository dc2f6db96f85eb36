"""Free greedy generation with the full prompt: the upstream method, kept as the baseline (``mode="generate"``).

Every request renders the whole conversation (system prompt included) and decodes greedily; no
cache is shared between requests. The answer is parsed with ``app.domain.prompt.parse_answer``. An
answer that does not parse to a label of the set is returned as such (``label_id`` None, the raw
text kept) so evaluations count it as a failure instead of dropping it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.domain.labels import LabelSet
from app.domain.prompt import parse_answer
from app.ml.infer.scoring import render_prompt_ids
from app.ml.text.encoding import pad_rows

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class GeneratedAnswer:
    text: str  # the decoded answer, special tokens removed
    label_id: int | None  # None: the answer names no label of the set
    label_name: str | None
    new_tokens: int


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the model's eos ids and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_answers(
    model,
    tokenizer,
    system_prompt: str,
    label_set: LabelSet,
    texts: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    max_input_length: int | None = None,
) -> list[GeneratedAnswer]:
    """Greedy answers for ``texts`` (full prompt each, batched with left padding), parsed against the label set."""
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=pad_id,
    )
    device = model.device
    answers: list[GeneratedAnswer] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            prompts = [render_prompt_ids(tokenizer, system_prompt, t, max_input_length) for t in batch]
            ids, mask = pad_rows(prompts, pad_id, side="left", device=device)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in output[:, ids.shape[1]:].tolist():
                new = _strip_after_stop(row, set(config.eos_token_id))
                text = tokenizer.decode(new, skip_special_tokens=True).strip()
                parsed = parse_answer(text, label_set)
                name = parsed.label_name if parsed.label_id is not None else None
                answers.append(GeneratedAnswer(text, parsed.label_id, name, len(new)))
    return answers


def _strip_after_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """The answer tokens up to (excluding) the first stop token; finished rows are padded after it."""
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens

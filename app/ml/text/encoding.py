"""Turn (dialogue, answer) samples into token ids with the base model's own chat template.

Every sample of a model is ``[system prompt, user "对话：{dialogue}", assistant answer]``
(``app.domain.prompt.build_messages``). Training teaches the model to answer exactly as it will be
prompted at serving time, so both sides encode the prompt the same way: the chat template
rendered with the generation prompt, tokenised as one string (``encode_prompt``), identical to
``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``. The target is what the
model must generate after that prompt, read off the template (``assistant_turn``): any text the
template puts before the answer (GLM-4's newline after ``<|assistant|>``), the answer, and the
end-of-turn marker (Qwen: ``<|im_end|>``) or eos when the template writes none (GLM-4 ends a turn
with ``<|endoftext|>``/``<|user|>``). Only those tokens carry labels.

Because the system prompt is byte-identical for every sample, the prompt ids of all samples
start with the same tokens (``shared_prefix_ids``); ``app.ml.train.shared_prefix`` computes them once
per batch. ``ChatCollator`` builds batches for both the naive and the shared-prefix path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.domain.prompt import build_messages

IGNORE_INDEX = -100

# Conversations whose dialogues differ in their very first character class (CJK, digit, ASCII
# letter, space, punctuation, newline): their longest common token prefix cannot contain a token
# that a BPE merge across the system/user boundary could make depend on the dialogue.
_PROBE_DIALOGUES = ("甲乙", "12", "ab", " x", "[SEP]", "\n字")


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    truncated: bool  # the dialogue was cut to fit max_input_length


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt, the token id on answer + end-of-turn tokens
    truncated: bool  # the dialogue or the answer was cut

    @property
    def prompt_length(self) -> int:
        for i, label in enumerate(self.labels):
            if label != IGNORE_INDEX:
                return i
        return len(self.labels)


@dataclass
class EncodedDataset:
    samples: list[EncodedSample]
    prefix_ids: list[int]
    n_truncated: int = 0
    stats: dict = field(default_factory=dict)


def _tokenize(tokenizer, text: str) -> list[int]:
    # Rendered templates already hold their special tokens ([gMASK], <|im_start|>...), exactly what
    # apply_chat_template(tokenize=True) does.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, system_prompt: str, dialogue: str) -> str:
    """The chat-template text that the model reads before it answers (generation prompt included)."""
    return tokenizer.apply_chat_template(
        build_messages(system_prompt, dialogue), tokenize=False, add_generation_prompt=True
    )


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_ids(tokenizer, system_prompt: str) -> list[int]:
    """The token ids every prompt with ``system_prompt`` starts with.

    Tokenising the system part alone is unreliable (a BPE merge can cross the point where the
    user turn begins), so this renders several conversations whose dialogues start differently
    and takes their longest common token prefix.
    """
    encoded = [_tokenize(tokenizer, render_prompt(tokenizer, system_prompt, d)) for d in _PROBE_DIALOGUES]
    prefix = encoded[0][: min(common_prefix_length(encoded[0], ids) for ids in encoded[1:])]
    if not prefix:
        raise ValueError("the chat template gives the prompts no common token prefix")
    return prefix


def encode_prompt(
    tokenizer,
    system_prompt: str,
    dialogue: str,
    *,
    max_input_length: int,
    prefix_ids: list[int] | None = None,
) -> EncodedPrompt:
    """Prompt ids (system + user turn + generation prompt), at most ``max_input_length`` long.

    A prompt that is too long loses the END of its dialogue: the system prompt (the task and the
    label list) and the template stay intact, and call-centre dialogues state the request early.
    The ids are checked to start with ``prefix_ids`` (computed when not given), so the shared-
    prefix path and the scorer can rely on it. Serving must encode prompts with this function.
    """
    if prefix_ids is None:
        prefix_ids = shared_prefix_ids(tokenizer, system_prompt)

    def encode(text: str) -> list[int]:
        return _tokenize(tokenizer, render_prompt(tokenizer, system_prompt, text))

    ids = encode(dialogue)
    truncated = False
    if len(ids) > max_input_length:
        truncated = True
        empty = encode("")
        if len(empty) > max_input_length:
            raise ValueError(
                f"max_input_length={max_input_length} is shorter than the system prompt and template alone "
                f"({len(empty)} tokens); raise max_input_length or shorten the system prompt"
            )
        # Largest dialogue head (in characters) that fits: binary search, one tokenisation per probe.
        lo, hi = 0, len(dialogue) - 1  # lo always fits, hi+1 does not
        best = empty
        while lo < hi:
            mid = (lo + hi + 1) // 2
            candidate = encode(dialogue[:mid])
            if len(candidate) <= max_input_length:
                lo, best = mid, candidate
            else:
                hi = mid - 1
        ids = best
    if ids[: len(prefix_ids)] != prefix_ids:
        raise ValueError(
            "the prompt does not start with the shared prefix tokens (a BPE merge crossed the end of the "
            "system prompt); this tokenizer/template cannot use a shared prefix"
        )
    return EncodedPrompt(input_ids=ids, truncated=truncated)


@dataclass(frozen=True)
class AssistantTurn:
    """How the template wraps an answer after the generation prompt: ``lead + answer + end``.

    ``lead`` is text the template puts between the generation prompt and the answer (GLM-4's
    generation prompt is ``<|assistant|>`` while a rendered answer reads ``<|assistant|>\\n…``, so
    the model itself writes the newline); ``end`` is what it writes after the answer (Qwen:
    ``<|im_end|>``), without trailing whitespace, which generation need not emit.
    """

    lead: str
    end: str


def assistant_turn(tokenizer, system_prompt: str) -> AssistantTurn:
    """Read ``lead``/``end`` off the template itself with a probe answer."""
    dialogue, answer = "对话", "意图：0：答案"
    prompt = render_prompt(tokenizer, system_prompt, dialogue)
    full = tokenizer.apply_chat_template(build_messages(system_prompt, dialogue, answer), tokenize=False)
    rest = full[len(prompt):]
    if not full.startswith(prompt) or answer not in rest:
        raise ValueError("the chat template does not render the answer after its generation prompt")
    lead, _, end = rest.partition(answer)
    return AssistantTurn(lead=lead, end=end.rstrip())


def completion_ids(tokenizer, answer: str, turn: AssistantTurn) -> list[int]:
    """Ids the model must generate after the prompt: lead + answer, then the end of turn.

    The end of turn is the template's marker, or eos when the template writes nothing after an
    answer (GLM-4: the turn ends at ``<|endoftext|>`` or the next ``<|user|>``).
    """
    ids = _tokenize(tokenizer, turn.lead + answer)
    if turn.end:
        return ids + _tokenize(tokenizer, turn.end)
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template ends an answer with nothing and the tokenizer has no eos token")
    return ids + [tokenizer.eos_token_id]


def encode_sample(
    tokenizer,
    system_prompt: str,
    dialogue: str,
    answer: str,
    *,
    max_input_length: int,
    max_output_length: int,
    prefix_ids: list[int] | None = None,
    turn: AssistantTurn | None = None,
) -> EncodedSample:
    """Prompt + answer ids with labels only on what the model must generate (see ``completion_ids``).

    ``max_input_length`` bounds the prompt (see ``encode_prompt``), ``max_output_length`` the
    answer plus its end-of-turn tokens (an over-long answer keeps its start).
    ``prefix_ids``/``turn`` are per-tokenizer constants; pass them when encoding many samples.
    """
    prompt = encode_prompt(
        tokenizer, system_prompt, dialogue, max_input_length=max_input_length, prefix_ids=prefix_ids
    )
    target = completion_ids(tokenizer, answer, turn or assistant_turn(tokenizer, system_prompt))
    truncated = prompt.truncated
    if len(target) > max_output_length:
        target, truncated = target[:max_output_length], True
    return EncodedSample(
        input_ids=prompt.input_ids + target,
        labels=[IGNORE_INDEX] * len(prompt.input_ids) + target,
        truncated=truncated,
    )


def encode_dataset(
    tokenizer,
    system_prompt: str,
    pairs: list[tuple[str, str]],
    *,
    max_input_length: int,
    max_output_length: int,
) -> EncodedDataset:
    """Encode (dialogue, answer) pairs sharing one system prompt; the prefix is computed once."""
    prefix = shared_prefix_ids(tokenizer, system_prompt)
    turn = assistant_turn(tokenizer, system_prompt)
    samples = [
        encode_sample(
            tokenizer, system_prompt, dialogue, answer,
            max_input_length=max_input_length, max_output_length=max_output_length, prefix_ids=prefix, turn=turn,
        )
        for dialogue, answer in pairs
    ]
    lengths = [len(s.input_ids) for s in samples] or [0]
    return EncodedDataset(
        samples=samples,
        prefix_ids=prefix,
        n_truncated=sum(s.truncated for s in samples),
        stats={
            "n_samples": len(samples),
            "prefix_tokens": len(prefix),
            "max_tokens": max(lengths),
            "mean_tokens": sum(lengths) / len(lengths),
        },
    )


@dataclass
class ChatCollator:
    """Pad a list of ``{"input_ids", "labels"}`` features into a batch.

    - ``prefix_length == 0`` (naive): ``input_ids``/``attention_mask``/``labels`` [B, L], right-padded,
      labels -100 on padding.
    - ``prefix_length == P > 0`` (shared prefix): ``prefix_ids`` [P] once, and the per-sample rest as
      ``suffix_ids``/``suffix_mask``/``labels`` [B, S], right-padded. Every feature must start with
      the same P tokens and carry no label inside them, nor on the first suffix token (it is the
      user turn, predicted from the prefix's last position, which the shared path does not score).
    """

    pad_token_id: int
    prefix_length: int = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        if self.prefix_length <= 0:
            ids, mask, labels = self._pad([f["input_ids"] for f in features], [f["labels"] for f in features])
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        p = self.prefix_length
        prefix = list(features[0]["input_ids"][:p])
        for f in features:
            if list(f["input_ids"][:p]) != prefix:
                raise ValueError("samples in a shared-prefix batch must start with the same prefix tokens")
            if len(f["input_ids"]) <= p + 1 or any(label != IGNORE_INDEX for label in f["labels"][: p + 1]):
                raise ValueError("a shared-prefix sample must have no labels on the prefix or the first suffix token")
        ids, mask, labels = self._pad([f["input_ids"][p:] for f in features], [f["labels"][p:] for f in features])
        return {
            "prefix_ids": torch.tensor(prefix, dtype=torch.long),
            "suffix_ids": ids,
            "suffix_mask": mask,
            "labels": labels,
        }

    def _pad(self, id_lists, label_lists):
        ids, mask = pad_rows(id_lists, self.pad_token_id)
        labels, _ = pad_rows(label_lists, IGNORE_INDEX)
        return ids, mask, labels


def pad_rows(rows: list[list[int]], pad_value: int, *, side: str = "right",
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids as one [B, width] tensor and its attention mask.

    Training and scoring read each row from its start (right padding); generation continues every
    row at its end, so it pads on the left.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))

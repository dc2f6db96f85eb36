"""Score every label of a model's label set for a batch of dialogues, computing the system prompt once.

Why score instead of generate: a fine-tuned model answers ``意图：{id}：{name}``. Instead of letting
it write free text and parsing it, we ask for the probability of each of the label set's answers
(+ the end-of-turn token) given the prompt. The result is always a valid label, comes with a
calibrated confidence and a ranked top-k, and costs a fixed amount of work per text.

The score of a label is the *sum* of its answer tokens' log-probabilities, ``log P(answer | prompt)``:
the sequence probability the model was trained to maximise. A softmax over the labels' sums is then
``P(label | prompt, the answer is one of the labels)``. Length normalisation (mean log-prob) is not
used: it has no probabilistic meaning and favours long names, whose later tokens are nearly
determined by their first ones; after fine-tuning the whole mass sits on the first distinguishing
tokens anyway.

How the work is shared (``LabelScorer``, ``strategy="prefix_cache"``):

1. ``PrefixCache``: the system prompt is byte-identical for every request to a model, so its
   keys/values are computed once per model + adapter (LoRA on k/v changes them) and reused.
   Its token ids are the longest common token prefix of conversations with different dialogues,
   because BPE may merge across the system/user boundary. A text whose tokens do not start with
   that prefix (a merge we did not foresee) is scored without it, never wrongly.
2. Context pass: per batch of texts, only the per-text suffix (user turn + assistant header, and
   the tokens every candidate answer starts with, e.g. ``意图：``) runs, on top of a fresh copy of
   the prefix cache (a cache is mutated by a forward; the stored one is never passed). The last
   position's logits give each label's first distinguishing token.
3. Label pass: the remaining answer tokens of all labels run in one forward on top of the context.
   ``packed`` (default with sdpa/eager attention): per text, all labels' tokens are packed into one
   sequence; a 4D mask lets each label see the context and its own earlier tokens only, with the
   positions it would have right after the context. No cache copy, no padding. ``rows`` (any
   attention implementation, e.g. flash): the context cache is copied over (text, label) rows and
   the continuations are right-padded, in chunks bounded by a budget of cached tokens.
   On Qwen2.5-0.5B (GQA, 2 kv heads) the row copies plus the per-row kv-head expansion cost
   ~20% of the scoring time, which the packed pass does not spend.

Only the logits that are needed are computed: the decoder's hidden states go through the output
layer at the needed positions only, in chunks (full-vocabulary logits for 34 labels x 10 tokens on a
151k-vocab model would be ~200 MB per text).

``strategy="full"`` runs the full sequence (prompt + answer) per (text, label) without any cache;
it is the fallback for models with sliding-window attention layers, whose caches do not compose
with a padded, copied context the way full-attention caches do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch

from app.domain.labels import LabelSet
from app.domain.prompt import format_answer
from app.ml.infer.trie import LabelTrie
from app.ml.models.introspect import has_sliding_attention, unwrap_causal_lm
from app.ml.models.linear_head import LinearHead
from app.ml.text.encoding import (
    assistant_turn,
    common_prefix_length,
    completion_ids,
    encode_prompt,
    pad_rows,
    shared_prefix_ids,
)

Strategy = Literal["prefix_cache", "full"]
# What a label's score is: its distinguishing prefix ("trie", app.ml.infer.trie) or its whole answer ("full").
AnswerScoring = Literal["trie", "full"]
ANSWER_SCORINGS = ("trie", "full")
LabelPass = Literal["auto", "packed", "rows"]
# Attention implementations that take a custom 4D mask (the packed label pass needs one).
_CUSTOM_MASK_ATTENTION = ("sdpa", "eager")

# No truncation unless the model's recipe asks for it (``ModelRef.max_input_length``).
UNLIMITED_INPUT = 1 << 30


# --- encoding: exactly as training encodes (app.ml.text.encoding) --------------------------------


def render_prompt_ids(tokenizer, system_prompt: str, dialogue: str, max_input_length: int | None = None) -> list[int]:
    """Token ids of the full prompt for one dialogue, ending with the generation prompt.

    ``chat_data.encode_prompt`` (the training encoding; an over-long dialogue loses its end), without
    its shared-prefix check: a prompt that does not start with the prefix is scored without it here.
    """
    return encode_prompt(
        tokenizer, system_prompt, dialogue, max_input_length=max_input_length or UNLIMITED_INPUT, prefix_ids=[]
    ).input_ids


def answer_continuation_ids(tokenizer, system_prompt: str, answer: str) -> list[int]:
    """The tokens the model emits after the prompt for ``answer``, ending with the end-of-turn token.

    ``chat_data.completion_ids``: the very tokens training puts labels on (the template's text
    before the answer, e.g. GLM-4's newline, the answer, then ``<|im_end|>`` for Qwen or eos when
    the template writes nothing after an answer).
    """
    return completion_ids(tokenizer, answer, assistant_turn(tokenizer, system_prompt))


@dataclass(frozen=True)
class LabelCandidates:
    """The label set's answers as tokens, computed once per tokenizer + system prompt + label set.

    ``shared_ids`` are the tokens every answer starts with (scored once per text, in the context
    pass); ``remaining[i]`` are label i's tokens after them (at least one each).
    """

    label_ids: tuple[int, ...]
    label_names: tuple[str, ...]
    shared_ids: tuple[int, ...]
    remaining: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, tokenizer, system_prompt: str, label_set: LabelSet) -> "LabelCandidates":
        if len(label_set) == 0:
            raise ValueError("the label set is empty")
        turn = assistant_turn(tokenizer, system_prompt)
        full = [completion_ids(tokenizer, format_answer(lab.id, lab.name), turn) for lab in label_set]
        shared = min(common_prefix_length(full[0], other) for other in full) if len(full) > 1 else len(full[0]) - 1
        remaining = tuple(tuple(ids[shared:]) for ids in full)
        if any(not rest for rest in remaining):
            raise ValueError("two labels render to the same answer tokens")
        return cls(
            label_ids=tuple(lab.id for lab in label_set),
            label_names=tuple(lab.name for lab in label_set),
            shared_ids=tuple(full[0][:shared]),
            remaining=remaining,
        )

    def full_ids(self, index: int) -> list[int]:
        return list(self.shared_ids) + list(self.remaining[index])

    @property
    def trie(self) -> LabelTrie:
        cached = self.__dict__.get("_trie")
        if cached is None:
            cached = LabelTrie.build(self.remaining)
            object.__setattr__(self, "_trie", cached)
        return cached

    def prefix_ids(self, index: int) -> list[int]:
        """The shared tokens + label ``index``'s distinguishing prefix."""
        return list(self.shared_ids) + list(self.trie.prefixes[index])


# --- model plumbing ---------------------------------------------------------------------------


class _OutputHead:
    """Decoder + output layer split, so logits are computed only where needed.

    Checked once against the model's own forward (a model that post-processes its logits in a way
    not reproduced here fails loudly instead of scoring wrongly).
    """

    def __init__(self, model):
        causal_lm = unwrap_causal_lm(model)
        self.decoder = causal_lm.get_decoder()
        self.lm_head = causal_lm.get_output_embeddings()
        text_config = causal_lm.config.get_text_config()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.model = causal_lm

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states, soft-capped where the model caps them (Gemma)."""
        logits = self.lm_head(hidden).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def log_probs_at(self, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        """log P(target) for hidden states [N, H] and targets [N], in chunks of positions."""
        out = []
        for start in range(0, hidden.shape[0], chunk):
            logits = self.logits(hidden[start : start + chunk])
            logp = torch.log_softmax(logits, dim=-1)
            out.append(logp.gather(-1, targets[start : start + chunk, None]).squeeze(-1))
        if not out:
            return hidden.new_zeros(0, dtype=torch.float32)
        return torch.cat(out)

    def verify(self, input_ids: list[int], device: torch.device) -> None:
        ids = torch.tensor([input_ids[:8]], device=device)
        expected = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        hidden = self.decoder(input_ids=ids).last_hidden_state[0, -1:]
        got = self.logits(hidden)[0]
        tolerance = 1e-3 * max(1.0, float(expected.abs().max()))
        if not torch.allclose(got, expected, atol=tolerance, rtol=1e-2):
            raise RuntimeError(
                f"{type(self.model).__name__}: decoder + output layer do not reproduce the model's logits; "
                "label scoring does not support this architecture"
            )


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=unwrap_causal_lm(model).config)


def _cache_with_rows(cache, row_index: torch.Tensor | None, batch: int | None = None):
    """A fresh cache holding ``cache``'s keys/values for the given batch rows (or ``batch`` copies of row 0).

    Layers are shallow-copied and their tensors replaced, never modified: the source cache stays
    valid. ``batch`` uses a stride-0 view; the next forward's concatenation materialises it.
    """
    fresh = copy.copy(cache)
    fresh.layers = []
    for layer in cache.layers:
        new_layer = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
            if row_index is not None:
                new_layer.keys = layer.keys.index_select(0, row_index)
                new_layer.values = layer.values.index_select(0, row_index)
            else:
                new_layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
                new_layer.values = layer.values.expand(batch, *layer.values.shape[1:])
        fresh.layers.append(new_layer)
    return fresh


class PrefixCache:
    """Keys/values of the shared system-prompt prefix for one model with one adapter state.

    Computed once and only ever copied (``expanded``): a forward appends to the cache it is given.
    It is only valid for the adapter that was active when it was built; build one per adapter.
    """

    def __init__(self, model, prefix_ids: list[int]):
        self.prefix_ids = list(prefix_ids)
        self.length = len(self.prefix_ids)
        device = unwrap_causal_lm(model).device
        self._cache = _new_cache(model)
        if self.length:
            head = _OutputHead(model)
            with torch.inference_mode():
                head.decoder(
                    input_ids=torch.tensor([self.prefix_ids], device=device),
                    past_key_values=self._cache,
                    use_cache=True,
                )

    def matches(self, ids: list[int]) -> bool:
        """Whether ``ids`` start with the cached prefix and have at least one token after it."""
        return len(ids) > self.length and ids[: self.length] == self.prefix_ids

    def expanded(self, batch_size: int):
        """A fresh DynamicCache with the prefix for ``batch_size`` rows (safe to pass to a forward)."""
        return _cache_with_rows(self._cache, None, batch_size)


# --- scoring ----------------------------------------------------------------------------------


class LabelScorer:
    """Scores a label set for texts under one model whose adapter state does not change.

    The caller makes sure the same adapter is active for every call (the classifier holds a lock
    around adapter switching + scoring); the prefix cache is built lazily on the first call.

    - ``max_cached_tokens``: budget for the label pass (rows x context length held in the copied
      caches at once); lower it on small machines, raise it on a GPU.
    - ``logit_chunk``: positions sent through the output layer at once.
    - ``max_input_length``: prompt tokens at most (the training recipe's; None = no truncation).
    - ``label_pass``: "packed" (all labels in one sequence per text, block mask; needs sdpa/eager
      attention), "rows" (one row per (text, label), copied caches; any attention), "auto".
    """

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str,
        label_set: LabelSet,
        *,
        strategy: Strategy | None = None,
        max_cached_tokens: int = 32768,
        logit_chunk: int = 256,
        max_input_length: int | None = None,
        label_pass: LabelPass = "auto",
        max_padding: float = 0.25,
        head: LinearHead | None = None,
    ):
        self.model = model
        self.max_padding = max_padding
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.candidates = LabelCandidates.build(tokenizer, system_prompt, label_set)
        # A model trained with a linear head (app.ml.models.linear_head) is scored by it, not by its answers.
        self.head = head.aligned(list(self.candidates.label_ids)) if head is not None else None
        if strategy is None:
            sliding = has_sliding_attention(unwrap_causal_lm(model).config.get_text_config())
            strategy = "full" if sliding else "prefix_cache"
        self.strategy: Strategy = strategy
        self.max_cached_tokens = max_cached_tokens
        self.logit_chunk = logit_chunk
        self.max_input_length = max_input_length
        self._attn_implementation = getattr(unwrap_causal_lm(model).config, "_attn_implementation", None)
        if label_pass == "auto":
            label_pass = "packed" if self._attn_implementation in _CUSTOM_MASK_ATTENTION else "rows"
        elif label_pass == "packed" and self._attn_implementation not in _CUSTOM_MASK_ATTENTION:
            raise ValueError(f"the packed label pass needs sdpa or eager attention, not {self._attn_implementation}")
        self.label_pass: LabelPass = label_pass
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._head: _OutputHead | None = None
        self._prefix: PrefixCache | None = None
        self.fallback_texts = 0  # texts scored without the prefix (their tokens did not start with it)

    @property
    def device(self) -> torch.device:
        return unwrap_causal_lm(self.model).device

    def _ensure_ready(self, probe_ids: list[int]) -> None:
        if self._head is None:
            head = _OutputHead(self.model)
            with torch.inference_mode():
                head.verify(probe_ids, self.device)
            self._head = head
        if self.strategy == "prefix_cache" and self._prefix is None:
            self._prefix = PrefixCache(self.model, shared_prefix_ids(self.tokenizer, self.system_prompt))

    def reset(self) -> None:
        """Forget the prefix cache (the adapter's weights changed)."""
        self._prefix = None

    def score(self, texts: list[str], *, batch_size: int = 8, answers: AnswerScoring = "full") -> torch.Tensor:
        """log P(answer_label | prompt(text)) for every text and label: a float32 [n_texts, n_labels] CPU tensor.

        ``answers="trie"``: log P(label) under decoding constrained to the label set instead
        (``app.ml.infer.trie``): only the dialogue and the trie's inner nodes run; rows sum to 1 in
        probability.
        """
        if answers not in ANSWER_SCORINGS:
            raise ValueError(f"unknown answer scoring '{answers}' (use {' or '.join(ANSWER_SCORINGS)})")
        if not texts:
            return torch.zeros((0, len(self.candidates.label_ids)))
        if self.head is not None:
            return self.head.log_probs(self.features(texts, batch_size=batch_size))
        prompts = [render_prompt_ids(self.tokenizer, self.system_prompt, t, self.max_input_length) for t in texts]
        self._ensure_ready(prompts[0])
        # Batches of similar lengths waste less on padding; results go back to the callers' order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = torch.empty((len(prompts), len(self.candidates.label_ids)), dtype=torch.float32)
        with torch.inference_mode():
            cached = self._prefix.length if self.strategy == "prefix_cache" and self._prefix is not None else 0
            lengths = [max(1, len(p) - cached) for p in prompts]  # the tokens that run: past the cached prefix
            for chunk in _length_chunks(order, lengths, batch_size, self.max_padding):
                out[chunk] = self._score_batch([prompts[i] for i in chunk], answers)
        return out

    def features(self, texts: list[str], *, batch_size: int = 8) -> torch.Tensor:
        """One vector per text for a linear head: the final hidden state averaged over the text's tokens after
        the shared system prompt (user turn, assistant header and the tokens every answer starts with), read
        with the system prompt before it. A float32 [n_texts, hidden] CPU tensor.

        The mean over the dialogue rather than the last position: on real CMCC-34 rows with the 0.5B embedded
        model (5-fold cross-validation, docs/benchmarks.md §5) a logistic regression on the mean scored
        macro-F1 0.28-0.29, on the last position 0.20-0.21, TF-IDF 0.21-0.22.
        """
        if not texts:
            return torch.zeros((0, 0))
        prompts = [render_prompt_ids(self.tokenizer, self.system_prompt, t, self.max_input_length) for t in texts]
        self._ensure_ready(prompts[0])
        prefix_ids = shared_prefix_ids(self.tokenizer, self.system_prompt)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        lengths = [max(1, len(p) - len(prefix_ids)) for p in prompts]
        rows: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for chunk in _length_chunks(order, lengths, batch_size, self.max_padding):
                for i, vector in zip(chunk, self._features_batch([prompts[i] for i in chunk], prefix_ids)):
                    rows[i] = vector
        return torch.stack([rows[i] for i in range(len(prompts))])

    def _features_batch(self, prompts: list[list[int]], prefix_ids: list[int]) -> torch.Tensor:
        shared = list(self.candidates.shared_ids)
        cached = self._prefix if self.strategy == "prefix_cache" else None
        if cached is not None and all(cached.matches(ids) for ids in prompts):
            plen = cached.length
            seqs = [ids[plen:] + shared for ids in prompts]
            starts = [0] * len(prompts)
        else:  # no usable cache: the whole prompt runs, the pooled span starts after the prefix all the same
            cached, plen = None, 0
            seqs = [ids + shared for ids in prompts]
            starts = [len(prefix_ids) if ids[: len(prefix_ids)] == prefix_ids and len(ids) > len(prefix_ids) else 0
                      for ids in prompts]
        ids, mask = pad_rows(seqs, self.pad_id, device=self.device)
        batch = len(prompts)
        if cached is not None:
            kwargs = dict(past_key_values=cached.expanded(batch), use_cache=True,
                          attention_mask=torch.cat([torch.ones((batch, plen), dtype=torch.long, device=self.device),
                                                    mask], dim=1),
                          position_ids=plen + torch.arange(ids.shape[1], device=self.device).expand(batch, -1))
        else:
            kwargs = dict(attention_mask=mask)
        hidden = self._head.decoder(input_ids=ids, **kwargs).last_hidden_state.float()
        span = mask.clone()
        for row, start in enumerate(starts):
            span[row, :start] = 0
        span = span.to(hidden.dtype)[:, :, None]
        return ((hidden * span).sum(1) / span.sum(1)).cpu()

    def tokens_run(self, texts: list[str], answers: AnswerScoring = "full") -> list[int]:
        """Tokens each text costs beyond the cached system prompt (for benchmarks): its suffix + label tokens."""
        cands = self.candidates
        prefix_len = len(shared_prefix_ids(self.tokenizer, self.system_prompt)) if self.strategy == "prefix_cache" else 0
        if answers == "trie":
            extra = len(cands.trie.nodes)
        else:
            extra = sum(len(rest) - 1 for rest in cands.remaining)
        out = []
        for text in texts:
            ids = render_prompt_ids(self.tokenizer, self.system_prompt, text, self.max_input_length)
            out.append(len(ids) - prefix_len + len(cands.shared_ids) + extra)
        return out

    def _score_batch(self, prompts: list[list[int]], answers: AnswerScoring = "full") -> torch.Tensor:
        if self.strategy == "full":
            return self._score_full(prompts, answers)
        assert self._prefix is not None
        out = torch.empty((len(prompts), len(self.candidates.label_ids)), dtype=torch.float32)
        with_prefix = [i for i, ids in enumerate(prompts) if self._prefix.matches(ids)]
        without = [i for i in range(len(prompts)) if i not in set(with_prefix)]
        self.fallback_texts += len(without)
        if with_prefix:
            out[with_prefix] = self._score_cached([prompts[i] for i in with_prefix], self._prefix, answers)
        if without:
            out[without] = self._score_cached([prompts[i] for i in without], None, answers)
        return out

    # -- prefix_cache strategy: context pass + label pass

    def _score_cached(self, prompts: list[list[int]], prefix: PrefixCache | None,
                      answers: AnswerScoring = "full") -> torch.Tensor:
        cands, head, device = self.candidates, self._head, self.device
        plen = prefix.length if prefix is not None else 0
        n_shared = len(cands.shared_ids)

        # Context pass: per-text suffix + the tokens all answers share, right-padded.
        suffixes = [ids[plen:] + list(cands.shared_ids) for ids in prompts]
        suffix_ids, suffix_mask = pad_rows(suffixes, self.pad_id, device=device)
        batch = len(prompts)
        cache = prefix.expanded(batch) if prefix is not None else _new_cache(self.model)
        ctx_mask = torch.cat([torch.ones((batch, plen), dtype=torch.long, device=device), suffix_mask], dim=1)
        positions = plen + torch.arange(suffix_ids.shape[1], device=device).expand(batch, -1)
        hidden = head.decoder(
            input_ids=suffix_ids,
            attention_mask=ctx_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        rows = torch.arange(batch, device=device)
        if answers == "trie":  # the shared answer tokens are forced under constrained decoding
            return self._trie_pass(cache, ctx_mask, plen + lengths, head.logits(hidden[rows, lengths - 1]))
        # log P(shared answer tokens): the same for every label of a text, kept for exact sequence scores.
        shared_logp = torch.zeros(batch, device=device)
        if n_shared:
            offsets = torch.arange(n_shared, device=device)
            pos = (lengths - 1 - n_shared)[:, None] + offsets[None, :]
            h = hidden[rows[:, None], pos].reshape(batch * n_shared, -1)
            targets = torch.tensor(cands.shared_ids, device=device).repeat(batch)
            shared_logp = head.log_probs_at(h, targets, self.logit_chunk).view(batch, n_shared).sum(-1)
        last_logits = head.logits(hidden[rows, lengths - 1])
        # First distinguishing token of every label, from the last context position.
        first = torch.tensor([rest[0] for rest in cands.remaining], device=device)
        scores = torch.log_softmax(last_logits, dim=-1)[:, first] + shared_logp[:, None]

        # Label pass: the remaining tokens of every label with more than one, on top of the context.
        if any(len(rest) > 1 for rest in cands.remaining):
            real_len = plen + lengths  # tokens of each text's context, padding excluded
            if self.label_pass == "packed":
                scores += self._label_pass_packed(cache, ctx_mask, real_len)
            else:
                scores += self._label_pass_rows(cache, ctx_mask, real_len)
        return scores.float().cpu()

    def _label_pass_packed(self, cache, ctx_mask: torch.Tensor, real_len: torch.Tensor) -> torch.Tensor:
        """All labels' continuations packed into one sequence per text, kept apart by the attention mask.

        Each label's tokens see the text's context and their own earlier tokens only, at the
        positions they would have right after the context. The context cache is used as is (no
        per-label copy, no padding): one forward per batch of texts.
        """
        cands, head, device = self.candidates, self._head, self.device
        inputs, targets, segment, offset = [], [], [], []
        for j, rest in enumerate(cands.remaining):
            inputs += rest[:-1]
            targets += rest[1:]
            segment += [j] * (len(rest) - 1)
            offset += range(len(rest) - 1)
        batch, context_len, packed = ctx_mask.shape[0], ctx_mask.shape[1], len(inputs)
        seg = torch.tensor(segment, device=device)
        order = torch.arange(packed, device=device)
        own_label = (seg[:, None] == seg[None, :]) & (order[:, None] >= order[None, :])
        allowed = torch.cat(
            [ctx_mask.bool()[:, None, :].expand(batch, packed, context_len), own_label.expand(batch, packed, packed)],
            dim=-1,
        )[:, None]
        if self._attn_implementation == "sdpa":
            mask = allowed  # boolean: True = attend
        else:  # eager adds the mask to the attention scores
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(
                ~allowed, torch.finfo(torch.float32).min
            )
        hidden = head.decoder(
            input_ids=torch.tensor(inputs, device=device).expand(batch, -1),
            attention_mask=mask,
            position_ids=real_len[:, None] + torch.tensor(offset, device=device)[None, :],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        logp = head.log_probs_at(
            hidden.reshape(batch * packed, -1), torch.tensor(targets, device=device).repeat(batch), self.logit_chunk
        ).view(batch, packed)
        return torch.zeros((batch, len(cands.remaining)), device=device).index_add_(1, seg, logp)

    def _label_pass_rows(self, cache, ctx_mask: torch.Tensor, real_len: torch.Tensor) -> torch.Tensor:
        """One (text, label) row per label: the context cache copied row-wise, continuations right-padded.

        Needs only a 2D padding mask (works with every attention implementation, flash included);
        rows are chunked so that copied caches hold at most ``max_cached_tokens`` tokens.
        """
        cands, head, device = self.candidates, self._head, self.device
        batch, context_len = ctx_mask.shape
        out = torch.zeros((batch, len(cands.remaining)), device=device)
        multi = [j for j, rest in enumerate(cands.remaining) if len(rest) > 1]
        pairs = [(b, j) for b in range(batch) for j in multi]
        per_chunk = max(1, self.max_cached_tokens // max(1, context_len))
        for start in range(0, len(pairs), per_chunk):
            chunk = pairs[start : start + per_chunk]
            text_rows = torch.tensor([b for b, _ in chunk], device=device)
            label_inputs = [list(cands.remaining[j][:-1]) for _, j in chunk]
            label_targets = [list(cands.remaining[j][1:]) for _, j in chunk]
            in_ids, in_mask = pad_rows(label_inputs, self.pad_id, device=device)
            hidden = head.decoder(
                input_ids=in_ids,
                attention_mask=torch.cat([ctx_mask[text_rows], in_mask], dim=1),
                position_ids=real_len[text_rows, None] + torch.arange(in_ids.shape[1], device=device)[None, :],
                past_key_values=_cache_with_rows(cache, text_rows),
                use_cache=True,
            ).last_hidden_state
            valid = in_mask.bool()
            tgt, _ = pad_rows(label_targets, 0, device=device)
            logp = head.log_probs_at(hidden[valid], tgt[valid], self.logit_chunk)
            row_of = torch.arange(len(chunk), device=device)[:, None].expand_as(valid)[valid]
            sums = torch.zeros(len(chunk), device=device).index_add_(0, row_of, logp)
            out[text_rows, torch.tensor([j for _, j in chunk], device=device)] = sums
        return out

    def _trie_pass(self, cache, ctx_mask: torch.Tensor, real_len: torch.Tensor, root_logits: torch.Tensor) -> torch.Tensor:
        """log P(label) under decoding constrained to the label set (``LabelTrie.label_log_probs``): the
        trie's inner nodes run as one packed sequence per text on top of the context, each seeing the
        context and its own ancestors; logits are computed at the branching nodes only."""
        trie, head, device = self.candidates.trie, self._head, self.device
        batch, context_len = ctx_mask.shape
        node_hidden = None
        if trie.nodes:
            n = len(trie.nodes)
            inputs = torch.tensor([path[-1] for path in trie.nodes], device=device)
            depth = torch.tensor([len(path) - 1 for path in trie.nodes], device=device)
            sees = torch.tensor([[trie.is_ancestor_or_self(b, a) for b in range(n)] for a in range(n)], device=device)
            if self.label_pass == "packed":
                allowed = torch.cat(
                    [ctx_mask.bool()[:, None, :].expand(batch, n, context_len), sees.expand(batch, n, n)], dim=-1
                )[:, None]
                if self._attn_implementation == "sdpa":
                    mask = allowed
                else:
                    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(
                        ~allowed, torch.finfo(torch.float32).min
                    )
                node_hidden = head.decoder(
                    input_ids=inputs.expand(batch, -1),
                    attention_mask=mask,
                    position_ids=real_len[:, None] + depth[None, :],
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state
            else:  # one row per (text, node): the node's path on a copy of the text's context
                rows_hidden = []
                paths = [list(path) for path in trie.nodes]
                ids, mask = pad_rows(paths, self.pad_id, device=device)
                for b in range(batch):
                    text_rows = torch.full((n,), b, device=device)
                    out = head.decoder(
                        input_ids=ids,
                        attention_mask=torch.cat([ctx_mask[text_rows], mask], dim=1),
                        position_ids=real_len[b] + torch.arange(ids.shape[1], device=device)[None, :].expand(n, -1),
                        past_key_values=_cache_with_rows(cache, text_rows),
                        use_cache=True,
                    ).last_hidden_state
                    rows_hidden.append(out[torch.arange(n, device=device), depth])
                node_hidden = torch.stack(rows_hidden)

        def node_log_probs(node: int) -> torch.Tensor:
            logits = root_logits if node < 0 else head.logits(node_hidden[:, node])
            return torch.log_softmax(logits.float(), dim=-1)

        return trie.label_log_probs(node_log_probs).cpu()

    # -- full strategy: every (text, label) sequence from scratch

    def _score_full(self, prompts: list[list[int]], scoring: AnswerScoring = "full") -> torch.Tensor:
        cands, head, device = self.candidates, self._head, self.device
        n_labels = len(cands.label_ids)
        if scoring == "trie":
            # One uncached sequence per (text, branching node): prompt + shared tokens + the node's path.
            trie = cands.trie
            nodes = trie.branching_nodes()
            answers = [list(cands.shared_ids) + (list(trie.nodes[n]) if n >= 0 else []) for n in nodes]
        else:
            answers = [cands.full_ids(j) for j in range(n_labels)]
        pairs = [(b, j) for b in range(len(prompts)) for j in range(len(answers))]
        scores = torch.zeros((len(prompts), n_labels), dtype=torch.float32)
        node_logp: dict[int, torch.Tensor] = {}
        longest = max(len(p) for p in prompts) + max(len(a) for a in answers)
        per_chunk = max(1, self.max_cached_tokens // longest)
        for start in range(0, len(pairs), per_chunk):
            chunk = pairs[start : start + per_chunk]
            seqs = [prompts[b] + answers[j] for b, j in chunk]
            ids, mask = pad_rows(seqs, self.pad_id, device=device)
            hidden = head.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            for k, (b, j) in enumerate(chunk):
                p, a = len(prompts[b]), answers[j]
                if scoring == "trie":
                    logits = head.logits(hidden[k, p + len(a) - 1][None]).float()
                    node_logp.setdefault(nodes[j], torch.empty((len(prompts), logits.shape[-1])))[b] = (
                        torch.log_softmax(logits[0], dim=-1).cpu())
                    continue
                h = hidden[k, p - 1 : p - 1 + len(a)]
                scores[b, j] = head.log_probs_at(h, torch.tensor(a, device=device), self.logit_chunk).sum().cpu()
        if scoring == "trie":
            if not node_logp:  # a single label: certain
                return scores
            return trie.label_log_probs(lambda node: node_logp[node])
        return scores


def _length_chunks(order: list[int], lengths: list[int], batch_size: int, max_padding: float) -> list[list[int]]:
    """Split length-sorted ``order`` into batches of at most ``batch_size`` whose padded size stays within
    ``1 + max_padding`` times their real tokens. On a CPU every token costs compute, so a padded batch of
    mixed lengths (what a micro-batcher gathers from concurrent requests) can cost more than running
    its texts apart; bounding the padding keeps sharing a forward from ever being much slower."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    for i in order:
        candidate = chunk + [i]
        padded = len(candidate) * max(lengths[j] for j in candidate)
        if chunk and (len(candidate) > batch_size or padded > (1 + max_padding) * sum(lengths[j] for j in candidate)):
            chunks.append(chunk)
            candidate = [i]
        chunk = candidate
    if chunk:
        chunks.append(chunk)
    return chunks


def label_distribution(log_probs: torch.Tensor) -> torch.Tensor:
    """Softmax over labels of their log scores: for full answers P(label | prompt, the answer is a
    label); for trie scores (already normalised) the constrained-decoding distribution itself."""
    return torch.softmax(log_probs.float(), dim=-1)

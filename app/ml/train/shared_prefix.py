"""Train on a batch whose samples share a long prefix by running that prefix once.

Every training sample of a model starts with the same system-prompt tokens (500-700 of them:
the task and the 34 labels), followed by a per-sample suffix (the dialogue and the answer,
100-300 tokens). The naive batch runs the prefix B times. Here it runs once, at batch size 1;
its per-layer keys/values are expanded over the batch and the suffixes attend to them, with
position ids ``P + arange(S)`` and an attention mask of ones over the prefix followed by the
suffix padding mask. The result is the same causal LM loss, up to float rounding, and the same
gradients: the expansion's backward sums the gradient of every sample into the prefix, so the
LoRA weights see the prefix tokens exactly as often as in the naive batch.

How it is wired into a transformers model (verified against transformers 5.23):

- The prefix pass records each layer's keys/values (after RoPE) in ``_PrefixRecorder``, a cache
  that stores them without detaching and reports length 0, so the prefix pass builds a plain
  causal mask. Overwriting (not appending) makes a recompute harmless.
- The suffix pass reads them through ``_ReadOnlyPrefixCache``: ``update(k, v, layer)`` returns
  ``cat(prefix_kv[layer].expand(B), k)`` and stores nothing, so calling it again in a gradient-
  checkpoint recompute returns the same tensors. It reports the prefix length, so the models'
  ``create_causal_mask`` builds the [B, 1, S, P+S] mask from the 2-D mask and the query offset.
- Under activation checkpointing, ``GradientCheckpointingLayer`` drops ``past_key_values``
  unless the layer's ``_can_checkpoint_with_cache`` is True; it is set on the decoder-layer
  instances for the duration of the two forward calls (the backward replays use the kwargs
  captured then). Checkpointing must be non-reentrant: the reentrant variant runs the forward
  under no_grad, so the recorded prefix keys/values would carry no graph.
- Logits are computed only at positions that have a label (the full [B, L, vocab] logits of a
  150k-token vocabulary would be most of the activation memory); ``token_loss`` does that for
  the naive path too, so both reduce the same way as transformers' ``ForCausalLMLoss``.

With ``lora_dropout > 0`` the two paths draw different dropout masks for the prefix (one per
batch here, one per sample in the naive batch): equal in expectation, not bitwise.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from app.ml.models.introspect import has_sliding_attention, unwrap_causal_lm
from app.ml.text.encoding import IGNORE_INDEX

# Architectures whose causal-LM head is exactly ``lm_head(final hidden state)`` (no logit
# scaling or soft-capping) and whose decoder takes a cache, explicit position ids and a 2-D mask.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"glm", "glm4", "qwen2", "qwen3", "llama", "mistral"})
# Mask implementations checked to build a correct mask against a non-empty cache.
_SUPPORTED_ATTENTION = frozenset({"eager", "sdpa"})


class _PrefixRecorder(Cache):
    """Collects each layer's prefix keys/values, keeping their autograd graph."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=_RecordingLayer)


class _RecordingLayer(DynamicLayer):
    def update(self, key_states, value_states, *args, **kwargs):
        # Overwrite rather than append: a checkpoint recompute of the prefix pass calls this again.
        self.keys, self.values = key_states, value_states
        self.is_initialized = True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # the prefix pass attends only to itself: plain causal mask


class _ReadOnlyPrefixCache(Cache):
    """Serves the recorded prefix keys/values to every sample of the suffix batch, storing nothing."""

    def __init__(self, recorder: _PrefixRecorder):
        layers = [_PrefixLayer(layer.keys, layer.values) for layer in recorder.layers]
        super().__init__(layers=layers)


class _PrefixLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values
        self.keys, self.values = keys, values  # for code that inspects dtype/device/length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        batch = key_states.shape[0]
        keys = torch.cat([self.prefix_keys.expand(batch, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.prefix_values.expand(batch, -1, -1, -1), value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2]


def _uses_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _decoder_layers(decoder) -> list[GradientCheckpointingLayer]:
    return [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]


def _has_plain_head(causal_lm) -> bool:
    config = getattr(causal_lm, "config", None)
    return (
        config is not None
        and getattr(config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES
        and callable(getattr(causal_lm, "get_decoder", None))
        and causal_lm.get_output_embeddings() is not None
    )


def _reentrant_checkpointing(layers) -> bool:
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False):
            func = getattr(layer, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None) or {}
            if keywords.get("use_reentrant", True):
                return True
    return False


def supports_shared_prefix(model) -> bool:
    """Whether ``shared_prefix_loss`` computes the exact loss for this model (else use the naive path).

    Needs: a known architecture with a plain LM head, full (non-sliding) attention with an eager or
    sdpa mask, no prompt-learning adapter (virtual tokens would sit before the prefix), and, when
    activation checkpointing is on, the non-reentrant variant.
    """
    if _uses_prompt_learning(model):
        return False
    causal_lm = unwrap_causal_lm(model)
    if not _has_plain_head(causal_lm):
        return False
    config = causal_lm.config
    if getattr(config, "_attn_implementation", None) not in _SUPPORTED_ATTENTION:
        return False
    if has_sliding_attention(config):
        return False
    layers = _decoder_layers(causal_lm.get_decoder())
    return bool(layers) and not _reentrant_checkpointing(layers)


@contextmanager
def _cache_kept_under_checkpointing(layers):
    """Let checkpointed layers keep ``past_key_values`` (our caches are idempotent on recompute)."""
    missing = object()
    saved = [(layer, layer.__dict__.get("_can_checkpoint_with_cache", missing)) for layer in layers]
    for layer, _ in saved:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, before in saved:
            if before is missing:
                del layer.__dict__["_can_checkpoint_with_cache"]
            else:
                layer._can_checkpoint_with_cache = before


def token_loss(
    causal_lm, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Causal LM cross-entropy from final hidden states, with logits only where a label exists.

    Position t predicts labels[t+1]. Reduction as in transformers' ``ForCausalLMLoss``: the mean
    over labelled tokens, or their sum divided by ``num_items_in_batch`` (the Trainer's count over
    all gradient-accumulation micro-batches).
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][selected]).float()
    total = F.cross_entropy(logits, targets[selected], reduction="sum")
    if num_items_in_batch is None:
        return total / selected.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def naive_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The ordinary full-batch loss (every sample runs its whole sequence)."""
    causal_lm = unwrap_causal_lm(model)
    if _uses_prompt_learning(model) or not _has_plain_head(causal_lm):
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    out = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return token_loss(causal_lm, out.last_hidden_state, labels, num_items_in_batch)


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Suffixes (by index) into rows no longer than the longest one, first fit by decreasing length.

    Fewer, fuller rows than one per sample: the suffix pass runs ``rows x width`` token positions and
    ``rows x width x (P + width)`` attention pairs, never more than the padded batch's ``B x S_max`` and
    ``B x S_max x (P + S_max)``, and no row attends further than the longest sample would."""
    capacity = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            rows.append([index])
            room.append(capacity - lengths[index])
        else:
            rows[target].append(index)
            room[target] -= lengths[index]
    return rows


def _packed_suffixes(prefix_len: int, suffix_ids, suffix_mask, labels, *, dtype, sdpa: bool):
    """The batch's suffixes packed into ``pack_rows``: ids, labels, position ids (``P + offset`` in each
    suffix) and the mask [rows, 1, width, P + width] by which a token sees the whole prefix and the tokens of
    its own suffix up to itself (a row's padding sees the prefix alone, so no softmax row is empty).

    Labels line up across suffix borders: a suffix's first token never has a label (``ChatCollator``), so
    the last token of one suffix predicts nothing of the next."""
    lengths = [int(n) for n in suffix_mask.sum(dim=1).tolist()]
    rows = pack_rows(lengths)
    width = max(sum(lengths[i] for i in row) for row in rows)
    device = suffix_ids.device
    shape = (len(rows), width)
    ids = torch.full(shape, int(suffix_ids[0, 0]), dtype=suffix_ids.dtype, device=device)
    packed_labels = torch.full(shape, IGNORE_INDEX, dtype=labels.dtype, device=device)
    positions = torch.full(shape, prefix_len, dtype=torch.long, device=device)
    segment = torch.full(shape, -1, dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        column = 0
        for index in row:
            n = lengths[index]
            ids[r, column:column + n] = suffix_ids[index, :n]
            packed_labels[r, column:column + n] = labels[index, :n]
            positions[r, column:column + n] = prefix_len + torch.arange(n, device=device)
            segment[r, column:column + n] = index
            column += n
    columns = torch.arange(width, device=device)
    own = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) \
        & (columns[None, None, :] <= columns[None, :, None])
    allowed = torch.cat([torch.ones(len(rows), width, prefix_len, dtype=torch.bool, device=device), own], dim=2)
    if sdpa:
        mask = allowed
    else:  # eager attention adds the mask to the scores
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, packed_labels, positions, mask[:, None]


def shared_prefix_loss(
    model,
    prefix_ids: torch.Tensor,
    suffix_ids: torch.Tensor,
    suffix_mask: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    pack: bool = True,
) -> torch.Tensor:
    """Loss of the batch ``cat(prefix, suffix_b)``, running the prefix once (see the module docstring).

    ``prefix_ids`` [P] (or [1, P]); ``suffix_ids``/``suffix_mask``/``labels`` [B, S], right-padded,
    labels aligned with ``suffix_ids``. The first suffix token must carry no label (it is predicted
    from the prefix, whose logits are not computed); ``ChatCollator`` guarantees it.

    The suffixes run packed into as few rows as fit the longest (``pack_rows``), or with ``pack=False``
    padded to the longest ([B, S]): padding is what kept the speed-up under the bound of the token counts,
    since the prefix pass has none and the padded suffix pass all of it.
    """
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder()
    prefix_ids = prefix_ids.reshape(1, -1)
    prefix_len = prefix_ids.shape[1]
    batch, suffix_len = suffix_ids.shape
    device = suffix_ids.device
    config = causal_lm.config

    recorder = _PrefixRecorder()
    with _cache_kept_under_checkpointing(_decoder_layers(decoder)):
        decoder(
            input_ids=prefix_ids,
            position_ids=torch.arange(prefix_len, device=device).unsqueeze(0),
            past_key_values=recorder,
            use_cache=False,
        )
        if pack:
            dtype = next(p for p in decoder.parameters()).dtype
            ids, labels, positions, mask = _packed_suffixes(
                prefix_len, suffix_ids, suffix_mask, labels, dtype=dtype,
                sdpa=getattr(config, "_attn_implementation", None) == "sdpa")
        else:
            ids = suffix_ids
            mask = torch.cat(
                [torch.ones(batch, prefix_len, dtype=suffix_mask.dtype, device=device), suffix_mask], dim=1
            )
            positions = (prefix_len + torch.arange(suffix_len, device=device)).unsqueeze(0).expand(batch, -1)
        out = decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=_ReadOnlyPrefixCache(recorder),
            use_cache=False,
        )
    return token_loss(causal_lm, out.last_hidden_state, labels, num_items_in_batch)

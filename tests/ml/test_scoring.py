"""Label scoring with a cached system-prompt prefix must equal scoring every (text, label) from scratch."""

from __future__ import annotations

import pytest
import torch

from app.data.sample import generate_sample_dialogues
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt, format_answer
from app.ml.infer.scoring import (
    LabelCandidates,
    LabelScorer,
    PrefixCache,
    answer_continuation_ids,
    label_distribution,
    render_prompt_ids,
)
from app.ml.text.encoding import shared_prefix_ids
from tests.ml.conftest import SCORING_TEXTS

SYSTEM_PROMPT = build_system_prompt(CMCC34_LABEL_SET)
TEXTS = SCORING_TEXTS
ATOL, RTOL = 1e-4, 1e-5  # fp32; scores are sums of ~10 log-probs of magnitude ~10
# The no-cache reference costs one full forward per (text, label): check a spread of labels
# (short and long answers, first and last ids) rather than all 34.
REF_COLUMNS = [0, 1, 7, 8, 15, 20, 29, 33]


def reference_scores(model, tokenizer, texts, label_set, columns=REF_COLUMNS) -> torch.Tensor:
    """No cache at all: one full forward per (text, label), summing the answer tokens' log-probs.

    Only the label-set positions in ``columns`` are scored (None: all).
    """
    labels = list(label_set) if columns is None else [label_set.labels[c] for c in columns]
    rows = []
    with torch.no_grad():
        for text in texts:
            prompt = render_prompt_ids(tokenizer, SYSTEM_PROMPT, text)
            row = []
            for label in labels:
                answer = answer_continuation_ids(tokenizer, SYSTEM_PROMPT, format_answer(label.id, label.name))
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
                logp = torch.log_softmax(logits, dim=-1)
                row.append(sum(float(logp[len(prompt) - 1 + k, tok]) for k, tok in enumerate(answer)))
            rows.append(row)
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def base_reference(base):
    return reference_scores(*base, TEXTS, CMCC34_LABEL_SET)


@pytest.fixture(scope="module")
def adapted_reference(adapted):
    return reference_scores(*adapted, TEXTS, CMCC34_LABEL_SET)


def test_cached_prefix_scores_equal_uncached_reference(base, base_reference):
    scorer = LabelScorer(*base, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    assert scorer.strategy == "prefix_cache" and scorer.label_pass == "packed"  # sdpa
    scores = scorer.score(TEXTS, batch_size=len(TEXTS))
    torch.testing.assert_close(scores[:, REF_COLUMNS], base_reference, atol=ATOL, rtol=RTOL)
    assert scorer.fallback_texts == 0  # every text reused the cached prefix


def test_batches_of_mixed_lengths_equal_one_text_at_a_time(base, base_reference):
    scorer = LabelScorer(*base, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    batched = scorer.score(TEXTS, batch_size=3)
    single = torch.cat([scorer.score([t], batch_size=1) for t in TEXTS])
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(batched[:, REF_COLUMNS], base_reference, atol=ATOL, rtol=RTOL)


def test_rows_label_pass_equals_reference(base, base_reference):
    """The per-(text, label) row pass (for attention without custom masks) gives the same scores."""
    scorer = LabelScorer(*base, SYSTEM_PROMPT, CMCC34_LABEL_SET, label_pass="rows")
    torch.testing.assert_close(scorer.score(TEXTS, batch_size=3)[:, REF_COLUMNS], base_reference, atol=ATOL, rtol=RTOL)
    # A budget of one row per forward exercises its chunking.
    tight = LabelScorer(*base, SYSTEM_PROMPT, CMCC34_LABEL_SET, label_pass="rows", max_cached_tokens=1, logit_chunk=3)
    torch.testing.assert_close(tight.score(TEXTS[1:2])[:, REF_COLUMNS], base_reference[1:2], atol=ATOL, rtol=RTOL)


def test_packed_label_pass_with_eager_attention_equals_reference(tiny_model_dir, base_reference):
    """eager attention adds the mask to the scores: the packed pass must build an additive mask for it."""
    from app.ml.models.loading import load_base_model

    loaded = load_base_model(tiny_model_dir, quantization="none", device="cpu", attn_implementation="eager")
    scorer = LabelScorer(loaded.model, loaded.tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    assert scorer.label_pass == "packed"
    torch.testing.assert_close(scorer.score(TEXTS, batch_size=2)[:, REF_COLUMNS], base_reference, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("label_pass", ["packed", "rows"])
def test_with_lora_adapter_scores_equal_reference_and_differ_from_base(adapted, adapted_reference, base_reference, label_pass):
    model, tokenizer = adapted
    scorer = LabelScorer(model, tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET, label_pass=label_pass)
    scores = scorer.score(TEXTS, batch_size=2)
    torch.testing.assert_close(scores[:, REF_COLUMNS], adapted_reference, atol=ATOL, rtol=RTOL)
    assert (scores[:, REF_COLUMNS] - base_reference).abs().max() > 1e-2  # the adapter (incl. its prefix k/v) matters


def test_prefix_cache_from_another_adapter_state_gives_other_scores(adapted):
    """The prefix keys/values depend on the adapter: a cache built with it disabled is stale."""
    model, tokenizer = adapted
    scorer = LabelScorer(model, tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    good = scorer.score(TEXTS[:2])
    with model.disable_adapter():
        stale_prefix = PrefixCache(model, shared_prefix_ids(tokenizer, SYSTEM_PROMPT))
    scorer._prefix = stale_prefix
    assert (scorer.score(TEXTS[:2]) - good).abs().max() > 1e-3


def test_texts_not_starting_with_the_prefix_are_scored_without_it(base, base_reference):
    model, tokenizer = base
    scorer = LabelScorer(model, tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    scorer.score(TEXTS[:1])
    scorer._prefix = PrefixCache(model, [tokenizer.pad_token_id] * 3)  # matches no prompt
    scores = scorer.score(TEXTS, batch_size=2)
    assert scorer.fallback_texts == len(TEXTS)
    torch.testing.assert_close(scores[:, REF_COLUMNS], base_reference, atol=ATOL, rtol=RTOL)


def test_full_strategy_equals_reference(base, base_reference):
    scorer = LabelScorer(*base, SYSTEM_PROMPT, CMCC34_LABEL_SET, strategy="full", max_cached_tokens=2000)
    scores = scorer.score(TEXTS[:3], batch_size=2)
    torch.testing.assert_close(scores[:, REF_COLUMNS], base_reference[:3], atol=ATOL, rtol=RTOL)


def test_4bit_base_cached_scores_equal_full_sequence_scores(tiny_model_dir):
    """QLoRA serving: the prefix cache and packed pass hold on a bitsandbytes NF4 base too."""
    from app.ml.models.loading import bitsandbytes_available, load_base_model

    if not bitsandbytes_available(torch.device("cpu")):
        pytest.skip("bitsandbytes cannot run 4-bit on this CPU")
    loaded = load_base_model(tiny_model_dir, quantization="4bit", device="cpu")
    args = (loaded.model, loaded.tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    cached = LabelScorer(*args).score(TEXTS[:2])
    full = LabelScorer(*args, strategy="full").score(TEXTS[:2])
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=RTOL)


def test_stored_prefix_cache_is_never_mutated(base):
    model, tokenizer = base
    prefix = PrefixCache(model, shared_prefix_ids(tokenizer, SYSTEM_PROMPT))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix._cache.layers]
    scorer = LabelScorer(model, tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    scorer._ensure_ready(render_prompt_ids(tokenizer, SYSTEM_PROMPT, "x"))
    scorer._prefix = prefix
    scorer.score(TEXTS, batch_size=2)
    for layer, (keys, values) in zip(prefix._cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert prefix._cache.get_seq_length() == prefix.length


def test_prefix_is_shared_by_every_sample_dialogue(base):
    """The cached prefix must not end inside a BPE merge with typical dialogues (else no reuse)."""
    _, tokenizer = base
    prefix = shared_prefix_ids(tokenizer, SYSTEM_PROMPT)
    assert len(prefix) > 100  # the whole system prompt
    rows = generate_sample_dialogues(per_label=1, seed=3)
    for row in rows:
        ids = render_prompt_ids(tokenizer, SYSTEM_PROMPT, row.dialogue)
        assert ids[: len(prefix)] == prefix


def test_real_cmcc_dialogues_reuse_the_prefix(base):
    """Real call-centre rows (when this machine has them) must all start with the cached prefix."""
    from pathlib import Path

    from app.data.formats import parse_dataset

    path = Path("/work/shared/data/cmcc34/train_new_5shot.csv")
    if not path.is_file():
        pytest.skip("real CMCC-34 rows are not on this machine")
    _, tokenizer = base
    prefix = shared_prefix_ids(tokenizer, SYSTEM_PROMPT)
    records = parse_dataset(path.read_bytes(), path.name).records
    assert len(records) > 100
    for record in records:
        assert render_prompt_ids(tokenizer, SYSTEM_PROMPT, record.dialogue)[: len(prefix)] == prefix


def test_over_long_dialogue_is_cut_like_training_and_still_uses_the_prefix(base):
    model, tokenizer = base
    long_text = "您好请讲[SEP]" + "我的宽带老是断网" * 200
    limit = len(render_prompt_ids(tokenizer, SYSTEM_PROMPT, "")) + 20
    scorer = LabelScorer(model, tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET, max_input_length=limit)
    assert len(render_prompt_ids(tokenizer, SYSTEM_PROMPT, long_text, limit)) <= limit
    scores = scorer.score([long_text])
    cut = tokenizer.decode(render_prompt_ids(tokenizer, SYSTEM_PROMPT, long_text, limit))
    dialogue = cut.split("对话：")[-1].split("<|assistant|>")[0]
    assert long_text.startswith(dialogue) and len(dialogue) < len(long_text)
    reference = reference_scores(model, tokenizer, [dialogue], CMCC34_LABEL_SET, columns=[0, 33])
    torch.testing.assert_close(scores[:, [0, 33]], reference, atol=ATOL, rtol=RTOL)
    assert scorer.fallback_texts == 0


def test_label_candidates_end_with_end_of_turn(base):
    _, tokenizer = base
    candidates = LabelCandidates.build(tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    assert candidates.label_ids == tuple(CMCC34_LABEL_SET.ids)
    for j in range(len(candidates.label_ids)):
        full = candidates.full_ids(j)
        assert full[-1] == tokenizer.eos_token_id  # the GLM-4 template writes nothing after an answer
        text = tokenizer.decode(full[:-1])
        assert text.strip() == format_answer(candidates.label_ids[j], candidates.label_names[j])
    assert tokenizer.decode(list(candidates.shared_ids)).strip() == "意图："


def test_answer_ends_at_the_templates_end_of_turn_marker(base):
    """A ChatML-like template closes the answer with a special token; scoring stops there."""
    import copy

    _, tokenizer = base
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = (
        "{%- for m in messages -%}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>\n{%- endif -%}"
    )
    ids = answer_continuation_ids(chatml, SYSTEM_PROMPT, "意图：7：办理开通")
    assert ids[-1] == tokenizer.eos_token_id
    assert chatml.decode(ids[:-1]).strip() == "意图：7：办理开通"


def test_distribution_is_a_softmax_over_labels(base):
    small = LabelSet.from_pairs([(3, "咨询（含查询）营销活动信息"), (7, "办理开通"), (29, "办理缴费")])
    scorer = LabelScorer(*base, build_system_prompt(small), small)
    probs = label_distribution(scorer.score(TEXTS[:2]))
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_cpu_reference(tiny_model_dir, base_reference):
    from app.ml.models.loading import load_base_model

    loaded = load_base_model(tiny_model_dir, quantization="none", compute_dtype="float32", device="cuda")
    scorer = LabelScorer(loaded.model, loaded.tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    torch.testing.assert_close(scorer.score(TEXTS, batch_size=2)[:, REF_COLUMNS], base_reference, atol=1e-3, rtol=1e-4)

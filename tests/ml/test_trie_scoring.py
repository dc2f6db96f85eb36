"""Trie label scoring: the distribution over the labels that decoding constrained to the label set
samples from, computed on the cached system prompt + the dialogue + the trie's inner nodes, must equal
the same marginal computed by brute force from sequence probabilities (one full uncached forward per
text and label over its distinguishing prefix, renormalised over the tokens allowed at each step)."""

from __future__ import annotations

import pytest
import torch

from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.ml.infer.scoring import LabelScorer, label_distribution, render_prompt_ids
from app.ml.infer.trie import LabelTrie
from tests.ml.conftest import SCORING_TEXTS

SYSTEM_PROMPT = build_system_prompt(CMCC34_LABEL_SET)
TEXTS = SCORING_TEXTS


def test_trie_of_synthetic_answers():
    # "1x" is decided at "1" + "x"; "2" alone decides; "1y..." shares "1".
    trie = LabelTrie.build([(1, 5, 9), (2, 7), (1, 6, 9, 9)])
    assert trie.prefixes == ((1, 5), (2,), (1, 6))
    assert trie.nodes == ((1,),)
    assert trie.parent == (-1,)
    assert sorted(trie.steps) == sorted([(-1, 1, 0), (0, 5, 0), (-1, 2, 1), (-1, 1, 2), (0, 6, 2)])
    assert trie.allowed == ((1, 2), (5, 6))
    assert trie.branching_nodes() == [-1, 0]
    assert trie.label_of([1, 6, 9, 9]) == 2 and trie.label_of([3]) is None


def test_constrained_marginal_on_a_hand_computed_distribution():
    # Root: P(1)=0.5, P(2)=0.25 (rest elsewhere); node (1,): P(5)=0.1, P(6)=0.3.
    trie = LabelTrie.build([(1, 5, 9), (2, 7), (1, 6, 9, 9)])
    vocab = 10

    def dist(pairs):
        p = torch.full((1, vocab), 1e-9)
        for tok, prob in pairs.items():
            p[0, tok] = prob
        return torch.log(p)

    node = {-1: dist({1: 0.5, 2: 0.25}), 0: dist({5: 0.1, 6: 0.3})}
    got = trie.label_log_probs(lambda n: node[n]).exp()[0]
    # P(1)=2/3 then 1/4 vs 3/4; P(2)=1/3.
    assert torch.allclose(got, torch.tensor([2 / 3 * 1 / 4, 1 / 3, 2 / 3 * 3 / 4]), atol=1e-6)


def test_chains_are_forced_steps():
    # (2, 7) is a non-branching node: its distribution cannot change the answer.
    trie = LabelTrie.build([(1,), (2, 7, 8), (2, 7, 9)])
    assert trie.nodes == ((2,), (2, 7))
    assert trie.branching_nodes() == [-1, 1]


def test_trie_refuses_an_answer_that_starts_another():
    with pytest.raises(ValueError):
        LabelTrie.build([(1, 2), (1, 2, 3)])


# Multi-token ids on the tiny tokenizer: a trie with inner nodes, some of them chained (non-branching).
DEEP_LABELS = LabelSet.from_pairs([(1000001, "a"), (1000002, "b"), (1000010, "c"), (2000000, "d"), (5, "办理")])


def brute_force_constrained_scores(model, tokenizer, scorer: LabelScorer, texts) -> torch.Tensor:
    """log P(label) under constrained decoding, from scratch: per (text, label) one uncached forward over
    prompt + shared tokens + the label's distinguishing prefix; at each prefix step the target's
    probability is renormalised over the tokens some label's prefix allows after the same path."""
    prefixes = [tuple(p) for p in scorer.candidates.trie.prefixes]
    shared = list(scorer.candidates.shared_ids)
    rows = []
    with torch.no_grad():
        for text in texts:
            prompt = render_prompt_ids(tokenizer, scorer.system_prompt, text)
            row = []
            for prefix in prefixes:
                ids = prompt + shared + list(prefix)
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
                total = 0.0
                for k, token in enumerate(prefix):
                    allowed = sorted({q[k] for q in prefixes if len(q) > k and q[:k] == prefix[:k]})
                    at = logp[len(prompt) + len(shared) - 1 + k]
                    total += float(at[token] - torch.logsumexp(at[allowed], -1))
                row.append(total)
            rows.append(row)
    return torch.tensor(rows)


def brute_force_greedy_constrained(model, tokenizer, scorer: LabelScorer, text) -> int:
    """The label a greedy decoder restricted to the label set picks, token by token."""
    prefixes = [tuple(p) for p in scorer.candidates.trie.prefixes]
    ids = render_prompt_ids(tokenizer, scorer.system_prompt, text) + list(scorer.candidates.shared_ids)
    path: tuple = ()
    with torch.no_grad():
        while path not in prefixes:
            allowed = sorted({q[len(path)] for q in prefixes if q[: len(path)] == path})
            logits = model(input_ids=torch.tensor([ids + list(path)])).logits[0, -1]
            path = path + (allowed[int(logits[allowed].argmax())],)
    return prefixes.index(path)


def test_cmcc34_trie_runs_fewer_tokens_than_full_answers(base):
    model, tokenizer = base
    scorer = LabelScorer(model, tokenizer, SYSTEM_PROMPT, CMCC34_LABEL_SET)
    trie = scorer.candidates.trie
    assert len(trie.prefixes) == len(CMCC34_LABEL_SET)
    for i, p in enumerate(trie.prefixes):  # prefix-free
        assert not any(q[: len(p)] == p for j, q in enumerate(trie.prefixes) if j != i)
    trie_tokens = scorer.tokens_run(TEXTS, "trie")
    full_tokens = scorer.tokens_run(TEXTS, "full")
    assert all(t < f for t, f in zip(trie_tokens, full_tokens))


@pytest.mark.parametrize("label_set", [CMCC34_LABEL_SET, DEEP_LABELS], ids=["cmcc34", "deep"])
@pytest.mark.parametrize("label_pass", ["packed", "rows"])
@pytest.mark.parametrize("which", ["base", "adapted"])
def test_trie_scores_equal_brute_force_prefix_probabilities(request, which, label_pass, label_set):
    if label_set is CMCC34_LABEL_SET and label_pass == "rows":
        pytest.skip("34 labels x 5 texts of brute force: the packed case covers CMCC-34, the deep set covers rows")
    model, tokenizer = request.getfixturevalue(which)
    scorer = LabelScorer(model, tokenizer, build_system_prompt(label_set), label_set, label_pass=label_pass)
    if label_set is DEEP_LABELS:
        assert len(scorer.candidates.trie.nodes) >= 4  # the tree pass really runs
    got = scorer.score(TEXTS, batch_size=len(TEXTS), answers="trie")  # one batch of different lengths
    expected = brute_force_constrained_scores(model, tokenizer, scorer, TEXTS)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5), (got - expected).abs().max()
    probs = label_distribution(got)
    assert torch.allclose(probs, got.exp(), atol=1e-5)  # already a distribution
    assert torch.allclose(probs.sum(-1), torch.ones(len(TEXTS)), atol=1e-5)
    # The trie's argmax at each node is what greedy constrained decoding picks, path by path.
    text = TEXTS[1]
    greedy = brute_force_greedy_constrained(model, tokenizer, scorer, text)
    trie = scorer.candidates.trie
    path: tuple = ()
    row = got[1]
    while path not in trie.prefixes:
        allowed = trie.allowed[0] if not path else trie.allowed[trie.nodes.index(path) + 1]
        mass = {tok: torch.logsumexp(row[[j for j, p in enumerate(trie.prefixes) if p[: len(path) + 1] == path + (tok,)]], 0)
                for tok in allowed}
        path = path + (max(mass, key=mass.get),)
    assert trie.prefixes.index(path) == greedy


def test_trie_batches_equal_one_text_at_a_time(base):
    model, tokenizer = base
    scorer = LabelScorer(model, tokenizer, build_system_prompt(DEEP_LABELS), DEEP_LABELS)
    together = scorer.score(TEXTS, batch_size=4, answers="trie")
    alone = torch.cat([scorer.score([t], answers="trie") for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-4)


def test_trie_without_prefix_cache_equals_cached(base):
    model, tokenizer = base
    prompt = build_system_prompt(DEEP_LABELS)
    cached = LabelScorer(model, tokenizer, prompt, DEEP_LABELS).score(TEXTS, answers="trie")
    uncached = LabelScorer(model, tokenizer, prompt, DEEP_LABELS, strategy="full").score(
        TEXTS, answers="trie")
    assert torch.allclose(cached, uncached, atol=1e-4)


def test_adapter_changes_trie_scores(base, adapted):
    prompt = build_system_prompt(DEEP_LABELS)
    plain = LabelScorer(*base, prompt, DEEP_LABELS).score(TEXTS, answers="trie")
    tuned = LabelScorer(*adapted, prompt, DEEP_LABELS).score(TEXTS, answers="trie")
    assert not torch.allclose(plain, tuned, atol=1e-3)


@pytest.mark.parametrize("labels", [
    [(0, "办理开通"), (1, "办理取消"), (10, "咨询"), (11, "投诉"), (100, "其他")],
    [(123456, "甲"), (123457, "乙"), (124000, "丙"), (9, "丁")],
    [(7, "甲"), (8, "乙")],
])
def test_trie_label_is_always_valid_for_other_label_sets(base, labels):
    model, tokenizer = base
    label_set = LabelSet.from_pairs(labels)
    prompt = build_system_prompt(label_set)
    scorer = LabelScorer(model, tokenizer, prompt, label_set)
    scores = scorer.score(TEXTS, answers="trie")
    assert scores.shape == (len(TEXTS), len(labels))
    assert torch.isfinite(scores).all()
    chosen = [scorer.candidates.label_ids[j] for j in scores.argmax(-1).tolist()]
    assert set(chosen) <= {i for i, _ in labels}


def test_unknown_answer_scoring_is_refused(base):
    with pytest.raises(ValueError):
        LabelScorer(*base, SYSTEM_PROMPT, CMCC34_LABEL_SET).score(TEXTS, answers="greedy")


def test_batches_keep_padding_bounded():
    from app.ml.infer.scoring import _length_chunks

    lengths = [10, 11, 12, 40, 41, 100]
    chunks = _length_chunks(list(range(6)), lengths, 8, 0.25)
    assert chunks == [[0, 1, 2], [3, 4], [5]]
    for chunk in chunks:
        assert len(chunk) * max(lengths[i] for i in chunk) <= 1.25 * sum(lengths[i] for i in chunk)
    assert _length_chunks([0, 1, 2], [5, 5, 5], 2, 0.25) == [[0, 1], [2]]

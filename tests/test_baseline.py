"""The TF-IDF + logistic-regression baseline learns intents from generated CMCC-style dialogues."""

from __future__ import annotations

import random

import pytest

from app.data.sample import generate_sample_dialogues
from app.domain.records import Record
from app.ml.eval.baseline import fit_baseline, normalise_dialogue, predict, predict_ids

N_LABELS = 34


@pytest.fixture(scope="module")
def split():
    """Train and held-out rows from different seeds: the held-out dialogues are new combinations."""
    train = [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=6, seed=11)]
    held_out = [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=3, seed=12)]
    return train, held_out


def _accuracy(model, records):
    predicted = predict_ids(model, [r.dialogue for r in records])
    return sum(p == r.label_id for p, r in zip(predicted, records)) / len(records)


def test_learns_intents_well_above_chance(split):
    train, held_out = split
    model = fit_baseline(train)
    assert set(model.label_ids) == set(range(N_LABELS))
    # Chance is 1/34 (~3 %); the generated intents are learnable from their keywords.
    assert _accuracy(model, held_out) > 0.7


def test_shuffled_labels_give_chance_accuracy(split):
    """Control: the accuracy above comes from the text-label relation, not from the split."""
    train, held_out = split
    labels = [r.label_id for r in train]
    random.Random(0).shuffle(labels)
    model = fit_baseline([Record(r.dialogue, label) for r, label in zip(train, labels)])
    assert _accuracy(model, held_out) < 0.2


def test_predictions_carry_probabilities(split):
    train, held_out = split
    model = fit_baseline(train)
    predictions = predict(model, [r.dialogue for r in held_out[:5]])
    assert len(predictions) == 5
    for p in predictions:
        assert p.label_id in model.label_ids
        assert 1.0 / N_LABELS < p.confidence <= 1.0
    assert predict(model, []) == []


def test_turn_markers_become_spaces():
    assert normalise_dialogue("您好请讲[SEP]我要开通流量包[SEP] 好的 ") == "您好请讲 我要开通流量包 好的"


def test_needs_two_labels():
    with pytest.raises(ValueError, match="two labels"):
        fit_baseline([Record("我要开通流量包", 7), Record("帮我开一个彩铃", 7)])

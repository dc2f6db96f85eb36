"""Report quality figures without a model: expected calibration error by hand, the reliability diagram,
the baseline's lift, and class-balanced sampling weights."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from app.data.sample import generate_sample_dialogues
from app.domain.labels import LabelSet
from app.domain.records import Record
from app.ml.eval.baseline import compare_with_baseline, fit_baseline, predict_ids
from app.ml.eval.files import write_report
from app.ml.eval.metrics import build_report, calibration
from app.ml.train.balance import ClassBalancedSampler, class_shares, sample_weights

# --- expected calibration error ------------------------------------------------------------------


def test_ece_hand_computed_with_ten_bins():
    confidences = [0.95, 0.85, 0.65, 0.62, 0.30]
    correct = [True, False, True, True, False]
    result = calibration(confidences, correct)
    # Bins (0.9,1]: 1 right at 0.95 -> |1-0.95|; (0.8,0.9]: 1 wrong at 0.85 -> 0.85;
    # (0.6,0.7]: 2 right at mean 0.635 -> |1-0.635|; (0.2,0.3]: 0.30 (right-closed) wrong -> 0.30.
    expected = 0.2 * 0.05 + 0.2 * 0.85 + 0.4 * 0.365 + 0.2 * 0.30
    assert result["ece"] == pytest.approx(expected) == pytest.approx(0.386)
    counts = [b["count"] for b in result["bins"]]
    assert counts == [0, 0, 1, 0, 0, 0, 2, 0, 1, 1]
    six = result["bins"][6]
    assert (six["lower"], six["upper"]) == pytest.approx((0.6, 0.7))
    assert six["accuracy"] == 1.0 and six["confidence"] == pytest.approx(0.635)
    assert result["bins"][0]["accuracy"] is None and result["n_samples"] == 5


def test_ece_is_zero_when_confidence_matches_accuracy_and_one_bin_is_the_mean_gap():
    # 0.75 confident, right 3 times out of 4: perfectly calibrated.
    assert calibration([0.75] * 4, [True, True, True, False])["ece"] == pytest.approx(0.0)
    # A single bin: |mean accuracy - mean confidence| = |2/4 - 0.7|.
    assert calibration([0.9, 0.8, 0.6, 0.5], [True, False, True, False], n_bins=1)["ece"] == pytest.approx(0.2)
    # Always sure and always wrong: the worst.
    assert calibration([1.0, 1.0], [False, False])["ece"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        calibration([1.2], [True])


LABELS = LabelSet.from_pairs([(0, "办理开通"), (1, "办理取消"), (2, "咨询（含查询）业务资费")])


def test_score_mode_report_carries_calibration_and_a_reliability_diagram(tmp_path):
    y_true, y_pred = [0, 1, 2, 2, 1], [0, 2, 2, 2, 1]
    confidences = [0.95, 0.85, 0.65, 0.62, 0.30]  # right, wrong, right, right, right
    report = build_report(y_true=y_true, y_pred=y_pred, label_set=LABELS, texts=["t"] * 5, raw_outputs=None,
                          elapsed_seconds=1.0, mode="score", confidences=confidences)
    by_hand = calibration(confidences, [True, False, True, True, True])
    assert report["ece"] == pytest.approx(by_hand["ece"]) and report["calibration"]["bins"] == by_hand["bins"]
    files = write_report(report, tmp_path / "r")
    assert "reliability_diagram" in files
    with Image.open(files["reliability_diagram"]) as image:
        assert image.format == "PNG" and min(image.size) > 500
    results = json.loads(files["results"].read_text(encoding="utf-8"))
    assert "reliability_diagram.png" in results["files"] and results["ece"] == report["ece"]
    # Generate mode has no probabilities: no calibration, no diagram.
    generated = build_report(y_true=y_true, y_pred=y_pred, label_set=LABELS, texts=["t"] * 5, raw_outputs=None,
                             elapsed_seconds=1.0, mode="generate", confidences=[None] * 5)
    assert generated["ece"] is None and generated["calibration"] is None
    assert "reliability_diagram" not in write_report(generated, tmp_path / "g")


# --- the baseline's lift --------------------------------------------------------------------------


def test_baseline_lift_is_the_model_minus_the_baseline_on_the_same_rows():
    train = [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=6, seed=11, labels=[0, 1, 2])]
    rows = [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=3, seed=12, labels=[0, 1, 2])]
    model_pred = [0] * len(rows)  # a model that always says 0
    report = build_report(y_true=[r.label_id for r in rows], y_pred=model_pred, label_set=LABELS,
                          texts=[r.dialogue for r in rows], raw_outputs=None, elapsed_seconds=1.0, mode="score")
    compared = compare_with_baseline(report, train, rows, LABELS)
    # Independently: the same baseline's accuracy on these rows.
    predicted = predict_ids(fit_baseline(train), [r.dialogue for r in rows])
    accuracy = sum(p == r.label_id for p, r in zip(predicted, rows)) / len(rows)
    assert compared["accuracy"] == pytest.approx(accuracy) and compared["n_train"] == len(train)
    assert compared["n_samples"] == len(rows)
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        assert compared["lift"][name] == pytest.approx(report[name] - compared[name])
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert compared["lift"]["accuracy"] < 0  # the keyword baseline beats a constant answer
    with pytest.raises(ValueError):
        compare_with_baseline(report, train, rows[:-1], LABELS)


# --- class balance: the weights and what the sampler draws ----------------------------------------


def test_class_balance_weights_hand_computed():
    labels = [0, 0, 0, 0, 1]  # four of class 0, one of class 1
    assert sample_weights(labels, "none") == [1.0] * 5
    assert sample_weights(labels, "sqrt") == pytest.approx([0.5] * 4 + [1.0])
    assert sample_weights(labels, "balanced") == pytest.approx([0.25] * 4 + [1.0])
    assert class_shares(labels, "none") == pytest.approx({0: 0.8, 1: 0.2})
    assert class_shares(labels, "sqrt") == pytest.approx({0: 2 / 3, 1: 1 / 3})  # sqrt(4) : sqrt(1)
    assert class_shares(labels, "balanced") == pytest.approx({0: 0.5, 1: 0.5})
    with pytest.raises(ValueError):
        sample_weights(labels, "oversample")


def test_sampler_draws_in_the_computed_shares_and_repeats_an_epoch_exactly():
    labels = [0] * 90 + [1] * 10
    sampler = ClassBalancedSampler(sample_weights(labels, "balanced"), seed=7)
    draws = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    assert len(draws) == 2000 and len(sampler) == 100
    rare = sum(labels[i] == 1 for i in draws) / len(draws)
    assert abs(rare - 0.5) < 4 * math.sqrt(0.25 / 2000)  # 0.5 expected, 0.1 without balancing
    sampler.set_epoch(3)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(4)
    assert first == again and list(sampler) != first


def test_loss_figure_draws_validation_on_a_second_axis_and_circles_the_kept_step():
    from app.ml.eval.plots import build_loss_figure

    history = [{"step": s, "loss": 5.0 / s} for s in range(1, 13)]
    validation = [{"step": 3, "accuracy": 0.5, "macro_f1": 0.4}, {"step": 6, "accuracy": 0.7, "macro_f1": 0.6},
                  {"step": 9, "accuracy": 0.8, "macro_f1": 0.6}, {"step": 12, "accuracy": 0.6, "macro_f1": 0.5}]
    fig = build_loss_figure(history, validation)
    loss_axis, right = fig.axes
    assert [line.get_label() for line in loss_axis.get_lines()] == ["training loss"]
    assert [line.get_label() for line in right.get_lines()] == ["val accuracy", "val macro-F1"]
    assert list(right.get_lines()[1].get_ydata()) == [0.4, 0.6, 0.6, 0.5]
    legend = [text.get_text() for text in loss_axis.get_legend().get_texts()]
    assert "best (step 6)" in legend  # the first of the equal best macro-F1s, as the trainer keeps it
    assert len(build_loss_figure(history).axes) == 1  # without validation: the loss alone

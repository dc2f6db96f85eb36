"""Evaluation reports: failures count as wrong; numbers match scikit-learn; files written."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from app.data.sample import generate_sample_dialogues
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.domain.records import Record
from app.ml.eval.files import write_report
from app.ml.eval.metrics import build_report
from app.ml.eval.run import evaluate_records

LABELS = LabelSet.from_pairs([(0, "咨询（含查询）业务规定"), (1, "办理取消"), (2, "咨询（含查询）业务资费"), (3, "办理开通"), (4, "办理缴费")])
Y_TRUE = [0, 0, 1, 1, 2, 2, 2, 3, 3]
Y_PRED = [0, 1, 1, None, 2, 2, 0, None, 99]  # two unparsed answers and one id outside the set: 3 failures
TEXTS = [f"对话{i}" for i in range(len(Y_TRUE))]
RAW = ["意图：0：咨询（含查询）业务规定", "x", "y", "胡言乱语", "z", "z", "w", "", "意图：99：不存在"]


@pytest.fixture()
def report():
    return build_report(
        y_true=Y_TRUE, y_pred=Y_PRED, label_set=LABELS, texts=TEXTS, raw_outputs=RAW,
        elapsed_seconds=4.5, mode="generate", confidences=[None] * len(Y_TRUE),
    )


def test_failures_count_as_wrong_hand_computed(report):
    # Correct: indexes 0, 2, 4, 5 -> 4 of 9 (upstream, excluding the 3 failures, would say 4/6).
    assert report["accuracy"] == pytest.approx(4 / 9)
    assert report["n_failed"] == 3 and report["success_rate"] == pytest.approx(6 / 9)
    # Recall per class over {0,1,2,3} (4 appears nowhere): 1/2, 1/2, 2/3, 0.
    assert report["macro_recall"] == pytest.approx((0.5 + 0.5 + 2 / 3 + 0) / 4)
    # Precision: class 0 predicted at 0 and 6 -> 1/2; class 1 at 1 and 2 -> 1/2; class 2 -> 1; class 3 never -> 0.
    assert report["macro_precision"] == pytest.approx((0.5 + 0.5 + 1 + 0) / 4)
    assert report["metric_labels"] == [0, 1, 2, 3]
    assert report["seconds_per_sample"] == pytest.approx(0.5)
    assert report["n_samples"] == 9 and report["mode"] == "generate"


def test_numbers_match_scikit_learn(report):
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
    )

    # Independent encoding of the failures: a string class that is no label.
    y_pred = ["FAILED" if p not in LABELS.ids else str(p) for p in Y_PRED]
    y_true = [str(t) for t in Y_TRUE]
    present = ["0", "1", "2", "3"]
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        kwargs = {"labels": present, "average": average, "zero_division": 0}
        assert report[f"{average}_precision"] == pytest.approx(precision_score(y_true, y_pred, **kwargs))
        assert report[f"{average}_recall"] == pytest.approx(recall_score(y_true, y_pred, **kwargs))
        assert report[f"{average}_f1"] == pytest.approx(f1_score(y_true, y_pred, **kwargs))
    all_ids = [str(i) for i in LABELS.ids]
    assert report["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=all_ids).tolist()
    per_f1 = f1_score(y_true, y_pred, labels=all_ids, average=None, zero_division=0)
    assert [c["f1"] for c in report["per_class"]] == pytest.approx(list(per_f1))


def test_per_class_errors_and_confusions(report):
    per_class = {c["intent_id"]: c for c in report["per_class"]}
    assert list(per_class) == LABELS.ids
    assert per_class[3]["support"] == 2 and per_class[3]["n_failed"] == 2 and per_class[3]["recall"] == 0
    assert per_class[4]["support"] == 0 and per_class[4]["label"] == "办理缴费"
    assert [f["index"] for f in report["failed_predictions"]] == [3, 7, 8]
    assert report["failed_predictions"][2]["raw_output"] == "意图：99：不存在"
    assert report["failed_predictions"][0]["true_label"] == "办理取消"
    wrong = report["wrong_predictions"]
    assert [(w["index"], w["true_id"], w["pred_id"]) for w in wrong] == [(1, 0, 1), (6, 2, 0)]
    assert wrong[0]["pred_label"] == "办理取消"
    pairs = [(p["true_id"], p["pred_id"], p["count"]) for p in report["most_confused_pairs"]]
    assert pairs == [(0, 1, 1), (2, 0, 1)]


def test_most_confused_pairs_are_the_top_ten_by_count():
    y_true, y_pred = [], []
    for k in range(12):  # pair (k -> k+1) confused k+1 times
        y_true += [k] * (k + 1)
        y_pred += [k + 1] * (k + 1)
    labels = LabelSet.from_pairs([(i, f"意图{i}") for i in range(13)])
    report = build_report(y_true=y_true, y_pred=y_pred, label_set=labels, texts=["t"] * len(y_true),
                          raw_outputs=None, elapsed_seconds=1.0, mode="score")
    counts = [p["count"] for p in report["most_confused_pairs"]]
    assert counts == list(range(12, 2, -1))


def test_rejects_inconsistent_inputs():
    with pytest.raises(ValueError):
        build_report(y_true=[0, 1], y_pred=[0], label_set=LABELS, texts=["a", "b"], raw_outputs=None,
                     elapsed_seconds=1, mode="score")
    with pytest.raises(ValueError):
        build_report(y_true=[7], y_pred=[0], label_set=LABELS, texts=["a"], raw_outputs=None,
                     elapsed_seconds=1, mode="score")


def test_write_report_files(report, tmp_path):
    files = write_report(report, tmp_path / "r")
    assert set(files) == {"results", "failed_predictions", "error_predictions", "detailed_analysis", "confusion_matrix"}
    results = json.loads(files["results"].read_text(encoding="utf-8"))
    assert results["accuracy"] == report["accuracy"] and "per_class" not in results
    assert "failed_predictions" not in results and results["n_failed"] == 3
    assert len(json.loads(files["failed_predictions"].read_text(encoding="utf-8"))) == 3
    assert len(json.loads(files["error_predictions"].read_text(encoding="utf-8"))) == 2
    detail = json.loads(files["detailed_analysis"].read_text(encoding="utf-8"))
    assert detail["confusion_matrix"] == report["confusion_matrix"] and len(detail["per_class"]) == 5
    assert "办理缴费" in files["detailed_analysis"].read_text(encoding="utf-8")  # not \\u-escaped
    with Image.open(files["confusion_matrix"]) as image:
        image.verify()


# --- evaluate_records with the real classifier on the tiny model ----------------------------------


@pytest.fixture(scope="module")
def zero_shot(tiny_model_dir):
    from app.domain.cmcc34 import CMCC34_LABEL_SET
    from app.ml.infer.classifier import ClassifierRegistry, ModelRef

    ref = ModelRef("zero", "1", tiny_model_dir, None, build_system_prompt(CMCC34_LABEL_SET), CMCC34_LABEL_SET,
                   quantization="none")
    return ClassifierRegistry(device="cpu").get(ref), CMCC34_LABEL_SET


def test_evaluate_records_score_mode(zero_shot):
    classifier, label_set = zero_shot
    records = [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=1, seed=5)[:7]]
    calls = []
    report = evaluate_records(classifier, records, label_set, batch_size=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(3, 7), (6, 7), (7, 7)]
    assert report["n_samples"] == 7 and report["n_failed"] == 0 and report["success_rate"] == 1.0
    assert report["mode"] == "score" and report["evaluation_seconds"] > 0
    correct = sum(c["recall"] * c["support"] for c in report["per_class"])
    assert report["accuracy"] == pytest.approx(correct / 7)
    assert all(w["confidence"] is not None for w in report["wrong_predictions"])


def test_evaluate_records_batches_by_length_but_reports_in_record_order(zero_shot):
    classifier, label_set = zero_shot
    rows = generate_sample_dialogues(per_label=1, seed=6)[:6]
    # Lengths out of order, so the length-sorted batches differ from the record order.
    records = [Record(r.dialogue + "[SEP]好的" * (5 - i) * 3, r.label_id) for i, r in enumerate(rows)]
    report = evaluate_records(classifier, records, label_set, batch_size=2, show_progress_bar=False)
    alone = [classifier.classify([r.dialogue])[0].intent_id for r in records]
    wrong = {w["index"]: (w["text"], w["pred_id"]) for w in report["wrong_predictions"]}
    assert wrong == {i: (r.dialogue, alone[i]) for i, r in enumerate(records) if alone[i] != r.label_id}
    assert wrong  # the random model gets some wrong: the check above is not vacuous


def test_evaluate_records_generate_mode_keeps_failures(zero_shot):
    classifier, label_set = zero_shot
    records = [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=1, seed=5)[:3]]
    report = evaluate_records(classifier, records, label_set, mode="generate", batch_size=3, show_progress_bar=False)
    assert report["n_samples"] == 3
    assert report["n_failed"] + len(report["wrong_predictions"]) + round(report["accuracy"] * 3) == 3
    assert report["n_failed"] >= 1  # the random model does not follow the format
    assert all(isinstance(f["raw_output"], str) for f in report["failed_predictions"])

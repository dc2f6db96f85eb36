"""A non-LLM baseline: TF-IDF over character n-grams + logistic regression.

Why it exists: a fine-tuned LLM must be measured against something cheap. This classifier trains in
seconds on a CPU and is what the benchmark (``bench.run``, accuracy section) puts beside the adapter,
trained on exactly the same rows.

Why character n-grams (1-3): Chinese has no spaces, so word tokens would need a segmenter; character
uni/bi/tri-grams capture most words and intent keywords (开通, 取消, 投诉...) without one. The
``[SEP]`` turn marker carries no intent; it is replaced by a space so n-grams do not span two turns.
``class_weight="balanced"`` keeps rare intents (CMCC-34 is highly imbalanced) from being ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.domain.records import Record

TURN_SEPARATOR = "[SEP]"


def normalise_dialogue(dialogue: str) -> str:
    """The text the vectoriser sees: turns separated by a space instead of ``[SEP]``."""
    return " ".join(part.strip() for part in dialogue.split(TURN_SEPARATOR) if part.strip())


@dataclass(frozen=True)
class BaselineConfig:
    ngram_range: tuple[int, int] = (1, 3)
    min_df: int = 1
    sublinear_tf: bool = True
    C: float = 10.0  # weak regularisation: few rows per class, many sparse features
    max_iter: int = 2000
    seed: int = 0


@dataclass
class BaselineModel:
    """A fitted TF-IDF + logistic-regression pipeline and the label ids it knows."""

    pipeline: object  # sklearn.pipeline.Pipeline
    label_ids: tuple[int, ...]
    config: BaselineConfig


@dataclass(frozen=True)
class BaselinePrediction:
    label_id: int
    confidence: float  # the predicted class's probability


def fit_baseline(records: Sequence[Record], config: BaselineConfig | None = None) -> BaselineModel:
    """Train on ``records`` (dialogue, label_id). Needs at least two distinct labels."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    config = config or BaselineConfig()
    if len({r.label_id for r in records}) < 2:
        raise ValueError("the baseline needs records of at least two labels")
    pipeline = Pipeline([
        ("tfidf", TfidfVectorizer(analyzer="char", ngram_range=config.ngram_range, min_df=config.min_df,
                                  sublinear_tf=config.sublinear_tf)),
        ("logreg", LogisticRegression(C=config.C, class_weight="balanced", max_iter=config.max_iter,
                                      random_state=config.seed)),
    ])
    pipeline.fit([normalise_dialogue(r.dialogue) for r in records], [r.label_id for r in records])
    label_ids = tuple(int(c) for c in pipeline.named_steps["logreg"].classes_)
    return BaselineModel(pipeline=pipeline, label_ids=label_ids, config=config)


def predict(model: BaselineModel, dialogues: Sequence[str]) -> list[BaselinePrediction]:
    """The most probable label of each dialogue, with its probability."""
    if not dialogues:
        return []
    probabilities = model.pipeline.predict_proba([normalise_dialogue(d) for d in dialogues])
    best = probabilities.argmax(axis=1)
    return [BaselinePrediction(label_id=model.label_ids[int(i)], confidence=float(probabilities[row, i]))
            for row, i in enumerate(best)]


def predict_ids(model: BaselineModel, dialogues: Sequence[str]) -> list[int]:
    return [p.label_id for p in predict(model, dialogues)]


LIFT_METRICS = ("accuracy", "macro_f1", "weighted_f1")


def compare_with_baseline(report: dict, train_records: Sequence[Record], eval_records: Sequence[Record],
                          label_set, config: BaselineConfig | None = None) -> dict:
    """The baseline trained on ``train_records`` (the model's training rows), scored on ``eval_records``
    (the rows ``report`` was made on) with the report's own metric definitions, and the model's lift over it.

    Returns {"n_train", "fit_seconds", "accuracy", "macro_f1", "weighted_f1", "n_samples", "lift":
    {metric: model - baseline}} for metric in accuracy, macro-F1, weighted-F1.
    """
    import time

    from app.ml.eval.metrics import build_report

    if report["n_samples"] != len(eval_records):
        raise ValueError(f"the report has {report['n_samples']} samples, {len(eval_records)} records were given")
    began = time.perf_counter()
    model = fit_baseline(train_records, config)
    fitted = time.perf_counter()
    predicted = predict_ids(model, [r.dialogue for r in eval_records])
    baseline = build_report(
        y_true=[r.label_id for r in eval_records], y_pred=predicted, label_set=label_set,
        texts=[r.dialogue for r in eval_records], raw_outputs=None, mode="baseline",
        elapsed_seconds=time.perf_counter() - fitted,
    )
    out = {"method": "tfidf_char_1_3_logreg", "n_train": len(train_records), "fit_seconds": fitted - began,
           "n_samples": baseline["n_samples"]}
    out.update({name: baseline[name] for name in LIFT_METRICS})
    out["lift"] = {name: report[name] - baseline[name] for name in LIFT_METRICS}
    return out

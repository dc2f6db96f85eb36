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

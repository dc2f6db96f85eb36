"""The linear-head recipe (``head: linear``) on the tiny GLM-4: features as serving computes them, the fit,
the saved head served through the classifier registry, checkpoints of the feature pass, class balance."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from app.data.sample import generate_sample_dialogues
from app.domain.cmcc34 import CMCC34_LABELS
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.domain.records import Record
from app.ml.infer.base import ModelRef, UnsupportedRequestError
from app.ml.infer.classifier import ClassifierRegistry
from app.ml.infer.scoring import LabelScorer
from app.ml.models.linear_head import LINEAR_HEAD_FILENAME, LinearHead
from app.ml.train.config import resolve_training_config
from app.ml.train.trainer import finished_training, train_adapter
from tests.ml.conftest import SCORING_TEXTS
from tests.ml.test_training import Recorder

THREE = LabelSet.from_pairs([(0, CMCC34_LABELS[0]), (1, CMCC34_LABELS[1]), (2, CMCC34_LABELS[2])])
PROMPT = build_system_prompt(THREE)
RECIPE = {"head": "linear", "per_device_train_batch_size": 4, "head_c": 10.0, "max_input_length": 2048}


@pytest.fixture(scope="module")
def records() -> list[Record]:
    # Intents 0 and 1 only: label 2 is in the label set but has no training row.
    return [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=8, seed=5, labels=[0, 1])]


def _train(model_dir, records, job_dir, recorder=None, validation=None, **overrides):
    recorder = recorder or Recorder()
    config, _ = resolve_training_config("tiny_test", {**RECIPE, **overrides})
    result = train_adapter(base_model_dir=model_dir, base_model_name="tiny-glm4", records=records, label_set=THREE,
                           system_prompt=PROMPT, config=config, job_dir=job_dir, hooks=recorder.hooks,
                           validation_records=validation)
    return result, recorder


def test_features_are_the_same_whatever_the_batch_and_with_or_without_the_prefix_cache(base):
    model, tokenizer = base
    cached = LabelScorer(model, tokenizer, PROMPT, THREE)
    uncached = LabelScorer(model, tokenizer, PROMPT, THREE, strategy="full")
    together = cached.features(SCORING_TEXTS, batch_size=8)
    alone = torch.cat([cached.features([t], batch_size=1) for t in SCORING_TEXTS])
    assert together.shape == (len(SCORING_TEXTS), model.config.hidden_size)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together, uncached.features(SCORING_TEXTS, batch_size=3), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])  # different dialogues, different vectors


@pytest.fixture(scope="module")
def trained(tiny_model_dir, records, tmp_path_factory):
    job_dir = tmp_path_factory.mktemp("head-job")
    result, recorder = _train(tiny_model_dir, records, job_dir, validation=records[:6], eval_every_steps=1)
    return result, recorder, job_dir


def test_the_head_fits_its_training_rows_and_is_saved_like_an_adapter(trained, records):
    result, recorder, job_dir = trained
    assert not result.cancelled and result.steps == 1
    assert result.final_loss < math.log(2) / 2  # far below a coin's log-loss on two intents
    assert (result.adapter_dir / LINEAR_HEAD_FILENAME).is_file()
    assert not (result.adapter_dir / "adapter_model.safetensors").exists()  # no LoRA: the base stays frozen
    assert result.metrics["head"] == "linear" and result.metrics["n_samples"] == len(records)
    assert [e["phase"] for k, _, e in recorder.events if k == "features"][-1] == "validation set"
    assert [k for k, _, _ in recorder.events].count("validation") == 1
    assert result.validation_history[0]["n_samples"] == 6
    assert recorder.logs[-1]["step"] == 1 and recorder.logs[-1]["loss"] == pytest.approx(result.final_loss)
    again = finished_training(job_dir)  # a worker that died after saving finds the run over
    assert again is not None and again.steps == 1


def test_the_registry_serves_the_head_on_the_frozen_base(trained, records, tiny_model_dir):
    result, _, job_dir = trained
    ref = ModelRef(key="ft_head", version="1", base_model_dir=tiny_model_dir, adapter_dir=result.adapter_dir,
                   system_prompt=PROMPT, label_set=THREE, quantization="none", max_input_length=2048, head="linear")
    registry = ClassifierRegistry(max_adapters=2, device="cpu")
    try:
        classifier = registry.get(ref)
        texts = [r.dialogue for r in records]
        predictions = classifier.classify(texts, top_k=3, batch_size=4)
        assert sum(p.intent_id == r.label_id for p, r in zip(predictions, records)) >= len(records) - 1
        for p in predictions:
            assert sum(t.score for t in p.top_k) == pytest.approx(1.0, abs=1e-5)
            assert p.top_k[-1].intent_id == 2 and p.top_k[-1].score < 1e-6  # never trained on: never chosen
        # The same numbers as the head applied to the features by hand.
        head = LinearHead.load(result.adapter_dir)
        scorer = LabelScorer(classifier.model, classifier.tokenizer, PROMPT, THREE, max_input_length=2048)
        expected = torch.softmax(head.log_probs(scorer.features(texts[:3])), dim=-1)
        got = torch.tensor([[next(t.score for t in p.top_k if t.intent_id == i) for i in (0, 1, 2)]
                            for p in predictions[:3]])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        with pytest.raises(UnsupportedRequestError, match="score mode only"):
            classifier.classify(texts[:1], mode="generate")
        # What training fitted on (its stored feature batches) is what serving computes for the same dialogues.
        parts = sorted((job_dir / "checkpoints" / "features").glob("train-*.safetensors"))
        stored = torch.cat([load_file(str(p))["features"] for p in parts])
        torch.testing.assert_close(scorer.features(texts, batch_size=8), stored, atol=1e-4, rtol=1e-4)
    finally:
        registry.clear()


def test_a_cancel_keeps_the_feature_batches_and_the_resumed_run_reads_only_the_rest(tiny_model_dir, records,
                                                                                   tmp_path, trained):
    stopped = Recorder(stop_after=2)  # polled before every batch: two batches of 4 read, then cancelled
    result, _ = _train(tiny_model_dir, records, tmp_path, stopped)
    assert result.cancelled and result.adapter_dir is None
    parts = sorted((tmp_path / "checkpoints" / "features").glob("train-*.safetensors"))
    assert len(parts) == 2

    resumed, recorder = _train(tiny_model_dir, records, tmp_path)
    resumes = [e for k, _, e in recorder.events if k == "resumed"]
    assert resumes and resumes[0]["done"] == 8
    assert [e["done"] for k, _, e in recorder.events if k == "features"][0] > 8  # only the rest was read
    full, _ = _train(tiny_model_dir, records, tmp_path / "uninterrupted")
    torch.testing.assert_close(LinearHead.load(resumed.adapter_dir).weight, LinearHead.load(full.adapter_dir).weight,
                               atol=1e-4, rtol=1e-3)

    # Other dialogues: the old batches are not reused.
    other = [Record(r.dialogue + "。", r.label_id) for r in records]
    (tmp_path / "adapter").rename(tmp_path / "old-adapter")
    _, recorder = _train(tiny_model_dir, other, tmp_path)
    assert "resumed" not in recorder.kinds()


def test_class_balance_weighs_the_rare_intent_up(tiny_model_dir, records, tmp_path):
    common = [r for r in records if r.label_id == 0]
    imbalanced = common + [r for r in records if r.label_id == 1][:2]
    heads = {}
    for mode in ("none", "balanced"):
        result, _ = _train(tiny_model_dir, imbalanced, tmp_path / mode, class_balance=mode, head_c=0.05)
        assert result.metrics["class_balance"] == mode
        assert result.metrics["samples_per_class"] == {"0": 8, "1": 2}
        heads[mode] = LinearHead.load(result.adapter_dir)
    gap = {mode: float(h.bias[1] - h.bias[0]) for mode, h in heads.items()}
    assert gap["balanced"] > gap["none"] + 0.1


def test_one_intent_is_refused_before_any_model_is_loaded(tiny_model_dir, records, tmp_path):
    with pytest.raises(ValueError, match="at least two intents"):
        _train(tiny_model_dir, [r for r in records if r.label_id == 0], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_multi_class_fit_keeps_the_label_sets_order_whatever_its_ids():
    from app.ml.train.linear_head import fit_linear_head

    labels = LabelSet.from_pairs([(7, "seven"), (2, "two"), (30, "thirty"), (5, "five")])  # 5: no rows
    assert LinearHead([7, 2, 30, 5], *[torch.zeros(1)] * 2, torch.eye(4, 1), torch.arange(4.0)).aligned(
        [2, 5, 7, 30]).bias.tolist() == [1.0, 3.0, 0.0, 2.0]  # rows follow the ids they are asked for
    generator = torch.Generator().manual_seed(0)
    centres = {7: torch.tensor([4.0, 0, 0]), 2: torch.tensor([0, 4.0, 0]), 30: torch.tensor([0, 0, 4.0])}
    ids = [7, 2, 30] * 10
    features = torch.stack([centres[i] + torch.randn(3, generator=generator) * 0.3 for i in ids])
    head, loss = fit_linear_head(features, ids, labels, c=1.0, class_balance="none")
    assert head.label_ids == list(labels.ids) == [2, 5, 7, 30] and loss < 0.2
    probe = torch.stack([centres[7], centres[2], centres[30]])
    assert head.predict_ids(probe) == [7, 2, 30]
    assert float(torch.exp(head.log_probs(probe))[:, 1].max()) < 1e-6  # label 5, without rows


def test_features_of_another_batch_size_or_a_broken_manifest_are_not_reused(tiny_model_dir, records, tmp_path):
    _train(tiny_model_dir, records, tmp_path, Recorder(stop_after=2))  # two batches of 4 kept
    _, recorder = _train(tiny_model_dir, records, tmp_path, Recorder(stop_after=1), per_device_train_batch_size=2)
    assert "resumed" not in recorder.kinds()  # parts are keyed by their first row: another batch size starts over
    (tmp_path / "checkpoints" / "features" / "train.json").write_text('{"fingerp', encoding="utf-8")  # killed mid-write
    result, recorder = _train(tiny_model_dir, records, tmp_path)
    assert not result.cancelled and "resumed" not in recorder.kinds()

"""Training on the tiny GLM-4 with class balance and validation during training: what is drawn, which
adapter is kept, early stopping, and resume after a cancel with evaluations before and after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.data.sample import generate_sample_dialogues
from app.domain.cmcc34 import CMCC34_LABELS
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.domain.records import Record
from app.ml.train.balance import class_shares
from app.ml.train.config import resolve_training_config
from app.ml.train.trainer import train_adapter
from app.ml.eval.run import score_accuracy_macro_f1
from app.ml.train.validation import validation_sample
from tests.ml.test_training import Recorder

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TWO = LabelSet.from_pairs([(0, CMCC34_LABELS[0]), (1, CMCC34_LABELS[1])])
PROMPT = build_system_prompt(TWO)
# Two intents, 8 dialogues each: the tiny model separates them within 30 steps at lr 1e-2 (macro-F1 on its
# training rows climbs from ~0.3 to ~0.8, not monotonically), which is what best-checkpoint selection needs.
RECIPE = {"max_steps": 30, "save_steps": 5, "logging_steps": 1, "learning_rate": 1e-2, "eval_every_steps": 3,
          "eval_max_samples": 64}


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return [Record(r.dialogue, r.label_id) for r in generate_sample_dialogues(per_label=8, seed=3, labels=[0, 1])]


def _train(model_dir, records, job_dir: Path, recorder: Recorder, *, validation=None, **overrides):
    config, _ = resolve_training_config("tiny_test", {**RECIPE, **overrides})
    return train_adapter(base_model_dir=model_dir, base_model_name="tiny-glm4", records=records, label_set=TWO,
                         system_prompt=PROMPT, config=config, job_dir=job_dir, hooks=recorder.hooks,
                         validation_records=validation)


def _validations(recorder: Recorder) -> list[dict]:
    return [data for kind, _, data in recorder.events if kind == "validation"]


# --- class balance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "balanced"])
def test_class_balance_changes_what_training_draws(tiny_model_dir, records, tmp_path, mode):
    common = [r for r in records if r.label_id == 0]
    imbalanced = common + common[:6] + [r for r in records if r.label_id == 1][:2]  # 14 : 2, 4 batches an epoch
    recorder = Recorder()
    result = _train(tiny_model_dir, imbalanced, tmp_path, recorder, max_steps=10, eval_every_steps=0,
                    class_balance=mode)
    drawn = result.metrics["samples_per_class"]
    assert sum(drawn.values()) == 40  # 10 steps x batch 4
    rare_share = drawn.get("1", 0) / 40
    expected = class_shares([r.label_id for r in imbalanced], mode)
    assert result.metrics["class_balance"] == mode
    if mode == "none":
        assert expected[1] == pytest.approx(2 / 16)
        # One pass per epoch in random order: 2.5 epochs see the 2 rare rows 4 to 6 times.
        assert 4 <= drawn.get("1", 0) <= 6
        assert "class_balance" not in recorder.kinds()
    else:
        assert expected[1] == pytest.approx(0.5)
        assert abs(rare_share - 0.5) < 0.25  # binomial(40, 0.5): within 3 sd; unbalanced it is ~0.11
        event = next(data for kind, _, data in recorder.events if kind == "class_balance")
        assert event["mode"] == "balanced" and event["shares"] == pytest.approx({"0": 0.5, "1": 0.5})
    assert not result.cancelled and result.steps == 10


# --- validation during training: best adapter, early stopping, resume ---------------------------------


@pytest.fixture(scope="module")
def early_stopping_run(tiny_model_dir, records, tmp_path_factory):
    recorder = Recorder()
    job_dir = tmp_path_factory.mktemp("job-validated")
    result = _train(tiny_model_dir, records, job_dir, recorder, validation=records, early_stopping_patience=2)
    return result, recorder, job_dir


def test_validation_events_every_n_steps_and_the_kept_adapter_is_the_best(tiny_model_dir, records,
                                                                           early_stopping_run):
    result, recorder, job_dir = early_stopping_run
    validations = _validations(recorder)
    steps = [v["step"] for v in validations]
    assert steps == list(range(3, result.steps + 1, 3))
    assert all(v["n_samples"] == len(records) for v in validations)
    f1s = [v["macro_f1"] for v in validations]
    assert len(set(f1s)) > 1  # the model learns: the selection below chooses among different scores
    # Best = the first evaluation with the highest macro-F1, as the recorded events say.
    best = validations[f1s.index(max(f1s))]
    kept = next(data for kind, _, data in recorder.events if kind == "best_checkpoint")
    assert kept["step"] == best["step"] and kept["macro_f1"] == best["macro_f1"]
    assert result.metrics["best_step"] == best["step"] and best["step"] < result.steps
    assert result.validation_history == [{"step": v["step"], "accuracy": v["accuracy"], "macro_f1": v["macro_f1"],
                                          "n_samples": v["n_samples"]} for v in validations]

    # The adapter on disk scores what the best evaluation recorded, and is not the last step's weights.
    from peft import PeftModel

    from app.ml.models.loading import load_base_model

    loaded = load_base_model(tiny_model_dir, quantization="none")
    model = PeftModel.from_pretrained(loaded.model, str(result.adapter_dir)).eval()
    accuracy, macro_f1 = score_accuracy_macro_f1(model, loaded.tokenizer, PROMPT, TWO,
                                                 validation_sample(records, 64, 42), max_input_length=1024)
    assert macro_f1 == pytest.approx(best["macro_f1"], abs=1e-6) and accuracy == pytest.approx(best["accuracy"])
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    last = load_file(str(job_dir / "checkpoints" / f"checkpoint-{result.steps}" / "adapter_model.safetensors"))
    assert any(not torch.equal(saved[name], last[name]) for name in saved)


def test_early_stopping_stops_after_patience_evaluations_without_a_better_macro_f1(early_stopping_run):
    result, recorder, job_dir = early_stopping_run
    validations = _validations(recorder)
    best_step = result.metrics["best_step"]
    after_best = [v for v in validations if v["step"] > best_step]
    # Stopped at the second evaluation in a row that did not beat the best, before max_steps.
    assert [v["step"] for v in after_best] == [best_step + 3, best_step + 6]
    assert all(not v["improved"] and v["macro_f1"] <= v["best_macro_f1"] for v in after_best)
    assert result.steps == best_step + 6 < 30 and result.metrics["early_stopped_at"] == result.steps
    stop = next(data for kind, _, data in recorder.events if kind == "early_stopped")
    assert stop["step"] == result.steps and stop["best_step"] == best_step
    assert recorder.kinds()[-1] == "finished" and not result.cancelled
    # The stop was checkpointed: a worker restarted before the adapter was written would find the run over.
    assert (job_dir / "checkpoints" / f"checkpoint-{result.steps}" / "trainer_state.json").is_file()


def test_cancel_and_resume_keep_the_evaluations_and_pick_the_same_best(tiny_model_dir, records, tmp_path,
                                                                        early_stopping_run):
    uninterrupted, first_recorder, _ = early_stopping_run
    job_dir = tmp_path / "job"
    cancelling = Recorder(stop_after=8)  # cancelled after step 8: checkpoint-5 is the resume point
    cancelled = _train(tiny_model_dir, records, job_dir, cancelling, validation=records, early_stopping_patience=2)
    assert cancelled.cancelled and cancelled.steps == 8 and cancelled.adapter_dir is None
    assert [v["step"] for v in _validations(cancelling)] == [3, 6]
    resuming = Recorder()
    resumed = _train(tiny_model_dir, records, job_dir, resuming, validation=records, early_stopping_patience=2)
    # Steps 6.. run again, and so does their evaluation; the one at step 3 comes from the checkpoint.
    assert [v["step"] for v in _validations(resuming)][0] == 6
    assert resumed.steps == uninterrupted.steps and resumed.metrics["best_step"] == uninterrupted.metrics["best_step"]
    expected = {v["step"]: v["macro_f1"] for v in uninterrupted.validation_history}
    assert [v["step"] for v in resumed.validation_history] == list(expected)
    for v in resumed.validation_history:
        assert v["macro_f1"] == pytest.approx(expected[v["step"]], abs=1e-6), v["step"]
    snapshots = sorted(p.name for p in (job_dir / "checkpoints" / "best").iterdir())
    assert snapshots == [f"step-{resumed.metrics['best_step']}"]  # the others were pruned at checkpoints

    # A worker killed after the early stop's checkpoint, before the adapter was written: nothing trains
    # again, and the adapter written is still the best one.
    import shutil

    best_weights = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    shutil.rmtree(resumed.adapter_dir)
    finishing = Recorder()
    finished = _train(tiny_model_dir, records, job_dir, finishing, validation=records, early_stopping_patience=2)
    assert finishing.logs == [] and _validations(finishing) == [] and finished.steps == resumed.steps
    assert finished.metrics["best_step"] == resumed.metrics["best_step"]
    rewritten = load_file(str(finished.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(rewritten[name], best_weights[name]) for name in best_weights)

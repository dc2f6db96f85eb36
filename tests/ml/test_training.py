"""The training job end to end on the tiny GLM-4: learning, checkpoints, cancel, resume, 4-bit, saving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.data.sample import generate_sample_dialogues
from app.domain.artifacts import ADAPTER_METADATA_FILENAME
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import build_system_prompt
from app.domain.records import Record
from app.ml.train.config import resolve_training_config
from app.ml.train.trainer import (
    TrainingHooks,
    latest_checkpoint,
    save_adapter,
    train_adapter,
)

SYSTEM_PROMPT = build_system_prompt(CMCC34_LABEL_SET)


@pytest.fixture(scope="module")
def records() -> list[Record]:
    rows = generate_sample_dialogues(per_label=1, seed=3)[:16]
    return [Record(row.dialogue, row.label_id) for row in rows]


class Recorder:
    """Collects what the hooks report; ``stop_after`` cancels after that many optimizer steps."""

    def __init__(self, stop_after: int | None = None):
        self.logs: list[dict] = []
        self.events: list[tuple[str, str, dict]] = []
        self.polls = 0
        self.stop_after = stop_after

    def should_stop(self) -> bool:
        self.polls += 1  # once before training, then once per optimizer step
        return self.stop_after is not None and self.polls > self.stop_after

    @property
    def hooks(self) -> TrainingHooks:
        return TrainingHooks(
            on_log=self.logs.append,
            on_event=lambda kind, message, data: self.events.append((kind, message, data)),
            should_stop=self.should_stop,
        )

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def _train(model_dir, records, job_dir: Path, recorder: Recorder | None = None, **overrides):
    config, _ = resolve_training_config("tiny_test", {
        "max_steps": 20, "save_steps": 5, "logging_steps": 1, "learning_rate": 5e-3,
        # The CMCC-34 system prompt alone is ~570 tiny-tokenizer tokens.
        "max_input_length": 1024, **overrides,
    })
    return train_adapter(
        base_model_dir=model_dir, base_model_name="tiny-glm4", records=records, label_set=CMCC34_LABEL_SET,
        system_prompt=SYSTEM_PROMPT, config=config, job_dir=job_dir,
        hooks=(recorder or Recorder()).hooks,
    )


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, records, tmp_path_factory):
    recorder = Recorder()
    job_dir = tmp_path_factory.mktemp("job-full")
    return _train(tiny_model_dir, records, job_dir, recorder), recorder, job_dir


def test_loss_falls_and_progress_is_reported(full_run):
    result, recorder, _ = full_run
    assert not result.cancelled and result.steps == 20
    losses = [entry["loss"] for entry in result.loss_history]
    assert [entry["step"] for entry in result.loss_history] == list(range(1, 21))
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert result.final_loss == losses[-1]

    assert [record["step"] for record in recorder.logs] == list(range(1, 21))
    last = recorder.logs[-1]
    assert last["max_steps"] == 20 and last["eta_seconds"] == 0
    assert set(last) >= {"epoch", "loss", "learning_rate", "tokens_per_second", "samples_per_second"}
    assert all(r["tokens_per_second"] > 0 and r["samples_per_second"] > 0 for r in recorder.logs)
    kinds = recorder.kinds()
    assert kinds[:2] == ["model_loaded", "dataset_encoded"] and kinds[-1] == "finished"
    loaded = recorder.events[0][2]
    assert loaded["quantization"] == "none" and loaded["shared_prefix"] is True


def test_checkpoints_are_written_every_save_steps_and_rotated(full_run):
    result, recorder, job_dir = full_run
    saved = [data["step"] for kind, _, data in recorder.events if kind == "checkpoint_saved"]
    assert saved == [5, 10, 15, 20]
    kept = sorted(p.name for p in (job_dir / "checkpoints").iterdir())
    assert kept == ["checkpoint-15", "checkpoint-20"]  # save_total_limit=2
    assert (job_dir / "checkpoints" / "checkpoint-15" / "optimizer.pt").is_file()


def test_adapter_directory_holds_weights_tokenizer_and_metadata(full_run):
    result, recorder, job_dir = full_run
    assert "warning" not in recorder.kinds()
    adapter = result.adapter_dir
    assert adapter == job_dir / "adapter"
    names = ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", ADAPTER_METADATA_FILENAME,
             "loss_curve.png")
    for name in names:
        assert (adapter / name).is_file(), name
    meta = json.loads((adapter / ADAPTER_METADATA_FILENAME).read_text(encoding="utf-8"))
    assert meta["system_prompt"] == SYSTEM_PROMPT
    assert meta["label_set"] == CMCC34_LABEL_SET.to_pairs()
    assert meta["base_model"] == "tiny-glm4" and meta["quantization"] == "none"
    assert meta["training_config"]["max_steps"] == 20
    assert meta["metrics"]["shared_prefix"] is True and meta["metrics"]["global_step"] == 20


def test_trained_adapter_changes_the_model(tiny_model_dir, full_run):
    from peft import PeftModel

    from app.ml.models.loading import load_base_model

    result, _, _ = full_run
    ids = torch.randint(0, 1000, (1, 20))
    base = load_base_model(tiny_model_dir, quantization="none").model
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3


def test_saved_adapter_reloads_with_identical_logits(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from app.ml.models.loading import load_base_model

    loaded = load_base_model(tiny_model_dir, quantization="none")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(std=0.2)
    model.eval()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, loaded.tokenizer, tmp_path / "adapter", metadata={"x": 1})

    fresh = load_base_model(tiny_model_dir, quantization="none")
    reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    assert json.loads((tmp_path / "adapter" / ADAPTER_METADATA_FILENAME).read_text())["x"] == 1


def test_cancel_stops_within_a_step_and_resume_continues_exactly(tiny_model_dir, records, tmp_path, full_run):
    job_dir = tmp_path / "job"
    cancelling = Recorder(stop_after=7)
    cancelled = _train(tiny_model_dir, records, job_dir, cancelling)
    assert cancelled.cancelled and cancelled.adapter_dir is None
    assert cancelled.steps == 7  # stopped right after the step at which should_stop turned True
    assert not (job_dir / "adapter").exists()
    assert latest_checkpoint(job_dir / "checkpoints").name == "checkpoint-5"
    assert cancelling.kinds()[-1] == "cancelled"

    resuming = Recorder()
    resumed = _train(tiny_model_dir, records, job_dir, resuming)
    assert ("resumed", 5) in [(kind, data.get("step")) for kind, _, data in resuming.events]
    assert not resumed.cancelled and resumed.steps == 20 and resumed.metrics["max_steps"] == 20
    assert [record["step"] for record in resuming.logs] == list(range(6, 21))
    assert [entry["step"] for entry in resumed.loss_history] == list(range(1, 21))
    # Optimizer, scheduler, RNG and data order are restored: the resumed run retraces the uninterrupted one.
    uninterrupted = {e["step"]: e["loss"] for e in full_run[0].loss_history}
    for entry in resumed.loss_history:
        assert entry["loss"] == pytest.approx(uninterrupted[entry["step"]], rel=1e-4), entry["step"]

    # A worker killed after the last checkpoint but before the adapter was written: no step is redone.
    shutil.rmtree(job_dir / "adapter")
    finishing = Recorder()
    finished = _train(tiny_model_dir, records, job_dir, finishing)
    assert finished.steps == 20 and finishing.logs == []
    assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_cancel_before_training_starts(tiny_model_dir, records, tmp_path):
    result = _train(tiny_model_dir, records, tmp_path, Recorder(stop_after=0))
    assert result.cancelled and result.steps == 0
    assert not (tmp_path / "checkpoints").exists()


def test_4bit_base_trains_on_the_naive_path(tiny_model_dir, records, tmp_path):
    recorder = Recorder()
    result = _train(tiny_model_dir, records, tmp_path, recorder, quantization="4bit", shared_prefix=False,
                    max_steps=3, save_steps=10)
    assert result.quantization == "4bit" and not result.cancelled
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.loss_history)
    assert recorder.events[0][2]["shared_prefix"] is False
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().max() > 0 for tensor in lora_b)  # B starts at 0: it moved


def test_a_label_outside_the_label_set_is_rejected(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="label id 99"):
        _train(tiny_model_dir, [Record("您好", 1), Record("你好", 99)], tmp_path)

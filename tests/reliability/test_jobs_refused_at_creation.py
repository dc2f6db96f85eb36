"""A job that cannot run is refused at POST /jobs with a 422 naming the field, never accepted to fail later;
a new user's first job runs on the hardware at hand (issue 9, items 5 and 6)."""

from __future__ import annotations

import json

from pathlib import Path

import pytest

from app.ml.models.registry import GLM4_9B_ENV
from tests.conftest import upload


def _dataset(client) -> str:
    from app.data.sample import generate_sample_dialogues, to_cmcc_csv

    return upload(client, to_cmcc_csv(generate_sample_dialogues(per_label=2, seed=3)).encode()).json()["id"]


@pytest.mark.parametrize("hyperparameters,field", [
    ({"seed": 10**23}, "hyperparameters.seed"),
    ({"seed": -1}, "hyperparameters.seed"),
    ({"lr_scheduler_type": "bogus"}, "hyperparameters.lr_scheduler_type"),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "hyperparameters.lr_scheduler_type"),  # needs eval metrics
    ({"target_modules": ["nope_proj"]}, "hyperparameters.target_modules"),
    ({"target_modules": ["gate_proj"]}, "hyperparameters.target_modules"),  # GLM-4 fuses it into gate_up_proj
    ({"target_modules": ["q_proj["]}, "hyperparameters.target_modules[0]"),
    ({"num_train_epochs": 1e308}, "hyperparameters.num_train_epochs"),
    ({"num_train_epochs": float("inf")}, "hyperparameters.num_train_epochs"),
    ({"max_steps": 10**9}, "hyperparameters.max_steps"),
    ({"max_steps": 10**30}, "hyperparameters.max_steps"),
    ({"weight_decay": 1e308}, "hyperparameters.weight_decay"),
    ({"max_input_length": 10**12}, "hyperparameters.max_input_length"),
    ({"save_steps": 10**30}, "hyperparameters.save_steps"),
])
def test_hyperparameters_that_would_fail_later_are_refused(client, hyperparameters, field):
    body = {"dataset_id": _dataset(client), "config": "tiny_test", "hyperparameters": {"max_steps": 2, **hyperparameters}}
    # json.dumps writes inf as Infinity, which the API's JSON parser reads back as a float
    response = client.post("/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == field
    assert client.get("/jobs").json() == []


def test_epochs_are_bounded_by_the_steps_they_make(settings, client):
    """MAX_TRAIN_STEPS bounds an epoch-based job too: 68 rows in batches of 4 are 17 steps an epoch."""
    settings.max_train_steps = 40
    dataset_id = _dataset(client)
    body = {"dataset_id": dataset_id, "config": "tiny_test"}
    too_long = client.post("/jobs", json={**body, "hyperparameters": {"max_steps": -1, "num_train_epochs": 3}})
    assert too_long.status_code == 422 and too_long.json()["detail"]["field"] == "hyperparameters.num_train_epochs"
    assert "51 steps" in too_long.json()["detail"]["message"]
    fits = client.post("/jobs", json={**body, "hyperparameters": {"max_steps": -1, "num_train_epochs": 2}})
    assert fits.status_code == 201, fits.text


def test_target_modules_of_a_prepared_base_are_read_from_its_weights(settings, client):
    from app.ml.models.registry import resolve_base_model

    resolve_base_model("tiny-glm4", settings)  # prepared: its safetensors headers name the modules
    dataset_id = _dataset(client)
    for targets, status in ((["mlp.gate_up_proj", "self_attn.o_proj"], 201), (["model.layers.9.mlp.down_proj"], 422),
                            (["input_layernorm"], 422)):  # a norm has no weight matrix for LoRA
        response = client.post("/jobs", json={"dataset_id": dataset_id, "config": "tiny_test",
                                              "hyperparameters": {"target_modules": targets}})
        assert response.status_code == status, (targets, response.text)


def test_a_job_whose_targets_are_unknown_fails_before_training(settings, client):
    """Where the module names are not known at creation (a local model folder), the worker refuses the
    targets before it loads the model, with a clear error."""
    from app.ml.models.registry import resolve_base_model
    from workers.worker import Worker

    settings.extra_base_models = f"mine={resolve_base_model('tiny-glm4', settings)}"
    job = client.post("/jobs", json={"dataset_id": _dataset(client), "config": "tiny_test", "base_model": "mine",
                                     "hyperparameters": {"target_modules": ["nope_proj"]}})
    assert job.status_code == 422  # a local folder with weights: known at creation already

    settings.extra_base_models = ""
    accepted = client.post("/jobs", json={"dataset_id": _dataset(client), "config": "tiny_test",
                                          "hyperparameters": {"max_steps": 2}}).json()
    from app.core.db import session_scope
    from app.models import Job

    with session_scope(settings) as session:  # a job stored by an older version, before this check existed
        row = session.get(Job, accepted["id"])
        row.hyperparameters = {**row.hyperparameters, "target_modules": ["nope_proj"]}
    assert Worker(settings).run_forever(exit_when_idle=True) == 1
    failed = client.get(f"/jobs/{accepted['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_training_input"
    assert "nope_proj" in failed["error"]["message"] and "q_proj" in failed["error"]["message"]
    kinds = [e["kind"] for e in client.get(f"/jobs/{accepted['id']}/events").json()]
    assert "model_loaded" not in kinds


def test_every_accepted_scheduler_runs_without_extra_arguments():
    """The accepted lr_scheduler_type values are transformers' SchedulerType values that need neither
    lr_scheduler_kwargs nor evaluation metrics; the others fail inside the Trainer."""
    import typing

    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    from app.ml.train.config import LrSchedulerType

    accepted = set(typing.get_args(LrSchedulerType))
    assert accepted <= {s.value for s in SchedulerType}

    def runs(name: str) -> bool:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        try:
            scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4)
            for _ in range(2):
                optimizer.step()
                scheduler.step()
        except (TypeError, ValueError):
            return False
        return True

    assert {s.value for s in SchedulerType if runs(s.value)} == accepted


@pytest.mark.parametrize("architecture,config_kwargs", [
    ("Qwen2ForCausalLM", {}), ("LlamaForCausalLM", {}), ("Gemma3ForCausalLM", {"head_dim": 16}),
    ("Glm4ForCausalLM", {}),
])
def test_the_architecture_table_names_the_real_matrix_modules(architecture, config_kwargs):
    import torch
    import transformers

    from app.ml.models.target_modules import KNOWN_MATRIX_MODULES

    model_type = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3_text",
                  "Glm4ForCausalLM": "glm4"}[architecture]
    config = transformers.AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                               pad_token_id=0,
                                               **config_kwargs)
    with torch.device("meta"):
        model = getattr(transformers, architecture)(config)
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if getattr(module, "weight", None) is not None and module.weight.dim() == 2}
    assert leaves == KNOWN_MATRIX_MODULES[architecture]


# --- the first job of a new user ------------------------------------------------------------


def test_the_gpu_recipe_without_its_base_model_is_refused_saying_what_to_set(client, settings, monkeypatch):
    assert settings.glm4_9b_path is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    response = client.post("/jobs", json={"dataset_id": _dataset(client), "config": "cmcc34_qlora_system_prompt"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "base_model"
    assert GLM4_9B_ENV in detail["message"] and "cmcc34_qlora_system_prompt" in detail["message"]

    settings.glm4_9b_path = Path("/nonexistent/GLM-4-9B-0414")  # the app reads this very Settings object
    wrong_path = client.post("/jobs", json={"dataset_id": _dataset(client), "base_model": "glm-4-9b-0414"})
    assert wrong_path.status_code == 422 and "/nonexistent/GLM-4-9B-0414" in wrong_path.json()["detail"]["message"]
    assert client.get("/jobs").json() == []


def test_the_embedded_model_without_its_wheels_is_refused_saying_what_to_install(client):
    from app.ml.models.registry import QWEN_DEFAULT, _missing_modules, get_spec

    if not _missing_modules(get_spec(QWEN_DEFAULT, client.app.state.settings)):
        pytest.skip("the [models] wheels are installed here")
    response = client.post("/jobs", json={"dataset_id": _dataset(client), "config": "cpu_small"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["field"] == "base_model" and "intent-tuner[models]" in detail["message"]


@pytest.mark.parametrize("device,recipe", [("cpu", "cpu_small"), ("cuda", "cmcc34_qlora_system_prompt")])
def test_the_default_recipe_follows_the_hardware(tmp_path, device, recipe):
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app
    from app.ml.train.config import default_config_name

    settings = Settings(data_dir=tmp_path / "data", device=device, default_config=None)
    assert default_config_name(settings) == recipe
    assert default_config_name(Settings(data_dir=tmp_path, device=device, default_config="tiny_test")) == "tiny_test"
    with TestClient(create_app(settings)) as client:
        job = client.post("/jobs", json={"dataset_id": _dataset(client), "base_model": "tiny-glm4"})
        assert job.status_code == 201, job.text
        assert job.json()["config"] == recipe


def test_an_oversized_label_id_is_refused_at_upload(client):
    huge = 10**26
    cases = [
        ("text.csv", f"text,label\n您好,{huge}\n再见,1\n", "label"),
        ("cmcc.csv", f"sentence_sep,c_numerical\n您好,{huge}\n再见,1\n", "c_numerical"),
        ("chat.jsonl", '{"messages": [{"role": "user", "content": "您好"}, {"role": "assistant", "content": '
                       f'"意图：{huge}：开通"}}]}}\n', "messages.assistant"),
        ("long.jsonl", '{"messages": [{"role": "user", "content": "您好"}, {"role": "assistant", "content": '
                       f'"意图：{"9" * 5000}：开通"}}]}}\n', "messages.assistant"),
    ]
    for filename, content, field in cases:
        response = upload(client, content.encode(), filename)
        assert response.status_code == 422, (filename, response.text)
        assert response.json()["detail"]["field"] == field and response.json()["detail"]["row"] in (1, 2)
    assert client.get("/datasets").json() == []

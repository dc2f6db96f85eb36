"""`intent-tuner classify` and `intent-tuner evaluate` drive the same services on DATA_DIR's database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from app.core.db import session_scope
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import build_system_prompt
from app.services.models import register_adapter
from tests.conftest import database_env, upload
from tests.ml.conftest import make_random_lora_adapter


def _cli(settings, *args, stdin: str | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **database_env(settings), **env_vars}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_cli_classify_and_evaluate(client, settings, sample_csv):
    from app.ml.models.registry import resolve_base_model

    adapter = make_random_lora_adapter(resolve_base_model("tiny-glm4", settings), settings.data_dir / "adapter", 5)
    with session_scope(settings) as session:
        register_adapter(session, settings, model_id="ft_cli", name="cli", base_model="tiny-glm4", adapter_dir=adapter,
                         label_set=CMCC34_LABEL_SET.to_pairs(), quantization="none", max_input_length=None,
                         system_prompt=build_system_prompt(CMCC34_LABEL_SET))
    dataset_id = upload(client, sample_csv).json()["id"]

    classified = _cli(settings, "classify", "--model", "ft_cli", stdin="您好请讲[SEP]我要开通流量包\n您好[SEP]帮我取消彩铃\n")
    assert classified.returncode == 0, classified.stderr
    lines = [json.loads(line) for line in classified.stdout.splitlines()]
    assert len(lines) == 2 and all(line["intent_id"] in CMCC34_LABEL_SET.ids for line in lines)
    assert "classify" in classified.stderr  # the progress bar

    evaluated = _cli(settings, "evaluate", "--model", "ft_cli", "--dataset", dataset_id)
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads(evaluated.stdout)
    assert summary["n_samples"] == 68 and 0 <= summary["accuracy"] <= 1
    report = client.get(f"/reports/{summary['report_id']}").json()
    assert report["metrics"]["accuracy"] == summary["accuracy"]
    assert "evaluate" in evaluated.stderr
    # The CLI's job never sat in the queue, where a served worker could have run it a second time.
    job = next(j for j in client.get("/jobs").json() if j["kind"] == "evaluate")
    assert job["status"] == "succeeded" and job["report_id"] == summary["report_id"]
    kinds = [e["kind"] for e in client.get(f"/jobs/{job['id']}/events").json()]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "succeeded"


def test_cli_prepare_model_prints_the_path_or_the_error(settings):
    prepared = _cli(settings, "prepare-model", DEFAULT_BASE_MODEL="tiny-glm4")
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.strip() == str(settings.base_models_dir.resolve() / "tiny-glm4")
    assert "tiny-glm4 ready" in prepared.stderr

    missing = _cli(settings, "prepare-model", "no-such-model")
    assert missing.returncode == 1
    assert missing.stdout == "" and "unknown base model 'no-such-model'" in missing.stderr


def test_cli_models_lists_the_registry_with_the_default_marked(settings):
    listed = _cli(settings, "models", DEFAULT_BASE_MODEL="tiny-glm4")
    assert listed.returncode == 0, listed.stderr
    rows = {line[2:].split()[0]: line for line in listed.stdout.splitlines()}
    assert rows["tiny-glm4"].startswith("* ") and "glm-4-9b-0414" in rows
    assert all(not line.startswith("* ") for name, line in rows.items() if name != "tiny-glm4")

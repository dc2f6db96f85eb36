"""POST /evaluations refuses a dataset whose label ids name other intents than the model's (422 naming
dataset_id), by the same rule POST /jobs applies to a validation set.

It used to check ids only: a dataset with swapped names was evaluated and the report showed the
model's names on the dataset's rows.
"""

from __future__ import annotations

import pytest

from app.core.db import session_scope
from app.services.models import register_adapter
from tests.conftest import upload


def _csv(pairs) -> bytes:
    rows = [f"您好请讲[SEP]第{n}句[SEP]{name},{label_id},{name}" for n, (label_id, name) in enumerate(pairs * 2)]
    return ("sentence_sep,c_numerical,label_raw\n" + "\n".join(rows) + "\n").encode("utf-8")


MODEL_LABELS = [[0, "办理取消"], [1, "办理开通"], [2, "投诉"]]


@pytest.fixture
def model_id(client, settings):
    adapter_dir = settings.data_dir / "adapters" / "ft_names"
    adapter_dir.mkdir(parents=True)
    with session_scope(settings) as session:
        register_adapter(session, settings, model_id="ft_names", name="m", base_model="tiny-glm4",
                         adapter_dir=adapter_dir, label_set=MODEL_LABELS, system_prompt="p", quantization="none",
                         max_input_length=None)
    return "ft_names"


def test_a_dataset_naming_the_models_ids_otherwise_is_refused(client, model_id):
    swapped = upload(client, _csv([(0, "办理开通"), (1, "办理取消")])).json()["id"]
    response = client.post("/evaluations", json={"model": model_id, "dataset_id": swapped})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "dataset_id"
    assert "label ids [0, 1] have other names" in detail["message"] and "'办理开通'" in detail["message"]

    unknown = upload(client, _csv([(0, "办理取消"), (9, "销户")])).json()["id"]
    response = client.post("/evaluations", json={"model": model_id, "dataset_id": unknown})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "dataset_id"
    assert "[9]" in response.json()["detail"]["message"]
    assert client.get("/jobs").json() == []

    # the model's names on a subset of its ids: evaluated
    subset = upload(client, _csv([(0, "办理取消"), (2, "投诉")])).json()["id"]
    response = client.post("/evaluations", json={"model": model_id, "dataset_id": subset})
    assert response.status_code == 201 and response.json()["kind"] == "evaluate", response.text


def test_jobs_refuse_a_validation_set_with_other_names_by_the_same_rule(client):
    train = upload(client, _csv([(0, "办理取消"), (1, "办理开通")])).json()["id"]
    swapped = upload(client, _csv([(0, "办理开通"), (1, "办理取消")])).json()["id"]
    response = client.post("/jobs", json={"dataset_id": train, "validation_dataset_id": swapped})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "validation_dataset_id" and "have other names" in detail["message"]
    assert "0 is '办理开通' there but '办理取消' in the training dataset" in detail["message"]

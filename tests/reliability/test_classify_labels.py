"""Zero-shot `labels` on POST /classify: a strict [[id, name], ...] list, or a 422 naming the field.

Malformed label lists used to answer 500 (`[[1]]`, `[["x","y"]]`, `[[]]`, duplicate ids) or be
silently coerced (id 1.5 → 1, name null → "None"). Every case here is refused before any model work.
"""

from __future__ import annotations

import json

import pytest

from app.core.db import session_scope
from app.services.models import register_adapter

TEXT = "您好请讲[SEP]我要开通流量包"


@pytest.mark.parametrize("labels,field,needle", [
    ([[1]], "labels[0]", "labels[0][1]"),
    ([["x", "y"]], "labels[0][0]", "integer"),
    ([[]], "labels[0]", "labels[0]"),
    ([[1, "办理开通"], [1, "办理取消"]], "labels", "labels[1] repeats the id 1 of labels[0]"),
    ([[1, "办理开通"], [2, "办理开通"]], "labels", "labels[1] repeats the name of labels[0]"),
    ([[1.5, "办理开通"]], "labels[0][0]", "integer"),
    ([[True, "办理开通"]], "labels[0][0]", "integer"),
    ([["1", "办理开通"]], "labels[0][0]", "integer"),
    ([[-1, "办理开通"]], "labels[0][0]", "greater than or equal to 0"),
    ([[10**26, "办理开通"]], "labels[0][0]", "less than or equal to"),
    ([[1, None]], "labels[0][1]", "string"),
    ([[1, 7]], "labels[0][1]", "string"),
    ([[1, ""]], "labels[0][1]", "labels[0][1]"),
    ([[1, "   "]], "labels[0][1]", "empty"),
    ([[1, "办理\u200b开通"]], "labels[0][1]", "invisible character U+200B"),
    ([[1, "办理\x00开通"]], "labels[0][1]", "control"),
    ([[1, "办理\ud800开通"]], "labels[0][1]", "unicode"),
    ([[1, "意图：3：办理开通"]], "labels[0][1]", "answer prefix"),
    ([[1, "3：办理开通"]], "labels[0][1]", "read as a label id"),
    ([[1, "办理 开通"], [2, "办理\n\t开通"]], "labels", "labels[1] repeats the name of labels[0]"),
    ([[1, "x" * 101]], "labels[0][1]", "100"),
    ([[1, "办理开通", "extra"]], "labels[0]", "labels[0]"),
    ([{"id": 1, "name": "办理开通"}], "labels[0]", "labels[0]"),
    ([], "labels", "labels"),
    ([[i, f"意向{i}"] for i in range(201)], "labels", "200"),
    ({"1": "办理开通"}, "labels", "labels"),
])
def test_malformed_zero_shot_labels_are_422_naming_the_field(client, labels, field, needle):
    # sent as ASCII JSON: a lone surrogate is valid JSON (\ud800) but not encodable UTF-8
    body = json.dumps({"model": "tiny-glm4", "text": TEXT, "labels": labels})
    response = client.post("/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"].startswith(field), detail
    assert needle in detail["message"], detail
    # refused before any model work
    assert client.app.state.classifiers.stats().base_models == []


def test_labels_for_a_fine_tuned_model_are_refused_not_ignored(client, settings):
    adapter_dir = settings.data_dir / "adapter"
    adapter_dir.mkdir(parents=True)
    with session_scope(settings) as session:
        register_adapter(session, settings, model_id="ft_labels", name="m", base_model="tiny-glm4",
                         adapter_dir=adapter_dir, label_set=[[0, "办理开通"], [1, "办理取消"]], system_prompt="p",
                         quantization="none", max_input_length=None)
    response = client.post("/classify", json={"model": "ft_labels", "text": TEXT, "labels": [[5, "投诉"]]})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "labels", response.text


def test_lone_surrogate_in_a_dialogue_is_422_not_500(client):
    response = client.post("/classify", content='{"model": "tiny-glm4", "texts": ["ok", "\\ud800"]}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == "texts" and "texts[1]" in response.json()["detail"]["message"]

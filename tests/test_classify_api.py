"""POST /classify on a real app: two adapters on one base model, concurrent calls, request validation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from app.core.db import session_scope
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import build_system_prompt
from app.services.models import register_adapter
from tests.ml.conftest import make_random_lora_adapter

TEXTS = ["您好请讲[SEP]我要开通流量包", "您好[SEP]这个月怎么多扣了我五十块钱", "您好请讲[SEP]宽带老是断网[SEP]学校宿舍"]


@pytest.fixture
def two_adapters(client, settings):
    from app.ml.models.registry import resolve_base_model

    base_dir = resolve_base_model("tiny-glm4", settings)
    ids = []
    with session_scope(settings) as session:
        for seed in (1, 2):
            adapter_dir = make_random_lora_adapter(base_dir, settings.data_dir / f"adapter{seed}", seed)
            model = register_adapter(session, settings, model_id=f"ft_test{seed}", name=f"random-{seed}",
                                     base_model="tiny-glm4", adapter_dir=adapter_dir,
                                     label_set=CMCC34_LABEL_SET.to_pairs(), max_input_length=None,
                                     system_prompt=build_system_prompt(CMCC34_LABEL_SET), quantization="none")
            ids.append(model.id)
    return ids


def _classify(client, model, texts=TEXTS, **extra):
    response = client.post("/classify", json={"model": model, "texts": texts, **extra})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_concurrent_calls_on_two_adapters_get_each_adapters_own_answers(client, two_adapters):
    alone = {model: _classify(client, model) for model in two_adapters}
    score_a = [p["top_k"][0]["score"] for p in alone[two_adapters[0]]]
    score_b = [p["top_k"][0]["score"] for p in alone[two_adapters[1]]]
    assert score_a != pytest.approx(score_b, abs=1e-3), "the two adapters must answer differently"
    for predictions in alone.values():
        for p in predictions:
            assert p["intent_id"] in CMCC34_LABEL_SET.ids and p["parsed"]
            assert p["label"] == CMCC34_LABEL_SET.name_of(p["intent_id"])

    calls = [two_adapters[i % 2] for i in range(12)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda model: (model, _classify(client, model)), calls))
    for model, predictions in results:
        expected = alone[model]
        assert [p["intent_id"] for p in predictions] == [p["intent_id"] for p in expected]
        assert [p["confidence"] for p in predictions] == pytest.approx([p["confidence"] for p in expected], abs=1e-4)


def test_single_text_top_k_and_zero_shot_base_model(client, two_adapters):
    response = client.post("/classify", json={"model": two_adapters[0], "text": TEXTS[0], "top_k": 3})
    body = response.json()
    (prediction,) = body["predictions"]
    assert len(prediction["top_k"]) == 3
    scores = [t["score"] for t in prediction["top_k"]]
    assert scores == sorted(scores, reverse=True) and prediction["confidence"] == pytest.approx(scores[0])
    zero_shot = client.post("/classify", json={"model": "tiny-glm4", "text": TEXTS[0],
                                               "labels": [[0, "办理开通"], [1, "办理取消"]]})
    assert zero_shot.status_code == 200, zero_shot.text
    assert zero_shot.json()["predictions"][0]["intent_id"] in (0, 1)


@pytest.mark.parametrize("body,needle", [
    ({"model": "x"}, "exactly one of"),
    ({"model": "x", "text": "a", "texts": ["b"]}, "exactly one of"),
    ({"model": "x", "texts": []}, "texts"),
    ({"model": "x", "texts": ["ok", "  "]}, "texts[1]"),
    ({"model": "x", "text": "a", "mode": "guess"}, "mode"),
])
def test_malformed_requests_are_422(client, body, needle):
    response = client.post("/classify", json=body)
    assert response.status_code == 422 and needle in response.text


def test_unknown_model_is_422_naming_the_field(client):
    response = client.post("/classify", json={"model": "ft_nope", "text": "您好"})
    assert response.status_code == 422
    assert response.json()["detail"]["field"] == "model"

"""Zero-shot POST /classify is bounded like adapter serving: input cut to a configured token length,
and per-request work limited (texts, characters) before any model is loaded.

A 100k-character zero-shot text used to run whole through the model (33 s, 4.7 GB on the tiny model)
while holding the base model's lock, so requests for adapters on the same base waited behind it.
"""

from __future__ import annotations

import pytest

from app.core.db import session_scope
from app.ml.infer.scoring import render_prompt_ids
from app.services.models import resolve_model_ref

MAX_INPUT = 384  # the tiny model's prompt for two labels, without a dialogue, is ~280 tokens
LABELS = [[3, "办理开通"], [7, "办理取消"]]
LONG_TEXT = ("您好请讲[SEP]我要开通流量包[SEP]" * 6000)[:100_000]


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"classify_max_input_length": MAX_INPUT, "classify_max_texts": 3})


def _classify(client, **body):
    return client.post("/classify", json={"model": "tiny-glm4", "labels": LABELS, **body})


def test_a_100k_character_zero_shot_text_is_cut_to_the_configured_tokens(client, settings):
    assert _classify(client, text="您好请讲[SEP]我要开通流量包").status_code == 200
    with session_scope(settings) as session:
        ref = resolve_model_ref(session, settings, "tiny-glm4", labels=LABELS)
    classifier = client.app.state.classifiers.get(ref)  # the one the request used
    assert classifier.ref.max_input_length == MAX_INPUT
    cut_prompt = render_prompt_ids(classifier.tokenizer, ref.system_prompt, LONG_TEXT, MAX_INPUT)
    empty_prompt = render_prompt_ids(classifier.tokenizer, ref.system_prompt, "")
    assert len(empty_prompt) < len(cut_prompt) <= MAX_INPUT  # cut, not dropped

    seen: list[int] = []  # token positions of every forward's input, as the model's embedding layer sees them
    hook = classifier.model.get_input_embeddings().register_forward_hook(
        lambda _module, args, _out: seen.append(args[0].shape[-1]))
    try:
        response = _classify(client, text=LONG_TEXT)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["intent_id"] in (3, 7)
        assert seen and max(seen) <= MAX_INPUT
        seen.clear()
        # generation runs the whole prompt at once: exactly the cut prompt
        response = _classify(client, texts=[LONG_TEXT], mode="generate")
        assert response.status_code == 200, response.text
        assert max(seen) == len(cut_prompt)
    finally:
        hook.remove()


@pytest.mark.parametrize("body,field", [
    ({"text": "您" * 100_001}, "text"),
    ({"texts": ["您好", "您" * 100_001]}, "texts[1]"),
    ({"texts": ["您好"] * 4}, "texts"),
])
def test_an_over_limit_request_is_413_before_any_model_is_loaded(client, body, field):
    response = _classify(client, **body)
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field and "CLASSIFY_MAX_TEXT" in detail["message"]
    stats = client.app.state.classifiers.stats()
    assert stats.base_models == [] and stats.loads == 0


def test_a_label_list_that_leaves_no_room_for_the_dialogue_is_422(client):
    many = [[i, f"咨询（含查询）业务规定第{i}类"] for i in range(40)]
    response = _classify(client, text="您好", labels=many)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["field"] == "labels" and "CLASSIFY_MAX_INPUT_LENGTH" in response.text
    # the default label set (CMCC-34) does not fit MAX_INPUT either: the model's budget is at fault
    response = client.post("/classify", json={"model": "tiny-glm4", "text": "您好"})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "model", response.text
    assert _classify(client, text="您好").status_code == 200

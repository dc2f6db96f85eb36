"""Cross-request micro-batching: concurrent /classify calls share forwards, answer as they would
alone, and a full queue answers 503 with Retry-After at once instead of hanging."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.core.db import session_scope
from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import build_system_prompt
from app.ml.infer.batching import MicroBatcher, QueueFullError
from app.services.models import register_adapter
from tests.ml.conftest import make_random_lora_adapter

TEXTS = ["您好请讲[SEP]我要开通流量包", "您好[SEP]这个月怎么多扣了我五十块钱", "您好请讲[SEP]宽带老是断网[SEP]学校宿舍",
         "取消", "喂[SEP]我想查一下话费"]


def test_units_arriving_together_share_one_run_per_group():
    gate = threading.Event()
    calls: list[tuple[str, list[str]]] = []

    def runner(tag):
        def run(texts):
            gate.wait(10)
            calls.append((tag, list(texts)))
            return [f"{tag}:{t}" for t in texts]
        return run

    batcher = MicroBatcher(window_s=0.0, max_batch_texts=100)
    try:
        first = batcher.submit("a", ["0"], runner("a"))  # taken at once; blocks the thread on the gate
        later = [batcher.submit(group, [str(i)], runner(group)) for i, group in enumerate("ababa", start=1)]
        gate.set()
        assert first.result(10) == ["a:0"]
        assert [f.result(10) for f in later] == [["a:1"], ["b:2"], ["a:3"], ["b:4"], ["a:5"]]
    finally:
        batcher.close()
    # The five that waited ran as one batch per group, never mixed ("0" may have been joined by its group).
    assert ("b", ["2", "4"]) in calls
    assert ("a", ["1", "3", "5"]) in calls or ("a", ["0", "1", "3", "5"]) in calls
    assert len(calls) <= 3


def test_full_queue_is_refused_at_once_and_errors_reach_every_caller():
    gate = threading.Event()

    def run(texts):
        gate.wait(10)
        raise ValueError("boom")

    batcher = MicroBatcher(window_s=0.0, max_pending=2, retry_after_s=3)
    try:
        futures = [batcher.submit("g", ["x"], run), batcher.submit("g", ["y"], run)]
        with pytest.raises(QueueFullError) as refused:
            batcher.submit("g", ["z"], run)
        assert refused.value.retry_after == 3
        gate.set()
        for future in futures:
            with pytest.raises(ValueError, match="boom"):
                future.result(10)
        batcher.submit("g", ["again"], lambda texts: texts).result(10)  # room again once they are done
    finally:
        batcher.close()


@pytest.fixture
def adapter_id(client, settings):
    from app.ml.models.registry import resolve_base_model

    base_dir = resolve_base_model("tiny-glm4", settings)
    adapter_dir = make_random_lora_adapter(base_dir, settings.data_dir / "adapter", 5)
    with session_scope(settings) as session:
        model = register_adapter(session, settings, model_id="ft_batch", name="random", base_model="tiny-glm4",
                                 adapter_dir=adapter_dir, label_set=CMCC34_LABEL_SET.to_pairs(), max_input_length=None,
                                 system_prompt=build_system_prompt(CMCC34_LABEL_SET), quantization="none")
        return model.id


def _post(client, model, text, **extra):
    return client.post("/classify", json={"model": model, "text": text, "top_k": 34, **extra})


def _slot(client):
    (slot,) = client.app.state.classifiers.registry._bases.values()
    return slot


@pytest.mark.parametrize("strategy", ["trie", "full"])
def test_concurrent_requests_share_forwards_and_answer_as_alone(client, adapter_id, strategy):
    alone = {}
    for text in TEXTS:
        response = _post(client, adapter_id, text, strategy=strategy)
        assert response.status_code == 200, response.text
        assert response.json()["strategy"] == strategy
        alone[text] = response.json()["predictions"][0]
    slot = _slot(client)
    assert slot.batcher.largest_batch == 1

    calls = TEXTS * 4
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        with slot.lock:  # hold the model so that every request queues up, then let them all go
            futures = [pool.submit(_post, client, adapter_id, text, strategy=strategy) for text in calls]
            while slot.batcher.pending < len(calls):
                threading.Event().wait(0.01)
        responses = [future.result() for future in futures]
    assert slot.batcher.largest_batch > 1, "concurrent requests must share forwards"
    for text, response in zip(calls, responses):
        assert response.status_code == 200, response.text
        got, expected = response.json()["predictions"][0], alone[text]
        assert got["intent_id"] == expected["intent_id"]
        assert [t["intent_id"] for t in got["top_k"][:3]] == [t["intent_id"] for t in expected["top_k"][:3]]
        assert [t["score"] for t in got["top_k"]] == pytest.approx([t["score"] for t in expected["top_k"]], abs=1e-4)


@pytest.fixture
def small_queue_client(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings.classify_queue_size = 1
    settings.classify_retry_after_seconds = 7
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_full_queue_answers_503_with_retry_after(small_queue_client, adapter_id):
    client = small_queue_client
    assert _post(client, adapter_id, TEXTS[0]).status_code == 200  # loads the model
    slot = _slot(client)
    with ThreadPoolExecutor(max_workers=1) as pool:
        with slot.lock:
            first = pool.submit(_post, client, adapter_id, TEXTS[1])
            while slot.batcher.pending < 1:
                threading.Event().wait(0.01)
            refused = _post(client, adapter_id, TEXTS[2])  # answered while the model is busy: no hang
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "7"
        assert "retry" in refused.json()["detail"]["message"]
        assert first.result().status_code == 200
    assert _post(client, adapter_id, TEXTS[2]).status_code == 200

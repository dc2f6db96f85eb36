"""The vLLM backend against one real vLLM CPU server (``make test-vllm``): same labels as the
in-process backend on the same adapter, runtime adapter loading, a lost adapter reloaded, the
base+LoRA batching trap, and the API with INFERENCE_BACKEND=vllm."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.domain.prompt import build_system_prompt
from app.ml.infer.base import ModelRef
from app.ml.infer.vllm_backend import VLLMBackend
from tests.ml.conftest import make_random_lora_adapter

pytestmark = pytest.mark.vllm

# Few texts and top_k=1 where the test allows it: a vLLM CPU server on 2 shared cores answers in seconds.
TEXTS = ["您好请讲[SEP]我要开通流量包", "喂[SEP]这个月怎么多扣了我五十块钱"]
PROMPT = build_system_prompt(CMCC34_LABEL_SET)


def ref_for(qwen_dir, adapter_dir, key="ft_vllm", version="1") -> ModelRef:
    return ModelRef(key, version, qwen_dir, adapter_dir, PROMPT, CMCC34_LABEL_SET, quantization="none")


@pytest.fixture(scope="module")
def adapter(qwen_dir, tmp_path_factory):
    return make_random_lora_adapter(qwen_dir, tmp_path_factory.mktemp("qwen-lora") / "a", seed=7)


@pytest.fixture
def backend(vllm_url):
    backend = VLLMBackend(vllm_url)
    yield backend
    backend.close()


def test_same_labels_as_the_in_process_backend_on_the_same_adapter(qwen_dir, adapter, backend):
    from app.ml.infer.hf_backend import HFBackend

    ref = ref_for(qwen_dir, adapter)
    remote = backend.classify(ref, TEXTS[:1], top_k=34)
    local_backend = HFBackend(device="cpu")
    try:
        local = local_backend.classify(ref, TEXTS[:1], top_k=34)
    finally:
        local_backend.close()
    assert [p.intent_id for p in remote] == [p.intent_id for p in local]
    for p in remote:
        assert p.intent_id in CMCC34_LABEL_SET.ids and p.label == CMCC34_LABEL_SET.name_of(p.intent_id)
        assert p.confidence == pytest.approx(p.top_k[0].score)
        assert 0.99 < sum(t.score for t in p.top_k) < 1.01  # the whole marginal over the 34 labels


def test_adapter_registered_after_start_is_hot_loaded_under_a_per_version_name(qwen_dir, adapter, backend, tmp_path):
    retrained = tmp_path / "retrained"
    shutil.copytree(adapter, retrained)
    v1 = ref_for(qwen_dir, retrained, key="ft_hot", version="1")
    assert backend.classify(v1, TEXTS[:1])[0].intent_id in CMCC34_LABEL_SET.ids
    make_random_lora_adapter(qwen_dir, retrained, seed=8)  # retrained in place
    v2 = ref_for(qwen_dir, retrained, key="ft_hot", version="2")
    assert backend.classify(v2, TEXTS[:1])[0].intent_id in CMCC34_LABEL_SET.ids
    names = backend.loaded_adapters()
    assert VLLMBackend.adapter_name(v1) in names and VLLMBackend.adapter_name(v2) in names
    assert VLLMBackend.adapter_name(v1) != VLLMBackend.adapter_name(v2)
    served = {m["id"] for m in httpx.get(f"{backend.url}/v1/models").json()["data"]}
    assert VLLMBackend.adapter_name(v2) in served


def test_adapter_lost_by_the_server_is_loaded_again(qwen_dir, adapter, backend):
    """What a restarted server looks like to the backend: the adapter's name is unknown (404)."""
    ref = ref_for(qwen_dir, adapter, key="ft_lost")
    before = backend.classify(ref, TEXTS[:1], top_k=1)
    name = VLLMBackend.adapter_name(ref)
    response = httpx.post(f"{backend.url}/v1/unload_lora_adapter", json={"lora_name": name})
    assert response.status_code == 200, response.text
    after = backend.classify(ref, TEXTS[:1], top_k=1)
    assert [p.intent_id for p in after] == [p.intent_id for p in before]


def test_missing_adapter_files_are_an_adapter_error_not_a_parse_failure(qwen_dir, backend, tmp_path):
    from app.ml.infer.base import AdapterUnavailableError

    with pytest.raises(AdapterUnavailableError):
        backend.classify(ref_for(qwen_dir, tmp_path / "nowhere", key="ft_missing"), TEXTS[:1])


def test_base_request_answers_the_same_beside_concurrent_lora_requests(qwen_dir, adapter, backend):
    base = ref_for(qwen_dir, None, key="base:qwen", version="base")
    lora = ref_for(qwen_dir, adapter, key="ft_mix")
    alone = backend.classify(base, TEXTS, top_k=1)
    with ThreadPoolExecutor(max_workers=4) as pool:
        loras = [pool.submit(backend.classify, lora, TEXTS, top_k=1) for _ in range(2)]
        beside = pool.submit(backend.classify, base, TEXTS, top_k=1)
        [f.result() for f in loras]
        mixed = beside.result()
    assert [p.intent_id for p in mixed] == [p.intent_id for p in alone]
    for a, b in zip(alone, mixed):
        assert a.confidence == pytest.approx(b.confidence, abs=1e-3)


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
        response = client.post("/classify", json={"model": "ft_api", "texts": TEXTS[:1], "top_k": 1})
        assert response.status_code == 200, response.text
        for p in response.json()["predictions"]:
            assert p["intent_id"] in CMCC34_LABEL_SET.ids and len(p["top_k"]) == 1
        assert type(client.app.state.classifiers).__name__ == "VLLMBackend"  # no model in this process

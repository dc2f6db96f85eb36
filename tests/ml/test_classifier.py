"""IntentClassifier / ClassifierRegistry on the tiny model: adapters share one base, LRU, versions, threads, modes."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt, format_answer, parse_answer
from app.ml.infer.classifier import ClassifierRegistry, ModelRef, Prediction
from app.ml.infer.generation import generate_answers
from app.ml.infer.scoring import (
    LabelScorer,
    answer_continuation_ids,
    label_distribution,
    render_prompt_ids,
)
from tests.ml.conftest import make_random_lora_adapter

LABELS = LabelSet.from_pairs(
    [(1, "办理取消"), (3, "咨询（含查询）营销活动信息"), (7, "办理开通"), (12, "投诉（含抱怨）费用问题"), (29, "办理缴费")]
)
SYSTEM_PROMPT = build_system_prompt(LABELS)
TEXTS = ["您好请讲[SEP]我要开通流量包", "喂[SEP]这个月怎么扣了我五十块钱", "缴费"]




def ref(key, base_dir, adapter_dir, version="1", system_prompt=SYSTEM_PROMPT, label_set=LABELS) -> ModelRef:
    return ModelRef(key, version, base_dir, adapter_dir, system_prompt, label_set, quantization="none")


def expected_probs(base_dir, adapter_dir, texts=TEXTS, system_prompt=SYSTEM_PROMPT, label_set=LABELS) -> torch.Tensor:
    """Independent path: a fresh base wrapped by peft.PeftModel (not the registry's load_adapter)."""
    from peft import PeftModel

    from app.ml.models.loading import load_base_model

    loaded = load_base_model(base_dir, quantization="none", device="cpu")
    model = loaded.model if adapter_dir is None else PeftModel.from_pretrained(loaded.model, str(adapter_dir)).eval()
    return label_distribution(LabelScorer(model, loaded.tokenizer, system_prompt, label_set).score(texts, answers="trie"))


def probs_of(predictions: list[Prediction], label_set=LABELS) -> torch.Tensor:
    """The full distribution from predictions made with top_k = number of labels, in label-set order."""
    rows = []
    for prediction in predictions:
        by_id = {top.intent_id: top.score for top in prediction.top_k}
        rows.append([by_id[i] for i in label_set.ids])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_random_lora_adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters):
    table = {name: expected_probs(tiny_model_dir, path) for name, path in adapters.items()}
    table[None] = expected_probs(tiny_model_dir, None)
    return table


def test_adapters_share_one_base_and_each_gives_its_own_scores(tiny_model_dir, adapters, expected):
    registry = ClassifierRegistry(max_adapters=3, device="cpu")
    a = registry.get(ref("a", tiny_model_dir, adapters["a"]))
    b = registry.get(ref("b", tiny_model_dir, adapters["b"]))
    zero = registry.get(ref("zero", tiny_model_dir, None))
    assert a.model is b.model is zero.model  # the base model is loaded once
    assert len(registry.stats().base_models) == 1
    for classifier, name in ((a, "a"), (b, "b"), (zero, None), (a, "a")):  # switching back and forth
        got = probs_of(classifier.classify(TEXTS, top_k=len(LABELS), batch_size=2))
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=1e-4)
    assert (expected["a"] - expected["b"]).abs().max() > 1e-3  # the adapters really differ
    assert registry.get(ref("a", tiny_model_dir, adapters["a"])) is a  # a known ref is served from the cache


def test_prediction_fields_in_score_mode(tiny_model_dir, adapters):
    classifier = ClassifierRegistry(device="cpu").get(ref("a", tiny_model_dir, adapters["a"]))
    predictions = classifier.classify(TEXTS, top_k=3)
    assert len(predictions) == len(TEXTS)
    for p in predictions:
        assert p.mode == "score" and p.raw_output is None and p.latency_ms > 0
        assert len(p.top_k) == 3
        scores = [t.score for t in p.top_k]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert (p.intent_id, p.label, p.confidence) == (p.top_k[0].intent_id, p.top_k[0].label, p.top_k[0].score)
        assert LABELS.name_of(p.intent_id) == p.label
    assert classifier.classify([]) == []
    with pytest.raises(ValueError):
        classifier.classify(TEXTS, mode="guess")


def test_lru_evicts_least_recently_used_and_evicted_classifier_still_answers_right(tiny_model_dir, adapters, expected):
    registry = ClassifierRegistry(max_adapters=2, device="cpu")
    a = registry.get(ref("a", tiny_model_dir, adapters["a"]))
    registry.get(ref("b", tiny_model_dir, adapters["b"]))
    registry.get(ref("a", tiny_model_dir, adapters["a"]))  # a is now the most recently used
    c = registry.get(ref("c", tiny_model_dir, adapters["c"]))
    stats = registry.stats()
    assert stats.loaded_keys == ["a", "c"] and stats.evictions == 1
    assert set(c.model.peft_config) == {a.adapter_name, c.adapter_name}  # b's weights were deleted

    registry.get(ref("b", tiny_model_dir, adapters["b"]))  # evicts a, which a caller still holds
    assert registry.stats().loaded_keys == ["c", "b"]
    got = probs_of(a.classify(TEXTS, top_k=len(LABELS)))
    torch.testing.assert_close(got, expected["a"], atol=1e-5, rtol=1e-4)
    assert a.adapter_name not in c.model.peft_config  # attached for the call only


def test_new_version_reloads_adapter_weights_and_prefix(tiny_model_dir, adapters, expected, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(adapters["a"], served)
    registry = ClassifierRegistry(max_adapters=2, device="cpu")
    v1 = registry.get(ref("m", tiny_model_dir, served, version="1"))
    torch.testing.assert_close(probs_of(v1.classify(TEXTS, top_k=5)), expected["a"], atol=1e-5, rtol=1e-4)

    shutil.rmtree(served)
    shutil.copytree(adapters["b"], served)  # retrained in place
    v2 = registry.get(ref("m", tiny_model_dir, served, version="2"))
    assert v2 is not v1 and registry.stats().loaded_keys == ["m"]
    torch.testing.assert_close(probs_of(v2.classify(TEXTS, top_k=5)), expected["b"], atol=1e-5, rtol=1e-4)


def test_changed_system_prompt_for_same_version_is_not_served_stale(tiny_model_dir, adapters):
    registry = ClassifierRegistry(device="cpu")
    first = registry.get(ref("m", tiny_model_dir, adapters["a"]))
    other_prompt = SYSTEM_PROMPT + "\n只输出一行。"
    second = registry.get(ref("m", tiny_model_dir, adapters["a"], system_prompt=other_prompt))
    assert second is not first and second.ref.system_prompt == other_prompt


def test_concurrent_calls_on_two_adapters_get_their_own_answers(tiny_model_dir, adapters, expected):
    registry = ClassifierRegistry(max_adapters=2, device="cpu")
    classifiers = {name: registry.get(ref(name, tiny_model_dir, adapters[name])) for name in ("a", "b")}
    errors: list[str] = []

    def work(name):
        for _ in range(6):
            got = probs_of(classifiers[name].classify(TEXTS, top_k=len(LABELS), batch_size=1))
            if not torch.allclose(got, expected[name], atol=1e-5, rtol=1e-4):
                errors.append(name)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b", "a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- generate mode ------------------------------------------------------------------------------

SHORT_PROMPT = "判断用户来电意图。"
TRAINED = {"您好请讲[SEP]我要开通流量包": 7, "喂[SEP]帮我交一百块话费": 29}


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter that memorised two answers (a few dozen steps): generation must parse them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    rows = []
    for text, label_id in TRAINED.items():
        prompt = render_prompt_ids(tokenizer, SHORT_PROMPT, text)
        answer = answer_continuation_ids(tokenizer, SHORT_PROMPT, format_answer(label_id, LABELS.name_of(label_id)))
        rows.append((torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(60):
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("trained")
    model.save_pretrained(str(out))
    return out


def test_generate_and_score_agree_on_a_trained_adapter(tiny_model_dir, trained_adapter):
    registry = ClassifierRegistry(device="cpu")
    classifier = registry.get(ref("t", tiny_model_dir, trained_adapter, system_prompt=SHORT_PROMPT))
    texts = list(TRAINED)
    generated = classifier.classify(texts, mode="generate")
    assert [p.intent_id for p in generated] == list(TRAINED.values())
    for p in generated:
        assert p.mode == "generate" and p.confidence is None and p.top_k == []
        assert parse_answer(p.raw_output, LABELS).label_id == p.intent_id
        assert p.label == LABELS.name_of(p.intent_id)
    scored = classifier.classify(texts, mode="score")
    assert [p.intent_id for p in scored] == list(TRAINED.values())
    assert all(p.confidence > 0.9 for p in scored)


def test_unparseable_generations_are_returned_not_dropped(tiny_model_dir):
    """The random base model writes gibberish: every text still gets a prediction with its raw text."""
    classifier = ClassifierRegistry(device="cpu").get(ref("zero", tiny_model_dir, None))
    predictions = classifier.classify(TEXTS, mode="generate", max_new_tokens=8)
    assert len(predictions) == len(TEXTS)
    assert any(p.intent_id is None for p in predictions)
    for p in predictions:
        assert isinstance(p.raw_output, str)
        assert p.intent_id == parse_answer(p.raw_output, LABELS).label_id
        if p.intent_id is None:
            assert p.label is None


def test_batched_generation_equals_one_at_a_time(tiny_model_dir, adapters):
    from peft import PeftModel

    from app.ml.models.loading import load_base_model

    loaded = load_base_model(tiny_model_dir, quantization="none", device="cpu")
    model = PeftModel.from_pretrained(loaded.model, str(adapters["a"])).eval()
    args = (model, loaded.tokenizer, SYSTEM_PROMPT, LABELS)
    batched = generate_answers(*args, TEXTS, max_new_tokens=10, batch_size=3)
    single = [generate_answers(*args, [t], max_new_tokens=10)[0] for t in TEXTS]
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(a.new_tokens <= 10 for a in batched)


def test_model_ref_coerces_paths(tiny_model_dir):
    r = ModelRef("k", "1", str(tiny_model_dir), str(tiny_model_dir), SYSTEM_PROMPT, LABELS)
    assert r == ModelRef("k", "1", tiny_model_dir, tiny_model_dir, SYSTEM_PROMPT, LABELS)

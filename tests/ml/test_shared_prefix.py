"""The shared-prefix loss equals the naive full-batch loss, and so do the LoRA gradients.

Ground truth is transformers' own ``model(input_ids, attention_mask, labels).loss`` on the
right-padded naive batch. fp32, lora_dropout=0, suffixes of different lengths.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from app.domain.cmcc34 import CMCC34_LABEL_SET
from app.data.sample import generate_sample_dialogues
from app.ml.text.encoding import ChatCollator, encode_dataset
from app.ml.models.loading import load_base_model
from app.domain.prompt import build_system_prompt, format_answer
from app.ml.train.shared_prefix import naive_loss, shared_prefix_loss, supports_shared_prefix

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = generate_sample_dialogues(per_label=1, seed=3)[:3]
    encoded = encode_dataset(
        tokenizer, build_system_prompt(CMCC34_LABEL_SET),
        [(r.dialogue, format_answer(r.label_id, CMCC34_LABEL_SET.name_of(r.label_id))) for r in rows],
        max_input_length=2048, max_output_length=32,
    )
    features = [{"input_ids": s.input_ids, "labels": s.labels} for s in encoded.samples]
    assert len({len(f["input_ids"]) for f in features}) == 3  # right padding really happens
    naive = ChatCollator(tokenizer.pad_token_id)(features)
    shared = ChatCollator(tokenizer.pad_token_id, prefix_length=len(encoded.prefix_ids))(features)
    return naive, shared


def _lora_model(base, seed: int = 0):
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at 0, which would leave lora_A without gradient
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    return model


def _loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(reference, candidate, *, atol=1e-5):
    (ref_loss, ref_grads), (loss, grads) = reference, candidate
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=atol)
    assert ref_grads.keys() == grads.keys()
    scale = max(g.abs().max() for g in ref_grads.values())
    assert scale > 0
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=atol * scale, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_matches_naive_loss_and_lora_gradients(tiny_model_dir, batches, attn, checkpointing):
    naive, shared = batches
    loaded = load_base_model(tiny_model_dir, quantization="none", for_training=True,
                             gradient_checkpointing=checkpointing, attn_implementation=attn)
    model = _lora_model(loaded.model)
    assert supports_shared_prefix(model)

    reference = _loss_and_grads(model, lambda: model(**naive).loss)
    _assert_same(reference, _loss_and_grads(model, lambda: naive_loss(model, **naive)))
    _assert_same(reference, _loss_and_grads(model, lambda: shared_prefix_loss(model, **shared)))
    # The prefix really got gradient through its keys/values: k_proj of layer 0 only sees the
    # prefix and the suffix tokens, and its gradient matches (checked above) and is not zero.
    k0 = next(g for n, g in reference[1].items() if "layers.0.self_attn.k_proj.lora_A" in n)
    assert k0.abs().sum() > 0
    # The checkpointing switch is put back after the call.
    assert all("_can_checkpoint_with_cache" not in layer.__dict__ for layer in loaded.model.model.layers)


def test_num_items_in_batch_normalises_like_transformers(tiny_model_dir, batches):
    naive, shared = batches
    model = _lora_model(load_base_model(tiny_model_dir, quantization="none", for_training=True).model)
    items = torch.tensor(1000)
    reference = model(**naive, num_items_in_batch=items).loss
    torch.testing.assert_close(shared_prefix_loss(model, **shared, num_items_in_batch=items), reference)
    torch.testing.assert_close(naive_loss(model, **naive, num_items_in_batch=items), reference)


def test_shared_prefix_on_a_4bit_base(tiny_model_dir, batches):
    naive, shared = batches
    loaded = load_base_model(tiny_model_dir, quantization="4bit", for_training=True)
    model = _lora_model(loaded.model)
    assert supports_shared_prefix(model)
    _assert_same(_loss_and_grads(model, lambda: model(**naive).loss),
                 _loss_and_grads(model, lambda: shared_prefix_loss(model, **shared)), atol=1e-4)


def _random_causal_lm(config_class, model_class, **overrides):
    config = config_class(
        vocab_size=1300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, **overrides,
    )
    torch.manual_seed(0)
    return model_class(config)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_other_architectures_match_too(batches, family):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    base = _random_causal_lm(*classes[family])
    base.requires_grad_(False)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = _lora_model(base)
    naive, shared = batches
    assert supports_shared_prefix(model)
    _assert_same(_loss_and_grads(model, lambda: model(**naive).loss),
                 _loss_and_grads(model, lambda: shared_prefix_loss(model, **shared)))


def test_unsupported_models_fall_back(tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    sliding = _random_causal_lm(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=64,
                                max_window_layers=0)
    assert not supports_shared_prefix(sliding)
    assert not supports_shared_prefix(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))

    reentrant = load_base_model(tiny_model_dir, quantization="none", for_training=True).model
    reentrant.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert not supports_shared_prefix(reentrant)
    eager = load_base_model(tiny_model_dir, quantization="none", attn_implementation="eager").model
    assert supports_shared_prefix(eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_prefix_on_cuda_with_a_4bit_base_in_bf16_autocast(tiny_model_dir, batches):
    """The production setting (QLoRA, bf16 compute): equal up to bf16 rounding."""
    naive, shared = ({k: v.cuda() for k, v in batch.items()} for batch in batches)
    loaded = load_base_model(tiny_model_dir, quantization="4bit", for_training=True, device="cuda",
                             gradient_checkpointing=True)
    model = _lora_model(loaded.model)
    assert supports_shared_prefix(model)
    with torch.autocast("cuda", dtype=loaded.dtype):
        ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**naive).loss)
        loss, grads = _loss_and_grads(model, lambda: shared_prefix_loss(model, **shared))
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=2e-2, atol=2e-2)
    for name, ref in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(ref.flatten().float(), grads[name].flatten().float(), dim=0)
        assert cosine > 0.98, name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_suffixes_match_naive_loss_and_lora_gradients(tiny_model_dir, batches, attn, checkpointing):
    """The suffixes packed into one row without padding (block mask, per-suffix positions) compute the same
    loss and gradients as the padded batch."""
    naive, shared = batches
    loaded = load_base_model(tiny_model_dir, quantization="none", for_training=True,
                             gradient_checkpointing=checkpointing, attn_implementation=attn)
    model = _lora_model(loaded.model)
    reference = _loss_and_grads(model, lambda: model(**naive).loss)
    _assert_same(reference, _loss_and_grads(model, lambda: shared_prefix_loss(model, **shared, pack=True)))
    _assert_same(reference, _loss_and_grads(model, lambda: shared_prefix_loss(model, **shared, pack=False)))


def test_suffixes_pack_into_fewer_rows_never_longer_than_the_longest():
    from app.ml.train.shared_prefix import pack_rows

    lengths = [350, 150, 200, 190, 120, 90, 340, 60]
    rows = pack_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in row) for row in rows) == max(lengths)
    assert len(rows) == 5 and rows[0] == [0]  # 1500 tokens in 5 rows of at most 350, not 8 padded ones
    assert pack_rows([7, 7, 7]) == [[0], [1], [2]]  # equal lengths: the padded batch itself

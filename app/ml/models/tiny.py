"""A tiny, randomly initialised GLM-4 model with its own tokenizer, built locally in seconds.

It has the real GLM-4-0414 architecture (``Glm4ForCausalLM``, LoRA targets q/k/v/o_proj) and a
GLM-4 style chat template, so tests and plumbing checks run the same code paths as production
without any download. It knows nothing: tests on it check mechanics, never accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

# GLM-4-0414 renders a conversation as [gMASK]<sop><|system|>\n…<|user|>\n…<|assistant|>\n…
# and ends an answer with <|user|> (the next turn) or <|endoftext|>.
SPECIAL_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<pad>"]
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n{%- endif -%}"
)
TINY_MODEL_NAME = "tiny-glm4"
_BUILD_MARKER = "intent_tuner_tiny.json"


def _training_corpus() -> list[str]:
    """Text the tokenizer learns merges from: the CMCC prompt and call-centre vocabulary."""
    from app.domain.cmcc34 import CMCC34_LABEL_SET
    from app.data.sample import generate_sample_dialogues
    from app.domain.prompt import build_system_prompt, format_answer

    corpus = [build_system_prompt(CMCC34_LABEL_SET)]
    corpus += [format_answer(lab.id, lab.name) for lab in CMCC34_LABEL_SET]
    corpus += [row.dialogue for row in generate_sample_dialogues(per_label=6, seed=7)]
    return corpus


def build_tiny_tokenizer(vocab_size: int = 1200):
    """Byte-level BPE (any text encodes) trained on call-centre text, with a GLM-4 chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[1:6],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    torch.manual_seed(seed)
    config = Glm4Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=4096,
        # A larger init than the default keeps a random output layer from capping the loss,
        # so LoRA on the attention projections can visibly move it.
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")],
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return Glm4ForCausalLM(config)


def ensure_tiny_model(directory: Path) -> Path:
    """Build (once) and save the tiny model + tokenizer as a plain transformers folder."""
    directory = Path(directory)
    if (directory / _BUILD_MARKER).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / _BUILD_MARKER).write_text(json.dumps({"name": TINY_MODEL_NAME}), encoding="utf-8")
    return directory

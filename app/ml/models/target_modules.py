"""Which LoRA ``target_modules`` a base model has, known without loading its weights.

peft matches a target name against every module name, exactly or as a dotted suffix
(``q_proj`` matches ``model.layers.0.self_attn.q_proj``). A LoRA layer needs a weight matrix, so the
candidates are the modules with a 2-D weight: read from the safetensors headers of a model folder
(no tensor is read), or, for a registered architecture not prepared yet, from the table below
(checked against the real modules of each architecture by ``tests/reliability``).
"""

from __future__ import annotations

import json
from pathlib import Path

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_HEADS = ("lm_head", "embed_tokens")
# Leaf names of the modules with a weight matrix, per architecture of the built-in base models.
KNOWN_MATRIX_MODULES: dict[str, frozenset[str]] = {
    "Qwen2ForCausalLM": frozenset(_ATTENTION + ("gate_proj", "up_proj", "down_proj") + _HEADS),
    "LlamaForCausalLM": frozenset(_ATTENTION + ("gate_proj", "up_proj", "down_proj") + _HEADS),
    "Gemma3ForCausalLM": frozenset(_ATTENTION + ("gate_proj", "up_proj", "down_proj") + _HEADS),
    "Glm4ForCausalLM": frozenset(_ATTENTION + ("gate_up_proj", "down_proj") + _HEADS),
}


def matrix_module_names(model_dir: Path) -> set[str] | None:
    """Full names of the modules with a 2-D weight in ``model_dir``'s safetensors; None without any."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [model_dir / shard for shard in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="np") as weights:
            for key in weights.keys():
                if key.endswith(".weight") and len(weights.get_slice(key).get_shape()) == 2:
                    names.add(key.removesuffix(".weight"))
    return names


def unknown_target_modules(targets: list[str], module_names: set[str]) -> list[str]:
    """The targets that match no module of ``module_names`` the way peft matches them."""
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in module_names)]


def unknown_for_architecture(targets: list[str], architecture: str) -> list[str] | None:
    """Targets whose last name part is no matrix module of ``architecture``; None for an unknown architecture."""
    known = KNOWN_MATRIX_MODULES.get(architecture)
    if known is None:
        return None
    return [t for t in targets if t.rsplit(".", 1)[-1] not in known]


def describe(module_names: set[str] | frozenset[str]) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in module_names})
    return ", ".join(leaves)

"""Training recipes (``configs/*.yaml``) as the job form shows them: name, base model, hyperparameters."""

from __future__ import annotations

from app.core.config import Settings
from app.ml.train.config import available_configs, default_config_name, resolve_training_config


def list_recipes(settings: Settings) -> list[dict]:
    default = default_config_name(settings)
    recipes = []
    for name in available_configs():
        config, base_model = resolve_training_config(name, None)
        recipes.append({"name": name, "base_model": base_model, "default": name == default,
                        "hyperparameters": config.model_dump()})
    return recipes

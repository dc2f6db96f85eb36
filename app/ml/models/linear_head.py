"""A linear classification head on a frozen base model's hidden states (``TrainingConfig.head = "linear"``).

Why it exists: on a 2-core CPU a LoRA adapter on the 0.5B embedded model does not learn 34 intents from a
few hundred dialogues within minutes (docs/benchmarks.md §5), while one forward per dialogue through the
frozen model and a logistic regression on its hidden states does. The head reads the features
``LabelScorer.features`` computes (the final hidden state averaged over the dialogue's tokens, read after
the shared system prompt): training and serving run that same code, so they see the same numbers.

The file holds the standardisation (mean, scale) and the weights in label order; ``log_probs`` gives
``log P(label | dialogue)`` over the label set, so everything downstream of scoring (confidence, top-k,
reports, calibration) is the same as for label scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

LINEAR_HEAD_FILENAME = "linear_head.safetensors"
HEADS = ("lm", "linear")


@dataclass
class LinearHead:
    label_ids: list[int]  # row order of ``weight`` / ``bias``
    mean: torch.Tensor  # [hidden]: features are standardised first
    scale: torch.Tensor  # [hidden]
    weight: torch.Tensor  # [n_labels, hidden]
    bias: torch.Tensor  # [n_labels]
    pooling: str = "mean"  # how a dialogue's hidden states become one vector (LabelScorer.features)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """``log P(label | dialogue)`` for each row of ``features`` [n, hidden]: a float32 [n, n_labels] tensor."""
        x = (features.float() - self.mean) / self.scale
        return torch.log_softmax(x @ self.weight.T + self.bias, dim=-1)

    def predict_ids(self, features: torch.Tensor) -> list[int]:
        """The most probable label id for each row of ``features``."""
        return [self.label_ids[int(i)] for i in self.log_probs(features).argmax(-1).tolist()]

    def aligned(self, label_ids: list[int]) -> "LinearHead":
        """The head with its rows in ``label_ids`` order (a label set's); every label must be one of the head's."""
        if list(label_ids) == self.label_ids:
            return self
        missing = sorted(set(label_ids) - set(self.label_ids))
        if missing or len(label_ids) != len(self.label_ids):
            raise ValueError(f"the linear head was trained on labels {self.label_ids}, not {list(label_ids)}")
        order = torch.tensor([self.label_ids.index(i) for i in label_ids])
        return LinearHead(list(label_ids), self.mean, self.scale, self.weight[order], self.bias[order], self.pooling)

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / LINEAR_HEAD_FILENAME
        tensors = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"label_ids": json.dumps(self.label_ids), "pooling": self.pooling})
        return path

    @classmethod
    def load(cls, directory: Path) -> "LinearHead":
        from safetensors import safe_open

        path = Path(directory) / LINEAR_HEAD_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {LINEAR_HEAD_FILENAME} in {directory}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("mean", "scale", "weight", "bias")}
        return cls(json.loads(meta["label_ids"]), pooling=meta.get("pooling", "mean"), **tensors)

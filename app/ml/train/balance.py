"""Class balance for training: how often each intent is drawn (``TrainingConfig.class_balance``).

Why sampling and not loss weights: the loss (``app.ml.train.shared_prefix``) sums token losses and
divides by the token count of the whole accumulated batch; per-class loss weights would have to be
threaded through both loss paths (shared prefix and naive) and would change what the logged loss means,
so a balanced run's loss curve could not be set beside an unbalanced one. Weighted sampling leaves the
loss, the collator and the shared-prefix path untouched: it only changes which rows a batch holds.
Every step then carries signal for the rare intents (a loss weight on a class that is absent from most
batches changes nothing in those batches), at the price of repeating rare rows (drawn with replacement).

- ``none``: every row once per epoch in random order (the Trainer's own sampler);
- ``sqrt``: a row of class c is drawn with weight 1/sqrt(n_c), so class c gets a share proportional to
  sqrt(n_c): rare classes are seen more often without flattening the prior completely;
- ``balanced``: weight 1/n_c, every class equally often (what scikit-learn's ``class_weight="balanced"``
  does for the TF-IDF baseline, as sampling).

An epoch keeps its length (as many draws as rows). The draws of an epoch depend on the seed and the
epoch only, so a run resumed from a checkpoint draws the same rows as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

MODES = ("none", "sqrt", "balanced")


def sample_weights(label_ids: Sequence[int], mode: str) -> list[float]:
    """Per-row sampling weight for ``mode`` (not normalised); ``none`` weighs every row 1."""
    if mode not in MODES:
        raise ValueError(f"unknown class_balance '{mode}' (use one of {MODES})")
    counts = Counter(label_ids)
    if mode == "none":
        return [1.0] * len(label_ids)
    if mode == "sqrt":
        return [1.0 / math.sqrt(counts[label]) for label in label_ids]
    return [1.0 / counts[label] for label in label_ids]


def class_shares(label_ids: Sequence[int], mode: str) -> dict[int, float]:
    """The expected share of the draws each class gets under ``mode`` (sums to 1)."""
    weights = sample_weights(label_ids, mode)
    total = sum(weights)
    shares: dict[int, float] = {}
    for label, weight in zip(label_ids, weights):
        shares[label] = shares.get(label, 0.0) + weight / total
    return dict(sorted(shares.items()))


class ClassBalancedSampler(torch.utils.data.Sampler[int]):
    """Draws ``len(weights)`` row indices per epoch with replacement, proportionally to ``weights``.

    ``set_epoch`` (called by the Trainer / accelerate before every epoch) reseeds the draws with
    ``seed + epoch``: each epoch differs, and a resumed run repeats the uninterrupted run's draws.
    """

    def __init__(self, weights: Sequence[float], seed: int):
        if not weights:
            raise ValueError("no rows to sample")
        self.weights = torch.as_tensor(list(weights), dtype=torch.double)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator)
        return iter(drawn.tolist())

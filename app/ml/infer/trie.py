"""The token trie of a label set's answers: which tokens decide a label, and which positions must run.

Every answer ``意图：{id}：{label}`` starts with tokens all labels share (``意图：``); after them the
answers fork. A label is decided by its *distinguishing prefix*: the shortest run of its answer
tokens (after the shared ones) that no other label's answer starts with. On Qwen, whose digits are
single tokens, CMCC-34's ids 0..33 give ``0``, ``1：``, ``10``, ..., ``4``..``9``, ``30``..``33``:
only the nodes ``1``, ``2`` and ``3`` branch below the root, so three tokens run per text, where
scoring every full answer runs ~317.

What a label's probability is: the marginal that decoding constrained to the label set samples
from. At every node a constrained decoder may only emit one of the node's children, so it samples
from the model's next-token distribution renormalised over them; a label's probability is the
product of those renormalised probabilities along its distinguishing prefix (the shared tokens and
every non-branching step are forced: probability 1). These sum to exactly 1 over the labels, and a
greedy or sampled constrained decoder agrees with them node by node. Every later token of an answer
is determined by the label set, so the model's belief about those tokens is left out on purpose
(full-answer scoring, ``app.ml.infer.scoring``'s ``answers="full"``, keeps it).

Built once per (tokenizer, system prompt, label set) through ``LabelCandidates``; pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelTrie:
    """The labels' distinguishing prefixes and the trie nodes that must run to score them.

    - ``prefixes[i]``: label i's distinguishing prefix (token ids after the shared tokens, >= 1).
    - ``nodes``: the inner nodes below the root, as token paths, parents before children; each
      runs as one token whose attention sees the context and its own ancestors.
    - ``parent[n]``: index of node n's parent in ``nodes`` (-1: the root, i.e. the context).
    - ``steps``: (node index or -1 for the root, target token, label index): label i's constrained
      log-probability is the sum over its steps of log P(target | node) renormalised over ``allowed``.
    - ``allowed[n + 1]``: the tokens a constrained decoder may emit at node n (``allowed[0]``: the root).
    """

    prefixes: tuple[tuple[int, ...], ...]
    nodes: tuple[tuple[int, ...], ...]
    parent: tuple[int, ...]
    steps: tuple[tuple[int, int, int], ...]
    allowed: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, remaining: tuple[tuple[int, ...], ...] | list[list[int]]) -> "LabelTrie":
        """From each label's answer tokens after the tokens all labels share (``LabelCandidates.remaining``)."""
        sequences = [tuple(seq) for seq in remaining]
        if len(set(sequences)) != len(sequences):
            raise ValueError("two labels render to the same answer tokens")
        prefixes = []
        for i, seq in enumerate(sequences):
            others = [other for j, other in enumerate(sequences) if j != i]
            length = next((k for k in range(1, len(seq) + 1)
                           if not any(other[:k] == seq[:k] for other in others)), None)
            if length is None:
                raise ValueError(f"label {i}'s answer is the start of another label's answer")
            prefixes.append(seq[:length])
        inner = sorted({p[:k] for p in prefixes for k in range(1, len(p))}, key=lambda path: (len(path), path))
        index = {path: n for n, path in enumerate(inner)}
        parent = tuple(index[path[:-1]] if len(path) > 1 else -1 for path in inner)
        steps = tuple(
            (index[p[:k]] if k else -1, p[k], label) for label, p in enumerate(prefixes) for k in range(len(p))
        )
        allowed = [sorted({p[0] for p in prefixes})]
        for path in inner:
            allowed.append(sorted({p[len(path)] for p in prefixes if p[: len(path)] == path}))
        return cls(tuple(prefixes), tuple(inner), parent, steps, tuple(tuple(a) for a in allowed))

    def constrained_log_probs(self, node_log_probs: dict[int, dict[int, float]]) -> list[float]:
        """log P(label) for every label under decoding constrained to the label set.

        ``node_log_probs[n]`` maps each token in ``allowed[n + 1]`` to the model's log-probability of it
        at node n (-1: the root), for every branching node; forced steps need nothing. The result's
        ``exp`` sums to 1."""
        renormalised: dict[int, dict[int, float]] = {}
        for node in self.branching_nodes():
            logp = node_log_probs[node]
            top = max(logp[token] for token in self.allowed[node + 1])
            log_z = top + math.log(sum(math.exp(logp[token] - top) for token in self.allowed[node + 1]))
            renormalised[node] = {token: logp[token] - log_z for token in self.allowed[node + 1]}
        out = [0.0] * len(self.prefixes)
        for node, target, label in self.steps:
            if node in renormalised:
                out[label] += renormalised[node][target]
        return out

    def label_log_probs(self, node_log_probs):
        """``constrained_log_probs`` for a batch: ``node_log_probs(n)`` is the model's next-token
        log-distribution at node n as a [batch, vocab] tensor; returns a float32 [batch, n_labels] tensor."""
        import torch

        gathered = {}
        for node in self.branching_nodes():
            allowed = self.allowed[node + 1]
            logp = node_log_probs(node)
            values = logp[:, torch.tensor(allowed, device=logp.device)].float().cpu().tolist()
            gathered[node] = [dict(zip(allowed, row)) for row in values]
        batch = len(next(iter(gathered.values()))) if gathered else node_log_probs(-1).shape[0]
        rows = [self.constrained_log_probs({node: per_text[b] for node, per_text in gathered.items()})
                for b in range(batch)]
        return torch.tensor(rows, dtype=torch.float32).reshape(batch, len(self.prefixes))

    def branching_nodes(self) -> list[int]:
        """Nodes (-1: the root) where a constrained decoder has a choice: the only ones whose
        next-token distribution matters."""
        return [node for node in range(-1, len(self.nodes)) if len(self.allowed[node + 1]) >= 2]

    def depth(self, node: int) -> int:
        """Tokens after the context up to and including node ``node`` (a root child has depth 1)."""
        return len(self.nodes[node])

    def is_ancestor_or_self(self, ancestor: int, node: int) -> bool:
        a, n = self.nodes[ancestor], self.nodes[node]
        return len(a) <= len(n) and n[: len(a)] == a

    def label_of(self, answer_tokens: list[int] | tuple[int, ...]) -> int | None:
        """The label whose distinguishing prefix ``answer_tokens`` (after the shared tokens) starts with."""
        for label, prefix in enumerate(self.prefixes):
            if tuple(answer_tokens[: len(prefix)]) == prefix:
                return label
        return None

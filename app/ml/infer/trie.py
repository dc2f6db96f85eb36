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

    def label_log_probs(self, node_log_probs):
        """log P(label) under decoding constrained to the label set, for a batch: ``node_log_probs(n)``
        is the model's next-token log-distribution at node n (-1: the root) as a [batch, vocab] tensor;
        the result is [batch, n_labels] and ``exp`` of each row sums to 1."""
        import torch

        renormalised = {}
        for node in range(-1, len(self.nodes)):
            allowed = self.allowed[node + 1]
            if len(allowed) < 2:
                continue  # a forced step: log 1
            logp = node_log_probs(node)
            index = torch.tensor(allowed, device=logp.device)
            picked = logp[:, index].float()
            renormalised[node] = (dict(zip(allowed, range(len(allowed)))), picked - torch.logsumexp(picked, -1, keepdim=True))
        batch = next(iter(renormalised.values()))[1].shape[0] if renormalised else None
        if batch is None:  # one label: certain
            logp = node_log_probs(-1)
            return torch.zeros((logp.shape[0], len(self.prefixes)), dtype=torch.float32, device=logp.device)
        out = torch.zeros((batch, len(self.prefixes)), dtype=torch.float32, device=next(iter(renormalised.values()))[1].device)
        for node, target, label in self.steps:
            if node in renormalised:
                column, values = renormalised[node]
                out[:, label] += values[:, column[target]]
        return out

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

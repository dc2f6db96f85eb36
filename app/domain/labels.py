"""The intents a model knows: ids and names, ordered by id."""

from __future__ import annotations

from dataclasses import dataclass

# Label ids are small integers in practice; bounded so every store and tensor downstream can hold them.
MAX_LABEL_ID = 2**31 - 1


@dataclass(frozen=True)
class Label:
    id: int
    name: str


@dataclass(frozen=True)
class LabelSet:
    """The intents a model knows, ordered by id. Defines the prompt and the answers."""

    labels: tuple[Label, ...]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, str]] | list[list]) -> "LabelSet":
        labels = tuple(sorted((Label(int(i), str(n)) for i, n in pairs), key=lambda lab: lab.id))
        ids = [lab.id for lab in labels]
        if len(set(ids)) != len(ids):
            raise ValueError("label ids must be unique")
        return cls(labels)

    def to_pairs(self) -> list[list]:
        return [[lab.id, lab.name] for lab in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(self.labels)

    @property
    def ids(self) -> list[int]:
        return [lab.id for lab in self.labels]

    def name_of(self, label_id: int) -> str:
        for lab in self.labels:
            if lab.id == label_id:
                return lab.name
        raise KeyError(label_id)

    def id_of(self, name: str) -> int | None:
        for lab in self.labels:
            if lab.name == name:
                return lab.id
        return None

"""What a job asks of the worker that runs it (``POST /jobs`` ``resources``), and worker labels.

A worker has labels (``WORKER_LABELS=gpu,a100``); a job may require some (``resources.labels``); a worker
claims only jobs whose labels it has all of. Both sides are stored as one canonical string (sorted,
comma-joined, "" for none), so a claim is ``required_labels IN (every subset of the worker's labels)``:
one indexed comparison on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import re
from itertools import combinations
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

LABEL_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,31}$"
MAX_LABELS = 8  # a worker's subsets: 2**8 = 256 strings in one IN (...)
MAX_PROCESSES = 64

WorkerLabel = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]


class JobResources(BaseModel):
    """Where and how wide a training job runs. Omitted fields: the worker's defaults."""

    model_config = ConfigDict(extra="forbid")

    gpus: int | None = Field(
        None, ge=1, le=MAX_PROCESSES,
        description="GPUs to train on, one process each under torchrun (DDP). Default: every GPU the worker "
                    "sees. A worker that sees fewer fails the job; route such jobs with labels.")
    processes: int | None = Field(
        None, ge=1, le=MAX_PROCESSES,
        description="Training processes on a worker without a GPU (DDP over gloo; for tests and checks). "
                    "Default 1.")
    labels: list[WorkerLabel] = Field(
        default_factory=list, max_length=MAX_LABELS,
        description="Only a worker that has all these labels (WORKER_LABELS) runs the job, e.g. [\"gpu\"].")

    @model_validator(mode="after")
    def _one_width(self):
        if self.gpus is not None and self.processes is not None:
            raise ValueError("give gpus (a GPU worker) or processes (a CPU worker), not both")
        return self


def canonical_labels(labels) -> str:
    return ",".join(sorted(set(labels)))


def parse_labels(text: str) -> str:
    """``"gpu, A100"`` → ``"a100,gpu"``; raises ValueError naming a label that is not one."""
    labels = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [label for label in labels if not re.match(LABEL_PATTERN, label)]
    if bad:
        raise ValueError(f"labels {bad} are not labels: lowercase letters, digits, '_', '.', '-', at most 32 "
                         "characters, starting with a letter or digit")
    if len(set(labels)) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(set(labels))}")
    return canonical_labels(labels)


def claimable_label_sets(worker_labels: str) -> list[str]:
    """The canonical label strings of every job a worker with ``worker_labels`` may run (its subsets)."""
    labels = [label for label in parse_labels(worker_labels).split(",") if label]
    return [",".join(subset) for size in range(len(labels) + 1) for subset in combinations(sorted(labels), size)]

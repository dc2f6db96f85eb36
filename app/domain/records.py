"""One labelled dialogue: what uploads are parsed into and what training and evaluation consume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Record:
    dialogue: str  # turns joined by [SEP]
    label_id: int

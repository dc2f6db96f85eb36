"""Dataset uploads: validate, store under a generated id, record statistics; read records back.

A stored dataset is a folder ``DATA_DIR/datasets/<id>/`` with the original upload and
``records.jsonl`` (dialogue + label id per line). The shared system prompt lives once in the
database row. A rejected upload leaves neither a row nor a file behind.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.data.formats import DatasetFormatError, ParsedDataset, Record, parse_dataset
from app.domain.prompt import LabelSet, build_system_prompt
from app.models import Dataset, Job, new_id
from app.services import token_stats
from app.services.errors import ConflictError, NotFoundError, PayloadTooLargeError, UnprocessableError
from app.services.rows import get_row

RECORDS_FILE = "records.jsonl"


def create_dataset(session: Session, settings: Settings, raw: bytes, filename: str | None, name: str | None) -> Dataset:
    if len(raw) > settings.max_upload_bytes:
        raise PayloadTooLargeError(
            f"file is {len(raw)} bytes, over the limit of {settings.max_upload_bytes} bytes (MAX_UPLOAD_BYTES)"
        )
    try:
        parsed = parse_dataset(raw, filename)
    except DatasetFormatError as exc:
        raise UnprocessableError(str(exc), row=exc.row, field=exc.field) from None

    system_prompt = build_system_prompt(parsed.label_set)
    dataset_id = new_id("ds")
    final_dir = settings.datasets_dir / dataset_id
    staging = settings.datasets_dir / f".{dataset_id}.partial"
    staging.mkdir(parents=True, exist_ok=False)
    try:
        suffix = Path(filename or "").suffix.lower()
        if suffix not in {".csv", ".jsonl", ".json", ".tsv", ".txt"}:
            suffix = ".jsonl" if parsed.format == "chat_jsonl" else ".csv"
        (staging / f"original{suffix}").write_bytes(raw)
        _write_records(staging / RECORDS_FILE, parsed.records)
        dataset = Dataset(
            id=dataset_id,
            name=(name or Path(filename or dataset_id).stem)[:200],
            original_filename=Path(filename).name[:300] if filename else None,
            format=parsed.format,
            chat_style=parsed.chat_style,
            n_rows=len(parsed.records),
            label_set=parsed.label_set.to_pairs(),
            label_counts={str(k): v for k, v in parsed.label_counts.items()},
            stats=dataset_stats(parsed, system_prompt, settings),
            system_prompt=system_prompt,
            size_bytes=len(raw),
        )
        session.add(dataset)
        session.flush()
        staging.rename(final_dir)
        session.commit()
    except BaseException:
        session.rollback()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final_dir, ignore_errors=True)
        raise
    return dataset


def remove_stale_staging(settings: Settings, older_than_seconds: float = 3600) -> list[str]:
    """Delete upload staging folders left by a process killed mid-upload (another process's upload in
    flight is younger than ``older_than_seconds`` and kept)."""
    cutoff = time.time() - older_than_seconds
    removed = []
    for folder in settings.datasets_dir.glob(".*.partial"):
        if folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _write_records(path: Path, records: list[Record]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({"dialogue": record.dialogue, "label_id": record.label_id}, ensure_ascii=False))
            out.write("\n")


def dataset_stats(parsed: ParsedDataset, system_prompt: str, settings: Settings) -> dict:
    counts = [c for c in parsed.label_counts.values()]
    present = [c for c in counts if c > 0]
    stats: dict = {
        "n_labels": len(parsed.label_set),
        "imbalance": {
            "min_per_class": min(counts),
            "max_per_class": max(counts),
            "ratio_max_min": round(max(present) / min(present), 3),
            "classes_without_rows": [lab.id for lab in parsed.label_set if parsed.label_counts[lab.id] == 0],
        },
        "chars": {
            "system_prompt": len(system_prompt),
            "dialogue_mean": round(statistics.fmean(len(r.dialogue) for r in parsed.records), 1),
            "dialogue_max": max(len(r.dialogue) for r in parsed.records),
        },
    }
    stats["tokens"] = token_stats.token_figures(parsed.records, system_prompt, parsed.label_set, settings)
    return stats


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.created_at.desc())))


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    return get_row(session, Dataset, dataset_id, "dataset")


def delete_dataset(session: Session, settings: Settings, dataset_id: str) -> None:
    """Delete a dataset no job uses. The check and the delete are one statement: a job created meanwhile
    either is seen (409) or, where the database checks keys only then, fails the delete's key check (409)."""
    get_dataset(session, dataset_id)
    users = select(Job.id).where((Job.dataset_id == dataset_id) | (Job.validation_dataset_id == dataset_id))
    try:
        deleted = session.execute(delete(Dataset).where(Dataset.id == dataset_id, ~users.exists())).rowcount
        session.commit()
    except IntegrityError:
        session.rollback()
        deleted = 0
    if not deleted:
        user = session.scalar(users.limit(1))
        if user is None:
            raise NotFoundError(f"dataset '{dataset_id}' not found (deleted by another request)")
        raise ConflictError(f"dataset '{dataset_id}' is used by job '{user}'; delete is refused")
    shutil.rmtree(settings.datasets_dir / dataset_id, ignore_errors=True)


def load_records(settings: Settings, dataset_id: str) -> list[Record]:
    path = settings.datasets_dir / dataset_id / RECORDS_FILE
    with path.open(encoding="utf-8") as lines:
        return [Record(**json.loads(line)) for line in lines if line.strip()]


def label_set_of(dataset: Dataset) -> LabelSet:
    return LabelSet.from_pairs(dataset.label_set)

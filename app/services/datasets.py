"""Dataset uploads: validate, store under a generated id, record statistics; read records back.

A stored dataset is a folder ``DATA_DIR/datasets/<id>/`` with the original upload and
``records.jsonl`` (dialogue + label id per line). The shared system prompt lives once in the
database row. A rejected upload leaves neither a row nor a file behind.

An upload is written into a staging folder ``.<id>.partial`` and renamed into place once its row is
flushed. While it is written, its process holds the file lock ``.<id>.partial.lock`` beside it (an OS
lock, released by the kernel when the process dies): a staging folder whose lock can be taken belongs to
no live process and is removed at start-up.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.data.formats import DatasetFormatError, ParsedDataset, parse_dataset
from app.domain.labels import LabelSet
from app.domain.prompt import build_system_prompt
from app.domain.records import Record
from app.models import Dataset, Job, new_id
from app.services import token_stats
from app.services.errors import (
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    UnprocessableError,
)
from app.services.rows import get_row

RECORDS_FILE = "records.jsonl"


def create_dataset(session: Session, settings: Settings, raw: bytes, filename: str | None, name: str | None) -> Dataset:
    if len(raw) > settings.max_upload_bytes:
        raise PayloadTooLargeError(
            f"file is {len(raw)} bytes, over the limit of {settings.max_upload_bytes} bytes (MAX_UPLOAD_BYTES)"
        )
    given_name = _dataset_name(name)
    try:
        parsed = parse_dataset(raw, filename)
    except DatasetFormatError as exc:
        raise UnprocessableError(str(exc), row=exc.row, field=exc.field) from None

    system_prompt = build_system_prompt(parsed.label_set)
    dataset_id = new_id("ds")
    display_name = given_name or _visible(Path(filename or "").stem)[:MAX_DATASET_NAME_CHARS] or dataset_id
    final_dir = settings.datasets_dir / dataset_id
    staging = settings.datasets_dir / f".{dataset_id}.partial"
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    with _owning(staging):  # taken before the folder exists: a staging folder is never without its owner
        staging.mkdir()
        try:
            suffix = Path(filename or "").suffix.lower()
            if suffix not in {".csv", ".jsonl", ".json", ".tsv", ".txt"}:
                suffix = ".jsonl" if parsed.format == "chat_jsonl" else ".csv"
            (staging / f"original{suffix}").write_bytes(raw)
            _write_records(staging / RECORDS_FILE, parsed.records)
            dataset = Dataset(
                id=dataset_id,
                name=display_name,
                original_filename=(_visible(Path(filename).name)[:300] or None) if filename else None,
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


MAX_DATASET_NAME_CHARS = 200
_WHITESPACE_RUN_RE = re.compile(r"\s+")


def _visible(text: str) -> str:
    """One line of visible text: whitespace runs become one space, control and invisible characters go."""
    text = _WHITESPACE_RUN_RE.sub(" ", text)
    return "".join(c for c in text if not unicodedata.category(c).startswith("C")).strip()


def _dataset_name(name: str | None) -> str | None:
    """The ``name`` form field: one line of visible text (shown in listings), else a 422 naming it."""
    if name is None:
        return None
    cleaned = _WHITESPACE_RUN_RE.sub(" ", name).strip()
    bad = next((c for c in cleaned if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise UnprocessableError(f"the name holds the control or invisible character U+{ord(bad):04X}", field="name")
    if len(cleaned) > MAX_DATASET_NAME_CHARS:
        raise UnprocessableError(f"the name has {len(cleaned)} characters, over the limit of "
                                 f"{MAX_DATASET_NAME_CHARS}", field="name")
    return cleaned or None


@contextmanager
def _owning(staging: Path) -> Iterator[None]:
    """Hold the staging folder's lock (``Timeout`` at once when a live process holds it); the lock file is
    removed before the lock is let go."""
    lock_path = staging.with_name(staging.name + ".lock")
    with FileLock(lock_path, timeout=0):
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def remove_stale_staging(settings: Settings) -> list[str]:
    """Delete upload staging folders (and lock files) that no live process owns: left by a process killed
    mid-upload. An upload in flight in another process holds its lock, and its folder is kept."""
    removed = []
    if not settings.datasets_dir.is_dir():
        return removed
    for path in sorted(settings.datasets_dir.glob(".*.partial*")):
        staging = path.with_name(path.name.removesuffix(".lock"))
        if path != staging and staging.exists():
            continue  # the folder's own turn takes its lock file too
        try:
            with _owning(staging):
                if staging.is_dir():
                    shutil.rmtree(staging, ignore_errors=True)
                    removed.append(staging.name)
        except Timeout:
            continue  # a live upload
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

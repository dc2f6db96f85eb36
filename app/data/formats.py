"""Parse uploaded datasets into (dialogue, label) records, validating every row.

Accepted formats:
- ``cmcc_csv``: CMCC-34 style CSV, dialogue in ``sentence_sep`` (turns joined by ``[SEP]``) or
  ``word_mf2``, label in ``c_numerical`` and/or ``label_raw``;
- ``text_label_csv``: a generic CSV with ``text,label`` (label: an integer id or a name);
- ``chat_jsonl``: ``{"messages": [...]}`` lines, either system/user/assistant (shared system
  prompt) or the legacy user/assistant pair with the instruction template inside the user turn.

Everything here is pure: no database, no files. Errors name the row and the field.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass

from app.domain.labels import MAX_LABEL_ID, LabelSet
from app.domain.prompt import check_label_name, extract_dialogue, parse_answer
from app.domain.records import Record

# A cell is bounded by the upload (MAX_UPLOAD_BYTES), not by the csv module's default of 131,072 characters:
# one long dialogue is a plausible row.
csv.field_size_limit(2**31 - 1)


class DatasetFormatError(ValueError):
    """A problem with an uploaded file; ``row`` is 1-based (the header of a CSV is row 1)."""

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None):
        self.row, self.field = row, field
        where = []
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass
class ParsedDataset:
    format: str
    records: list[Record]
    label_set: LabelSet
    # Only for chat JSONL: "system_prompt" (3 messages) or "legacy_template" (2 messages).
    chat_style: str | None = None

    @property
    def label_counts(self) -> dict[int, int]:
        counts = Counter(r.label_id for r in self.records)
        return {lab.id: counts.get(lab.id, 0) for lab in self.label_set}


def decode_upload(raw: bytes) -> str:
    if not raw or not raw.strip():
        raise DatasetFormatError("the file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(
            f"the file is not UTF-8 (invalid byte at offset {exc.start}); save it as UTF-8"
        ) from None
    return text


def parse_dataset(raw: bytes, filename: str | None = None) -> ParsedDataset:
    """Detect the format of ``raw`` and parse it. Raises ``DatasetFormatError``."""
    text = decode_upload(raw)
    first = text.lstrip()[:1]
    if first in "{[":
        parsed = _parse_jsonl(text)
    elif (filename or "").lower().endswith((".jsonl", ".json")):
        raise DatasetFormatError("a .jsonl file must hold one JSON object per line")
    else:
        parsed = _parse_csv(text)
    if not parsed.records:
        raise DatasetFormatError("the file holds no data rows")
    present = {r.label_id for r in parsed.records}
    if len(present) < 2:
        raise DatasetFormatError(
            f"the dataset has a single class ({sorted(present)[0]}); a classifier needs at least 2",
            field="label",
        )
    return parsed


# --- CSV -----------------------------------------------------------------------------------

_DIALOGUE_COLUMNS = ("sentence_sep", "word_mf2")


def _parse_csv(text: str) -> ParsedDataset:
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",\t;")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if len(columns) < 2:
        raise DatasetFormatError(
            "neither CSV with a header (sentence_sep/word_mf2 + c_numerical/label_raw, or text,label)"
            " nor JSONL ({\"messages\": [...]} per line)"
        )
    reader.fieldnames = columns
    if any(c in columns for c in _DIALOGUE_COLUMNS) or "c_numerical" in columns or "label_raw" in columns:
        return _parse_cmcc_csv(reader, columns)
    if "text" in columns or "label" in columns:
        return _parse_text_label_csv(reader, columns)
    raise DatasetFormatError(
        f"unknown CSV columns {columns}: expected sentence_sep or word_mf2 with c_numerical and/or "
        "label_raw (CMCC-34), or text,label",
        row=1,
    )


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def _parse_cmcc_csv(reader: csv.DictReader, columns: list[str]) -> ParsedDataset:
    text_col = next((c for c in _DIALOGUE_COLUMNS if c in columns), None)
    if text_col is None:
        raise DatasetFormatError("missing dialogue column: need sentence_sep or word_mf2", row=1, field="sentence_sep")
    has_id, has_name = "c_numerical" in columns, "label_raw" in columns
    if not (has_id or has_name):
        raise DatasetFormatError("missing label column: need c_numerical and/or label_raw", row=1, field="c_numerical")

    rows: list[tuple[int, str, int | None, str | None]] = []
    for line_no, row in enumerate(reader, start=2):
        if row.get(None):
            raise DatasetFormatError(f"{len(columns) + len(row[None])} cells for {len(columns)} columns", row=line_no)
        dialogue = _cell(row, text_col)
        if not dialogue:
            raise DatasetFormatError("empty dialogue", row=line_no, field=text_col)
        label_id = None
        if has_id:
            raw_id = _cell(row, "c_numerical")
            if not raw_id:
                raise DatasetFormatError("empty label id", row=line_no, field="c_numerical")
            label_id = _parse_int(raw_id, line_no, "c_numerical")
        name = _label_name(_cell(row, "label_raw"), line_no, "label_raw") if has_name else None
        rows.append((line_no, dialogue, label_id, name))

    if has_id and has_name:
        names: dict[int, str] = {}
        for line_no, _, label_id, name in rows:
            known = names.setdefault(label_id, name)
            if known != name:
                raise DatasetFormatError(
                    f"label id {label_id} is named '{name}' here but '{known}' earlier (id/name mismatch)",
                    row=line_no, field="label_raw",
                )
        label_set = LabelSet.from_pairs(list(names.items()))
        _check_unique_names(label_set)
        records = [Record(d, i) for _, d, i, _ in rows]
    elif has_id:
        ids = sorted({i for _, _, i, _ in rows})
        label_set = LabelSet.from_pairs([(i, str(i)) for i in ids])
        records = [Record(d, i) for _, d, i, _ in rows]
    else:
        label_set = _label_set_from_names(n for _, _, _, n in rows)
        records = [Record(d, label_set.id_of(n)) for _, d, _, n in rows]
    return ParsedDataset("cmcc_csv", records, label_set)


def _parse_text_label_csv(reader: csv.DictReader, columns: list[str]) -> ParsedDataset:
    for needed in ("text", "label"):
        if needed not in columns:
            raise DatasetFormatError(f"missing column '{needed}' (generic CSV needs text,label)", row=1, field=needed)
    rows: list[tuple[int, str, str]] = []
    for line_no, row in enumerate(reader, start=2):
        if row.get(None):
            raise DatasetFormatError(f"{len(columns) + len(row[None])} cells for {len(columns)} columns", row=line_no)
        text, label = _cell(row, "text"), _cell(row, "label")
        if not text:
            raise DatasetFormatError("empty text", row=line_no, field="text")
        if not label:
            raise DatasetFormatError("empty label", row=line_no, field="label")
        rows.append((line_no, text, label))
    if all(label.lstrip("-").isdigit() for _, _, label in rows):
        for line_no, _, label in rows:
            _parse_int(label, line_no, "label")
        ids = sorted({int(label) for _, _, label in rows})
        label_set = LabelSet.from_pairs([(i, str(i)) for i in ids])
        records = [Record(t, int(label)) for _, t, label in rows]
    else:
        rows = [(line_no, text, _label_name(label, line_no, "label")) for line_no, text, label in rows]
        label_set = _label_set_from_names(label for _, _, label in rows)
        records = [Record(t, label_set.id_of(label)) for _, t, label in rows]
    return ParsedDataset("text_label_csv", records, label_set)


def _parse_int(value: str, row: int, column: str) -> int:
    if value.lstrip("-").isdigit() and len(value) > 20:  # int() would refuse over 4,300 digits
        what = "negative" if value.startswith("-") else f"over the largest accepted id {MAX_LABEL_ID}"
        raise DatasetFormatError(f"label id {_shown(value)} is {what}", row=row, field=column)
    try:
        number = int(value)
    except ValueError:
        raise DatasetFormatError(f"'{_shown(value)}' is not an integer label id", row=row, field=column) from None
    return _check_label_id(number, row, column)


def _shown(value: str, limit: int = 40) -> str:
    """A cell as an error message quotes it: a long one is cut (the message is not an echo of the upload)."""
    return value if len(value) <= limit else f"{value[:limit]}… ({len(value)} characters)"


def _label_name(name: str, row: int, column: str) -> str:
    try:
        return check_label_name(name)
    except ValueError as exc:
        raise DatasetFormatError(str(exc), row=row, field=column) from None


def _check_label_id(number: int, row: int, column: str) -> int:
    if number < 0:
        raise DatasetFormatError(f"label id {_shown(str(number))} is negative", row=row, field=column)
    if number > MAX_LABEL_ID:
        raise DatasetFormatError(f"label id {_shown(str(number))} is over the largest accepted id {MAX_LABEL_ID}",
                                 row=row, field=column)
    return number


def _label_set_from_names(names) -> LabelSet:
    unique = sorted(set(names))
    return LabelSet.from_pairs(list(enumerate(unique)))


def _check_unique_names(label_set: LabelSet) -> None:
    seen: dict[str, int] = {}
    for lab in label_set:
        if lab.name in seen:
            raise DatasetFormatError(
                f"label name '{lab.name}' is used by ids {seen[lab.name]} and {lab.id}", field="label_raw"
            )
        seen[lab.name] = lab.id


# --- JSONL ---------------------------------------------------------------------------------


_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_TOO_DEEP = "JSON nested too deeply (a row is one object: {\"messages\": [...]})"


def _check_unicode(text: str, row: int, field: str) -> None:
    """JSON escapes can spell a lone surrogate (\\ud800): valid JSON, but not text that can be stored."""
    found = _LONE_SURROGATE_RE.search(text)
    if found:
        raise DatasetFormatError(f"a lone surrogate (\\u{ord(found.group()):04x}) at character {found.start() + 1}: "
                                 "not valid Unicode text", row=row, field=field)


def _parse_jsonl(text: str) -> ParsedDataset:
    items: list[tuple[int, str, str, str | None]] = []  # line, dialogue, answer, system prompt
    styles: set[str] = set()
    lines = text.splitlines()
    stripped = text.strip()
    if stripped.startswith("["):
        # A JSON array of the same objects (what the upstream converter wrote) is read too.
        try:
            array = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"not valid JSON: {exc.msg}", row=exc.lineno) from None
        except RecursionError:
            raise DatasetFormatError(_TOO_DEEP, row=1) from None
        objects = list(enumerate(array, start=1))
    else:
        objects = []
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                objects.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(f"not valid JSON: {exc.msg} (column {exc.colno})", row=line_no) from None
            except RecursionError:
                raise DatasetFormatError(_TOO_DEEP, row=line_no) from None

    for line_no, obj in objects:
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list):
            raise DatasetFormatError("expected an object with a 'messages' list", row=line_no, field="messages")
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        if roles == ["system", "user", "assistant"]:
            styles.add("system_prompt")
            system, user, answer = (m.get("content") for m in messages)
        elif roles == ["user", "assistant"]:
            styles.add("legacy_template")
            system = None
            user, answer = (m.get("content") for m in messages)
        else:
            raise DatasetFormatError(
                f"messages must be [system, user, assistant] or [user, assistant], got {roles}",
                row=line_no, field="messages",
            )
        if not isinstance(user, str) or not extract_dialogue(user):
            raise DatasetFormatError("empty dialogue in the user message", row=line_no, field="messages.user")
        if not isinstance(answer, str) or not answer.strip():
            raise DatasetFormatError("empty assistant answer", row=line_no, field="messages.assistant")
        _check_unicode(user, line_no, "messages.user")
        _check_unicode(answer, line_no, "messages.assistant")
        if len(answer.strip().splitlines()) > 1:
            raise DatasetFormatError("the assistant answer holds a line break; it must be one line "
                                     "意图：{id}：{label}", row=line_no, field="messages.assistant")
        items.append((line_no, extract_dialogue(user), answer, system))

    if not items:
        raise DatasetFormatError("the file holds no data rows")

    names: dict[int, str] = {}
    records = []
    for line_no, dialogue, answer, _ in items:
        try:
            parsed = parse_answer(answer)
        except ValueError:  # an id of more digits than int() converts
            raise DatasetFormatError(f"the label id in '{answer[:60]}' is too long", row=line_no,
                                     field="messages.assistant") from None
        if parsed.label_id is None:
            raise DatasetFormatError(
                f"assistant answer '{answer[:60]}' is not in the form 意图：{{id}}：{{label}}",
                row=line_no, field="messages.assistant",
            )
        _check_label_id(parsed.label_id, line_no, "messages.assistant")
        name = _label_name(parsed.label_name or str(parsed.label_id), line_no, "messages.assistant")
        known = names.setdefault(parsed.label_id, name)
        if known != name:
            raise DatasetFormatError(
                f"label id {parsed.label_id} is named '{name}' here but '{known}' earlier (id/name mismatch)",
                row=line_no, field="messages.assistant",
            )
        records.append(Record(dialogue, parsed.label_id))
    label_set = LabelSet.from_pairs(list(names.items()))
    _check_unique_names(label_set)
    style = "mixed" if len(styles) > 1 else styles.pop()
    return ParsedDataset("chat_jsonl", records, label_set, chat_style=style)

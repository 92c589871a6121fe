"""Training data files read into numbered records and checked field by field, before any model is
loaded: every problem is one :class:`TrainingDataError` naming the file and its lines.

Files are UTF-8 (a byte-order mark is allowed): JSONL, one object a line (``.jsonl``, ``.json``),
or, for sequence classification, CSV with a header line (``.csv``). Causal-LM lines have one of
the shapes of :data:`CAUSAL_FORMATS` (told apart by the fields of the first line, then required
of every line); classification rows a text and a class label.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import TrainingDataError, listing

Record = tuple[int, dict]
"""A line number of the file and the fields on that line."""

#: The causal-LM JSONL shapes, by the fields they need (the first that a line has wins).
CAUSAL_FORMATS: dict[str, tuple[str, ...]] = {
    "prompt-response": ("prompt", "response"),
    "messages": ("messages",),
    "text": ("text",),
}
JSONL_SUFFIXES = (".jsonl", ".json")


def check_data_file(path: Path) -> None:
    """``path`` is a file (a folder or a missing path is an error)."""
    if path.is_dir():
        raise TrainingDataError(f"{path}: a folder, not a data file")
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such data file")


def read_text(path: Path) -> str:
    """The file's text; not UTF-8 is an error naming the line and column."""
    check_data_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrainingDataError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise TrainingDataError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
            f"{column}); save the file as UTF-8") from None


def read_jsonl(path: Path) -> list[Record]:
    """``(line number, object)`` for every non-blank line of a JSONL file."""
    text = read_text(path)
    records = []
    # split on newlines only: U+2028 and friends are legal inside JSON strings
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if not records and line.lstrip().startswith("["):
                raise TrainingDataError(f"{path}: a JSON array; give one JSON object a line "
                                        "(JSONL)") from None
            raise TrainingDataError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise TrainingDataError(f"{path}: line {number} is not a JSON object")
        records.append((number, record))
    if not records:
        raise TrainingDataError(f"{path}: no examples (the file is empty)")
    return records


def read_csv(path: Path) -> list[Record]:
    """``(line number, row)`` for every row of a CSV file with a header line; fields are the
    text between the commas (a row's missing fields are None)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise TrainingDataError(f"{path}: no examples (the file is empty)")
        records = []
        for row in reader:
            if row:  # a short row's missing fields are None; a long row's extras are dropped
                padded = row + [None] * (len(header) - len(row))
                records.append((reader.line_num, dict(zip(header, padded[: len(header)],
                                                          strict=True))))
    except csv.Error as exc:
        raise TrainingDataError(f"{path}: line {reader.line_num} is not CSV ({exc})") from None
    if not records:
        raise TrainingDataError(f"{path}: no examples (only a header line)")
    return records


# -- sequence classification ---------------------------------------------------------------
READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".csv": read_csv}


def label_name(value) -> str | None:
    """A class label as text (``1`` and ``1.0`` are one class), or None if the value is no
    class label (missing, empty, a fraction, a list …)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and value.strip():
        return value
    return None


def _classification_problem(record: dict, text_field: str, label_field: str) -> str | None:
    text, label = record.get(text_field), record.get(label_field)
    if not isinstance(text, str) or not text.strip():
        return f"{text_field} {'missing' if text is None else 'empty or not a string'}"
    if label_name(label) is None:
        shown = "missing" if label is None else f"{json.dumps(label)[:20]} is not a class"
        return f"{label_field} {shown}"
    return None


def read_classification(path: Path, text_field: str, label_field: str,
                        min_labels: int = 2) -> tuple[list[str], list[str]]:
    """Texts and class labels (as text) of a JSONL or CSV file; every row checked.

    Example:
        >>> texts, labels = read_classification(Path("d.csv"), "text", "label")  # doctest: +SKIP
    """
    check_data_file(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise TrainingDataError(f"{path}: data must be .jsonl or .csv")
    records = reader(path)
    fields = list(dict.fromkeys(k for _, r in records for k in r if k is not None))
    absent = [f for f in (text_field, label_field) if f not in fields]
    if absent:
        raise TrainingDataError(f"{path}: no field(s) {', '.join(absent)} (fields: "
                                f"{', '.join(map(str, fields))}); use --text-field and "
                                "--label-field")
    problems = [f"line {number} ({problem})" for number, record in records
                if (problem := _classification_problem(record, text_field, label_field))]
    if problems:
        raise TrainingDataError(f"{path}: {len(problems)} row(s) unusable: "
                                f"{listing(problems, 5)}; each row needs a text and a class "
                                "label (a name or a whole number)")
    labels = [label_name(r[label_field]) for _, r in records]
    if len(set(labels)) < min_labels:
        raise TrainingDataError(f"{path}: needs at least {min_labels} distinct label(s) in "
                                f"'{label_field}'")
    return [r[text_field] for _, r in records], labels


# -- causal language modelling -------------------------------------------------------------
def read_causal(path: Path) -> tuple[str, list[Record]]:
    """The shape (a key of :data:`CAUSAL_FORMATS`) and the records of a causal-LM JSONL file,
    every line checked."""
    check_data_file(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise TrainingDataError(f"{path}: causal-lm data must be .jsonl (one JSON object a line)")
    records = read_jsonl(path)
    return causal_format(records, path), records


def causal_format(records: Sequence[Record], path: Path) -> str:
    """The shape of a causal-LM file, checked on every line."""
    first = records[0][1]
    kind = next((k for k, fields in CAUSAL_FORMATS.items() if all(f in first for f in fields)),
                None)
    shapes = "; ".join(" + ".join(fields) for fields in CAUSAL_FORMATS.values())
    if kind is None:
        partial = [f"{' and '.join(f for f in fields if f in first)} but no "
                   f"{' and '.join(f for f in fields if f not in first)}"
                   for fields in CAUSAL_FORMATS.values() if any(f in first for f in fields)]
        found = partial[0] if partial else "fields " + (", ".join(first) or "none")
        raise TrainingDataError(f"{path}: line {records[0][0]} has {found}; each line needs "
                                f"one of: {shapes}")
    problems = []
    for number, record in records:
        for name in CAUSAL_FORMATS[kind]:
            problem = _causal_field_problem(name, record.get(name))
            if problem:
                problems.append(f"line {number} ({problem})")
    if problems:
        raise TrainingDataError(f"{path}: {len(problems)} line(s) unusable as "
                                f"{' + '.join(CAUSAL_FORMATS[kind])}: {listing(problems, 5)}")
    return kind


def _causal_field_problem(name: str, value) -> str | None:
    """What is wrong with one field of a causal-LM line, or None."""
    if name != "messages":
        if not isinstance(value, str):
            return f"{name} missing or not a string"
        return f"{name} empty" if value == "" and name != "prompt" else None
    if not isinstance(value, list) or not value:
        return "messages missing or not a list"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
               and isinstance(m.get("content"), str) for m in value):
        return "each message needs a string role and content"
    if not any(m["role"] == "assistant" for m in value):
        return "no assistant message to learn from"
    return None

"""Labelled task files: a TSV with a header row, or JSONL; one example per line, read as
(line number, record) pairs so every later error can name the file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from gpt_jax.data import DataError


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix in (".tsv", ".txt"):
        return "tsv"
    raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                    "set finetune.format to tsv or jsonl")


def read_records(path, fmt: str = "auto") -> list[tuple[int, dict]]:
    """(line number, record) pairs from a TSV with a header row or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist; set finetune.train_file / dev_file (or --input)")
    fmt = _file_format(path, fmt)
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {no}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {no}: expected a JSON object, got {type(record).__name__}")
                records.append((no, record))
        else:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows, None)
            if header is not None:
                for no, row in enumerate(rows, 2):
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise DataError(f"{path} line {no}: {len(row)} tab-separated fields, but the header "
                                        f"has {len(header)} ({', '.join(header)})")
                    records.append((no, dict(zip(header, row))))
    if not records:
        raise DataError(f"{path} has no examples" + (" (a TSV needs a header row, then one example per line)"
                                                      if fmt == "tsv" else ""))
    return records


def field(record: dict, column, path, no, role):
    if column not in record:
        raise DataError(f"{path} line {no}: no field {column!r} (the {role!r} role; fields present: "
                        f"{', '.join(map(str, record))}); set finetune.fields.{role}")
    return record[column]

"""Fine-tuning data: labelled task files (a TSV with a header row, or JSONL; one example per line,
read as (line number, record) pairs so every later error can name the file and line), the task input
transformations of the GPT-1 paper's Figure 1 (see `gpt_jax.finetune`), and weighted batches."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_jax.config import ConfigError, FinetuneConfig
from gpt_jax.data import DataError, read_text

DEFAULT_FIELDS = {"text": "sentence", "label": "label"}
ROLES = {"classification": ("text",), "entailment": ("text", "text_b"), "similarity": ("text", "text_b"),
         "multiple_choice": ("text", "choices")}


@dataclass(frozen=True)
class SpecialIds:
    start: int
    delimiter: int
    classify: int

    @classmethod
    def after(cls, vocab_size: int) -> "SpecialIds":
        """The three ids appended after a model's `vocab_size` embedding rows."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


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
    read_text(path)  # not UTF-8 text, or binary: one line naming the file
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


@dataclass
class Examples:
    tokens: np.ndarray  # [N, C, T] int32, right padded with 0
    lengths: np.ndarray  # [N, C] int32; lengths - 1 is the [extract] position
    labels: np.ndarray  # [N] int32 class / choice index; -1 when the file has no labels
    truncated: int  # examples shortened to fit max_length

    def __len__(self):
        return len(self.tokens)


def _truncate(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Shorten the longer part one token at a time until both fit `budget`."""
    if b is None:
        return a[:budget], None
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def label_set(records, cfg: FinetuneConfig, path) -> list[str]:
    """The declared labels, or the sorted distinct labels of the (training) records."""
    if cfg.labels is not None:
        return [str(v) for v in cfg.labels]
    column = {**DEFAULT_FIELDS, **cfg.fields}["label"]
    return sorted({str(field(r, column, path, no, "label")) for no, r in records})


def encode_examples(records, cfg: FinetuneConfig, tokenizer, special: SpecialIds, max_length: int, path,
                    labels: list[str] | None, need_labels: bool = True) -> Examples:
    """Task transformation of every record into token sequences (see the module docstring)."""
    fields = {**DEFAULT_FIELDS, **cfg.fields}
    roles = ROLES[cfg.task]
    for role in roles:
        if role not in fields:
            raise ConfigError(f"finetune.task={cfg.task} needs finetune.fields.{role} (the column that holds it)")
    s, d, c = [special.start], [special.delimiter], [special.classify]
    seqs, labs, truncated, n_choices = [], [], 0, None
    for no, record in records:
        text = tokenizer.encode(str(field(record, fields["text"], path, no, "text")))
        if cfg.task == "classification":
            a, _ = _truncate(text, None, max_length - 2)
            example, cut = [s + a + c], len(a) < len(text)
        elif cfg.task in ("entailment", "similarity"):
            b0 = tokenizer.encode(str(field(record, fields["text_b"], path, no, "text_b")))
            a, b = _truncate(text, b0, max_length - 3)
            example = [s + a + d + b + c] + ([s + b + d + a + c] if cfg.task == "similarity" else [])
            cut = len(a) + len(b) < len(text) + len(b0)
        else:
            columns = fields["choices"]
            if isinstance(columns, list):
                choices = [field(record, col, path, no, "choices") for col in columns]
            else:
                choices = field(record, columns, path, no, "choices")
                if not isinstance(choices, list):
                    raise DataError(f"{path} line {no}: field {columns!r} should be a list of choices")
            if n_choices is None:
                n_choices = len(choices)
            if len(choices) != n_choices or n_choices < 2:
                raise DataError(f"{path} line {no}: {len(choices)} choices, but earlier examples have {n_choices}; "
                                "every example needs the same number (at least 2)")
            example, cut = [], False
            for choice in choices:
                ch = tokenizer.encode(str(choice))
                a, b = _truncate(text, ch, max_length - 3)
                example.append(s + a + d + b + c)
                cut |= len(a) + len(b) < len(text) + len(ch)
        truncated += cut
        seqs.append(example)
        column = fields.get("label")
        if column is None or column not in record:
            if need_labels:
                field(record, column or "label", path, no, "label")
            labs.append(-1)
            continue
        value = str(record[column])
        if cfg.task == "multiple_choice":
            if not value.lstrip("-").isdigit() or not 0 <= int(value) < n_choices:
                raise DataError(f"{path} line {no}: label {value!r} is not a choice index in 0..{n_choices - 1}")
            labs.append(int(value))
        else:
            if value not in labels:
                raise DataError(f"{path} line {no}: label {value!r} is not one of the declared labels {labels} "
                                "(finetune.labels)")
            labs.append(labels.index(value))
    C = len(seqs[0])
    T = max(len(x) for ex in seqs for x in ex)
    tokens = np.zeros((len(seqs), C, T), np.int32)
    lengths = np.zeros((len(seqs), C), np.int32)
    for i, ex in enumerate(seqs):
        for j, x in enumerate(ex):
            tokens[i, j, :len(x)] = x
            lengths[i, j] = len(x)
    return Examples(tokens, lengths, np.array(labs, np.int32), truncated)


def pad_to(examples: Examples, T: int) -> Examples:
    tokens = np.zeros(examples.tokens.shape[:2] + (T,), np.int32)
    tokens[..., :examples.tokens.shape[2]] = examples.tokens
    return dataclasses.replace(examples, tokens=tokens)


def make_batch(examples: Examples, idx: np.ndarray, rows=slice(None)) -> dict:
    """Examples `idx` of a batch (-1: padding, weight 0), this process's `rows` of it. Weights: 1 /
    (real examples) and 1 / (their predicted tokens), from the whole batch (see `losses`)."""
    real = idx >= 0
    idx = np.where(real, idx, 0)
    n_tokens = int((examples.lengths[idx[real]] - 1).sum())
    weight = (real / max(int(real.sum()), 1)).astype(np.float32)
    lm_weight = (real / max(n_tokens, 1)).astype(np.float32)
    take = idx[rows]
    return {"tokens": examples.tokens[take], "lengths": examples.lengths[take], "labels": examples.labels[take],
            "weight": weight[rows], "lm_weight": lm_weight[rows]}


def batches(examples: Examples, batch_size: int, order=None):
    """Fixed-size batches in `order`; the last one is padded (weight 0)."""
    order = np.arange(len(examples)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = np.full(batch_size, -1)
        chunk = order[start:start + batch_size]
        idx[:len(chunk)] = chunk
        yield make_batch(examples, idx)

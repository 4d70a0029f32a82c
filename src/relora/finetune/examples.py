"""Labelled examples for fine-tuning: read from CSV, TSV or JSONL (``text,label`` or ``text_a,text_b,label``),
labels named and encoded, split into train and validation."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relora.errors import ConfigError

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class Examples:
    """Texts and their labels as written in the file."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Examples:
        pick = [int(i) for i in index]
        return Examples([self.text_a[i] for i in pick], [self.text_b[i] for i in pick] if self.text_b else None,
                        [self.labels[i] for i in pick])



def read_examples(path: str | Path, text_columns: list[str] | None = None, label_column: str = "label") -> Examples:
    """Rows of ``text,label`` or ``text_a,text_b,label`` from a CSV/TSV (header row) or JSONL file.

    ``text_columns`` names one or two other text columns (GLUE's files: e.g.
    ``sentence`` or ``sentence1,sentence2``), ``label_column`` another label.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist; pass a .csv, .tsv or .jsonl file of text,label rows")
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".json") else _csv_rows(path)
    if not rows:
        raise ConfigError(f"{path} holds no examples")
    columns = set(rows[0][1])
    listed = ", ".join(sorted(columns))
    if text_columns:
        missing = [c for c in text_columns if c not in columns]
        if missing:
            raise ConfigError(f"{path} has no {missing[0]} column (columns: {listed})")
    elif "text" in columns:
        text_columns = ["text"]
    elif "text_a" in columns:
        text_columns = ["text_a", "text_b"] if "text_b" in columns else ["text_a"]
    else:
        raise ConfigError(f"{path} has no text (or text_a, text_b) column (columns: {listed}); "
                          "name yours with --text-columns")
    if label_column not in columns:
        raise ConfigError(f"{path} has no {label_column} column (columns: {listed}); name yours with --label-column")
    texts: list[list[str]] = [[] for _ in text_columns]
    labels = []
    for line, row in rows:
        for column in (*text_columns, label_column):
            value = row.get(column)
            if value is None or (column == label_column and str(value).strip() == ""):
                raise ConfigError(f"{path}, line {line}: no value in column {column!r}")
        for column, values in zip(text_columns, texts):
            values.append(str(row[column]))
        labels.append(_label_name(row[label_column], path, line))
    return Examples(texts[0], texts[1] if len(texts) > 1 else None, labels)


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    # GLUE's .tsv files are not quoted; a quote character there is text.
    tsv = path.suffix.lower() == ".tsv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        if reader.fieldnames is None:
            return []
        return [(reader.line_num, row) for row in reader]


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}, line {number}: not valid JSON") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _label_name(value: object, path: Path, line: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{path}, line {line}: label {value!r} must be a string or an integer")
    return str(value).strip()


def label_names(labels: list[str]) -> list[str]:
    """The classes, numerically sorted if all are integers (so binary 0/1 has 1 as the positive class)."""
    unique = set(labels)
    if all(_is_int(x) for x in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def encode_labels(labels: list[str], names: list[str], where: str) -> np.ndarray:
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(ids))
    if unknown:
        raise ConfigError(f"{where}: label {unknown[0]!r} does not occur in the training data ({', '.join(names)})")
    return np.array([ids[x] for x in labels], dtype=np.int64)


def split_examples(examples: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded random hold-out of ``val_fraction`` of the examples."""
    n_val = max(1, round(val_fraction * len(examples)))
    if len(examples) - n_val < 1:
        raise ConfigError(f"{len(examples)} examples leave none for training after holding out {n_val}; add data")
    order = np.random.default_rng(seed).permutation(len(examples))
    return examples.subset(order[n_val:]), examples.subset(order[:n_val])


# ---------------------------------------------------------------- model

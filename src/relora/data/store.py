"""What a prepared directory holds, and `load_prepared`, which reads it back (`relora.data.preparation` writes it).

A prepared directory holds `train.bin`, `val.bin` and `test.bin` (each document's tokens followed by EOS, as
uint16 or uint32), `tokenizer/` (loadable with AutoTokenizer) and `meta.json` describing them. Directories
prepared before the test split existed hold no `test.bin`; they still train, and asking them for the test
split is a DataError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from relora.data.tokenizer import (
    tokenizer_fingerprint,
)
from relora.errors import DataError

logger = logging.getLogger(__name__)

VERSION = 1
SPLITS = ("train", "val", "test")  # test: held out from everything, read once per run (relora compare)
TOKENIZER_DIR = "tokenizer"


@dataclass
class PreparedData:
    """A prepared directory: its meta.json and memory-mapped token arrays (nothing is read until sliced)."""

    path: Path
    meta: dict[str, Any]
    train: np.memmap
    val: np.memmap
    test: np.memmap | None = None  # None: prepared without a test split (before it existed, or --test-fraction 0)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    def test_split(self) -> np.memmap:
        """The test split's tokens; DataError (naming the fix) when this directory has none."""
        if self.test is None:
            raise DataError(f"{self.path} has no test split (prepared before relora wrote one, or with "
                            "--test-fraction 0): run `relora prepare` on the corpus again into a new --out to evaluate on test")
        return self.test

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer the tokens were made with."""
        return AutoTokenizer.from_pretrained(str(self.path / TOKENIZER_DIR), local_files_only=True)

    @property
    def tokenizer_hash(self) -> str | None:
        """`tokenizer_fingerprint` of the tokenizer: from meta.json, or computed for data prepared before it was stored."""
        return self.meta.get("tokenizer_hash") or tokenizer_fingerprint(self.path / TOKENIZER_DIR)

    @property
    def identity(self) -> str:
        """A short hash naming these tokens wherever the directory lies: equal identities, equal data.

        Computed from meta.json's content fields (the token files' sha256, vocabulary, dtype, EOS), not
        its path or creation time, so a run recognises its data by another path or from another directory.
        """
        content = {k: self.meta.get(k) for k in ("splits", "vocab_size", "dtype", "eos_id")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_prepared(path: str | Path, *, verify: bool = False) -> PreparedData:
    """Open a directory written by `prepare`; `verify` also recomputes the token files' sha256 against meta."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"prepared data directory {path} does not exist: "
                        f"run `relora prepare CORPUS --out {shlex.quote(str(path))}` first")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        if (path / "config.yaml").is_file():
            raise DataError(f"{path} is a run directory, not a prepared dataset: pass the --data the run used") from None
        # Name a new directory: preparing "into" a corpus directory would have to replace the corpus.
        new = shlex.quote(f"{str(path).rstrip('/')}-prepared")
        raise DataError(f"{path} is not a prepared dataset (no meta.json): prepare it into a new directory with "
                        f"`relora prepare {shlex.quote(str(path))} --out {new}` and pass --data {new}") from None
    except ValueError as e:
        raise DataError(f"{path}/meta.json is not valid JSON ({e}): re-run relora prepare with --overwrite") from e
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        raise DataError(
            f"{path}/meta.json is not a version {VERSION} prepared dataset: re-run relora prepare with --overwrite"
        )
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in SPLITS:
        if split == "test" and "test" not in meta["splits"]:
            arrays[split] = None
            continue
        file, info = path / f"{split}.bin", meta["splits"][split]
        size = file.stat().st_size if file.is_file() else None
        if size != info["tokens"] * dtype.itemsize:
            raise DataError(
                f"{file} has {size} bytes but meta.json expects {info['tokens'] * dtype.itemsize}: "
                "the directory is damaged; re-run relora prepare with --overwrite"
            )
        if verify and _sha256(file) != info["sha256"]:
            raise DataError(f"{file} does not match its sha256 in meta.json: re-run relora prepare with --overwrite")
        arrays[split] = np.memmap(file, dtype=dtype, mode="r")
    return PreparedData(path, meta, arrays["train"], arrays["val"], arrays["test"])


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()



"""`prepare`: corpus -> tokenizer + flat token files (train / val / test), written atomically.

What a prepared directory holds, and reading it back, is `relora.data.store`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from array import array
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from relora.data.corpus import CorpusStats, Sources, iter_documents, resolve_inputs
from relora.data.store import SPLITS, TOKENIZER_DIR, VERSION, load_prepared
from relora.data.tokenizer import (
    batch_encoder,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from relora.errors import DataError
from relora.fileio import fsync_dir as _fsync_dir
from relora.fileio import ownership, swap_dir

logger = logging.getLogger(__name__)

# BPE training on more text than this barely changes the merges but costs minutes and GBs of RAM.
TOKENIZER_TRAIN_BYTES = 64 * 2**20
_ENCODE_BATCH_BYTES = 4 * 2**20


def prepare(
    inputs: Sequence[str | Path] | None,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    test_fraction: float | None = None,
    text_field: str = "text",
    overwrite: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    corpus: str = "stdlib",
) -> Path:
    """Tokenize a corpus into `out` (train/val token files, tokenizer, meta.json) and return `out`.

    `inputs` are files, directories or Hugging Face dataset names; None or empty uses the built-in `corpus`:
    the Python stdlib sources, or "site-packages" (the installed packages' sources, pins in meta.json).
    Without `tokenizer` a byte-level BPE of `vocab_size` is trained on the train documents.
    A `val_fraction` of whole documents, chosen by `seed`, is held out for validation and a disjoint
    `test_fraction` (default: equal to `val_fraction`; 0: no test split) for the test split. `num_workers` caps the threads of
    tokenizers' Rust pool (via RAYON_NUM_THREADS, which only takes effect before that pool first starts
    in this process, as in the CLI); None uses all cores. The output appears atomically; a matching
    existing output is returned untouched.
    """
    test_fraction = _check_arguments(val_fraction, test_fraction, vocab_size, text_field, num_workers)
    if num_workers is not None:
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_workers))
    out = Path(out).expanduser().absolute()
    if inputs and corpus != "stdlib":
        raise DataError(f"give either input paths or --corpus {corpus}, not both")
    sources = resolve_inputs(inputs, exclude=out, corpus=corpus)
    tok_path = Path(tokenizer).expanduser().absolute() if tokenizer is not None else None
    # The meta.json fields that identify a request: equal values mean re-running would produce the same data.
    request = {
        "sources": sources.names,
        "tokenizer": str(tok_path) if tok_path else "trained",
        "requested_vocab_size": None if tok_path else vocab_size,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    if _reuse_existing(out, request, overwrite, [Path(n) for n in sources.names if Path(n).is_absolute()]):
        return out
    hf_tok = load_tokenizer(tok_path) if tok_path else None  # fail on a bad tokenizer before reading the corpus

    meta = _write_whole(out, lambda tmp: _build(tmp, sources, request, hf_tok, progress))
    logger.debug(  # the caller reports it (relora prepare prints it on stdout): said once, not twice
        "prepared %s: %s tokens, vocab %d",
        out, " / ".join(f"{info['tokens']} {split}" for split, info in meta["splits"].items()), meta["vocab_size"],
    )
    return out


def _check_arguments(val_fraction: float, test_fraction: float | None, vocab_size: int, text_field: str,
                     num_workers: int | None) -> float:
    """DataError on an argument out of range; returns the test fraction (default: the validation one)."""
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction}: pass e.g. --val-fraction 0.01")
    if test_fraction is None:
        test_fraction = val_fraction
    if not 0 <= test_fraction <= 0.5:
        raise DataError(f"test_fraction must be in [0, 0.5], got {test_fraction}: pass e.g. --test-fraction 0.01")
    if not 257 <= vocab_size <= 2**32:
        raise DataError(
            f"vocab_size must be between 257 (256 bytes + EOS) and 2**32, got {vocab_size}: pass e.g. --vocab-size 8192"
        )
    if not text_field:
        raise DataError("text_field is empty: pass the name of the records' text field, e.g. --text-field text")
    if num_workers is not None and num_workers < 1:
        raise DataError(f"num_workers must be at least 1, got {num_workers}: pass e.g. --num-workers 2")
    return test_fraction


def _write_whole(out: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Let ``build`` fill a temporary sibling of ``out`` and return its meta.json; then mark it as relora's and
    swap it into place. A failure leaves no trace, not even the parent directories it made."""
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        meta = build(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        ownership.mark(tmp, ownership.PREPARED)
        _fsync_tree(tmp)
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return meta


def _reuse_existing(out: Path, request: dict[str, Any], overwrite: bool, inputs: Sequence[Path]) -> bool:
    """True if `out` already holds this request's result; DataError if it holds anything we must not clobber.

    `--overwrite` replaces only a prepared dataset that relora wrote (ownership.py), never the input of
    this command or a directory with anything else in it.
    """
    reason = ownership.why_not_replaceable(out, ownership.PREPARED, inputs=inputs)
    if reason is not None:
        raise DataError(f"output {out} cannot be replaced: {reason}; relora never deletes it, choose another --out")
    if not out.exists() or not any(out.iterdir()) or overwrite:
        return False
    try:
        meta = load_prepared(out).meta
    except DataError:
        meta = None
    if meta is not None and {k: meta.get(k) for k in request} == request:
        logger.info("%s is already prepared for this request; reusing it", out)
        return True
    what = "a dataset prepared with other settings" if meta is not None else "a damaged prepared dataset"
    raise DataError(f"output {out} already holds {what}: pass --overwrite to replace it or choose another --out")


def _build(
    tmp: Path,
    sources: Sources,
    request: dict[str, Any],
    hf_tok: PreTrainedTokenizerBase | None,
    progress: bool,
) -> dict[str, Any]:
    """Write tokenizer/, train.bin, val.bin and test.bin into `tmp`; return the meta.json content."""
    text_field = request["text_field"]
    stats = CorpusStats()
    spool = _Spool(tmp / "documents.spool")
    with spool:
        for data in iter_documents(sources, text_field, stats, progress=progress):
            spool.add(data)
    n_docs = len(spool)
    if n_docs == 0:
        raise DataError(
            f"no usable documents in the inputs ({stats.bad_files} unreadable files, {stats.bad_records} records "
            f"without a {text_field!r} string, {stats.empty_docs} empty): check they are UTF-8 text and --text-field"
        )
    if n_docs < 2:
        raise DataError("the corpus has only 1 document, but train and validation need one each: add documents")
    logger.info("read %d documents (%.1f MB)", n_docs, spool.nbytes / 1e6)
    split_of = _choose_splits(n_docs, request["val_fraction"], request["test_fraction"], request["seed"])

    training = None
    if hf_tok is None:
        train_texts, training = spool.texts_up_to(split_of == 0, TOKENIZER_TRAIN_BYTES)
        logger.info(
            "training a byte-level BPE tokenizer (vocab %d) on %d documents (%.1f MB%s)",
            request["requested_vocab_size"], training["docs"], training["bytes"] / 1e6,
            ", a subset: the first train documents" if training["subset"] else "",
        )
        hf_tok = train_tokenizer(
            train_texts, request["requested_vocab_size"], length=training["docs"], progress=progress
        )
    hf_tok.save_pretrained(str(tmp / TOKENIZER_DIR))
    # Normally len(tokenizer); the max id guards against tokenizers whose ids have gaps.
    vocab_size = max(len(hf_tok), max(hf_tok.get_vocab().values()) + 1)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    names = SPLITS if request["test_fraction"] > 0 else SPLITS[:2]
    splits = _write_tokens(tmp, spool, split_of, names, batch_encoder(hf_tok), hf_tok.eos_token_id, dtype, progress)
    spool.path.unlink()
    return {
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **request,
        "tokenizer_training": training,
        "tokenizer_hash": tokenizer_fingerprint(tmp / TOKENIZER_DIR),  # what `relora eval` checks a model against
        "vocab_size": vocab_size,
        "eos_id": hf_tok.eos_token_id,
        "dtype": dtype.name,
        "splits": splits,
        "skipped": {"files": stats.bad_files, "records": stats.bad_records, "empty_docs": stats.empty_docs},
        **({"corpus_pins": sources.pins} if sources.pins is not None else {}),
    }


def _choose_splits(n_docs: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Each document's split as an index into SPLITS (0 train, 1 val, 2 test), whole documents only.

    Validation gets the round(n*val_fraction) (at least 1) documents with the lowest random keys, test the
    round(n*test_fraction) (at least 1 unless the fraction is 0) next ones, so adding a test split leaves
    the validation documents of an older prepare with the same seed unchanged. Train keeps at least one.
    """
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    n_test = min(n_docs - 1 - n_val, max(1, round(n_docs * test_fraction))) if test_fraction > 0 else 0
    if test_fraction > 0 and n_test < 1:
        raise DataError(f"the corpus has only {n_docs} documents, too few for train, validation and test splits: "
                        "add documents or pass --test-fraction 0")
    order = np.argsort(np.random.default_rng(seed).random(n_docs), kind="stable")
    split_of = np.zeros(n_docs, dtype=np.int8)
    split_of[order[:n_val]] = 1
    split_of[order[n_val:n_val + n_test]] = 2
    return split_of


class _Spool:
    """Documents' UTF-8 bytes back to back in one temporary file.

    Sources are read once (so skip warnings appear once and streamed datasets are not fetched again), while
    tokenizer training and encoding re-read them sequentially with bounded memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets = array("q", [0])
        self._file = open(path, "wb")

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def add(self, data: bytes) -> None:
        self._file.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.offsets[-1]

    def read(self, select: np.ndarray | None = None) -> Iterator[tuple[int, bytes]]:
        """(index, bytes) of each document, in order; only those where `select` is True if given."""
        with open(self.path, "rb") as f:
            for i in range(len(self)):
                size = self.offsets[i + 1] - self.offsets[i]
                if select is None or select[i]:
                    yield i, f.read(size)
                else:
                    f.seek(size, os.SEEK_CUR)

    def texts_up_to(self, select: np.ndarray, max_bytes: int) -> tuple[Iterator[str], dict[str, Any]]:
        """The selected documents, stopping once `max_bytes` are reached, plus a summary of what is included."""
        sizes = np.diff(np.frombuffer(self.offsets, dtype=np.int64))[select]
        n = min(len(sizes), int(np.searchsorted(np.cumsum(sizes), max_bytes)) + 1)
        summary = {"docs": n, "bytes": int(sizes[:n].sum()), "subset": n < len(sizes)}
        docs = (data.decode("utf-8") for _, data in self.read(select))
        return (text for _, text in zip(range(n), docs)), summary


def _write_tokens(
    tmp: Path,
    spool: _Spool,
    split_of: np.ndarray,
    names: Sequence[str],
    encode: Callable[[list[str]], list[list[int]]],
    eos_id: int,
    dtype: np.dtype,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Encode documents batch by batch, appending each one's tokens + EOS to its split's .bin file."""
    files = {s: open(tmp / f"{s}.bin", "wb") for s in names}
    hashes = {s: hashlib.sha256() for s in names}
    counts = {s: {"docs": 0, "tokens": 0} for s in names}

    def flush(batch: list[tuple[int, bytes]]) -> None:
        ids = encode([data.decode("utf-8") for _, data in batch])
        for split in names:
            flat: list[int] = []
            for (i, _), doc in zip(batch, ids):
                if SPLITS[split_of[i]] == split:
                    flat.extend(doc)
                    flat.append(eos_id)
                    counts[split]["docs"] += 1
            chunk = np.array(flat, dtype=dtype).tobytes()
            files[split].write(chunk)
            hashes[split].update(chunk)
            counts[split]["tokens"] += len(flat)
        bar.update(sum(len(data) for _, data in batch))

    try:
        with tqdm(total=spool.nbytes, desc="tokenizing", unit="B", unit_scale=True, disable=not progress) as bar:
            batch: list[tuple[int, bytes]] = []
            size = 0
            for item in spool.read():
                batch.append(item)
                size += len(item[1])
                if size >= _ENCODE_BATCH_BYTES:
                    flush(batch)
                    batch, size = [], 0
            if batch:
                flush(batch)
    finally:
        for f in files.values():
            f.close()
    return {s: {**counts[s], "sha256": hashes[s].hexdigest()} for s in names}


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk, so the rename publishes complete data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


DEFAULT_CORPUS_VAL_FRACTION = 0.05  # of the stdlib's ~730 files: at 1% the validation set is 7 files, too few


def default_data_dir(cache_dir: str | Path | None, vocab_size: int) -> Path:
    """Where the default corpus (this interpreter's standard library) is prepared, once per vocabulary."""
    import sys

    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "relora"
    # "-v3": a test split, no generated codec tables; the caches of older versions stay as they were
    return cache / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-bpe{vocab_size}-v3"


def prepare_default_corpus(cache_dir: str | Path | None, vocab_size: int, *, progress: bool = True) -> Path:
    """Prepare the default corpus into the cache (a no-op when it is already there) and return its path."""
    target = default_data_dir(cache_dir, vocab_size)
    logger.info("no --data given: using the Python standard library as corpus (%s)", target)
    return prepare(None, target, vocab_size=vocab_size, val_fraction=DEFAULT_CORPUS_VAL_FRACTION, progress=progress)

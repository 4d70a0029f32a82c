"""Finding and reading the documents of a corpus: local files, Hugging Face datasets, or the stdlib."""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import os
import platform
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from relora.errors import DataError, one_line

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py"})
JSON_SUFFIXES = frozenset({".jsonl", ".json"})
SUPPORTED = "/".join(sorted(TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"})) + " (text and json also as .gz)"
_SNIFF_BYTES = 8192  # how much of an extension-less file decides whether it is plain text
_STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
# `name` or `owner/name`, as on the Hugging Face Hub.
_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class Sources:
    """Resolved inputs: `names` describe them (for meta.json); `items` are files (Path) or dataset names (str)."""

    names: list[str]
    items: list[Path | str]
    pins: list[str] | None = None  # a built-in corpus made of installed packages: their name==version


@dataclass
class CorpusStats:
    """What reading skipped, so callers can report it and tell "empty" from "unreadable"."""

    bad_files: int = 0
    bad_records: int = 0
    empty_docs: int = 0


def file_kind(path: Path) -> tuple[str, bool] | None:
    """(suffix, gzipped) for a supported file name, None for anything else."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3] if gz else name).suffix
    if suffix in TEXT_SUFFIXES or suffix in JSON_SUFFIXES or (suffix == ".parquet" and not gz):
        return suffix, gz
    return None


def is_plain_text(path: Path) -> bool:
    """Whether an extension-less file (README, LICENSE, a corpus dump) reads as text: its first block
    has no NUL byte and decodes as UTF-8 (a character cut at the block's end is allowed)."""
    try:
        with open(path, "rb") as f:
            block = f.read(_SNIFF_BYTES)
        codecs.getincrementaldecoder("utf-8")().decode(block, final=False)
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in block


def _readable(path: Path) -> bool:
    """A file prepare reads: a supported extension, or none and plain text."""
    return file_kind(path) is not None or (not path.suffix and is_plain_text(path))


def _describe_skipped(files: list[Path]) -> str:
    """'3 .png, 1 .bin, 2 without extension and not text' for a log line."""
    counts: dict[str, int] = {}
    for f in files:
        key = f.suffix.lower() if f.suffix else "without extension and not text"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {key}" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library sources, minus test suites and generated codec tables:
    ~11 MB of real text, no download.

    The 70 codec tables (encodings/cp1252.py, iso8859_*.py, mac_*.py: a ``decoding_table`` generated from a
    mapping file) are near-copies of each other: held-out ones are predicted from the
    trained ones almost perfectly, so a validation or test split that draws several of them measures
    memorisation (the first stdlib test split: ppl 32 against 110 on val).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in _walk(root, _STDLIB_EXCLUDED_DIRS) if p.suffix == ".py" and not _generated_codec(p))


def _generated_codec(path: Path) -> bool:
    """A table-driven codec module: its 256-entry ``decoding_table`` is generated from a mapping file."""
    return path.parent.name == "encodings" and b"\ndecoding_table = (" in path.read_bytes()


def default_corpus_name() -> str:
    return f"python-stdlib {platform.python_version()} without codec tables"


BUILTIN_CORPORA = ("stdlib", "site-packages")


def site_packages_files() -> list[Path]:
    """The Python sources of this environment's installed packages (transformers, torch, numpy, ...), minus tests.

    Tens of MB of real code and docstrings on every machine that can run relora: a corpus for studies that the
    stdlib's ~3M tokens would make repeat data. What it holds depends on the installed versions, which
    `site_packages_pins` records.
    """
    roots = dict.fromkeys(Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib"))
    files = [p for root in roots if root.is_dir() for p in _walk(root, _STDLIB_EXCLUDED_DIRS | {"__pycache__"})]
    return sorted(p for p in dict.fromkeys(files) if p.suffix == ".py")


def site_packages_pins() -> list[str]:
    """``name==version`` of every installed distribution, sorted: the pins that reproduce the corpus."""
    from importlib.metadata import distributions

    pins = {f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]}
    return sorted(pins, key=str.lower)


def builtin_corpus(name: str) -> Sources:
    """A corpus that needs no download: ``stdlib`` (the default) or ``site-packages``."""
    if name == "stdlib":
        return Sources([default_corpus_name()], [*default_corpus_files()])
    if name == "site-packages":
        import hashlib

        pins = site_packages_pins()
        digest = hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]
        label = f"python-site-packages {platform.python_version()} pins-sha256:{digest}"
        return Sources([label], [*site_packages_files()], pins=pins)
    raise DataError(f"unknown built-in corpus {name!r}: choose one of {', '.join(BUILTIN_CORPORA)}")


def _walk(root: Path, skip_dirs: Iterable[str] = (), exclude: Path | None = None) -> list[Path]:
    """All files under root, skipping hidden entries (.git, .venv, ...), `skip_dirs` names, and `exclude`."""
    skip = set(skip_dirs)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip and here / d != exclude]
        found.extend(here / f for f in filenames if not f.startswith("."))
    return sorted(found)


def resolve_inputs(inputs: Sequence[str | Path] | None, *, exclude: Path | None = None,
                   corpus: str = "stdlib") -> Sources:
    """Expand files, directories (recursively, sorted) and dataset names; no inputs means the built-in `corpus`.

    `exclude` (the output directory) is never read, so preparing into a folder inside an input is safe.
    """
    if isinstance(inputs, (str, Path)):  # a lone path is an easy mistake for a one-element list
        inputs = [inputs]
    if not inputs:
        return builtin_corpus(corpus)
    names: list[str] = []
    items: list[Path | str] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            files = _walk(path.resolve(), exclude=exclude.resolve() if exclude else None)
            readable = [_readable(f) for f in files]
            supported = [f for f, ok in zip(files, readable) if ok]
            if len(files) > len(supported):
                skipped = [f for f, ok in zip(files, readable) if not ok]
                logger.warning("skipping %d of %d files in %s that are neither %s nor plain text without an "
                               "extension (%s)", len(skipped), len(files), path, SUPPORTED, _describe_skipped(skipped))
            names.append(str(path.resolve()))
            items.extend(supported)
        elif path.is_file():
            if not _readable(path):
                raise DataError(f"input file {path} has an unsupported type: use one of {SUPPORTED}, "
                                "or plain UTF-8 text without an extension")
            names.append(str(path.resolve()))
            items.append(path.resolve())
        elif isinstance(raw, str) and _HF_NAME.fullmatch(raw) and not file_kind(path):
            names.append(f"hf:{raw}")
            items.append(raw)
        else:
            raise DataError(f"input path {raw} does not exist: check the path or pass a Hugging Face dataset name")
    items = list(dict.fromkeys(items))  # the same file named twice (dir and file) is one document
    if not items:
        raise DataError(f"no supported files found in {', '.join(map(str, inputs))}: add {SUPPORTED} files")
    return Sources(names, items)


def iter_documents(
    sources: Sources, text_field: str, stats: CorpusStats, *, progress: bool = True
) -> Iterator[bytes]:
    """Yield every non-empty document as UTF-8 bytes, skipping (and logging) unreadable files and bad records."""
    for item in tqdm(sources.items, desc="reading", unit="file", disable=not progress):
        texts = _read_dataset(item, text_field, stats) if isinstance(item, str) else _read_file(item, text_field, stats)
        for data in texts:
            if data.strip():
                yield data
            else:
                stats.empty_docs += 1


def _open(path: Path, gz: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _read_file(path: Path, text_field: str, stats: CorpusStats) -> Iterator[bytes]:
    suffix, gz = file_kind(path) or ("", False)
    try:
        if suffix in TEXT_SUFFIXES or not suffix:  # no extension: plain text (resolve_inputs checked)
            with _open(path, gz) as f:
                data = f.read()
            data.decode("utf-8")  # validate only; the bytes are what we keep
            yield data
            return
        records = _parquet_records(path, text_field) if suffix == ".parquet" else _json_records(path, gz, suffix)
        bad = 0
        for record in records:
            data = _record_text(record, text_field)
            if data is None:
                bad += 1
            else:
                yield data
    except DataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        stats.bad_files += 1
        logger.warning("skipping %s: cannot read it as %s (%s)", path, suffix, one_line(e))
        return
    if bad:
        stats.bad_records += bad
        logger.warning("%s: skipped %d records that are not JSON objects with a string %r field", path, bad, text_field)


def _json_records(path: Path, gz: bool, suffix: str) -> Iterator[Any]:
    """Records of a .jsonl file, or of a .json file holding a list, one object, or one object per line.

    An unparsable line is yielded as None (a bad record) rather than failing the whole file.
    """
    with _open(path, gz) as f:
        if suffix == ".json":
            content = f.read()
            try:
                whole = json.loads(content)
            except json.JSONDecodeError:
                lines: Iterable[bytes] = content.splitlines()
            else:
                yield from whole if isinstance(whole, list) else [whole]
                return
        else:
            lines = f
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    yield None


def _parquet_records(path: Path, text_field: str) -> Iterator[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        yield from [None] * pf.metadata.num_rows
        return
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield {text_field: value}


def _record_text(record: Any, text_field: str) -> bytes | None:
    """The record's text as UTF-8, or None when it has no usable string field (e.g. lone surrogates)."""
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _read_dataset(name: str, text_field: str, stats: CorpusStats) -> Iterator[bytes]:
    """Stream the train split of a Hugging Face dataset."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:
        raise DataError(
            f"could not load Hugging Face dataset {name!r} ({one_line(e)}): "
            "check the name and network, or pass a local path"
        ) from e
    if ds.features is not None and text_field not in ds.features:
        raise DataError(
            f"dataset {name!r} has no {text_field!r} column (it has {list(ds.features)}): pass --text-field"
        )
    bad = 0
    for record in ds:
        data = _record_text(record, text_field)
        if data is None:
            bad += 1
        else:
            yield data
    if bad:
        stats.bad_records += bad
        logger.warning("dataset %s: skipped %d records without a string %r field", name, bad, text_field)

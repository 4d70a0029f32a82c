"""Which directories relora wrote itself, so that ``--overwrite`` can never delete anything else.

A directory that relora writes whole (a prepared dataset, a dense model export,
a run's ``final/`` and ``reference/``) gets a small marker file, ``.relora.json``,
listing its kind and the top-level names relora put there. Replacing a
directory is allowed only when it is of the kind the command writes and holds
nothing beyond what its marker lists: a user's file dropped into an export, or
a corpus directory typed as ``--out``, is never deleted. Directories written
before the marker existed are recognised by their layout (a version-1
``meta.json`` with only the split files beside it; ``final/`` or
``reference/`` inside a run directory).

Imports nothing of the package: the data layer, the trainer and the CLI all use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

MARKER = ".relora.json"
PREPARED = "prepared dataset"
MODEL = "dense model"
_HF_NAMES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "added_tokens.json"}


def mark(directory: Path, kind: str) -> None:
    """Record in ``directory`` that relora wrote it, with every top-level name it holds now."""
    names = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    tmp = directory / f"{MARKER}.tmp"  # open(), not mkstemp: the file gets the user's umask, not 0o600
    with open(tmp, "w") as f:
        json.dump({"kind": kind, "files": names}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MARKER)


def _marker(directory: Path) -> dict | None:
    try:
        value = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(value, dict) and isinstance(value.get("kind"), str) and isinstance(value.get("files"), list)
    return value if ok else None


def _legacy_kind(directory: Path) -> tuple[str, set[str]] | None:
    """Kind and allowed names of a directory relora wrote before markers existed, from its layout."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and meta.get("version") == 1 and isinstance(meta.get("splits"), dict):
        return PREPARED, {"meta.json", "tokenizer", *(f"{s}.bin" for s in meta["splits"])}
    parent = directory.parent
    if directory.name in ("final", "reference") and (parent / "config.yaml").is_file() \
            and (parent / "metrics.jsonl").is_file():
        return MODEL, _HF_NAMES
    return None


def why_not_replaceable(directory: str | Path, kind: str, *, inputs: Iterable[str | Path] = ()) -> str | None:
    """None if relora may replace ``directory`` with a new ``kind``; else the reason, for a one-line error.

    An absent or empty directory is always replaceable. ``inputs`` are the paths the same command reads:
    a directory that is one of them, or holds one, is never replaced.
    """
    directory = Path(directory).expanduser().absolute()
    resolved = directory.resolve()
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if source == resolved or resolved in source.parents:
            return f"it holds this command's input {source}"
    if not directory.exists():
        return None
    if not directory.is_dir():
        return "it is a file, not a directory relora wrote"
    entries = {p.name for p in directory.iterdir()}
    if not entries:
        return None
    marker = _marker(directory)
    if marker is not None:
        found, allowed = marker["kind"], set(marker["files"]) | {MARKER}
    elif (legacy := _legacy_kind(directory)) is not None:
        found, allowed = legacy
    else:
        sample = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        return f"it holds files relora did not write ({sample})"
    if found != kind:
        return f"it holds a {found}, not a {kind}"
    foreign = sorted(entries - allowed)
    if foreign:
        sample = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return f"besides the {found} relora wrote it holds other files ({sample})"
    return None

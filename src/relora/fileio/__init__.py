"""Atomic writes: the one file writer and the one directory swap relora uses.

Imports nothing of the package (the data layer, checkpoints and exports all use it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make the renames and new entries inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_dir(new: Path, final: Path) -> None:
    """Rename the complete directory ``new`` to ``final``, replacing what is there.

    An existing ``final`` is renamed aside first and deleted only once ``new`` is in place; if that rename
    fails, it is put back. A crash at any moment leaves a complete copy under ``final`` or under the
    aside name (``.NAME.old-*``), never neither. Callers decide whether ``final`` may be replaced at all
    (``ownership.why_not_replaceable``).
    """
    old = None
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.rename(final, old)
    elif final.exists():
        final.rmdir()  # an empty directory: nothing to keep
    try:
        os.rename(new, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a temporary sibling of ``path``, fsync it, rename it over ``path``: readers (and a
    resume after a crash) see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_atomic`` of a text."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, value: Any, *, indent: int | None = 2) -> None:
    """``write_atomic`` of ``value`` as JSON (indented unless ``indent`` is None)."""
    write_text_atomic(path, json.dumps(value, indent=indent, default=str))

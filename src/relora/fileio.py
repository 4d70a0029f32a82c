"""Putting a finished directory in place: the one directory swap relora uses.

Imports nothing of the package (the data layer, checkpoints and exports all use it).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


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

"""The errors relora raises for a user's mistakes: each message is one line naming the problem and the fix.

A leaf: imports nothing, so every layer (the core included) can raise them, and the CLI turns exactly these
into a one-line message and a non-zero exit instead of a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user configuration mistake."""


class DataError(ValueError):
    """A problem with user-supplied data (a corpus, a prepared directory, a labelled file)."""


class DiskSpaceError(ValueError):
    """Not enough free disk space for a checkpoint."""


class DistributedError(ConfigError):
    """A problem with the launch or the parallel setup."""


class DivergedError(ConfigError):
    """Too many non-finite steps, and no (more) rollback allowed."""


class BitsAndBytesMissing(ImportError):
    """--quantize (or a quantized checkpoint) without the optional bitsandbytes package."""


class UsageError(Exception):
    """Bad command-line usage: exit code 2."""


# What the CLI reports in one line (exit 1) rather than as a traceback.
USER_ERRORS = (ConfigError, DataError, DiskSpaceError, BitsAndBytesMissing)


def one_line(exc: BaseException) -> str:
    """First line of an exception's message, so wrapped errors stay one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

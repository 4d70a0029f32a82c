"""Settings as dataclass fields: each declared once with its help text (``setting``), and checked against its
annotation (``check_types``), since a YAML file can hold anything.

The CLI generates its flags from these fields (relora.cli.flags); a resume
reads which of them it may change (relora.run.config.RESUME_INCOMPATIBLE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any

from relora.errors import ConfigError


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            flag: str | None = "", resumable: bool = False, compare: bool = True,
            choices: tuple[str, ...] | None = None, parse: Callable[[str], Any] | None = None,
            adapters_only: bool = False) -> Any:
    """A config field with what the CLI and a resume need to know about it, so that it is declared once.

    ``help``: the flag's help text (for a field without a flag, what it means in a config file).
    ``flag``: "" for ``--field-name`` (``--no-field-name`` for a switch that is on by default), None for none
    (config files only), else the flag's name; a name without dashes is a positional argument's.
    ``resumable``: a resume may change it (the checkpoints mean the same); any other field it refuses.
    ``compare``: ``relora compare`` takes the flag too (it sets the method, run directory and LR per run).
    ``choices``, ``parse``: argparse's choices and type where the field's annotation does not say it.
    ``adapters_only``: only the adapter methods read it; full-rank training is the same run whatever its value.
    """
    metadata = {"help": help, "flag": flag, "resumable": resumable, "compare": compare, "choices": choices,
                "parse": parse, "adapters_only": adapters_only}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def adapter_setting(*args: Any, **kwargs: Any) -> Any:
    """``setting`` of a field that only the adapter methods read (``adapters_only``)."""
    return setting(*args, adapters_only=True, **kwargs)


def check_types(config: Any) -> None:
    """Each field of the dataclass ``config`` holds what its annotation says; a number written as a string is
    converted in place. ConfigError names the first field that does not."""
    for f in fields(config):
        kinds = [k.strip() for k in str(f.type).split("|")]
        value = numeric_from_string(getattr(config, f.name), kinds)
        setattr(config, f.name, value)
        if not any(_is_kind(value, kind) for kind in kinds):
            expected = " or ".join(_KIND_NAMES[kind] for kind in kinds)
            raise ConfigError(f"{f.name} must be {expected}, got {value!r}")


_KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "dict": "a mapping", "list[str]": "a list of strings", "None": "null"}


def numeric_from_string(value: Any, kinds: list[str]) -> Any:
    """A number written as a string, for a numeric field that takes no string; else ``value`` unchanged.

    YAML 1.1 (PyYAML) reads ``1e-3`` (no dot) and ``1_000e3``-like spellings as strings; a user means a number.
    """
    if not isinstance(value, str) or "str" in kinds or not {"int", "float"} & set(kinds):
        return value
    try:
        number = float(value.strip())
    except ValueError:
        return value  # not a number: check_types names the field and what it must be
    if not math.isfinite(number):
        return value
    if "float" in kinds:
        return number
    return int(number) if number.is_integer() else value


def _is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` fits one alternative of a field annotation (bool is no number; int is a float)."""
    if kind in ("int", "float") and isinstance(value, bool):
        return False
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict,
                              "None": type(None)}[kind])

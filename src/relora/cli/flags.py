"""Flags generated from config fields, and the value types of flags.

A field declared with ``relora.run.fields.setting`` becomes a flag: its name
with dashes (``--no-NAME`` for a switch on by default), its help text, and an
argparse type read from its annotation. Subcommand parsers use
``argument_default=SUPPRESS``, so a namespace holds only the flags given and
``setting_values`` returns exactly what the user set.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields
from typing import Any


def yes_no(text: str) -> bool:
    """A boolean flag value: yes/no, true/false, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def name_list(text: str) -> list[str]:
    """A comma-separated list of names; checked against the known names by the config (a one-line error)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def names(text: str) -> tuple[str, ...]:
    """A comma-separated, non-empty list of names, e.g. full,relora."""
    found = tuple(n.strip() for n in text.split(",") if n.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return found


def float_list(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, e.g. 1e-3,3e-3."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1e-3,3e-3; got {text!r}") from None


# The value type of a flag by its field's annotation (less None); bool is a switch unless the field may be None.
VALUE_TYPES = {"int": int, "float": float, "str": str, "bool": yes_no, "list[str]": name_list}


def flagged_fields(config_class: type, *, compare: bool = False) -> list[Field]:
    """The fields of ``config_class`` that have a flag (with ``compare``: those `relora compare` takes too)."""
    return [f for f in fields(config_class)
            if f.metadata.get("flag") is not None and (f.metadata["compare"] or not compare)]


def add_setting_flags(parser: argparse.ArgumentParser, config_class: type, *, compare: bool = False,
                      optional: bool = False) -> None:
    """One argument per flagged field of ``config_class``, in field order. ``optional``: no flag is required, even
    of a field without a default (the command fills what is not given, as ``relora bench`` from the preset)."""
    for f in flagged_fields(config_class, compare=compare):
        flag_names, kwargs = flag_arguments(f, optional=optional)
        parser.add_argument(*flag_names, **kwargs)


def flag_arguments(f: Field, *, optional: bool = False) -> tuple[list[str], dict[str, Any]]:
    """``add_argument``'s names and keywords for the field ``f`` (``optional``: never required)."""
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    kinds = [k.strip() for k in str(f.type).split("|") if k.strip() != "None"]
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if kinds == ["bool"] and f.default is not None:  # a switch: --NAME turns it on, --no-NAME off
        if f.default:
            return ["--no-" + f.name.replace("_", "-")], {**kwargs, "dest": f.name, "action": "store_false"}
        return [flag], {**kwargs, "action": "store_true"}
    kwargs["type"] = meta["parse"] or VALUE_TYPES[kinds[0]]
    if meta["choices"]:
        kwargs["choices"] = list(meta["choices"])
    if not flag.startswith("-"):  # a positional argument, shown as the flag's name
        return [f.name], {**kwargs, "metavar": flag}
    if f.default is MISSING and f.default_factory is MISSING and not optional:
        kwargs["required"] = True
    return [flag], kwargs


def setting_values(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The settings of ``config_class`` given on the command line, by field name."""
    flagged = {f.name for f in flagged_fields(config_class)}
    return {k: v for k, v in vars(args).items() if k in flagged}

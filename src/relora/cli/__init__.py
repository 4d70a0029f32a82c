"""The ``relora`` command: thin parsing over the library's plain functions.

Exit codes: 0 success, 2 a user error (one line on stderr, no traceback),
1 an internal error (with traceback, since that is a bug to report).

The parser (relora.cli.parser) is built from the config fields; the commands
(relora.cli.training, relora.cli.tools) import torch only when they run, so
``relora --help`` loads none.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import traceback

from relora.cli.parser import build_parser
from relora.cli.tools import QUIET_TRANSFORMERS, quiet_transformers
from relora.cli.training import train_overrides
from relora.errors import USER_ERRORS, UsageError

__all__ = ["build_parser", "main", "parse_args", "train_overrides"]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is reported by its subcommand's parser (its usage, not the top-level one)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        sub = commands[args.command]
        message = f"unrecognized arguments: {' '.join(unknown)}"
        flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        for word in unknown:
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1) if word.startswith("-") else []
            if close:
                message += f"; did you mean {close[0]}?"
                break
        sub.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``relora ARGV``; returns the exit code."""
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command in QUIET_TRANSFORMERS:
        quiet_transformers()
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"relora: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if isinstance(exc, USER_ERRORS):
            print(f"relora: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"relora: internal error: {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return 1


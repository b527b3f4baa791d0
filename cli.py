"""Command-line plumbing shared by train.py, eval.py and chat.py: flag types that say their valid range,
and one-line errors (exit status 2) for user mistakes; a traceback only with ``--debug`` or for our bugs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from safetensors import SafetensorError

# What a user's input can raise: files (missing, a directory, unreadable), decoding, bad JSON / safetensors,
# configs and adapters that do not fit. Anything else is a bug of ours and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError, UnicodeError, RecursionError, json.JSONDecodeError, SafetensorError,
               FloatingPointError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, no usage dump: ``train.py: error: argument --rank: must be >= 1, got 0``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(lo, typ=int):
    def parse(s: str):
        try:
            v = typ(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if typ is int else 'a number'}, got {s!r}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {s}")
        return v
    parse.__name__ = typ.__name__
    parse.valid = f">= {lo}"
    return parse


def in_range(lo: float, hi: float, hi_open: bool = False, lo_open: bool = False):
    """A float in [lo, hi] (``hi_open`` / ``lo_open``: that end excluded)."""
    def parse(s: str):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
        if not (lo < v if lo_open else lo <= v) or not (v < hi if hi_open else v <= hi):
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo}, {hi}{right}, got {s}")
        return v
    parse.__name__ = "float"
    parse.valid = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return parse


def message(e: BaseException) -> str:
    """One line: a KeyError's own text without quotes, newlines folded."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split()) or type(e).__name__


def run(fn, debug: bool = False):
    """Call ``fn``; a user mistake ends as ``error: ...`` on one line with exit status 2 (a traceback instead with
    ``debug`` or the environment variable SPARSEDOCTOR_DEBUG=1)."""
    debug = debug or os.environ.get("SPARSEDOCTOR_DEBUG", "") not in ("", "0")
    try:
        return fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(2)

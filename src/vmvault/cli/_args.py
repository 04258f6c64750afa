"""Argument checking shared by every command: what a careless administrator types is a
usage error (exit 2), never a quiet default and never a traceback.

* :func:`harden` wraps the type of every option and positional of every (sub)command so
  that an empty or blank value is refused. It runs once over the finished parser, so a
  command added later is covered without doing anything: ``backup ''`` used to back up the
  current folder, ``show ''`` to match every snapshot, ``forget --keep-tag ''`` to keep
  nothing.
* Numbers are parsed by validating types with bounds (:func:`whole_number`, :func:`size`,
  :func:`percentage`); a bare ``int`` or ``float`` type would let ``--seed -1`` through to
  the engine (``tests/cli/test_attack_arguments.py`` checks none is left).
* :func:`snapshot_ref` and :func:`hex_prefix` ask for ``latest`` or at least
  :data:`MIN_PREFIX` hex digits, so a stray character cannot pick a snapshot.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

from vmvault.automation.config import parse_duration

from ._terminal import terminal_safe

__all__ = [
    "MIN_PREFIX",
    "Parser",
    "harden",
    "hex_prefix",
    "new_tag",
    "percentage",
    "positive_duration",
    "size",
    "snapshot_ref",
    "whole_number",
]

#: the shortest id prefix accepted for a snapshot or key (ids are shown with 8)
MIN_PREFIX = 4

_HEX = re.compile(r"[0-9a-f]+")


class Parser(argparse.ArgumentParser):
    """The parser class of every vmvault (sub)command: its error messages quote what was
    typed, so they are escaped for the terminal like every other line."""

    def error(self, message: str) -> Any:  # argparse declares NoReturn; it exits
        # the error and where to read more: a usage block of every option (ten lines for
        # `forget`) would bury the one line that matters
        self.exit(2, f"{self.prog}: error: {terminal_safe(message)}\n(`{self.prog} --help` lists the options)\n")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty" if not text else f"must not be blank: {text!r}")
    return text


def _wrap(inner: Callable[[str], Any] | None) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        _not_blank(text)
        return inner(text) if inner is not None else text

    # argparse names a type in "invalid <name> value" messages
    convert.__name__ = getattr(inner, "__name__", "value")
    convert.__wrapped__ = inner  # type: ignore[attr-defined]
    return convert


def harden(parser: argparse.ArgumentParser) -> None:
    """Refuse empty and blank values for every argument of ``parser`` and of all its
    subcommands (each parser and each argument is visited once)."""
    seen_parsers: set[int] = set()
    seen_actions: set[int] = set()

    def visit(p: argparse.ArgumentParser) -> None:
        if id(p) in seen_parsers:
            return
        seen_parsers.add(id(p))
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    visit(child)
                continue
            if action.nargs == 0 or id(action) in seen_actions:
                continue  # flags (store_true, help, version) take no value
            seen_actions.add(id(action))
            action.type = _wrap(action.type)  # type: ignore[arg-type]

    visit(parser)


def inner_type(action: argparse.Action) -> Any:
    """The type :func:`harden` wrapped (for tests that inspect the parser)."""
    return getattr(action.type, "__wrapped__", action.type)


# ---- numbers --------------------------------------------------------------------------------


def whole_number(minimum: int, maximum: int, *, what: str = "a whole number") -> Callable[[str], int]:
    """An int in ``[minimum, maximum]``."""

    def whole(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{what} from {minimum} to {maximum} is needed, not {text!r}")
        return value

    return whole


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def size(minimum: int, maximum: int, *, power_of_two: bool = False) -> Callable[[str], int]:
    """A byte count such as ``256K``, ``4MiB``, ``1.5G`` or ``65536``, in ``[minimum, maximum]``."""

    def byte_size(text: str) -> int:
        m = _SIZE.fullmatch(text.strip())
        if not m:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256K, 4M, 1G)")
        number, unit = m.group(1), m.group(2).upper()
        value = int(float(number) * _UNITS[unit]) if "." in number else int(number) * _UNITS[unit]
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"a size from {minimum} to {maximum} bytes is needed, not {text!r}")
        if power_of_two and value & (value - 1):
            raise argparse.ArgumentTypeError(f"the size must be a power of two, not {value}")
        return value

    return byte_size


def percentage(*, zero: bool) -> Callable[[str], float]:
    """``10%`` or ``10`` -> 0.1; from 0% (included only when ``zero``) to 100%."""

    def percent(text: str) -> float:
        t = text.strip().removesuffix("%").strip()
        try:
            value = float(t) / 100
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
        if not math.isfinite(value) or not (value >= 0 if zero else value > 0) or value > 1:
            low = "0%" if zero else "0% (exclusive)"
            raise argparse.ArgumentTypeError(f"a percentage from {low} to 100% is needed, not {text!r}")
        return value

    return percent


def positive_duration(text: str) -> float:
    """A duration by the one rule (``parse_duration``: ``90s``, ``26h``, ``1d12h``; README,
    "Durations"), more than zero -> seconds."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration above zero is needed, not {text!r}")
    return seconds


# ---- names ----------------------------------------------------------------------------------


def hex_prefix(what: str) -> Callable[[str], str]:
    """A hex id or a prefix of one, at least :data:`MIN_PREFIX` digits (lower-cased)."""

    def prefix(text: str) -> str:
        t = text.strip().lower()
        if not _HEX.fullmatch(t) or len(t) > 64:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r} (give its hex id or a prefix of it)")
        if len(t) < MIN_PREFIX:
            raise argparse.ArgumentTypeError(f"give at least {MIN_PREFIX} hex digits of the {what}, not {text!r}")
        return t

    return prefix


_SNAPSHOT_ID = hex_prefix("snapshot id")


def snapshot_ref(text: str) -> str:
    """``latest``, or a snapshot id or prefix of at least :data:`MIN_PREFIX` hex digits."""
    if text.strip() == "latest":
        return "latest"
    return _SNAPSHOT_ID(text)


def new_tag(text: str) -> str:
    """A tag to put on a new snapshot: printable, no surrounding blanks, no comma (the
    retention rules read ``a,b`` as two tags)."""
    if text != text.strip():
        raise argparse.ArgumentTypeError(f"a tag must not start or end with a blank: {text!r}")
    if "," in text:
        raise argparse.ArgumentTypeError(f"a tag must not contain a comma: {text!r}")
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"a tag must not contain control characters: {text!r}")
    return text

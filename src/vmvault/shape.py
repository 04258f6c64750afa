"""The shapes of JSON documents that someone else may have written.

A snapshot manifest or a status record is read from the repository, which whoever holds a key
(or, unencrypted, whoever can write the storage) can fill with any JSON. Such a document is
checked once, where it is read, against the type of every field the reader knows, so that the
code using it can trust each field it reads; a document that does not fit is unreadable, with
:func:`problem` saying which field. Fields a reader does not know are left alone: a newer
writer's.

A check is a predicate on one JSON value; :func:`record`, :func:`list_of`, :func:`map_of` and
:func:`optional` build checks of nested values from simpler ones.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vmvault import times

__all__ = [
    "INT_LIMIT",
    "Check",
    "count",
    "describe",
    "flag",
    "integer",
    "list_of",
    "loads",
    "map_of",
    "number",
    "obj",
    "optional",
    "positive",
    "problem",
    "record",
    "text",
    "time",
]

Check = Callable[[Any], bool]


def loads(raw: bytes | str) -> Any:
    """``json.loads``, with JSON nested too deeply for the parser (``[[[[…``: a RecursionError,
    which callers catching ValueError let through as a traceback) a ValueError like any other
    text that is not JSON."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


#: the largest size, offset or count a document may give (a file offset's range)
INT_LIMIT = 1 << 63


def count(value: Any) -> bool:
    """An integer from 0 below ``INT_LIMIT`` (not a bool)."""
    return type(value) is int and 0 <= value < INT_LIMIT


def positive(value: Any) -> bool:
    return type(value) is int and 0 < value < INT_LIMIT


def integer(value: Any) -> bool:
    return type(value) is int and -INT_LIMIT <= value < INT_LIMIT


def number(value: Any) -> bool:
    """A finite integer or float (not a bool)."""
    return integer(value) or (type(value) is float and math.isfinite(value))


def text(value: Any) -> bool:
    return type(value) is str


def flag(value: Any) -> bool:
    return type(value) is bool


def obj(value: Any) -> bool:
    """A JSON object, whatever it holds."""
    return type(value) is dict


def time(value: Any) -> bool:
    """An ISO 8601 time that converts to UTC and to epoch seconds (what listings do with it)."""
    if type(value) is not str:
        return False
    try:
        times.as_datetime(value).astimezone(dt.UTC).timestamp()
    except (ValueError, OverflowError):
        return False
    return True


def optional(check: Check) -> Check:
    """``check``, or None."""
    return lambda value: value is None or check(value)


def list_of(check: Check, *, sizes: Sequence[int] = ()) -> Check:
    """A list whose every item passes ``check`` (and whose length is one of ``sizes``, if given)."""
    return lambda value: (
        type(value) is list and (not sizes or len(value) in sizes) and all(map(check, value))
    )  # fmt: skip


def map_of(check: Check) -> Check:
    """An object whose every value passes ``check``."""
    return lambda value: type(value) is dict and all(map(check, value.values()))


def record(fields: Mapping[str, Check], required: Sequence[str] = ()) -> Check:
    """An object whose ``required`` fields are there and whose known fields pass their checks."""
    return lambda value: problem("", value, fields, required) is None


def problem(what: str, value: Any, fields: Mapping[str, Check], required: Sequence[str] = ()) -> str | None:
    """What is wrong with ``value`` as a ``what`` record of ``fields`` (its ``required`` ones
    there, each known one passing its check); None when nothing is."""
    a = "an" if what[:1] in ("a", "e", "i", "o", "u") else "a"
    if type(value) is not dict:
        return f"{a} {what} record is {describe(value)}, not an object"
    for name in required:
        if name not in value:
            return f"{a} {what} record has no {name!r}"
    for name, check in fields.items():
        if name in value and not check(value[name]):
            return f"the {what} field {name!r} holds {describe(value[name])}"
    return None


def describe(value: Any) -> str:
    """``value``'s type and the start of its text, for an error message."""
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40]}{'…' if len(shown) > 40 else ''}"

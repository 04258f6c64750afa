"""How vmvault shows times and durations: one rule for every command, the daemon's messages
and the dashboard (README, "Times").

* :func:`local_time`: ``2026-11-25 02:30:00 CET``, the wall-clock time in a zone (a daemon
  configuration's ``timezone``, or the host's local zone) with that zone's abbreviation, so
  no time is printed without saying which clock it is on. :func:`local` is the same for
  the command line's output: it takes stored times as they come (ISO 8601 text, epoch
  seconds, None) and shows UTC instead when ``--utc`` or ``VMVAULT_UTC=1`` asks.
* :func:`duration`: ``0.23s``, ``12.5s``, ``1m 30s``, ``1d 2h 3m 4s``: exact to the second
  (to the hundredth below ten seconds), never rounded to a coarser unit; the text is also a
  valid duration wherever vmvault reads one (README, "Durations").
* :func:`iso_time`: ISO 8601 with its UTC offset, for JSON documents (never a bare epoch
  number, never a time without an offset).
* :func:`clock`: a countdown such as a progress bar's ETA (``1:02:05``).

Stored times without an offset (older records) are taken as UTC. This module imports
nothing else of vmvault, so every layer may use it.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from typing import overload

__all__ = [
    "UTC_ENV",
    "Instant",
    "as_datetime",
    "clock",
    "duration",
    "force_utc",
    "iso_time",
    "local",
    "local_time",
    "show_utc",
    "zone_name",
]

#: the environment switch for ``--utc``
UTC_ENV = "VMVAULT_UTC"

#: what a stored time may be: an aware (or naive = UTC) datetime, ISO 8601 text, epoch seconds
Instant = dt.datetime | str | float | int

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))

_forced: bool | None = None


def force_utc(value: bool | None) -> None:
    """``--utc`` for this process (None: follow ``VMVAULT_UTC``); the CLI sets it per command."""
    global _forced
    _forced = value


def show_utc() -> bool:
    """True when people are shown UTC (``--utc`` or ``VMVAULT_UTC=1``) instead of local time."""
    if _forced is not None:
        return _forced
    return os.environ.get(UTC_ENV, "").strip().lower() in ("1", "true", "yes")


def as_datetime(when: Instant) -> dt.datetime:
    """An aware datetime from a datetime (naive = UTC), an ISO 8601 text (no offset = UTC) or
    epoch seconds. Raises ValueError for anything else."""
    if isinstance(when, dt.datetime):
        return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    if isinstance(when, bool):
        raise ValueError(f"not a time: {when!r}")
    if isinstance(when, int | float):
        if not math.isfinite(when):
            raise ValueError(f"not a time: {when!r}")
        try:
            return dt.datetime.fromtimestamp(when, dt.UTC)
        except (OverflowError, OSError) as exc:
            raise ValueError(f"not a time: {when!r}") from exc
    if not isinstance(when, str):
        raise ValueError(f"not a time: {when!r}")
    parsed = dt.datetime.fromisoformat(when.strip())
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def local_time(when: dt.datetime, tz: dt.tzinfo | None = None, *, seconds: bool = True) -> str:
    """``when`` (aware) as wall-clock time in ``tz`` (None: the host's local zone) with the
    zone's abbreviation (its UTC offset where the zone has no abbreviation)."""
    local_when = when.astimezone(tz) if tz is not None else when.astimezone()
    text = local_when.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    return f"{text} {local_when.tzname() or local_when.strftime('%z')}"


def local(when: Instant | None, *, utc: bool | None = None, seconds: bool = True) -> str:
    """A stored time for the command line's output: :func:`local_time` in the host's zone, or
    in UTC when ``utc`` (default: :func:`show_utc`). ``-`` for None; a text that is no time
    is shown as it is (a damaged record must not hide the rest of a listing)."""
    if when is None:
        return "-"
    try:
        moment = as_datetime(when)
    except ValueError:
        return str(when)
    use_utc = show_utc() if utc is None else utc
    return local_time(moment, dt.UTC if use_utc else None, seconds=seconds)


def zone_name(tz: dt.tzinfo | None) -> str:
    """How to name the clock of ``tz`` in a heading: an IANA name, or the host's zone."""
    if tz is None:
        return f"the host's local time ({dt.datetime.now().astimezone().tzname()})"
    return str(getattr(tz, "key", None) or tz)


@overload
def iso_time(when: Instant) -> str: ...


@overload
def iso_time(when: None) -> None: ...


def iso_time(when: Instant | None) -> str | None:
    """ISO 8601 with the offset, to the second (for JSON): an aware datetime or an ISO text
    keeps its offset, a naive one and epoch seconds are UTC. None stays None; anything that
    is no time raises ValueError."""
    if when is None:
        return None
    return as_datetime(when).isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    """A length of time for people: ``0.23s``, ``9.5s``, ``42.1s``, ``1m 30s``, ``2h``,
    ``1d 2h 3m 4s`` (whole seconds from a minute on; units that are zero are left out)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds < 10 and round(seconds, 2) < 10:
        return _trim(f"{seconds:.2f}") + "s"
    if round(seconds, 1) < 60:
        return _trim(f"{seconds:.1f}") + "s"
    rest = round(seconds)
    parts = []
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)


def _trim(number: str) -> str:
    return number.rstrip("0").rstrip(".") if "." in number else number


def clock(seconds: float) -> str:
    """A countdown such as a progress bar's ETA: ``0:07``, ``12:30``, ``1:02:03`` (whole
    seconds, rounded up: a bar never claims to be done early); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = math.ceil(seconds)
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

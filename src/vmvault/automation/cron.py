"""Cron expressions: parse the five classic fields and find the next time one fires.

Why our own and not croniter: croniter (7.x) reads a range with equal ends ("5-5", "3-wed")
as something other than that one value, and ORs the two day fields for ``*/2`` where
crontab(5) does not (both found by ``tests/automation/test_cron.py``, which uses croniter as
the test oracle with those two spellings bridged); ours also refuses an expression that can
never fire and names the wrong field in a config error. It is 150 lines with no dependency.

Grammar (as in Vixie cron, crontab(5))::

    expr   = minute hour day-of-month month day-of-week  |  @hourly @daily @midnight
             @weekly @monthly @yearly @annually
    field  = item ("," item)*
    item   = ("*" | value | value "-" value) ["/" step]     value = number or name
    names  = jan..dec for months, sun..sat for days of the week (0 and 7 are both Sunday)

``a/step`` (a value with a step but no range) runs from ``a`` to the field's maximum.

Day matching follows crontab(5): when both day-of-month and day-of-week are restricted (do
not start with ``*``), a day matches if EITHER matches; otherwise both must.

Times are wall-clock minutes, naive ``datetime`` values; the scheduler converts to and from
the configured time zone.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from vmvault.errors import ConfigError

__all__ = ["CronExpr", "parse_cron"]

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

#: (name, low, high, names) per field
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)

#: a day-of-month restriction never met by any month is refused; this bounds the search
_SEARCH_YEARS = 28  # the Gregorian weekday/leap-year pattern repeats within 28 years (ignoring 2100)


@dataclass(frozen=True)
class CronExpr:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def matches(self, when: dt.datetime) -> bool:
        return when.minute in self.minutes and when.hour in self.hours and self.day_matches(when.date())

    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first whole minute strictly after ``after`` (naive wall-clock time) that matches."""
        start = after.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        day = start.date()
        last = day + dt.timedelta(days=366 * _SEARCH_YEARS + 7)
        while day <= last:
            if self.day_matches(day):
                for h in hours:
                    if day == start.date() and h < start.hour:
                        continue
                    for m in minutes:
                        candidate = dt.datetime(day.year, day.month, day.day, h, m)
                        if candidate >= start:
                            return candidate
            day += dt.timedelta(days=1)
        raise ConfigError(f"cron expression {self.text!r} never fires")  # pragma: no cover - refused at parse

    def last_at_or_before(self, when: dt.datetime, not_before: dt.datetime) -> dt.datetime | None:
        """The last whole minute at or before ``when`` that matches, if it is not before
        ``not_before`` (naive wall-clock times); None otherwise. The daemon's catch-up asks
        this for the firing it missed; it costs a few steps per day between the two."""
        end = when.replace(second=0, microsecond=0)
        hours = sorted(self.hours, reverse=True)
        minutes = sorted(self.minutes, reverse=True)
        day = end.date()
        while day >= not_before.date():
            if self.day_matches(day):
                for h in hours:
                    if day == end.date() and h > end.hour:
                        continue
                    for m in minutes:
                        candidate = dt.datetime(day.year, day.month, day.day, h, m)
                        if candidate <= end:
                            return candidate if candidate >= not_before else None
            day -= dt.timedelta(days=1)
        return None


def _value(text: str, name: str, low: int, high: int, names: tuple[str, ...], expr: str) -> int:
    t = text.strip().lower()
    if names and t in names:
        return names.index(t) + (1 if name == "month" else 0)
    try:
        v = int(t)
    except ValueError:
        hint = f" (or a name: {', '.join(names)})" if names else ""
        raise ConfigError(
            f"cron expression {expr!r}: {name} {text!r} is not a number from {low} to {high}{hint}"
        ) from None
    if not low <= v <= high:
        raise ConfigError(f"cron expression {expr!r}: {name} {v} is out of range {low}-{high}")
    return v


def _field(text: str, index: int, expr: str) -> frozenset[int]:
    name, low, high, names = _FIELDS[index]
    out: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ConfigError(f"cron expression {expr!r}: empty item in the {name} field")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            try:
                step = int(step_text)
            except ValueError:
                raise ConfigError(
                    f"cron expression {expr!r}: step {step_text!r} in the {name} field is not a number"
                ) from None
            if step < 1:
                raise ConfigError(f"cron expression {expr!r}: step must be at least 1 in the {name} field")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            first = _value(a, name, low, high, names, expr)
            last = _value(b, name, low, high, names, expr)
            if last < first:
                raise ConfigError(f"cron expression {expr!r}: range {base!r} in the {name} field runs backwards")
        else:
            first = _value(base, name, low, high, names, expr)
            last = high if slash else first
        out.update(range(first, last + 1, step))
    if index == 4 and 7 in out:  # 7 is Sunday too
        out.discard(7)
        out.add(0)
    return frozenset(out)


def parse_cron(text: str) -> CronExpr:
    """Parse a cron expression; raises ConfigError saying which field is wrong."""
    expr = " ".join(text.split())
    fields_text = _MACROS.get(expr.lower(), expr)
    if fields_text.startswith("@"):
        raise ConfigError(f"unknown cron macro {expr!r}; use one of {', '.join(_MACROS)}")
    parts = fields_text.split()
    if len(parts) != 5:
        raise ConfigError(
            f"cron expression {expr!r} has {len(parts)} fields; give 5: minute hour day-of-month month day-of-week"
        )
    sets = [_field(p, i, expr) for i, p in enumerate(parts)]
    cron = CronExpr(
        text=expr,
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=sets[4],
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
    )
    # refuse what can never fire (30 February): checking each month's longest length suffices
    # unless the day of week rescues it (OR semantics)
    if not (cron.days_restricted and cron.weekdays_restricted):
        longest = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
        if not any(d <= longest[m] for m in cron.months for d in cron.days):
            raise ConfigError(f"cron expression {expr!r} never fires: no chosen month has the chosen days")
    return cron

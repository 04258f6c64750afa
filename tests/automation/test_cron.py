"""Cron expressions: parsing, and next-fire times against a minute-by-minute model."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vmvault.automation.cron import parse_cron
from vmvault.errors import ConfigError

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
LIMITS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)]
#: the longest length of each month (29 for February: a leap year comes)
_LONGEST = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}


@st.composite
def field(draw: st.DrawFn, index: int) -> tuple[str, set[int], bool]:
    """A field's text, the set it means (the model), and whether it starts with ``*``."""
    lo, hi = LIMITS[index]

    def name(v: int) -> str:
        if index == 3 and draw(st.booleans()):
            return MONTHS[v - 1]
        if index == 4 and draw(st.booleans()):
            return DAYS[v]
        if index == 4 and v == 0 and draw(st.booleans()):
            return "7"  # Sunday, the other way
        return str(v)

    kind = draw(st.sampled_from(["star", "star-step", "value", "range", "range-step", "list"]))
    if kind == "star":
        return "*", set(range(lo, hi + 1)), True
    if kind == "star-step":
        step = draw(st.integers(1, hi - lo + 1))
        return f"*/{step}", set(range(lo, hi + 1, step)), True
    if kind == "value":
        v = draw(st.integers(lo, hi))
        return name(v), {v}, False
    a = draw(st.integers(lo, hi))
    b = draw(st.integers(a, hi))
    if kind == "range":
        # "7" for Sunday only works as a single value or range end, not as a range start
        return f"{name(a) if a else '0'}-{name(b) if b else '0'}", set(range(a, b + 1)), False
    if kind == "range-step":
        step = draw(st.integers(1, 10))
        return f"{a}-{b}/{step}", set(range(a, b + 1, step)), False
    values = draw(st.lists(st.integers(lo, hi), min_size=1, max_size=4))
    return ",".join(str(v) for v in values), set(values), False


def model_next(sets: list[set[int]], stars: list[bool], after: dt.datetime, limit: dt.timedelta) -> dt.datetime | None:
    """Brute force: try every minute after ``after`` until ``limit`` has passed (a day the
    model rejects is stepped over whole, which changes nothing but the running time)."""
    minute, hour, dom, month, dow = sets
    t = after.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    end = after + limit
    while t <= end:
        day_dom = t.day in dom
        day_dow = (t.isoweekday() % 7) in dow
        day_ok = (day_dom or day_dow) if not stars[2] and not stars[4] else (day_dom and day_dow)
        if not (day_ok and t.month in month):
            t = (t + dt.timedelta(days=1)).replace(hour=0, minute=0)
            continue
        if t.minute in minute and t.hour in hour:
            return t
        t += dt.timedelta(minutes=1)
    return None


@settings(max_examples=300, deadline=None)
@given(
    fields=st.tuples(*(field(i) for i in range(5))),
    after=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2090, 1, 1)),
)
def test_next_fire_matches_a_minute_by_minute_model(
    fields: tuple[tuple[str, set[int], bool], ...], after: dt.datetime
) -> None:
    text = " ".join(f[0] for f in fields)
    sets = [f[1] for f in fields]
    stars = [f[2] for f in fields]
    # the only refusal allowed: a day-of-month no chosen month has (and no weekday OR)
    can_fire = (not stars[2] and not stars[4]) or any(d <= _LONGEST[m] for m in sets[3] for d in sets[2])
    if not can_fire:
        with pytest.raises(ConfigError, match="never fires"):
            parse_cron(text)
    assume(can_fire)
    got = parse_cron(text).next_after(after)
    # the model scans 5 years: enough for all but 29 February combinations; beyond it the
    # answer must at least lie beyond the scanned span and match the model's predicate
    limit = dt.timedelta(days=5 * 366)
    want = model_next(sets, stars, after, limit)
    if want is not None:
        assert got == want, text
    else:
        assert got > after + limit
        assert model_next(sets, stars, got - dt.timedelta(minutes=1), dt.timedelta(minutes=1)) == got


@pytest.mark.parametrize(
    ("expr", "after", "want"),
    [
        ("30 1 * * *", "2026-11-25 01:29", "2026-11-25 01:30"),
        ("30 1 * * *", "2026-11-25 01:30", "2026-11-26 01:30"),
        ("*/15 * * * *", "2026-11-25 10:59:59", "2026-11-25 11:00"),
        ("0 3 * * sun", "2026-11-25 00:00", "2026-11-29 03:00"),
        ("0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"),
        ("0 0 1,15 * mon", "2026-11-25 00:00", "2026-11-30 00:00"),  # OR: Monday 30th comes first
        ("0 12 * jan-mar/2 *", "2026-04-01 00:00", "2027-01-01 12:00"),
        ("@daily", "2026-12-31 23:59", "2027-01-01 00:00"),
        ("@weekly", "2026-11-25 00:00", "2026-11-29 00:00"),
        ("5 4 * * 7", "2026-11-25 00:00", "2026-11-29 04:05"),
    ],
)
def test_examples(expr: str, after: str, want: str) -> None:
    assert parse_cron(expr).next_after(dt.datetime.fromisoformat(after)) == dt.datetime.fromisoformat(want)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "has 4 fields"),
        ("60 * * * *", "minute 60 is out of range 0-59"),
        ("* 24 * * *", "hour 24 is out of range"),
        ("* * 0 * *", "day of month 0 is out of range"),
        ("* * * foo *", "month 'foo' is not a number"),
        ("* * * * 8", "day of week 8 is out of range"),
        ("5-1 * * * *", "runs backwards"),
        ("*/0 * * * *", "step must be at least 1"),
        ("*/x * * * *", "step 'x'"),
        ("1,,2 * * * *", "empty item"),
        ("0 0 30 2 *", "never fires"),
        ("@often", "unknown cron macro"),
    ],
)
def test_errors_say_which_field(expr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_cron(expr)


def _for_croniter(field_text: str, index: int) -> str:
    """The same field in a spelling croniter reads right: croniter 7 mis-reads a range whose
    two ends are equal ("5-5", "3-wed", also with a step), which means that one value."""
    names = {3: {n: str(i + 1) for i, n in enumerate(MONTHS)}, 4: {n: str(i) for i, n in enumerate(DAYS)}}.get(
        index, {}
    )
    items = []
    for item in field_text.split(","):
        spelled = re.sub(r"[a-z]+", lambda m: names[m.group(0)], item)
        items.append(re.sub(r"^(\d+)-\1(/\d+)?$", r"\1", spelled))
    return ",".join(items)


@settings(max_examples=3000, deadline=None)
@given(
    fields=st.tuples(*(field(i) for i in range(5))),
    after=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2090, 1, 1)),
)
def test_next_fire_agrees_with_croniter(fields: tuple[tuple[str, set[int], bool], ...], after: dt.datetime) -> None:
    """croniter is the independent oracle (see the module docstring of automation/cron.py).

    Two differences are bridged, both croniter's: the equal-ends range above, and the day
    rule. crontab(5) (Vixie cron, cronie) ORs the two day fields only when neither starts
    with ``*``, so ``*/2`` counts as unrestricted; croniter ORs whenever neither is exactly
    ``*``. Passing ``day_or`` as crontab(5) decides it makes croniter apply the same rule."""
    croniter = pytest.importorskip("croniter").croniter
    text = " ".join(f[0] for f in fields)
    sets = [f[1] for f in fields]
    stars = [f[2] for f in fields]
    assume((not stars[2] and not stars[4]) or any(d <= _LONGEST[m] for m in sets[3] for d in sets[2]))
    got = parse_cron(text).next_after(after)
    oracle = croniter(
        " ".join(_for_croniter(f[0], i) for i, f in enumerate(fields)), after, day_or=not (stars[2] or stars[4])
    )
    assert got == oracle.get_next(dt.datetime), text


def model_last(sets: list[set[int]], stars: list[bool], at: dt.datetime, floor: dt.datetime) -> dt.datetime | None:
    """Brute force backwards: every minute from ``at`` down to ``floor``."""
    minute, hour, dom, month, dow = sets
    t = at.replace(second=0, microsecond=0)
    while t >= floor:
        day_dom = t.day in dom
        day_dow = (t.isoweekday() % 7) in dow
        day_ok = (day_dom or day_dow) if not stars[2] and not stars[4] else (day_dom and day_dow)
        if not (day_ok and t.month in month):
            t = t.replace(hour=0, minute=0) - dt.timedelta(minutes=1)
            continue
        if t.minute in minute and t.hour in hour:
            return t
        t -= dt.timedelta(minutes=1)
    return None


@settings(max_examples=300, deadline=None)
@given(
    fields=st.tuples(*(field(i) for i in range(5))),
    at=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2090, 1, 1)),
    days=st.integers(0, 60),
)
def test_last_firing_matches_a_minute_by_minute_model(
    fields: tuple[tuple[str, set[int], bool], ...], at: dt.datetime, days: int
) -> None:
    """The catch-up's question: the last firing at or before a moment, not before a floor."""
    text = " ".join(f[0] for f in fields)
    sets = [f[1] for f in fields]
    stars = [f[2] for f in fields]
    assume((not stars[2] and not stars[4]) or any(d <= _LONGEST[m] for m in sets[3] for d in sets[2]))
    floor = at - dt.timedelta(days=days, minutes=17)
    assert parse_cron(text).last_at_or_before(at, floor) == model_last(sets, stars, at, floor), text


@settings(max_examples=1000, deadline=None)
@given(
    fields=st.tuples(*(field(i) for i in range(5))),
    at=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2090, 1, 1)),
)
def test_last_firing_agrees_with_croniter(fields: tuple[tuple[str, set[int], bool], ...], at: dt.datetime) -> None:
    """croniter's get_prev is the oracle (strictly before: asked from one minute on)."""
    croniter = pytest.importorskip("croniter").croniter
    text = " ".join(f[0] for f in fields)
    stars = [f[2] for f in fields]
    sets = [f[1] for f in fields]
    assume((not stars[2] and not stars[4]) or any(d <= _LONGEST[m] for m in sets[3] for d in sets[2]))
    minute = at.replace(second=0, microsecond=0)
    oracle = croniter(
        " ".join(_for_croniter(f[0], i) for i, f in enumerate(fields)),
        minute + dt.timedelta(minutes=1),
        day_or=not (stars[2] or stars[4]),
    )
    want = oracle.get_prev(dt.datetime)
    got = parse_cron(text).last_at_or_before(at, dt.datetime(1990, 1, 1))
    assert got == want, text


def test_last_firing_examples() -> None:
    nightly = parse_cron("30 1 * * *")
    at = dt.datetime(2026, 11, 25, 10, 3, 27)
    assert nightly.last_at_or_before(at, at - dt.timedelta(days=1)) == dt.datetime(2026, 11, 25, 1, 30)
    assert nightly.last_at_or_before(dt.datetime(2026, 11, 25, 1, 30), at - dt.timedelta(days=2)) == dt.datetime(
        2026, 11, 25, 1, 30
    )
    assert nightly.last_at_or_before(at, dt.datetime(2026, 11, 25, 1, 31)) is None  # before the floor
    weekly = parse_cron("0 3 * * sun")
    assert weekly.last_at_or_before(at, at - dt.timedelta(days=7)) == dt.datetime(2026, 11, 22, 3, 0)

"""--keep-within and --keep-within-<period>: relative to each group's newest snapshot."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmvault.errors import ConfigError
from vmvault.repo.retention import RetentionPolicy, apply_policy
from vmvault.repo.snapshot import Snapshot

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def snap(when: dt.datetime, vm: str = "web01", n: int = 0) -> Snapshot:
    return Snapshot(
        time=when.isoformat(),
        hostname="h",
        username="u",
        source={"kind": "files", "location": f"/srv/{vm}"},
        vm={"name": vm},
        id=f"{vm}{n:060d}"[:64].ljust(64, "0"),
    )


@given(
    st.lists(st.integers(min_value=0, max_value=200 * 24), min_size=1, max_size=20, unique=True), st.integers(1, 400)
)
def test_within_keeps_exactly_what_is_younger_than_the_newest_minus_the_window(hours: list[int], window_h: int) -> None:
    snaps = [snap(T0 + dt.timedelta(hours=h), n=i) for i, h in enumerate(hours)]
    result = apply_policy(snaps, RetentionPolicy(within=window_h * 3600.0))
    newest = max(hours)
    assert {s.id for s in result.keep} == {s.id for s, h in zip(snaps, hours, strict=True) if newest - h < window_h}


def test_within_daily_keeps_the_newest_of_each_day_in_the_window() -> None:
    snaps = [snap(T0 + dt.timedelta(hours=6 * i), n=i) for i in range(20)]  # 5 days, 4 a day
    result = apply_policy(snaps, RetentionPolicy(within_daily=3 * 86400.0))
    kept = sorted(dt.datetime.fromisoformat(s.time) for s in result.keep)
    # newest is day 5 18:00; the window reaches back 3 days: days 3, 4 and 5 (its newest each)
    assert kept == [T0 + dt.timedelta(days=d, hours=18) for d in (2, 3, 4)]
    assert result.keep[0].id in result.groups[0].reasons and "daily within 3d" in result.reasons(result.keep[0].id)


def test_groups_are_judged_each_from_its_own_newest() -> None:
    old_vm = [snap(T0 + dt.timedelta(days=i), "old", i) for i in range(3)]  # stopped being backed up
    new_vm = [snap(T0 + dt.timedelta(days=100 + i), "new", i) for i in range(3)]
    result = apply_policy(old_vm + new_vm, RetentionPolicy(within=1.5 * 86400))
    assert {s.id for s in result.keep} == {old_vm[1].id, old_vm[2].id, new_vm[1].id, new_vm[2].id}


def test_bad_windows_are_refused() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError):
            RetentionPolicy(within=bad)
    assert RetentionPolicy(within_yearly=1.0).empty() is False

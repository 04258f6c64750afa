"""How times and durations are shown: exact durations, local times with their zone."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.automation.conftest import host_zone
from vmvault.automation.config import parse_duration
from vmvault.automation.times import duration, iso_time, local_time, zone_name


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.23, "0.23s"),  # not "1s", not "0s"
        (0.005, "0.01s"),
        (1.5, "1.5s"),
        (9.994, "9.99s"),
        (9.996, "10s"),
        (12.34, "12.3s"),
        (59.94, "59.9s"),
        (59.96, "1m"),
        (60, "1m"),
        (90, "1m 30s"),  # max_age = "90s" is not "2 minutes"
        (120, "2m"),
        (3600, "1h"),
        (26 * 3600, "1d 2h"),
        (93784, "1d 2h 3m 4s"),
        (86400 + 5, "1d 5s"),
        (-90, "-1m 30s"),
    ],
)
def test_durations_are_exact(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@given(st.integers(min_value=60, max_value=10**9))
def test_a_duration_reads_back_as_the_same_number_of_seconds(seconds: int) -> None:
    """What vmvault prints is what it reads: durations in messages can be pasted into the
    configuration."""
    assert parse_duration(duration(seconds)) == seconds


def test_local_times_carry_their_zone() -> None:
    winter = dt.datetime(2026, 11, 25, 1, 30, tzinfo=dt.UTC)
    summer = dt.datetime(2026, 7, 1, 1, 30, tzinfo=dt.UTC)
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    assert local_time(winter, berlin) == "2026-11-25 02:30:00 CET"
    assert local_time(summer, berlin) == "2026-07-01 03:30:00 CEST"
    assert local_time(winter, dt.UTC, seconds=False) == "2026-11-25 01:30 UTC"
    assert local_time(winter, zoneinfo.ZoneInfo("America/New_York")) == "2026-11-24 20:30:00 EST"
    assert zone_name(berlin) == "Europe/Berlin"
    assert iso_time(winter.astimezone(berlin)) == "2026-11-25T02:30:00+01:00"


def test_host_local_time_names_the_host_zone() -> None:
    with host_zone("Asia/Kolkata"):
        when = dt.datetime(2026, 11, 25, 1, 30, tzinfo=dt.UTC)
        assert local_time(when) == "2026-11-25 07:00:00 IST"
        assert zone_name(None) == "the host's local time (IST)"

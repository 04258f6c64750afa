"""vmvault.times for the command line: stored times shown locally with their zone (or UTC),
ISO 8601 with offset, countdowns. Durations and zones: tests/automation/test_times.py."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmvault import times


@pytest.fixture()
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.delenv("TZ")
    time.tzset()


def test_local_time_carries_its_zone_abbreviation(berlin: None) -> None:
    assert times.local("2026-01-15T12:00:00+00:00", utc=False) == "2026-01-15 13:00:00 CET"
    assert times.local("2026-07-15T12:00:00+00:00", utc=False) == "2026-07-15 14:00:00 CEST"
    # naive stored times are UTC; epoch seconds and datetimes are accepted alike
    assert times.local("2026-01-15T12:00:00", utc=False) == "2026-01-15 13:00:00 CET"
    assert times.local(dt.datetime(2026, 1, 15, 12, tzinfo=dt.UTC).timestamp(), utc=False).endswith("13:00:00 CET")


def test_utc_switch(berlin: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert times.local("2026-01-15T12:00:00+00:00", utc=True) == "2026-01-15 12:00:00 UTC"
    monkeypatch.setenv("VMVAULT_UTC", "1")
    assert times.local("2026-01-15T12:00:00+00:00") == "2026-01-15 12:00:00 UTC"
    times.force_utc(False)  # forced local time wins over the environment
    try:
        assert times.local("2026-01-15T12:00:00+00:00") == "2026-01-15 13:00:00 CET"
    finally:
        times.force_utc(None)


def test_unreadable_and_missing_times_are_shown_not_raised() -> None:
    assert times.local(None) == "-"
    assert times.local("yesterday-ish") == "yesterday-ish"


def test_iso_has_an_offset_always() -> None:
    assert times.iso_time("2026-01-15T13:00:00.123456+01:00") == "2026-01-15T13:00:00+01:00"
    assert times.iso_time(0.0) == "1970-01-01T00:00:00+00:00"
    assert times.iso_time("2026-01-15T12:00:00") == "2026-01-15T12:00:00+00:00"
    assert times.iso_time(None) is None
    for bad in (float("nan"), "soon", True):
        with pytest.raises(ValueError):
            times.iso_time(bad)


def test_the_automation_name_is_the_same_module() -> None:
    from vmvault.automation import times as automation_times

    assert automation_times.duration is times.duration and automation_times.local_time is times.local_time


def test_clock_rounds_up_a_countdown() -> None:
    assert times.clock(0.2) == "0:01"
    assert times.clock(59.5) == "1:00"
    assert times.clock(3725) == "1:02:05"
    assert times.clock(float("inf")) == "?"


def test_module_imports_nothing_of_vmvault() -> None:
    source = Path(times.__file__).read_text(encoding="utf-8")
    assert "from vmvault" not in source and "import vmvault" not in source


def test_progress_eta_waits_for_a_rate_and_never_shows_zero_early() -> None:
    from vmvault.cli.progress import eta_text

    assert eta_text(139, 1000, 0.5) == "ETA -:--"  # 13.9 % after half a second: no estimate yet
    assert eta_text(0, 1000, 10.0) == "ETA -:--"
    assert eta_text(139, 1000, 10.0) == "ETA 1:02"  # 861 left at 13.9 per second
    assert eta_text(999, 1000, 10.0) == "ETA 0:01"  # rounded up: not 0:00 before the end
    assert eta_text(1000, 1000, 10.0) == "ETA 0:00"

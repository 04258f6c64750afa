"""``vmvault.waits``: ``within`` (a call's result or exception, or the caller's error once the
limit passed) and ``alarm`` (an action at a limit unless cancelled)."""

from __future__ import annotations

import threading
import time

import pytest

from vmvault import waits
from vmvault.waits import alarm, within


def test_a_result_an_exception_and_a_call_that_does_not_end() -> None:
    assert within(5, lambda: 42, name="t", late=lambda: AssertionError("late")) == 42

    def fails() -> None:
        raise KeyError("from the call")

    with pytest.raises(KeyError, match="from the call"):
        within(5, fails, name="t", late=lambda: AssertionError("late"))
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="gave up"):
        within(0.2, lambda: release.wait(30), name="vmvault-test-late", late=lambda: TimeoutError("gave up"))
    assert time.monotonic() - started < 5
    left = [t for t in threading.enumerate() if t.name == "vmvault-test-late"]
    assert left and left[0].daemon  # left to end in its thread, which does not keep a command alive
    release.set()
    left[0].join(5)


def test_an_alarm_runs_its_action_once_when_due_and_never_once_cancelled() -> None:
    rang: list[str] = []
    late = alarm(0.2, lambda: rang.append("late"))
    kept = alarm(0.05, lambda: rang.append("kept"))
    cancelled = alarm(0.1, lambda: rang.append("cancelled"))
    cancelled.cancel()
    deadline = time.monotonic() + 5
    while len(rang) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert rang == ["kept", "late"]  # in the order due, not the order set
    assert kept.fired and late.fired and not cancelled.fired
    late.cancel()  # after it ran: nothing changes
    assert late.fired and rang == ["kept", "late"]


def test_many_alarms_share_one_thread() -> None:
    before = threading.active_count()
    alarms = [alarm(30, lambda: None) for _ in range(500)]
    assert threading.active_count() <= before + 1
    for a in alarms:
        a.cancel()
    assert not any(a.fired for a in alarms)
    assert len(waits._alarms) < 100  # cancelled ones do not pile up until they would be due

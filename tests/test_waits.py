"""``vmvault.waits.within``: a call's result or exception, or the caller's error once the limit passed."""

from __future__ import annotations

import threading
import time

import pytest

from vmvault.waits import within


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

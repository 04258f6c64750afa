"""Waiting on a party that may never answer: a call run in a thread of its own and given up
after a limit.

Some calls cannot be interrupted: the libvirt binding's C call waiting on a QEMU that stopped,
a library reading from a server that sends a byte now and then (each wait on its socket is
bounded, the whole answer is not). :func:`within` leaves such a call to end in its thread (a
daemon thread, so a command can still exit) and tells the caller it did not end in time; the
caller goes on knowing that what it asked may still happen. :func:`alarm` is the other way
round: the caller waits in the call, and an action (shutting a socket down) ends the wait at a
limit. This module imports nothing else of vmvault, so every layer may use it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["Alarm", "alarm", "within"]

T = TypeVar("T")


def within(seconds: float, call: Callable[[], T], *, name: str, late: Callable[[], BaseException]) -> T:
    """``call()``'s result (or its exception, raised here), or ``late()`` raised when it has not
    ended after ``seconds``. ``name`` names the thread."""
    outcome: list[tuple[bool, object]] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    if not done.wait(seconds):
        raise late()
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]


class Alarm:
    """An action due at a time (:func:`alarm`); :meth:`cancel` before then and it never runs.
    ``fired``: it ran."""

    def __init__(self, due: float, action: Callable[[], None]) -> None:
        self.due = due
        self.action: Callable[[], None] | None = action
        self.fired = False

    def cancel(self) -> None:
        global _cancelled
        with _clock:
            if self.action is None:
                return
            self.action = None
            _cancelled += 1
            if _cancelled > 64 and 2 * _cancelled > len(_alarms):  # most of the heap is dead: drop it
                _alarms[:] = [entry for entry in _alarms if entry[2].action is not None]
                heapq.heapify(_alarms)
                _cancelled = 0


_clock = threading.Condition()
_alarms: list[tuple[float, int, Alarm]] = []
_order = itertools.count()
_ringer: threading.Thread | None = None
_cancelled = 0  # cancelled alarms still in the heap


def alarm(seconds: float, action: Callable[[], None]) -> Alarm:
    """Run ``action`` in a shared thread after ``seconds`` unless cancelled first. One thread
    serves every alarm of the process (an alarm per request costs no thread). Actions run under
    the alarms' lock, so that none runs once its :meth:`Alarm.cancel` has returned: they must be
    quick, must not raise and must not set alarms."""
    global _ringer
    item = Alarm(time.monotonic() + seconds, action)
    with _clock:
        heapq.heappush(_alarms, (item.due, next(_order), item))
        if _ringer is None or not _ringer.is_alive():
            _ringer = threading.Thread(target=_ring, name="vmvault-alarms", daemon=True)
            _ringer.start()
        _clock.notify()
    return item


def _ring() -> None:
    global _cancelled
    while True:
        with _clock:
            while not _alarms or _alarms[0][0] > time.monotonic():
                _clock.wait(None if not _alarms else _alarms[0][0] - time.monotonic())
            _due, _n, item = heapq.heappop(_alarms)
            if item.action is None:
                _cancelled = max(0, _cancelled - 1)
            else:  # under the lock: once cancel() returns it cannot run
                item.fired = True
                action, item.action = item.action, None
                action()

"""Waiting on a party that may never answer: a call run in a thread of its own and given up
after a limit.

Some calls cannot be interrupted: the libvirt binding's C call waiting on a QEMU that stopped,
a library reading from a server that sends a byte now and then (each wait on its socket is
bounded, the whole answer is not). :func:`within` leaves such a call to end in its thread (a
daemon thread, so a command can still exit) and tells the caller it did not end in time; the
caller goes on knowing that what it asked may still happen. This module imports nothing else
of vmvault, so every layer may use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["within"]

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

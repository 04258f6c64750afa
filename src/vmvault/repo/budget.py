"""A byte budget shared by the threads of one pipeline (a backup's reads, sealed chunks and packs).

A count of buffers in flight bounds memory only as well as the buffers are small and alike, and
how full the queues get depends on which stage is the slowest at the time; one budget of bytes
across every stage bounds what the pipeline holds whatever the timing.

Bytes are *taken* by the one thread that feeds the pipeline (it waits while others will give
back), *charged* without waiting where waiting could stall the thread that would give back,
and *given* back by whoever frees them. A thread that will give bytes back later (an upload)
says so with ``begin_release``, so a ``take`` only waits when something will be freed: the
budget can be overrun (by what one ``take`` asks) but never deadlock.
"""

from __future__ import annotations

import threading

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """``limit`` bytes; ``used`` now, ``peak`` the most ever held. Thread-safe."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a memory budget of {limit} bytes")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._releasing = 0
        self._cond = threading.Condition()

    def fits(self, n: int) -> bool:
        """Whether ``n`` more bytes fit now."""
        with self._cond:
            return self.used + n <= self.limit

    def take(self, n: int, *, room: int = 0) -> None:
        """Hold ``n`` bytes, first waiting while ``n + room`` do not fit and another thread will
        give bytes back (``begin_release``). ``room`` keeps headroom for what the caller may
        charge next without waiting."""
        with self._cond:
            while self.used + n + room > self.limit and self._releasing:
                self._cond.wait()
            self._hold(n)

    def charge(self, n: int) -> None:
        """Hold ``n`` bytes without waiting."""
        with self._cond:
            self._hold(n)

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def begin_release(self) -> None:
        """Another thread will give bytes back (``end_release``): a ``take`` may wait for it."""
        with self._cond:
            self._releasing += 1

    def end_release(self, n: int) -> None:
        """Give ``n`` bytes back and end what ``begin_release`` began."""
        with self._cond:
            self.used -= n
            self._releasing -= 1
            self._cond.notify_all()

    def _hold(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

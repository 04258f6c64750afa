"""Bounded retries with exponential backoff for remote backends.

A remote call that fails with a *transient* error (a dropped connection, a refused
connect while the server restarts, a read that stops half-way) is tried again after a
growing, jittered delay. When the attempts are spent the caller gets a
``BackendConnectionError`` that says what was tried, for how long, and the last cause.
Permanent errors (missing object, permission denied, full disk) are never retried: the
caller's ``classify`` function decides which is which.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from vmvault.errors import BackendConnectionError

__all__ = ["RetryPolicy", "TransientError", "call_with_retry"]

_log = logging.getLogger(__name__)

T = TypeVar("T")


class TransientError(Exception):
    """Wraps a failure that a new attempt may cure (the backend decides which those are)."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(str(cause))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry. ``attempts`` counts the first try."""

    attempts: int = 6
    initial_delay: float = 0.25
    max_delay: float = 8.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def delays(self) -> Iterator[float]:
        """The waits between attempts: exponential, capped, with +-25 % jitter so that
        several threads that failed together do not reconnect in lock step."""
        delay = self.initial_delay
        for _ in range(self.attempts - 1):
            yield min(self.max_delay, delay) * random.uniform(0.75, 1.25)
            delay *= self.multiplier


def call_with_retry(
    operation: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    describe: str,
    on_retry: Callable[[BaseException], None] | None = None,
    name: str | None = None,
) -> T:
    """Run ``operation`` until it succeeds, fails permanently, or the attempts run out.

    ``describe`` completes "gave up on ..." in the final message (it should name the
    backend URL and the object). ``on_retry`` runs after each transient failure, before
    the wait (for example to drop a broken connection from a pool). An exception for which
    ``is_transient`` is false propagates unchanged.
    """
    started = time.monotonic()
    delays = policy.delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if on_retry is not None:
                on_retry(exc)
            delay = next(delays, None)
            if delay is None:
                elapsed = time.monotonic() - started
                raise BackendConnectionError(
                    f"gave up on {describe} after {attempt} attempts over {elapsed:.1f} s: {_cause(exc)}",
                    name=name,
                ) from exc
            _log.warning("%s failed (attempt %d, %s); retrying in %.2f s", describe, attempt, _cause(exc), delay)
            time.sleep(delay)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TransientError):
        exc = exc.cause
    text = str(exc) or "no details"
    return f"{type(exc).__name__}: {text}"

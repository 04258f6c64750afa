"""Bounded retries with exponential backoff for remote backends.

A remote call that fails with a *transient* error (a dropped connection, a refused
connect while the server restarts, a read that stops half-way) is tried again after a
growing, jittered delay. When the attempts are spent the caller gets a
``BackendConnectionError`` that says what was tried, for how long, and the last cause.
Permanent errors (missing object, permission denied, full disk) are never retried: the
caller's ``classify`` function decides which is which.

A server that cannot be reached at all on the *first* connection (refused, no route, a name
that does not resolve) is not a transient fault: it is a wrong location or a server that is
down, and ``vmvault init`` or a backup should say so at once. Backends check
:func:`unreachable_reason` on their first connection and raise without retrying; retries
are for faults after the server has answered once.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from vmvault.errors import BackendConnectionError

__all__ = ["RetryPolicy", "TransientError", "call_with_retry", "unreachable_reason"]

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


_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTDOWN: "host is down",
    errno.EADDRNOTAVAIL: "address not available",
}


def unreachable_reason(exc: BaseException) -> str | None:
    """A short reason when ``exc`` (or what caused it) says the server cannot be reached at
    all: "connection refused", "no route to host", "host name not found", "timed out"; None
    for anything else. Looks through ``TransientError``, ``__cause__``/``__context__``, the
    arguments of wrapping exceptions and paramiko's per-address ``errors`` mapping."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, socket.gaierror):
            return "host name not found"
        if isinstance(item, TimeoutError | socket.timeout):
            return "timed out"
        if isinstance(item, OSError) and item.errno in _UNREACHABLE_ERRNOS:
            return _UNREACHABLE_ERRNOS[item.errno]
        if isinstance(item, TransientError):
            todo.append(item.cause)
        todo.extend((item.__cause__, item.__context__, *item.args))
        errors = getattr(item, "errors", None)  # paramiko's NoValidConnectionsError
        if isinstance(errors, dict):
            todo.extend(errors.values())
        kwargs = getattr(item, "kwargs", None)  # botocore keeps the cause in kwargs["error"]
        if isinstance(kwargs, dict):
            todo.append(kwargs.get("error"))
    return None

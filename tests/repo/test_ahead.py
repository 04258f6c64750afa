"""ahead: whole objects read ahead of their caller in a few threads, given back in order,
bounded in count and bytes; a failure raised where it belongs, nothing read past it."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from vmvault.errors import BackendConnectionError
from vmvault.repo.ahead import ahead


def test_ahead_keeps_the_order_and_its_bounds_and_raises_where_the_failure_is() -> None:
    running = most = 0
    lock = threading.Lock()
    started: list[int] = []

    def work(n: int) -> int:
        nonlocal running, most
        with lock:
            started.append(n)
            running += 1
            most = max(most, running)
        try:
            time.sleep(random.Random(n).random() * 0.02)  # finishing out of order
            if n == 13:
                raise BackendConnectionError("gave up on reading object 13: connection reset")
            return n * n
        finally:
            with lock:
                running -= 1

    got = list(ahead(((n, 10) for n in range(12)), work, workers=4, max_weight=100))
    assert got == [(n, n * n) for n in range(12)] and most == 4
    most = 0
    assert [n for n, _ in ahead(((n, 30) for n in range(12)), work, workers=4, max_weight=100)] == list(range(12))
    assert most <= 3, "the weights held at once stay within max_weight"
    most = 0
    assert len(list(ahead(((n, 500) for n in range(5)), work, workers=4, max_weight=100))) == 5
    assert most == 1, "an item heavier than max_weight still goes, alone"
    started.clear()
    delivered = []
    with pytest.raises(BackendConnectionError, match="object 13"):
        for n, _ in ahead(((n, 1) for n in range(40)), work, workers=4, max_weight=100):
            delivered.append(n)
    assert delivered == list(range(13))
    time.sleep(0.1)
    assert max(started) < 13 + 4 + 1, "nothing beyond the failure and the reads already queued"


def test_ahead_stopped_early_queues_nothing_more() -> None:
    calls: list[int] = []
    source_taken: list[int] = []

    def items() -> Iterator[tuple[int, int]]:
        for n in range(100):
            source_taken.append(n)
            yield n, 1

    gen = ahead(items(), lambda n: calls.append(n) or n, workers=2, max_weight=100)
    assert next(gen) == (0, 0)
    gen.close()
    time.sleep(0.05)
    assert len(source_taken) <= 3 and len(calls) <= 3

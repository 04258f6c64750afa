"""Whole objects read and verified ahead of their caller, in order, bounded in count and bytes.

A command that goes through many objects one after another (``check --read-data``'s packs,
prune's repack, ``repair index``'s packs, the index files a sync or a check reads) spends a
round trip on each from remote storage, and a core on verifying each. :func:`ahead` runs that
work in a few threads ahead of the caller, as many objects at once as the storage serves best
(``Backend.prepare_reads``), and gives the results back in the caller's order, so that what the
caller does with them (reports, database rows, new packs) is as when they came one at a time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from vmvault.repo._limits import MAX_INDEX_FILE

__all__ = ["PACKS_AHEAD", "ahead", "index_file_weight"]

T = TypeVar("T")
R = TypeVar("R")

#: bytes of whole objects (packs, index files) read ahead of their caller at once, at most
PACKS_AHEAD = 128 << 20


def index_file_weight(listed_size: int) -> int:
    """What an index file of ``listed_size`` bytes (0: not known) weighs read ahead: its size,
    at most what any index file may be; one of unknown size all of :data:`PACKS_AHEAD` (read
    alone)."""
    return min(listed_size, MAX_INDEX_FILE) if listed_size > 0 else PACKS_AHEAD


def ahead(
    items: Iterable[tuple[T, int]], work: Callable[[T], R], *, workers: int, max_weight: int
) -> Generator[tuple[T, R], None, None]:
    """``(item, work(item))`` for each ``(item, weight)`` of ``items``, in their order, with
    ``work`` running ahead of the caller in ``workers`` threads: at most ``workers`` items at
    once, whose weights (their bytes, say) add up to at most ``max_weight`` (always at least
    one). For whole objects read and verified one after another (``check --read-data``'s packs,
    prune's repack), where each read is a round trip and each verification a core's work.

    ``items`` is advanced in the caller's thread, only as room frees up (it may do work that
    must stay in that thread, such as queries of a database). An exception of ``work`` is
    raised where its item is reached; then, or when the caller stops early, the items queued
    behind it are dropped (those already running finish)."""
    source = iter(items)
    pending: collections.deque[tuple[T, int, Future[R]]] = collections.deque()
    held = 0
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmvault-ahead") as pool:
        try:
            for item, weight in source:
                while pending and (len(pending) >= max(1, workers) or held + weight > max_weight):
                    done, done_weight, future = pending.popleft()
                    held -= done_weight
                    yield done, future.result()
                pending.append((item, weight, pool.submit(work, item)))
                held += weight
            while pending:
                done, done_weight, future = pending.popleft()
                held -= done_weight
                yield done, future.result()
        finally:
            for _item, _weight, future in pending:
                future.cancel()

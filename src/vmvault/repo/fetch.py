"""Reading many blobs with few requests: runs of one pack's blobs in one ranged read.

A restore, and a reader's read-ahead, want chunks in disk order. A backup wrote them into
packs in about that order (its worker threads interleave 4 MiB batches), so the chunks a
restore wants next mostly lie side by side in one pack. Reading each with its own ranged
read costs a round trip per 256 KiB chunk: fine on a local disk, minutes per GiB against an
object store 20-50 ms away. :class:`BlobFetcher` reads them in runs instead.

``BlobFetcher.fetch(wanted)`` takes ``(key, blob_id)`` pairs in the order the caller needs
them (``blob_id`` None for a piece that needs no blob) and yields ``(key, result)`` in that
same order: the blob's plaintext, None for None, or the ``IntegrityError`` reading that blob
alone would raise.

Planning. Requests are taken in batches of up to ``batch_bytes`` of plaintext (half of
``max_bytes``: the larger a plan, the more of the runs a backup's workers interleaved in a pack
it joins; on the 1 GiB test image 64 MiB planned ahead took 161 reads with 48 MiB of gaps read,
a quarter as large a plan 231 with 96 MiB). Requests are looked up in the index
in groups of ``_LOOKUP_GROUP``, one query each (one query per chunk cost a 4 GiB restore
0.2 s of the planning thread on a quiet machine, and a wait for the GIL after every query
when it was busy). A batch's
blobs are grouped by pack (each blob's first indexed copy), sorted by offset and cut into
ranges: a blob joins the range before it when at most ``max_gap`` unwanted bytes lie between
them and the range stays within ``max_range`` bytes, sealed and plaintext. Each range is one
``backend.get_into(pack, offset, length, buffer)``, run in a pool of ``max_requests`` threads,
which then opens (decrypts, decompresses, verifies against its id) each of its blobs. Each thread
reads into a buffer of its own, reused range after range (a local repository reads into it past
the page cache; the others return their bytes). Ranges are sent in the order the caller needs
their first blob.

Memory, whatever the size of what is restored: at most ``max_bytes`` of plaintext planned
ahead (being fetched, or fetched and not yet taken by the caller), plus one batch (96 MiB with
the defaults); a range holds at most ``max_range`` sealed bytes while its blobs are opened, in
its thread's buffer (``max_range`` and 8 KiB, kept for the thread's life).

Failures. A blob that does not open from its range (damaged, cut short, its pack missing or
replaced by a link) is read again alone through ``Repository.get_blob``, which tries every
indexed copy: a damaged chunk is reported exactly as a read of it alone reports it, and only
that chunk; the rest of its range is delivered. Errors of the storage itself (a
``BackendError`` once the backend's own retries are spent) are raised to the caller when it
reaches the first blob of the range that failed.
"""

from __future__ import annotations

import collections
import itertools
import mmap
import threading
from collections.abc import Generator, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

from vmvault import platform
from vmvault.errors import IntegrityError, ObjectNotFoundError, UnsafeStorageError
from vmvault.repo._layout import BlobType
from vmvault.repo.index import BlobLocation
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_GAP", "DEFAULT_MAX_RANGE", "BlobFetcher", "FetchStats"]

K = TypeVar("K")

#: the largest ranged read, sealed and plaintext
DEFAULT_MAX_RANGE = 8 << 20
#: unwanted bytes read to join two blobs of a pack into one range
DEFAULT_MAX_GAP = 1 << 20
#: plaintext planned ahead of the caller, at most
DEFAULT_MAX_BYTES = 64 << 20

Result = bytes | IntegrityError | None

#: requests in one plan, and planned ahead, at most (pieces that need no blob count too)
_MAX_BATCH = 4096
_MAX_PENDING = 4 * _MAX_BATCH
#: requests whose blobs are looked up in the index with one query
_LOOKUP_GROUP = 500

#: each reading thread's buffer for its ranges (``Backend.get_into``)
_buffers = threading.local()


def _read_buffer(length: int) -> mmap.mmap:
    """This thread's page-aligned buffer for a range of ``length`` bytes: one per thread, reused
    by its every range (a range's blobs are opened, into bytes of their own, before the thread
    reads the next), made larger when a range needs it. A buffer replaced is never closed here:
    it goes when the last view of it does."""
    need = max(length, DEFAULT_MAX_RANGE) + 2 * platform.DIRECT_ALIGN
    buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < need:
        buffer = _buffers.buffer = mmap.mmap(-1, need)
    return buffer


@dataclass
class FetchStats:
    """What a fetcher did: ranges read, blobs delivered, bytes read that no request wanted."""

    ranges: int = 0
    blobs: int = 0
    #: blobs read again alone after they did not open from their range
    retried_alone: int = 0
    gap_bytes: int = 0
    #: the most plaintext that was planned ahead of the caller at once
    peak_planned_bytes: int = 0


@dataclass
class _Range:
    """One ranged read of a pack, or (``loc`` None) one blob read alone through ``get_blob``."""

    pack_id: bytes
    offset: int
    length: int
    raw: int
    #: the blobs to read, with where (None: read alone through ``get_blob``)
    blobs: dict[bytes, BlobLocation | None] = field(default_factory=dict)
    #: requests of the batch still to take each blob's result
    uses: collections.Counter[bytes] = field(default_factory=collections.Counter)
    first: int = 0
    future: Future[dict[bytes, bytes | IntegrityError]] | None = None
    alone: bool = False


@dataclass
class _Request(Generic[K]):
    key: K
    blob_id: bytes | None
    loc: BlobLocation | None
    #: plaintext bytes counted against ``max_bytes`` for it
    raw: int
    range: _Range | None = None


class BlobFetcher:
    """Fetches blobs of one type from ``repo`` in coalesced ranged reads (module docstring).

    ``executor``: a pool to run the reads in (reads queued in it hold no memory until they
    run); without one the fetcher makes its own of ``max_requests`` threads and shuts it down
    in ``close``. ``max_requests=0`` reads in the calling thread, one range after another (for
    callers that are themselves a background thread, such as read-ahead).
    """

    def __init__(
        self,
        repo: Repository,
        blob_type: BlobType = BlobType.DATA,
        *,
        max_requests: int = 4,
        max_range: int = DEFAULT_MAX_RANGE,
        max_gap: int = DEFAULT_MAX_GAP,
        max_bytes: int = DEFAULT_MAX_BYTES,
        executor: Executor | None = None,
    ) -> None:
        if max_requests < 0 or max_range < 1 or max_gap < 0 or max_bytes < 1:
            raise ValueError("max_requests and max_gap must be >= 0, max_range and max_bytes >= 1")
        self.repo = repo
        self.blob_type = blob_type
        self.max_requests = max_requests
        self.max_range = max_range
        self.max_gap = max_gap
        self.max_bytes = max_bytes
        #: plaintext taken into one plan: half of what may be planned ahead, so the next
        #: batch's reads go out while the caller takes the previous one's
        self.batch_bytes = max(1, max_bytes // 2)
        self.stats = FetchStats()
        self._stats_lock = threading.Lock()
        self._own_pool = executor is None and max_requests > 0
        self._executor: Executor | None = (
            ThreadPoolExecutor(max_requests, thread_name_prefix="vmvault-fetch") if self._own_pool else executor
        )

    # ---------------------------------------------------------------------------- planning

    def _locations(self, blob_ids: list[bytes]) -> dict[bytes, BlobLocation | None]:
        """The copy of each blob to read in a range: its first indexed one, if its lengths are
        sane (None: read alone). One lookup in the index for all of them."""
        out: dict[bytes, BlobLocation | None] = {}
        for blob_id, locations in self.repo.index.locations_many(blob_ids).items():
            loc = locations[0] if locations else None
            if loc is not None:
                try:
                    self.repo.check_location(blob_id, loc)
                except IntegrityError:
                    loc = None  # read alone: get_blob reports it (or finds a sane copy)
            out[blob_id] = loc
        return out

    def _requests(self, group: list[tuple[K, bytes | None]]) -> list[_Request[K]]:
        """Requests for ``group``, its blobs looked up in the index together."""
        # a blob read alone is at most a chunk (its index entry is not trusted to say)
        unknown = self.repo.config.chunk_size
        found = self._locations([blob_id for _, blob_id in group if blob_id is not None])
        out: list[_Request[K]] = []
        for key, blob_id in group:
            loc = None if blob_id is None else found[blob_id]
            raw = 0 if blob_id is None else loc.entry.raw_length if loc is not None else unknown
            out.append(_Request(key, blob_id, loc, raw))
        return out

    def _plan(self, batch: list[_Request[K]]) -> list[_Range]:
        """Cut the blobs of ``batch`` into ranges; sets each request's range."""
        by_pack: dict[bytes, dict[bytes, BlobLocation]] = {}
        alone: dict[bytes, _Range] = {}
        first_use: dict[bytes, int] = {}
        for position, request in enumerate(batch):
            blob_id, loc = request.blob_id, request.loc
            if blob_id is None or blob_id in first_use:
                continue
            first_use[blob_id] = position
            if loc is None:
                alone[blob_id] = _Range(b"", 0, 0, 0, first=position, alone=True, blobs={blob_id: None})
            else:
                by_pack.setdefault(loc.pack_id, {})[blob_id] = loc
        ranges: list[_Range] = list(alone.values())
        of_blob: dict[bytes, _Range] = {b: r for r in ranges for b in r.blobs}
        for pack_id, blobs in by_pack.items():
            current: _Range | None = None
            for blob_id, loc in sorted(blobs.items(), key=lambda item: item[1].entry.offset):
                start, end = loc.entry.offset, loc.entry.offset + loc.entry.length
                if (
                    current is not None
                    and current.offset + current.length <= start
                    and start - (current.offset + current.length) <= self.max_gap
                    and end - current.offset <= self.max_range
                    and current.raw + loc.entry.raw_length <= self.max_range
                ):
                    current.length = end - current.offset
                else:
                    current = _Range(pack_id, start, loc.entry.length, 0, first=len(batch))
                    ranges.append(current)
                current.raw += loc.entry.raw_length
                current.blobs[blob_id] = loc
                current.first = min(current.first, first_use[blob_id])
                of_blob[blob_id] = current
        for request in batch:
            if request.blob_id is not None:
                request.range = of_blob[request.blob_id]
                request.range.uses[request.blob_id] += 1
        ranges.sort(key=lambda r: r.first)
        return ranges

    # ---------------------------------------------------------------------------- reading

    def _read(self, rng: _Range) -> dict[bytes, bytes | IntegrityError]:
        """The results of every blob of ``rng``: one ranged read, each blob opened from it."""
        out: dict[bytes, bytes | IntegrityError] = {}
        sealed: memoryview | None = None
        if not rng.alone:
            try:
                sealed = self.repo.backend.get_into(
                    pack_name(rng.pack_id), rng.offset, rng.length, _read_buffer(rng.length)
                )
            except (ObjectNotFoundError, UnsafeStorageError):
                sealed = None  # each blob alone: get_blob says what is wrong, or finds another copy
            used = sum(loc.entry.length for loc in rng.blobs.values() if loc is not None)
            with self._stats_lock:
                self.stats.ranges += 1
                self.stats.gap_bytes += max(0, rng.length - used)
        for blob_id, loc in rng.blobs.items():
            if sealed is not None and loc is not None:
                start = loc.entry.offset - rng.offset
                try:
                    out[blob_id] = self.repo.open_located(
                        self.blob_type, blob_id, loc, sealed[start : start + loc.entry.length]
                    )
                    continue
                except IntegrityError:
                    pass
            with self._stats_lock:
                self.stats.retried_alone += not rng.alone
            try:
                out[blob_id] = self.repo.get_blob(self.blob_type, blob_id)
            except IntegrityError as exc:
                out[blob_id] = exc
        return out

    def _submit(self, rng: _Range) -> None:
        if self._executor is None:
            return  # read when the caller reaches it
        try:
            rng.future = self._executor.submit(self._read, rng)
        except RuntimeError:  # a pool shut down (its owner is closing): read when the caller reaches it
            rng.future = None

    def fetch(self, wanted: Iterable[tuple[K, bytes | None]]) -> Generator[tuple[K, Result], None, None]:
        """``(key, result)`` for each of ``wanted``, in its order (module docstring)."""
        source = iter(wanted)
        pending: collections.deque[_Request[K]] = collections.deque()
        #: requests looked up in the index and not yet planned (at most ``_LOOKUP_GROUP``)
        looked_up: collections.deque[_Request[K]] = collections.deque()
        planned = 0
        exhausted = False
        try:
            while True:
                while not exhausted and planned < self.max_bytes and len(pending) < _MAX_PENDING:
                    batch: list[_Request[K]] = []
                    batch_raw = 0
                    while batch_raw < self.batch_bytes and len(batch) < _MAX_BATCH:
                        if not looked_up:
                            group = list(itertools.islice(source, _LOOKUP_GROUP))
                            if not group:
                                exhausted = True
                                break
                            looked_up.extend(self._requests(group))
                        request = looked_up.popleft()
                        batch.append(request)
                        batch_raw += request.raw
                    for planned_range in self._plan(batch):
                        self._submit(planned_range)
                    pending.extend(batch)
                    planned += batch_raw
                    with self._stats_lock:
                        self.stats.peak_planned_bytes = max(self.stats.peak_planned_bytes, planned)
                if not pending:
                    return
                request = pending.popleft()
                planned -= request.raw
                rng = request.range
                if rng is None or request.blob_id is None:
                    yield request.key, None
                    continue
                if rng.future is None or rng.future.cancelled():  # (cancelled: a pool shut down)
                    rng.future = Future()
                    rng.future.set_result(self._read(rng))
                results = rng.future.result()
                result = results[request.blob_id]
                rng.uses[request.blob_id] -= 1
                if not rng.uses[request.blob_id]:
                    del results[request.blob_id]  # the last request for it: free its plaintext
                with self._stats_lock:
                    self.stats.blobs += 1
                yield request.key, result
        finally:
            # a caller that stops early (an error, a break) leaves no reads queued for it
            for request in pending:
                if request.range is not None and request.range.future is not None:
                    request.range.future.cancel()

    # ---------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        if self._own_pool and self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> BlobFetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""Random access to a snapshot's disk, straight from the repository.

:class:`DiskReader` answers ``read(offset, length)`` and ``block_status(offset, length)``
for one disk of one snapshot as the guest saw it: checkpoint layers resolved through their
PARENT entries (:class:`~vmvault.repo.format.ChunkResolver`, the same resolver restore
uses), holes and zero chunks as zeros that are never fetched. It serves file-level restore
(``vmvault files``), the FUSE mount, the NBD export and so instant recovery.

Chunks are fetched, decrypted and verified on demand through a :class:`ChunkCache`: a
least-recently-used cache bounded in bytes, keyed by chunk id (so every reader of one repository
can share one: the same chunk in two snapshots or two disks is fetched once), with at most one
fetch of a chunk at a time however many threads ask for it. A reader that reads sequentially
gets read-ahead: the chunks after the one read are fetched in the background, the window
doubling with each sequential read up to ``readahead`` chunks (a read starting a few chunks
before or after where the last one ended counts as sequential: a kernel's requests arrive out of
order). Chunks wanted together (a window of read-ahead, the chunks of one large read) are
fetched together through :class:`~vmvault.repo.fetch.BlobFetcher`: side by side in a pack, they
come in one ranged read, which matters against remote storage where each read is a round trip;
from local storage a window is shared out between the read-ahead threads in pieces of a few
chunks, read and decoded at once. ``read_into`` fills a caller's buffer (a FUSE request's) with
one copy of each byte.

From remote storage, where each read is a round trip, a window's ranged reads go out at once, as
many as the storage serves best (``Backend.prepare_reads``, a restore's count), in a pool that
the cache owns and all its readers share; the window is larger (:data:`FAR_READAHEAD`) and so is
the default cache (:data:`FAR_CACHE_BYTES`).

Memory is bounded whatever the disk's size: the cache's ``max_bytes``, plus the read-ahead
fetches in flight (at most ``2 × readahead_threads + readahead`` chunks, the window at most half
the cache), plus from remote storage the ranges being read (``prepare_reads`` of at most 8 MiB
sealed), plus what one read returns (at most :data:`MAX_READ` bytes). The 1 GiB test image read
30 ms away from S3 or SFTP peaked at 272-277 MiB RSS with the 128 MiB cache, of which 129 MiB
before the first read (131 MiB locally; the command line's one malloc heap).

A damaged chunk raises ``IntegrityError`` naming the snapshot, the disk and the offset; nothing
damaged is cached, so a later read of the same range fails again rather than returning something
else.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from vmvault.disk.base import Extent, ExtentKind, coalesce
from vmvault.errors import ConfigError, IntegrityError, VmvaultError
from vmvault.repo.fetch import BlobFetcher
from vmvault.repo.format import BlobType, ChunkResolver
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_READAHEAD",
    "FAR_CACHE_BYTES",
    "FAR_READAHEAD",
    "MAX_READ",
    "CacheStats",
    "ChunkCache",
    "DiskReader",
    "cache_bytes_for",
    "find_disk",
]

#: the default size of a cache of decrypted chunks: of a repository on storage whose reads cost no
#: round trip (``Backend.local_reads``), and of one on remote storage (room for twice its window
#: of read-ahead, :data:`FAR_READAHEAD`)
DEFAULT_CACHE_BYTES = 64 << 20
FAR_CACHE_BYTES = 128 << 20
#: the most one ``read`` returns (NBD's largest request is 32 MiB)
MAX_READ = 64 << 20
#: chunks fetched ahead of a sequential reader, at most: from storage whose reads cost no round
#: trip (``Backend.local_reads``), and from the others, where a window is several ranged reads at
#: once (the 1 GiB test image read 30 ms away from S3: 4.1 s with 128, 3.0 s with 256; over SFTP
#: 6.9 and 4.9 s; a restore 3.6-4.8 s). Never more than half the cache (:class:`DiskReader`).
DEFAULT_READAHEAD = 32
FAR_READAHEAD = 256
#: how many chunks before or after where a sequential reader's next read was expected a read
#: may start and still count as sequential: a kernel reading ahead (a mount's, an NBD
#: client's) sends its requests through several threads, and they arrive in another order
#: (a 4 GiB disk read through a mount: one read in eight; each reset the read-ahead)
_REORDER_CHUNKS = 4

#: the fewest chunks one read-ahead task fetches (one ranged read where they lie side by side
#: in a pack); a window is shared out between the threads in pieces of at least this many
_PIECE_CHUNKS = 4

_ZEROS = memoryview(bytes(1 << 20))


def _zero(out: memoryview) -> None:
    for at in range(0, len(out), len(_ZEROS)):
        part = out[at : at + len(_ZEROS)]
        part[:] = _ZEROS[: len(part)]


def _check_read(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"cannot read {length} bytes at offset {offset}")
    if length > MAX_READ:
        raise ValueError(f"a read is at most {MAX_READ} bytes, not {length}")


#: fetches several chunks at once: chunk ids -> ``(id, plaintext, or the IntegrityError a read of
#: it alone raises)`` in the order given (``BlobFetcher.fetch``)
FetchMany = Callable[[Sequence[bytes]], Iterator[tuple[bytes, bytes | IntegrityError | None]]]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    #: chunks fetched (read, decrypted, verified) from the repository, and their plaintext bytes
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    #: of those, fetched by read-ahead
    prefetched_chunks: int = 0
    evicted_chunks: int = 0


class ChunkCache:
    """Decrypted chunks of one repository, shared by all its readers.

    ``get`` returns a chunk from the cache or fetches it with the given function; two threads
    asking for a chunk being fetched wait for the one fetch. ``prefetch`` fetches in a small
    pool and never blocks; it drops work when as much is in flight as the pool can hold.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_CACHE_BYTES, readahead_threads: int = 2) -> None:
        if max_bytes < 0 or readahead_threads < 1:
            raise ValueError("max_bytes must be >= 0 and readahead_threads >= 1")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self.readahead_threads = readahead_threads
        self._lru: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._prefetching = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._ranges: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def get(self, chunk_id: bytes, fetch: Callable[[bytes], bytes]) -> bytes:
        with self._lock:
            data = self._lru.get(chunk_id)
            if data is not None:
                self._lru.move_to_end(chunk_id)
                self.stats.hits += 1
                return data
            self.stats.misses += 1
            future = self._inflight.get(chunk_id)
            owner = future is None
            if future is None:
                future = self._inflight[chunk_id] = Future()
        if owner:
            self._fetch_into(chunk_id, fetch, future, prefetch=False)
        return future.result()

    def prefetch(
        self,
        chunk_ids: Sequence[bytes],
        fetch: Callable[[bytes], bytes],
        *,
        limit: int,
        fetch_many: FetchMany | None = None,
        split: bool = False,
    ) -> int:
        """Start fetching those of ``chunk_ids`` not cached or in flight, while fewer than
        ``limit`` read-ahead fetches are pending; returns how many were started.

        With ``fetch_many`` (chunk ids -> ``(id, plaintext or IntegrityError)`` in order, as
        ``BlobFetcher`` gives them) the chunks started together are fetched by one background
        task, in as few ranged reads as their places in the packs allow, or with ``split``
        (storage whose reads cost no round trip: ``Backend.local_reads``) shared out between
        the threads, a piece of consecutive ones each (at least :data:`_PIECE_CHUNKS`), so that
        several are read and decoded at once; without ``fetch_many`` one by one."""
        if fetch_many is not None:
            with self._lock:
                claimed = self._claim(chunk_ids, limit=limit - self._prefetching)
                if not claimed:
                    return 0
                self._prefetching += len(claimed)
                pool = self._ensure_pool()
            items = list(claimed.items())
            step = max(_PIECE_CHUNKS, -(-len(items) // self.readahead_threads)) if split else len(items)
            for at in range(0, len(items), step):
                piece = dict(items[at : at + step])
                self._submit(pool, piece, self._fetch_many_into, piece, fetch_many, prefetch=True)
            return len(claimed)
        started = 0
        for chunk_id in chunk_ids:
            with self._lock:
                if self._closed or self._prefetching >= limit:
                    break
                if chunk_id in self._lru or chunk_id in self._inflight:
                    continue
                future: Future[bytes] = Future()
                self._inflight[chunk_id] = future
                self._prefetching += 1
                pool = self._ensure_pool()
            self._submit(pool, {chunk_id: future}, self._prefetch_one, chunk_id, fetch, future)
            started += 1
        return started

    def _submit(
        self,
        pool: ThreadPoolExecutor,
        claimed: dict[bytes, Future[bytes]],
        task: Callable[..., None],
        *args: Any,
        **kw: Any,
    ) -> None:
        """Run a read-ahead ``task`` that settles ``claimed`` in ``pool``. A task the pool never
        runs (it was closed meanwhile: ``close`` cancels what has not started) settles them
        itself, so that no reader waits for a chunk nobody fetches."""

        def dropped(done: Future[None]) -> None:
            if done.cancelled():
                self._abandon(claimed)

        try:
            pool.submit(task, *args, **kw).add_done_callback(dropped)
        except RuntimeError:  # (the pool was shut down between taking it and this call)
            self._abandon(claimed)

    def _abandon(self, claimed: dict[bytes, Future[bytes]]) -> None:
        for chunk_id, future in claimed.items():
            self._settle(
                chunk_id, future, VmvaultError(f"chunk {chunk_id.hex()} was not read: the chunk cache was closed")
            )
        with self._lock:
            self._prefetching -= len(claimed)

    def load(self, chunk_ids: Sequence[bytes], fetch_many: FetchMany) -> int:
        """Fetch, in the calling thread, those of ``chunk_ids`` neither cached nor in flight,
        together (``fetch_many`` as for ``prefetch``); returns how many it fetched. A read
        spanning many chunks calls it first, then takes each chunk with ``get``."""
        with self._lock:
            claimed = self._claim(chunk_ids, limit=len(chunk_ids))
        if claimed:
            self._fetch_many_into(claimed, fetch_many, prefetch=False)
        return len(claimed)

    def range_pool(self, workers: int) -> ThreadPoolExecutor:
        """The pool that the ranged reads of this cache's readers run in, of ``workers`` threads
        (as the first reader to ask wanted: the readers of one repository share it, so that as
        many reads at once go to the storage however many readers there are). Closed with the
        cache, after its read-ahead."""
        with self._lock:
            if self._ranges is None:
                self._ranges = ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmvault-ranges")
            return self._ranges

    def _ensure_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.readahead_threads, thread_name_prefix="vmvault-readahead")
        return self._pool

    def _claim(self, chunk_ids: Sequence[bytes], *, limit: int) -> dict[bytes, Future[bytes]]:
        """Mark as in flight (a future each) up to ``limit`` of ``chunk_ids`` that are neither
        cached nor in flight. Under the lock."""
        claimed: dict[bytes, Future[bytes]] = {}
        if self._closed:
            return claimed
        for chunk_id in chunk_ids:
            if len(claimed) >= limit:
                break
            if chunk_id in self._lru or chunk_id in self._inflight or chunk_id in claimed:
                continue
            future: Future[bytes] = Future()
            claimed[chunk_id] = self._inflight[chunk_id] = future
        return claimed

    def _fetch_many_into(self, claimed: dict[bytes, Future[bytes]], fetch_many: FetchMany, *, prefetch: bool) -> None:
        """Settle every claimed future from one ``fetch_many`` run: each chunk its own result;
        a failure of the run itself goes to every chunk it had not delivered."""
        todo = dict(claimed)
        try:
            for chunk_id, result in fetch_many(list(claimed)):
                future = todo.pop(chunk_id, None)
                if future is not None:
                    self._settle(chunk_id, future, result, prefetch=prefetch)
        except BaseException as exc:
            for chunk_id, future in todo.items():
                self._settle(chunk_id, future, exc)
            todo.clear()
            if not prefetch or not isinstance(exc, Exception):
                raise
        finally:
            for chunk_id, future in todo.items():  # never left waiting, whatever happened
                self._settle(chunk_id, future, IntegrityError(f"chunk {chunk_id.hex()} was not read"))
            if prefetch:
                with self._lock:
                    self._prefetching -= len(claimed)

    def _prefetch_one(self, chunk_id: bytes, fetch: Callable[[bytes], bytes], future: Future[bytes]) -> None:
        try:
            self._fetch_into(chunk_id, fetch, future, prefetch=True)
        finally:
            with self._lock:
                self._prefetching -= 1

    def _fetch_into(
        self, chunk_id: bytes, fetch: Callable[[bytes], bytes], future: Future[bytes], *, prefetch: bool
    ) -> None:
        try:
            data = fetch(chunk_id)
        except BaseException as exc:
            self._settle(chunk_id, future, exc)
            if not prefetch and not isinstance(exc, Exception):
                raise
            return
        self._settle(chunk_id, future, data, prefetch=prefetch)

    def _settle(
        self,
        chunk_id: bytes,
        future: Future[bytes],
        result: bytes | BaseException | None,
        *,
        prefetch: bool = False,
    ) -> None:
        """Give a fetch's result to whoever waits for ``chunk_id``; keep good data in the cache."""
        if not isinstance(result, bytes):
            with self._lock:
                self._inflight.pop(chunk_id, None)
            # waiting readers get the error; a later read fetches again (nothing damaged is kept)
            future.set_exception(result or IntegrityError(f"chunk {chunk_id.hex()} was not read"))
            return
        with self._lock:
            self._inflight.pop(chunk_id, None)
            self.stats.fetched_chunks += 1
            self.stats.fetched_bytes += len(result)
            if prefetch:
                self.stats.prefetched_chunks += 1
            if len(result) <= self.max_bytes and chunk_id not in self._lru:
                self._lru[chunk_id] = result
                self._bytes += len(result)
                while self._bytes > self.max_bytes:
                    _, old = self._lru.popitem(last=False)
                    self._bytes -= len(old)
                    self.stats.evicted_chunks += 1
        future.set_result(result)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._bytes = 0

    def close(self) -> None:
        """Stop read-ahead (fetches under way finish) and drop the cached chunks."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            ranges, self._ranges = self._ranges, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if ranges is not None:  # (a read still under way reads its ranges itself: BlobFetcher)
            ranges.shutdown(wait=True)
        self.clear()


def cache_bytes_for(repo: Repository, cache_bytes: int | None = None) -> int:
    """``cache_bytes``, or where it is None the default size of a chunk cache for ``repo``:
    :data:`DEFAULT_CACHE_BYTES` from local storage, :data:`FAR_CACHE_BYTES` from remote."""
    if cache_bytes is not None:
        return cache_bytes
    return DEFAULT_CACHE_BYTES if repo.backend.local_reads else FAR_CACHE_BYTES


def find_disk(snap: Snapshot, name: str) -> DiskRecord:
    """The disk called ``name`` (as ``vmvault show`` prints it) in ``snap``."""
    for record in snap.disks:
        if record.name == name:
            return record
    names = ", ".join(repr(d.name) for d in snap.disks) or "none"
    raise ConfigError(f"snapshot {snap.short_id} has no disk {name!r}; its disks: {names}")


def _check_record(snap: Snapshot, record: DiskRecord) -> None:
    """The record's geometry is what the index must cover; a manifest that says otherwise is
    damaged (it comes from the storage, which is not trusted to be consistent)."""
    cs, span = record.chunk_size, record.index_span
    if not isinstance(cs, int) or cs < 512 or cs & (cs - 1):
        raise IntegrityError(f"snapshot {snap.short_id}: disk {record.name} has a bad chunk size {cs!r}")
    if not isinstance(span, int) or span < 1 or not isinstance(record.size, int) or record.size < 0:
        raise IntegrityError(f"snapshot {snap.short_id}: disk {record.name} has a bad size or index span")
    n_chunks = -(-record.size // cs)
    if len(record.index) != -(-n_chunks // span):
        raise IntegrityError(
            f"snapshot {snap.short_id}: disk {record.name} has {len(record.index)} index blocks "
            f"for {record.size} bytes (expected {-(-n_chunks // span)})"
        )


class DiskReader:
    """The merged view of one disk of a snapshot, read at any offset. Thread-safe.

    ``cache``: a :class:`ChunkCache` shared with other readers of the same repository; without
    one the reader makes its own of ``cache_bytes`` (by default as :func:`cache_bytes_for` says)
    and closes it with itself. ``readahead``: the most chunks fetched ahead of a sequential
    reader (by default :data:`DEFAULT_READAHEAD` or :data:`FAR_READAHEAD`, by where the
    repository lies), never more than half the cache holds.
    """

    def __init__(
        self,
        repo: Repository,
        snap: Snapshot,
        record: DiskRecord | str,
        *,
        cache: ChunkCache | None = None,
        cache_bytes: int | None = None,
        readahead: int | None = None,
    ) -> None:
        if isinstance(record, str):
            record = find_disk(snap, record)
        _check_record(snap, record)
        self.snapshot = snap
        self.record = record
        self.name = record.name
        self.size = record.size
        self.chunk_size = record.chunk_size
        local = repo.backend.local_reads
        self._own_cache = cache is None
        self.cache = cache if cache is not None else ChunkCache(max_bytes=cache_bytes_for(repo, cache_bytes))
        if readahead is None:
            readahead = DEFAULT_READAHEAD if local else FAR_READAHEAD
        # a window the cache cannot hold twice over would push out what the reader is about to read
        self.readahead = max(0, min(readahead, self.cache.max_bytes // (2 * self.chunk_size)))
        self._resolver = ChunkResolver(repo, snap, record)
        # From local storage a fetch reads in the calling thread (read-ahead runs in the cache's
        # pool already, a window split between its threads: ``split``); from remote storage, a
        # fetch's ranges go out at once, as many as the storage serves best (a restore's count)
        self._split = local
        if local:
            self._fetcher = BlobFetcher(repo, BlobType.DATA, max_requests=0, max_bytes=MAX_READ)
        else:
            reads = repo.backend.prepare_reads()
            pool = self.cache.range_pool(reads)
            self._fetcher = BlobFetcher(repo, BlobType.DATA, max_requests=reads, max_bytes=MAX_READ, executor=pool)
        self._lock = threading.Lock()
        self._next = -1  # where a sequential reader's next read starts
        self._ahead = -1  # the chunk before which read-ahead was asked for
        self._window = 0
        #: bytes returned by ``read``; chunks and bytes fetched from the repository for this reader
        self.bytes_read = 0
        self.chunks_fetched = 0
        self.bytes_fetched = 0

    # ---------------------------------------------------------------------------- reading

    def _fetch(self, chunk_id: bytes) -> bytes:
        data = self._resolver.fetch(chunk_id)
        with self._lock:
            self.chunks_fetched += 1
            self.bytes_fetched += len(data)
        return data

    def _fetch_many(self, chunk_ids: Sequence[bytes]) -> Iterator[tuple[bytes, bytes | IntegrityError | None]]:
        """The chunks ``chunk_ids``, read in runs of their packs (``ChunkCache.prefetch``)."""
        for chunk_id, result in self._fetcher.fetch((c, c) for c in chunk_ids):
            if isinstance(result, bytes):
                with self._lock:
                    self.chunks_fetched += 1
                    self.bytes_fetched += len(result)
            yield chunk_id, result

    def _damaged(self, exc: IntegrityError, offset: int) -> IntegrityError:
        return IntegrityError(
            f"{exc} — needed by disk {self.name} at offset {offset:#x} of snapshot {self.snapshot.short_id}",
            object_id=exc.object_id,
            name=exc.name,
        )

    def _chunk_id(self, chunk: int) -> bytes | None:
        try:
            return self._resolver.chunk_id(chunk)
        except IntegrityError as exc:
            raise self._damaged(exc, chunk * self.chunk_size) from exc

    def _chunk(self, chunk: int) -> bytes | None:
        """The plaintext of chunk ``chunk`` (exactly as long as the disk has bytes there), or
        None where it reads as zeros."""
        chunk_id = self._chunk_id(chunk)
        if chunk_id is None:
            return None
        offset = chunk * self.chunk_size
        try:
            data = self.cache.get(chunk_id, self._fetch)
        except IntegrityError as exc:
            raise self._damaged(exc, offset) from exc
        expected = min(self.chunk_size, self.size - offset)
        if len(data) != expected:
            raise IntegrityError(
                f"chunk {chunk_id.hex()} holds {len(data)} bytes where disk {self.name} of snapshot "
                f"{self.snapshot.short_id} needs {expected} at offset {offset:#x}",
                object_id=chunk_id.hex(),
            )
        return data

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the disk, none past it)."""
        _check_read(offset, length)
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` with the bytes at ``offset``; how many were filled: ``len(buf)``, fewer
        at the end of the disk, none past it. One copy of each byte, from the cache into
        ``buf`` (a FUSE request's own buffer: ``engine/mountfs.py``)."""
        out = memoryview(buf).cast("B")
        length = len(out)
        _check_read(offset, length)
        end = min(offset + length, self.size)
        if offset >= end:
            return 0
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        self._read_ahead(offset, end, last)
        if last > first:
            # the chunks of one read come together, in runs of their packs; a damaged one is
            # reported below by the read that needs it, with its offset
            wanted = [c for c in (self._known_chunk_id(chunk) for chunk in range(first, last + 1)) if c is not None]
            if len(wanted) > 1:
                self.cache.load(wanted, self._fetch_many)
        for chunk in range(first, last + 1):
            base = chunk * cs
            lo, hi = max(offset, base) - base, min(end, base + cs) - base
            at = base + lo - offset
            data = self._chunk(chunk)
            if data is None:
                _zero(out[at : at + hi - lo])
            else:
                out[at : at + hi - lo] = memoryview(data)[lo:hi]
        filled = end - offset
        with self._lock:
            self.bytes_read += filled
        return filled

    def _read_ahead(self, offset: int, end: int, last: int) -> None:
        if not self.readahead:
            return
        n_chunks = -(-self.size // self.chunk_size)
        with self._lock:
            slack = _REORDER_CHUNKS * self.chunk_size
            sequential = self._next >= 0 and self._next - slack <= offset <= self._next + slack
            self._window = min(self.readahead, max(1, self._window * 2)) if sequential else 0
            self._next = max(self._next, end) if sequential else end
            window = self._window
            if not window:
                self._ahead = -1
                return
            # asked for in steps of at least half a window, so that they come in runs rather
            # than one chunk (one request) at a time as the reader moves on
            if self._ahead >= last + 1 + window // 2 and self._ahead > last + 1:
                return
            first = max(last + 1, self._ahead)
            stop = min(last + 1 + window, n_chunks)
            self._ahead = stop
        ids = []
        for chunk in range(first, stop):
            try:
                chunk_id = self._resolver.chunk_id(chunk)
            except IntegrityError:
                break  # the read that needs it reports it
            if chunk_id is not None:
                ids.append(chunk_id)
        if ids:
            self.cache.prefetch(
                ids,
                self._fetch,
                limit=2 * self.cache.readahead_threads + self.readahead,
                fetch_many=self._fetch_many,
                split=self._split,
            )

    def _known_chunk_id(self, chunk: int) -> bytes | None:
        """The chunk's id, None where it reads as zeros or its index block is damaged (the
        read that needs it reports that)."""
        try:
            return self._resolver.chunk_id(chunk)
        except IntegrityError:
            return None

    # ---------------------------------------------------------------------------- layout

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """The range's extents: DATA where chunks are stored, ZERO where the disk reads as zeros
        (holes and zero chunks). Reads index blocks only, never data."""
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0:
            raise ValueError(f"cannot describe {length} bytes at offset {offset}")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        cs = self.chunk_size
        out = []
        for chunk in range(offset // cs, (end - 1) // cs + 1):
            lo, hi = max(offset, chunk * cs), min(end, (chunk + 1) * cs)
            kind = ExtentKind.ZERO if self._chunk_id(chunk) is None else ExtentKind.DATA
            out.append(Extent(lo, hi - lo, kind))
        return list(coalesce(out))

    # ---------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        if self._own_cache:
            self.cache.close()

    def __enter__(self) -> DiskReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

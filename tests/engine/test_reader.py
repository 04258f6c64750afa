"""DiskReader: random access to a snapshot's disk through a shared, bounded chunk cache."""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.helpers import MemoryDisk, ScriptedSession, ScriptedSource
from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.disk.base import Extent, ExtentKind
from vmvault.engine.backup import backup
from vmvault.engine.reader import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_READAHEAD,
    FAR_CACHE_BYTES,
    FAR_READAHEAD,
    MAX_READ,
    ChunkCache,
    DiskReader,
    find_disk,
)
from vmvault.engine.restore import ChunkResolver
from vmvault.errors import ConfigError, IntegrityError, VmvaultError
from vmvault.hypervisors.base import DEFAULT_OPTIONS, BackupOptions, BackupSession, PreviousBackup, Source, SourceDisk
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _disk(size: int, seed: int) -> MemoryDisk:
    """Random data, zero runs inside allocated ranges, and holes."""
    rng = random.Random(seed)
    data = bytearray(size)
    allocated = []
    pos = 0
    while pos < size:
        length = min(size - pos, rng.choice([4096, CS // 2, CS, 3 * CS]))
        kind = rng.random()
        if kind < 0.5:
            data[pos : pos + length] = rng.randbytes(length)
            allocated.append((pos, length))
        elif kind < 0.7:
            allocated.append((pos, length))  # allocated but zero: a zero chunk, never stored
        pos += length
    return MemoryDisk(data, allocated)


def _backed_up(disk: MemoryDisk, repo: Repository | None = None) -> tuple[Repository, Snapshot]:
    repo = repo or Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    return repo, backup(repo, ScriptedSource(disk)).snapshot


@pytest.fixture(scope="module")
def sample() -> tuple[Repository, Snapshot, bytes]:
    disk = _disk(3 * 1024 * 1024 + 12345, 1)  # the last chunk is short
    repo, snap = _backed_up(disk)
    return repo, snap, bytes(disk.data)


@given(ranges=st.lists(st.tuples(st.integers(0, 3 * 1024 * 1024 + 20000), st.integers(0, 400_000)), max_size=20))
@settings(max_examples=60, deadline=None)
def test_reads_equal_the_disk(sample: tuple[Repository, Snapshot, bytes], ranges: list[tuple[int, int]]) -> None:
    repo, snap, data = sample
    with DiskReader(repo, snap, "vda", cache_bytes=4 * CS) as reader:
        assert reader.size == len(data)
        for offset, length in ranges:
            assert reader.read(offset, length) == data[offset : offset + length]


@given(ranges=st.lists(st.tuples(st.integers(0, 3 * 1024 * 1024 + 20000), st.integers(0, 400_000)), max_size=20))
@settings(max_examples=60, deadline=None)
def test_reads_into_a_used_buffer_fill_it_holes_included_and_nothing_past_the_end(
    sample: tuple[Repository, Snapshot, bytes], ranges: list[tuple[int, int]]
) -> None:
    """``read_into`` writes into a buffer that held something else (a FUSE request's, reused):
    zeros where the disk has holes or zero chunks, and nothing past what it reports filled."""
    repo, snap, data = sample
    with DiskReader(repo, snap, "vda", cache_bytes=4 * CS) as reader:
        for offset, length in ranges:
            buf = bytearray(b"\xa5" * length)
            filled = reader.read_into(offset, memoryview(buf))
            expected = data[offset : offset + length]
            assert filled == len(expected)
            assert buf[:filled] == expected
            assert buf[filled:] == b"\xa5" * (length - filled)


def test_holes_and_zero_chunks_are_never_fetched(sample: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, data = sample
    with DiskReader(repo, snap, "vda") as reader:
        extents = reader.block_status()
        assert sum(e.length for e in extents) == len(data)
        assert extents[0].offset == 0 and all(a.end == b.offset for a, b in itertools.pairwise(extents))
        for ext in extents:
            if ext.kind is ExtentKind.ZERO:
                assert reader.read(ext.offset, min(ext.length, MAX_READ)) == bytes(min(ext.length, MAX_READ))
        assert reader.chunks_fetched == 0, "zeros are produced, not fetched"
        data_chunks = {c for e in extents if e.kind is ExtentKind.DATA for c in range(e.offset // CS, -(-e.end // CS))}
        for ext in extents:
            if ext.kind is ExtentKind.DATA:
                assert data[ext.offset : ext.end] == reader.read(ext.offset, ext.length)
        # every chunk holding data is fetched once, none of the rest
        assert reader.chunks_fetched == len(data_chunks)
        # a DATA extent is a whole number of chunks holding some non-zero byte
        for ext in extents:
            chunk_bytes = data[ext.offset : ext.end]
            if ext.kind is ExtentKind.ZERO:
                assert chunk_bytes == bytes(len(chunk_bytes))
        assert reader.block_status(CS + 10, 20) == [
            Extent(CS + 10, 20, next(e.kind for e in extents if e.offset <= CS + 10 < e.end))
        ]
        assert reader.block_status(len(data), 10) == []


def test_reads_past_the_end_are_short_and_bad_arguments_refused(sample: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, data = sample
    with DiskReader(repo, snap, "vda") as reader:
        assert reader.read(len(data) - 5, 100) == data[-5:]
        assert reader.read(len(data), 100) == b""
        assert reader.read(len(data) + 1 << 40, 100) == b""
        with pytest.raises(ValueError):
            reader.read(-1, 10)
        with pytest.raises(ValueError):
            reader.read(0, MAX_READ + 1)
        with pytest.raises(ValueError):
            reader.read_into(0, bytearray(MAX_READ + 1))
        with pytest.raises(ValueError):
            reader.read_into(-1, bytearray(10))


def test_an_unknown_disk_name_is_a_clear_error(sample: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, _ = sample
    with pytest.raises(ConfigError, match=r"has no disk 'vdb'; its disks: 'vda'"):
        DiskReader(repo, snap, "vdb")
    assert find_disk(snap, "vda").name == "vda"


# ---- checkpoint layers --------------------------------------------------------------------


class _Layer(MemoryDisk):
    """A checkpoint layer over ``base``: the given ranges are its own, the rest is the parent's."""

    def __init__(self, base: MemoryDisk, own: list[tuple[int, bytes]]) -> None:
        super().__init__(bytearray(base.data))
        self.own = []
        for off, data in own:
            self.data[off : off + len(data)] = data
            self.own.append((off, len(data)))

    def extents(self) -> Iterator[Extent]:
        pos, out = 0, []
        for off, length in sorted(self.own):
            if off > pos:
                out.append(Extent(pos, off - pos, ExtentKind.PARENT))
            kind = ExtentKind.ZERO if not any(self.data[off : off + length]) else ExtentKind.DATA
            out.append(Extent(off, length, kind))
            pos = off + length
        if pos < self.size:
            out.append(Extent(pos, self.size - pos, ExtentKind.PARENT))
        return iter(out)


class _ChainSource(Source):
    kind, location = "test", "test://chain"

    def __init__(self, layers: list[tuple[str, MemoryDisk]]) -> None:
        self.layers = layers

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        disks = []
        for i, (name, disk) in enumerate(self.layers):
            parent = self.layers[i - 1][0] if i else None
            disks.append(SourceDisk(name, disk, "raw", layer=bool(i), parent_name=parent))
        return ScriptedSession(disks)


def test_layers_read_as_their_merged_view() -> None:
    size = 2 * 1024 * 1024
    base = _disk(size, 2)
    middle = _Layer(base, [(CS + 100, os.urandom(5000)), (4 * CS, bytes(CS))])  # new data; zeros over data
    leaf = _Layer(middle, [(CS + 3000, os.urandom(CS)), (20 * CS, os.urandom(10))])
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    snap = backup(repo, _ChainSource([("base.vhdx", base), ("mid.avhdx", middle), ("leaf.avhdx", leaf)])).snapshot
    assert [d.layer for d in snap.disks] == [False, True, True]
    cache = ChunkCache(max_bytes=1 << 20)
    for name, disk in (("base.vhdx", base), ("mid.avhdx", middle), ("leaf.avhdx", leaf)):
        reader = DiskReader(repo, snap, name, cache=cache)
        assert reader.read(0, size) == bytes(disk.data), name
        for offset in range(0, size, 7 * CS + 13):
            assert reader.read(offset, 3 * CS) == bytes(disk.data[offset : offset + 3 * CS]), (name, offset)
        reader.close()
    assert cache.stats.hits > 0, "chunks the layers share are fetched once"
    cache.close()


# ---- damage -------------------------------------------------------------------------------


def _damage_chunk(repo: Repository, snap: Snapshot, chunk: int) -> bytes:
    record = snap.disks[0]
    chunk_id = ChunkResolver(repo, snap, record).chunk_id(chunk)
    assert chunk_id is not None
    loc = repo.index.lookup(chunk_id)
    assert loc is not None
    backend = repo.backend
    assert isinstance(backend, MemoryBackend)
    name = pack_name(loc.pack_id)
    data = bytearray(backend.get(name))
    data[loc.entry.offset + loc.entry.length // 2] ^= 0x40
    backend.put(name, bytes(data))
    return chunk_id


def test_a_damaged_chunk_names_snapshot_disk_and_offset_and_is_never_cached() -> None:
    disk = MemoryDisk(bytearray(os.urandom(8 * CS)))
    repo, snap = _backed_up(disk)
    chunk_id = _damage_chunk(repo, snap, 5)
    with DiskReader(repo, snap, "vda", readahead=0) as reader:
        assert reader.read(0, 5 * CS) == bytes(disk.data[: 5 * CS])
        for _ in range(2):  # the second read fails the same way: nothing damaged was kept
            with pytest.raises(IntegrityError) as err:
                reader.read(5 * CS + 10, 100)
            text = str(err.value)
            assert f"disk vda at offset {5 * CS:#x} of snapshot {snap.short_id}" in text
            assert err.value.object_id == chunk_id.hex()
        assert reader.read(6 * CS, 2 * CS) == bytes(disk.data[6 * CS :])


def test_a_damaged_chunk_met_by_read_ahead_fails_only_the_read_that_needs_it() -> None:
    disk = MemoryDisk(bytearray(os.urandom(16 * CS)))
    repo, snap = _backed_up(disk)
    _damage_chunk(repo, snap, 6)
    with DiskReader(repo, snap, "vda", readahead=8) as reader:
        for chunk in range(6):
            assert reader.read(chunk * CS, CS) == bytes(disk.data[chunk * CS : (chunk + 1) * CS])
        with pytest.raises(IntegrityError, match=f"offset {6 * CS:#x}"):
            reader.read(6 * CS, CS)
        assert reader.read(7 * CS, CS) == bytes(disk.data[7 * CS : 8 * CS])


def test_a_manifest_whose_index_does_not_cover_the_disk_is_damage(sample: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, _ = sample
    doc = snap.to_dict()
    doc["disks"][0]["size"] = doc["disks"][0]["size"] * 4096 * 4  # more chunks than the index holds
    bad = Snapshot.from_dict(doc, snapshot_id=snap.id)
    with pytest.raises(IntegrityError, match="index blocks"):
        DiskReader(repo, bad, "vda")
    doc = snap.to_dict()
    doc["disks"][0]["chunk_size"] = 1000
    with pytest.raises(IntegrityError, match="chunk size"):
        DiskReader(repo, Snapshot.from_dict(doc, snapshot_id=snap.id), "vda")


# ---- cache and concurrency ----------------------------------------------------------------


def test_the_cache_stays_within_its_bound(sample: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, data = sample
    cache = ChunkCache(max_bytes=3 * CS)
    reader = DiskReader(repo, snap, "vda", cache=cache)
    for offset in range(0, len(data), CS // 2):
        assert reader.read(offset, CS // 2) == data[offset : offset + CS // 2]
        assert cache.cached_bytes <= 3 * CS
    assert cache.stats.evicted_chunks > 0
    reader.close()
    assert cache.cached_bytes > 0, "closing a reader leaves a shared cache alone"
    cache.close()
    assert cache.cached_bytes == 0


def test_a_shared_cache_serves_the_same_chunk_to_every_snapshot_once() -> None:
    disk = MemoryDisk(bytearray(os.urandom(6 * CS)))
    repo, first = _backed_up(disk)
    _, second = _backed_up(disk, repo)
    cache = ChunkCache()
    with DiskReader(repo, first, "vda", cache=cache) as a, DiskReader(repo, second, "vda", cache=cache) as b:
        assert a.read(0, 6 * CS) == b.read(0, 6 * CS) == bytes(disk.data)
        assert a.chunks_fetched + b.chunks_fetched == 6
    assert cache.stats.fetched_chunks == 6
    cache.close()


def test_sequential_reads_are_read_ahead(sample: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, data = sample
    with DiskReader(repo, snap, "vda", readahead=8) as reader:
        for offset in range(0, len(data), 16 * 1024):
            assert reader.read(offset, 16 * 1024) == data[offset : offset + 16 * 1024]
        stats = reader.cache.stats
        assert stats.prefetched_chunks > 0
        assert stats.fetched_chunks == reader.chunks_fetched
    with DiskReader(repo, snap, "vda", readahead=8) as reader:
        for offset in random.Random(3).sample(range(0, len(data), 16 * 1024), 40):
            reader.read(offset, 16 * 1024)
        assert reader.cache.stats.prefetched_chunks <= 8, "random reads get (almost) no read-ahead"


@pytest.mark.parametrize(("split", "pieces"), [(True, [4, 4, 4, 4]), (False, [16])])
def test_a_window_of_read_ahead_from_local_storage_is_fetched_by_several_threads_at_once(
    split: bool, pieces: list[int]
) -> None:
    """Chunks read ahead together come in runs of their packs, but one task decoding a whole
    window held a reader to one core: from local storage (``split``) the window is shared out
    between the cache's threads, a few chunks (one ranged read) each; from remote storage,
    where each read is a request, it stays one run."""
    running = peak = 0
    lock = threading.Lock()
    calls: list[int] = []

    def fetch_many(ids: Sequence[bytes]) -> Iterator[tuple[bytes, bytes | IntegrityError | None]]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            calls.append(len(ids))
        try:
            time.sleep(0.2)
            for chunk_id in ids:
                yield chunk_id, chunk_id * 4
        finally:
            with lock:
                running -= 1

    ids = [i.to_bytes(8, "big") for i in range(16)]
    cache = ChunkCache(max_bytes=1 << 20, readahead_threads=4)
    try:
        assert cache.prefetch(ids, lambda c: c * 4, limit=64, fetch_many=fetch_many, split=split) == 16
        assert all(cache.get(c, lambda c: b"") == c * 4 for c in ids)
    finally:
        cache.close()
    assert sorted(calls) == pieces
    assert peak == len(pieces)


def test_a_reader_waiting_for_read_ahead_that_close_cancels_gets_an_error_not_a_hang() -> None:
    """``close`` cancels read-ahead that has not started; a reader waiting for one of its
    chunks is told so rather than waiting for ever."""
    started, release = threading.Event(), threading.Event()

    def fetch_many(ids: Sequence[bytes]) -> Iterator[tuple[bytes, bytes | IntegrityError | None]]:
        started.set()
        release.wait(10)
        for chunk_id in ids:
            yield chunk_id, chunk_id * 4

    ids = [i.to_bytes(8, "big") for i in range(8)]
    cache = ChunkCache(max_bytes=1 << 20, readahead_threads=1)
    assert cache.prefetch(ids[:4], lambda c: c * 4, limit=64, fetch_many=fetch_many) == 4
    assert started.wait(10)
    assert cache.prefetch(ids[4:], lambda c: c * 4, limit=64, fetch_many=fetch_many) == 4  # queued
    got: list[object] = []

    def reader() -> None:
        try:
            got.append(cache.get(ids[5], lambda c: b"never asked: the chunk is in flight"))
        except VmvaultError as exc:
            got.append(exc)

    waiting = threading.Thread(target=reader, daemon=True)
    waiting.start()
    closing = threading.Thread(target=cache.close, daemon=True)
    closing.start()
    time.sleep(0.2)
    release.set()
    closing.join(10)
    waiting.join(10)
    assert not waiting.is_alive(), "the reader still waits for a chunk nobody fetches"
    assert len(got) == 1 and isinstance(got[0], VmvaultError) and "closed" in str(got[0])


def test_readers_split_read_ahead_only_where_reads_cost_no_round_trip(tmp_path: Path) -> None:
    from vmvault.backends.s3 import S3Backend
    from vmvault.backends.sftp import SftpBackend

    assert MemoryBackend.local_reads and LocalBackend.local_reads
    assert not (Backend.local_reads or S3Backend.local_reads or SftpBackend.local_reads)
    repo, snap = _backed_up(_disk(4 * CS, 5), Repository.init(LocalBackend(str(tmp_path)), b"pw", chunk_size=CS))
    with DiskReader(repo, snap, "vda") as reader:
        assert reader._split


class FarBackend(MemoryBackend):
    """Storage a round trip away: every read waits ``delay``; counts the reads at once."""

    local_reads = False

    def __init__(self, delay: float = 0.02) -> None:
        super().__init__()
        self.delay = delay
        self.running = self.most_running = 0
        self._watch = threading.Lock()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if not name.startswith("data/"):
            return super().get(name, offset, length)
        with self._watch:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.delay)
            return super().get(name, offset, length)
        finally:
            with self._watch:
                self.running -= 1


def _far_sample(pack_size: int = 4 * CS) -> tuple[Repository, Snapshot, bytes]:
    """A disk of 96 random chunks in small packs (runs of 4 chunks), on far storage."""
    disk = MemoryDisk(bytearray(random.Random(9).randbytes(96 * CS)))
    backend = FarBackend()
    repo = Repository.init(backend, b"passphrase", chunk_size=CS, pack_size=pack_size)
    return repo, backup(repo, ScriptedSource(disk)).snapshot, bytes(disk.data)


def test_read_ahead_from_far_storage_sends_a_windows_ranged_reads_at_once() -> None:
    """From storage where each read is a round trip a window of read-ahead once came one
    ranged read after another (a 1 GiB disk 30 ms away from S3: 8.5 s, a restore 3.8 s); its
    reads now go out at once, as many as the storage serves best, in a pool shared by every
    reader of the cache, and the window is larger."""
    repo, snap, data = _far_sample()
    backend = repo.backend
    assert isinstance(backend, FarBackend)
    cache = ChunkCache(max_bytes=64 * CS, readahead_threads=1)
    try:
        with DiskReader(repo, snap, "vda", cache=cache) as a, DiskReader(repo, snap, "vda", cache=cache) as b:
            assert a.readahead == 32, "256 chunks ahead from far storage, at most half the cache"
            assert a._fetcher._executor is b._fetcher._executor is cache.range_pool(1)
            gets = backend.requests.gets
            for offset in range(0, len(data), 4 * CS):
                assert a.read(offset, 4 * CS) == data[offset : offset + 4 * CS]
            assert backend.requests.gets - gets <= 96 // 4 + 8, "runs of a pack's chunks, not a read per chunk"
    finally:
        cache.close()
    assert backend.most_running >= 3, backend.most_running
    assert backend.most_running <= backend.prepare_reads()


def test_the_cache_and_the_read_ahead_window_are_by_storage_and_the_window_at_most_half_the_cache() -> None:
    repo, snap, _ = _far_sample()
    cases = [
        (None, True, DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD),
        (None, False, FAR_CACHE_BYTES, FAR_READAHEAD),
        (64 << 20, False, 64 << 20, FAR_READAHEAD),  # 64 KiB chunks: 512 would fit
        (10 * CS, False, 10 * CS, 5),
        (0, True, 0, 0),
    ]
    for cache_bytes, local, held, window in cases:
        repo.backend.local_reads = local  # type: ignore[misc]
        with DiskReader(repo, snap, "vda", cache_bytes=cache_bytes) as reader:
            assert (reader.cache.max_bytes, reader.readahead) == (held, window), (cache_bytes, local)
    with DiskReader(repo, snap, "vda", cache_bytes=16 << 20, readahead=500) as reader:
        assert reader.readahead == 128, "never more than half the cache"


def test_a_far_reader_whose_cache_closes_under_it_still_reads_correctly() -> None:
    """The cache owns the pool of ranged reads; closed while a large read is under way, the
    read finishes in its own thread rather than failing with a pool's error."""
    repo, snap, data = _far_sample()
    cache = ChunkCache(max_bytes=64 * CS)
    reader = DiskReader(repo, snap, "vda", cache=cache)
    result: list[bytes] = []
    worker = threading.Thread(target=lambda: result.append(reader.read(0, 64 * CS)))
    worker.start()
    time.sleep(0.03)
    cache.close()
    worker.join(20)
    assert result == [data[: 64 * CS]]
    assert reader.read(64 * CS, 8 * CS) == data[64 * CS : 72 * CS]
    reader.close()


def test_many_threads_read_correctly_and_each_chunk_is_fetched_once() -> None:
    disk = _disk(2 * 1024 * 1024, 4)
    repo, snap = _backed_up(disk)
    data = bytes(disk.data)
    calls: dict[bytes, int] = {}
    lock = threading.Lock()
    real_open = repo.open_located

    # every chunk read (alone, or in a run of its pack) is opened through open_located
    def slow_open(blob_type: object, blob_id: bytes, loc: object, sealed: object) -> bytes:
        if getattr(blob_type, "name", "") == "DATA":  # index blocks are the resolvers' own business
            with lock:
                calls[blob_id] = calls.get(blob_id, 0) + 1
            time.sleep(0.002)
        return real_open(blob_type, blob_id, loc, sealed)  # type: ignore[arg-type]

    repo.open_located = slow_open  # type: ignore[method-assign]
    cache = ChunkCache(max_bytes=64 << 20)
    readers = [DiskReader(repo, snap, "vda", cache=cache) for _ in range(2)]
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        reader = readers[seed % 2]
        for _ in range(60):
            offset, length = rng.randrange(len(data)), rng.randrange(1, 3 * CS)
            if reader.read(offset, length) != data[offset : offset + length]:
                errors.append(f"{seed}: {offset} {length}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert calls and all(n == 1 for n in calls.values()), "one fetch per chunk however many threads ask"
    cache.close()


@pytest.mark.parametrize("far", [False, True])
def test_memory_is_bounded_by_the_cache_not_the_disk(far: bool) -> None:
    """Locally and from far storage (ranged reads at once in the cache's pool, a larger window
    of read-ahead: at most half the cache)."""
    size = 48 * 1024 * 1024
    disk = MemoryDisk(bytearray(os.urandom(size)))
    repo, snap = _backed_up(disk, Repository.init(FarBackend(0.001) if far else MemoryBackend(), b"pw", chunk_size=CS))
    del disk
    cache = ChunkCache(max_bytes=16 * CS)
    with DiskReader(repo, snap, "vda", cache=cache, readahead=None if far else 8) as reader:
        assert reader.readahead == 8
        tracemalloc.start()
        try:
            for offset in range(0, size, 256 * 1024):
                reader.read(offset, 256 * 1024)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    cache.close()
    assert reader.chunks_fetched >= size // CS
    # cache (16 chunks) + read-ahead in flight (2*2+8 chunks) + one read and its copy, with slack
    assert peak < 16 * CS + 12 * CS + 4 * 256 * 1024 + (2 << 20), peak


def test_reads_that_arrive_a_little_out_of_order_are_still_read_ahead(
    sample: tuple[Repository, Snapshot, bytes],
) -> None:
    """A kernel reading ahead through a mount or an NBD client sends its requests from several
    threads: they arrive out of order (through a mount, one read in eight). Each such read
    once counted as random and threw the read-ahead window away."""
    repo, snap, data = sample
    piece = 16 * 1024
    offsets = list(range(0, len(data), piece))
    for i in range(0, len(offsets) - 1, 2):  # every pair swapped: 1, 0, 3, 2, ...
        offsets[i], offsets[i + 1] = offsets[i + 1], offsets[i]
    with DiskReader(repo, snap, "vda", readahead=8) as reader:
        for offset in offsets:
            assert reader.read(offset, piece) == data[offset : offset + piece]
        stats = reader.cache.stats
        assert stats.prefetched_chunks >= stats.fetched_chunks // 2, stats

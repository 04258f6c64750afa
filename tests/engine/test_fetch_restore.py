"""Restores and disk readers read runs of chunks with few ranged reads: request counts,
byte-identical results, a damaged chunk inside a run reported with its disk and offset, a
connection dropped in the middle of a range retried, and a DiskReader's read-ahead coalesced."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.engine.helpers import MemoryDisk, ScriptedSource
from tests.pagecache import cached_pages, page_cache_droppable, takes_direct
from tests.servers import FaultyHttpProxy, S3Server, running_s3, s3_client_environment
from vmvault import platform
from vmvault.backends.local import LocalBackend
from vmvault.backends.s3 import open_s3
from vmvault.engine.backup import backup
from vmvault.engine.reader import FAR_READAHEAD, DiskReader
from vmvault.engine.restore import _Flusher, restore
from vmvault.errors import IntegrityError
from vmvault.repo.format import ChunkResolver
from vmvault.repo.pack import BlobType, pack_name
from vmvault.repo.repository import BlobWriter, Repository, SealedBlob
from vmvault.repo.snapshot import Snapshot

MiB = 1 << 20
CS = 256 * 1024  # the default chunk size


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


@pytest.fixture(scope="module")
def disk64() -> MemoryDisk:
    data = bytearray(os.urandom(64 * MiB))
    data[8 * MiB : 9 * MiB] = bytes(MiB)  # zero chunks: never stored, never read
    return MemoryDisk(data, [(0, len(data))])


def _data_gets(repo: Repository) -> int:
    return repo.backend.requests.gets


def _restored(target: Path) -> bytes:
    (name,) = os.listdir(target)
    return (target / name).read_bytes()


@pytest.mark.parametrize("direct", [True, False], ids=["past-the-cache", "through-the-cache"])
def test_a_restore_leaves_no_page_it_wrote_in_the_page_cache(
    tmp_path: Path, disk64: MemoryDisk, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """A restore never reads what it wrote. Past the page cache (O_DIRECT) its pages never enter
    it; through it (a file system without O_DIRECT), every ``FLUSH_BYTES`` the pages written back
    are freed. Either way a restore of hundreds of GiB does not take the host's page cache (nor
    ask the kernel for a new page for every page it writes)."""
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    if direct and not takes_direct(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not take O_DIRECT (or it is hidden)")
    if not direct:
        monkeypatch.setattr(platform, "set_direct", lambda fd, on: False)
    monkeypatch.setattr(_Flusher, "FLUSH_BYTES", 4 * MiB)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"passphrase", chunk_size=CS)
    snap = backup(repo, ScriptedSource(disk64), workers=2).snapshot
    freed_by: list[str] = []
    drop_cached = platform.drop_cached

    def recorded(fd: int, offset: int = 0, length: int = 0) -> None:
        freed_by.append(threading.current_thread().name)
        drop_cached(fd, offset, length)

    monkeypatch.setattr(platform, "drop_cached", recorded)
    restore(repo, snap, str(tmp_path / "t"))
    (path,) = (tmp_path / "t").iterdir()
    flushes = sum(name.startswith("vmvault-flush") for name in freed_by)
    if direct:
        assert flushes == 0, "nothing dirty to write back as it goes"
    else:
        # while it writes, by the flusher (a flush starts only once the one before it is done,
        # so how many depends on the disk's speed), and once more after the final fsync
        assert flushes >= 2, freed_by
    assert freed_by[-1] == threading.current_thread().name, freed_by
    # the pages the flushes had not reached are freed after the final fsync too; a few may be
    # taken again by the kernel's own readahead or another process, never the 63 MiB written
    assert cached_pages(path) * 4096 <= 1 * MiB
    assert path.read_bytes() == bytes(disk64.data)


@pytest.mark.parametrize("workers", [1, 4])
def test_a_64_mib_disk_restores_in_far_fewer_reads_than_chunks(
    tmp_path: Path, disk64: MemoryDisk, workers: int
) -> None:
    """However many workers seal the chunks, the packs hold them in disk order."""
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"passphrase", chunk_size=CS)
    snap = backup(repo, ScriptedSource(disk64), workers=workers).snapshot
    stored_chunks = 64 * MiB // CS - MiB // CS
    before = repo.backend.requests.to_dict()
    result = restore(repo, snap, str(tmp_path / "t"))
    after = repo.backend.requests.to_dict()
    gets = after["get"] - before["get"]
    assert _restored(tmp_path / "t") == bytes(disk64.data)
    assert result.bytes_written == 63 * MiB
    # a read per run of a pack (at most 8 MiB; a run also ends where a pack or a 16 MiB plan
    # ends) and one per index block, not one per chunk
    assert gets <= 16, f"{gets} reads for {stored_chunks} chunks"
    assert after["bytes_read"] - before["bytes_read"] < 66 * MiB, "gaps bridged between runs stay small"


class _Reads(LocalBackend):
    """A local backend that serves ``at_once`` reads at once and records which threads read."""

    at_once = 1

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.asked = 0
        self.readers: set[str] = set()

    def prepare_reads(self) -> int:
        self.asked += 1
        return self.at_once

    def get_into(self, name: str, offset: int, length: int, buffer: mmap.mmap) -> memoryview:
        if name.startswith("data/"):
            self.readers.add(threading.current_thread().name)
            time.sleep(0.01)  # long enough for the other threads to take the next ranges
        return super().get_into(name, offset, length, buffer)


@pytest.mark.parametrize("at_once", [1, 3])
def test_a_restore_reads_as_many_ranges_at_once_as_the_storage_serves_best(
    tmp_path: Path, disk64: MemoryDisk, at_once: int
) -> None:
    """``Backend.prepare_reads`` (8 from an S3 or SFTP server far away, else 4) sets how many
    threads read; ``workers`` given overrides it, and the storage is not asked."""
    backend = _Reads(str(tmp_path / "repo"))
    backend.at_once = at_once
    repo = Repository.init(backend, b"passphrase", chunk_size=CS)
    snap = backup(repo, ScriptedSource(disk64), workers=2).snapshot
    restore(repo, snap, str(tmp_path / "t"))
    assert _restored(tmp_path / "t") == bytes(disk64.data)
    assert backend.asked == 1
    assert len(backend.readers) == at_once, backend.readers
    backend.readers.clear()
    restore(repo, snap, str(tmp_path / "t2"), workers=2)
    assert backend.asked == 1 and len(backend.readers) == 2


def test_packs_hold_a_disk_s_chunks_in_disk_order_whatever_the_workers_finish_first(
    tmp_path: Path, disk64: MemoryDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers that finish out of order (the first of every four batches slowed down) still
    leave each pack's chunks in the order of their offsets on the disk."""
    slowed = BlobWriter.seal

    def seal(self: BlobWriter, blob_type: BlobType, blob_id: bytes, data: bytes | memoryview) -> SealedBlob | None:
        if threading.current_thread().name.endswith("_0"):
            time.sleep(0.01)
        return slowed(self, blob_type, blob_id, data)

    monkeypatch.setattr(BlobWriter, "seal", seal)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"passphrase", chunk_size=CS)
    snap = backup(repo, ScriptedSource(disk64), workers=4).snapshot
    resolver = ChunkResolver(repo, snap, snap.disks[0])
    placed: list[tuple[bytes, int, int]] = []  # (pack, offset in pack, chunk of the disk)
    for chunk in range(snap.disks[0].size // CS):
        chunk_id = resolver.chunk_id(chunk)
        if chunk_id is not None:
            loc = repo.index.locations(chunk_id)[0]
            placed.append((loc.pack_id, loc.entry.offset, chunk))
    assert len(placed) == 252
    packs = {p for p, _, _ in placed}
    for pack in packs:
        chunks = [c for _, _, c in sorted(e for e in placed if e[0] == pack)]
        assert chunks == sorted(chunks), "a pack's chunks in the order of the disk"


def _damage_chunk(tmp_path: Path, repo: Repository, chunk_id: bytes) -> None:
    loc = repo.index.locations(chunk_id)[0]
    path = tmp_path / "repo" / pack_name(loc.pack_id)
    with open(path, "r+b") as f:
        f.seek(loc.entry.offset + loc.entry.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _in_the_middle_of_a_run(repo: Repository, snap: Snapshot) -> tuple[int, bytes]:
    """A stored chunk whose pack neighbours on both sides are chunks of the same disk."""
    resolver = ChunkResolver(repo, snap, snap.disks[0])
    n = snap.disks[0].size // CS
    for chunk in range(n // 2, n - 1):
        ids = [resolver.chunk_id(c) for c in (chunk - 1, chunk, chunk + 1)]
        if None in ids:
            continue
        locs = [repo.index.locations(i)[0] for i in ids if i is not None]
        if (
            len({loc.pack_id for loc in locs}) == 1
            and locs[0].entry.offset < locs[1].entry.offset < locs[2].entry.offset
        ):
            chunk_id = ids[1]
            assert chunk_id is not None
            return chunk, chunk_id
    raise AssertionError("no chunk between two neighbours of its pack")


def test_a_damaged_chunk_inside_a_run_is_reported_with_its_disk_and_offset(tmp_path: Path, disk64: MemoryDisk) -> None:
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"passphrase", chunk_size=CS)
    snap = backup(repo, ScriptedSource(disk64)).snapshot
    chunk, chunk_id = _in_the_middle_of_a_run(repo, snap)
    _damage_chunk(tmp_path, repo, chunk_id)
    with pytest.raises(IntegrityError) as info:
        restore(repo, snap, str(tmp_path / "t"))
    message = str(info.value)
    assert f"chunk {chunk_id.hex()}" in message and "authentication failed" in message
    assert f"needed by disk vda at offset {chunk * CS:#x} of snapshot {snap.short_id}" in message
    assert info.value.object_id == chunk_id.hex()
    # the existing policy: the restore stops, and no half-restored disk is left under any name
    assert not any(p.is_file() and p.suffix == ".raw" for p in (tmp_path / "t").rglob("*"))
    # a reader reports the same chunk at the same offset, and reads its neighbours
    with DiskReader(repo, snap, "vda") as reader:
        assert reader.read((chunk - 1) * CS, CS) == bytes(disk64.data[(chunk - 1) * CS : chunk * CS])
        with pytest.raises(IntegrityError, match=f"at offset {chunk * CS:#x}"):
            reader.read((chunk - 1) * CS, 3 * CS)
        assert reader.read((chunk + 1) * CS, CS) == bytes(disk64.data[(chunk + 1) * CS : (chunk + 2) * CS])


def test_a_sequential_reader_reads_ahead_in_runs(tmp_path: Path, disk64: MemoryDisk) -> None:
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"passphrase", chunk_size=CS)
    snap = backup(repo, ScriptedSource(disk64)).snapshot
    data = bytes(disk64.data)
    before = _data_gets(repo)
    with DiskReader(repo, snap, "vda") as reader:  # read-ahead of 32 chunks
        for offset in range(0, len(data), 64 * 1024):  # small reads, as a file system makes them
            assert reader.read(offset, 64 * 1024) == data[offset : offset + 64 * 1024]
        fetched = reader.chunks_fetched
        prefetched = reader.cache.stats.prefetched_chunks
    gets = _data_gets(repo) - before
    assert fetched == 252 and prefetched > 200
    assert gets < fetched // 4, f"{gets} reads for {fetched} chunks"
    # one large read of uncached chunks: together too
    with DiskReader(repo, snap, "vda", readahead=0) as reader:
        before = _data_gets(repo)
        assert reader.read(16 * MiB, 32 * MiB) == data[16 * MiB : 48 * MiB]
        assert _data_gets(repo) - before <= 128 // 8, "128 chunks in runs of up to 8 MiB of their packs"


# ---- a connection dropped in the middle of a ranged read ------------------------------------


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_client_environment(), running_s3(tmp_path_factory.mktemp("moto"), buckets=("fetch",)) as server:
        yield server


@contextmanager
def _backed_up_through_proxy(
    moto: S3Server, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> Iterator[tuple[FaultyHttpProxy, Repository, Snapshot, bytes]]:
    """24 MiB of random data backed up to S3 (moto) through a proxy that can cut answers."""
    for key, value in S3Server.client_env().items():
        monkeypatch.setenv(key, value)
    data = os.urandom(24 * MiB)
    proxy = FaultyHttpProxy(moto.port)
    proxy.start()
    try:
        repo = Repository.init(open_s3(proxy.url("fetch", prefix)), b"passphrase", chunk_size=CS)
        snap = backup(repo, ScriptedSource(MemoryDisk(bytearray(data), [(0, len(data))]))).snapshot
        yield proxy, repo, snap, data
        repo.close()
    finally:
        proxy.stop()


@pytest.mark.integration
def test_a_connection_dropped_mid_range_is_retried(
    tmp_path: Path, moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _backed_up_through_proxy(moto, monkeypatch, "drop") as (proxy, repo, snap, data):
        backend = repo.backend
        retries, gets = backend.requests.retries, backend.requests.gets
        proxy.truncate_next(2)  # the first two answers: cut half-way, connection dropped
        restore(repo, snap, str(tmp_path / "t"))
        assert _restored(tmp_path / "t") == data
        assert proxy.truncated == 2
        assert backend.requests.retries - retries >= 1
        assert backend.requests.gets - gets <= 24 * MiB // CS // 8


@pytest.mark.integration
def test_a_reader_from_s3_reads_ahead_in_runs_and_survives_a_dropped_connection(
    moto: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``mount``, ``serve`` and ``files`` read with, from S3: a large window of read-ahead
    whose ranged reads go out at once (a pool the reader's cache owns), each connection's
    failure retried, every byte right."""
    with _backed_up_through_proxy(moto, monkeypatch, "reader") as (proxy, repo, snap, data):
        backend = repo.backend
        gets, retries = backend.requests.gets, backend.requests.retries
        proxy.truncate_next(2)
        with DiskReader(repo, snap, "vda") as reader:
            assert reader.readahead == FAR_READAHEAD
            for offset in range(0, len(data), MiB):
                assert reader.read(offset, MiB) == data[offset : offset + MiB]
            assert reader.cache.stats.prefetched_chunks > len(data) // CS // 2
        assert proxy.truncated == 2
        assert backend.requests.retries - retries >= 1
        assert backend.requests.gets - gets <= len(data) // CS // 4, "runs of a pack's chunks"

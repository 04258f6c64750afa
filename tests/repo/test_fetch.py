"""BlobFetcher: runs of a pack's blobs in one ranged read, in order, damage reported per blob,
storage errors raised where they belong, memory and concurrency bounded."""

from __future__ import annotations

import random
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmvault.backends.base import Backend, ObjectInfo
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import BackendConnectionError, IntegrityError
from vmvault.repo import fetch
from vmvault.repo.fetch import BlobFetcher
from vmvault.repo.format import BlobType
from vmvault.repo.index import BlobLocation
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


class Watched(Backend):
    """A memory backend that records each ranged read, how many run at once, and can fail or
    slow them down."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.inner = MemoryBackend()
        self.url = "watched://"
        self.delay = delay
        self.reads: list[tuple[str, int, int | None]] = []
        self.running = 0
        self.most_running = 0
        self.fail_reads_of: set[str] = set()
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.requests.count("get")
        with self._lock:
            self.reads.append((name, offset, length))
            self.threads.add(threading.get_ident())
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if self.delay:
                time.sleep(self.delay)
            if name in self.fail_reads_of:
                raise BackendConnectionError(f"gave up on reading {name}: connection reset", name=name)
            return self.inner.get(name, offset, length)
        finally:
            with self._lock:
                self.running -= 1

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def data_reads(self) -> list[tuple[str, int, int | None]]:
        return [r for r in self.reads if r[0].startswith("data/")]


def _repo(
    n: int, *, pack_size: int = 16 << 20, seed: int = 1, delay: float = 0.0
) -> tuple[Repository, list[bytes], list[bytes]]:
    """A repository holding ``n`` incompressible chunks of CS bytes, written in order (one
    upload thread, so a pack holds them in the order given)."""
    backend = Watched(delay=delay)
    repo = Repository.init(backend, b"passphrase", chunk_size=CS, pack_size=pack_size)
    rng = random.Random(seed)
    ids, datas = [], []
    writer = repo.writer(upload_threads=1)
    for _ in range(n):
        data = rng.randbytes(CS)
        chunk_id = repo.key.chunk_id(data)
        writer.add(BlobType.DATA, chunk_id, data)
        ids.append(chunk_id)
        datas.append(data)
    writer.flush()
    backend.reads.clear()
    return repo, ids, datas


def _watched(repo: Repository) -> Watched:
    assert isinstance(repo.backend, Watched)
    return repo.backend


def test_a_run_of_one_pack_comes_in_one_read() -> None:
    repo, ids, datas = _repo(64)  # 4 MiB: one pack
    with BlobFetcher(repo) as fetcher:
        got = list(fetcher.fetch(enumerate(ids)))
    assert [k for k, _ in got] == list(range(64))
    assert [d for _, d in got] == datas
    assert len(_watched(repo).data_reads()) == 1
    assert fetcher.stats.ranges == 1 and fetcher.stats.blobs == 64 and fetcher.stats.gap_bytes == 0


def test_ranges_stay_within_their_bounds_and_gaps() -> None:
    repo, ids, datas = _repo(64)
    sealed = repo.index.locations(ids[0])[0].entry.length
    # every other chunk: gaps of one sealed chunk between the wanted ones
    wanted = ids[::2]
    with BlobFetcher(repo, max_gap=0) as fetcher:
        assert [d for _, d in fetcher.fetch((i, c) for i, c in enumerate(wanted))] == datas[::2]
    assert len(_watched(repo).data_reads()) == 32, "no gap allowed: one read per chunk"
    _watched(repo).reads.clear()
    with BlobFetcher(repo, max_gap=sealed, max_range=8 * sealed) as fetcher:
        assert [d for _, d in fetcher.fetch((i, c) for i, c in enumerate(wanted))] == datas[::2]
    reads = _watched(repo).data_reads()
    assert all(length is not None and length <= 8 * sealed for _, _, length in reads)
    assert len(reads) == 8, "gaps of one chunk bridged; 4 wanted chunks (7 sealed lengths) per range"
    assert fetcher.stats.gap_bytes == 8 * 3 * sealed


@settings(max_examples=25, deadline=None)
@given(
    order=st.lists(st.integers(0, 23), min_size=1, max_size=60),
    zero_every=st.integers(2, 7),
    requests=st.integers(0, 3),
    max_range=st.sampled_from([CS, 3 * CS, 1 << 20]),
)
def test_results_come_in_the_order_asked_whatever_the_order_in_the_packs(
    order: list[int], zero_every: int, requests: int, max_range: int
) -> None:
    """Any order, repeats, and pieces that need no blob (None): each result at its place."""
    repo, ids, datas = _ORDERED
    wanted = [(n, None if n % zero_every == 0 else ids[i]) for n, i in enumerate(order)]
    with BlobFetcher(repo, max_requests=requests, max_range=max_range, max_bytes=4 * CS) as fetcher:
        got = list(fetcher.fetch(wanted))
    assert [k for k, _ in got] == [k for k, _ in wanted]
    for (n, blob), (_, data) in zip(wanted, got, strict=True):
        assert data == (None if blob is None else datas[order[n]])


_ORDERED = _repo(24, pack_size=5 * CS)  # several packs of a few chunks


def test_a_damaged_blob_in_the_middle_of_a_run_is_reported_alone() -> None:
    repo, ids, datas = _repo(32)
    loc = repo.index.locations(ids[13])[0]
    name = pack_name(loc.pack_id)
    pack = bytearray(_watched(repo).inner.get(name))
    pack[loc.entry.offset + loc.entry.length // 2] ^= 0x40
    _watched(repo).inner.put(name, bytes(pack))
    with BlobFetcher(repo) as fetcher:
        got = dict(fetcher.fetch(enumerate(ids)))
    damaged = got.pop(13)
    assert isinstance(damaged, IntegrityError)
    assert damaged.object_id == ids[13].hex() and "authentication failed" in str(damaged)
    # exactly what a read of it alone says
    with pytest.raises(IntegrityError) as alone:
        repo.get_blob(BlobType.DATA, ids[13])
    assert str(alone.value) == str(damaged)
    assert got == {i: d for i, d in enumerate(datas) if i != 13}
    assert fetcher.stats.retried_alone == 1
    # the run, then the damaged chunk alone (and the test's own read of it)
    assert len(_watched(repo).data_reads()) == 3


def test_a_missing_pack_names_each_blob_as_a_read_alone_does() -> None:
    repo, ids, _ = _repo(8)
    _watched(repo).inner.delete(pack_name(repo.index.locations(ids[0])[0].pack_id))
    with BlobFetcher(repo) as fetcher:
        got = list(fetcher.fetch(enumerate(ids)))
    assert all(isinstance(r, IntegrityError) and "is missing" in str(r) for _, r in got)
    assert [r.object_id for _, r in got if isinstance(r, IntegrityError)] == [i.hex() for i in ids]


def test_a_blob_the_index_does_not_know_is_reported_in_its_place() -> None:
    repo, ids, datas = _repo(4)
    unknown = bytes(32)
    got = list(BlobFetcher(repo, max_requests=0).fetch(enumerate([ids[0], unknown, ids[1]])))
    assert got[0] == (0, datas[0]) and got[2] == (2, datas[1])
    assert isinstance(got[1][1], IntegrityError) and "missing from the repository index" in str(got[1][1])


def test_a_storage_error_is_raised_where_its_range_is_needed() -> None:
    repo, ids, datas = _repo(40, pack_size=20 * CS)  # two packs
    first_pack = repo.index.locations(ids[0])[0].pack_id
    second = next(i for i, c in enumerate(ids) if repo.index.locations(c)[0].pack_id != first_pack)
    _watched(repo).fail_reads_of.add(pack_name(repo.index.locations(ids[second])[0].pack_id))
    delivered = []
    with BlobFetcher(repo) as fetcher, pytest.raises(BackendConnectionError, match="connection reset"):
        for key, data in fetcher.fetch(enumerate(ids)):
            delivered.append((key, data))
    assert delivered == list(enumerate(datas))[:second]


def test_memory_and_reads_in_flight_are_bounded_whatever_the_size() -> None:
    """400 chunks (25 MiB) in many packs, a slow storage and a slow caller: at most
    ``max_requests`` reads at once, and far less than the whole held in memory."""
    repo, ids, _ = _repo(400, pack_size=1 << 20, delay=0.002)
    max_bytes = 2 << 20
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with BlobFetcher(repo, max_requests=3, max_range=256 << 10, max_bytes=max_bytes) as fetcher:
            n = 0
            for _key, data in fetcher.fetch(enumerate(ids)):
                assert isinstance(data, bytes)
                n += 1
                time.sleep(0.0005)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert n == 400
    assert _watched(repo).most_running <= 3
    assert fetcher.stats.peak_planned_bytes <= max_bytes + fetcher.batch_bytes + CS
    assert peak < 8 * max_bytes, f"peak {peak / 2**20:.1f} MiB for 25 MiB fetched"


def test_reads_may_run_in_the_calling_thread() -> None:
    repo, ids, datas = _repo(20)
    _watched(repo).threads.clear()
    fetcher = BlobFetcher(repo, max_requests=0)
    assert [d for _, d in fetcher.fetch(enumerate(ids))] == datas
    assert _watched(repo).threads == {threading.get_ident()} and fetcher.stats.ranges == 1


def test_a_fetch_whose_shared_pool_is_shut_down_reads_its_ranges_itself() -> None:
    """A reader's fetcher runs its ranges in a pool its cache owns; a cache closed while a read
    is under way shuts that pool down. The fetch then reads what is left in the calling thread:
    every blob delivered, no "cannot schedule new futures" or cancelled range escapes."""
    from concurrent.futures import ThreadPoolExecutor

    repo, ids, datas = _repo(60, pack_size=8 * CS)
    pool = ThreadPoolExecutor(2)
    fetcher = BlobFetcher(repo, max_requests=2, max_range=2 * CS, max_bytes=8 * CS, executor=pool)
    got = []
    for n, (_key, data) in enumerate(fetcher.fetch(enumerate(ids))):
        got.append(data)
        if n == 3:  # ranges are queued and planned ahead: some are cancelled, the rest refused
            pool.shutdown(wait=False, cancel_futures=True)
    assert got == datas
    assert fetcher.stats.retried_alone == 0


def test_the_index_is_asked_once_per_group_of_blobs_not_once_per_blob(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning looks blobs up in groups (one query each); each result is the one a lookup of
    that blob alone gives, including blobs the index does not know and repeats."""
    repo, ids, datas = _repo(40)
    monkeypatch.setattr(fetch, "_LOOKUP_GROUP", 16)
    asked: list[int] = []
    many, one = repo.index.locations_many, repo.index.locations

    def counted(blob_ids: Iterable[bytes]) -> dict[bytes, list[BlobLocation]]:
        wanted = list(blob_ids)
        asked.append(len(wanted))
        found = many(wanted)
        assert found == {b: one(b) for b in wanted}
        return found

    alone: list[bytes] = []
    monkeypatch.setattr(repo.index, "locations", lambda b: alone.append(b) or one(b))
    monkeypatch.setattr(repo.index, "locations_many", counted)
    unknown = bytes(32)
    wanted = [*ids, unknown, None, *ids[:3]]
    with BlobFetcher(repo) as fetcher:
        got = list(fetcher.fetch(enumerate(wanted)))
    assert asked == [16, 16, 12]  # 45 pieces in groups of 16; one of the last 13 needs no blob
    assert [d for _, d in got[:40]] == datas and [d for _, d in got[42:]] == datas[:3]
    assert isinstance(got[40][1], IntegrityError) and got[41][1] is None
    assert alone == [unknown], "only the blob the index does not know is looked up alone (get_blob)"

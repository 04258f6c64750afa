"""``Repository.list_snapshots`` reads the snapshots several at a time (a round trip each to a
remote store), and returns and reports what reading them one after another did. The backend is
test_fetch's ``Watched`` (a memory backend that counts concurrent reads, slows or fails them).
These listings read the storage's copies (``kept=False``); test_snapshot_cache.py has this
host's copies standing in for them."""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from tests.repo.builders import make_repo, reopen
from tests.repo.test_fetch import Watched
from vmvault.backends.base import ObjectInfo
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import BackendConnectionError
from vmvault.repo.repository import Repository
from vmvault.repo.schema import snapshot_detail, snapshot_summary
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _snapshots(repo: Repository, n: int) -> list[str]:
    ids = []
    for i in range(n):
        snap = Snapshot(
            time=f"2026-12-04T08:{i // 60:02d}:{i % 60:02d}+00:00",
            hostname="host",
            username="root",
            source={"location": f"/vm/{i % 3}"},
            tags=[f"n{i}"],
        )
        ids.append(repo.save_snapshot(snap))
    if isinstance(repo.backend, Watched):
        repo.backend.reads.clear()  # each save reads its object back; the tests count listings' reads
    return ids


def _snapshot_reads(backend: Watched) -> int:
    return sum(name.startswith("snapshots/") for name, _offset, _length in backend.reads)


def test_snapshots_are_read_several_at_a_time_in_the_same_order() -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _snapshots(repo, 24)
    backend.delay = 0.05  # each read a round trip to a store far away
    started = time.monotonic()
    listed = repo.list_snapshots(kept=False)
    took = time.monotonic() - started
    assert [s.id for s in listed] == ids  # oldest first, as before
    assert _snapshot_reads(backend) == 24
    assert backend.most_running == Repository.SNAPSHOT_READS
    # one after another: 24 x 50 ms = 1.2 s; eight at a time: 3 rounds
    assert took < 0.6, f"{took:.2f} s for 24 snapshots"
    assert repo.find_snapshot("latest").id == ids[-1]
    assert repo.find_snapshot("latest", source="/vm/1").id == ids[22]


def test_damaged_and_vanished_snapshots_are_reported_in_the_listing_s_order() -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _snapshots(repo, 10)
    damaged, vanished = sorted(ids)[3], sorted(ids)[7]
    sealed = bytearray(backend.inner.get(f"snapshots/{damaged}"))
    sealed[-1] ^= 1
    backend.inner.put(f"snapshots/{damaged}", bytes(sealed))
    listing = [o.name for o in backend.inner.list("snapshots/")]
    backend.inner.delete(f"snapshots/{vanished}")
    # listed, then gone before it is read (a prune from another host)
    backend.list = lambda prefix="": iter([ObjectInfo(name, 1) for name in listing])  # type: ignore[method-assign]
    reported: list[tuple[str, str, str]] = []

    def report(snap_id: str, exc: Exception) -> None:
        reported.append((snap_id, type(exc).__name__, threading.current_thread().name))

    listed = repo.list_snapshots(on_error=report, kept=False)
    assert [s.id for s in listed] == [i for i in ids if i not in (damaged, vanished)]
    here = threading.current_thread().name
    assert reported == [(damaged, "IntegrityError", here), (vanished, "SnapshotNotFoundError", here)]


def test_a_storage_error_ends_the_listing_and_sends_no_more_reads() -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _snapshots(repo, 40)
    backend.delay = 0.02
    backend.fail_reads_of = {f"snapshots/{sorted(ids)[0]}"}
    with pytest.raises(BackendConnectionError, match="connection reset"):
        repo.list_snapshots(kept=False)
    assert backend.running == 0, "no read is left running after the error"
    assert _snapshot_reads(backend) < 40, "the reads queued behind the error were not sent"


class _Lists(MemoryBackend):
    """A memory backend that counts listings of ``snapshots/``."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshot_lists = 0

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.snapshot_lists += prefix == "snapshots/"
        return super().list(prefix)


def test_the_listing_opening_took_serves_the_command_that_opened_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``restore latest`` lists ``snapshots/`` once, not once to open and again to find the
    newest; the next listing, a listing after a lock was taken (what ``prune`` and ``check`` run
    under) or after a snapshot was written, and one past ``LISTING_REUSE`` go to the storage."""
    backend = _Lists()
    first = make_repo(backend)
    ids = _snapshots(first, 3)
    repo = reopen(first)
    lists = backend.snapshot_lists
    assert repo.find_snapshot("latest").id == ids[-1]
    assert backend.snapshot_lists == lists, "the opening's listing served"
    assert [s.id for s in repo.list_snapshots()] == ids
    assert backend.snapshot_lists == lists + 1

    # a snapshot written since the opening's listing is never missed
    repo = reopen(first)
    other = reopen(first)
    newer = _snapshots(other, 1)[0]
    lists = backend.snapshot_lists
    repo.save_snapshot(Snapshot(time="2026-12-04T09:00:00+00:00", hostname="h", username="u", source={}))
    assert newer in [s.id for s in repo.list_snapshots()]
    assert backend.snapshot_lists == lists + 1

    repo = reopen(first)
    lists = backend.snapshot_lists
    repo.lock(exclusive=False, operation="test")
    repo.list_snapshots()
    assert backend.snapshot_lists == lists + 1

    monkeypatch.setattr(Repository, "LISTING_REUSE", 0.0)
    repo = reopen(first)
    lists = backend.snapshot_lists
    repo.list_snapshots()
    assert backend.snapshot_lists == lists + 1


def _big_snapshots(repo: Repository, n: int, blocks: int) -> list[str]:
    """``n`` snapshots of one disk of ``blocks`` index blocks (4 TiB at 4096), and a file."""
    ids = []
    for i in range(n):
        index: list[str | None] = [f"{i:08x}{b:056x}" for b in range(blocks)]
        disk = DiskRecord("sda", "raw", blocks << 30, 256 << 10, 4096, index)
        snap = Snapshot(
            time=f"2026-12-04T09:{i // 60:02d}:{i % 60:02d}+00:00",
            hostname="host",
            username="root",
            source={"location": f"/vm/{i % 2}"},
            disks=[disk],
            files=[FileRecord("vm.conf", 10, 0o644, 0, ["ab" * 32])],
        )
        ids.append(repo.save_snapshot(snap))
    if isinstance(repo.backend, Watched):
        repo.backend.reads.clear()  # each save reads its object back; the tests count listings' reads
    return ids


def test_summaries_hold_what_a_listing_shows_and_refuse_the_ids() -> None:
    repo = make_repo(MemoryBackend())
    ids = _big_snapshots(repo, 3, 8)
    whole = repo.list_snapshots()
    summaries = repo.list_snapshots(summaries=True)
    assert [s.id for s in summaries] == [s.id for s in whole] == ids
    for full, light in zip(whole, summaries, strict=True):
        assert snapshot_summary(light) == snapshot_summary(full)
        assert snapshot_detail(light) == snapshot_detail(full)  # counts of blocks and chunks
        assert light.is_summary and not full.is_summary
        with pytest.raises(RuntimeError, match="summary"):
            light.disks[0].index[0]
        with pytest.raises(RuntimeError, match="summary"):
            list(light.files[0].chunks)
        with pytest.raises(RuntimeError, match="summary"):
            repo.save_snapshot(light)  # never stored without its ids
    # the ones commands go on with are whole
    assert repo.find_snapshot("latest") == whole[-1] and not repo.find_snapshot("latest").is_summary
    assert repo.find_snapshot("latest", source="/vm/1") == whole[-2]


def test_summaries_do_not_grow_with_the_snapshots_disks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listed as summaries, 40 snapshots of a 4 TiB disk (4,096 index block ids each, about
    480 KiB as Python strings) peak where 10 do and keep a few KiB each; listed whole, each
    adds its ids. Read one at a time here: with several at once the peak is those several
    manifests being parsed, which varies with how the threads interleave (measured 8-16 MiB
    for 10 to 320 snapshots)."""
    monkeypatch.setattr(Repository, "SNAPSHOT_READS", 1)
    peaks, kept = {}, {}
    for count in (10, 40):
        repo = make_repo(MemoryBackend())
        _big_snapshots(repo, count, 4096)
        for summaries in (True, False):
            repo = reopen(repo)
            gc.collect()
            tracemalloc.start()
            try:
                listed = repo.list_snapshots(kept=False, summaries=summaries)
                kept[count, summaries], peaks[count, summaries] = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert len(listed) == count
            del listed
    assert peaks[40, True] - peaks[10, True] < 1 << 20, peaks
    assert kept[40, True] < 40 * (8 << 10), kept
    assert kept[40, False] - kept[10, False] > 30 * (400 << 10), kept

"""``Repository.list_snapshots`` reads the snapshots several at a time (a round trip each to a
remote store), and returns and reports what reading them one after another did. The backend is
test_fetch's ``Watched`` (a memory backend that counts concurrent reads, slows or fails them).
These listings read the storage's copies (``kept=False``); test_snapshot_cache.py has this
host's copies standing in for them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.repo.builders import make_repo, reopen
from tests.repo.test_fetch import Watched
from vmvault.backends.base import ObjectInfo
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import BackendConnectionError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot


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

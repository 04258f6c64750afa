"""``Repository.list_snapshots`` reads the snapshots several at a time (a round trip each to a
remote store), and returns and reports what reading them one after another did."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.repo.builders import make_repo
from vmvault.backends.base import Backend, ObjectInfo
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import BackendConnectionError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


class SlowSnapshots(Backend):
    """A memory backend whose snapshot reads each take ``delay`` seconds, as a round trip to a
    store far away would; it records how many run at once and can fail one."""

    def __init__(self, delay: float) -> None:
        self.inner = MemoryBackend()
        self.url = "slow-snapshots://"
        self.delay = delay
        self.running = 0
        self.most_running = 0
        self.snapshot_reads = 0
        self.fail: str | None = None
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if not name.startswith("snapshots/"):
            return self.inner.get(name, offset, length)
        with self._lock:
            self.snapshot_reads += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.delay)
            if name == self.fail:
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


def test_snapshots_are_read_several_at_a_time_in_the_same_order() -> None:
    backend = SlowSnapshots(delay=0.05)
    repo = make_repo(backend)
    ids = _snapshots(repo, 24)
    started = time.monotonic()
    listed = repo.list_snapshots()
    took = time.monotonic() - started
    assert [s.id for s in listed] == ids  # oldest first, as before
    assert backend.snapshot_reads == 24
    assert backend.most_running == Repository.SNAPSHOT_READS
    # one after another: 24 x 50 ms = 1.2 s; eight at a time: 3 rounds
    assert took < 0.6, f"{took:.2f} s for 24 snapshots"
    assert repo.find_snapshot("latest").id == ids[-1]
    assert repo.find_snapshot("latest", source="/vm/1").id == ids[22]


def test_damaged_and_vanished_snapshots_are_reported_in_the_listing_s_order() -> None:
    backend = SlowSnapshots(delay=0.0)
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

    listed = repo.list_snapshots(on_error=report)
    assert [s.id for s in listed] == [i for i in ids if i not in (damaged, vanished)]
    here = threading.current_thread().name
    assert reported == [(damaged, "IntegrityError", here), (vanished, "SnapshotNotFoundError", here)]


def test_a_storage_error_ends_the_listing_and_sends_no_more_reads() -> None:
    backend = SlowSnapshots(delay=0.02)
    repo = make_repo(backend)
    ids = _snapshots(repo, 40)
    backend.fail = f"snapshots/{sorted(ids)[0]}"
    with pytest.raises(BackendConnectionError, match="connection reset"):
        repo.list_snapshots()
    assert backend.running == 0, "no read is left running after the error"
    assert backend.snapshot_reads < 40, "the reads queued behind the error were not sent"

"""A backup whose lock went stale (process suspended, storage unreachable) writes no snapshot.

repository-format.md, section 8: a lock not refreshed for STALE_SECONDS is ignored by
others, so a prune may run beside a backup that was suspended that long, and delete packs
the backup uploaded (no snapshot needs them yet) or reuses. The backup must notice before
it writes its snapshot, which would otherwise name missing data. The suspension is
simulated by moving the lock module's clock forward once the backup holds its lock.
"""

from __future__ import annotations

import os
import time as real_time
from pathlib import Path

import pytest

import vmvault.repo.locks as locks_module
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.errors import LockedError
from vmvault.hypervisors import open_source
from vmvault.repo.check import check
from vmvault.repo.locks import REFRESH_SECONDS, STALE_SECONDS
from vmvault.repo.repository import Repository

PASSWORD = b"lock-suspension-test"


class _Clock:
    """Stands in for the ``time`` module inside vmvault.repo.locks, ``shift`` seconds ahead."""

    def __init__(self) -> None:
        self.shift = 0.0

    def time(self) -> float:
        return real_time.time() + self.shift

    def __getattr__(self, name: str) -> object:  # sleep, monotonic ... stay real
        return getattr(real_time, name)


@pytest.mark.parametrize("gap_minutes", [0, (STALE_SECONDS - REFRESH_SECONDS) // 60 + 1])
def test_backup_checks_its_lock_before_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gap_minutes: int
) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    clock = _Clock()
    monkeypatch.setattr(locks_module, "time", clock)
    backend = LocalBackend(str(tmp_path / "repo"))
    repo = Repository.init(backend, PASSWORD, chunk_size=64 * 1024, pack_size=256 * 1024)
    image = tmp_path / "vm.img"
    image.write_bytes(os.urandom(2 << 20))

    load_index = repo.load_index

    def suspended_after_locking() -> list[str]:
        clock.shift += gap_minutes * 60  # the process "sleeps" right after taking its lock
        return load_index()

    monkeypatch.setattr(repo, "load_index", suspended_after_locking)
    if not gap_minutes:
        backup(repo, open_source(str(image)))
        assert len(repo.snapshot_ids()) == 1
        return
    with pytest.raises(LockedError, match="not refreshed for more than 25 minutes"):
        backup(repo, open_source(str(image)))
    assert repo.snapshot_ids() == [], "a backup with a stale lock wrote its snapshot"
    assert list(backend.list("locks/")) == []  # released all the same
    # the clock back (monkeypatch.undo() would also drop conftest's per-test state folder)
    monkeypatch.setattr(locks_module, "time", real_time)
    # the packs it uploaded are indexed and reused by the next run
    again = Repository.open(LocalBackend(str(tmp_path / "repo")), PASSWORD)
    result = backup(again, open_source(str(image)))
    assert result.raw_new < (1 << 20), result.raw_new
    assert check(again, read_data=True).ok

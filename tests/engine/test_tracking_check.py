"""The change-tracking check: on an incremental, chunks the tracking calls unchanged are
re-read and compared with the parent snapshot; a lie is found, warned about loudly, the disk
is read whole and the next backup reads it whole too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.engine.helpers import MemoryDisk, ScriptedSession, ScriptedSource
from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import SourceError
from vmvault.hypervisors.base import DEFAULT_OPTIONS, BackupOptions, PreviousBackup
from vmvault.repo.repository import Repository

CS = 64 * 1024


def new_repo() -> Repository:
    return Repository.init(MemoryBackend(), b"test-passphrase", chunk_size=CS)


def test_a_tracking_that_misses_a_write_is_found_and_the_disk_read_whole(tmp_path: Path) -> None:
    size = 8 << 20  # 128 chunks, every one with data
    data = bytearray(os.urandom(size))
    disk = MemoryDisk(data)
    repo = new_repo()
    source = ScriptedSource(disk)
    backup(repo, source)
    # the guest rewrites a quarter of the disk, the tracking reports a single small range
    data[: size // 4] = os.urandom(size // 4)
    data[size - 100 :] = b"x" * 100
    source.changed = [(size - 100, 100)]
    disk.bytes_read = 0
    result = backup(repo, source, BackupOptions(tracking_sample=64))
    record = result.snapshot.disks[0]
    warning = next(w for w in result.warnings if "change tracking is wrong" in w)
    assert warning in result.snapshot.warnings  # recorded with the snapshot, not only printed
    assert record.stats["incremental"] == 0 and record.stats["tracking_checked"] >= 1
    assert record.cbt is None  # so the next backup reads everything again
    out = tmp_path / "out"
    restore(repo, result.snapshot, str(out))
    assert (out / "vda.raw").read_bytes() == bytes(data)
    # the next backup gets no tracking record for the disk
    backup(repo, source, BackupOptions(tracking_sample=8))
    assert source.last_previous is not None and "vda" not in source.last_previous.disks


def test_a_truthful_tracking_passes_and_reads_only_the_sample_beside_the_changes() -> None:
    size = 8 << 20
    data = bytearray(os.urandom(size))
    disk = MemoryDisk(data)
    repo = new_repo()
    source = ScriptedSource(disk)
    backup(repo, source)
    data[CS : CS + 10] = b"0123456789"
    source.changed = [(CS, 10)]
    disk.bytes_read = 0
    result = backup(repo, source, BackupOptions(tracking_sample=5))
    record = result.snapshot.disks[0]
    assert record.stats["incremental"] == 1 and record.stats["tracking_checked"] == 5
    assert disk.bytes_read == 6 * CS  # the changed chunk and the five sampled ones
    assert record.cbt is not None and not [w for w in result.warnings if "tracking" in w]


def test_the_sample_also_checks_chunks_that_were_zero() -> None:
    size = 4 << 20
    data = bytearray(size)
    disk = MemoryDisk(data, allocated=[(0, size)])
    repo = new_repo()
    source = ScriptedSource(disk)
    backup(repo, source)
    data[:] = os.urandom(size)  # every chunk changes, none is reported
    source.changed = []
    result = backup(repo, source, BackupOptions(tracking_sample=3))
    assert any("change tracking is wrong" in w for w in result.warnings)
    assert result.snapshot.disks[0].stats["incremental"] == 0


class _StartedMeanwhile(ScriptedSession):
    def before_snapshot(self) -> None:
        raise SourceError("the VM was started while its disks were read")


def test_a_session_that_refuses_before_the_snapshot_stores_none() -> None:
    disk = MemoryDisk(bytearray(os.urandom(1 << 20)))
    repo = new_repo()

    class Source(ScriptedSource):
        def open_session(
            self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS
        ) -> ScriptedSession:
            session = _StartedMeanwhile(super().open_session(previous, options).disks)
            self.sessions.append(session)
            return session

    source = Source(disk)
    with pytest.raises(SourceError, match="started"):
        backup(repo, source)
    assert repo.list_snapshots() == []
    assert source.sessions[-1].closed and source.sessions[-1].completed is None

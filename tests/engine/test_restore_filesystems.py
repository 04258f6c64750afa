"""Restores onto XFS and btrfs, each a real file system made in a file and mounted through a loop
device by the test: the disk is written past the page cache (``O_DIRECT``, disk/_direct.py)
where the file system takes it, byte for byte in raw, qcow2 and VHDX (read back by
``qemu-img``); a file system that fills up stops the restore with ``TargetFullError`` and
nothing left behind; and a local repository there is read past the page cache too
(``LocalBackend.get_into``). XFS is the default file system of RHEL-family KVM hosts; btrfs
checksums what ``O_DIRECT`` writes. ext4 and tmpfs are what the rest of the suite writes to."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import mounted_loop_filesystem, require_tool
from tests.engine.helpers import MemoryDisk, ScriptedSource
from tests.pagecache import cached_pages, page_cache_droppable
from vmvault import platform
from vmvault.backends import local
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.disk import _direct
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import TargetFullError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

MiB = 1 << 20
CS = 256 * 1024
#: mkfs.xfs makes nothing smaller than 300 MiB; the image files are sparse
FS_MIB = 320


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


@pytest.fixture(params=["xfs", "btrfs"])
def filesystem(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if platform.HIDE_POSIX:
        pytest.skip("O_DIRECT is hidden (VMVAULT_PLATFORM_HIDE_POSIX=1), as on Windows")
    with mounted_loop_filesystem(tmp_path / "fs.img", tmp_path / "mnt", request.param, FS_MIB) as mnt:
        yield mnt


@pytest.fixture(scope="module")
def disk() -> MemoryDisk:
    """A 40 MiB disk and a bit: random data, a hole of 3 MiB, zero chunks, and a last 1.5 KiB
    that is not a whole 4 KiB block (written through the page cache after the direct writes)."""
    size = 40 * MiB + 1536
    data = bytearray(os.urandom(size))
    data[10 * MiB : 13 * MiB] = bytes(3 * MiB)
    data[20 * MiB : 20 * MiB + 2 * CS] = bytes(2 * CS)
    return MemoryDisk(data, [(0, 10 * MiB), (13 * MiB, size - 13 * MiB)])


@pytest.fixture
def backed_up(disk: MemoryDisk) -> tuple[Repository, Snapshot, bytes]:
    """``disk`` backed up into a repository in memory (for each test: opening a repository
    writes this host's record, which each test keeps to itself)."""
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    return repo, backup(repo, ScriptedSource(disk), workers=2).snapshot, bytes(disk.data)


def _raw_bytes(path: Path, fmt: str, scratch: Path) -> bytes:
    """The disk's bytes as ``qemu-img`` reads them: an independent reader of qcow2 and VHDX."""
    if fmt == "raw":
        return path.read_bytes()
    out = scratch / "converted.raw"
    subprocess.run(
        [require_tool("qemu-img"), "convert", "-f", fmt, "-O", "raw", str(path), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhdx"])
def test_a_restore_onto_xfs_or_btrfs_is_written_past_the_page_cache_byte_for_byte(
    filesystem: Path,
    tmp_path: Path,
    backed_up: tuple[Repository, Snapshot, bytes],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    repo, snap, data = backed_up
    writers: list[_direct.DirectWrites | None] = []
    opened = _direct.DirectWrites.open

    def recorded(fd: int, path: str) -> _direct.DirectWrites | None:
        writers.append(opened(fd, path))
        return writers[-1]

    monkeypatch.setattr(_direct.DirectWrites, "open", staticmethod(recorded))
    result = restore(repo, snap, str(filesystem / "t"), format=fmt)
    (disk,) = result.disks
    path = Path(disk["path"])
    assert writers and all(w is not None for w in writers), f"{filesystem} took O_DIRECT for the new disk"
    assert all(w is not None and w.direct for w in writers), "no direct write was refused (EINVAL) and redone"
    if page_cache_droppable(filesystem) is None:
        # the restore leaves nothing of its own in the page cache (through it, the flusher
        # frees what it wrote: this holds either way; the writers above show which way it went)
        assert cached_pages(path) * 4096 <= 2 * MiB
    assert _raw_bytes(path, fmt, tmp_path) == data


def test_a_full_xfs_or_btrfs_target_stops_the_restore_with_nothing_left(
    filesystem: Path, backed_up: tuple[Repository, Snapshot, bytes]
) -> None:
    """The file system is filled to 16 MiB of free space first; the 40 MiB disk's direct writes
    then meet ENOSPC in the writing thread, which the restore reports as the target being full."""
    repo, snap, _ = backed_up
    filler = filesystem / "filler"
    with open(filler, "wb") as f:
        free = os.statvfs(filesystem).f_bavail * os.statvfs(filesystem).f_frsize
        chunk = os.urandom(MiB)
        for _ in range((free - 16 * MiB) // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    with pytest.raises(TargetFullError, match="No space left"):
        restore(repo, snap, str(filesystem / "t"))
    assert os.listdir(filesystem / "t") == [], "nothing is left: no final name, no partial file"


def test_a_local_repository_on_xfs_or_btrfs_is_read_past_the_page_cache(
    filesystem: Path, tmp_path: Path, disk: MemoryDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore reads its ranges of packs whole 4 KiB blocks at a time with ``O_DIRECT``
    (``LocalBackend.get_into``), never through the page cache, from a repository on XFS or btrfs."""
    repo = Repository.init(LocalBackend(str(filesystem / "repo")), b"passphrase", chunk_size=CS)
    snap = backup(repo, ScriptedSource(disk), workers=2).snapshot
    fills: list[int] = []
    fill = local._fill

    def recorded(fd: int, view: memoryview, offset: int, align: int) -> int:
        fills.append(align)
        return fill(fd, view, offset, align)

    monkeypatch.setattr(local, "_fill", recorded)
    restore(repo, snap, str(tmp_path / "t"))
    assert fills and set(fills) == {platform.DIRECT_ALIGN}, "every range was read past the page cache"
    (path,) = (tmp_path / "t").iterdir()
    assert path.read_bytes() == bytes(disk.data)

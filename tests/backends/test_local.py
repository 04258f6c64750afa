"""The local backend's own behaviour beyond the contract (tests/backends/contract.py)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import small_tmpfs
from tests.pagecache import cached_pages, page_cache_droppable, takes_direct
from vmvault import platform
from vmvault.backends import local
from vmvault.backends.local import LocalBackend
from vmvault.errors import BackendError


def test_a_written_object_leaves_the_page_cache_once_it_is_on_disk(tmp_path: Path) -> None:
    """A pack is written once and seldom read back: its pages go back to the kernel after the
    fsync instead of pushing the host's working set out of the cache."""
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    backend = LocalBackend(str(tmp_path / "repo"))
    data = os.urandom(8 << 20)
    backend.put("data/ab/" + "ab" * 32, data)
    (path,) = (p for p in (tmp_path / "repo").rglob("*") if p.is_file() and p.stat().st_size == len(data))
    assert cached_pages(path) == 0
    assert backend.get("data/ab/" + "ab" * 32) == data


def test_a_pack_s_pages_leave_the_page_cache_once_read(tmp_path: Path) -> None:
    """A pack's bytes are read once (vmvault keeps what it needs as plaintext): the pages of
    the range read go back to the kernel; other objects' pages (snapshots, read by every
    command) stay cached."""
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    backend = LocalBackend(str(tmp_path / "repo"))
    data = os.urandom(8 << 20)
    name, snapshot = "data/cd/" + "cd" * 32, "snapshots/" + "ef" * 32
    backend.put(name, data)
    backend.put(snapshot, data[: 1 << 20])
    path, snap_path = tmp_path / "repo" / name, tmp_path / "repo" / snapshot
    page = os.sysconf("SC_PAGE_SIZE")
    with path.open("rb") as f:
        f.read()  # everything cached, as another reader of the file would leave it
    assert cached_pages(path) == len(data) // page
    assert backend.get(name, 1 << 20, 2 << 20) == data[1 << 20 : 3 << 20]
    assert cached_pages(path) == len(data) // page - (2 << 20) // page, "the range read left the cache, only it"
    assert backend.get(name) == data
    assert cached_pages(path) == 0
    assert backend.get(snapshot) == data[: 1 << 20]
    assert cached_pages(snap_path) == (1 << 20) // page


def test_parts_are_written_whole_however_short_each_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack's parts go to the file with ``writev``, at most a write's slice a call, and a
    short write is carried on from where it stopped."""
    calls: list[int] = []
    real = os.writev

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        total = sum(len(b) for b in buffers)
        assert total <= platform.WRITE_SLICE and len(buffers) <= 1024
        calls.append(total)
        return real(fd, [bytes(b"".join(buffers))[: max(1, total // 3)]])  # a third of it, at least a byte

    monkeypatch.setattr(local.os, "writev", short_writev)
    parts = [os.urandom(n) for n in (5, 0, 300_000, (1 << 20) + 7, 1, 90_000)]
    backend = LocalBackend(str(tmp_path / "repo"))
    backend.put_parts("data/cd/" + "cd" * 32, parts)
    assert backend.get("data/cd/" + "cd" * 32) == b"".join(parts)
    assert len(calls) > len(parts)


def test_a_pack_of_many_small_blobs_is_written_a_bounded_number_of_parts_a_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``writev`` takes at most IOV_MAX buffers (1024 on Linux): 5,000 small parts are written
    a few hundred a call, not refused."""
    calls: list[int] = []
    real = os.writev
    monkeypatch.setattr(local.os, "writev", lambda fd, buffers: calls.append(len(buffers)) or real(fd, buffers))
    parts = [os.urandom(1 + n % 40) for n in range(5000)]
    backend = LocalBackend(str(tmp_path / "repo"))
    backend.put_parts("data/ef/" + "ef" * 32, parts)
    assert backend.get("data/ef/" + "ef" * 32) == b"".join(parts)
    assert max(calls) <= 256 and sum(calls) == 5000


def test_a_write_that_takes_nothing_is_an_error_not_a_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.os, "writev", lambda fd, buffers: 0)
    backend = LocalBackend(str(tmp_path / "repo"))
    with pytest.raises(BackendError, match="none of the bytes"):
        backend.put("data/ef/" + "ef" * 32, b"x" * 100)
    assert not any(p.is_file() for p in (tmp_path / "repo").rglob("*") if "ef" in p.name)


def _pack(tmp_path: Path, size: int) -> tuple[LocalBackend, str, bytes, Path]:
    backend = LocalBackend(str(tmp_path / "repo"))
    data = os.urandom(size)
    name = "data/ab/" + "ab" * 32
    backend.put(name, data)
    (path,) = (p for p in (tmp_path / "repo").rglob("*") if p.is_file() and p.stat().st_size == size)
    return backend, name, data, path


def test_a_pack_range_is_read_past_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``get_into`` reads a pack's range with O_DIRECT: the kernel keeps none of its pages, even
    with the freeing of pages read through the cache switched off."""
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    if not takes_direct(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not take O_DIRECT")
    backend, name, data, path = _pack(tmp_path, 8 << 20)
    assert cached_pages(path) == 0
    monkeypatch.setattr(platform, "drop_cached", lambda *args: None)
    buffer = mmap.mmap(-1, 10 << 20)
    assert bytes(backend.get_into(name, 12345, 5 << 20, buffer)) == data[12345 : 12345 + (5 << 20)]
    assert cached_pages(path) == 0
    assert backend.get(name, 12345, 100) == data[12345:12445]  # get reads through the cache
    assert cached_pages(path) > 0


def test_a_refused_direct_read_is_read_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that takes O_DIRECT and then refuses the read (EINVAL) is read as ``get``
    reads; so is a range larger than the buffer."""
    backend, name, data, _ = _pack(tmp_path, 3 << 20)
    real = platform.pread_into
    refused: list[int] = []

    def pread_into(fd: int, view: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, offset)

    monkeypatch.setattr(platform, "pread_into", pread_into)
    buffer = mmap.mmap(-1, 4 << 20)
    assert bytes(backend.get_into(name, 100, 2 << 20, buffer)) == data[100 : 100 + (2 << 20)]
    assert refused == ([] if not takes_direct(tmp_path) else [0])
    small = mmap.mmap(-1, 1 << 20)
    assert bytes(backend.get_into(name, 7, 2 << 20, small)) == data[7 : 7 + (2 << 20)]
    snapshot = "snapshots/" + "ef" * 32  # not a pack: read as ``get`` reads it
    backend.put(snapshot, data[:5000])
    before = backend.requests.gets
    assert bytes(backend.get_into(snapshot, 10, 100, buffer)) == data[10:110]
    assert backend.requests.gets == before + 1


def test_a_bounded_read_of_a_small_object_does_not_allocate_the_bound(tmp_path: Path) -> None:
    """Index files and snapshots are read with a bound of what a writer makes (up to 1 GiB):
    the read asks for no more than the object holds."""
    import tracemalloc

    backend = LocalBackend(str(tmp_path / "repo"))
    backend.put("index/" + "ab" * 32, b"x" * 1000)
    tracemalloc.start()
    try:
        data = backend.get("index/" + "ab" * 32, 0, (1 << 30) + 1)
        tail = backend.get("index/" + "ab" * 32, 990, 1 << 30)
        past = backend.get("index/" + "ab" * 32, 5000, 1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (data, tail, past) == (b"x" * 1000, b"x" * 10, b"")
    assert peak < 1 << 20


def test_a_repository_folder_found_once_is_never_made_again(tmp_path: Path) -> None:
    """The first write makes a missing folder (``init``); once an operation found it, a folder
    removed while the command runs is an error for every operation, and nothing is made."""
    root = tmp_path / "repo"
    b = LocalBackend(str(root))
    assert not b.exists("config") and not root.exists()  # nothing found, nothing made
    b.put("config", b"c")
    shutil.rmtree(root)
    for operation in (
        lambda: b.put("data/ab/abc", b"x"),
        lambda: b.get("config"),
        lambda: b.exists("config"),
        lambda: list(b.list("data/")),
        lambda: b.delete("config"),
    ):
        with pytest.raises(BackendError, match="the repository folder is gone, or is another folder"):
            operation()
    assert not root.exists()


def test_another_folder_at_the_repository_s_path_is_neither_read_nor_written(tmp_path: Path) -> None:
    """The path leads to another folder than the one found first (as a disk unmounted leaves
    its empty mount point there): refused, and the other folder stays empty."""
    root = tmp_path / "repo"
    b = LocalBackend(str(root))
    b.put("config", b"c")
    root.rename(tmp_path / "elsewhere")
    root.mkdir()
    with pytest.raises(BackendError, match="is gone, or is another folder than the one this command opened"):
        b.put("data/ab/abc", b"x")
    with pytest.raises(BackendError, match="another folder"):
        b.exists("config")
    assert list(root.iterdir()) == []
    assert LocalBackend(str(root)).exists("config") is False  # a new command finds what is there


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted on an empty folder (root only), unmounted afterwards if still mounted."""
    with small_tmpfs(tmp_path / "disk", "64m") as point:
        yield point


def test_a_disk_unmounted_under_a_backup_fails_it_and_nothing_lands_on_the_mount_point(mount_point: Path) -> None:
    """A repository on its own disk (a real mount); the disk unmounted while a backup runs: the
    backup fails with the reason, and the empty mount point on the other disk gets nothing (it
    used to get a fresh repository folder holding the rest of the backup: a backup "done" into no
    repository, hidden once the disk was mounted again)."""
    from tests.engine.helpers import MemoryDisk, ScriptedSource
    from vmvault.engine.backup import backup
    from vmvault.repo.repository import Repository

    location = mount_point / "vmvault"
    repo = Repository.init(LocalBackend(str(location)), b"pw", chunk_size=64 * 1024)
    unmounted = threading.Event()
    once = threading.Lock()

    class UnmountedMidway(MemoryDisk):
        def read(self, offset: int, length: int) -> bytes:
            if offset >= self.size // 2:
                with once:
                    if not unmounted.is_set():
                        subprocess.run(["umount", "-l", str(mount_point)], check=True)
                        unmounted.set()
            return super().read(offset, length)

    disk = UnmountedMidway(bytearray(os.urandom(16 << 20)))
    with pytest.raises(BackendError, match="the repository folder is gone"):
        backup(repo, ScriptedSource(disk))
    assert unmounted.is_set() and not os.path.ismount(mount_point)
    assert list(mount_point.iterdir()) == []


def test_threads_writing_first_into_a_folder_not_made_yet_all_succeed(tmp_path: Path) -> None:
    """The first writes of several threads into a repository folder that does not exist yet:
    one makes it; none takes the others' making it for the folder having gone (a thread that
    found it missing before another made it once did)."""
    for attempt in range(40):
        b = LocalBackend(str(tmp_path / f"repo{attempt}"))
        start = threading.Barrier(8)

        def put(i: int, b: LocalBackend = b, start: threading.Barrier = start) -> None:
            start.wait()
            b.put(f"data/{i:02x}/x", b"x")

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(put, range(8)))  # (a thread's error is raised here)
        assert len(list(b.list("data/"))) == 8, attempt

"""vmvault.platform: each POSIX call and the fallback Windows gets, run on Linux with the POSIX
calls hidden (the ``hidden`` fixture here; ``VMVAULT_PLATFORM_HIDE_POSIX=1`` for whole test
packages in scripts/test.sh)."""

from __future__ import annotations

import ast
import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import descriptors_taken
from tests.pagecache import cached_pages, page_cache_droppable
from vmvault import platform
from vmvault.automation.locks import StateLock
from vmvault.backends.local import LocalBackend
from vmvault.disk import open_image
from vmvault.engine.target import RestoreTarget
from vmvault.errors import BackendError, LockedError, TargetError

MIB = 1 << 20


@pytest.fixture
def hidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The platform module as it is with ``VMVAULT_PLATFORM_HIDE_POSIX=1`` (and on Windows)."""
    for name in ("_pread", "_pwrite", "_fdatasync", "_SEEK_DATA", "_SEEK_HOLE", "_flock", "_fadvise"):
        monkeypatch.setattr(platform, name, None)
    monkeypatch.setattr(platform, "_NOFOLLOW", 0)
    monkeypatch.setattr(platform, "HIDE_POSIX", True)
    yield


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(256 * 1024)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    yield fd, data
    os.close(fd)


def test_the_switch_is_read_at_import() -> None:
    code = "import vmvault.platform as p; print(p.HIDE_POSIX, p._pread, p._SEEK_DATA, p._flock, p._NOFOLLOW)"
    env = {**os.environ, "VMVAULT_PLATFORM_HIDE_POSIX": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "None", "None", "None", "0"]
    env["VMVAULT_PLATFORM_HIDE_POSIX"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False" and "None" not in out


# ------------------------------------------------------------------------- positional I/O


@pytest.mark.parametrize("hide", [False, True])
def test_pread_reads_at_the_offset_and_short_at_the_end(
    request: pytest.FixtureRequest, data_file: tuple[int, bytes], hide: bool
) -> None:
    if hide:
        request.getfixturevalue("hidden")
    fd, data = data_file
    assert platform.pread(fd, 100, 1000) == data[1000:1100]
    assert platform.pread(fd, 100, len(data) - 10) == data[-10:]
    assert platform.pread(fd, 100, len(data) + 5) == b""
    # a damaged image's pointer: past the largest file the file system allows (lseek fails
    # there with EINVAL where pread returns nothing) and past 2**63 - 1: both the end of the file
    for far in (1 << 62, (1 << 63) - 1, (1 << 63) - 50):
        assert platform.pread(fd, 100, far) == b""
    # ... and past what the system's calls take at all (a u64 pointer field: 2**64 - 2**40 in a
    # fuzzed VHDX region table gave an OverflowError in both modes)
    for far in (1 << 63, (1 << 64) - (1 << 40), (1 << 64) - 1, 1 << 80):
        assert platform.pread(fd, 100, far) == b""
    with pytest.raises(OSError):
        platform.pread(fd, 100, -1)  # a negative offset is the caller's bug, not the end


@pytest.mark.parametrize("hide", [False, True])
def test_pwrite_writes_at_the_offset(request: pytest.FixtureRequest, data_file: tuple[int, bytes], hide: bool) -> None:
    if hide:
        request.getfixturevalue("hidden")
    fd, data = data_file
    assert platform.pwrite(fd, memoryview(b"xyz"), 7) == 3
    assert platform.pread(fd, 10, 5) == data[5:7] + b"xyz" + data[10:15]
    assert platform.pwrite(fd, b"tail", len(data) + 4) == 4  # past the end: a gap of zeros
    assert platform.pread(fd, 8, len(data)) == b"\0\0\0\0tail"


def test_fallback_reads_from_many_threads_each_get_their_own_offset(hidden: None, data_file: tuple[int, bytes]) -> None:
    """Seek and read share one file position: the per-descriptor lock keeps each pair together."""
    fd, data = data_file
    bad: list[int] = []

    def worker(seed: int) -> None:
        for i in range(300):
            off = (seed * 7919 + i * 4099) % (len(data) - 512)
            if platform.pread(fd, 512, off) != data[off : off + 512]:
                bad.append(off)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_fallback_io_errors_are_oserrors(hidden: None) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as exc:  # a pipe cannot seek
            platform.pread(r, 1, 0)
        assert exc.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------------- memory

#: a child that allocates and frees buffers the way a restore does (pack ranges of 1-8 MiB
#: opened into 200 KiB pieces, in four threads) and prints whether the allocator was set and
#: the page faults the work took
_ALLOCATING_CHILD = """
import random, resource, sys, threading
from vmvault import platform
applied = platform.keep_freed_memory() if sys.argv[1] == "keep" else False
def work(seed):
    rnd = random.Random(seed)
    for _ in range(60):
        big = b"r" * (rnd.randrange(1, 9) << 20)
        parts = [big[j : j + (200 << 10)] + b"d" for j in range(0, len(big), 256 << 10)]
        del big, parts
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _allocating_child(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATING_CHILD, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
@pytest.mark.skipif(platform.HIDE_POSIX, reason="the allocator is left alone when the POSIX calls are hidden")
def test_freed_buffers_are_reused_not_faulted_in_again() -> None:
    applied, kept = _allocating_child("keep")
    assert applied == "True"
    _, default = _allocating_child("default")
    # measured: 11,000-15,000 faults kept against 27,000-30,000 with glibc's defaults
    assert kept * 1.4 < default, (kept, default)
    # the user's own allocator settings win, and the hidden-POSIX runs leave it alone too
    assert _allocating_child("keep", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert _allocating_child("keep", VMVAULT_PLATFORM_HIDE_POSIX="1")[0] == "False"


def test_kept_free_says_what_the_process_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "_kept_free", None)
    monkeypatch.setattr(platform, "_mallopt", lambda unless, *settings: False)
    assert not platform.keep_freed_memory() and platform.kept_free() is None  # not applied: not set
    monkeypatch.setattr(platform, "_mallopt", lambda unless, *settings: True)
    assert platform.keep_freed_memory(kept_free=96 << 20) and platform.kept_free() == 96 << 20


#: a child whose live memory swings by 96 MiB (a backup's batches and packs coming and going,
#: 4 MiB buffers), printing whether the allocator was set and the page faults the swings took
_SWINGING_CHILD = """
import resource, sys
from vmvault import platform
applied = platform.keep_freed_memory(kept_free=int(sys.argv[1]))
held = [b"w" * (4 << 20)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch = [b"b" * (4 << 20) + bytes([n]) for n in range(24)]
    del batch
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
@pytest.mark.skipif(platform.HIDE_POSIX, reason="the allocator is left alone when the POSIX calls are hidden")
def test_a_heap_kept_larger_than_the_swing_is_not_faulted_in_again() -> None:
    def child(kept: int) -> tuple[str, int]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        out = subprocess.run(
            [sys.executable, "-c", _SWINGING_CHILD, str(kept)], env=clean, capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    applied, wide = child(256 << 20)
    assert applied == "True"
    _, default = child(platform.KEPT_FREE)
    # each swing past KEPT_FREE gives the heap's top back, and the next one faults it in:
    # about 24,000 faults a swing (96 MiB of 4 KiB pages), against the first swing's only
    assert wide * 3 < default, (wide, default)


#: eight threads, alive together, each in turn allocating 16 MiB in 100 KiB buffers and freeing
#: them; prints whether one heap was set and the RSS the process grew by, in MiB, while they are
#: all alive (the current VmRSS: ``ru_maxrss`` of a process started by a large one, such as the
#: test runner, begins at its parent's RSS, which exec folds into it)
_THREADS_CHILD = """
import sys, threading
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
from vmvault import platform
platform.keep_freed_memory()
applied = platform.one_malloc_arena() if sys.argv[1] == "one" else False
turns = [threading.Event() for _ in range(9)]
done = threading.Event()
def work(n):
    turns[n].wait()
    parts = [b"x" * (100 << 10) + bytes([n]) for _ in range(160)]
    del parts
    turns[n + 1].set()
    done.wait()
threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
for t in threads: t.start()
before = rss()
turns[0].set()
turns[8].wait()
grown = rss() - before
done.set()
for t in threads: t.join()
print(applied, grown // 1024)
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
@pytest.mark.skipif(platform.HIDE_POSIX, reason="the allocator is left alone when the POSIX calls are hidden")
def test_threads_sharing_one_heap_reuse_each_others_freed_buffers() -> None:
    def child(mode: str, **env: str) -> tuple[str, int]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        out = subprocess.run(
            [sys.executable, "-c", _THREADS_CHILD, mode],
            env={**clean, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0], int(out[1])

    applied, shared = child("one")
    assert applied == "True"
    _, own = child("own")
    # measured: 15 MiB with one heap, 126 MiB with a heap per thread
    assert shared < 40 and own > 2 * shared, (shared, own)
    assert child("one", MALLOC_ARENA_MAX="4")[0] == "False"


# ------------------------------------------------------------------------ holes, flushing


def _sparse(tmp_path: Path) -> Path:
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
        f.seek(4 * MIB)
        f.write(b"x" * MIB)
    return path


def test_holes_are_found_with_seek_data(tmp_path: Path) -> None:
    path = _sparse(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            first = platform.seek_data(fd, 0)
        except OSError as exc:  # pragma: no cover - a file system without SEEK_DATA
            pytest.skip(f"no hole detection on this file system: {exc}")
        assert first <= 4 * MIB and platform.seek_hole(fd, first) >= 5 * MIB
    finally:
        os.close(fd)


def test_without_hole_detection_the_whole_file_is_data(hidden: None, tmp_path: Path) -> None:
    path = _sparse(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for call in (platform.seek_data, platform.seek_hole):
            with pytest.raises(OSError) as exc:
                call(fd, 0)
            assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    with open_image(str(path)) as img:
        extents = list(img.extents())
        assert [(e.offset, e.length, e.kind.name) for e in extents] == [(0, 8 * MIB, "DATA")]
        assert img.read(4 * MIB - 1, 2) == b"\0x"


def test_flush_is_fdatasync_else_fsync(monkeypatch: pytest.MonkeyPatch, data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    calls: list[str] = []
    monkeypatch.setattr(platform, "_fdatasync", lambda f: calls.append(f"fdatasync {f == fd}"))
    monkeypatch.setattr(os, "fsync", lambda f: calls.append(f"fsync {f == fd}"))
    platform.flush_data(fd)
    monkeypatch.setattr(platform, "_fdatasync", None)
    platform.flush_data(fd)
    assert calls == ["fdatasync True", "fsync True"]


def test_drop_cached_frees_written_back_pages(tmp_path: Path) -> None:
    # (dirty pages are left, but the call also starts writing them back, so how many are left
    # right after it depends on the disk's speed: not asserted)
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    path = tmp_path / "written"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(4 * MIB))
        os.fsync(fd)
        assert cached_pages(path) == 1024
        platform.drop_cached(fd, 0, 1 * MIB)  # (a large folio is freed whole or not at all)
        assert cached_pages(path) >= 768
        platform.drop_cached(fd)
        assert cached_pages(path) == 0
        assert os.pread(fd, 16, 4 * MIB - 16) != bytes(16)  # the data itself is there
    finally:
        os.close(fd)


def test_drop_cached_is_only_advice(hidden: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kept"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        platform.drop_cached(fd)  # hidden, as on Windows: nothing to call, nothing raised
        monkeypatch.setattr(platform, "_fadvise", lambda *a: (_ for _ in ()).throw(OSError(errno.ESPIPE, "pipe")))
        platform.drop_cached(fd)  # a descriptor the call refuses: ignored
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- file locks


@pytest.mark.parametrize("hide", [False, True])
def test_a_lock_excludes_another_open_file_of_the_same_process(
    request: pytest.FixtureRequest, tmp_path: Path, hide: bool
) -> None:
    if hide:
        request.getfixturevalue("hidden")
    path = tmp_path / "lock"
    path.write_text('{"pid": 1}\n')
    a = os.open(path, os.O_RDWR)
    b = os.open(path, os.O_RDWR)
    probe = os.open(path, os.O_RDONLY)
    try:
        assert platform.lock(a, wait=False)
        assert not platform.lock(b, wait=False)
        assert not platform.lock(probe, wait=False)  # a read-only look (StateLock.holder) sees it held
        assert platform.pread(probe, 100, 0) == b'{"pid": 1}\n'  # the holder's text stays readable
        os.close(a)
        a = -1
        assert platform.lock(b, wait=True)
    finally:
        for fd in (a, b, probe):
            if fd >= 0:
                os.close(fd)


@pytest.mark.parametrize("hide", [False, True], ids=["posix", "fallback"])
def test_shared_locks_share_and_exclude_an_exclusive_one(
    request: pytest.FixtureRequest, tmp_path: Path, hide: bool
) -> None:
    """Any number of shared locks at once (index caches in use, index_cache.hold_in_use), none
    with an exclusive one (``vmvault cache`` removing the cache)."""
    if hide:
        request.getfixturevalue("hidden")
    path = tmp_path / "use"
    path.touch()
    first, second = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    alone = os.open(path, os.O_RDWR)
    try:
        assert platform.lock_shared(first, wait=False) and platform.lock_shared(second, wait=True)
        assert not platform.lock(alone, wait=False)
        os.close(first)
        first = -1
        assert not platform.lock(alone, wait=False)
        os.close(second)
        second = -1
        assert platform.lock(alone, wait=False)
        third = os.open(path, os.O_RDONLY)
        assert not platform.lock_shared(third, wait=False)
        os.close(third)
    finally:
        for fd in (first, second, alone):
            if fd >= 0:
                os.close(fd)


def test_a_blocking_lock_waits_for_the_holder(hidden: None, tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.touch()
    a, b = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    assert platform.lock(a, wait=True)
    got = threading.Event()
    t = threading.Thread(target=lambda: platform.lock(b, wait=True) and got.set())
    t.start()
    try:
        assert not got.wait(0.3)
        os.close(a)
        assert got.wait(10)
    finally:
        t.join(10)
        os.close(b)


def test_state_locks_with_the_fallback(hidden: None, tmp_path: Path) -> None:
    path = str(tmp_path / "locks" / "daemon")
    first = StateLock(path, "a daemon").acquire(command="vmvault daemon")
    try:
        with pytest.raises(LockedError, match="by `vmvault daemon`"):
            StateLock(path, "a daemon").acquire()
        holder = StateLock(path, "a daemon").holder()
        assert holder is not None and holder["command"] == "vmvault daemon"
    finally:
        first.release()
    assert StateLock(path, "a daemon").holder() is None


# -------------------------------------------------------------------------- replacement


def test_replace_retries_while_the_target_is_open_elsewhere(
    hidden: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "new").write_text("new")
    (tmp_path / "old").write_text("old")
    real, refusals = os.replace, [2]

    def busy(src: str, dst: str) -> None:
        if refusals[0]:
            refusals[0] -= 1
            raise PermissionError(errno.EACCES, "The process cannot access the file", dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    monkeypatch.setattr(platform, "REPLACE_PAUSE", 0.001)
    platform.replace(str(tmp_path / "new"), str(tmp_path / "old"))
    assert (tmp_path / "old").read_text() == "new" and not (tmp_path / "new").exists()


def test_replace_gives_up_and_keeps_both_files(hidden: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "new").write_text("new")
    (tmp_path / "old").write_text("old")
    tries: list[str] = []

    def busy(src: str, dst: str) -> None:
        tries.append(dst)
        raise PermissionError(errno.EACCES, "in use", dst)

    monkeypatch.setattr(os, "replace", busy)
    monkeypatch.setattr(platform, "REPLACE_PAUSE", 0.001)
    with pytest.raises(PermissionError):
        platform.replace(str(tmp_path / "new"), str(tmp_path / "old"))
    assert len(tries) == platform.REPLACE_TRIES
    assert (tmp_path / "old").read_text() == "old" and (tmp_path / "new").read_text() == "new"


def test_replace_on_posix_raises_the_first_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[str] = []

    def refused(src: str, dst: str) -> None:
        tries.append(dst)
        raise PermissionError(errno.EACCES, "denied", dst)

    monkeypatch.setattr(os, "replace", refused)
    if platform.WINDOWS or platform.HIDE_POSIX:
        pytest.skip("the POSIX behaviour only")
    with pytest.raises(PermissionError):
        platform.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert len(tries) == 1


# ---------------------------------------------------------------------- links, no-follow


@pytest.mark.parametrize("hide", [False, True])
def test_open_nofollow_refuses_a_link(request: pytest.FixtureRequest, tmp_path: Path, hide: bool) -> None:
    if hide:
        request.getfixturevalue("hidden")
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as exc:
        platform.open_nofollow(str(tmp_path / "link"), os.O_RDONLY)
    assert exc.value.errno == errno.ELOOP
    fd = platform.open_nofollow(str(tmp_path / "real"), os.O_RDONLY)
    os.close(fd)
    fd = platform.open_nofollow(str(tmp_path / "new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    assert (tmp_path / "new").exists()


@pytest.mark.parametrize("swap", ["link", "other file"])
def test_open_nofollow_fallback_catches_a_swap_during_the_open(
    hidden: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """An attacker replaces the name between the check and the open: the descriptor is closed."""
    target, secret = tmp_path / "file", tmp_path / "secret"
    target.write_text("mine")
    secret.write_text("not yours")
    real_open, opened = os.open, []

    def racing_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if path == str(target):
            target.unlink()
            if swap == "link":
                target.symlink_to(secret)
            else:
                target.write_text("planted")
            fd = real_open(secret if swap == "link" else path, flags, mode, **kw)
            opened.append(fd)
            if swap == "other file":  # what was opened is the planted file; put another in its place
                target.unlink()
                target.write_text("swapped again")
            return fd
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", racing_open)
    with pytest.raises(OSError) as exc:
        platform.open_nofollow(str(target), os.O_RDONLY)
    assert exc.value.errno == errno.ELOOP
    with pytest.raises(OSError):  # the descriptor was closed
        os.fstat(opened[0])


def _fake_stat(mode: int, attributes: int = 0, tag: int = 0) -> os.stat_result:
    return cast(os.stat_result, types.SimpleNamespace(st_mode=mode, st_file_attributes=attributes, st_reparse_tag=tag))


def test_links_include_windows_name_surrogate_reparse_points() -> None:
    regular, folder, link = 0o100644, 0o040755, 0o120777
    assert platform.is_link(_fake_stat(link))
    assert not platform.is_link(_fake_stat(regular))
    assert platform.is_link(_fake_stat(folder, 0x400, 0xA0000003))  # a junction (IO_REPARSE_TAG_MOUNT_POINT)
    assert platform.is_link(_fake_stat(regular, 0x400, 0xA000000C))  # IO_REPARSE_TAG_SYMLINK
    assert not platform.is_link(_fake_stat(regular, 0x400, 0x80000013))  # a deduplicated file is the file
    assert not platform.is_link(_fake_stat(regular, 0, 0xA0000003))  # a tag without the attribute


def test_same_file_compares_device_and_inode(tmp_path: Path) -> None:
    (tmp_path / "a").touch()
    (tmp_path / "b").touch()
    os.link(tmp_path / "a", tmp_path / "c")
    a, b, c = (os.stat(tmp_path / n) for n in "abc")
    assert platform.same_file(a, c) and not platform.same_file(a, b)


# -------------------------------------------------------------------------- names, owners


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("disk.vhdx", None),
        ("web01 (copy).vhdx", None),
        ("Ünïcode ✓.avhdx", None),
        ("con", "device"),
        ("CON", "device"),
        ("nul.txt", "device"),
        ("Com1.vhdx", "device"),
        ("lpt9", "device"),
        ("COM¹", "device"),
        ("conin$", "device"),
        ("aux .log", "device"),
        ("console", None),
        ("com10", None),
        ("disk.vhdx:evil", "':'"),
        ("C:disk", "':'"),
        ("a\\b", "'\\\\'"),
        ("a/b", "'/'"),
        ('say"hi"', "'\"'"),
        ("tab\there", "'\\t'"),
        ("what?", "'?'"),
        ("trailing.", "dot or a space"),
        ("trailing ", "dot or a space"),
        ("..", "empty"),
        ("", "empty"),
    ],
)
def test_windows_names(name: str, why: str | None) -> None:
    problem = platform.windows_name_problem(name)
    if why is None:
        assert problem is None
    else:
        assert problem is not None and why in problem


def test_name_keys_collide_case_insensitively() -> None:
    def same(a: str, b: str, insensitive: bool = True) -> bool:
        return platform.name_key(a, case_insensitive=insensitive) == platform.name_key(b, case_insensitive=insensitive)

    assert same("Disk.VHDX", "disk.vhdx")
    assert same("\u00e9.vhdx", "e\u0301.vhdx")  # composed and decomposed é
    assert same("Straße", "STRASSE")
    assert not same("Disk.VHDX", "disk.vhdx", insensitive=False)


def test_current_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    assert platform.current_uid() == os.geteuid()
    monkeypatch.delattr(os, "geteuid")
    assert platform.current_uid() is None


def test_space_figures(tmp_path: Path) -> None:
    path = _sparse(tmp_path)
    st = os.stat(path)
    assert platform.allocated_bytes(st) == st.st_blocks * 512 < st.st_size
    assert platform.allocated_bytes(cast(os.stat_result, types.SimpleNamespace(st_size=123))) == 123
    vfs = os.statvfs(tmp_path)
    assert abs(platform.free_bytes(str(tmp_path)) - vfs.f_bavail * vfs.f_frsize) < 64 * MIB


def test_sync_dir_and_set_blocking(tmp_path: Path) -> None:
    platform.sync_dir(str(tmp_path))
    with pytest.raises(OSError):
        platform.sync_dir(str(tmp_path / "missing"))
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        platform.set_blocking(r)
        assert os.get_blocking(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("posix", [True, False], ids=["descriptor", "by-name"])
def test_list_folder_lists_only_the_folder_it_was_told_of(
    tmp_path: Path, request: pytest.FixtureRequest, posix: bool
) -> None:
    if not posix:
        request.getfixturevalue("hidden")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"bb")
    (tmp_path / "sub" / "a").mkdir()
    os.symlink("nowhere", tmp_path / "sub" / "c")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret").write_bytes(b"s")
    top = platform.list_folder(str(tmp_path))
    assert [n for n, _ in top] == ["elsewhere", "sub"]
    seen = dict(top)["sub"]
    assert isinstance(seen, os.stat_result)
    listed = platform.list_folder(str(tmp_path / "sub"), seen)
    assert [n for n, _ in listed] == ["a", "b", "c"]
    kinds = [st.st_mode >> 12 for _, st in listed if isinstance(st, os.stat_result)]
    assert kinds == [0o04, 0o10, 0o12]  # a folder, a file, a link (not followed)
    # the folder swapped for a link, or for another folder, after the listing above saw it
    os.rename(tmp_path / "sub", tmp_path / "sub.away")
    os.symlink(tmp_path / "elsewhere", tmp_path / "sub")
    with pytest.raises(OSError) as link:
        platform.list_folder(str(tmp_path / "sub"), seen)
    assert link.value.errno == errno.ELOOP
    os.unlink(tmp_path / "sub")
    (tmp_path / "sub").mkdir()
    with pytest.raises(OSError) as other:
        platform.list_folder(str(tmp_path / "sub"), seen)
    assert other.value.errno == errno.ESTALE
    # without a look from above (a folder the user named), a link is followed
    assert [n for n, _ in platform.list_folder(str(tmp_path / "sub.away"))] == ["a", "b", "c"]
    assert len(platform.list_folder(str(tmp_path / "sub.away"), limit=3)) == 3
    with pytest.raises(OSError) as many:
        platform.list_folder(str(tmp_path / "sub.away"), limit=2)
    assert many.value.errno == errno.E2BIG and "holds more than 2 entries" in str(many.value)


# ------------------------------------------------------- every POSIX-only call goes through here

SRC = Path(__file__).resolve().parents[1] / "src" / "vmvault"

#: ``os`` names that Windows' Python lacks (os.fchmod until 3.13)
POSIX_ONLY = {
    "pread", "pwrite", "preadv", "pwritev", "fdatasync", "SEEK_DATA", "SEEK_HOLE", "O_NOFOLLOW", "O_DIRECTORY",
    "O_CLOEXEC", "O_NONBLOCK", "O_NOCTTY", "O_NOATIME", "getuid", "geteuid", "getgid", "getegid", "statvfs",
    "fchmod", "fchown", "lchown", "chown", "mkfifo", "setsid", "killpg", "posix_fadvise", "POSIX_FADV_DONTNEED",
    "sync",
}  # fmt: skip
POSIX_MODULES = {"fcntl", "pwd", "grp", "resource", "termios", "tty", "pty", "posix"}

#: modules that may use them, and why they are never reached on Windows
POSIX_ALLOWED = {
    "backends/local.py": "folder descriptors throughout; LocalBackend refuses to start on Windows",
    "engine/target.py": "folder descriptors throughout; RestoreTarget.open refuses on Windows",
    "automation/locks.py": "os.fchmod behind hasattr",
    "browse/isolated.py": "the Linux namespace sandbox of `vmvault files`",
    "browse/_worker.py": "the sandbox's worker process (Linux)",
    "hypervisors/qemu.py": "QEMU/KVM connector (Linux)",
    "hypervisors/qemu_restore.py": "QEMU/KVM connector (Linux)",
    "hypervisors/libvirt.py": "libvirt connector (Linux)",
    "hypervisors/libvirt_restore.py": "libvirt connector (Linux)",
    "engine/export.py": "NBD exports on unix sockets (Linux)",
    "engine/instant.py": "instant recovery: QEMU and NBD (Linux)",
    "engine/verify_boot.py": "boot verification under QEMU (Linux)",
    "engine/mountfs.py": "FUSE mount (Linux)",
    "hypervisors/qemu_boot.py": "QEMU boot of a restored VM (Linux)",
}


def _posix_uses(tree: ast.AST, *, import_time_only: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if import_time_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return  # a body that runs only when called
        is_os = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
        if is_os and isinstance(node, ast.Attribute) and node.attr in POSIX_ONLY:
            found.add(f"os.{node.attr}")
        if isinstance(node, ast.Import):
            found.update(f"import {a.name}" for a in node.names if a.name.split(".")[0] in POSIX_MODULES)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in POSIX_MODULES:
            found.add(f"from {node.module}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules() -> Iterator[tuple[str, ast.AST]]:
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel != "platform.py" and not rel.startswith("testing/"):
            yield rel, ast.parse(path.read_text(encoding="utf-8"))


def test_no_module_needs_a_posix_call_to_be_imported() -> None:
    """Importing vmvault on Windows must not fail on a missing name (os.O_NOFOLLOW, fcntl...)."""
    allowed_imports = {"browse/_worker.py"}  # run only as the Linux sandbox's own process
    bad = {
        rel: sorted(uses)
        for rel, tree in _modules()
        if rel not in allowed_imports and (uses := _posix_uses(tree, import_time_only=True))
    }
    assert bad == {}


def test_posix_only_calls_go_through_the_platform_module() -> None:
    bad = {
        rel: sorted(uses)
        for rel, tree in _modules()
        if rel not in POSIX_ALLOWED and (uses := _posix_uses(tree, import_time_only=False))
    }
    assert bad == {}


def test_the_scan_finds_what_it_looks_for() -> None:
    tree = ast.parse("import fcntl\nX = os.O_NOFOLLOW\ndef f():\n    os.pread(1, 2, 3)\n")
    assert _posix_uses(tree, import_time_only=True) == {"import fcntl", "os.O_NOFOLLOW"}
    assert _posix_uses(tree, import_time_only=False) == {"import fcntl", "os.O_NOFOLLOW", "os.pread"}


def test_the_folder_descriptor_modules_refuse_on_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "WINDOWS", True)
    with pytest.raises(TargetError, match="folder descriptors"):
        RestoreTarget.open(str(tmp_path))
    with pytest.raises(BackendError, match="use sftp:// or s3://"):
        LocalBackend(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(platform.WINDOWS, reason="numeric groups are POSIX")
def test_group_ids_by_name() -> None:
    import grp

    mine = grp.getgrgid(os.getgid()).gr_name
    assert platform.group_id(mine) == os.getgid()
    assert platform.group_id("no-such-group-vmvault") is None


@pytest.mark.skipif(platform.WINDOWS, reason="numeric ids are POSIX")
def test_ids_named_in_the_user_or_group_database() -> None:
    import grp
    import pwd

    assert platform.id_named(0)  # root
    named = {e.pw_uid for e in pwd.getpwall()} | {e.gr_gid for e in grp.getgrall()}
    only_group = next((g.gr_gid for g in grp.getgrall() if g.gr_gid not in {e.pw_uid for e in pwd.getpwall()}), None)
    if only_group is not None:
        assert platform.id_named(only_group)  # a group without a user of the same number
    free = next(n for n in range(2_139_999_999, 2_100_000_000, -1) if n not in named)
    assert not platform.id_named(free)


def test_a_descriptor_past_1023_is_waited_on() -> None:
    """``select`` refuses descriptors past 1023 (ValueError); a daemon or the web server holding
    many connections has them."""
    with descriptors_taken():
        r, w = os.pipe()
        try:
            assert r > 1023
            started = time.monotonic()
            assert not platform.wait_readable(r, 0.05)
            assert time.monotonic() - started >= 0.04
            os.write(w, b"x")
            assert platform.wait_readable(r, 1.0)
            assert os.read(r, 1) == b"x"
            os.close(w)
            w = -1
            assert platform.wait_readable(r, 1.0) and os.read(r, 1) == b""  # the other end closed
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)


def test_transient_ids_are_named_nowhere_and_held_by_no_process() -> None:
    ids = platform.transient_ids()
    assert ids is not None
    uid, gid = ids
    assert uid == gid and uid in platform.TRANSIENT_IDS
    assert not platform.id_named(uid)
    held = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                held.add(os.stat(f"/proc/{entry}").st_uid)
    assert uid not in held


def test_ids_named_in_the_user_database_or_held_by_a_process_are_never_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "TRANSIENT_IDS", range(0, 1))  # root: in /etc/passwd
    assert platform.transient_ids() is None
    if os.geteuid() != 0:
        return
    unnamed = 2_100_000_007
    assert not platform.id_named(unnamed)
    holder = subprocess.Popen(
        ["setpriv", "--reuid", str(unnamed), "--regid", str(unnamed), "--clear-groups", "sleep", "30"]
    )
    try:
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{holder.pid}").st_uid != unnamed:  # (setpriv changes ids, then runs sleep)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        monkeypatch.setattr(platform, "TRANSIENT_IDS", range(unnamed, unnamed + 1))
        assert platform.transient_ids() is None  # a running process holds it
    finally:
        holder.kill()
        holder.wait()
    assert platform.transient_ids() == (unnamed, unnamed)


def test_subordinate_id_ranges_are_left_to_user_namespaces(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A container runtime's mappings (/etc/subuid, /etc/subgid) cover most of the range: only
    the ids outside both are given."""
    start = 2_100_000_000
    monkeypatch.setattr(platform, "TRANSIENT_IDS", range(start, start + 64))
    (tmp_path / "subuid").write_text(f"lxd:{start}:40\nbroken line\n")
    (tmp_path / "subgid").write_text(f"lxd:{start + 48}:16\n")
    monkeypatch.setattr(platform, "_SUBORDINATE_IDS", (str(tmp_path / "subuid"), str(tmp_path / "subgid")))
    given = set()
    for _ in range(200):
        ids = platform.transient_ids()
        assert ids is not None
        given.add(ids[0])
    assert given <= set(range(start + 40, start + 48)) and len(given) > 1


def test_no_ids_where_the_user_namespace_maps_none_of_the_range(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A rootless container's namespace maps a few thousand ids (here 0-65535): the process
    could not take any id of the range, so none is given."""
    maps = tmp_path / "uid_map"
    maps.write_text("         0     100000      65536\n")
    monkeypatch.setattr(platform, "_ID_MAPS", (str(maps), str(maps)))
    assert platform.transient_ids() is None
    maps.write_text("         0     100000      65536\n2100000000 200000 40000000\n")
    assert platform.transient_ids() is not None

"""The local backend's own behaviour beyond the contract (tests/backends/contract.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pagecache import cached_pages, page_cache_droppable
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

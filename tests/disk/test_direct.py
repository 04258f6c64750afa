"""Writes past the page cache (disk/_direct.py): the bytes land where they were written, whatever
their alignment; a file system that refuses O_DIRECT is written through the cache; a failure is
raised with its offset and nothing is written after it; memory stays bounded."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmvault import platform
from vmvault.disk import _direct
from vmvault.disk._direct import BUFFERS, STAGE_BYTES, DirectWrites
from vmvault.disk.raw import create_raw
from vmvault.errors import TargetError, TargetFullError

ALIGN = platform.DIRECT_ALIGN
MIB = 1 << 20


def _new_file(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    return fd


def _direct_or_skip(fd: int, path: Path) -> DirectWrites:
    writes = DirectWrites.open(fd, str(path))
    if writes is None:
        os.close(fd)
        pytest.skip(f"the file system of {path.parent} does not take O_DIRECT (or it is hidden)")
    return writes


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[int, DirectWrites]]:
    """A new 96 MiB file and its writes past the page cache (skipped where there are none)."""
    path = tmp_path / "disk.raw"
    fd = _new_file(path, 96 * MIB)
    direct = _direct_or_skip(fd, path)
    try:
        yield fd, direct
    finally:
        os.close(fd)


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def _write_all(path: Path, size: int, writes: list[tuple[int, bytes]]) -> bytes:
    """Write ``writes`` through DirectWrites (or the cache, where it is refused); the file's bytes."""
    fd = _new_file(path, size)
    try:
        direct = DirectWrites.open(fd, str(path))
        for offset, data in writes:
            if direct is not None:
                direct.write(offset, data)
            else:
                os.pwrite(fd, data, offset)
        if direct is not None:
            direct.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(
        st.tuples(st.integers(0, 3 * STAGE_BYTES), st.integers(1, STAGE_BYTES + 3 * ALIGN + 7)),
        min_size=1,
        max_size=12,
    ),
    sequential=st.booleans(),
)
def test_every_byte_lands_where_it_was_written(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[tuple[int, int]], sequential: bool
) -> None:
    # writes that follow one another (as a restore's) or land anywhere, of any length and
    # alignment, even over each other: the file reads as the same writes applied in order
    size = 4 * STAGE_BYTES + 2 * ALIGN + 1
    rng = random.Random(len(pieces))
    writes: list[tuple[int, bytes]] = []
    pos = pieces[0][0]
    for offset, length in pieces:
        at = pos if sequential else offset
        length = min(length, size - at)
        if length <= 0:
            break
        writes.append((at, rng.randbytes(length)))
        pos = at + length
    expected = bytearray(size)
    for offset, data in writes:
        expected[offset : offset + len(data)] = data
    path = tmp_path_factory.mktemp("direct") / "disk.raw"
    assert _write_all(path, size, writes) == bytes(expected)


def test_whole_blocks_go_past_the_cache_and_the_flag_is_cleared_at_close(opened: tuple[int, DirectWrites]) -> None:
    fd, direct = opened
    assert _is_direct(fd)
    data = os.urandom(3 * STAGE_BYTES + 5)  # three whole buffers and a tail
    direct.write(ALIGN + 3, data)  # a head up to the next block, then whole blocks
    direct.drain()
    assert direct.direct
    assert _is_direct(fd), "the flag is back on after the head and the tail"
    direct.close()
    assert not _is_direct(fd)
    assert os.pread(fd, len(data), ALIGN + 3) == data


def test_memory_is_a_few_buffers_whatever_is_written(opened: tuple[int, DirectWrites]) -> None:
    _, direct = opened
    block = os.urandom(MIB)
    for i in range(96):
        direct.write(i * MIB, block)
        assert len(direct._buffers) <= BUFFERS
    direct.close()
    assert direct._buffers == []


def test_a_file_system_refusing_o_direct_is_written_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "set_direct", lambda fd, on: False)
    path = str(tmp_path / "disk.raw")
    writer = create_raw(path, 8 * MIB)
    assert not writer.past_cache
    data = os.urandom(3 * MIB + 17)
    writer.write(4096, data)
    writer.close()
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data


def test_a_refused_direct_write_turns_to_the_cache_and_loses_nothing(
    opened: tuple[int, DirectWrites], monkeypatch: pytest.MonkeyPatch
) -> None:
    # some file systems take the flag, then refuse the writes (EINVAL): written through the cache
    fd, direct = opened
    real = platform.pwrite

    def pwrite(fd_: int, data: Any, offset: int) -> int:
        if _is_direct(fd_):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd_, data, offset)

    monkeypatch.setattr(platform, "pwrite", pwrite)
    data = os.urandom(2 * STAGE_BYTES + 100)
    direct.write(0, data)
    direct.close()
    assert not direct.direct
    assert not _is_direct(fd)
    assert os.pread(fd, len(data), 0) == data


def test_a_full_file_system_is_raised_with_its_offset_and_nothing_is_written_after(
    opened: tuple[int, DirectWrites], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, direct = opened
    real = platform.pwrite
    offsets: list[int] = []

    def pwrite(fd_: int, data: Any, offset: int) -> int:
        offsets.append(offset)
        if offset >= 2 * STAGE_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd_, data, offset)

    monkeypatch.setattr(platform, "pwrite", pwrite)
    with pytest.raises(TargetFullError, match=f"at offset {2 * STAGE_BYTES:#x}"):
        for i in range(8):  # the failure surfaces at a later write, or at the drain
            direct.write(i * STAGE_BYTES, os.urandom(STAGE_BYTES))
        direct.drain()
    assert max(offsets) == 2 * STAGE_BYTES, "nothing is written after the failure"
    with pytest.raises(TargetFullError):
        direct.write(7 * STAGE_BYTES, b"x" * ALIGN)
    with pytest.raises(TargetFullError):
        direct.close()
    assert direct._buffers == [] and not direct._thread.is_alive()


def test_an_unforeseen_error_in_the_thread_is_a_target_error_not_a_hang(
    opened: tuple[int, DirectWrites], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, direct = opened

    def broken(self: DirectWrites, view: memoryview, offset: int) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(_direct.DirectWrites, "_write", broken)
    for i in range(6):  # more buffers than there are: each is given back all the same
        try:
            direct.write(i * STAGE_BYTES, bytes(STAGE_BYTES))
        except TargetError:
            break
    with pytest.raises(TargetError, match="boom"):
        direct.close()


def test_a_raw_writer_past_the_cache_writes_a_sparse_image(tmp_path: Path) -> None:
    path = str(tmp_path / "disk.raw")
    writer = create_raw(path, 64 * MIB)
    data = os.urandom(4 * MIB)
    writer.write(32 * MIB, data)
    writer.write(63 * MIB, data[:MIB])
    past = writer.past_cache
    writer.close()
    with open(path, "rb") as f:
        f.seek(32 * MIB)
        assert f.read(4 * MIB) == data
        f.seek(63 * MIB)
        assert f.read() == data[:MIB]
    st_ = os.stat(path)
    assert st_.st_size == 64 * MIB
    assert st_.st_blocks * 512 < 16 * MIB, "the holes stay holes"
    if not past:
        pytest.skip("written through the page cache here (no O_DIRECT): the data was checked")

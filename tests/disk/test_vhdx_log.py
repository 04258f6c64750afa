"""Log replay: hand-built logs are replayed in memory, never into a read-only file."""

from __future__ import annotations

import hashlib
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.disk.vhdx_samples import (
    MIB,
    bat_entry_offset,
    current_header,
    patch,
    qemu_raw,
    run,
    sector_with,
    write_log,
)
from vmvault.disk import _vhdx_layout as L
from vmvault.disk.vhdx import create_vhdx, open_vhdx, open_vhdx_for_write
from vmvault.errors import FormatError

SIZE = 8 * MIB
SECTOR = 4096


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_file(tmp_path: Path) -> Path:
    """8 MiB dynamic file, 1 MiB blocks, block 0 = 0x11, block 1 = 0x22."""
    path = tmp_path / "log.vhdx"
    with create_vhdx(str(path), SIZE, block_size=MIB) as w:
        w.write(0, b"\x11" * MIB)
        w.write(MIB, b"\x22" * MIB)
    return path


def entry(
    seq: int,
    tail: int,
    guid: uuid.UUID,
    end: int,
    *,
    writes: list[tuple[int, bytes]] | None = None,
    zeros: list[tuple[int, int]] | None = None,
    flushed: int | None = None,
    last: int | None = None,
) -> L.LogEntry:
    return L.LogEntry.build(
        tail=tail,
        sequence_number=seq,
        log_guid=guid,
        flushed_file_offset=end if flushed is None else flushed,
        last_file_offset=end if last is None else last,
        writes=writes or [],
        zeros=zeros or [],
    )


def dirty_file(tmp_path: Path, start: int) -> tuple[Path, bytes, uuid.UUID]:
    """A file whose log holds an active 3-entry sequence starting at log offset ``start``.

    entry 1: no descriptors (as Windows begins a session); entry 2: zero the first BAT sector
    (block 0 disappears); entry 3: BAT entries 3 -> new block at EOF (0x77, written beforehand,
    as data is) and 5 -> a block past EOF that the log grows the file to, plus one data sector
    inside that block. Returns (path, expected disk bytes, log guid).
    """
    path = base_file(tmp_path)
    end = path.stat().st_size
    patch(path, end, b"\x77" * MIB)  # payload goes straight to the file, never through the log
    bat0 = bat_entry_offset(path, 0)
    new_bat = bytearray(sector_with(path, bat0, 0, bytes(8)))  # block 0 gone, as entry 2 left it
    new_bat[24:32] = struct.pack("<Q", end | L.PayloadState.FULLY_PRESENT)  # block 3
    new_bat[40:48] = struct.pack("<Q", (end + MIB) | L.PayloadState.FULLY_PRESENT)  # block 5
    guid = uuid.uuid4()
    grown = end + 2 * MIB
    payload = bytes([0x99]) * SECTOR
    log_len = current_header(path)[1].log_length
    e1 = entry(1000, start, guid, end + MIB)
    p2 = (start + e1.entry_length) % log_len
    e2 = entry(1001, start, guid, end + MIB, zeros=[(bat0, SECTOR)])
    p3 = (p2 + e2.entry_length) % log_len
    e3 = entry(1002, start, guid, end + MIB, last=grown, writes=[(bat0, bytes(new_bat)), (end + MIB + SECTOR, payload)])
    # decoys: an older sequence of the same log, and a newer entry of another (stale) log
    old = entry(10, 0x80000, guid, end, writes=[(bat0, bytes(SECTOR))])
    stale = entry(5000, 0xC0000, uuid.uuid4(), end, writes=[(bat0, bytes(SECTOR))])
    write_log(path, [(0x80000, old), (0xC0000, stale), (start, e1), (p2, e2), (p3, e3)], header_log_guid=guid)
    expected = bytearray(SIZE)
    expected[MIB : 2 * MIB] = b"\x22" * MIB
    expected[3 * MIB : 4 * MIB] = b"\x77" * MIB
    expected[5 * MIB + SECTOR : 5 * MIB + 2 * SECTOR] = payload
    return path, bytes(expected), guid


@pytest.mark.parametrize("start", [0x20000, MIB - 2 * SECTOR, MIB - 3 * SECTOR], ids=["middle", "wraps", "split"])
def test_active_sequence_is_replayed_in_memory_only(tmp_path: Path, start: int) -> None:
    path, expected, _guid = dirty_file(tmp_path, start)
    before = sha(path)
    size_before = path.stat().st_size
    with open_vhdx(str(path)) as img:
        assert img.log_entries_replayed == 3
        assert img.info()["log"] == "replayed 3 entries (in memory)"
        assert img.read(0, SIZE) == expected
        kinds = [(e.offset // MIB, e.kind.value) for e in img.extents()]
        assert kinds == [(0, "zero"), (1, "data"), (2, "zero"), (3, "data"), (4, "zero"), (5, "data"), (6, "zero")]
    assert sha(path) == before and path.stat().st_size == size_before


@pytest.mark.integration
def test_qemu_replays_the_same_log(tmp_path: Path) -> None:
    require_tool("qemu-img")
    path, expected, _ = dirty_file(tmp_path, 0x20000)
    copy = tmp_path / "copy.vhdx"
    shutil.copy(path, copy)
    # qemu 7.2 applies the descriptors but does not grow the file to LastFileOffset (which
    # [MS] section 2.3.3 requires), and then refuses block 5 as past EOF: grow it beforehand.
    with open(copy, "r+b") as f:
        f.truncate(path.stat().st_size + MIB)  # = LastFileOffset of the head entry
    run("qemu-img", "check", "-r", "all", str(copy))  # qemu replays only on a writable open
    assert qemu_raw(copy, tmp_path / "q.raw") == expected


def test_writable_open_replays_into_the_file(tmp_path: Path) -> None:
    path, expected, _ = dirty_file(tmp_path, MIB - 3 * SECTOR)
    open_vhdx_for_write(str(path)).close()
    assert current_header(path)[1].log_guid == L.ZERO_GUID
    with open_vhdx(str(path)) as img:
        assert img.log_entries_replayed == 0 and img.read(0, SIZE) == expected
    assert path.stat().st_size % MIB == 0


def test_stale_entries_behind_a_zero_log_guid_are_ignored(tmp_path: Path) -> None:
    path = base_file(tmp_path)
    bat0 = bat_entry_offset(path, 0)
    guid = uuid.uuid4()
    end = path.stat().st_size
    e = entry(7, 0, guid, end, writes=[(bat0, bytes(SECTOR))])  # would unmap blocks 0 and 1
    write_log(path, [(0, e)], header_log_guid=None)
    before = sha(path)
    with open_vhdx(str(path)) as img:
        assert img.info()["log"] == "clean"
        assert img.read(0, 2 * MIB) == b"\x11" * MIB + b"\x22" * MIB
    assert sha(path) == before


def test_entries_of_another_log_do_not_count(tmp_path: Path) -> None:
    path = base_file(tmp_path)
    end = path.stat().st_size
    e = entry(7, 0, uuid.uuid4(), end, writes=[(bat_entry_offset(path, 0), bytes(SECTOR))])
    write_log(path, [(0, e)], header_log_guid=uuid.uuid4())
    with pytest.raises(FormatError, match="no valid entry sequence") as info:
        open_vhdx(str(path))
    assert info.value.structure == "log"


def test_file_shorter_than_flushed_offset_is_truncated(tmp_path: Path) -> None:
    path = base_file(tmp_path)
    end = path.stat().st_size
    guid = uuid.uuid4()
    e = entry(7, 0, guid, end, flushed=end + 4 * MIB, last=end + 4 * MIB)
    write_log(path, [(0, e)], header_log_guid=guid)
    with pytest.raises(FormatError, match="truncated") as info:
        open_vhdx(str(path))
    assert info.value.structure == "log"


def test_corrupt_head_falls_back_to_the_previous_sequence(tmp_path: Path) -> None:
    """A torn last entry (bad CRC) ends the sequence before it; the earlier entries still replay."""
    path, _expected, _ = dirty_file(tmp_path, 0x20000)
    log_off = current_header(path)[1].log_offset
    # entry 3 starts two sectors after entry 1; flip a byte of its data sector
    patch(path, log_off + 0x20000 + 2 * SECTOR + SECTOR + 100, b"\xff")
    with open_vhdx(str(path)) as img:
        assert img.log_entries_replayed == 2
        # entry 2 zeroed the whole first BAT sector: nothing is allocated any more
        assert img.read(0, SIZE) == bytes(SIZE)

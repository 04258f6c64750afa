"""Builders for VHDX test files: qemu-made images, byte patches, and hand-made logs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import uuid
from pathlib import Path

from vmvault.disk import _vhdx_layout as L

MIB = 1 << 20


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return proc.stdout


def qemu_vhdx(
    path: Path,
    size: int,
    *,
    block_size: int = 8 * MIB,
    fixed: bool = False,
    writes: tuple[tuple[int, int, int], ...] = (),
) -> Path:
    """A VHDX made by qemu-img, with ``writes`` of (pattern byte, offset, length) done by qemu-io."""
    opts = [f"block_size={block_size}", f"log_size={MIB}"]
    if fixed:
        opts += ["subformat=fixed", "block_state_zero=off"]
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", ",".join(opts), str(path), str(size))
    if writes:
        cmds: list[str] = []
        for pattern, off, length in writes:
            cmds += ["-c", f"write -P {pattern:#x} {off} {length}"]
        run("qemu-io", "-f", "vhdx", *cmds, str(path))
    return path


def qemu_raw(path: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def patch(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def current_header(path: Path) -> tuple[int, L.Header]:
    """(slot, header) of the current header."""
    best: tuple[int, L.Header] | None = None
    for slot, off in enumerate(L.HEADER_OFFSETS):
        try:
            h = L.Header.unpack(read_at(path, off, 4096))
        except ValueError:
            continue
        if best is None or h.sequence_number > best[1].sequence_number:
            best = (slot, h)
    assert best is not None
    return best


def set_header(path: Path, **changes: object) -> L.Header:
    """Rewrite both headers with ``changes`` (valid CRCs, increasing sequence numbers)."""
    _slot, h = current_header(path)
    for i, off in enumerate(L.HEADER_OFFSETS):
        new = dataclasses.replace(h, sequence_number=h.sequence_number + 1 + i, **changes)  # type: ignore[arg-type]
        patch(path, off, new.pack())
    return new


def region_table(path: Path) -> L.RegionTable:
    return L.RegionTable.unpack(read_at(path, L.REGION_TABLE_OFFSETS[0], L.REGION_TABLE_SIZE))


def region(path: Path, guid: uuid.UUID) -> L.RegionTableEntry:
    return next(e for e in region_table(path).entries if e.guid == guid)


def metadata_item_offset(path: Path, guid: uuid.UUID) -> int:
    meta = region(path, L.METADATA_REGION_GUID)
    table = L.MetadataTable.unpack(read_at(path, meta.file_offset, L.METADATA_TABLE_SIZE))
    entry = next(e for e in table.entries if e.item_id == guid)
    return meta.file_offset + entry.offset


def bat_entry_offset(path: Path, index: int) -> int:
    return region(path, L.BAT_REGION_GUID).file_offset + 8 * index


def write_log(path: Path, entries: list[tuple[int, L.LogEntry]], *, header_log_guid: uuid.UUID | None) -> None:
    """Place (log offset, entry) pairs in the log and point the headers at ``header_log_guid``."""
    _slot, h = current_header(path)
    for pos, entry in entries:
        raw = entry.pack()
        first = raw[: h.log_length - pos]  # the log is circular: an entry may wrap to its start
        patch(path, h.log_offset + pos, first)
        if len(first) < len(raw):
            patch(path, h.log_offset, raw[len(first) :])
    set_header(path, log_guid=header_log_guid or L.ZERO_GUID)


def sector_with(path: Path, sector_offset: int, inner: int, data: bytes) -> bytes:
    """The 4 KiB sector at ``sector_offset`` with ``data`` placed at ``inner``."""
    buf = bytearray(read_at(path, sector_offset, 4096).ljust(4096, b"\0"))
    buf[inner : inner + len(data)] = data
    return bytes(buf)

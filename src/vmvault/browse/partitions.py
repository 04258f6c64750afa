"""Partition tables of a guest disk: MBR (with extended partitions) and GPT.

A guest disk is untrusted data: every offset, size and count read from it is bounded before it
is used (entries past the end of the disk, loops in an EBR chain, a GPT entry array of a
gigabyte), checksums are checked (GPT header and entry array CRC32, the backup header used
when the primary is damaged), and what is odd but harmless (overlapping partitions, a
partition cut short by the end of the disk) is kept as a note rather than an error.

Numbering follows Linux, so ``PART`` means what ``/dev/sda<N>`` would: GPT entries by their
index in the entry array (1-based), MBR primaries 1–4 by slot, logical partitions from 5 in
chain order.
"""

from __future__ import annotations

import itertools
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from vmvault.errors import GuestError

from . import _partition_layout as L

__all__ = ["Partition", "PartitionTable", "ReadAt", "read_partition_table"]

#: ``read(offset, length)`` of a disk: fewer bytes only at its end
ReadAt = Callable[[int, int], bytes]

#: overlapping pairs named one by one; more are counted
_MAX_OVERLAP_NOTES = 16


@dataclass(frozen=True)
class Partition:
    number: int
    #: byte offset and size on the disk (clipped to the disk's end; see the table's notes)
    offset: int
    size: int
    #: "0x83" for MBR, the type GUID for GPT
    type: str
    type_name: str
    #: GPT partition name ("" for MBR)
    name: str = ""
    bootable: bool = False


@dataclass(frozen=True)
class PartitionTable:
    #: "mbr", "gpt", or "none" (one filesystem, or nothing, from sector 0)
    scheme: str
    sector_size: int
    partitions: tuple[Partition, ...]
    notes: tuple[str, ...] = ()
    disk_guid: str = ""

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        have = ", ".join(str(p.number) for p in self.partitions) or "none"
        raise GuestError(f"no partition {number} in the {self.scheme.upper()} table (partitions: {have})")


def _read_exact(read: ReadAt, offset: int, length: int, what: str) -> bytes:
    data = read(offset, length)
    if len(data) != length:
        raise GuestError(f"the disk ends inside the {what} at offset {offset:#x}")
    return data


def read_partition_table(read: ReadAt, size: int) -> PartitionTable:
    """The partition table of a disk of ``size`` bytes read through ``read``."""
    if size < 512:
        return PartitionTable("none", 512, ())
    sector0 = _read_exact(read, 0, 512, "first sector")
    protective = _is_mbr(sector0) and any(
        L.MBR_ENTRY.unpack_from(sector0, L.MBR_ENTRIES + 16 * i)[2] == L.PROTECTIVE_TYPE for i in range(4)
    )
    gpt = _read_gpt(read, size, protective)
    if gpt is not None:
        return gpt
    if protective:
        raise GuestError("the protective MBR announces a GPT, but neither GPT header is readable")
    if not _is_mbr(sector0):
        return PartitionTable("none", 512, ())
    return _read_mbr(read, size, sector0)


# ---------------------------------------------------------------------------------------- MBR


def _is_mbr(sector: bytes) -> bool:
    if sector[510:512] != L.MBR_BOOT_SIGNATURE:
        return False
    if any(sector[off : off + len(mark)] == mark for off, mark in L.FS_BOOT_SECTOR_MARKS):
        return False  # a filesystem's boot sector: the disk has no partition table
    # a real MBR's status bytes are 0x00 or 0x80; boot code in a volume boot record rarely is
    return all(sector[L.MBR_ENTRIES + 16 * i] in (0x00, 0x80) for i in range(4))


def _mbr_partition(number: int, status: int, ptype: int, first: int, count: int) -> Partition:
    return Partition(
        number=number,
        offset=first * 512,
        size=count * 512,
        type=f"{ptype:#04x}",
        type_name=L.MBR_TYPES.get(ptype, "unknown"),
        bootable=status == 0x80,
    )


def _read_mbr(read: ReadAt, size: int, sector0: bytes) -> PartitionTable:
    notes: list[str] = []
    found: list[Partition] = []
    extended: tuple[int, int] | None = None
    for i in range(4):
        status, _, ptype, _, first, count = L.MBR_ENTRY.unpack_from(sector0, L.MBR_ENTRIES + 16 * i)
        if ptype == 0 or count == 0:
            continue
        if first == 0:
            notes.append(f"partition {i + 1} starts at sector 0 (over the MBR); ignored")
            continue
        if ptype in L.EXTENDED_TYPES:
            if extended is not None:
                notes.append(f"partition {i + 1} is a second extended partition; ignored")
                continue
            extended = (first, count)
            continue
        found.append(_mbr_partition(i + 1, status, ptype, first, count))
    if extended is not None:
        found.extend(_read_logical(read, size, extended, notes))
    return _finish("mbr", 512, found, size, notes)


def _read_logical(read: ReadAt, size: int, extended: tuple[int, int], notes: list[str]) -> list[Partition]:
    """Follow the EBR chain of the extended partition ``(first sector, sectors)``."""
    ext_first, ext_count = extended
    out: list[Partition] = []
    seen: set[int] = set()
    ebr = ext_first
    while len(out) < L.MAX_LOGICAL:
        if ebr in seen:
            notes.append(f"the chain of logical partitions loops at sector {ebr}; stopped there")
            break
        seen.add(ebr)
        if not ext_first <= ebr < ext_first + ext_count or (ebr + 1) * 512 > size:
            notes.append(f"an extended boot record at sector {ebr} is outside the extended partition; stopped")
            break
        sector = read(ebr * 512, 512)
        if len(sector) != 512 or sector[510:512] != L.MBR_BOOT_SIGNATURE:
            notes.append(f"the extended boot record at sector {ebr} has no signature; stopped")
            break
        status, _, ptype, _, rel, count = L.MBR_ENTRY.unpack_from(sector, L.MBR_ENTRIES)
        if ptype != 0 and count != 0 and rel != 0:
            # a logical partition is relative to its own EBR
            out.append(_mbr_partition(5 + len(out), status, ptype, ebr + rel, count))
        _, _, ntype, _, next_rel, next_count = L.MBR_ENTRY.unpack_from(sector, L.MBR_ENTRIES + 16)
        if ntype not in L.EXTENDED_TYPES or next_rel == 0 or next_count == 0:
            break
        ebr = ext_first + next_rel  # the next EBR is relative to the extended partition
    else:
        notes.append(f"more than {L.MAX_LOGICAL} logical partitions; the rest are not shown")
    return out


# ---------------------------------------------------------------------------------------- GPT


def _read_gpt(read: ReadAt, size: int, protective: bool) -> PartitionTable | None:
    problems: list[str] = []
    for sector_size in (512, 4096):
        if size < 3 * sector_size:
            continue
        header = read(sector_size, sector_size)
        if header[:8] != L.GPT_SIGNATURE:
            continue
        last_lba = size // sector_size - 1
        try:
            return _gpt_from(read, size, sector_size, 1, header, notes=[])
        except GuestError as exc:
            problems.append(f"primary GPT header: {exc}")
        backup = read(last_lba * sector_size, sector_size)
        try:
            return _gpt_from(
                read, size, sector_size, last_lba, backup, notes=[f"{problems[-1]}; the backup GPT header was used"]
            )
        except GuestError as exc:
            problems.append(f"backup GPT header: {exc}")
        raise GuestError("damaged GPT: " + "; ".join(problems))
    if protective:
        # the primary header may be gone entirely: look for the backup at the last sector
        for sector_size in (512, 4096):
            last_lba = size // sector_size - 1
            if last_lba < 2:
                continue
            backup = read(last_lba * sector_size, sector_size)
            if backup[:8] == L.GPT_SIGNATURE:
                return _gpt_from(
                    read, size, sector_size, last_lba, backup, notes=["no primary GPT header; the backup was used"]
                )
    return None


def _gpt_from(read: ReadAt, size: int, ss: int, my_lba: int, sector: bytes, *, notes: list[str]) -> PartitionTable:
    if len(sector) < L.GPT_HEADER.size:
        raise GuestError("cut short by the end of the disk")
    (
        signature,
        revision,
        header_size,
        header_crc,
        _,
        stored_lba,
        _,
        first_usable,
        last_usable,
        disk_guid,
        entries_lba,
        n_entries,
        entry_size,
        entries_crc,
    ) = L.GPT_HEADER.unpack_from(sector)
    if signature != L.GPT_SIGNATURE:
        raise GuestError("no signature")
    if not L.GPT_HEADER.size <= header_size <= ss:
        raise GuestError(f"header size {header_size} is out of range")
    check = bytearray(sector[:header_size])
    check[16:20] = bytes(4)
    if zlib.crc32(check) != header_crc:
        raise GuestError("header CRC32 mismatch")
    if revision >> 16 != 1:
        raise GuestError(f"unknown revision {revision:#x}")
    if stored_lba != my_lba:
        raise GuestError(f"says it is at LBA {stored_lba}, found at LBA {my_lba}")
    last_lba = size // ss - 1
    if entry_size < 128 or entry_size % 128 or entry_size > 4096:
        raise GuestError(f"entry size {entry_size} is not a multiple of 128 up to 4096")
    array_bytes = n_entries * entry_size
    if array_bytes > L.MAX_GPT_ENTRY_BYTES:
        raise GuestError(f"{n_entries} entries of {entry_size} bytes are more than vmvault reads")
    if not 1 <= entries_lba <= last_lba or entries_lba * ss + array_bytes > size:
        raise GuestError(f"the entry array at LBA {entries_lba} is outside the disk")
    array = read(entries_lba * ss, array_bytes)
    if len(array) != array_bytes or zlib.crc32(array) != entries_crc:
        raise GuestError("entry array CRC32 mismatch")
    if first_usable > last_usable or last_usable > last_lba:
        notes.append(f"usable LBAs {first_usable}-{last_usable} do not fit the disk's {last_lba + 1} sectors")
    found: list[Partition] = []
    for i in range(n_entries):
        type_le, _unique_le, first, last, attrs, raw_name = L.GPT_ENTRY.unpack_from(array, i * entry_size)
        if type_le == bytes(16):
            continue
        if last < first:
            notes.append(f"partition {i + 1} ends (LBA {last}) before it starts (LBA {first}); ignored")
            continue
        if first < first_usable or last > last_usable:
            notes.append(f"partition {i + 1} lies outside the usable LBAs")
        ptype = uuid.UUID(bytes_le=type_le)
        name = raw_name.decode("utf-16-le", "replace").split("\0", 1)[0]
        found.append(
            Partition(
                number=i + 1,
                offset=first * ss,
                size=(last - first + 1) * ss,
                type=str(ptype),
                type_name=L.GPT_TYPES.get(ptype, "unknown"),
                name=name,
                bootable=bool(attrs & 0x4),  # legacy BIOS bootable
            )
        )
    return _finish("gpt", ss, found, size, notes, disk_guid=str(uuid.UUID(bytes_le=disk_guid)))


# ---------------------------------------------------------------------------------------- both


def _finish(
    scheme: str, ss: int, found: list[Partition], size: int, notes: list[str], *, disk_guid: str = ""
) -> PartitionTable:
    """Clip partitions to the disk, drop those wholly past it, and note overlaps."""
    kept: list[Partition] = []
    for p in found:
        if p.offset >= size:
            notes.append(f"partition {p.number} starts past the end of the disk; ignored")
            continue
        if p.offset + p.size > size:
            notes.append(f"partition {p.number} runs {p.offset + p.size - size} bytes past the end of the disk")
            p = Partition(p.number, p.offset, size - p.offset, p.type, p.type_name, p.name, p.bootable)
        kept.append(p)
    ordered = sorted(kept, key=lambda p: p.offset)
    overlaps = [(a, b) for a, b in itertools.pairwise(ordered) if a.offset + a.size > b.offset]
    notes += [f"partitions {a.number} and {b.number} overlap" for a, b in overlaps[:_MAX_OVERLAP_NOTES]]
    if len(overlaps) > _MAX_OVERLAP_NOTES:
        notes.append(f"and {len(overlaps) - _MAX_OVERLAP_NOTES} more overlaps")
    return PartitionTable(scheme, ss, tuple(sorted(kept, key=lambda p: p.number)), tuple(notes), disk_guid=disk_guid)

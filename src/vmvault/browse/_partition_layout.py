"""On-disk layout of MBR and GPT partition tables.

References: UEFI Specification 2.10, section 5 "GUID Partition Table (GPT) Disk Layout"
(5.2.1 legacy MBR, 5.2.3 protective MBR, 5.3.2 GPT header, 5.3.3 partition entry array);
the IBM PC MBR and extended boot record (EBR) chain as documented for DOS/Windows and Linux
(``partitions/msdos.c``: logical partitions are numbered from 5). Everything is little-endian.
GUIDs are stored mixed-endian (``uuid.UUID(bytes_le=...)``).
"""

from __future__ import annotations

import struct
import uuid

__all__ = [
    "EXTENDED_TYPES",
    "FS_BOOT_SECTOR_MARKS",
    "GPT_ENTRY",
    "GPT_HEADER",
    "GPT_REVISION",
    "GPT_SIGNATURE",
    "GPT_TYPES",
    "MAX_GPT_ENTRY_BYTES",
    "MAX_LOGICAL",
    "MBR_BOOT_SIGNATURE",
    "MBR_ENTRIES",
    "MBR_ENTRY",
    "MBR_TYPES",
    "PROTECTIVE_TYPE",
]

#: bytes 510-511 of an MBR or EBR
MBR_BOOT_SIGNATURE = b"\x55\xaa"
#: offset of the four primary entries
MBR_ENTRIES = 446
#: status, CHS of first sector, type, CHS of last sector, first LBA, number of sectors
MBR_ENTRY = struct.Struct("<B3sB3sII")
assert MBR_ENTRY.size == 16
#: MBR types of an extended partition (holding a chain of EBRs)
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
#: the protective MBR's one entry in front of a GPT
PROTECTIVE_TYPE = 0xEE
#: logical partitions followed in an EBR chain, at most (Linux stops at a few hundred too)
MAX_LOGICAL = 256

#: signature, revision, header size, header CRC32, reserved, my LBA, alternate LBA,
#: first usable LBA, last usable LBA, disk GUID, entry array LBA, entry count, entry size,
#: entry array CRC32 (UEFI 2.10 table 5.5)
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
assert GPT_HEADER.size == 92
GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000
#: type GUID, unique GUID, first LBA, last LBA (inclusive), attributes, name (36 UTF-16LE units)
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
assert GPT_ENTRY.size == 128
#: the entry array read at most (the spec's minimum is 16 KiB; 128 entries of 128 bytes)
MAX_GPT_ENTRY_BYTES = 1 << 20

#: a volume boot record (FAT, NTFS, exFAT) also ends in 55 AA: these marks say "filesystem
#: at sector 0, no partition table" — (offset, bytes)
FS_BOOT_SECTOR_MARKS = (
    (3, b"NTFS    "),
    (3, b"EXFAT   "),
    (54, b"FAT12   "),
    (54, b"FAT16   "),
    (54, b"FAT     "),
    (82, b"FAT32   "),
    (3, b"-FVE-FS-"),  # BitLocker
)

MBR_TYPES = {
    0x01: "FAT12",
    0x04: "FAT16 (<32 MiB)",
    0x05: "extended",
    0x06: "FAT16",
    0x07: "NTFS/exFAT",
    0x0B: "FAT32",
    0x0C: "FAT32 (LBA)",
    0x0E: "FAT16 (LBA)",
    0x0F: "extended (LBA)",
    0x11: "hidden FAT12",
    0x12: "vendor recovery",
    0x14: "hidden FAT16",
    0x16: "hidden FAT16",
    0x17: "hidden NTFS/exFAT",
    0x1B: "hidden FAT32",
    0x1C: "hidden FAT32 (LBA)",
    0x1E: "hidden FAT16 (LBA)",
    0x27: "Windows recovery",
    0x42: "Windows dynamic disk (LDM)",
    0x82: "Linux swap",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xA5: "FreeBSD",
    0xA6: "OpenBSD",
    0xAF: "HFS/HFS+",
    0xEE: "GPT protective",
    0xEF: "EFI System",
    0xFD: "Linux RAID",
}


def _g(text: str) -> uuid.UUID:
    return uuid.UUID(text)


#: well-known GPT partition type GUIDs
GPT_TYPES = {
    _g("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"): "EFI System",
    _g("21686148-6449-6e6f-744e-656564454649"): "BIOS boot",
    _g("e3c9e316-0b5c-4db8-817d-f92df00215ae"): "Microsoft reserved",
    _g("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"): "Microsoft basic data",
    _g("de94bba4-06d1-4d40-a16a-bfd50179d6ac"): "Windows recovery",
    _g("5808c8aa-7e8f-42e0-85d2-e1e90434cfb3"): "Windows LDM metadata",
    _g("af9b60a0-1431-4f62-bc68-3311714a69ad"): "Windows LDM data",
    _g("e75caf8f-f680-4cee-afa3-b001e56efc2d"): "Windows Storage Spaces",
    _g("0fc63daf-8483-4772-8e79-3d69d8477de4"): "Linux filesystem",
    _g("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"): "Linux root (x86-64)",
    _g("933ac7e1-2eb4-4f13-b844-0e14e2aef915"): "Linux home",
    _g("bc13c2ff-59e6-4262-a352-b275fd6f7172"): "Linux extended boot",
    _g("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"): "Linux swap",
    _g("e6d6d379-f507-44c2-a23c-238f2a3df928"): "Linux LVM",
    _g("ca7d7ccb-63ed-4c53-861c-1742536059cc"): "Linux LUKS",
    _g("a19d880f-05fc-4d3b-a006-743f0f84911e"): "Linux RAID",
    _g("6a898cc3-1dd2-11b2-99a6-080020736631"): "ZFS",
    _g("48465300-0000-11aa-aa11-00306543ecac"): "Apple HFS+",
    _g("7c3457ef-0000-11aa-aa11-00306543ecac"): "Apple APFS",
}

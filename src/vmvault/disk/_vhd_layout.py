"""On-disk layout of legacy VHD files (Virtual PC / Hyper-V generation 1).

Reference: Microsoft "Virtual Hard Disk Image Format Specification" v1.0 (2006), sections
"Hard Disk Footer Format", "Dynamic Disk Header Format", "Block Allocation Table and Data
Blocks" and appendix "CHS Calculation". Everything is big-endian; UUIDs are stored in RFC
(big-endian) byte order; timestamps count seconds from 2000-01-01 00:00:00 UTC.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field

__all__ = [
    "BAT_UNUSED",
    "DYNAMIC_HEADER_SIZE",
    "FOOTER_COOKIE",
    "FOOTER_SIZE",
    "HEADER_COOKIE",
    "NO_DATA_OFFSET",
    "SECTOR",
    "DiskType",
    "DynamicHeader",
    "Footer",
    "ParentLocator",
    "PlatformCode",
    "chs_geometry",
    "vhd_checksum",
]

SECTOR = 512
NIL_UUID = uuid.UUID(int=0)
FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
#: footer DataOffset of a fixed disk (no dynamic header)
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
#: BAT entry of a block that is not allocated in this file
BAT_UNUSED = 0xFFFFFFFF
#: FormatVersion / HeaderVersion 1.0
VERSION_1_0 = 0x00010000
#: the spec's largest disk: 65535 cylinders x 16 heads x 255 sectors ("CHS Calculation")
MAX_CHS_SECTORS = 65535 * 16 * 255
#: footer Features: bit 1 is reserved and must always be set
FEATURE_RESERVED = 0x2


class DiskType(enum.IntEnum):
    NONE = 0
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


class PlatformCode(bytes, enum.Enum):
    """Parent locator platform codes ("Dynamic Disk Header Format", Parent Locator Entries)."""

    NONE = b"\0\0\0\0"
    WI2R = b"Wi2r"  # deprecated relative path
    WI2K = b"Wi2k"  # deprecated absolute path
    W2RU = b"W2ru"  # relative Windows path, UTF-16LE
    W2KU = b"W2ku"  # absolute Windows path, UTF-16LE
    MAC = b"Mac "  # Mac OS alias blob
    MACX = b"MacX"  # file:// URL, UTF-8


def vhd_checksum(data: bytes, checksum_offset: int) -> int:
    """Ones' complement of the byte sum, with the 4-byte checksum field counted as zero (spec "Checksum")."""
    total = sum(data) - sum(data[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors/track for ``total_sectors`` (spec appendix "CHS Calculation").

    The result's product may be smaller than ``total_sectors``; the disk size is CurrentSize,
    the geometry only describes it for BIOS-era guests.
    """
    total = min(total_sectors, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
assert _FOOTER.size == FOOTER_SIZE


@dataclass(frozen=True, slots=True)
class Footer:
    """The 512-byte "Hard Disk Footer" (at EOF; dynamic/differencing disks keep a copy at 0)."""

    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    unique_id: uuid.UUID
    saved_state: int
    checksum: int = 0
    cookie: bytes = FOOTER_COOKIE

    CHECKSUM_OFFSET = 64

    @classmethod
    def unpack(cls, raw: bytes) -> Footer:
        (
            cookie,
            features,
            fmt_version,
            data_offset,
            timestamp,
            creator_app,
            creator_version,
            host_os,
            original,
            current,
            cyl,
            heads,
            spt,
            disk_type,
            checksum,
            uid,
            saved,
            _reserved,
        ) = _FOOTER.unpack(raw[:FOOTER_SIZE])
        return cls(
            features=features,
            format_version=fmt_version,
            data_offset=data_offset,
            timestamp=timestamp,
            creator_app=creator_app,
            creator_version=creator_version,
            creator_host_os=host_os,
            original_size=original,
            current_size=current,
            cylinders=cyl,
            heads=heads,
            sectors_per_track=spt,
            disk_type=disk_type,
            unique_id=uuid.UUID(bytes=uid),
            saved_state=saved,
            checksum=checksum,
            cookie=cookie,
        )

    def pack(self) -> bytes:
        """Serialise with a freshly computed checksum."""
        raw = self._pack(0)
        return self._pack(vhd_checksum(raw, self.CHECKSUM_OFFSET))

    def _pack(self, checksum: int) -> bytes:
        return _FOOTER.pack(
            self.cookie,
            self.features,
            self.format_version,
            self.data_offset,
            self.timestamp,
            self.creator_app,
            self.creator_version,
            self.creator_host_os,
            self.original_size,
            self.current_size,
            self.cylinders,
            self.heads,
            self.sectors_per_track,
            self.disk_type,
            checksum,
            self.unique_id.bytes,
            self.saved_state,
            b"\0" * 427,
        )


_LOCATOR = struct.Struct(">4sIIIQ")
assert _LOCATOR.size == 24


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """One of the eight 24-byte parent locator entries of the dynamic header."""

    platform_code: bytes
    data_space: int  # spec: 512-byte sectors; Windows writes a byte count here
    data_length: int  # bytes
    data_offset: int  # absolute file offset

    @classmethod
    def unpack(cls, raw: bytes) -> ParentLocator:
        code, space, length, _reserved, offset = _LOCATOR.unpack(raw[: _LOCATOR.size])
        return cls(code, space, length, offset)

    def pack(self) -> bytes:
        return _LOCATOR.pack(self.platform_code, self.data_space, self.data_length, 0, self.data_offset)


_EMPTY_LOCATOR = ParentLocator(PlatformCode.NONE.value, 0, 0, 0)

_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
assert _HEADER.size == DYNAMIC_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    """The 1024-byte "Dynamic Disk Header" (``cxsparse``) of dynamic and differencing disks."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: uuid.UUID = NIL_UUID
    parent_timestamp: int = 0
    parent_unicode_name: str = ""
    locators: tuple[ParentLocator, ...] = field(default_factory=lambda: (_EMPTY_LOCATOR,) * 8)
    next_offset: int = NO_DATA_OFFSET
    header_version: int = VERSION_1_0
    checksum: int = 0
    cookie: bytes = HEADER_COOKIE

    CHECKSUM_OFFSET = 36

    @classmethod
    def unpack(cls, raw: bytes) -> DynamicHeader:
        (
            cookie,
            next_offset,
            table_offset,
            version,
            max_entries,
            block_size,
            checksum,
            parent_uid,
            parent_ts,
            _reserved,
            name_raw,
            loc_raw,
            _reserved2,
        ) = _HEADER.unpack(raw[:DYNAMIC_HEADER_SIZE])
        # ParentUnicodeName is UTF-16BE, NUL padded (spec: "Parent Unicode Name")
        name = name_raw.decode("utf-16-be", errors="replace").split("\0", 1)[0]
        locators = tuple(ParentLocator.unpack(loc_raw[i * 24 : i * 24 + 24]) for i in range(8))
        return cls(
            table_offset=table_offset,
            max_table_entries=max_entries,
            block_size=block_size,
            parent_unique_id=uuid.UUID(bytes=parent_uid),
            parent_timestamp=parent_ts,
            parent_unicode_name=name,
            locators=locators,
            next_offset=next_offset,
            header_version=version,
            checksum=checksum,
            cookie=cookie,
        )

    def pack(self) -> bytes:
        raw = self._pack(0)
        return self._pack(vhd_checksum(raw, self.CHECKSUM_OFFSET))

    def _pack(self, checksum: int) -> bytes:
        name = self.parent_unicode_name.encode("utf-16-be")
        if len(name) > 512:
            raise ValueError("parent name longer than 256 UTF-16 units")
        locs = list(self.locators) + [_EMPTY_LOCATOR] * (8 - len(self.locators))
        return _HEADER.pack(
            self.cookie,
            self.next_offset,
            self.table_offset,
            self.header_version,
            self.max_table_entries,
            self.block_size,
            checksum,
            self.parent_unique_id.bytes,
            self.parent_timestamp,
            0,
            name.ljust(512, b"\0"),
            b"".join(loc.pack() for loc in locs[:8]),
            b"\0" * 256,
        )

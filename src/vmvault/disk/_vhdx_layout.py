"""VHDX on-disk structures: signatures, GUIDs, enums, and pack/unpack for each structure.

Reference: [MS-VHDX] v8.0, "Virtual Hard Disk v2 (VHDX) File Format" (section numbers below
are that document's). Every integer is little-endian; GUIDs use the mixed-endian Microsoft
form (``uuid.UUID(bytes_le=...)``); checksums are CRC-32C over the whole structure with the
checksum field zeroed (section 2.2.2, 2.2.3, 2.3.1.1).

``unpack`` functions raise ``ValueError`` with a short reason; ``vhdx.py`` turns that into a
``FormatError`` naming the file, the structure and its offset, which only it knows.
"""

from __future__ import annotations

import enum
import math
import struct
import uuid
from dataclasses import dataclass

__all__ = [
    "BAT_REGION_GUID",
    "DATA_SECTOR",
    "DESCRIPTOR",
    "FILE_IDENTIFIER",
    "FILE_PARAMETERS_GUID",
    "HEADER",
    "HEADER_OFFSETS",
    "HEADER_SECTION_SIZE",
    "KNOWN_METADATA",
    "KNOWN_REGIONS",
    "LOGICAL_SECTOR_SIZE_GUID",
    "LOG_ENTRY_HEADER",
    "LOG_SECTOR",
    "METADATA_REGION_GUID",
    "METADATA_TABLE_SIZE",
    "MIB",
    "PARENT_LOCATOR_GUID",
    "PHYSICAL_SECTOR_SIZE_GUID",
    "REGION_TABLE_OFFSETS",
    "REGION_TABLE_SIZE",
    "VHDX_LOCATOR_TYPE",
    "VIRTUAL_DISK_ID_GUID",
    "VIRTUAL_DISK_SIZE_GUID",
    "BatGeometry",
    "DataDescriptor",
    "DataSector",
    "FileIdentifier",
    "FileParameters",
    "FileParametersFlags",
    "Header",
    "LogEntry",
    "LogEntryHeader",
    "MetadataFlags",
    "MetadataTable",
    "MetadataTableEntry",
    "ParentLocator",
    "PayloadState",
    "RegionTable",
    "RegionTableEntry",
    "SectorBitmapState",
    "ZeroDescriptor",
    "crc32c",
    "pack_bat_entry",
    "pack_guid",
    "pack_u32",
    "pack_u64",
    "unpack_bat_entry",
    "unpack_guid",
    "unpack_u32",
    "unpack_u64",
]

KIB = 1024
MIB = 1024 * 1024

#: section 2.1: the first MiB holds the identifier, two headers and two region tables
HEADER_SECTION_SIZE = MIB
FILE_IDENTIFIER_OFFSET = 0
HEADER_OFFSETS = (0x10000, 0x20000)
REGION_TABLE_OFFSETS = (0x30000, 0x40000)
HEADER_SIZE = 4 * KIB
REGION_TABLE_SIZE = 64 * KIB
METADATA_TABLE_SIZE = 64 * KIB
LOG_SECTOR = 4 * KIB
#: section 2.2.4: an SB block is always 1 MiB (2**23 bits, one per logical sector of a chunk)
SECTOR_BITMAP_BLOCK_SIZE = MIB
MAX_TABLE_ENTRIES = 2047
MAX_VIRTUAL_SIZE = 64 * 1024**4
MIN_BLOCK_SIZE = MIB
MAX_BLOCK_SIZE = 256 * MIB
SECTOR_SIZES = (512, 4096)

SIG_FILE = b"vhdxfile"
SIG_HEADER = b"head"
SIG_REGION = b"regi"
SIG_METADATA = b"metadata"
SIG_LOG_ENTRY = b"loge"
SIG_ZERO = b"zero"
SIG_DESC = b"desc"
SIG_DATA = b"data"

# Section 2.2.3.1 / 2.6.1: known regions and system metadata items.
BAT_REGION_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_REGION_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS_GUID = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE_GUID = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
VIRTUAL_DISK_ID_GUID = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_SIZE_GUID = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE_GUID = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR_GUID = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
VHDX_LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")

KNOWN_REGIONS = {BAT_REGION_GUID: "BAT", METADATA_REGION_GUID: "metadata"}
KNOWN_METADATA = {
    FILE_PARAMETERS_GUID: "file parameters",
    VIRTUAL_DISK_SIZE_GUID: "virtual disk size",
    VIRTUAL_DISK_ID_GUID: "virtual disk id",
    LOGICAL_SECTOR_SIZE_GUID: "logical sector size",
    PHYSICAL_SECTOR_SIZE_GUID: "physical sector size",
    PARENT_LOCATOR_GUID: "parent locator",
}

ZERO_GUID = uuid.UUID(int=0)


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), the checksum of every VHDX structure (section 2.2.2)."""
    # imported when a VHDX is first read or written, not with the format registry: the
    # package imports importlib.metadata, 8-20 ms of every command's start
    import crc32c as _crc32c

    return int(_crc32c.crc32c(data))


def _crc_with_field_zeroed(buf: bytes | bytearray, field: int) -> int:
    return crc32c(bytes(buf[:field]) + b"\0\0\0\0" + bytes(buf[field + 4 :]))


def pack_guid(value: uuid.UUID) -> bytes:
    return value.bytes_le


def unpack_guid(raw: bytes) -> uuid.UUID:
    if len(raw) != 16:
        raise ValueError(f"a GUID is 16 bytes, got {len(raw)}")
    return uuid.UUID(bytes_le=bytes(raw))


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
assert _U32.size == 4 and _U64.size == 8


def pack_u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(raw: bytes) -> int:
    if len(raw) != 4:
        raise ValueError(f"expected a 4-byte value, got {len(raw)} bytes")
    return int(_U32.unpack(raw)[0])


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(raw: bytes) -> int:
    if len(raw) != 8:
        raise ValueError(f"expected an 8-byte value, got {len(raw)} bytes")
    return int(_U64.unpack(raw)[0])


# --------------------------------------------------------------------------------------------
# Section 2.2.1: file type identifier


FILE_IDENTIFIER = struct.Struct("<8s512s")
assert FILE_IDENTIFIER.size == 520


@dataclass(frozen=True, slots=True)
class FileIdentifier:
    creator: str

    def pack(self) -> bytes:
        raw = self.creator.encode("utf-16-le")
        if len(raw) > 512:
            raise ValueError("creator string longer than 256 UTF-16 units")
        return FILE_IDENTIFIER.pack(SIG_FILE, raw)

    @classmethod
    def unpack(cls, buf: bytes) -> FileIdentifier:
        if len(buf) < FILE_IDENTIFIER.size:
            raise ValueError("file identifier is truncated")
        sig, raw = FILE_IDENTIFIER.unpack_from(buf)
        if sig != SIG_FILE:
            raise ValueError(f"signature {sig!r} is not 'vhdxfile'")
        # The creator is for diagnostics only (section 2.2.1): decode leniently, stop at NUL.
        text = raw.decode("utf-16-le", errors="replace")
        return cls(text.split("\0", 1)[0])


# --------------------------------------------------------------------------------------------
# Section 2.2.2: header

HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
assert HEADER.size == 80


@dataclass(frozen=True, slots=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        HEADER.pack_into(
            buf,
            0,
            SIG_HEADER,
            0,
            self.sequence_number,
            pack_guid(self.file_write_guid),
            pack_guid(self.data_write_guid),
            pack_guid(self.log_guid),
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        )
        _U32.pack_into(buf, 4, crc32c(buf))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        """Parse a 4 KiB header; the checksum covers all 4 KiB (section 2.2.2)."""
        if len(buf) < HEADER_SIZE:
            raise ValueError("header is truncated")
        buf = bytes(buf[:HEADER_SIZE])
        sig, checksum, seq, fwg, dwg, lg, log_version, version, log_length, log_offset = HEADER.unpack_from(buf)
        if sig != SIG_HEADER:
            raise ValueError(f"signature {sig!r} is not 'head'")
        if _crc_with_field_zeroed(buf, 4) != checksum:
            raise ValueError("checksum mismatch")
        return cls(
            seq,
            unpack_guid(fwg),
            unpack_guid(dwg),
            unpack_guid(lg),
            log_version,
            version,
            log_length,
            log_offset,
        )


# --------------------------------------------------------------------------------------------
# Section 2.2.3: region table

REGION_TABLE_HEADER = struct.Struct("<4sIII")
REGION_TABLE_ENTRY = struct.Struct("<16sQII")
assert REGION_TABLE_HEADER.size == 16 and REGION_TABLE_ENTRY.size == 32


@dataclass(frozen=True, slots=True)
class RegionTableEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool

    def pack(self) -> bytes:
        return REGION_TABLE_ENTRY.pack(pack_guid(self.guid), self.file_offset, self.length, int(self.required))

    @classmethod
    def unpack(cls, buf: bytes) -> RegionTableEntry:
        guid, off, length, required = REGION_TABLE_ENTRY.unpack_from(buf)
        # Section 2.2.3.2: bit 0 is Required; the other bits are reserved.
        return cls(unpack_guid(guid), off, length, bool(required & 1))


@dataclass(frozen=True, slots=True)
class RegionTable:
    entries: tuple[RegionTableEntry, ...]

    def pack(self) -> bytes:
        if len(self.entries) > MAX_TABLE_ENTRIES:
            raise ValueError("too many region table entries")
        buf = bytearray(REGION_TABLE_SIZE)
        REGION_TABLE_HEADER.pack_into(buf, 0, SIG_REGION, 0, len(self.entries), 0)
        for i, entry in enumerate(self.entries):
            pos = REGION_TABLE_HEADER.size + i * REGION_TABLE_ENTRY.size
            buf[pos : pos + REGION_TABLE_ENTRY.size] = entry.pack()
        _U32.pack_into(buf, 4, crc32c(buf))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes) -> RegionTable:
        """Parse a 64 KiB region table; the checksum covers all 64 KiB."""
        if len(buf) < REGION_TABLE_SIZE:
            raise ValueError("region table is truncated")
        buf = bytes(buf[:REGION_TABLE_SIZE])
        sig, checksum, count, _reserved = REGION_TABLE_HEADER.unpack_from(buf)
        if sig != SIG_REGION:
            raise ValueError(f"signature {sig!r} is not 'regi'")
        if _crc_with_field_zeroed(buf, 4) != checksum:
            raise ValueError("checksum mismatch")
        if count > MAX_TABLE_ENTRIES:
            raise ValueError(f"entry count {count} exceeds {MAX_TABLE_ENTRIES}")
        entries = tuple(RegionTableEntry.unpack(buf[16 + i * 32 : 16 + (i + 1) * 32]) for i in range(count))
        return cls(entries)


# --------------------------------------------------------------------------------------------
# Section 2.6.1: metadata table


class MetadataFlags(enum.IntFlag):
    IS_USER = 1
    IS_VIRTUAL_DISK = 2
    IS_REQUIRED = 4


METADATA_TABLE_HEADER = struct.Struct("<8sHH20s")
METADATA_TABLE_ENTRY = struct.Struct("<16sIII4s")
assert METADATA_TABLE_HEADER.size == 32 and METADATA_TABLE_ENTRY.size == 32


@dataclass(frozen=True, slots=True)
class MetadataTableEntry:
    item_id: uuid.UUID
    offset: int
    length: int
    flags: MetadataFlags

    @property
    def is_user(self) -> bool:
        return bool(self.flags & MetadataFlags.IS_USER)

    @property
    def is_required(self) -> bool:
        return bool(self.flags & MetadataFlags.IS_REQUIRED)

    def pack(self) -> bytes:
        return METADATA_TABLE_ENTRY.pack(pack_guid(self.item_id), self.offset, self.length, int(self.flags), bytes(4))

    @classmethod
    def unpack(cls, buf: bytes) -> MetadataTableEntry:
        guid, offset, length, flags, _reserved = METADATA_TABLE_ENTRY.unpack_from(buf)
        # Bits 3-31 are reserved (section 2.6.1.2); keep only the three defined ones.
        return cls(unpack_guid(guid), offset, length, MetadataFlags(flags & 7))


@dataclass(frozen=True, slots=True)
class MetadataTable:
    entries: tuple[MetadataTableEntry, ...]

    def pack(self) -> bytes:
        if len(self.entries) > MAX_TABLE_ENTRIES:
            raise ValueError("too many metadata table entries")
        buf = bytearray(METADATA_TABLE_SIZE)
        METADATA_TABLE_HEADER.pack_into(buf, 0, SIG_METADATA, 0, len(self.entries), bytes(20))
        for i, entry in enumerate(self.entries):
            pos = METADATA_TABLE_HEADER.size + i * METADATA_TABLE_ENTRY.size
            buf[pos : pos + METADATA_TABLE_ENTRY.size] = entry.pack()
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes) -> MetadataTable:
        """Parse the 64 KiB metadata table (it has no checksum, section 2.6.1.1)."""
        if len(buf) < METADATA_TABLE_SIZE:
            raise ValueError("metadata table is truncated")
        sig, _reserved, count, _reserved2 = METADATA_TABLE_HEADER.unpack_from(buf)
        if sig != SIG_METADATA:
            raise ValueError(f"signature {sig!r} is not 'metadata'")
        if count > MAX_TABLE_ENTRIES:
            raise ValueError(f"entry count {count} exceeds {MAX_TABLE_ENTRIES}")
        return cls(tuple(MetadataTableEntry.unpack(bytes(buf[32 + i * 32 : 64 + i * 32])) for i in range(count)))


class FileParametersFlags(enum.IntFlag):
    LEAVE_BLOCKS_ALLOCATED = 1
    HAS_PARENT = 2


FILE_PARAMETERS = struct.Struct("<II")
assert FILE_PARAMETERS.size == 8


@dataclass(frozen=True, slots=True)
class FileParameters:
    """Section 2.6.2.1."""

    block_size: int
    flags: int

    @property
    def leave_blocks_allocated(self) -> bool:
        return bool(self.flags & FileParametersFlags.LEAVE_BLOCKS_ALLOCATED)

    @property
    def has_parent(self) -> bool:
        return bool(self.flags & FileParametersFlags.HAS_PARENT)

    def pack(self) -> bytes:
        return FILE_PARAMETERS.pack(self.block_size, self.flags)

    @classmethod
    def unpack(cls, buf: bytes) -> FileParameters:
        if len(buf) != FILE_PARAMETERS.size:
            raise ValueError(f"file parameters item is {len(buf)} bytes, not 8")
        block_size, flags = FILE_PARAMETERS.unpack(buf)
        return cls(block_size, flags)


# Section 2.6.2.6: parent locator

PARENT_LOCATOR_HEADER = struct.Struct("<16sHH")
PARENT_LOCATOR_ENTRY = struct.Struct("<IIHH")
assert PARENT_LOCATOR_HEADER.size == 20 and PARENT_LOCATOR_ENTRY.size == 12


@dataclass(frozen=True, slots=True)
class ParentLocator:
    locator_type: uuid.UUID
    #: key/value pairs in file order (order carries no meaning, but a round trip keeps it)
    entries: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict[str, str]:
        return dict(self.entries)

    def pack(self) -> bytes:
        """Windows' layout: the entry table, then key, value, key, value... (observed)."""
        count = len(self.entries)
        if count > 0xFFFF:
            raise ValueError("too many parent locator entries")
        table = bytearray(PARENT_LOCATOR_HEADER.pack(pack_guid(self.locator_type), 0, count))
        blob = bytearray()
        pos = PARENT_LOCATOR_HEADER.size + count * PARENT_LOCATOR_ENTRY.size
        for key, value in self.entries:
            k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
            if not k or not v or len(k) > 0xFFFF or len(v) > 0xFFFF:
                raise ValueError("parent locator keys and values must be 1..32767 UTF-16 units")
            table += PARENT_LOCATOR_ENTRY.pack(pos, pos + len(k), len(k), len(v))
            blob += k + v
            pos += len(k) + len(v)
        return bytes(table + blob)

    @classmethod
    def unpack(cls, buf: bytes) -> ParentLocator:
        if len(buf) < PARENT_LOCATOR_HEADER.size:
            raise ValueError("parent locator is truncated")
        guid, _reserved, count = PARENT_LOCATOR_HEADER.unpack_from(buf)
        if PARENT_LOCATOR_HEADER.size + count * PARENT_LOCATOR_ENTRY.size > len(buf):
            raise ValueError(f"{count} key/value entries do not fit in {len(buf)} bytes")
        entries: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i in range(count):
            ko, vo, kl, vl = PARENT_LOCATOR_ENTRY.unpack_from(buf, PARENT_LOCATOR_HEADER.size + i * 12)
            if ko == 0 or vo == 0 or kl == 0 or vl == 0:
                raise ValueError(f"key/value entry {i} has a zero offset or length")
            if ko + kl > len(buf) or vo + vl > len(buf):
                raise ValueError(f"key/value entry {i} points past the end of the locator")
            try:
                key = bytes(buf[ko : ko + kl]).decode("utf-16-le")
                value = bytes(buf[vo : vo + vl]).decode("utf-16-le")
            except UnicodeDecodeError as exc:
                raise ValueError(f"key/value entry {i} is not valid UTF-16") from exc
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
            entries.append((key, value))
        return cls(unpack_guid(guid[:16]), tuple(entries))


# --------------------------------------------------------------------------------------------
# Section 2.5: BAT


class PayloadState(enum.IntEnum):
    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    #: 5 was UNMAPPED in the 0.95 draft; qemu still reads it as zeros, and so do we
    UNMAPPED_V095 = 5
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


class SectorBitmapState(enum.IntEnum):
    NOT_PRESENT = 0
    PRESENT = 6


BAT_STATE_MASK = 0x7
BAT_OFFSET_MASK = 0xFFFFFFFFFFF00000


def pack_bat_entry(state: int, file_offset: int) -> int:
    """A BAT entry: bits 0-2 state, bits 20-63 the offset in MiB (section 2.5.1)."""
    if file_offset % MIB or not 0 <= file_offset < 1 << 64:
        raise ValueError(f"block offset {file_offset:#x} is not a MiB multiple")
    if not 0 <= state <= 7:
        raise ValueError(f"state {state} is out of range")
    return file_offset | state


def unpack_bat_entry(entry: int) -> tuple[int, int]:
    """(state, file offset) of a BAT entry; reserved bits 3-19 are ignored."""
    return entry & BAT_STATE_MASK, entry & BAT_OFFSET_MASK


@dataclass(frozen=True, slots=True)
class BatGeometry:
    """How payload and sector-bitmap entries interleave in the BAT (section 2.5)."""

    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool

    @property
    def chunk_ratio(self) -> int:
        return (2**23 * self.logical_sector_size) // self.block_size

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // self.logical_sector_size

    @property
    def payload_blocks(self) -> int:
        return math.ceil(self.virtual_size / self.block_size)

    @property
    def sector_bitmap_blocks(self) -> int:
        return math.ceil(self.payload_blocks / self.chunk_ratio)

    @property
    def total_entries(self) -> int:
        if self.has_parent:
            return self.sector_bitmap_blocks * (self.chunk_ratio + 1)
        return self.payload_blocks + (self.payload_blocks - 1) // self.chunk_ratio

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio


# --------------------------------------------------------------------------------------------
# Section 2.3: log

LOG_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
DESCRIPTOR = struct.Struct("<4sIQQQ")
DATA_SECTOR = struct.Struct("<4sI4084sI")
assert LOG_ENTRY_HEADER.size == 64 and DESCRIPTOR.size == 32 and DATA_SECTOR.size == LOG_SECTOR

#: the first descriptor sector loses two descriptor slots to the 64-byte entry header
DESCRIPTORS_PER_SECTOR = LOG_SECTOR // DESCRIPTOR.size


def descriptor_sectors(count: int) -> int:
    return (count + 2 + DESCRIPTORS_PER_SECTOR - 1) // DESCRIPTORS_PER_SECTOR


@dataclass(frozen=True, slots=True)
class LogEntryHeader:
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int

    def pack(self) -> bytes:
        return LOG_ENTRY_HEADER.pack(
            SIG_LOG_ENTRY,
            self.checksum,
            self.entry_length,
            self.tail,
            self.sequence_number,
            self.descriptor_count,
            0,
            pack_guid(self.log_guid),
            self.flushed_file_offset,
            self.last_file_offset,
        )

    @classmethod
    def unpack(cls, buf: bytes) -> LogEntryHeader:
        if len(buf) < LOG_ENTRY_HEADER.size:
            raise ValueError("log entry header is truncated")
        sig, checksum, length, tail, seq, count, _res, guid, flushed, last = LOG_ENTRY_HEADER.unpack_from(buf)
        if sig != SIG_LOG_ENTRY:
            raise ValueError(f"signature {sig!r} is not 'loge'")
        return cls(checksum, length, tail, seq, count, unpack_guid(guid), flushed, last)


@dataclass(frozen=True, slots=True)
class ZeroDescriptor:
    zero_length: int
    file_offset: int
    sequence_number: int

    def pack(self) -> bytes:
        return DESCRIPTOR.pack(SIG_ZERO, 0, self.zero_length, self.file_offset, self.sequence_number)


@dataclass(frozen=True, slots=True)
class DataDescriptor:
    trailing_bytes: bytes  # bytes 4092-4095 of the target sector
    leading_bytes: bytes  # bytes 0-7
    file_offset: int
    sequence_number: int

    def pack(self) -> bytes:
        return DESCRIPTOR.pack(
            SIG_DESC,
            _U32.unpack(self.trailing_bytes)[0],
            _U64.unpack(self.leading_bytes)[0],
            self.file_offset,
            self.sequence_number,
        )


def unpack_descriptor(buf: bytes) -> ZeroDescriptor | DataDescriptor:
    sig, trailing, a, offset, seq = DESCRIPTOR.unpack_from(buf)
    if sig == SIG_ZERO:
        return ZeroDescriptor(a, offset, seq)
    if sig == SIG_DESC:
        return DataDescriptor(_U32.pack(trailing), _U64.pack(a), offset, seq)
    raise ValueError(f"descriptor signature {sig!r} is neither 'zero' nor 'desc'")


@dataclass(frozen=True, slots=True)
class DataSector:
    sequence_number: int
    data: bytes  # bytes 8-4091 of the target sector

    def pack(self) -> bytes:
        return DATA_SECTOR.pack(SIG_DATA, self.sequence_number >> 32, self.data, self.sequence_number & 0xFFFFFFFF)

    @classmethod
    def unpack(cls, buf: bytes) -> DataSector:
        sig, high, data, low = DATA_SECTOR.unpack_from(buf)
        if sig != SIG_DATA:
            raise ValueError(f"data sector signature {sig!r} is not 'data'")
        return cls((high << 32) | low, data)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One log entry: descriptor sectors then data sectors (section 2.3.1)."""

    tail: int
    sequence_number: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int
    descriptors: tuple[ZeroDescriptor | DataDescriptor, ...]
    data_sectors: tuple[DataSector, ...]

    @property
    def entry_length(self) -> int:
        return (descriptor_sectors(len(self.descriptors)) + len(self.data_sectors)) * LOG_SECTOR

    @classmethod
    def build(
        cls,
        *,
        tail: int,
        sequence_number: int,
        log_guid: uuid.UUID,
        flushed_file_offset: int,
        last_file_offset: int,
        writes: list[tuple[int, bytes]],
        zeros: list[tuple[int, int]] = [],  # noqa: B006 - never mutated
    ) -> LogEntry:
        """An entry that writes whole 4 KiB ``writes`` (offset, data) and zeroes ``zeros`` (offset, length)."""
        descs: list[ZeroDescriptor | DataDescriptor] = []
        sectors: list[DataSector] = []
        for off, length in zeros:
            descs.append(ZeroDescriptor(length, off, sequence_number))
        for off, data in writes:
            if len(data) != LOG_SECTOR:
                raise ValueError("a logged write is exactly one 4 KiB sector")
            descs.append(DataDescriptor(data[4092:], data[:8], off, sequence_number))
            sectors.append(DataSector(sequence_number, data[8:4092]))
        return cls(
            tail,
            sequence_number,
            log_guid,
            flushed_file_offset,
            last_file_offset,
            tuple(descs),
            tuple(sectors),
        )

    def target_writes(self) -> list[tuple[int, bytes]]:
        """What replay writes, in order: (file offset, bytes); zero descriptors as zero runs."""
        out: list[tuple[int, bytes]] = []
        sectors = iter(self.data_sectors)
        for d in self.descriptors:
            if isinstance(d, DataDescriptor):
                out.append((d.file_offset, d.leading_bytes + next(sectors).data + d.trailing_bytes))
        return out

    def pack(self) -> bytes:
        count = len(self.descriptors)
        nsect = descriptor_sectors(count)
        buf = bytearray(self.entry_length)
        header = LogEntryHeader(
            0,
            self.entry_length,
            self.tail,
            self.sequence_number,
            count,
            self.log_guid,
            self.flushed_file_offset,
            self.last_file_offset,
        )
        buf[:64] = header.pack()
        for i, d in enumerate(self.descriptors):
            pos = 64 + i * DESCRIPTOR.size
            buf[pos : pos + DESCRIPTOR.size] = d.pack()
        for i, s in enumerate(self.data_sectors):
            pos = (nsect + i) * LOG_SECTOR
            buf[pos : pos + LOG_SECTOR] = s.pack()
        _U32.pack_into(buf, 4, crc32c(buf))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes) -> LogEntry:
        """Parse and fully validate one entry of exactly ``EntryLength`` bytes (section 2.3.1)."""
        header = LogEntryHeader.unpack(buf)
        length = header.entry_length
        if length == 0 or length % LOG_SECTOR or length != len(buf):
            raise ValueError(f"entry length {length} is invalid")
        if header.tail % LOG_SECTOR:
            raise ValueError(f"tail {header.tail:#x} is not 4 KiB aligned")
        if header.sequence_number == 0:
            raise ValueError("sequence number is zero")
        count = header.descriptor_count
        nsect = descriptor_sectors(count)
        if nsect * LOG_SECTOR > length:
            raise ValueError(f"{count} descriptors do not fit in the entry")
        descs: list[ZeroDescriptor | DataDescriptor] = []
        for i in range(count):
            d = unpack_descriptor(buf[64 + i * 32 : 96 + i * 32])
            if d.sequence_number != header.sequence_number:
                raise ValueError(f"descriptor {i} has a different sequence number")
            if d.file_offset % LOG_SECTOR:
                raise ValueError(f"descriptor {i} file offset is not 4 KiB aligned")
            if isinstance(d, ZeroDescriptor) and d.zero_length % LOG_SECTOR:
                raise ValueError(f"zero descriptor {i} length is not a 4 KiB multiple")
            descs.append(d)
        ndata = sum(1 for d in descs if isinstance(d, DataDescriptor))
        if (nsect + ndata) * LOG_SECTOR != length:
            raise ValueError("entry length does not match its descriptors")
        sectors = []
        for i in range(ndata):
            s = DataSector.unpack(buf[(nsect + i) * LOG_SECTOR : (nsect + i + 1) * LOG_SECTOR])
            if s.sequence_number != header.sequence_number:
                raise ValueError(f"data sector {i} has a different sequence number")
            sectors.append(s)
        if _crc_with_field_zeroed(buf, 4) != header.checksum:
            raise ValueError("checksum mismatch")
        return cls(
            header.tail,
            header.sequence_number,
            header.log_guid,
            header.flushed_file_offset,
            header.last_file_offset,
            tuple(descs),
            tuple(sectors),
        )

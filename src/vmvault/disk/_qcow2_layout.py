"""On-disk layout of qcow2 images, versions 2 and 3.

Reference: qemu ``docs/interop/qcow2.txt`` ("Header", "Header extensions", "Host cluster
management", "Cluster mapping", "Compressed Clusters Descriptor", "Extended L2 Entries",
"Bitmaps"). All numbers are big-endian.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "HEADER_V2_SIZE",
    "HEADER_V3_SIZE",
    "L1_OFFSET_MASK",
    "L2_COMPRESSED",
    "L2_COPIED",
    "L2_OFFSET_MASK",
    "L2_ZERO",
    "MAGIC",
    "AutoclearFeature",
    "BitmapDirectoryEntry",
    "BitmapsExtension",
    "CompatibleFeature",
    "CompressionType",
    "ExtensionType",
    "Header",
    "IncompatibleFeature",
    "pack_extension",
]

MAGIC = b"QFI\xfb"
HEADER_V2_SIZE = 72
#: our writer's v3 header: the 104 fixed bytes, the compression type byte, padding to 8
HEADER_V3_SIZE = 112
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: spec "Header": backing_file_size must not exceed 1023
MAX_BACKING_NAME = 1023

#: L1/L2 entry bit 63: refcount is exactly one (writes may go in place)
L2_COPIED = 1 << 63
#: standard L2 entry bit 62: compressed cluster
L2_COMPRESSED = 1 << 62
#: standard L2 entry bit 0 (v3): the cluster reads as zeros
L2_ZERO = 1
#: L1 entry bits 9-55: offset of the L2 table
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: standard L2 entry bits 9-55: host cluster offset
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: refcount table entry bits 9-63: offset of the refcount block
REFCOUNT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


class IncompatibleFeature(enum.IntFlag):
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    EXTERNAL_DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


class CompatibleFeature(enum.IntFlag):
    LAZY_REFCOUNTS = 1 << 0


class AutoclearFeature(enum.IntFlag):
    BITMAPS = 1 << 0
    RAW_EXTERNAL_DATA = 1 << 1


class CompressionType(enum.IntEnum):
    DEFLATE = 0
    ZSTD = 1


class ExtensionType(enum.IntEnum):
    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_NAME_TABLE = 0x6803F857
    BITMAPS = 0x23852875
    FULL_DISK_ENCRYPTION = 0x0537BE77
    EXTERNAL_DATA_FILE = 0x44415441


_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
assert _V2.size == HEADER_V2_SIZE
_V3_EXTRA = struct.Struct(">QQQII")
assert _V3_EXTRA.size == 104 - HEADER_V2_SIZE


@dataclass(frozen=True, slots=True)
class Header:
    """The qcow2 header (spec "Header"); v2 files carry only the first 72 bytes."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_SIZE
    compression_type: int = 0

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Parse; ``raw`` holds at least the first 72 bytes (and ``header_length`` bytes for v3)."""
        (
            _magic,
            version,
            bf_off,
            bf_size,
            cbits,
            size,
            crypt,
            l1_size,
            l1_off,
            rt_off,
            rt_clusters,
            nb_snap,
            snap_off,
        ) = _V2.unpack_from(raw)
        if version < 3 or len(raw) < 104:
            return cls(
                version, bf_off, bf_size, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off
            )
        incompat, compat, autoclear, rorder, hlen = _V3_EXTRA.unpack_from(raw, HEADER_V2_SIZE)
        ctype = raw[104] if hlen > 104 and len(raw) > 104 else 0
        return cls(
            version,
            bf_off,
            bf_size,
            cbits,
            size,
            crypt,
            l1_size,
            l1_off,
            rt_off,
            rt_clusters,
            nb_snap,
            snap_off,
            incompat,
            compat,
            autoclear,
            rorder,
            hlen,
            ctype,
        )

    def pack(self) -> bytes:
        """Serialise: 72 bytes for v2, ``header_length`` bytes for v3."""
        raw = _V2.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version < 3:
            return raw
        raw += _V3_EXTRA.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        if self.header_length > 104:
            raw += bytes([self.compression_type])
        return raw.ljust(self.header_length, b"\0")


_EXT = struct.Struct(">II")
assert _EXT.size == 8


def pack_extension(ext_type: int, data: bytes) -> bytes:
    """One header extension: type, length, data padded to a multiple of 8 (spec "Header extensions")."""
    return _EXT.pack(ext_type, len(data)) + data + b"\0" * (-len(data) % 8)


def unpack_extension_header(raw: bytes) -> tuple[int, int]:
    ext_type, length = _EXT.unpack_from(raw)
    return ext_type, length


_BITMAPS_EXT = struct.Struct(">IIQQ")
assert _BITMAPS_EXT.size == 24


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    """Header extension 0x23852875: where the bitmap directory is (spec "Bitmaps extension")."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    @classmethod
    def unpack(cls, raw: bytes) -> BitmapsExtension:
        nb, _reserved, dsize, doff = _BITMAPS_EXT.unpack_from(raw)
        return cls(nb, dsize, doff)

    def pack(self) -> bytes:
        return _BITMAPS_EXT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


_BITMAP_ENTRY = struct.Struct(">QIIBBHI")
assert _BITMAP_ENTRY.size == 24


@dataclass(frozen=True, slots=True)
class BitmapDirectoryEntry:
    """One bitmap directory entry (spec "Bitmap directory"); ``entry_size`` is its padded length."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data: bytes = b""

    HEADER_SIZE = _BITMAP_ENTRY.size

    @classmethod
    def unpack(cls, raw: bytes, offset: int = 0) -> tuple[BitmapDirectoryEntry, int]:
        """The entry at ``raw[offset:]`` and the offset of the next one."""
        toff, tsize, flags, btype, gbits, name_size, extra_size = _BITMAP_ENTRY.unpack_from(raw, offset)
        pos = offset + _BITMAP_ENTRY.size
        end = pos + extra_size + name_size
        if end > len(raw):
            raise ValueError("bitmap directory entry runs past the directory")
        extra = raw[pos : pos + extra_size]
        name = raw[pos + extra_size : end].decode("utf-8", errors="replace")
        nxt = end + (-(end - offset) % 8)
        return cls(toff, tsize, flags, btype, gbits, name, bytes(extra)), nxt

    def pack(self) -> bytes:
        name = self.name.encode("utf-8")
        raw = _BITMAP_ENTRY.pack(
            self.table_offset,
            self.table_size,
            self.flags,
            self.type,
            self.granularity_bits,
            len(name),
            len(self.extra_data),
        )
        raw += self.extra_data + name
        return raw + b"\0" * (-len(raw) % 8)


_FEATURE_NAME = struct.Struct(">BB46s")
assert _FEATURE_NAME.size == 48


def unpack_feature_names(raw: bytes) -> list[tuple[int, int, str]]:
    """Feature name table entries (spec "Feature name table"): (type, bit, name)."""
    out = []
    for pos in range(0, len(raw) - len(raw) % 48, 48):
        ftype, bit, name = _FEATURE_NAME.unpack_from(raw, pos)
        out.append((ftype, bit, name.rstrip(b"\0").decode("utf-8", errors="replace")))
    return out


def pack_feature_names(entries: list[tuple[int, int, str]]) -> bytes:
    return b"".join(_FEATURE_NAME.pack(t, b, n.encode("utf-8")) for t, b, n in entries)

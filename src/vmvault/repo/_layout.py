"""Byte layouts of repository objects. All integers little-endian.

See docs/design/repository-format.md for the grammar; this module is its executable form.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "BLOB_ENTRY",
    "ENVELOPE_HEADER",
    "FORMAT_VERSION",
    "ID_SIZE",
    "INDEX_HEADER",
    "INDEX_PACK",
    "PACK_MAGIC",
    "PACK_TRAILER",
    "BlobType",
    "EnvelopeFlags",
]

#: repository format version written by this vmvault; newer ones are refused
FORMAT_VERSION = 1

ID_SIZE = 32

#: envelope around every stored payload: version u8, flags u8, reserved u16, nonce[12]
#: followed by the AES-256-GCM ciphertext with its 16-byte tag (or, unencrypted, the
#: payload followed by the first 16 bytes of SHA-256(aad || payload)).
ENVELOPE_HEADER = struct.Struct("<BBH12s")
assert ENVELOPE_HEADER.size == 16
ENVELOPE_VERSION = 1
TAG_SIZE = 16


class EnvelopeFlags(enum.IntFlag):
    ZSTD = 1  # payload is zstd-compressed before encryption


class BlobType(enum.IntEnum):
    DATA = 1  # a chunk of disk or file content
    INDEX = 2  # a block of a disk's chunk index (ID_SIZE bytes per chunk)


#: pack trailer: header envelope length u32, magic
PACK_MAGIC = b"VVPK"
PACK_TRAILER = struct.Struct("<I4s")
assert PACK_TRAILER.size == 8

#: one entry of a pack header (and of an index file): type u8, id, offset u32, length u32, raw length u32
BLOB_ENTRY = struct.Struct("<B32sIII")
assert BLOB_ENTRY.size == 45

#: index file payload header: magic, version u16, reserved u16, superseded count u32, pack count u32
INDEX_MAGIC = b"VVIX"
INDEX_HEADER = struct.Struct("<4sHHII")
assert INDEX_HEADER.size == 16

#: one pack in an index file: pack id, blob count u32
INDEX_PACK = struct.Struct("<32sI")
assert INDEX_PACK.size == 36

#: special chunk-index entries
ZERO_ID = bytes(ID_SIZE)  # the chunk reads as zeros; nothing stored
PARENT_ID = b"\xff" * ID_SIZE  # (disk layers) this layer stores nothing here; the parent layer does

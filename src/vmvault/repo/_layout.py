"""Byte layouts of repository objects. All integers little-endian.

See docs/design/repository-format.md for the grammar; this module is its executable form.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "BLOB_ENTRY",
    "CHUNK_ID_VERSION",
    "ENVELOPE_HEADER",
    "FORMAT_VERSION",
    "ID_SIZE",
    "INDEX_HEADER",
    "INDEX_PACK",
    "INDEX_PACK_V2",
    "INDEX_V2_VERSION",
    "PACK_MAGIC",
    "PACK_TRAILER",
    "BlobType",
    "EnvelopeFlags",
]

#: the newest repository format version this vmvault reads and writes; newer ones are refused
#: (repository-format.md, section 11)
FORMAT_VERSION = 3
#: from version 2 on, index files record each pack's length (section 12.2); `vmvault migrate`
#: brings a version-1 repository here, and a new repository with HMAC-SHA-256 ids is written in it
INDEX_V2_VERSION = 2
#: from version 3 on, the config names the chunk id function (section 4, ``chunk_id``): a new
#: repository with BLAKE3 ids is written in it, so that a vmvault that knows only HMAC-SHA-256
#: ids refuses it instead of computing other ids for the same data
CHUNK_ID_VERSION = 3

ID_SIZE = 32

#: envelope around every stored payload: version u8, flags u8, reserved u16, nonce[12]
#: followed by the AES-256-GCM ciphertext with its 16-byte tag (or, unencrypted, the body
#: (the payload, maybe zstd-compressed) followed by the first 16 bytes of
#: SHA-256(aad || header || body); repository-format.md section 3).
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
#: ... in a version-2 index file: pack id, blob count u32, pack length u32 (0: not recorded)
INDEX_PACK_V2 = struct.Struct("<32sII")
assert INDEX_PACK_V2.size == 40

#: special chunk-index entries
ZERO_ID = bytes(ID_SIZE)  # the chunk reads as zeros; nothing stored
PARENT_ID = b"\xff" * ID_SIZE  # (disk layers) this layer stores nothing here; the parent layer does

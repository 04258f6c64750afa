"""Pack files: many sealed blobs in one object, so object stores are not flooded.

::

    pack    = blob* header_envelope header_length:u32 "VVPK"
    header  = BLOB_ENTRY*          (sealed with aad b"pack header")
    name    = data/<id[:2]>/<id>    where id = hex SHA-256 of the whole pack

A blob's envelope is bound to its type and id (aad = type byte + id), so a blob read from
the wrong place or altered fails to open. The pack id covers every byte, so ``check
--read-data`` can verify a pack without keys, and with keys every blob inside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vmvault.errors import IntegrityError
from vmvault.repo._layout import BLOB_ENTRY, PACK_MAGIC, PACK_TRAILER, BlobType
from vmvault.repo.crypto import MasterKey, open_envelope, seal_envelope

__all__ = ["BlobEntry", "PackBuilder", "blob_aad", "pack_name", "parse_pack_header"]

_HEADER_AAD = b"pack header"


def blob_aad(blob_type: BlobType, blob_id: bytes) -> bytes:
    return bytes([blob_type]) + blob_id


def pack_name(pack_id: bytes) -> str:
    hexid = pack_id.hex()
    return f"data/{hexid[:2]}/{hexid}"


@dataclass(frozen=True, slots=True)
class BlobEntry:
    type: BlobType
    id: bytes
    offset: int  # within the pack
    length: int  # sealed length
    raw_length: int  # plaintext length

    def pack(self) -> bytes:
        return BLOB_ENTRY.pack(self.type, self.id, self.offset, self.length, self.raw_length)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> BlobEntry:
        t, blob_id, off, length, raw = BLOB_ENTRY.unpack_from(data, offset)
        try:
            blob_type = BlobType(t)
        except ValueError:
            raise IntegrityError(f"unknown blob type {t}") from None
        return cls(blob_type, blob_id, off, length, raw)


class PackBuilder:
    """Collects sealed blobs; ``finish`` returns the pack id and bytes. Not thread-safe."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.entries: list[BlobEntry] = []
        self.size = 0

    def add(self, blob_type: BlobType, blob_id: bytes, sealed: bytes, raw_length: int) -> None:
        self.entries.append(BlobEntry(blob_type, blob_id, self.size, len(sealed), raw_length))
        self._parts.append(sealed)
        self.size += len(sealed)

    def __len__(self) -> int:
        return len(self.entries)

    def finish(self, key: MasterKey) -> tuple[bytes, bytes]:
        header = b"".join(e.pack() for e in self.entries)
        sealed = seal_envelope(key, header, _HEADER_AAD)
        self._parts.append(sealed)
        self._parts.append(PACK_TRAILER.pack(len(sealed), PACK_MAGIC))
        data = b"".join(self._parts)
        self._parts = []
        return hashlib.sha256(data).digest(), data


def parse_pack_header(key: MasterKey, data: bytes, *, name: str) -> list[BlobEntry]:
    """The blob entries of a whole pack's bytes, checking the trailer and every bound."""
    if len(data) < PACK_TRAILER.size:
        raise IntegrityError(f"pack {name} is truncated ({len(data)} bytes)", name=name)
    hlen, magic = PACK_TRAILER.unpack_from(data, len(data) - PACK_TRAILER.size)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"pack {name} has no pack trailer (truncated or damaged)", name=name)
    start = len(data) - PACK_TRAILER.size - hlen
    if start < 0:
        raise IntegrityError(f"pack {name}: header length {hlen} exceeds the pack", name=name)
    header = open_envelope(key, data[start : start + hlen], _HEADER_AAD, what=f"pack {name} header")
    if len(header) % BLOB_ENTRY.size:
        raise IntegrityError(f"pack {name}: header size {len(header)} is not a whole number of entries", name=name)
    entries = [BlobEntry.unpack(header, i) for i in range(0, len(header), BLOB_ENTRY.size)]
    for e in entries:
        if e.offset + e.length > start:
            raise IntegrityError(f"pack {name}: blob {e.id.hex()} lies outside the pack", name=name)
    return entries


def seal_blob(key: MasterKey, blob_type: BlobType, blob_id: bytes, data: bytes) -> bytes:
    return seal_envelope(key, data, blob_aad(blob_type, blob_id))


def open_blob(key: MasterKey, blob_type: BlobType, blob_id: bytes, sealed: bytes) -> bytes:
    """Decrypt a blob and re-verify that its content hashes to its id."""
    what = f"{'chunk' if blob_type is BlobType.DATA else 'index block'} {blob_id.hex()}"
    data = open_envelope(key, sealed, blob_aad(blob_type, blob_id), what=what)
    if key.chunk_id(data) != blob_id:
        raise IntegrityError(f"{what}: content does not match its id", object_id=blob_id.hex())
    return data

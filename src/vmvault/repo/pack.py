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

from vmvault.backends.base import Backend
from vmvault.errors import IntegrityError
from vmvault.repo._layout import BLOB_ENTRY, PACK_MAGIC, PACK_TRAILER, BlobType
from vmvault.repo.crypto import MAX_PAYLOAD, MasterKey, open_envelope, seal_envelope

__all__ = [
    "BlobEntry",
    "PackBuilder",
    "blob_aad",
    "expected_pack_size",
    "pack_name",
    "parse_pack_header",
    "read_pack_header",
]

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

    def add(self, blob_type: BlobType, blob_id: bytes, sealed: bytes | tuple[bytes, ...], raw_length: int) -> None:
        """Append a sealed blob: its envelope, or the parts the envelope is their concatenation
        of (``seal_envelope_parts``: joined with the pack, not copied before)."""
        parts = (sealed,) if isinstance(sealed, bytes) else sealed
        length = sum(len(part) for part in parts)
        self.entries.append(BlobEntry(blob_type, blob_id, self.size, length, raw_length))
        self._parts.extend(parts)
        self.size += length

    def __len__(self) -> int:
        return len(self.entries)

    def finish(self, key: MasterKey) -> tuple[bytes, bytes]:
        pack_id, parts = self.finish_parts(key)
        return pack_id, b"".join(parts)

    def finish_parts(self, key: MasterKey) -> tuple[bytes, list[bytes]]:
        header = b"".join(e.pack() for e in self.entries)
        sealed = seal_envelope(key, header, _HEADER_AAD)
        self._parts.append(sealed)
        self._parts.append(PACK_TRAILER.pack(len(sealed), PACK_MAGIC))
        parts, self._parts = self._parts, []
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        return digest.digest(), parts


def expected_pack_size(entries: list[BlobEntry]) -> int:
    """The size of a pack holding exactly ``entries``, as the writer makes it.

    The header is the entries in offset order, sealed like any payload; its length does not
    depend on the key (the GCM tag and the plain checksum are both 16 bytes), only on how
    zstd compresses it, which another zstd version may do differently (readers then ask the
    pack's trailer).
    """
    blobs_end = max((e.offset + e.length for e in entries), default=0)
    header = b"".join(e.pack() for e in sorted(entries, key=lambda e: e.offset))
    return blobs_end + len(seal_envelope(MasterKey.unencrypted(), header, b"")) + PACK_TRAILER.size


def parse_pack_header(key: MasterKey, data: bytes, *, name: str) -> list[BlobEntry]:
    """The blob entries of a whole pack's bytes, checking the trailer and every bound."""
    hlen = _trailer(data, len(data), name)
    start = len(data) - PACK_TRAILER.size - hlen
    return _open_header(key, data[start : start + hlen], start, name, max_size=len(data) * 2)


def read_pack_header(backend: Backend, key: MasterKey, pack_id: bytes, size: int, *, limit: int) -> list[BlobEntry]:
    """The blob entries of the stored pack ``pack_id`` of ``size`` bytes (as listed), read with
    two bounded range reads (trailer, then header), never the whole pack.

    A pack larger than ``limit`` (the repository's ``pack_limit``) is damaged or planted:
    IntegrityError, nothing read.
    """
    name = pack_name(pack_id)
    if size > limit:
        raise IntegrityError(
            f"pack {name} is {size} bytes, larger than any pack of this repository ({limit}): damaged or planted",
            name=name,
        )
    hlen = _trailer(backend.get(name, max(0, size - PACK_TRAILER.size), PACK_TRAILER.size), size, name)
    start = size - PACK_TRAILER.size - hlen
    sealed = backend.get(name, start, hlen)
    if len(sealed) != hlen:
        raise IntegrityError(f"pack {name} changed size while its header was read", name=name)
    return _open_header(key, sealed, start, name, max_size=limit)


def _trailer(tail: bytes, size: int, name: str) -> int:
    """The header length from a pack's last bytes (``tail`` ends at ``size``)."""
    if size < PACK_TRAILER.size or len(tail) < PACK_TRAILER.size:
        raise IntegrityError(f"pack {name} is truncated ({size} bytes)", name=name)
    hlen, magic = PACK_TRAILER.unpack_from(tail, len(tail) - PACK_TRAILER.size)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"pack {name} has no pack trailer (truncated or damaged)", name=name)
    if hlen > size - PACK_TRAILER.size:
        raise IntegrityError(f"pack {name}: header length {hlen} exceeds the pack", name=name)
    return int(hlen)


def _open_header(key: MasterKey, sealed: bytes, start: int, name: str, *, max_size: int) -> list[BlobEntry]:
    header = open_envelope(key, sealed, _HEADER_AAD, what=f"pack {name} header", max_size=max_size)
    if len(header) % BLOB_ENTRY.size:
        raise IntegrityError(f"pack {name}: header size {len(header)} is not a whole number of entries", name=name)
    try:
        entries = [BlobEntry.unpack(header, i) for i in range(0, len(header), BLOB_ENTRY.size)]
    except IntegrityError as exc:
        raise IntegrityError(f"pack {name}: {exc}", name=name) from exc
    for e in entries:
        if e.offset + e.length > start:
            raise IntegrityError(f"pack {name}: blob {e.id.hex()} lies outside the pack", name=name)
    return entries


def seal_blob(key: MasterKey, blob_type: BlobType, blob_id: bytes, data: bytes) -> bytes:
    return seal_envelope(key, data, blob_aad(blob_type, blob_id))


def open_blob(
    key: MasterKey, blob_type: BlobType, blob_id: bytes, sealed: bytes | memoryview, *, max_size: int = MAX_PAYLOAD
) -> bytes:
    """Decrypt a blob and re-verify that its content hashes to its id; ``max_size`` bounds its
    decompressed length (the raw length the index states)."""
    what = f"{'chunk' if blob_type is BlobType.DATA else 'index block'} {blob_id.hex()}"
    data = open_envelope(key, sealed, blob_aad(blob_type, blob_id), what=what, max_size=max_size)
    if key.chunk_id(data) != blob_id:
        raise IntegrityError(f"{what}: content does not match its id", object_id=blob_id.hex())
    return data

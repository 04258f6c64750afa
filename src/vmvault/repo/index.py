"""Index files: which pack holds which blob (repository-format.md, sections 4 and 12.2).

Index files (``index/<id>``) are written by every backup as it goes, so a killed backup's
finished packs are found and reused by the next run. Prune writes index files that name the
ones they supersede; a reader ignores superseded files still present.

::

    index file payload = INDEX_HEADER superseded_id* pack_record*
    pack_record        = INDEX_PACK BLOB_ENTRY*          (version 1)
                       | INDEX_PACK_V2 BLOB_ENTRY*       (version 2: with the pack's length)

:func:`parse_index` checks a payload and gives its pack records without making an object
per entry (the per-host index cache ingests millions of them); :class:`IndexFile` is the
same content as objects, for writers and small files. Where a blob is, for a reader, is
``repo/index_cache.py`` and ``RepoIndex`` (repo/repository.py).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from vmvault.errors import IntegrityError
from vmvault.repo._layout import BLOB_ENTRY, ID_SIZE, INDEX_HEADER, INDEX_MAGIC, INDEX_PACK, INDEX_PACK_V2, BlobType
from vmvault.repo.pack import BlobEntry

__all__ = [
    "MAX_V2_PAYLOAD",
    "BlobLocation",
    "IndexFile",
    "PackRecord",
    "ParsedIndex",
    "encode_index",
    "encode_pack_record",
    "parse_index",
]

#: index file versions this vmvault reads
VERSIONS = (1, 2)
#: a version-2 index file is at most this big (writers split; section 12.2)
MAX_V2_PAYLOAD = 64 << 20
#: blobs end before the sealed header (at least an envelope's 32 bytes) and the 8-byte trailer
_PACK_TAIL = 32 + 8
_TYPES = frozenset(int(t) for t in BlobType)


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: bytes
    entry: BlobEntry


class PackRecord(NamedTuple):
    """One pack of an index file: its id, its length (0: not recorded), its entries as stored."""

    pack_id: bytes
    length: int
    blobs: int
    #: ``blobs`` BLOB_ENTRY structs, in header order
    raw: memoryview

    def rows(self) -> Iterator[tuple[int, bytes, int, int, int]]:
        """``(type, id, offset, length, raw_length)`` of each entry."""
        return BLOB_ENTRY.iter_unpack(self.raw)

    def entries(self) -> list[BlobEntry]:
        return [BlobEntry(BlobType(t), i, o, n, r) for t, i, o, n, r in self.rows()]

    def blobs_end(self) -> int:
        return max((o + n for _t, _i, o, n, _r in self.rows()), default=0)


@dataclass
class ParsedIndex:
    version: int
    supersedes: list[bytes]
    records: list[PackRecord]

    def blob_count(self) -> int:
        return sum(r.blobs for r in self.records)


def parse_index(data: bytes | memoryview, *, name: str) -> ParsedIndex:
    """Check an index file's payload against the grammar and give its pack records.

    Raises IntegrityError naming ``name`` for anything else: magic, version, counts that
    exceed the payload, an unknown blob type, a blob beyond its pack's recorded length,
    trailing bytes.
    """
    view = memoryview(data)
    try:
        magic, version, _reserved, n_sup, n_packs = INDEX_HEADER.unpack_from(view)
    except struct.error:
        raise IntegrityError(f"{name}: damaged index file: {len(view)} bytes", name=name) from None
    if magic != INDEX_MAGIC:
        raise IntegrityError(f"{name}: not an index file", name=name)
    if version not in VERSIONS:
        raise IntegrityError(f"{name}: unknown index version {version}", name=name)
    record = INDEX_PACK if version == 1 else INDEX_PACK_V2
    pos = INDEX_HEADER.size
    # counts are checked against the payload before anything is built from them
    if pos + n_sup * ID_SIZE > len(view) or n_packs * record.size > len(view):
        raise IntegrityError(f"{name}: counts exceed the file ({n_sup} superseded, {n_packs} packs)", name=name)
    supersedes = [bytes(view[pos + i * ID_SIZE : pos + (i + 1) * ID_SIZE]) for i in range(n_sup)]
    pos += n_sup * ID_SIZE
    records: list[PackRecord] = []
    for _ in range(n_packs):
        if pos + record.size > len(view):
            raise IntegrityError(f"{name}: truncated", name=name)
        if version == 1:
            pack_id, count = INDEX_PACK.unpack_from(view, pos)
            length = 0
        else:
            pack_id, count, length = INDEX_PACK_V2.unpack_from(view, pos)
        pos += record.size
        end = pos + count * BLOB_ENTRY.size
        if end > len(view):
            raise IntegrityError(f"{name}: truncated", name=name)
        raw = view[pos:end]
        if count and not _TYPES.issuperset(raw[0 :: BLOB_ENTRY.size]):
            bad = next(t for t in raw[0 :: BLOB_ENTRY.size] if t not in _TYPES)
            raise IntegrityError(f"{name}: unknown blob type {bad}", name=name)
        rec = PackRecord(pack_id, length, count, raw)
        if length and rec.blobs_end() > length - _PACK_TAIL:
            raise IntegrityError(
                f"{name}: pack {pack_id.hex()} is recorded as {length} bytes, too short for its blobs", name=name
            )
        records.append(rec)
        pos = end
    if pos != len(view):
        raise IntegrityError(f"{name}: {len(view) - pos} trailing bytes", name=name)
    return ParsedIndex(version, supersedes, records)


def encode_pack_record(version: int, pack_id: bytes, entries: Sequence[BlobEntry], length: int = 0) -> bytes:
    """One pack record of an index file of ``version`` (``length``: the pack's size, 0 when not
    known; version 1 records none)."""
    if version == 1:
        head = INDEX_PACK.pack(pack_id, len(entries))
    elif version == 2:
        head = INDEX_PACK_V2.pack(pack_id, len(entries), length)
    else:
        raise ValueError(f"index file version {version}")
    return b"".join([head, *(e.pack() for e in entries)])


def encode_index(version: int, supersedes: Sequence[bytes], records: Sequence[bytes]) -> bytes:
    """An index file's payload from its superseded ids and its encoded pack records
    (:func:`encode_pack_record` of the same version)."""
    if version not in VERSIONS:
        raise ValueError(f"index file version {version}")
    return b"".join([INDEX_HEADER.pack(INDEX_MAGIC, version, 0, len(supersedes), len(records)), *supersedes, *records])


@dataclass
class IndexFile:
    """An index file's content as objects. ``lengths``: pack lengths (version 2; 0 or absent:
    not recorded)."""

    packs: dict[bytes, list[BlobEntry]] = field(default_factory=dict)
    supersedes: list[bytes] = field(default_factory=list)
    lengths: dict[bytes, int] = field(default_factory=dict)
    version: int = 1

    def encode(self) -> bytes:
        records = [encode_pack_record(self.version, p, e, self.lengths.get(p, 0)) for p, e in self.packs.items()]
        return encode_index(self.version, self.supersedes, records)

    @classmethod
    def decode(cls, data: bytes, *, name: str) -> IndexFile:
        parsed = parse_index(data, name=name)
        out = cls(supersedes=parsed.supersedes, version=parsed.version)
        for rec in parsed.records:
            out.packs[rec.pack_id] = rec.entries()
            if rec.length:
                out.lengths[rec.pack_id] = rec.length
        return out

    def file_id(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

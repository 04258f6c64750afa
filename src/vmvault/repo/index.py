"""The repository index: which pack holds which blob.

Index files (``index/<id>``) are written by every backup as it goes, so a killed backup's
finished packs are found and reused by the next run. Prune writes consolidated index files
that name the ones they supersede; a reader ignores superseded files still present.

::

    index file payload = INDEX_HEADER superseded_id* (INDEX_PACK BLOB_ENTRY*)*
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from vmvault.errors import IntegrityError
from vmvault.repo._layout import BLOB_ENTRY, ID_SIZE, INDEX_HEADER, INDEX_MAGIC, INDEX_PACK
from vmvault.repo.pack import BlobEntry

__all__ = ["BlobLocation", "IndexFile", "MasterIndex"]

INDEX_VERSION = 1


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: bytes
    entry: BlobEntry


@dataclass
class IndexFile:
    packs: dict[bytes, list[BlobEntry]] = field(default_factory=dict)
    supersedes: list[bytes] = field(default_factory=list)

    def encode(self) -> bytes:
        parts = [INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, 0, len(self.supersedes), len(self.packs))]
        parts.extend(self.supersedes)
        for pack_id, entries in self.packs.items():
            parts.append(INDEX_PACK.pack(pack_id, len(entries)))
            parts.extend(e.pack() for e in entries)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, *, name: str) -> IndexFile:
        try:
            magic, version, _r, n_sup, n_packs = INDEX_HEADER.unpack_from(data)
            if magic != INDEX_MAGIC:
                raise IntegrityError(f"{name}: not an index file", name=name)
            if version != INDEX_VERSION:
                raise IntegrityError(f"{name}: unknown index version {version}", name=name)
            pos = INDEX_HEADER.size
            sup = [data[pos + i * ID_SIZE : pos + (i + 1) * ID_SIZE] for i in range(n_sup)]
            pos += n_sup * ID_SIZE
            out = cls(supersedes=sup)
            for _ in range(n_packs):
                pack_id, count = INDEX_PACK.unpack_from(data, pos)
                pos += INDEX_PACK.size
                if pos + count * BLOB_ENTRY.size > len(data):
                    raise IntegrityError(f"{name}: truncated", name=name)
                out.packs[pack_id] = [BlobEntry.unpack(data, pos + i * BLOB_ENTRY.size) for i in range(count)]
                pos += count * BLOB_ENTRY.size
            if pos != len(data):
                raise IntegrityError(f"{name}: {len(data) - pos} trailing bytes", name=name)
            return out
        except Exception as exc:  # struct.error and friends: all mean a damaged file
            if isinstance(exc, IntegrityError):
                raise
            raise IntegrityError(f"{name}: damaged index file: {exc}", name=name) from exc

    def file_id(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()


class MasterIndex:
    """Every known blob, in memory. Thread-safe.

    Memory grows with the number of distinct chunks in the repository (about 150 bytes each),
    not with the size of the disk being backed up.
    """

    def __init__(self) -> None:
        self._blobs: dict[bytes, BlobLocation] = {}
        self._lock = threading.Lock()

    def add_pack(self, pack_id: bytes, entries: Iterable[BlobEntry]) -> None:
        with self._lock:
            for e in entries:
                self._blobs.setdefault(e.id, BlobLocation(pack_id, e))

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        return self._blobs.get(blob_id)

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        with self._lock:
            snapshot = list(self._blobs.items())
        return iter(snapshot)

    def packs(self) -> dict[bytes, list[BlobEntry]]:
        out: dict[bytes, list[BlobEntry]] = {}
        for loc in self._blobs.values():
            out.setdefault(loc.pack_id, []).append(loc.entry)
        return out

"""Index blocks: a disk's chunk index, cut into INDEX blobs of ``index_span`` entries.

Grammar (docs/design/repository-format.md, section 4, "Index blocks")::

    index_block = chunk_ref{1..index_span}
    chunk_ref   = id:32        a DATA blob id: the chunk's content
                | ZERO_ID      32 bytes 0x00: the chunk reads as zeros; nothing is stored
                | PARENT_ID    32 bytes 0xFF: (a layer) this layer stores nothing here

A block whose entries are all ZERO_ID is not stored: the snapshot lists ``null`` for it.

This module is the one place that knows how a block is laid out. Everything else (backup,
restore, copy, check, prune, repair, the readers of ``files`` and ``mount``) reads blocks with
``Repository.read_index_block``, builds them with :class:`IndexBlockBuilder`, stores them with
``BlobWriter.add_index_block``, and sees an entry as a 32-byte chunk ref to compare with
``ZERO_ID`` and ``PARENT_ID``. :class:`ChunkResolver` resolves PARENT entries through the
layers of a checkpoint chain, as section 4 ("Snapshots": ``disks[].layer``, ``parent``) says.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

from vmvault.errors import IntegrityError
from vmvault.repo._layout import ID_SIZE, PARENT_ID, ZERO_ID, BlobType
from vmvault.repo._limits import MAX_INDEX_SPAN

if TYPE_CHECKING:
    from vmvault.repo.repository import Repository
    from vmvault.repo.snapshot import DiskRecord, Snapshot

__all__ = [
    "INDEX_SPAN",
    "NOT_CHUNKS",
    "PARENT_ID",
    "ZERO_ID",
    "ChunkResolver",
    "IndexBlock",
    "IndexBlockBuilder",
    "block_length",
    "chunk_count",
    "is_chunk",
]

#: entries per index block that vmvault writes: 128 KiB per block, 1 GiB of disk at 256 KiB chunks
INDEX_SPAN = 4096
assert INDEX_SPAN <= MAX_INDEX_SPAN

#: the entries that name no stored chunk
NOT_CHUNKS = (ZERO_ID, PARENT_ID)


def is_chunk(ref: bytes) -> bool:
    """Whether ``ref`` names a stored chunk (neither ZERO_ID nor PARENT_ID)."""
    return ref != ZERO_ID and ref != PARENT_ID


def chunk_count(record: DiskRecord) -> int:
    """How many chunks the disk has (the last may be short)."""
    _check_geometry(record)
    return -(-record.size // record.chunk_size)


def block_length(record: DiskRecord, block: int) -> int:
    """How many entries index block ``block`` of the disk holds (the last block may be shorter);
    0 past the end."""
    return max(0, min(record.index_span, chunk_count(record) - block * record.index_span))


def _check_geometry(record: DiskRecord) -> None:
    # the record comes from a snapshot in storage: never divide by what it says unchecked
    cs, span, size = record.chunk_size, record.index_span, record.size
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (cs, span, size)) or cs <= 0 or span <= 0:
        raise IntegrityError(f"disk {record.name}: impossible chunk or index geometry ({cs!r}, {span!r})")
    if size < 0:
        raise IntegrityError(f"disk {record.name}: negative size {size}")


def _check_ref(ref: bytes) -> bytes:
    if type(ref) is not bytes or len(ref) != ID_SIZE:
        raise ValueError(f"a chunk ref is {ID_SIZE} bytes, not {ref!r:.80}")
    return ref


class IndexBlock(Sequence[bytes]):
    """One index block: a sequence of chunk refs. Immutable.

    Made by :meth:`decode` (from stored bytes, checked), :meth:`from_refs` or an
    :class:`IndexBlockBuilder`.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        # trusted: callers go through decode, from_refs or the builder, which check
        self._raw = raw

    @classmethod
    def decode(cls, raw: bytes, *, count: int | None = None, what: str = "index block") -> IndexBlock:
        """The block stored as ``raw``; with ``count``, it must hold exactly that many entries.

        Raises IntegrityError naming ``what`` when the bytes are not a whole number of entries,
        hold none, more than any writer puts in a block, or not ``count``.
        """
        if len(raw) % ID_SIZE:
            raise IntegrityError(f"{what} of {len(raw)} bytes is not a whole number of entries")
        n = len(raw) // ID_SIZE
        if not 0 < n <= MAX_INDEX_SPAN:
            raise IntegrityError(f"{what} has {n} entries; a block holds 1 to {MAX_INDEX_SPAN}")
        if count is not None and n != count:
            raise IntegrityError(f"{what} has {n} entries, expected {count}")
        return cls(bytes(raw))

    @classmethod
    def from_refs(cls, refs: Iterable[bytes]) -> IndexBlock:
        raw = b"".join(_check_ref(r) for r in refs)
        if not 0 < len(raw) <= MAX_INDEX_SPAN * ID_SIZE:
            raise ValueError(f"an index block holds 1 to {MAX_INDEX_SPAN} entries, not {len(raw) // ID_SIZE}")
        return cls(raw)

    def encode(self) -> bytes:
        """The block as stored (the plaintext of its INDEX blob)."""
        return self._raw

    def __len__(self) -> int:
        return len(self._raw) // ID_SIZE

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"entry {index} of an index block of {n}")
        return self._raw[index * ID_SIZE : (index + 1) * ID_SIZE]

    def __iter__(self) -> Iterator[bytes]:
        raw = self._raw
        return (raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexBlock) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"IndexBlock({len(self)} entries)"

    @property
    def empty(self) -> bool:
        """Every entry is ZERO_ID: such a block is not stored (the snapshot lists ``null``)."""
        return self._raw.count(0) == len(self._raw)

    @property
    def defers(self) -> bool:
        """Some entry is PARENT_ID (only a layer's block may defer to its parent); searched in
        the bytes, a match counting where an entry starts (check asks it of every block)."""
        at = self._raw.find(PARENT_ID)
        while at >= 0 and at % ID_SIZE:
            at = self._raw.find(PARENT_ID, at + 1)
        return at >= 0

    def chunk_ids(self) -> Iterator[bytes]:
        """The DATA blob ids the block names, in entry order (a repeated chunk repeats)."""
        return (ref for ref in self if ref not in NOT_CHUNKS)


class IndexBlockBuilder:
    """An index block being filled in, entry by entry or run by run. Not thread-safe.

    Starts as ``count`` ZERO_ID entries, or as a copy of an existing block (an incremental
    backup changes a parent's block where the disk changed).
    """

    __slots__ = ("_raw",)

    def __init__(self, count: int) -> None:
        if not 0 < count <= MAX_INDEX_SPAN:
            raise ValueError(f"an index block holds 1 to {MAX_INDEX_SPAN} entries, not {count}")
        self._raw = bytearray(count * ID_SIZE)

    @classmethod
    def from_block(cls, block: IndexBlock) -> IndexBlockBuilder:
        builder = cls(len(block))
        builder._raw[:] = block.encode()
        return builder

    def __len__(self) -> int:
        return len(self._raw) // ID_SIZE

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"entry {index} of an index block of {len(self)}")
        return bytes(self._raw[index * ID_SIZE : (index + 1) * ID_SIZE])

    def set(self, position: int, refs: Sequence[bytes]) -> None:
        """Entries ``position``, ``position + 1``, ... become ``refs``."""
        if position < 0 or position + len(refs) > len(self):
            raise IndexError(f"{len(refs)} entries at {position} do not fit a block of {len(self)}")
        self._raw[position * ID_SIZE : (position + len(refs)) * ID_SIZE] = b"".join(_check_ref(r) for r in refs)

    def fill(self, first: int, end: int, ref: bytes) -> None:
        """Entries ``first`` to ``end - 1`` become ``ref`` (typically ZERO_ID or PARENT_ID)."""
        if not 0 <= first <= end <= len(self):
            raise IndexError(f"entries {first} to {end} do not fit a block of {len(self)}")
        self._raw[first * ID_SIZE : end * ID_SIZE] = _check_ref(ref) * (end - first)

    def build(self) -> IndexBlock:
        return IndexBlock(bytes(self._raw))


class ChunkResolver:
    """The chunk refs of one disk of a snapshot, PARENT entries resolved through its layers.

    Reads index blocks through the repository (verified) and keeps the last 64 it read; many
    readers (engine/reader.py) may share one resolver.
    """

    def __init__(self, repo: Repository, snap: Snapshot, record: DiskRecord) -> None:
        self.repo = repo
        self.by_name = {d.name: d for d in snap.disks}
        self.record = record
        self._cache: dict[tuple[str, int], IndexBlock] = {}
        # fetching a block twice is harmless; the lock keeps the cache itself consistent
        self._lock = threading.Lock()

    def block(self, record: DiskRecord, block: int) -> IndexBlock:
        """Index block ``block`` of ``record`` (an empty one as ZERO_ID entries), checked to hold
        the entries its place in the disk needs."""
        key = (record.name, block)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        count = block_length(record, block)
        if not 0 <= block < len(record.index) or count <= 0:
            raise IntegrityError(
                f"disk {record.name} has {len(record.index)} index blocks; block {block} is needed "
                f"for its {record.size} bytes",
            )
        ref = record.index[block]
        if ref is None:
            found = IndexBlockBuilder(count).build()
        else:
            found = self.repo.read_index_block(
                ref, count=count, what=f"index block {ref} of disk {record.name}", kept=True
            )
        with self._lock:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = found
        return found

    def resolve(self, record: DiskRecord, chunk: int, *, flatten: bool) -> bytes:
        """The entry for chunk ``chunk`` of ``record``; with ``flatten``, a PARENT entry is
        followed to the layer below (ZERO_ID where no layer stores the chunk)."""
        entry = self.block(record, chunk // record.index_span)[chunk % record.index_span]
        seen = {record.name}
        while flatten and entry == PARENT_ID:
            parent = self.by_name.get(record.parent or "")
            if parent is None or parent.name in seen:
                return ZERO_ID
            seen.add(parent.name)
            record = parent
            entry = self.block(record, chunk // record.index_span)[chunk % record.index_span]
        return entry

    def chunk_id(self, chunk: int) -> bytes | None:
        """The id of chunk ``chunk`` of the record's merged view (its layers resolved), or None
        where it reads as zeros."""
        entry = self.resolve(self.record, chunk, flatten=True)
        return entry if is_chunk(entry) else None

    def fetch(self, chunk_id: bytes) -> bytes:
        """A chunk's plaintext, verified against its id (IntegrityError naming it otherwise)."""
        return self.repo.get_blob(BlobType.DATA, chunk_id)

    def entries(self, *, flatten: bool) -> Iterator[tuple[int, bytes]]:
        """``(chunk, entry)`` in disk order for every chunk of the non-empty index blocks."""
        rec = self.record
        n_chunks = chunk_count(rec)
        for block, ref in enumerate(rec.index):
            if ref is None:
                # an empty block holds only ZERO_ID (also in a layer): nothing to yield, nothing
                # allocated, so an empty petabyte costs one step per index block, none per chunk
                continue
            first = block * rec.index_span
            for i, entry in enumerate(self.block(rec, block)):
                chunk = first + i
                if chunk >= n_chunks:
                    return
                if entry == PARENT_ID and flatten:
                    entry = self.resolve(rec, chunk, flatten=True)
                yield chunk, entry

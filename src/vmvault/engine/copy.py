"""Copy snapshots from one repository to another (replication, e.g. local -> off-site).

The two repositories have their own keys, and may have different chunk id functions (keyed
BLAKE3, HMAC-SHA-256: repository-format.md, section 3), so the same plaintext has a different
chunk id in each. Each chunk the target lacks is read from the source (decrypted and verified
against its source id), given its target id by the target's function, sealed with the target
key and packed by the target's BlobWriter; each index block is rewritten with target ids. Chunk
boundaries must match, so both repositories must use the same chunk size (otherwise
nothing could be deduplicated and every index would have to be re-cut; we refuse).

Order of writes is the backup's (repository.py): packs, then index files, then the target
snapshot last. So:

* an interrupted copy leaves only packs, which are indexed every few packs and when the
  copy fails with an exception; the next run finds those chunks in the target's index and
  does not upload them again;
* a copied snapshot records ``extra["copied_from"] = {"repository", "snapshot"}``; a source
  snapshot already recorded in the target is skipped, so running the same copy twice
  uploads nothing;
* for snapshots already copied, the pairing of their index blocks (source block id ->
  target block id) is learnt from the two manifests, so an index block unchanged since the
  last copied snapshot is taken over without reading any of its chunks from the source
  (the target's block is read to check every chunk it names is still in the target). The
  pairs come from the newest copied snapshot of every source location (a clone of another
  VM shares its blocks) and from the copy each snapshot follows (its parent's, else its
  location's newest); a block that changed has its chunks paired with the earlier copy's
  block at the same place (held for that block only), so only the chunks that really
  changed are downloaded; each block's reads from both repositories are made ahead of the
  block being copied, several at once (``_Translator.disk``): one after another, each cost a
  round trip to a repository far away;
* memory holds no pairing beyond those of the blocks read ahead (16 at most): the index
  block pairs and the chunks this copy downloads go to tables of a scratch database in the
  target's cache folder (about 80 bytes a chunk on disk; a dict of every pairing took about
  140 bytes a chunk of memory, 1.5 GiB for a 2 TiB disk), snapshots are listed as summaries
  and read whole one at a time (repository-format.md, 12.10);
* nothing is deduplicated against target packs that are gone: each target pack a chunk is
  found in is confirmed present once (repository-format.md, sections 10.2 and 12.4).

Both repositories are held under a shared lock, like a backup: a prune of either waits.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmvault.errors import IntegrityError, RepositoryError, SnapshotNotFoundError
from vmvault.repo.fetch import BlobFetcher
from vmvault.repo.filters import SnapshotFilter
from vmvault.repo.format import BlobType, IndexBlock, block_length, is_chunk
from vmvault.repo.index_cache import ScratchMap
from vmvault.repo.progress import PhaseCallback
from vmvault.repo.repository import BlobWriter, Repository
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

__all__ = ["COPIED_FROM", "CopyFilter", "CopyReport", "copy_snapshots", "select_snapshots"]

log = logging.getLogger("vmvault.copy")

#: key in ``Snapshot.extra`` naming the repository and snapshot a copy came from
COPIED_FROM = "copied_from"

#: plaintext a copy plans to read ahead from the source (``BlobFetcher``'s ``max_bytes``)
_PLANNED_BYTES = 16 << 20

#: (label, done, total) callbacks, like check's


@dataclass(frozen=True)
class CopyFilter:
    """Which source snapshots to copy. Empty fields select everything."""

    #: full ids or unique prefixes
    snapshots: tuple[str, ...] = ()
    #: source locations (exact)
    sources: tuple[str, ...] = ()
    #: a snapshot must carry every one of these tags
    tags: tuple[str, ...] = ()
    #: only the N newest snapshots of each source location (0 = all)
    latest: int = 0
    #: ``--vm/--host/--tag/--source`` (repo/filters.py), applied before ``latest``
    match: SnapshotFilter | None = None


@dataclass
class CopiedSnapshot:
    source_id: str
    target_id: str
    location: str
    time: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source_id, "target": self.target_id, "location": self.location, "time": self.time}


@dataclass
class CopyReport:
    source: str
    target: str
    copied: list[CopiedSnapshot] = field(default_factory=list)
    #: source snapshot ids already present in the target
    skipped: list[str] = field(default_factory=list)
    chunks_read: int = 0  # chunks downloaded from the source and decrypted
    bytes_read: int = 0  # their plaintext bytes
    chunks_added: int = 0  # data chunks uploaded to the target
    raw_bytes_added: int = 0  # their plaintext bytes
    blobs_added: int = 0  # every blob uploaded (data chunks and index blocks)
    bytes_added: int = 0  # sealed bytes uploaded (what the target's storage grew by, before pack overhead)
    packs_added: int = 0
    index_blocks_reused: int = 0  # index blocks taken over from earlier copies (no chunk read from the source)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "to": self.target,
            "copied": [c.to_dict() for c in self.copied],
            "skipped": list(self.skipped),
            "chunks_read": self.chunks_read,
            "bytes_read": self.bytes_read,
            "chunks_added": self.chunks_added,
            "raw_bytes_added": self.raw_bytes_added,
            "blobs_added": self.blobs_added,
            "bytes_added": self.bytes_added,
            "packs_added": self.packs_added,
            "index_blocks_reused": self.index_blocks_reused,
            "seconds": round(self.seconds, 3),
        }


def select_snapshots(snaps: Sequence[Snapshot], filters: CopyFilter) -> list[Snapshot]:
    """The snapshots ``filters`` selects, oldest first. Raises SnapshotNotFoundError for an
    id that matches nothing or more than one snapshot."""
    chosen = list(snaps)
    if filters.snapshots:
        wanted: dict[str, Snapshot] = {}
        for ref in filters.snapshots:
            matches = [s for s in snaps if s.id.startswith(ref)]
            if not matches:
                raise SnapshotNotFoundError(f"no snapshot in the source repository matches {ref!r}")
            if len(matches) > 1:
                raise SnapshotNotFoundError(f"{ref!r} matches {len(matches)} snapshots; give more characters")
            wanted[matches[0].id] = matches[0]
        chosen = [s for s in chosen if s.id in wanted]
    if filters.sources:
        chosen = [s for s in chosen if s.source.get("location") in filters.sources]
    if filters.tags:
        chosen = [s for s in chosen if set(filters.tags).issubset(s.tags)]
    if filters.match is not None:
        chosen = filters.match.select(chosen)
    if filters.latest > 0:
        by_location: dict[str, list[Snapshot]] = {}
        for s in chosen:
            by_location.setdefault(s.source.get("location", ""), []).append(s)
        keep = {s.id for group in by_location.values() for s in group[-filters.latest :]}
        chosen = [s for s in chosen if s.id in keep]
    return chosen


def _origin(snap: Snapshot) -> tuple[str, str] | None:
    doc = snap.extra.get(COPIED_FROM)
    if isinstance(doc, dict) and isinstance(doc.get("snapshot"), str):
        return str(doc.get("repository", "")), str(doc["snapshot"])
    return None


def _hex(ref: str | None) -> bytes | None:
    """An id of a manifest as bytes; None for a hole or an id that is not hex (a pairing
    learnt from it is only a saving, so a bad one is skipped: translating says what is wrong)."""
    if ref is None:
        return None
    try:
        return bytes.fromhex(ref)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _Prepared:
    """One source index block, read ahead (``_Translator._prepare``): the target block to name
    again, or the block's entries and the pairs of the earlier block at its place."""

    reuse: bytes | None = None
    block: IndexBlock | None = None
    nearby: dict[bytes, bytes] = field(default_factory=dict)


class _Translator:
    """Maps source blob ids to target blob ids, copying what the target lacks.

    The pairings (source id -> target id) are kept in tables of a scratch database, not in
    memory (a copy of a 2 TiB disk pairs 8 M chunks, about 1.5 GiB as a dict), but for those
    of the earlier blocks at the places being copied or read ahead (``_pairs_at``)."""

    def __init__(
        self,
        src: Repository,
        dst: Repository,
        writer: BlobWriter,
        report: CopyReport,
        workers: int,
        scratch: sqlite3.Connection,
        ahead: int,
    ) -> None:
        self.src = src
        self.dst = dst
        self.writer = writer
        self.report = report
        self.workers = workers
        #: index blocks whose reads are made ahead of the one being copied (``disk``)
        self.ahead = ahead
        self._lock = threading.Lock()
        # unencrypted repositories with the same id function (or ones sharing an id key and
        # function) give a chunk the same id in both:
        # then a chunk the target holds needs no download to learn its target id, and no
        # chunk pairing is kept
        probe = b"vmvault copy: are chunk ids keyed alike?"
        self.same_ids = src.key.chunk_id(probe) == dst.key.chunk_id(probe)
        #: source index block -> the target's, from earlier copies' manifests and this copy
        self.blocks = ScratchMap(scratch, "s.blocks")
        #: source chunk -> the target's, for the chunks this copy downloaded and earlier copies' files
        self.chunks = ScratchMap(scratch, "s.chunks")
        #: per disk name, that disk in the earlier copy the snapshot being copied follows
        #: (source record, target record), for pairing the chunks of a changed block
        self.previous: dict[str, tuple[DiskRecord, DiskRecord]] = {}

    def learn_blocks(self, src_snap: Snapshot, dst_snap: Snapshot) -> dict[str, tuple[DiskRecord, DiskRecord]]:
        """Pair the index blocks of a source snapshot and its earlier copy, position by
        position, from the two manifests alone; returns the disks that pair by name."""
        paired: dict[str, tuple[DiskRecord, DiskRecord]] = {}
        dst_disks = {d.name: d for d in dst_snap.disks}
        for d in src_snap.disks:
            other = dst_disks.get(d.name)
            if other is None or len(other.index) != len(d.index) or other.chunk_size != d.chunk_size:
                continue
            paired[d.name] = (d, other)
            pairs = ((_hex(a), _hex(b)) for a, b in zip(d.index, other.index, strict=True))
            self.blocks.put((a, b) for a, b in pairs if a is not None and b is not None)
        return paired

    def follow(self, pair: tuple[Snapshot, Snapshot] | None) -> None:
        """Learn from the earlier copy the next snapshot most likely follows (a source snapshot
        and its copy; None: there is none): its index blocks (an unchanged block is then taken
        over), its files' chunks by name, and where its disks' blocks are, so that a block that
        changed has its chunks paired with the earlier block at the same place
        (``index_block``), not every block of every disk."""
        self.previous = {}
        if pair is None:
            return
        src_snap, dst_snap = pair
        self.previous = self.learn_blocks(src_snap, dst_snap)
        if self.same_ids:
            return
        dst_files = {f.name: f for f in dst_snap.files}
        for f in src_snap.files:
            of = dst_files.get(f.name)
            if of is None or len(of.chunks) != len(f.chunks):
                continue
            pairs = ((_hex(a), _hex(b)) for a, b in zip(f.chunks, of.chunks, strict=True))
            self.chunks.put((a, b) for a, b in pairs if a is not None and b is not None)

    def _pairs_at(self, disk: str, block: int) -> dict[bytes, bytes]:
        """The chunks of the earlier copy's index block at this place, paired (read from both
        repositories, 32 bytes a chunk): a changed block then costs downloads only for the
        chunks that really changed. Held for this block only (at most ``INDEX_SPAN`` pairs,
        from when it is read ahead until it is copied):
        put into the scratch table, the pairs of every changed block cost more time than the
        downloads they save (an incremental copy changes most blocks a little)."""
        earlier = self.previous.get(disk)
        if self.same_ids or earlier is None or block >= len(earlier[0].index):
            return {}
        a_id, b_id = _hex(earlier[0].index[block]), _hex(earlier[1].index[block])
        # the target's block only from a pack confirmed present (a lost one is not read)
        if a_id is None or b_id is None or a_id not in self.src.index or not self.dst.index.has_present(b_id):
            return {}
        try:
            a_block = self.src.read_index_block(a_id, kept=True)
            b_block = self.dst.read_index_block(b_id, kept=True)
        except IntegrityError:
            return {}  # nothing learnt: the chunks are translated the long way (and check reports it)
        if len(a_block) != len(b_block):
            return {}
        # (pairs of zero or parent references too: cheaper than leaving them out, never asked)
        return dict(zip(a_block, b_block, strict=True))

    def _targets_of(self, src_ids: list[bytes], nearby: dict[bytes, bytes]) -> dict[bytes, bytes]:
        """The target's ids of those source chunks the target holds already (no download),
        with one question to the target's index for all of them. ``nearby``: pairs from the
        earlier block at this place, asked before the scratch table."""
        if self.same_ids:
            known = self.writer.known_of(src_ids)
            return {src_id: src_id for src_id in src_ids if src_id in known}
        mapped = {src_id: nearby[src_id] for src_id in src_ids if src_id in nearby}
        mapped.update(self.chunks.get_many(src_id for src_id in src_ids if src_id not in mapped))
        known = self.writer.known_of(list(mapped.values()))
        return {src_id: dst_id for src_id, dst_id in mapped.items() if dst_id in known}

    def _store(self, data: bytes) -> bytes:
        """Add a source chunk's plaintext to the target; its id there."""
        dst_id = self.dst.key.chunk_id(data)
        added = self.writer.add(BlobType.DATA, dst_id, data)
        with self._lock:
            self.report.chunks_read += 1
            self.report.bytes_read += len(data)
            if added:
                self.report.chunks_added += 1
                self.report.raw_bytes_added += len(data)
        return dst_id

    def chunks_of(
        self, ids: Iterable[bytes], pool: ThreadPoolExecutor, nearby: dict[bytes, bytes] | None = None
    ) -> list[bytes]:
        """The target's ids of ``ids`` (an index block's or a file's chunks, in their order),
        copying the chunks the target lacks.

        The chunks to download are read as a restore reads them (repo/fetch.py): runs of a
        pack's chunks side by side in one ranged read, ``workers`` reads at once, at most
        ``_PLANNED_BYTES`` planned ahead, each chunk verified as a read of it alone is; they are
        hashed and added to the target in ``pool``, at most twice ``workers`` chunks waiting.
        """
        ids = list(ids)
        chunks = list(dict.fromkeys(i for i in ids if is_chunk(i)))
        mapped = self._targets_of(chunks, nearby or {})
        wanted = [src_id for src_id in chunks if src_id not in mapped]
        if not wanted:
            return [mapped.get(i, i) for i in ids]
        fetcher = BlobFetcher(self.src, BlobType.DATA, max_requests=self.workers, max_bytes=_PLANNED_BYTES)
        waiting: collections.deque[tuple[bytes, Future[bytes]]] = collections.deque()
        fresh: list[tuple[bytes, bytes]] = []

        def settle(keep: int) -> None:
            while len(waiting) > keep:
                done_id, future = waiting.popleft()
                mapped[done_id] = future.result()
                fresh.append((done_id, mapped[done_id]))

        try:
            for src_id, data in fetcher.fetch((i, i) for i in wanted):
                if isinstance(data, IntegrityError):
                    raise data
                assert data is not None  # None answers only a request without a blob id
                waiting.append((src_id, pool.submit(self._store, data)))
                settle(2 * self.workers)
            settle(0)
        finally:
            for _, future in waiting:
                future.cancel()
            fetcher.close()
        if not self.same_ids:
            self.chunks.put(fresh)
        return [mapped.get(i, i) for i in ids]

    def _all_known(self, dst_block: bytes) -> bool:
        """Whether every chunk an earlier copy's index block names is still in the target: a
        pack lost there (and its entries dropped by ``repair index``) must not be reused."""
        try:
            block = self.dst.read_index_block(dst_block, kept=True)
        except IntegrityError:
            return False
        chunks = set(block.chunk_ids())
        return len(self.writer.known_of(chunks)) == len(chunks)

    def _reusable(self, dst_block: bytes | None) -> bool:
        """Whether the target's index block ``dst_block`` (an earlier translation of a source
        block) can be named again: it and every chunk it names are stored in the target."""
        return dst_block is not None and self.writer.known(dst_block) and self._all_known(dst_block)

    def _prepare(
        self, src_block: bytes, candidate: bytes | None, expected: int, where: tuple[str, int], what: str
    ) -> _Prepared:
        """What translating one source index block needs from storage, read ahead in a thread
        of its own (``disk``): whether ``candidate`` (the block's pairing when it was planned)
        is reusable, else the source block and the pairs of the earlier block at its place."""
        if self._reusable(candidate):
            return _Prepared(reuse=candidate)
        nearby = self._pairs_at(*where)
        block = self.src.read_index_block(
            src_block, count=expected, what=f"{what}: index block {src_block.hex()}", kept=True
        )
        return _Prepared(block=block, nearby=nearby)

    def _finish(
        self, src_block: bytes, candidate: bytes | None, prepared: Future[_Prepared], pool: ThreadPoolExecutor
    ) -> str | None:
        """The target's ref for ``src_block`` from what ``_prepare`` read: its pairing taken
        over, or its chunks translated (copying the ones the target lacks) into a new block."""
        # a block of this copy may have been paired since the read was planned (a disk that
        # repeats a block): that pairing is asked too, the long way
        known = self.blocks.get(src_block)
        try:
            ready = prepared.result()
        except IntegrityError:
            if known == candidate or not self._reusable(known):
                raise
            ready = _Prepared(reuse=known)
        if ready.reuse is None and known != candidate and self._reusable(known):
            ready = _Prepared(reuse=known)
        if ready.reuse is not None:
            self.report.index_blocks_reused += 1
            return ready.reuse.hex()
        assert ready.block is not None
        dst_ref = self.writer.add_index_block(IndexBlock.from_refs(self.chunks_of(ready.block, pool, ready.nearby)))
        if dst_ref is not None:
            self.blocks.put([(src_block, bytes.fromhex(dst_ref))])
        return dst_ref

    def disk(
        self,
        d: DiskRecord,
        what: str,
        pool: ThreadPoolExecutor,
        reads: ThreadPoolExecutor,
        on_block: Callable[[], None] | None = None,
    ) -> DiskRecord:
        """The disk record of the copy of ``d``. Each index block's reads (the target's block
        it was paired with, to confirm its chunks; else the source's block and the earlier
        block at its place) are made in ``reads``, up to ``ahead`` blocks ahead: one after
        another they cost a round trip each, 2,048 of them a run for a 2 TiB disk.
        ``on_block`` is called after each block is copied (a sign of life: a job may stop there)."""
        index: list[str | None] = []
        what = f"{what} disk {d.name}"
        ahead: collections.deque[tuple[bytes, bytes | None, Future[_Prepared]] | None] = collections.deque()
        planned = iter(enumerate(d.index))

        def plan() -> bool:
            item = next(planned, None)
            if item is None:
                return False
            block, block_id = item
            if block_id is None:
                ahead.append(None)
                return True
            src_block = _hex(block_id)
            if src_block is None:
                raise IntegrityError(f"{what}: index block id {block_id!r:.80} is not hex")
            candidate = self.blocks.get(src_block)
            expected = block_length(d, block)
            future = reads.submit(self._prepare, src_block, candidate, expected, (d.name, block), what)
            ahead.append((src_block, candidate, future))
            return True

        try:
            while len(ahead) < self.ahead and plan():
                pass
            while ahead:
                head = ahead.popleft()
                index.append(None if head is None else self._finish(*head, pool))
                if on_block is not None:
                    on_block()
                plan()
        finally:
            for head in ahead:
                if head is not None:
                    head[2].cancel()
        # change-tracking state describes the source repository's chain; a backup into the
        # target must not trust it, so the copy carries none (the next backup there reads fully)
        return DiskRecord(
            name=d.name,
            format=d.format,
            size=d.size,
            chunk_size=d.chunk_size,
            index_span=d.index_span,
            index=index,
            layer=d.layer,
            parent=d.parent,
            layer_map=d.layer_map,
            cbt=None,
            meta=dict(d.meta),
            stats=dict(d.stats),
        )

    def file(self, f: FileRecord, what: str, pool: ThreadPoolExecutor) -> FileRecord:
        ids = [_hex(c) for c in f.chunks]
        if None in ids:
            raise IntegrityError(f"{what} file {f.name}: a chunk id is not hex")
        chunks = self.chunks_of((i for i in ids if i is not None), pool)
        return FileRecord(name=f.name, size=f.size, mode=f.mode, mtime_ns=f.mtime_ns, chunks=[c.hex() for c in chunks])


class _Earlier:
    """The earlier copies a copy learns from, each pair (the source snapshot, its copy in the
    target) read whole when it is used, one pair at a time: memory holds summaries of the
    snapshots (repository-format.md, 12.10), not every earlier copy's ids."""

    def __init__(self, src: Repository, dst: Repository, listed: Sequence[Snapshot], copies: dict[str, str]) -> None:
        self.src = src
        self.dst = dst
        #: source snapshots (summaries) by id
        self.by_id = {s.id: s for s in listed}
        #: source snapshot id -> the id of its copy in the target
        self.copies = copies
        #: per source location, its newest snapshot copied already (a summary)
        self.newest: dict[str, Snapshot] = {}
        for src_id in copies:
            if src_id in self.by_id:
                self._note(self.by_id[src_id])
        #: the pair copied (or learnt from) last, still whole: the next snapshot to copy most
        #: likely follows it
        self.last: tuple[Snapshot, Snapshot] | None = None

    def _note(self, snap: Snapshot) -> None:
        loc = snap.source.get("location", "")
        if loc not in self.newest or (self.newest[loc].time, self.newest[loc].id) < (snap.time, snap.id):
            self.newest[loc] = snap

    def pair(self, src_id: str) -> tuple[Snapshot, Snapshot] | None:
        """The source snapshot ``src_id`` and its copy, whole; None if either no longer reads
        (nothing is learnt from it: its chunks are translated the long way)."""
        if self.last is not None and self.last[0].id == src_id:
            return self.last
        try:
            return (
                self.src.load_snapshot(src_id, listed=True),
                self.dst.load_snapshot(self.copies[src_id], listed=True),
            )
        except (IntegrityError, SnapshotNotFoundError):
            return None

    def newest_pairs(self, first: Snapshot | None) -> Iterator[tuple[Snapshot, Snapshot]]:
        """The newest copied snapshot of each source location with its copy, one pair at a time:
        an index block a VM shares with another one (a clone of a template) is taken over.
        The pair ``first`` (the first snapshot to copy) follows comes last and is kept whole,
        so that it is not read again."""
        follows = self._follows(first) if first is not None else None
        snaps = sorted(self.newest.values(), key=lambda s: s.id == follows)
        for snap in snaps:
            pair = self.pair(snap.id)
            if pair is not None:
                self.last = pair
                yield pair

    def _follows(self, snap: Snapshot) -> str | None:
        """The id of the copied snapshot ``snap`` most likely follows: its parent, else its
        location's newest."""
        if snap.parent in self.copies and snap.parent in self.by_id:
            return snap.parent
        newest = self.newest.get(snap.source.get("location", ""))
        return newest.id if newest is not None else None

    def before(self, snap: Snapshot) -> tuple[Snapshot, Snapshot] | None:
        """The copied pair ``snap`` most likely follows: its parent's, else (or when that pair
        no longer reads) its location's newest."""
        follows = self._follows(snap)
        pair = self.pair(follows) if follows is not None else None
        newest = self.newest.get(snap.source.get("location", ""))
        if pair is None and newest is not None and newest.id != follows:
            pair = self.pair(newest.id)
        return pair

    def copied(self, src_snap: Snapshot, dst_snap: Snapshot) -> None:
        self.copies[src_snap.id] = dst_snap.id
        self._note(self.by_id.get(src_snap.id, src_snap))
        self.last = (src_snap, dst_snap)


def copy_snapshots(
    src_repo: Repository,
    dst_repo: Repository,
    *,
    filters: CopyFilter | None = None,
    progress: PhaseCallback | None = None,
    workers: int | None = None,
    index_every: int = 4,
) -> CopyReport:
    """Copy the snapshots ``filters`` selects from ``src_repo`` to ``dst_repo``; see the module
    docstring. Returns what was copied, skipped, read and uploaded. ``workers``: ranged reads
    of the source at once (None: as many as it serves best, ``Backend.prepare_reads``)."""
    if workers is not None and workers < 1:
        raise ValueError("workers must be at least 1")
    started = dt.datetime.now(dt.UTC)
    filters = filters or CopyFilter()
    if src_repo.config.id == dst_repo.config.id:
        raise RepositoryError("the source and the target are the same repository")
    if src_repo.config.chunk_size != dst_repo.config.chunk_size:
        raise RepositoryError(
            f"cannot copy: the source repository cuts {src_repo.config.chunk_size}-byte chunks and the "
            f"target {dst_repo.config.chunk_size}-byte chunks; copies need the same chunk size to "
            f"deduplicate (create the target with `vmvault init --chunk-size {src_repo.config.chunk_size}`)"
        )
    report = CopyReport(source=src_repo.backend.url, target=dst_repo.backend.url)
    with (
        src_repo.lock(exclusive=False, operation="copy (source)"),
        dst_repo.lock(exclusive=False, operation="copy"),
    ):
        # a prune may have run since the repositories were opened; the target's writer never
        # deduplicates against a pack it has not confirmed present (repository-format.md, 12.4)
        src_repo.load_index()
        dst_repo.load_index()
        listed = src_repo.list_snapshots(summaries=True)
        chosen = select_snapshots(listed, filters)
        copies: dict[str, str] = {}  # source snapshot id -> the id of its copy in the target
        for t in dst_repo.list_snapshots(summaries=True):
            origin = _origin(t)
            if origin is not None:
                copies.setdefault(origin[1], t.id)
        if not any(s.id not in copies for s in chosen):
            report.skipped = [s.id for s in chosen]
            if progress is not None:
                progress("copy", len(chosen), len(chosen))
            report.seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
            return report
        writer = dst_repo.writer(index_every=index_every)
        workers = workers or src_repo.backend.prepare_reads()
        # index blocks are read from both repositories: as many at once as the farther serves best
        block_reads = max(workers, dst_repo.backend.prepare_reads())
        earlier = _Earlier(src_repo, dst_repo, listed, copies)
        ok = False
        try:
            with (
                dst_repo.index.synced_cache().scratch() as scratch,
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmvault-copy") as pool,
                ThreadPoolExecutor(max_workers=block_reads, thread_name_prefix="vmvault-copy-blocks") as reads,
            ):
                translator = _Translator(src_repo, dst_repo, writer, report, workers, scratch, 2 * block_reads)
                first = next((s for s in chosen if s.id not in copies), None)
                for pair in earlier.newest_pairs(first):
                    translator.learn_blocks(*pair)
                for n, listed_snap in enumerate(chosen):
                    if progress is not None:
                        progress("copy", n, len(chosen))
                    if listed_snap.id in copies:
                        report.skipped.append(listed_snap.id)
                        continue
                    translator.follow(earlier.before(listed_snap))
                    snap = src_repo.load_snapshot(listed_snap.id, listed=True)
                    what = f"snapshot {snap.short_id}"
                    tick = functools.partial(progress, "copy", n, len(chosen)) if progress is not None else None
                    disks = [translator.disk(d, what, pool, reads, tick) for d in snap.disks]
                    files = [translator.file(f, what, pool) for f in snap.files]
                    # every blob the new snapshot names must be durable before the snapshot is
                    writer.flush()
                    parent = copies.get(snap.parent) if snap.parent else None
                    extra = dict(snap.extra)
                    extra[COPIED_FROM] = {"repository": src_repo.config.id, "snapshot": snap.id}
                    new = Snapshot(
                        time=snap.time,
                        hostname=snap.hostname,
                        username=snap.username,
                        source=dict(snap.source),
                        tags=list(snap.tags),
                        parent=parent,
                        vm=dict(snap.vm),
                        consistency=snap.consistency,
                        warnings=list(snap.warnings),
                        disks=disks,
                        files=files,
                        extra=extra,
                        stats=dict(snap.stats),
                        program=snap.program,
                    )
                    warned = len(dst_repo.warnings)
                    dst_repo.save_snapshot(new)
                    for w in dst_repo.warnings[warned:]:  # stored, but its read-back failed
                        log.warning("%s", w)
                    earlier.copied(snap, new)
                    report.copied.append(CopiedSnapshot(snap.id, new.id, snap.source.get("location", ""), snap.time))
                if progress is not None:
                    progress("copy", len(chosen), len(chosen))
            writer.flush()
            ok = True
        finally:
            # failed or interrupted: still index the packs already uploaded, so they are reused
            writer.close(flush=ok)
            report.blobs_added = writer.new_blobs
            report.bytes_added = writer.new_bytes
            report.packs_added = writer.packs_written
            report.seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return report

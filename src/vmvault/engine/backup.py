"""Backup: read a source's frozen view and store it as one snapshot.

Disks are cut into fixed-size chunks aligned to the virtual offset. Unallocated and all-zero
chunks are recorded as ZERO_ID and never stored (nor hashed twice). With change tracking
(``SourceDisk.changed``) and a compatible parent snapshot, only chunks that overlap a
changed range are read; every index block without a changed chunk keeps the parent's
block id without its disk range being read (the block itself is read from the repository,
to check that every chunk it names is still stored).

Pipeline: the calling thread plans the work in disk order and submits batches of adjacent
chunks (<= ``BATCH_BYTES``) to a thread pool; workers read (``os.pread`` releases the GIL),
hash (HMAC-SHA-256), compress and encrypt; the calling thread places the sealed chunks in
disk order (a pack holds neighbouring chunks side by side, so restores and readers fetch them
in long runs), and the BlobWriter uploads in its own threads. At most ``2 * workers + 2``
batches are in flight, sealed or not, and one byte budget (``pipeline_budget``) bounds what the
pipeline holds whatever the timing and the disk size: every batch in flight holds twice its
bytes (the data read and its sealed chunks) until its chunks are placed, which hands their
sealed bytes to the BlobWriter; the writer holds the pack being filled and, for each pack being
written, the pack and the copy it is joined into. Runs of empty index blocks are planned as one step each: an empty
disk costs one snapshot entry per index block (8 bytes per GiB at 256 KiB chunks), nothing
per chunk.

Nothing is deduplicated against data that is gone (repository-format.md, sections 10.2 and
12.4): after the lock is taken, this host's index cache is synced, and a chunk counts as
stored only in a pack this backup uploaded or has confirmed present (one small read per
pack, ``RepoIndex.has_present``; a worker asks about its batch of chunks at once,
``present_of``). Before the connector is asked for changes, the parent's index blocks an
incremental may reuse are read and every chunk they name is looked up: when
one's pack is gone, or an index file is unreadable, or the previous snapshot was cut by
``repair snapshots``, change tracking is not trusted and every allocated byte is read; the
ranges of blocks naming chunks the index no longer holds are read again.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import os
import random
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmvault import platform
from vmvault.disk.base import DiskImage, Extent, ExtentKind, coalesce
from vmvault.errors import CleanupError, ConfigError, IntegrityError, SourceError
from vmvault.hypervisors.base import (
    CONNECTOR_OPTIONS,
    DEFAULT_OPTIONS,
    TRACKING_SAMPLE,
    BackupOptions,
    BackupSession,
    PreviousBackup,
    Source,
    SourceDisk,
    SourceFile,
)
from vmvault.hypervisors.registry import check_options, connector_for_kind
from vmvault.repo.budget import MemoryBudget
from vmvault.repo.format import (
    INDEX_SPAN,
    MAX_INDEX_BLOCKS,
    PARENT_ID,
    ZERO_ID,
    BlobType,
    IndexBlockBuilder,
    block_length,
)
from vmvault.repo.repository import BlobWriter, Repository, SealedBlob, snapshot_metadata
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

from .progress import NullReporter, ProgressReporter

__all__ = [
    "BATCHES_BUDGET",
    "BATCH_BYTES",
    "TRACKING_SAMPLE",
    "BackupPlan",
    "BackupResult",
    "backup",
    "chunk_runs",
    "pipeline_budget",
    "plan_backup",
]

#: one worker task reads at most this much
BATCH_BYTES = 4 * 1024 * 1024
#: the pipeline's budget for read batches and sealed chunks waiting for their turn, beside its
#: packs (``pipeline_budget``): 8 batches in flight when no pack is being written, enough for
#: 8 workers
BATCHES_BUDGET = 64 * 1024 * 1024

_KIND_ZERO, _KIND_PARENT, _KIND_DATA = "zero", "parent", "data"
#: plan runs kept in memory after the first walk of a disk's map (about 100 bytes each)
_KEEP_RUNS = 100_000


@dataclass
class BackupResult:
    snapshot: Snapshot
    bytes_read: int = 0
    bytes_new: int = 0  # stored (compressed, encrypted) bytes added to the repository
    raw_new: int = 0  # plaintext bytes of the new chunks
    chunks_new: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    #: stored names of the disks and files left out by ``BackupOptions.exclude``
    excluded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot.id,
            "source": self.snapshot.source,
            "consistency": self.snapshot.consistency,
            "bytes_read": self.bytes_read,
            "bytes_added": self.bytes_new,
            "raw_bytes_added": self.raw_new,
            "chunks_added": self.chunks_new,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "excluded": self.excluded,
            "disks": [
                {"name": d.name, "size": d.size, "format": d.format, "layer": d.layer, **d.stats}
                for d in self.snapshot.disks
            ],
        }


def pipeline_budget(pack_size: int) -> int:
    """The bytes a backup's pipeline may hold at once with packs of ``pack_size``: the batches'
    share, the pack being filled, and one pack being written with the copy it is joined into
    (a second upload starts when the batches hold less than their share)."""
    return BATCHES_BUDGET + 3 * pack_size


def chunk_runs(extents: Iterable[Extent], size: int, chunk_size: int) -> Iterator[tuple[int, int, str]]:
    """``(first_chunk, end_chunk, kind)`` runs covering every chunk of the disk, in order.

    A chunk is ``zero`` when every byte of it is ZERO, ``parent`` when every byte defers to the
    parent, and ``data`` otherwise (any stored byte, or a mix of zero and parent).
    """
    n_chunks = -(-size // chunk_size)
    kind_of = {ExtentKind.ZERO: _KIND_ZERO, ExtentKind.PARENT: _KIND_PARENT, ExtentKind.DATA: _KIND_DATA}

    def raw_runs() -> Iterator[tuple[int, int, str]]:
        pending_chunk, pending_kind = -1, ""
        covered = 0  # chunks before this are emitted
        for ext in coalesce(extents):
            if ext.offset >= size:
                break
            end = min(ext.end, size)
            first, last = ext.offset // chunk_size, (end - 1) // chunk_size
            kind = kind_of[ext.kind]
            if first == pending_chunk:
                pending_kind = pending_kind if pending_kind == kind else _KIND_DATA
                if last == first:
                    continue
                yield pending_chunk, pending_chunk + 1, pending_kind
                first += 1
            elif pending_chunk >= 0:
                yield pending_chunk, pending_chunk + 1, pending_kind
                if first > pending_chunk + 1:  # a gap in the map reads as zeros
                    yield pending_chunk + 1, first, _KIND_ZERO
            elif first > covered:
                yield covered, first, _KIND_ZERO
            if last > first:
                yield first, last, kind
            pending_chunk, pending_kind = last, kind
            covered = last + 1
        if pending_chunk >= 0:
            yield pending_chunk, pending_chunk + 1, pending_kind
        if covered < n_chunks:
            yield covered, n_chunks, _KIND_ZERO

    run: tuple[int, int, str] | None = None
    for r in raw_runs():
        if run is not None and run[2] == r[2] and run[1] == r[0]:
            run = (run[0], r[1], r[2])
            continue
        if run is not None:
            yield run
        run = r
    if run is not None:
        yield run


def _changed_chunks(changed: list[tuple[int, int]], size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Changed byte ranges as sorted, merged chunk ranges ``[first, end)``."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(changed):
        if length <= 0 or off >= size:
            continue
        first, end = off // chunk_size, (min(off + length, size) - 1) // chunk_size + 1
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return out


def _blocks_touched(runs: Iterable[tuple[int, int, str]], span: int) -> Iterator[int]:
    """The index blocks that ordered chunk ``runs`` fall into, in order, each once."""
    last = -1
    for first, end, _kind in runs:
        for block in range(max(first // span, last + 1), (end - 1) // span + 1):
            yield block
            last = block


class _ReadAhead:
    """Index blocks of the parent that an incremental changes, read in ``pool`` up to
    ``window`` blocks ahead of the one being built: one after another, each cost the main
    thread a round trip to the repository (2,048 of them for a 2 TiB disk changed all over,
    a minute from a store 30 ms away). Memory: ``window`` blocks (128 KiB each at most)."""

    def __init__(
        self, blocks: Iterator[int], read: Callable[[int], IndexBlockBuilder], pool: ThreadPoolExecutor, window: int
    ) -> None:
        self._blocks = blocks
        self._read = read
        self._pool = pool
        self._window = window
        self._ahead: collections.OrderedDict[int, Future[IndexBlockBuilder]] = collections.OrderedDict()

    def get(self, block: int) -> IndexBlockBuilder:
        """Block ``block``'s entries, read ahead if it was planned (else read now)."""
        while self._ahead and next(iter(self._ahead)) < block:
            self._ahead.popitem(last=False)[1].cancel()  # (planned, not asked for: not expected)
        while len(self._ahead) < self._window:
            upcoming = next(self._blocks, None)
            if upcoming is None:
                break
            if upcoming >= block:
                self._ahead[upcoming] = self._pool.submit(self._read, upcoming)
        planned = self._ahead.pop(block, None)
        return planned.result() if planned is not None else self._read(block)

    def cancel(self) -> None:
        """Drop the reads not started yet."""
        for planned in self._ahead.values():
            planned.cancel()
        self._ahead.clear()


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, end in sorted(ranges):
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return out


def _subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of sorted, merged ``ranges`` outside sorted, merged ``cut``."""
    out: list[tuple[int, int]] = []
    j = 0
    for first, end in ranges:
        pos = first
        while j < len(cut) and cut[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(cut) and cut[k][0] < end:
            if cut[k][0] > pos:
                out.append((pos, cut[k][0]))
            pos = max(pos, cut[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def _intersect(ranges: list[tuple[int, int]], runs: Iterable[tuple[int, int, str]]) -> Iterator[tuple[int, int, str]]:
    """The parts of ordered chunk ``runs`` that fall inside the ordered chunk ``ranges``."""
    i = 0
    for first, end, kind in runs:
        while i < len(ranges) and ranges[i][1] <= first:
            i += 1
        j = i
        while j < len(ranges) and ranges[j][0] < end:
            lo, hi = max(first, ranges[j][0]), min(end, ranges[j][1])
            if lo < hi:
                yield lo, hi, kind
            j += 1


def _layer_map(image: DiskImage) -> list[list[int]]:
    """A layer's own extents as ``[offset, length, kind]`` (1 = data, 0 = explicit zeros)."""
    return [
        [e.offset, e.length, 1 if e.kind is ExtentKind.DATA else 0]
        for e in coalesce(image.extents())
        if e.kind is not ExtentKind.PARENT
    ]


class _DiskBackup:
    """Backs up one disk; run in the calling thread, fans work out to ``pool``."""

    def __init__(
        self,
        repo: Repository,
        writer: BlobWriter,
        pool: ThreadPoolExecutor,
        disk: SourceDisk,
        parent: DiskRecord | None,
        progress: ProgressReporter,
        max_in_flight: int,
        tracking_sample: int = 0,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.repo = repo
        self.writer = writer
        self.pool = pool
        self.disk = disk
        self.image = disk.image
        self.size = disk.image.size
        self.chunk_size = repo.config.chunk_size
        self.parent = parent
        self.progress = progress
        self.max_in_flight = max_in_flight
        self.budget = budget if budget is not None else MemoryBudget(pipeline_budget(repo.config.pack_size))
        self.zero_chunk = bytes(self.chunk_size)
        self.bytes_read = 0
        self.data_chunks = 0
        self.zero_chunks = 0
        self.tracking_sample = tracking_sample
        #: why the change tracking was found wrong (then the disk was read whole)
        self.tracking_failed: str | None = None
        self.tracking_checked = 0
        self.warnings: list[str] = []
        #: parent index blocks that cannot be reused (their ranges are read again)
        self.broken: set[int] = set()
        #: the same, found before the session was opened (None: not looked at)
        self.broken_known: set[int] | None = None

    # -- work unit ------------------------------------------------------------------------

    def _read_batch(self, first: int, count: int) -> tuple[list[bytes], list[SealedBlob]]:
        """Read, hash and seal a batch of chunks in a worker: their ids and the new blobs, which
        the calling thread places in disk order (``drain_one``)."""
        cs = self.chunk_size
        offset = first * cs
        length = min(count * cs, self.size - offset)
        data = self.image.read(offset, length)
        self.image.read_done(offset, length)
        if len(data) != length:
            raise SourceError(
                f"{self.disk.name}: read {len(data)} of {length} bytes at offset {offset:#x} "
                "(the disk changed size during the backup?)"
            )
        ids = []
        chunks: list[tuple[bytes, memoryview]] = []
        # chunks are views into the batch: a slice copies each chunk into fresh memory, and on
        # a VM faulting fresh pages in costs ~1 ms/MiB (micro-benchmark), as much as hashing
        view = memoryview(data)
        chunk_id_of = self.repo.key.chunk_id
        for i in range(0, length, cs):
            n = min(cs, length - i)
            # bytes.startswith is a memcmp; comparing memoryviews is 100x slower
            if data.startswith(self.zero_chunk if n == cs else bytes(n), i):
                ids.append(ZERO_ID)
                continue
            raw = view[i : i + n]
            chunk_id = chunk_id_of(raw)
            chunks.append((chunk_id, raw))
            ids.append(chunk_id)
        # the index is asked about the whole batch at once, then the new chunks are sealed
        return ids, self.writer.seal_new(BlobType.DATA, chunks) if chunks else []

    # -- planning -------------------------------------------------------------------------

    def _plan_full(self) -> Iterator[tuple[int, int, str]]:
        extents = self.image.extents() if self.disk.layer else self.image.merged_extents()
        return chunk_runs(extents, self.size, self.chunk_size)

    def _plan_with_total(self) -> tuple[int, Iterator[tuple[int, int, str]]]:
        """The bytes to read (for progress) and the runs. The runs are kept from the first walk
        of the image's map when there are few; a fragmented image's map is walked twice rather
        than held in memory."""
        cs = self.chunk_size
        todo = 0
        kept: list[tuple[int, int, str]] | None = []
        for first, end, kind in self._plan_full():
            if kind == _KIND_DATA:
                todo += min(end * cs, self.size) - first * cs
            if kept is not None:
                kept.append((first, end, kind))
                if len(kept) > _KEEP_RUNS:
                    kept = None
        return todo, iter(kept) if kept is not None else self._plan_full()

    def run(self) -> DiskRecord:
        cs, span = self.chunk_size, INDEX_SPAN
        n_chunks = -(-self.size // cs)
        n_blocks = -(-n_chunks // span)
        if n_blocks > MAX_INDEX_BLOCKS:
            raise SourceError(
                f"{self.disk.name}: a virtual size of {self.size} bytes needs {n_blocks} index blocks; vmvault stores "
                f"disks of up to {MAX_INDEX_BLOCKS * span * cs} bytes at this repository's chunk size"
            )
        incremental = (
            self.disk.changed is not None
            and self.parent is not None
            and self.parent.size == self.size
            and self.parent.chunk_size == cs
            and self.parent.index_span == span
            and len(self.parent.index) == n_blocks
            and self.parent.layer == self.disk.layer
            and (not self.disk.layer or self.parent.parent == self.disk.parent_name)
        )
        if incremental and self.tracking_sample > 0 and not self.disk.layer:
            assert self.disk.changed is not None
            self.tracking_failed = self._check_tracking(_changed_chunks(self.disk.changed, self.size, cs))
            if self.tracking_failed is not None:
                self.warnings.append(self.tracking_failed)
                incremental = False
        runs: Iterator[tuple[int, int, str]]
        parent_blocks: _ReadAhead | None = None
        if incremental:
            assert self.disk.changed is not None
            dirty = _changed_chunks(self.disk.changed, self.size, cs)
            parent = self.parent
            assert parent is not None
            broken = sorted(
                self.broken_known
                if self.broken_known is not None
                else _broken_blocks(self.repo, parent, self.pool, self.max_in_flight)
            )
            self.broken = set(broken)
            healed: list[tuple[int, int]] = []
            if broken:
                self.warnings.append(
                    f"{self.disk.name}: {len(broken)} index blocks of the previous snapshot name data that is no "
                    "longer in the repository; their ranges are read again"
                )
                healed = _merge_ranges([(b * span, min((b + 1) * span, n_chunks)) for b in broken])
            if self.disk.layer:
                # a changed chunk of a layer may now store data, explicit zeros, or defer to the
                # parent: classify it from the layer's own map (metadata only, nothing is read)
                dirty_runs = list(_intersect(_merge_ranges(dirty + healed), self._plan_full()))
            else:
                # changed ranges are read as they are; a broken block's range is read where the
                # disk's map says it holds data (its holes are zeros without reading)
                dirty_runs = [(f, e, _KIND_DATA) for f, e in _subtract(dirty, healed)]
                if healed:
                    dirty_runs = sorted(dirty_runs + list(_intersect(healed, self._plan_full())))
            todo_bytes = sum(min(e * cs, self.size) - f * cs for f, e, k in dirty_runs if k == _KIND_DATA)
            runs = iter(dirty_runs)
            parent_blocks = _ReadAhead(
                _blocks_touched(dirty_runs, span),
                lambda b: self._parent_entries(b, min((b + 1) * span, n_chunks) - b * span),
                self.pool,
                self.max_in_flight,
            )
        else:
            todo_bytes, runs = self._plan_with_total()
        self.progress.start(self.disk.name, todo_bytes)

        index_ids: list[str | None] = []
        # FIFO of work in disk order: ("batch", future, block, position, nbytes), ("block", block)
        # (store a finished index block), ("reuse", first, end) (keep the parent's blocks) or
        # ("empty", count) (blocks with no data at all)
        fifo: collections.deque[tuple[Any, ...]] = collections.deque()
        in_flight = 0

        def drain_one() -> None:
            nonlocal in_flight
            item = fifo.popleft()
            if item[0] == "block":
                index_ids.append(self.writer.add_index_block(item[1].build()))
                return
            if item[0] == "reuse":
                assert self.parent is not None
                index_ids.extend(self.parent.index[item[1] : item[2]])
                return
            if item[0] == "empty":
                index_ids.extend([None] * item[1])
                return
            _tag, fut, entries, pos, nbytes = item
            ids, sealed = fut.result()
            # the batch's data is gone; its sealed chunks' bytes are handed to the writer
            budget.give(2 * nbytes - sum(blob.size for blob in sealed))
            for blob in sealed:
                self.writer.place(blob, charged=True)
            entries.set(pos, ids)
            in_flight -= 1
            self.bytes_read += nbytes
            self.progress.advance(nbytes)

        budget = self.budget
        # kept free when a batch is submitted: the writer may close a pack while the batches are
        # placed (its joined copy) and a pack may pass its size by a chunk
        room = self.repo.config.pack_size + cs
        try:
            run = next(runs, None)
            block = 0
            while block < n_blocks:
                b_first, b_end = block * span, min((block + 1) * span, n_chunks)
                # skip ahead past runs that end before this block
                while run is not None and run[1] <= b_first:
                    run = next(runs, None)
                block_touched = run is not None and run[0] < b_end
                if incremental and not block_touched:
                    # every block up to the one the next run starts in keeps the parent's id
                    stop = n_blocks if run is None else run[0] // span
                    fifo.append(("reuse", block, stop))
                    block = stop
                    continue
                if not incremental and (
                    run is None or (run[2] == _KIND_ZERO and run[0] <= b_first and run[1] >= b_end)
                ):
                    # blocks wholly inside a zero run: no entries are built, one FIFO item for the run
                    stop = n_blocks if run is None or run[1] >= n_chunks else run[1] // span
                    fifo.append(("empty", stop - block))
                    block = stop
                    continue
                # (an incremental changes its parent's block, read ahead; a full backup builds one)
                entries = parent_blocks.get(block) if parent_blocks is not None else IndexBlockBuilder(b_end - b_first)
                while run is not None and run[0] < b_end:
                    first, end, kind = max(run[0], b_first), min(run[1], b_end), run[2]
                    if kind == _KIND_PARENT:
                        entries.fill(first - b_first, end - b_first, PARENT_ID)
                    elif kind == _KIND_ZERO:
                        # (a no-op on a fresh block; in an incremental it replaces the parent's entry)
                        entries.fill(first - b_first, end - b_first, ZERO_ID)
                    elif kind == _KIND_DATA:
                        per_batch = max(1, BATCH_BYTES // cs)
                        for f in range(first, end, per_batch):
                            count = min(per_batch, end - f)
                            nbytes = min(count * cs, self.size - f * cs)
                            while in_flight and (in_flight >= self.max_in_flight or not budget.fits(2 * nbytes + room)):
                                drain_one()
                            # with nothing in flight, what is held is the writer's: wait for its uploads
                            budget.take(2 * nbytes, room=room)
                            fut: Future[tuple[list[bytes], list[SealedBlob]]] = self.pool.submit(
                                self._read_batch, f, count
                            )
                            fifo.append(("batch", fut, entries, f - b_first, nbytes))
                            in_flight += 1
                            # place what is finished at the head now: sealed batches wait for
                            # their turn in memory, so keep that queue short
                            while fifo and (fifo[0][0] != "batch" or fifo[0][1].done()):
                                drain_one()
                    if run[1] <= b_end:
                        run = next(runs, None)
                    else:
                        break
                fifo.append(("block", entries))
                block += 1
            while fifo:
                drain_one()
        finally:
            if parent_blocks is not None:
                parent_blocks.cancel()  # a failed backup reads no more of them
        self.progress.finish()
        for w in self.warnings:
            self.progress.warn(w)

        record = DiskRecord(
            name=self.disk.name,
            format=self.disk.format,
            size=self.size,
            chunk_size=cs,
            index_span=span,
            index=index_ids,
            layer=self.disk.layer,
            parent=self.disk.parent_name,
            layer_map=_layer_map(self.image) if self.disk.layer else None,
            # tracking found wrong: record none, so the next backup reads the disk whole too
            cbt=None if self.tracking_failed else self.disk.cbt,
            meta=self.disk.meta,
            stats={"bytes_read": self.bytes_read, "incremental": int(incremental)},
        )
        if self.tracking_checked:
            record.stats["tracking_checked"] = self.tracking_checked
        return record

    def _check_tracking(self, dirty: list[tuple[int, int]]) -> str | None:
        """Re-read up to ``tracking_sample`` chunks the change tracking calls unchanged and
        compare them with the parent snapshot; the reason when one differs, else None."""
        assert self.parent is not None
        cs, span = self.chunk_size, INDEX_SPAN
        n_chunks = -(-self.size // cs)
        clean = n_chunks - sum(e - f for f, e in dirty)
        if clean <= 0:
            return None
        rng = random.SystemRandom()
        picks: set[int] = set()
        for _ in range(self.tracking_sample * 16):
            if len(picks) >= min(self.tracking_sample, clean):
                break
            idx = rng.randrange(n_chunks)
            if not any(f <= idx < e for f, e in dirty):
                picks.add(idx)
        blocks: dict[int, IndexBlockBuilder] = {}
        for idx in sorted(picks):
            block = idx // span
            if block not in blocks:
                blocks[block] = self._parent_entries(block, min(span, n_chunks - block * span))
            expected = blocks[block][idx % span]
            if expected == PARENT_ID:
                continue
            length = min(cs, self.size - idx * cs)
            data = self.image.read(idx * cs, length)
            self.bytes_read += len(data)
            self.tracking_checked += 1
            got = ZERO_ID if data == bytes(length) else self.repo.key.chunk_id(data)
            if got != expected:
                return (
                    f"{self.disk.name}: the change tracking is wrong: the chunk at offset {idx * cs:#x} changed "
                    "although it was not reported as changed; the disk was read whole, and so will it be next time"
                )
        return None

    def _parent_entries(self, block: int, count: int) -> IndexBlockBuilder:
        """The parent's index block ``block``, to change where the disk changed."""
        assert self.parent is not None
        block_id = self.parent.index[block]
        if block_id is None or block in self.broken:
            # a broken block's whole range is read again: every entry is replaced
            return IndexBlockBuilder(count)
        what = f"index block {block} of disk {self.disk.name} in the parent snapshot"
        return IndexBlockBuilder.from_block(self.repo.read_index_block(block_id, count=count, what=what, kept=True))


def _store_file(repo: Repository, writer: BlobWriter, f: SourceFile, owners: dict[str, list[int]]) -> FileRecord | None:
    cs = repo.config.chunk_size
    chunks: list[str] = []
    size = 0
    opened = f.open()
    if opened is None:  # gone or replaced since the scan; the connector warned
        return None
    with opened as fh:
        st = os.fstat(fh.fileno())
        while True:
            piece = fh.read(cs)
            if not piece:
                break
            size += len(piece)
            chunk_id = repo.key.chunk_id(piece)
            writer.add(BlobType.DATA, chunk_id, piece)
            chunks.append(chunk_id.hex())
    mode = stat.S_IMODE(st.st_mode) if f.mode is None else f.mode
    owners[f.name] = [st.st_uid, st.st_gid]
    return FileRecord(name=f.name, size=size, mode=mode, mtime_ns=f.mtime_ns, chunks=chunks)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def _exclude(session: BackupSession, patterns: tuple[str, ...]) -> list[str]:
    """Drop the disks and files ``patterns`` name from ``session``; their names, sorted.

    A disk is left out with every layer above it. A pattern that names a checkpoint layer
    but not its base disk is refused: the restored disk would silently lack the newest
    data, which is in the layers.
    """
    if not patterns:
        return []
    by_name = {d.name: d for d in session.disks}

    def base(disk: SourceDisk) -> SourceDisk:
        seen = {disk.name}
        while disk.layer and disk.parent_name in by_name and disk.parent_name not in seen:
            disk = by_name[disk.parent_name]
            seen.add(disk.name)
        return disk

    dropped: list[str] = []
    kept: list[SourceDisk] = []
    for disk in session.disks:
        root = base(disk)
        if _matches(root.name, patterns):
            dropped.append(disk.name)
            continue
        if _matches(disk.name, patterns):
            raise ConfigError(
                f"exclude: {disk.name} is a checkpoint layer of {root.name}; exclude the whole disk "
                f"(a pattern matching {root.name}), not one layer of it"
            )
        kept.append(disk)
    files = [f for f in session.files if not _matches(f.name, patterns)]
    dropped += [f.name for f in session.files if _matches(f.name, patterns)]
    if (session.disks or session.files) and not kept and not files:
        raise ConfigError(f"exclude: the patterns {', '.join(patterns)} leave nothing to back up")
    session.disks, session.files = kept, files
    return sorted(dropped)


@dataclass
class BackupPlan:
    """What ``backup`` would do, found without reading data or writing anything
    (``vmvault backup --dry-run``)."""

    location: str
    kind: str
    #: the snapshot the backup would be incremental against
    parent: str | None = None
    #: False for a live source: listing its disks needs a checkpoint, which a dry run never takes
    listed: bool = False
    #: ``{"name", "format", "size", "allocated", "layer"}`` per disk
    disks: list[dict[str, Any]] = field(default_factory=list)
    #: ``{"name", "size"}`` per file
    files: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": {"kind": self.kind, "location": self.location},
            "parent": self.parent,
            "listed": self.listed,
            "disks": self.disks,
            "files": self.files,
            "excluded": self.excluded,
            "warnings": self.warnings,
        }


def plan_backup(repo: Repository | None, source: Source, options: BackupOptions = DEFAULT_OPTIONS) -> BackupPlan:
    """What backing up ``source`` would store, without reading data: disks with their virtual
    and allocated sizes, files, what ``exclude`` leaves out, and the previous snapshot. Only
    connectors whose sessions change nothing on the source (``Connector.offline``) are opened."""
    connector = connector_for_kind(source.kind)
    if connector is not None:
        check_options(connector, options, source.location)
    prev = _previous(repo, source.location) if repo is not None else None
    plan = BackupPlan(location=source.location, kind=source.kind, parent=prev.id if prev is not None else None)
    if connector is None or not connector.offline:
        return plan
    session = source.open_session(None, options)
    try:
        plan.excluded = _exclude(session, options.exclude)
        plan.warnings = list(session.warnings)
        for disk in session.disks:
            allocated = sum(e.length for e in disk.image.extents() if e.kind is ExtentKind.DATA)
            plan.disks.append(
                {
                    "name": disk.name,
                    "format": disk.format,
                    "size": disk.image.size,
                    "allocated": allocated,
                    "layer": disk.layer,
                }
            )
        plan.files = [{"name": f.name, "size": f.size} for f in session.files]
        plan.listed = True
    finally:
        session.close()
    return plan


def _previous(repo: Repository, location: str) -> Snapshot | None:
    """The newest snapshot of ``location``, whole (the others listed as summaries: a
    repository of many snapshots costs a few KiB each, not their index block ids)."""
    snaps = [s for s in repo.list_snapshots(summaries=True) if s.source.get("location") == location]
    return repo.load_snapshot(snaps[-1].id, listed=True) if snaps else None


def backup(
    repo: Repository,
    source: Source,
    options: BackupOptions = DEFAULT_OPTIONS,
    *,
    tags: Iterable[str] = (),
    progress: ProgressReporter | None = None,
    workers: int | None = None,
    hostname: str | None = None,
) -> BackupResult:
    """Back up ``source`` into ``repo`` under a shared lock; returns the new snapshot.

    ``hostname`` is recorded instead of this host's name (``backup --host``). When the
    snapshot is stored but the source's cleanup (``BackupSession.complete`` / ``close``)
    fails, a CleanupError names the snapshot and what was left on the source; its
    ``result`` is the BackupResult.

    ``options`` go to the connector's session (``Source.open_session``); the engine itself
    applies ``full`` (change tracking ignored: every allocated byte is read, dedup still
    applies) and ``exclude``. A connector-specific option the source's connector does not
    honour is a ConfigError before anything is opened.
    """
    connector = connector_for_kind(source.kind)
    if connector is not None:
        check_options(connector, options, source.location)
    elif options.given() & CONNECTOR_OPTIONS:
        raise ConfigError(f"{source.location}: no connector of kind {source.kind!r} takes connector options")
    full = options.full
    progress = progress or NullReporter()
    # twice the cores (at most 8): a worker waiting for its read leaves the core to one that
    # hashes or compresses; on 2 cores 4 workers beat 2 in 7 of 8 paired runs (docs/benchmarks.md)
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    started = time.monotonic()
    with _heap_kept(2 * pipeline_budget(repo.config.pack_size)), repo.lock(exclusive=False, operation="backup"):
        # dedup only against what exists now: a prune may have run since the index was loaded,
        # and no prune can start while this shared lock is held
        warned = len(repo.warnings)
        problems = repo.load_index()
        # what syncing this host's index cache had to say (a cache rebuilt, a temporary one)
        repo_warnings: list[str] = repo.warnings[warned:]
        if problems:
            repo_warnings.append(
                f"{len(problems)} index files are unreadable, so the blobs only they list are stored again; "
                "run `vmvault check`, then `vmvault repair index`"
            )
        prev_snap = _previous(repo, source.location)
        if prev_snap is not None and prev_snap.extra.get("repaired_from"):
            # its lost ranges read as zeros: change tracking since it would keep them so
            repo_warnings.append(
                f"the previous snapshot {prev_snap.short_id} was repaired (data it lost reads as zeros); "
                "every allocated byte is read"
            )
            full = True
        if problems:
            full = True
        broken: dict[str, set[int]] = {}
        tracked = [d for d in prev_snap.disks if d.cbt] if prev_snap is not None and not full else []
        if tracked:
            # ... and only against packs that are still there: every chunk the parent's blocks
            # name is looked up, and each pack holding one confirmed (section 12.4), with as
            # many reads at once as the storage serves best (eight from a server far away)
            reads = max(workers, repo.backend.prepare_reads())
            with ThreadPoolExecutor(max_workers=reads, thread_name_prefix="vmvault-parent") as pool:
                for d in tracked:
                    broken[d.name] = _broken_blocks(repo, d, pool, 2 * reads + 2)
        if repo.index.lost:
            repo_warnings.append(
                f"{repo.index.lost.describe()}: this backup stores again whatever of it the source still has, "
                "reading every allocated byte; run `vmvault check`, then `vmvault repair index` and "
                "`vmvault repair snapshots` for the older snapshots"
            )
            full = True
        for w in repo_warnings:
            progress.warn(w)
        previous = None
        if prev_snap is not None and (not full or source.formats_pinned):
            previous = PreviousBackup(
                prev_snap.id,
                {d.name: d.cbt for d in prev_snap.disks if d.cbt} if not full else {},
                formats={d.name: d.format for d in prev_snap.disks},
            )
        session = source.open_session(previous, options)
        seen = 0
        saved: BackupResult | None = None
        left: list[str] = []
        try:
            excluded = _exclude(session, options.exclude)
            lost_before = len(repo.index.lost.missing) + len(repo.index.lost.short)
            result = _backup_session(
                repo,
                source,
                session,
                prev_snap,
                tags,
                progress,
                workers,
                full,
                excluded,
                broken,
                options.tracking_sample,
                hostname=hostname,
            )
            result.warnings = repo_warnings + result.warnings
            seen = len(session.warnings)
            saved = result
            if len(repo.index.lost.missing) + len(repo.index.lost.short) > lost_before:
                # met while deduplicating: those chunks were stored again
                found = (
                    f"{repo.index.lost.describe()}: whatever of it this backup met was stored again; run "
                    "`vmvault check`, then `vmvault repair index` and `vmvault repair snapshots`"
                )
                progress.warn(found)
                result.warnings.append(found)
            session.complete(result.snapshot.id)
        except Exception as exc:
            if saved is None:
                raise
            # the snapshot is stored and complete: only the source's cleanup failed
            left.append(str(exc) or type(exc).__name__)
        finally:
            try:
                session.close()
            except Exception as exc:
                if saved is None:
                    raise
                left.append(str(exc) or type(exc).__name__)
        # what completing and closing the session warned about (after the snapshot was written)
        result.warnings += session.warnings[seen:]
    result.seconds = time.monotonic() - started
    if left:
        error = CleanupError(
            f"snapshot {result.snapshot.short_id} is saved and complete, but cleaning up on the source failed: "
            + "; ".join(left),
            snapshot_id=result.snapshot.id,
            left=left,
        )
        error.result = result
        raise error
    return result


@contextlib.contextmanager
def _heap_kept(nbytes: int) -> Iterator[None]:
    """Keep up to ``nbytes`` freed at the top of the heap while the backup runs, then what was kept.

    What the pipeline holds swings by up to its budget as batches and packs come and go; with
    glibc returning the heap's top once 32 MiB are free (``platform.KEPT_FREE``), the next
    batches faulted those pages in again, with the GIL held where Python allocates. Measured on
    the 4 GiB comparison image in 5 pairs: 47,000-54,000 minor page faults against
    122,000-292,000, peak RSS 137-164 MiB against 158-164; CPU and wall time the same within
    the runs' spread on a loaded machine. Only where the command line set glibc's thresholds
    (``platform.kept_free``), and back to what it set: a library caller's malloc is its own.
    """
    before = platform.kept_free()
    if before is None:
        yield
        return
    platform.keep_freed_memory(kept_free=max(before, nbytes))
    try:
        yield
    finally:
        platform.keep_freed_memory(kept_free=before)


def _broken_blocks(repo: Repository, parent: DiskRecord, pool: ThreadPoolExecutor, max_in_flight: int) -> set[int]:
    """Index blocks of ``parent`` that an incremental must not reuse: unreadable, or naming a
    chunk without a copy in a confirmed pack (the index repaired since, or the pack gone:
    ``repo.index.lost`` then says so). Read in ``pool``, a bounded window at a time."""

    def broken(block: int, block_id: str) -> bool:
        try:
            found = repo.read_index_block(block_id, count=block_length(parent, block), kept=True)
        except IntegrityError:
            # a block whose pack is gone is a loss (recorded in repo.index.lost: the whole disk
            # is read), not only a block to re-read
            with contextlib.suppress(ValueError):
                repo.index.has_present(bytes.fromhex(block_id))
            return True
        chunks = set(found.chunk_ids())
        return len(repo.index.present_of(chunks)) != len(chunks)

    out: set[int] = set()
    window: collections.deque[tuple[int, Future[bool]]] = collections.deque()
    for block, block_id in enumerate(parent.index):
        if block_id is None:
            continue
        if len(window) >= max_in_flight:
            b, fut = window.popleft()
            if fut.result():
                out.add(b)
        window.append((block, pool.submit(broken, block, block_id)))
    for b, fut in window:
        if fut.result():
            out.add(b)
    return out


def _backup_session(
    repo: Repository,
    source: Source,
    session: BackupSession,
    prev_snap: Snapshot | None,
    tags: Iterable[str],
    progress: ProgressReporter,
    workers: int,
    full: bool,
    excluded: list[str],
    broken: dict[str, set[int]],
    tracking_sample: int = 0,
    *,
    hostname: str | None = None,
) -> BackupResult:
    for w in session.warnings:
        progress.warn(w)
    parent_disks = {d.name: d for d in prev_snap.disks} if prev_snap is not None else {}
    budget = MemoryBudget(pipeline_budget(repo.config.pack_size))
    writer = repo.writer(budget=budget)
    records: list[DiskRecord] = []
    disk_warnings: list[str] = []
    files: list[FileRecord] = []
    file_owners: dict[str, list[int]] = {}
    bytes_read = 0
    ok = False
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmvault-chunk") as pool:
            for disk in session.disks:
                if full:
                    disk.changed = None
                job = _DiskBackup(
                    repo,
                    writer,
                    pool,
                    disk,
                    parent_disks.get(disk.name),
                    progress,
                    2 * workers + 2,
                    tracking_sample,
                    budget=budget,
                )
                job.broken_known = broken.get(disk.name)
                record = job.run()
                bytes_read += job.bytes_read
                records.append(record)
                disk_warnings.extend(job.warnings)
        for f in session.files:
            stored = _store_file(repo, writer, f, file_owners)
            if stored is not None:
                files.append(stored)
                bytes_read += stored.size
        session.before_snapshot()
        writer.flush()
        ok = True
    finally:
        writer.close(flush=False)
        if not ok:
            # packs already uploaded are indexed; the next backup reuses them
            pass
    meta = snapshot_metadata()
    snap = Snapshot(
        time=meta["time"],
        hostname=hostname or meta["hostname"],
        username=meta["username"],
        source={"kind": source.kind, "location": source.location},
        tags=sorted(set(tags)),
        parent=prev_snap.id if prev_snap is not None else None,
        vm=session.vm,
        consistency=session.consistency,
        warnings=list(session.warnings) + disk_warnings,
        disks=records,
        files=files,
        file_owners=file_owners,
        extra=session.extra,
        stats={
            "bytes_read": bytes_read,
            "bytes_added": writer.new_bytes,
            "raw_bytes_added": writer.new_raw_bytes,
            "chunks_added": writer.new_blobs,
            "packs_added": writer.packs_written,
        }
        | ({"excluded": excluded} if excluded else {}),
    )
    warned = len(repo.warnings)
    repo.save_snapshot(snap)
    return BackupResult(
        snapshot=snap,
        bytes_read=bytes_read,
        bytes_new=writer.new_bytes,
        raw_new=writer.new_raw_bytes,
        chunks_new=writer.new_blobs,
        warnings=list(session.warnings) + disk_warnings + repo.warnings[warned:],
        excluded=excluded,
    )

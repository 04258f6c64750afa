"""Backup: read a source's frozen view and store it as one snapshot.

Disks are cut into fixed-size chunks aligned to the virtual offset. Unallocated and all-zero
chunks are recorded as ZERO_ID and never stored (nor hashed twice). With change tracking
(``SourceDisk.changed``) and a compatible parent snapshot, only chunks that overlap a
changed range are read; every index block without a changed chunk keeps the parent's
block id without being read at all.

Pipeline: the calling thread plans the work in disk order and submits batches of adjacent
chunks (<= ``BATCH_BYTES``) to a thread pool; workers read (``os.pread`` releases the GIL),
hash (HMAC-SHA-256), compress and encrypt; the BlobWriter packs and uploads in its own
threads. At most ``2 * workers + 2`` batches are in flight, so memory stays bounded
whatever the disk size.
"""

from __future__ import annotations

import collections
import os
import stat
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmvault.disk.base import DiskImage, Extent, ExtentKind, coalesce
from vmvault.errors import SourceError, VmvaultError
from vmvault.hypervisors.base import BackupSession, PreviousBackup, Source, SourceDisk, SourceFile
from vmvault.repo._layout import ID_SIZE, PARENT_ID, ZERO_ID, BlobType
from vmvault.repo.repository import INDEX_SPAN, BlobWriter, Repository, snapshot_metadata
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

from .progress import NullProgress, Progress

__all__ = ["BATCH_BYTES", "BackupResult", "backup", "chunk_runs"]

#: one worker task reads at most this much
BATCH_BYTES = 4 * 1024 * 1024

_KIND_ZERO, _KIND_PARENT, _KIND_DATA = "zero", "parent", "data"


@dataclass
class BackupResult:
    snapshot: Snapshot
    bytes_read: int = 0
    bytes_new: int = 0  # stored (compressed, encrypted) bytes added to the repository
    raw_new: int = 0  # plaintext bytes of the new chunks
    chunks_new: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

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
            "disks": [
                {"name": d.name, "size": d.size, "format": d.format, "layer": d.layer, **d.stats}
                for d in self.snapshot.disks
            ],
        }


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
        progress: Progress,
        max_in_flight: int,
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
        self.zero_chunk = bytes(self.chunk_size)
        self.bytes_read = 0
        self.data_chunks = 0
        self.zero_chunks = 0

    # -- work unit ------------------------------------------------------------------------

    def _read_batch(self, first: int, count: int) -> list[bytes]:
        cs = self.chunk_size
        offset = first * cs
        length = min(count * cs, self.size - offset)
        data = self.image.read(offset, length)
        if len(data) != length:
            raise SourceError(
                f"{self.disk.name}: read {len(data)} of {length} bytes at offset {offset:#x} "
                "(the disk changed size during the backup?)"
            )
        ids = []
        # chunks are views into the batch: a slice copies each chunk into fresh memory, and on
        # a VM faulting fresh pages in costs ~1 ms/MiB (micro-benchmark), as much as hashing
        view = memoryview(data)
        for i in range(0, length, cs):
            n = min(cs, length - i)
            # bytes.startswith is a memcmp; comparing memoryviews is 100x slower
            if data.startswith(self.zero_chunk if n == cs else bytes(n), i):
                ids.append(ZERO_ID)
                continue
            raw = view[i : i + n]
            chunk_id = self.repo.key.chunk_id(raw)
            self.writer.add(BlobType.DATA, chunk_id, raw)
            ids.append(chunk_id)
        return ids

    # -- planning -------------------------------------------------------------------------

    def _plan_full(self) -> Iterator[tuple[int, int, str]]:
        extents = self.image.extents() if self.disk.layer else self.image.merged_extents()
        return chunk_runs(extents, self.size, self.chunk_size)

    def run(self) -> DiskRecord:
        cs, span = self.chunk_size, INDEX_SPAN
        n_chunks = -(-self.size // cs)
        n_blocks = -(-n_chunks // span)
        incremental = (
            self.disk.changed is not None
            and self.parent is not None
            and self.parent.size == self.size
            and self.parent.chunk_size == cs
            and self.parent.index_span == span
            and self.parent.layer == self.disk.layer
            and (not self.disk.layer or self.parent.parent == self.disk.parent_name)
        )
        runs: Iterator[tuple[int, int, str]]
        if incremental:
            assert self.disk.changed is not None
            dirty = _changed_chunks(self.disk.changed, self.size, cs)
            if self.disk.layer:
                # a changed chunk of a layer may now store data, explicit zeros, or defer to the
                # parent: classify it from the layer's own map (metadata only, nothing is read)
                dirty_runs = list(_intersect(dirty, self._plan_full()))
            else:
                dirty_runs = [(f, e, _KIND_DATA) for f, e in dirty]
            todo_bytes = sum(min(e * cs, self.size) - f * cs for f, e, k in dirty_runs if k == _KIND_DATA)
            runs = iter(dirty_runs)
        else:
            todo_bytes = sum(min(e * cs, self.size) - f * cs for f, e, k in self._plan_full() if k == _KIND_DATA)
            runs = self._plan_full()
        self.progress.start(self.disk.name, todo_bytes)

        index_ids: list[str | None] = []
        # FIFO of work in disk order: ("batch", future, entries, position, nbytes), ("block", entries)
        # (store a finished index block) or ("reuse", block_id) (keep the parent's block)
        fifo: collections.deque[tuple[Any, ...]] = collections.deque()
        in_flight = 0

        def drain_one() -> None:
            nonlocal in_flight
            item = fifo.popleft()
            if item[0] == "block":
                index_ids.append(self._store_index_block(item[1]))
                return
            if item[0] == "reuse":
                index_ids.append(item[1])
                return
            _tag, fut, entries, pos, nbytes = item
            ids = fut.result()
            entries[pos : pos + len(ids)] = ids
            in_flight -= 1
            self.bytes_read += nbytes
            self.progress.advance(nbytes)

        run = next(runs, None)
        for block in range(n_blocks):
            b_first, b_end = block * span, min((block + 1) * span, n_chunks)
            # skip ahead past runs that end before this block
            while run is not None and run[1] <= b_first:
                run = next(runs, None)
            block_touched = run is not None and run[0] < b_end
            if incremental and not block_touched:
                assert self.parent is not None
                fifo.append(("reuse", self.parent.index[block]))
                continue
            if incremental:
                assert self.parent is not None
                entries = self._parent_entries(block, b_end - b_first)
            else:
                entries = [ZERO_ID] * (b_end - b_first)
            while run is not None and run[0] < b_end:
                first, end, kind = max(run[0], b_first), min(run[1], b_end), run[2]
                if kind == _KIND_PARENT:
                    entries[first - b_first : end - b_first] = [PARENT_ID] * (end - first)
                elif kind == _KIND_ZERO:
                    # (a no-op on a fresh block; in an incremental it replaces the parent's entry)
                    entries[first - b_first : end - b_first] = [ZERO_ID] * (end - first)
                elif kind == _KIND_DATA:
                    per_batch = max(1, BATCH_BYTES // cs)
                    for f in range(first, end, per_batch):
                        count = min(per_batch, end - f)
                        while in_flight >= self.max_in_flight:
                            drain_one()
                        fut: Future[list[bytes]] = self.pool.submit(self._read_batch, f, count)
                        nbytes = min(count * cs, self.size - f * cs)
                        fifo.append(("batch", fut, entries, f - b_first, nbytes))
                        in_flight += 1
                if run[1] <= b_end:
                    run = next(runs, None)
                else:
                    break
            fifo.append(("block", entries))
        while fifo:
            drain_one()
        self.progress.finish()

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
            cbt=self.disk.cbt,
            meta=self.disk.meta,
            stats={"bytes_read": self.bytes_read, "incremental": int(incremental)},
        )
        return record

    def _parent_entries(self, block: int, count: int) -> list[bytes]:
        assert self.parent is not None
        block_id = self.parent.index[block]
        if block_id is None:
            return [ZERO_ID] * count
        raw = self.repo.get_blob(BlobType.INDEX, bytes.fromhex(block_id))
        entries = [raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)]
        if len(entries) != count:
            raise VmvaultError(f"parent snapshot's index block {block} of {self.disk.name} has the wrong length")
        return entries

    def _store_index_block(self, entries: list[bytes]) -> str | None:
        if all(e == ZERO_ID for e in entries):
            return None
        raw = b"".join(entries)
        block_id = self.repo.key.chunk_id(raw)
        self.writer.add(BlobType.INDEX, block_id, raw)
        return block_id.hex()


def _store_file(repo: Repository, writer: BlobWriter, f: SourceFile) -> FileRecord:
    cs = repo.config.chunk_size
    chunks: list[str] = []
    size = 0
    with f.open() as fh:
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
    return FileRecord(name=f.name, size=size, mode=mode, mtime_ns=f.mtime_ns, chunks=chunks)


def _previous(repo: Repository, location: str) -> Snapshot | None:
    snaps = [s for s in repo.list_snapshots() if s.source.get("location") == location]
    return snaps[-1] if snaps else None


def backup(
    repo: Repository,
    source: Source,
    *,
    tags: Iterable[str] = (),
    progress: Progress | None = None,
    workers: int | None = None,
    full: bool = False,
) -> BackupResult:
    """Back up ``source`` into ``repo`` under a shared lock; returns the new snapshot.

    ``full=True`` ignores change tracking (every allocated byte is read; dedup still applies).
    """
    progress = progress or NullProgress()
    # twice the cores (at most 8): a worker waiting for its read leaves the core to one that
    # hashes or compresses; on 2 cores 4 workers beat 2 in 7 of 8 paired runs (docs/benchmarks.md)
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    started = time.monotonic()
    with repo.lock(exclusive=False, operation="backup"):
        # dedup only against what exists now: a prune may have run since the index was loaded,
        # and no prune can start while this shared lock is held
        repo.load_index()
        prev_snap = _previous(repo, source.location)
        previous = None
        if prev_snap is not None and not full:
            previous = PreviousBackup(prev_snap.id, {d.name: d.cbt for d in prev_snap.disks if d.cbt})
        session = source.open_session(previous)
        try:
            result = _backup_session(repo, source, session, prev_snap, tags, progress, workers, full)
            session.complete(result.snapshot.id)
        finally:
            session.close()
    result.seconds = time.monotonic() - started
    return result


def _backup_session(
    repo: Repository,
    source: Source,
    session: BackupSession,
    prev_snap: Snapshot | None,
    tags: Iterable[str],
    progress: Progress,
    workers: int,
    full: bool,
) -> BackupResult:
    for w in session.warnings:
        progress.warn(w)
    parent_disks = {d.name: d for d in prev_snap.disks} if prev_snap is not None else {}
    writer = repo.writer()
    records: list[DiskRecord] = []
    files: list[FileRecord] = []
    bytes_read = 0
    ok = False
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmvault-chunk") as pool:
            for disk in session.disks:
                if full:
                    disk.changed = None
                job = _DiskBackup(repo, writer, pool, disk, parent_disks.get(disk.name), progress, 2 * workers + 2)
                record = job.run()
                bytes_read += job.bytes_read
                records.append(record)
        for f in session.files:
            files.append(_store_file(repo, writer, f))
            bytes_read += f.size
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
        hostname=meta["hostname"],
        username=meta["username"],
        source={"kind": source.kind, "location": source.location},
        tags=sorted(set(tags)),
        parent=prev_snap.id if prev_snap is not None else None,
        vm=session.vm,
        consistency=session.consistency,
        warnings=list(session.warnings),
        disks=records,
        files=files,
        extra=session.extra,
        stats={
            "bytes_read": bytes_read,
            "bytes_added": writer.new_bytes,
            "raw_bytes_added": writer.new_raw_bytes,
            "chunks_added": writer.new_blobs,
            "packs_added": writer.packs_written,
        },
    )
    repo.save_snapshot(snap)
    return BackupResult(
        snapshot=snap,
        bytes_read=bytes_read,
        bytes_new=writer.new_bytes,
        raw_new=writer.new_raw_bytes,
        chunks_new=writer.new_blobs,
        warnings=list(session.warnings),
    )

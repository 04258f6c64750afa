"""Restore: rebuild a snapshot's disks and files in a target folder.

Disks are written sparse (ZERO chunks are never written) in their original format or the one
asked for. Checkpoint chains are rebuilt as chains (each layer a differencing child of the
restored parent) unless ``flatten`` asks for the current state only. Every chunk is verified
(decrypted and re-hashed) as it is read; a damaged chunk stops the restore with an error
naming the chunk and where it belongs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmvault.disk import DISK_SUFFIXES, FORMATS, create_image
from vmvault.disk.base import DiskWriter
from vmvault.errors import ConfigError, IntegrityError
from vmvault.repo._layout import ID_SIZE, PARENT_ID, ZERO_ID, BlobType
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

from .progress import NullProgress, Progress

__all__ = ["ChunkResolver", "RestoreResult", "restore", "safe_relpath"]

_SUFFIX = {"raw": ".raw", "vhdx": ".vhdx", "vhd": ".vhd", "qcow2": ".qcow2"}


@dataclass
class RestoreResult:
    target: str
    disks: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "disks": self.disks,
            "files": self.files,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
        }


def safe_relpath(name: str) -> str:
    """A stored name as a relative path that cannot escape the target folder."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise IntegrityError(f"refusing to restore a file named {name!r}: it would escape the target folder")
    return os.path.join(*parts)


class ChunkResolver:
    """Chunk ids of a disk record, resolving PARENT_ID entries through its parent layers."""

    def __init__(self, repo: Repository, snap: Snapshot, record: DiskRecord) -> None:
        self.repo = repo
        self.by_name = {d.name: d for d in snap.disks}
        self.record = record
        self._cache: dict[tuple[str, int], list[bytes]] = {}

    def block(self, record: DiskRecord, block: int) -> list[bytes]:
        key = (record.name, block)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        n_chunks = -(-record.size // record.chunk_size)
        count = min(record.index_span, n_chunks - block * record.index_span)
        block_id = record.index[block]
        if block_id is None:
            entries = [ZERO_ID] * count
        else:
            raw = self.repo.get_blob(BlobType.INDEX, bytes.fromhex(block_id))
            entries = [raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)]
            if len(entries) != count:
                raise IntegrityError(
                    f"index block {block_id} of disk {record.name} has {len(entries)} entries, expected {count}",
                    object_id=block_id,
                )
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = entries
        return entries

    def resolve(self, record: DiskRecord, chunk: int, *, flatten: bool) -> bytes:
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

    def entries(self, *, flatten: bool) -> Iterator[tuple[int, bytes]]:
        rec = self.record
        n_chunks = -(-rec.size // rec.chunk_size)
        for block in range(len(rec.index)):
            first = block * rec.index_span
            entries = self.block(rec, block)
            for i, entry in enumerate(entries):
                chunk = first + i
                if chunk >= n_chunks:
                    return
                if entry == PARENT_ID and flatten:
                    entry = self.resolve(rec, chunk, flatten=True)
                yield chunk, entry


def _pieces(
    resolver: ChunkResolver, record: DiskRecord, *, flatten: bool, layer_only: bool
) -> Iterator[tuple[int, bytes, int, int]]:
    """``(offset, chunk_id, start_in_chunk, length)`` to write, in disk order."""
    cs = record.chunk_size
    if layer_only:
        # a layer: write exactly its own ranges; explicit zero ranges are written as zeros
        for off, length, kind in record.layer_map or []:
            pos, end = off, off + length
            while pos < end:
                chunk = pos // cs
                take = min(end, (chunk + 1) * cs) - pos
                entry = ZERO_ID if kind == 0 else resolver.resolve(record, chunk, flatten=True)
                yield pos, entry, pos - chunk * cs, take
                pos += take
        return
    for chunk, entry in resolver.entries(flatten=flatten):
        if entry in (ZERO_ID, PARENT_ID):
            continue
        yield chunk * cs, entry, 0, min(cs, record.size - chunk * cs)


def _write_disk(
    repo: Repository,
    snap: Snapshot,
    record: DiskRecord,
    writer: DiskWriter,
    *,
    flatten: bool,
    layer_only: bool,
    progress: Progress,
    pool: ThreadPoolExecutor,
    max_in_flight: int,
    path: str,
) -> int:
    resolver = ChunkResolver(repo, snap, record)
    fifo: collections.deque[tuple[int, int, int, Future[bytes] | None]] = collections.deque()
    written = 0
    flusher = _Flusher(path)

    def fetch(chunk_id: bytes, chunk_offset: int) -> bytes:
        try:
            return repo.get_blob(BlobType.DATA, chunk_id)
        except IntegrityError as exc:
            raise IntegrityError(
                f"{exc} — needed by disk {record.name} at offset {chunk_offset:#x} of snapshot {snap.short_id}",
                object_id=chunk_id.hex(),
            ) from exc

    def drain() -> None:
        nonlocal written
        offset, start, length, fut = fifo.popleft()
        if fut is None:
            data = bytes(length)
        else:
            data = fut.result()
            if start or len(data) != length:  # slicing copies: only a part of the chunk is wanted
                data = data[start : start + length]
        if fut is not None and len(data) != length:
            raise IntegrityError(f"chunk for disk {record.name} at offset {offset:#x} is shorter than expected")
        writer.write(offset, data)
        written += length
        flusher.wrote(length)
        progress.advance(length)

    try:
        for offset, entry, start, length in _pieces(resolver, record, flatten=flatten, layer_only=layer_only):
            while len(fifo) >= max_in_flight:
                drain()
            fut = None if entry == ZERO_ID else pool.submit(fetch, entry, offset - start)
            fifo.append((offset, start, length, fut))
        while fifo:
            drain()
    finally:
        flusher.close()
    return written


class _Flusher:
    """Writes the restored file back to disk while the restore goes on.

    Without it the kernel keeps up to ``dirty_background_ratio`` of RAM (gigabytes) dirty and
    the writer's final fsync then writes all of it after the decrypting is done: reading,
    decrypting and writing to disk would run one after the other instead of at once.
    Every ``FLUSH_BYTES`` written, a background thread runs ``fdatasync`` on a second
    descriptor of the same file (the page cache is per file, so it writes the writer's
    pages). The writer's own fsync at close stays what makes the restore durable.
    """

    FLUSH_BYTES = 64 * 1024 * 1024

    def __init__(self, path: str) -> None:
        self._pending = 0
        self._future: Future[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = -1  # only an optimisation: without it the final fsync does all the work

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._fd < 0 or self._pending < self.FLUSH_BYTES:
            return
        if self._future is not None and not self._future.done():
            return  # the previous flush is still writing; the next one picks these pages up
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmvault-flush")
        self._pending = 0
        self._future = self._pool.submit(self._flush)

    def _flush(self) -> None:
        # a real write error surfaces again in the writer's own fsync at close
        with contextlib.suppress(OSError):
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _leaves(snap: Snapshot) -> list[DiskRecord]:
    parents = {d.parent for d in snap.disks if d.layer and d.parent}
    return [d for d in snap.disks if d.name not in parents]


def _ordered(snap: Snapshot) -> list[DiskRecord]:
    """Parents before children."""
    by_name = {d.name: d for d in snap.disks}
    out: list[DiskRecord] = []
    done: set[str] = set()

    def visit(d: DiskRecord, depth: int) -> None:
        if d.name in done:
            return
        if depth > len(by_name):
            raise IntegrityError(f"snapshot {snap.short_id}: disk layers form a cycle at {d.name}")
        if d.layer and d.parent in by_name:
            visit(by_name[d.parent], depth + 1)
        done.add(d.name)
        out.append(d)

    for d in snap.disks:
        visit(d, 0)
    return out


def _target_name(name: str, fmt: str, original: str) -> str:
    """The restored file's name: the stored name, with the suffix of the format written.

    Names from connectors (``vda``) get a suffix; a converted image's suffix changes
    (``web.vhdx`` restored as qcow2 is ``web.qcow2``); an unconverted file keeps its name.
    """
    base, ext = os.path.splitext(name)
    if ext.lower() not in DISK_SUFFIXES:
        return name + _SUFFIX[fmt]
    if fmt == original:
        return name
    return base + _SUFFIX[fmt]


def restore(
    repo: Repository,
    snap: Snapshot,
    target: str,
    *,
    format: str | None = None,
    flatten: bool = False,
    include: list[str] | None = None,
    progress: Progress | None = None,
    workers: int = 4,
) -> RestoreResult:
    """Restore ``snap`` into the folder ``target`` (created; existing files are never overwritten)."""
    progress = progress or NullProgress()
    if format is not None and format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    started = time.monotonic()
    result = RestoreResult(target=os.path.abspath(target))
    os.makedirs(target, exist_ok=True)
    has_layers = any(d.layer for d in snap.disks)
    flatten = flatten or (has_layers and format == "raw")
    disks = _leaves(snap) if flatten else _ordered(snap)
    if include:
        disks = [d for d in disks if d.name in include]
    restored_paths: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmvault-restore") as pool:
        for record in disks:
            fmt = format or (record.format if record.format in FORMATS else "raw")
            layer_only = record.layer and not flatten
            if layer_only and fmt == "raw":
                fmt = "vhdx"
            rel = safe_relpath(_target_name(record.name, fmt, record.format))
            path = os.path.join(target, rel)
            if os.path.exists(path):
                raise ConfigError(f"{path} exists; restore into an empty folder (nothing was overwritten)")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            parent_path = restored_paths.get(record.parent or "") if layer_only else None
            if layer_only and parent_path is None:
                raise IntegrityError(f"snapshot {snap.short_id}: layer {record.name} has no restored parent")
            resolver = ChunkResolver(repo, snap, record)
            todo = sum(p[3] for p in _pieces(resolver, record, flatten=flatten, layer_only=layer_only))
            progress.start(rel, todo)
            writer = create_image(path, fmt, record.size, parent=parent_path)
            try:
                written = _write_disk(
                    repo,
                    snap,
                    record,
                    writer,
                    flatten=flatten,
                    layer_only=layer_only,
                    progress=progress,
                    pool=pool,
                    max_in_flight=2 * workers + 4,
                    path=path,
                )
            except BaseException:
                try:
                    writer.close()
                finally:
                    os.unlink(path)  # never leave a half-restored disk that looks whole
                raise
            writer.close()
            progress.finish()
            restored_paths[record.name] = path
            result.bytes_written += written
            result.disks.append(
                {"name": record.name, "path": path, "format": fmt, "size": record.size, "written": written}
            )
    for f in snap.files:
        if include and f.name not in include:
            continue
        rel = safe_relpath(f.name)
        path = os.path.join(target, rel)
        if os.path.exists(path):
            raise ConfigError(f"{path} exists; restore into an empty folder (nothing was overwritten)")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".vmvault-partial"
        with open(tmp, "wb") as fh:
            for chunk_hex in f.chunks:
                try:
                    fh.write(repo.get_blob(BlobType.DATA, bytes.fromhex(chunk_hex)))
                except IntegrityError as exc:
                    fh.close()
                    os.unlink(tmp)
                    raise IntegrityError(f"{exc} — needed by file {f.name} of snapshot {snap.short_id}") from exc
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, f.mode)
        os.utime(tmp, ns=(f.mtime_ns, f.mtime_ns))
        os.rename(tmp, path)
        result.files.append(path)
        result.bytes_written += f.size
    result.seconds = time.monotonic() - started
    return result

"""Restore: rebuild a snapshot's disks and files in a target folder.

Disks are written sparse (ZERO chunks are never written) in their original format or the one
asked for. Checkpoint chains are rebuilt as chains (each layer a differencing child of the
restored parent) unless ``flatten`` asks for the current state only. Every chunk is verified
(decrypted and re-hashed) as it is read; a damaged chunk stops the restore with an error
naming the chunk and where it belongs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmvault import platform
from vmvault.backends.base import DEFAULT_READS_AT_ONCE
from vmvault.disk import DIFFERENCING_FORMATS, DISK_SUFFIXES, FALLBACK_FORMAT, FORMATS, create_image, disk_format
from vmvault.disk.base import DiskWriter
from vmvault.errors import ConfigError, IntegrityError
from vmvault.repo.fetch import BlobFetcher
from vmvault.repo.format import ZERO_ID, BlobType, ChunkResolver, is_chunk
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

from .progress import NullReporter, ProgressReporter
from .target import RestoreTarget, write_all

__all__ = ["RestoreResult", "restore", "restore_selected", "safe_relpath", "select"]


@dataclass
class RestoreResult:
    target: str
    disks: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    #: files an interrupted run of the same restore had completed, kept as they were
    kept: list[str] = field(default_factory=list)
    #: what else the restore found or did in the target (an interrupted run's leftovers)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "disks": self.disks,
            "files": self.files,
            "kept": self.kept,
            "notes": self.notes,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
        }


def safe_relpath(name: str) -> str:
    """A stored name as a ``/``-separated relative path that cannot escape the target folder."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise IntegrityError(f"refusing to restore a file named {name!r}: it would escape the target folder")
    if "\0" in name:
        raise IntegrityError(f"refusing to restore a file named {name!r}: a name cannot hold a NUL byte")
    problems = [platform.windows_name_problem(p) for p in parts] if platform.WINDOWS else []
    if any(problems):  # "a.vhdx:x" would write a stream of a.vhdx, "nul" the device
        raise IntegrityError(f"refusing to restore a file named {name!r}: {next(p for p in problems if p)}")
    return "/".join(parts)


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
        if not is_chunk(entry):
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
    progress: ProgressReporter,
    pool: ThreadPoolExecutor,
    workers: int,
    flush_fd: int,
) -> int:
    resolver = ChunkResolver(repo, snap, record)
    written = 0
    # (a writer past the page cache leaves nothing dirty to write back as it goes)
    flusher = _Flusher(-1 if writer.past_cache else flush_fd)
    pieces = _pieces(resolver, record, flatten=flatten, layer_only=layer_only)
    # runs of chunks side by side in a pack come in one ranged read, ``workers`` reads at once
    # (repo/fetch.py); chunks arrive in disk order, each verified as a read of it alone is
    fetcher = BlobFetcher(repo, BlobType.DATA, max_requests=workers, executor=pool)
    results = fetcher.fetch((p, None if p[1] == ZERO_ID else p[1]) for p in pieces)
    try:
        for (offset, entry, start, length), data in results:
            if isinstance(data, IntegrityError):
                raise IntegrityError(
                    f"{data} — needed by disk {record.name} at offset {offset - start:#x} of snapshot {snap.short_id}",
                    object_id=entry.hex(),
                ) from data
            if data is None:
                data = bytes(length)
            elif start or len(data) != length:  # slicing copies: only a part of the chunk is wanted
                data = data[start : start + length]
                if len(data) != length:
                    raise IntegrityError(f"chunk for disk {record.name} at offset {offset:#x} is shorter than expected")
            writer.write(offset, data)
            written += length
            flusher.wrote(length)
            progress.advance(length)
    finally:
        results.close()  # after an error: the reads still queued for this disk are cancelled
        fetcher.close()
        flusher.close()
    return written


class _Flusher:
    """Writes the restored file back to disk while the restore goes on.

    Without it the kernel keeps up to ``dirty_background_ratio`` of RAM (gigabytes) dirty and
    the writer's final fsync then writes all of it after the decrypting is done: reading,
    decrypting and writing to disk would run one after the other instead of at once.
    Every ``FLUSH_BYTES`` written, a background thread runs ``fdatasync`` on a second
    descriptor of the same file (a duplicate of the restore's own; the page cache is per file,
    so it writes the writer's pages), then frees the pages written back (``platform.drop_cached``):
    a restore does not read what it wrote, and the next 64 MiB reuse those pages instead of
    taking new ones (the 4 GiB comparison image's restore, 3 pairs on a quiet machine, cold
    cache: 5.8-7.1 s with 5.0-6.4 s of system time before, 3.7-4.9 s with 2.0-3.2 s after). The
    writer's own fsync at close stays what makes the restore durable; the pages no flush reached
    are freed after it (``_restore_disk``).
    """

    FLUSH_BYTES = 64 * 1024 * 1024

    def __init__(self, fd: int) -> None:
        self._pending = 0
        self._future: Future[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        try:
            self._fd = os.dup(fd) if fd >= 0 else -1
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
            platform.flush_data(self._fd)
            platform.drop_cached(self._fd)

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


def _cannot_hold_layers(format: str | None) -> bool:
    """Is ``format`` a format whose images have no parent (raw): layers must then be flattened."""
    return format is not None and format in FORMATS and format not in DIFFERENCING_FORMATS


def _target_name(name: str, fmt: str, original: str) -> str:
    """The restored file's name: the stored name, with the suffix of the format written.

    Names from connectors (``vda``) get a suffix; a converted image's suffix changes
    (``web.vhdx`` restored as qcow2 is ``web.qcow2``); an unconverted file keeps its name.
    """
    base, ext = os.path.splitext(name)
    suffix = disk_format(fmt).suffixes[0]
    if ext.lower() not in DISK_SUFFIXES:
        return name + suffix
    if fmt == original:
        return name
    return base + suffix


def _matches(name: str, pattern: str) -> bool:
    """``--include`` matching: a glob on the whole stored name, or a folder and all below it."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern.rstrip("/") + "/")


def select(snap: Snapshot, include: list[str] | None, *, flatten: bool) -> set[str] | None:
    """The stored names of the disks and files ``include`` asks for (None: everything).

    Every pattern must match something, and a checkpoint layer needs its parent layers
    (unless ``flatten``, which restores each chain's newest layer as one whole disk).
    """
    if not include:
        return None
    leaves = {d.name for d in _leaves(snap)} if flatten else {d.name for d in snap.disks}
    names = sorted(leaves) + [f.name for f in snap.files]
    chosen: set[str] = set()
    for pattern in include:
        if not pattern:
            raise ConfigError("--include needs a disk or file name (or a glob); an empty one matches nothing")
        hit = {n for n in names if _matches(n, pattern)}
        if not hit:
            layers = [d.name for d in snap.disks if d.name not in leaves and _matches(d.name, pattern)]
            if layers:
                raise ConfigError(
                    f"--include {pattern!r} names {layers[0]}, a parent layer of a checkpoint chain; with "
                    f"--flatten only the newest layer of each chain is restored, as one disk"
                )
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(
                f"--include {pattern!r} matches no disk or file of snapshot {snap.short_id} "
                f"(it holds: {shown or 'nothing'})"
            )
        chosen |= hit
    if not flatten:
        by_name = {d.name: d for d in snap.disks}
        for name in sorted(chosen):
            d = by_name.get(name)
            if d is not None and d.layer and d.parent and d.parent not in chosen:
                raise ConfigError(
                    f"{d.name} is a checkpoint layer whose parent {d.parent} is not included: "
                    f"include its parent layers too, or add --flatten to restore its current state as one disk"
                )
    return chosen


@dataclass
class _Item:
    """One disk or file to restore, and the relative path it gets in the target."""

    rel: str
    disk: DiskRecord | None = None
    file: FileRecord | None = None
    fmt: str = ""
    layer_only: bool = False


def _plan(snap: Snapshot, format: str | None, flatten: bool, selected: set[str] | None) -> list[_Item]:
    disks = _leaves(snap) if flatten else _ordered(snap)
    items: list[_Item] = []
    for record in disks:
        if selected is not None and record.name not in selected:
            continue
        fmt = format or (record.format if record.format in FORMATS else FALLBACK_FORMAT)
        layer_only = record.layer and not flatten
        if layer_only and fmt not in DIFFERENCING_FORMATS:
            fmt = DIFFERENCING_FORMATS[0]  # a layer needs a format with parents (VHDX)
        rel = safe_relpath(_target_name(record.name, fmt, record.format))
        items.append(_Item(rel, disk=record, fmt=fmt, layer_only=layer_only))
    for f in snap.files:
        if selected is None or f.name in selected:
            items.append(_Item(safe_relpath(f.name), file=f))
    seen: dict[str, str] = {}  # by platform.name_key: case-insensitively where the file system is
    folders = {platform.name_key(rel.rpartition("/")[0]) for rel in (i.rel for i in items)}
    for item in items:
        name = item.disk.name if item.disk else item.file.name if item.file else ""
        key = platform.name_key(item.rel)
        if key in seen or any(f == key or f.startswith(key + "/") for f in folders):
            clash = f"{name} and {seen.get(key, 'a folder')} would both be restored as {item.rel}"
            if format is not None:
                raise ConfigError(f"{clash} with --format {format}: restore one of them with --include")
            raise IntegrityError(f"snapshot {snap.short_id}: {clash}")
        seen[key] = name
    return items


def _stored_mode(value: object, default: int) -> int:
    return value & 0o7777 if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _stored_owner(uid: object, gid: object) -> tuple[int, int] | None:
    if not isinstance(uid, int) or not isinstance(gid, int) or isinstance(uid, bool) or isinstance(gid, bool):
        return None
    # (uid_t)-1 means "leave unchanged" to chown: not an owner
    return (uid, gid) if 0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1 else None


def _mode_and_owner(
    mode: int, owner: tuple[int, int] | None, numeric_owner: bool
) -> tuple[int, tuple[int, int] | None]:
    """The mode to give a restored file: never wider than stored; setuid, setgid and sticky only
    when its stored owner is restored too."""
    if numeric_owner and owner is not None:
        return mode & 0o7777, owner
    return mode & 0o777, None


def restore(
    repo: Repository,
    snap: Snapshot,
    target: str,
    *,
    format: str | None = None,
    flatten: bool = False,
    include: list[str] | None = None,
    progress: ProgressReporter | None = None,
    workers: int | None = None,
    numeric_owner: bool = False,
) -> RestoreResult:
    """Restore ``snap`` into the folder ``target`` (created; existing names are never replaced).

    ``include``: only the disks and files whose stored names match these globs (or lie under
    these folders). ``numeric_owner``: give files and disks their stored uid/gid (needs root);
    without it they belong to whoever restores and lose setuid/setgid/sticky. Modes are never
    wider than stored; a disk whose mode was not stored gets 0600. A rerun after a kill or a
    failure resumes (see ``vmvault.engine.target``).
    """
    flatten = flatten or (any(d.layer for d in snap.disks) and _cannot_hold_layers(format))
    selected = select(snap, include, flatten=flatten)
    return restore_selected(
        repo,
        snap,
        target,
        format=format,
        flatten=flatten,
        selected=selected,
        progress=progress,
        workers=workers,
        numeric_owner=numeric_owner,
    )


def restore_selected(
    repo: Repository,
    snap: Snapshot,
    target: str,
    *,
    format: str | None = None,
    flatten: bool = False,
    selected: set[str] | None = None,
    subfolder: str | None = None,
    progress: ProgressReporter | None = None,
    workers: int | None = None,
    numeric_owner: bool = False,
) -> RestoreResult:
    """``restore`` of exactly the stored names ``selected`` (None: all) into ``target`` or its
    ``subfolder`` (created; never a link). ``workers``: ranged reads at once (None: as many as
    the storage serves best, ``Backend.prepare_reads``)."""
    progress = progress or NullReporter()
    if format is not None and format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if numeric_owner and platform.current_uid() != 0:
        raise ConfigError("--numeric-owner restores the stored owners, which only root may give; run as root")
    if workers is not None and workers < 1:
        raise ValueError("workers must be at least 1")
    started = time.monotonic()
    flatten = flatten or (any(d.layer for d in snap.disks) and _cannot_hold_layers(format))
    items = _plan(snap, format, flatten, selected)
    key = {
        "snapshot": snap.id,
        "format": format,
        "flatten": flatten,
        "numeric_owner": numeric_owner,
        "items": [i.rel for i in items],
    }
    tgt = RestoreTarget.open(target, subfolder=subfolder)
    result = RestoreResult(target=tgt.path)
    try:
        tgt.begin(key)
        for item in items:
            if not tgt.is_placed(item.rel):
                tgt.check_free(item.rel)  # refuse before anything is written
        if workers is None and any(item.disk is not None for item in items):
            workers = repo.backend.prepare_reads()
        workers = workers or DEFAULT_READS_AT_ONCE
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vmvault-restore") as pool:
            restored_paths: dict[str, str] = {}
            for item in items:
                if item.disk is not None:
                    _restore_disk(
                        repo, snap, tgt, item, result, restored_paths, flatten, numeric_owner, progress, pool, workers
                    )
        for item in items:
            if item.file is not None:
                _restore_file(repo, snap, tgt, item, item.file, result, numeric_owner)
        tgt.finish()
    except BaseException:
        tgt.abort()
        raise
    finally:
        tgt.close()
        result.notes = list(tgt.notes)
    result.seconds = time.monotonic() - started
    return result


def _restore_disk(
    repo: Repository,
    snap: Snapshot,
    tgt: RestoreTarget,
    item: _Item,
    result: RestoreResult,
    restored_paths: dict[str, str],
    flatten: bool,
    numeric_owner: bool,
    progress: ProgressReporter,
    pool: ThreadPoolExecutor,
    workers: int,
) -> None:
    record = item.disk
    assert record is not None
    path = tgt.shown(item.rel)
    entry = {"name": record.name, "path": path, "format": item.fmt, "size": record.size, "written": 0}
    if tgt.is_placed(item.rel):
        restored_paths[record.name] = path
        result.kept.append(path)
        result.disks.append(entry)
        return
    parent_path = restored_paths.get(record.parent or "") if item.layer_only else None
    if item.layer_only and parent_path is None:
        raise IntegrityError(f"snapshot {snap.short_id}: layer {record.name} has no restored parent")
    resolver = ChunkResolver(repo, snap, record)
    todo = sum(p[3] for p in _pieces(resolver, record, flatten=flatten, layer_only=item.layer_only))
    progress.start(item.rel, todo)
    partial = tgt.new_partial()
    writer = create_image(path, item.fmt, record.size, parent=parent_path, opener=tgt.opener(partial))
    try:
        written = _write_disk(
            repo,
            snap,
            record,
            writer,
            flatten=flatten,
            layer_only=item.layer_only,
            progress=progress,
            pool=pool,
            workers=workers,
            flush_fd=partial.fd,
        )
        writer.close()
        # durable now: free what the flusher had not reached (up to FLUSH_BYTES, more where
        # the disk was slower than the restore), as it freed the rest
        platform.drop_cached(partial.fd)
    except BaseException:
        with contextlib.suppress(Exception):  # the original error matters more
            writer.close()
        tgt.discard(partial)  # never leave a half-restored disk, under any name
        raise
    mode, owner = _mode_and_owner(
        _stored_mode(record.meta.get("mode"), 0o600),
        _stored_owner(record.meta.get("uid"), record.meta.get("gid")),
        numeric_owner,
    )
    tgt.place(partial, item.rel, mode=mode, owner=owner, mtime_ns=None)
    progress.finish()
    restored_paths[record.name] = path
    result.bytes_written += written
    entry["written"] = written
    result.disks.append(entry)


def _restore_file(
    repo: Repository,
    snap: Snapshot,
    tgt: RestoreTarget,
    item: _Item,
    f: FileRecord,
    result: RestoreResult,
    numeric_owner: bool,
) -> None:
    path = tgt.shown(item.rel)
    if tgt.is_placed(item.rel):
        result.kept.append(path)
        result.files.append(path)
        return
    partial = tgt.new_partial()
    try:
        fd = tgt.create(partial, item.rel)
        try:
            with BlobFetcher(repo, BlobType.DATA) as fetcher:
                for _, data in fetcher.fetch((None, bytes.fromhex(h)) for h in f.chunks):
                    if isinstance(data, IntegrityError):
                        raise IntegrityError(f"{data} — needed by file {f.name} of snapshot {snap.short_id}") from data
                    assert data is not None
                    write_all(fd, data, path)
        finally:
            os.close(fd)
    except BaseException:
        tgt.discard(partial)
        raise
    stored = snap.file_owners.get(f.name) if isinstance(snap.file_owners, dict) else None
    uid, gid = stored if isinstance(stored, list) and len(stored) == 2 else (None, None)
    mode, owner = _mode_and_owner(_stored_mode(f.mode, 0o600), _stored_owner(uid, gid), numeric_owner)
    tgt.place(partial, item.rel, mode=mode, owner=owner, mtime_ns=f.mtime_ns)
    result.files.append(path)
    result.bytes_written += f.size

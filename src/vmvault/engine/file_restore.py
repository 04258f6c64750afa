"""File-level restore: files and folders from inside a snapshot's disks into a target folder.

The files are read through :class:`~vmvault.engine.files.SnapshotFiles` (the disk reader and the
confined filesystem worker); the target is written only through
:class:`~vmvault.engine.target.RestoreTarget`, the primitives every restore uses.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from vmvault.browse import Entry, GuestFilesystem
from vmvault.disk.base import write_error
from vmvault.errors import ConfigError, GuestError, GuestPathError

from .files import Location, SnapshotFiles, _reason
from .progress import NullReporter, ProgressReporter
from .target import RestoreTarget, write_all

__all__ = ["FilesRestoreResult", "restore_files"]


#: how much of a file is read and written at a time
_PIECE = 1 << 20
#: all-zero blocks of this size are left as holes in the restored file
_ZERO_BLOCK = 64 * 1024


@dataclass
class FilesRestoreResult:
    target: str
    #: the restored locations' paths in the target
    paths: list[str] = field(default_factory=list)
    files: int = 0
    folders: int = 0
    links: int = 0
    bytes_written: int = 0
    #: entries not restored (devices, FIFOs, sockets), with the reason
    skipped: list[str] = field(default_factory=list)
    #: files an interrupted run of the same restore had completed, kept as they were
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "paths": self.paths,
            "files": self.files,
            "folders": self.folders,
            "links": self.links,
            "bytes_written": self.bytes_written,
            "skipped": self.skipped,
            "kept": self.kept,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Item:
    rel: str
    fs: GuestFilesystem
    entry: Entry
    location: Location


def _top_name(loc: Location, entry: Entry) -> str:
    """The name a restored location gets in the target: its own name, or for a filesystem's root
    ``<disk>[-<part>]`` (the disk's last path part)."""
    if entry.name:
        return entry.name
    disk = loc.disk.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "disk"
    return disk if loc.part is None else f"{disk}-{loc.part}"


def _plan(files: SnapshotFiles, locations: list[Location]) -> list[_Item]:
    """Everything to restore, parents before children; a location that does not exist, or two
    that would land on one name, fail here, before anything is written."""
    items: list[_Item] = []
    tops: dict[str, Location] = {}
    for loc in locations:
        fs, entry = files.entry(loc)
        top = _top_name(loc, entry)
        if top in (".", "..") or "/" in top or "\0" in top:
            raise GuestError(f"refusing to restore an entry named {top!r}", disk=loc.disk, partition=loc.part)
        if top in tops:
            raise ConfigError(f"{tops[top]} and {loc} would both be restored as {top!r}; restore them one at a time")
        tops[top] = loc
        items.append(_Item(top, fs, entry, loc))
        if entry.type != "dir":
            continue
        prefix = entry.path.rstrip("/")
        seen: set[str] = set()
        try:
            for child in fs.walk(entry):
                rel = top + child.path[len(prefix) :]
                if not child.path.startswith(prefix + "/") or any(p in ("", ".", "..") for p in rel.split("/")):
                    raise GuestError(f"refusing to restore {child.path!r}")  # located below
                if rel in seen:  # a damaged or forged folder: which of the two is meant?
                    folder = child.path.rpartition("/")[0] or "/"
                    raise GuestError(f"the filesystem lists {child.name!r} twice in {folder}; nothing was restored")
                seen.add(rel)
                items.append(_Item(rel, fs, child, loc))
        except GuestPathError:
            raise
        except GuestError as exc:
            raise GuestError(str(exc), disk=loc.disk, partition=loc.part) from exc
    return items


def restore_files(
    files: SnapshotFiles,
    locations: list[Location],
    target: str,
    *,
    progress: ProgressReporter | None = None,
) -> FilesRestoreResult:
    """Restore the files and folders at ``locations`` into the folder ``target``.

    Each location becomes one entry of the target under its own name (a filesystem's root:
    ``<disk>-<part>``). Files keep their modification time (and, on ext2/3/4, their permission
    bits without setuid/setgid/sticky), and stay sparse where the guest's file was (and where
    it reads as zeros); folders keep their modification time; symbolic links are made as
    links, never followed. Devices, FIFOs and sockets are skipped and named. Nothing is ever
    overwritten: an existing file or link under a name to restore stops the restore before
    anything is written; existing folders are used (never through a link). The target is
    written only through :class:`~vmvault.engine.target.RestoreTarget`, so a rerun after a
    kill keeps what the interrupted run completed.
    """
    progress = progress or NullReporter()
    started = time.monotonic()
    items = _plan(files, locations)
    tgt = RestoreTarget.open(target)
    result = FilesRestoreResult(target=tgt.path)
    result.paths = [tgt.shown(i.rel) for i in items if "/" not in i.rel]
    key = {"snapshot": files.snapshot.id, "files": [str(loc) for loc in locations]}
    folder_times: list[tuple[str, int]] = []
    try:
        tgt.begin(key)
        for item in items:  # refuse before anything is written
            if item.entry.type == "dir":
                tgt.check_folder(item.rel)
            elif item.entry.type in ("file", "symlink") and not tgt.is_placed(item.rel):
                tgt.check_free(item.rel)
        to_write = [i for i in items if i.entry.type == "file" and not tgt.is_placed(i.rel)]
        if to_write:
            largest = max(to_write, key=lambda i: i.entry.size)
            tgt.check_size(largest.entry.size, largest.rel)
        total = sum(i.entry.size for i in items if i.entry.type == "file")
        progress.start("files", total)
        for item in items:
            kind = item.entry.type
            if kind == "dir":
                tgt.folder(item.rel)
                result.folders += 1
                if item.entry.mtime_ns is not None:
                    folder_times.append((item.rel, item.entry.mtime_ns))
            elif kind == "file":
                if tgt.is_placed(item.rel):
                    result.kept.append(tgt.shown(item.rel))
                    progress.advance(item.entry.size)
                else:
                    result.bytes_written += _restore_file(tgt, item, progress)
                result.files += 1
            elif kind == "symlink":
                if not tgt.is_placed(item.rel):
                    tgt.place_link(item.rel, item.entry.target or "")
                result.links += 1
            else:
                result.skipped.append(f"{item.location.disk}:{item.entry.path}: a special file (device, FIFO, socket)")
        for rel, mtime_ns in sorted(folder_times, key=lambda t: -t[0].count("/")):
            tgt.set_folder_time(rel, mtime_ns)  # deepest first: placing children changed them
        progress.finish()
        tgt.finish()
    except BaseException:
        tgt.abort()
        raise
    finally:
        tgt.close()
        result.notes = list(tgt.notes)
    result.seconds = time.monotonic() - started
    return result


def _restore_file(tgt: RestoreTarget, item: _Item, progress: ProgressReporter) -> int:
    """Write one file into a partial file of the target and place it; returns bytes written."""
    entry, fs = item.entry, item.fs
    where = Location(item.location.disk, item.location.part, entry.path)
    try:
        holes = fs.holes(entry)
        read = fs.reader(entry)
    except GuestError as exc:
        raise GuestError(_reason(exc), disk=where.disk, partition=where.part, path=entry.path) from exc
    shown = tgt.shown(item.rel)
    written = 0
    partial = tgt.new_partial()
    try:
        fd = tgt.create(partial, item.rel)
        try:
            pos = 0
            for hole_at, hole_len in [*holes, (entry.size, 0)]:
                while pos < hole_at:
                    length = min(_PIECE, hole_at - pos)
                    try:
                        data = read(pos, length)
                    except GuestError as exc:
                        raise GuestError(_reason(exc), disk=where.disk, partition=where.part, path=entry.path) from exc
                    for off in range(0, length, _ZERO_BLOCK):
                        block = data[off : off + _ZERO_BLOCK]
                        if block.count(0) != len(block):
                            os.lseek(fd, pos + off, os.SEEK_SET)
                            write_all(fd, block, shown)
                            written += len(block)
                    pos += length
                    progress.advance(length)
                pos = max(pos, hole_at + hole_len)
                progress.advance(hole_len)
            try:
                os.ftruncate(fd, entry.size)
            except OSError as exc:
                raise write_error(exc, shown, "cannot set the file's size") from exc
        finally:
            os.close(fd)
    except BaseException:
        tgt.discard(partial)
        raise
    mode = entry.mode & 0o777 if fs.kind.startswith("ext") else 0o644
    tgt.place(partial, item.rel, mode=mode, owner=None, mtime_ns=entry.mtime_ns)
    return written

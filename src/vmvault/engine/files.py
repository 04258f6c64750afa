"""File-level restore: the files inside a snapshot's disks, listed, found and restored.

A location is ``DISK[:PART][:/PATH]``: ``DISK`` the disk's name as ``vmvault show`` prints it,
``PART`` the 1-based partition number (left out for a disk holding one filesystem without a
partition table), ``PATH`` a "/"-separated path from the filesystem's root. Disks are read
through :class:`~vmvault.engine.reader.DiskReader` (one per disk, one shared chunk cache), so
only the chunks the filesystem library asks for are fetched; partitions and filesystems are
read by :mod:`vmvault.browse`, the filesystems by the filesystem library in a confined worker
process per disk (:mod:`vmvault.browse.isolated`).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault.browse import Entry, GuestFilesystem, PartitionTable, Volume, disk_volumes, open_volume
from vmvault.browse.isolated import IsolatedDisk
from vmvault.errors import ConfigError, GuestError, GuestPathError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

from .reader import ChunkCache, DiskReader, cache_bytes_for, find_disk

__all__ = ["FindHit", "Location", "SnapshotFiles", "disk_doc", "entry_doc", "parse_location"]


@dataclass(frozen=True)
class Location:
    disk: str
    part: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        text = self.disk
        if self.part is not None:
            text += f":{self.part}"
        if self.path is not None:
            text += f":{self.path}"
        return text


def _rest(rest: str) -> tuple[int | None, str | None] | None:
    """``rest`` after ``DISK:`` as (part, path), or None if it is neither form."""
    if rest.startswith("/"):
        return None, rest
    number, sep, path = rest.partition(":")
    if not number.isdigit() or not number.isascii() or len(number) > 6 or int(number) < 1:
        return None
    if sep and not path.startswith("/"):
        return None
    return int(number), path if sep else None


def parse_location(snap: Snapshot, spec: str) -> Location:
    """``DISK[:PART][:/PATH]`` against the disks of ``snap``; the longest disk name that fits
    wins, so a disk name holding ``:`` is still found."""
    names = sorted((d.name for d in snap.disks), key=len, reverse=True)
    for name in names:
        if spec == name:
            return Location(name)
        if spec.startswith(name + ":"):
            parsed = _rest(spec[len(name) + 1 :])
            if parsed is not None:
                return Location(name, parsed[0], parsed[1])
    known = ", ".join(repr(d.name) for d in snap.disks) or "none"
    raise ConfigError(
        f"{spec!r} names no disk of snapshot {snap.short_id}: write DISK[:PART]:/PATH with DISK one of {known}"
    )


@dataclass(frozen=True)
class FindHit:
    location: Location
    entry: Entry


@dataclass
class DiskView:
    record: DiskRecord
    table: PartitionTable
    volumes: list[tuple[Volume, GuestFilesystem | None]] = field(default_factory=list)


class SnapshotFiles:
    """The filesystems in one snapshot's disks, opened on demand and kept open until
    :meth:`close`. Not thread-safe (the filesystem library is not)."""

    def __init__(self, repo: Repository, snap: Snapshot, *, cache_bytes: int | None = None) -> None:
        self.repo = repo
        self.snapshot = snap
        self.cache = ChunkCache(max_bytes=cache_bytes_for(repo, cache_bytes))
        self._readers: dict[str, DiskReader] = {}
        self._workers: dict[str, IsolatedDisk] = {}
        self._views: dict[str, DiskView] = {}
        self._filesystems: dict[tuple[str, int | None], GuestFilesystem] = {}

    # ------------------------------------------------------------------------------- opening

    def reader(self, disk: str) -> DiskReader:
        reader = self._readers.get(disk)
        if reader is None:
            reader = DiskReader(self.repo, self.snapshot, find_disk(self.snapshot, disk), cache=self.cache)
            self._readers[disk] = reader
        return reader

    def worker(self, disk: str) -> IsolatedDisk:
        """The confined process that runs the filesystem library on ``disk``."""
        worker = self._workers.get(disk)
        if worker is None:
            reader = self.reader(disk)
            worker = IsolatedDisk(reader.read, reader.size, name=disk)
            self._workers[disk] = worker
        return worker

    def view(self, disk: str) -> DiskView:
        """The disk's partition table and what each volume holds."""
        view = self._views.get(disk)
        if view is None:
            reader = self.reader(disk)
            try:
                table, volumes = disk_volumes(reader.read, reader.size, prober=self.worker(disk).probe)
            except GuestError as exc:
                raise GuestError(str(exc), disk=disk) from exc
            view = DiskView(reader.record, table, volumes)
            self._views[disk] = view
            for volume, fs in volumes:
                if fs is not None:
                    self._filesystems.setdefault((disk, volume.number), fs)
        return view

    def filesystem(self, disk: str, part: int | None) -> GuestFilesystem:
        fs = self._filesystems.get((disk, part))
        if fs is None:
            reader = self.reader(disk)
            try:
                _, fs = open_volume(reader.read, reader.size, part, prober=self.worker(disk).probe)
            except GuestError as exc:
                raise GuestError(str(exc), disk=disk, partition=part) from exc
            self._filesystems[(disk, part)] = fs
        return fs

    def entry(self, loc: Location) -> tuple[GuestFilesystem, Entry]:
        fs = self.filesystem(loc.disk, loc.part)
        try:
            return fs, fs.lookup(loc.path or "/")
        except GuestPathError as exc:
            raise GuestPathError(_reason(exc), disk=loc.disk, partition=loc.part, path=loc.path or "/") from exc
        except GuestError as exc:
            raise GuestError(str(exc), disk=loc.disk, partition=loc.part) from exc

    # ------------------------------------------------------------------------------- browsing

    def ls(self, loc: Location) -> list[Entry]:
        """A folder's entries, or the one entry of a file or link."""
        fs, entry = self.entry(loc)
        if entry.type != "dir":
            return [entry]
        try:
            return fs.listdir(entry)
        except GuestError as exc:
            raise GuestError(str(exc), disk=loc.disk, partition=loc.part) from exc

    def find(self, pattern: str, *, layers: bool = False, notes: list[str] | None = None) -> Iterator[FindHit]:
        """Every entry of every readable filesystem whose name (or, for a pattern holding "/",
        whose path) matches the shell pattern; case-insensitively on NTFS and FAT. Checkpoint
        layers below the newest are searched only with ``layers``. Volumes that cannot be read
        are named in ``notes``."""
        notes = notes if notes is not None else []
        parents = {d.parent for d in self.snapshot.disks if d.layer and d.parent}
        for record in self.snapshot.disks:
            if not layers and record.name in parents:
                continue
            try:
                view = self.view(record.name)
            except GuestError as exc:
                notes.append(str(exc))
                self.release(record.name)
                continue
            notes.extend(f"{record.name}: {note}" for note in view.table.notes)
            try:
                for volume, fs in view.volumes:
                    where = Location(record.name, volume.number)
                    if fs is None:
                        if volume.probe.status not in ("none", "duplicate"):  # a duplicate: its overlap is noted
                            notes.append(f"{where}: {volume.probe.note}")
                        continue
                    yield from self._find_in(fs, where, pattern, notes)
            finally:
                # one disk's worker at a time: a chain of 200 checkpoint layers held 200 processes
                self.release(record.name)

    def _find_in(self, fs: GuestFilesystem, where: Location, pattern: str, notes: list[str]) -> Iterator[FindHit]:
        by_path = "/" in pattern
        pat = pattern.casefold() if fs.case_insensitive else pattern
        try:
            for entry in fs.walk(fs.root):
                subject = entry.path if by_path else entry.name
                if fs.case_insensitive:
                    subject = subject.casefold()
                if fnmatch.fnmatchcase(subject, pat):
                    yield FindHit(Location(where.disk, where.part, entry.path), entry)
        except GuestPathError:
            raise
        except GuestError as exc:
            notes.append(f"{where}: {exc}; the rest of this filesystem was not searched")

    def release(self, disk: str) -> None:
        """Close what is open for ``disk`` (its worker process, its filesystems); it is opened
        again when asked for."""
        worker = self._workers.pop(disk, None)
        if worker is not None:
            worker.close()
        self._views.pop(disk, None)
        for key in [k for k in self._filesystems if k[0] == disk]:
            del self._filesystems[key]
        reader = self._readers.pop(disk, None)
        if reader is not None:
            reader.close()

    # ------------------------------------------------------------------------------- accounting

    @property
    def bytes_fetched(self) -> int:
        """Plaintext bytes of the chunks fetched from the repository so far."""
        return self.cache.stats.fetched_bytes

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()
        for reader in self._readers.values():
            reader.close()
        self.cache.close()
        self._readers.clear()
        self._views.clear()
        self._filesystems.clear()

    def __enter__(self) -> SnapshotFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: GuestError) -> str:
    """The message of ``exc`` without the location prefix it was built with."""
    text = str(exc)
    if exc.path is not None and text.startswith(f"{exc.path}: "):
        return text[len(exc.path) + 2 :]
    return text


# ---- JSON shapes: one place for every face (``vmvault files --json``, the dashboard's API) ----


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).astimezone().isoformat(timespec="seconds")


def entry_doc(entry: Entry) -> dict[str, Any]:
    """A folder entry as ``vmvault files ls --json`` prints it."""
    return {
        "name": entry.name,
        "path": entry.path,
        "type": entry.type,
        "size": entry.size,
        "mtime": _iso(entry.mtime_ns),
        "mtime_ns": entry.mtime_ns,
        "mode": entry.mode,
        "target": entry.target,
    }


def disk_doc(files: SnapshotFiles, disk: str) -> dict[str, Any]:
    """A disk's partition table and volumes as ``vmvault files ls SNAP DISK --json`` prints it."""
    view = files.view(disk)
    volumes = []
    for volume, _fs in view.volumes:
        p = volume.partition
        volumes.append(
            {
                "partition": volume.number,
                "offset": volume.offset,
                "size": volume.size,
                "type": p.type if p else None,
                "type_name": p.type_name if p else None,
                "name": p.name if p else None,
                "bootable": p.bootable if p else None,
                "filesystem": volume.probe.kind or None,
                "status": volume.probe.status,
                "note": volume.probe.note or None,
            }
        )
    return {
        "snapshot": files.snapshot.id,
        "disk": disk,
        "size": view.record.size,
        "partition_table": view.table.scheme,
        "disk_guid": view.table.disk_guid or None,
        "volumes": volumes,
        "notes": list(view.table.notes),
    }

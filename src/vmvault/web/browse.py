"""File-level browse and download in the dashboard, through ``vmvault files``'s engine.

A location is what ``vmvault files ls`` takes: ``DISK[:PART][:/PATH]``. Listings have the
shapes of ``vmvault files ls --json`` (``engine.files.entry_doc`` and ``disk_doc``). Guest
disks are untrusted: their filesystems are read by the filesystem library in a confined
worker process (``browse.isolated``), and every name they hold is shown escaped; a name that
is not UTF-8 is shown with its bytes as ``\\xNN`` and cannot be opened from a page.

Each request opens its own :class:`~vmvault.engine.files.SnapshotFiles` (it is not
thread-safe) over the repository's shared reading view, and closes it when done; a download
streams the file in pieces of at most ``PIECE`` bytes, so memory stays bounded whatever its
size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmvault.engine.files import Location, SnapshotFiles, disk_doc, entry_doc, parse_location
from vmvault.errors import ConfigError, GuestPathError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

__all__ = ["PIECE", "Download", "listing", "open_download", "shown"]

#: a download is read and sent in pieces of this size
PIECE = 1 << 20


def shown(text: str) -> str:
    """A guest name as text: bytes that were not UTF-8 (kept as surrogates) as ``\\xNN``."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return _clean(value)
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    return value


def _clean(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: _clean_value(v) for k, v in doc.items()}


def listing(repo: Repository, snap: Snapshot, spec: str | None) -> dict[str, Any]:
    """What a location holds: the snapshot's disks (no location), a disk's volumes (``DISK``),
    or a folder's entries (``DISK[:PART]:/PATH``; a file lists as itself)."""
    if not spec:
        parents = {d.parent for d in snap.disks if d.layer and d.parent}
        return {
            "snapshot": snap.id,
            "disks": [
                {"name": d.name, "size": d.size, "format": d.format, "layer": d.layer, "newest": d.name not in parents}
                for d in snap.disks
            ],
        }
    loc = parse_location(snap, spec)
    with SnapshotFiles(repo, snap) as files:
        if loc.part is None and loc.path is None:
            return _clean(disk_doc(files, loc.disk))
        if loc.path is None:
            loc = Location(loc.disk, loc.part, "/")
        entries = files.ls(loc)
        return _clean(
            {
                "snapshot": snap.id,
                "disk": loc.disk,
                "partition": loc.part,
                "path": loc.path,
                "entries": [entry_doc(e) for e in entries],
            }
        )


@dataclass
class Download:
    name: str
    size: int
    pieces: Iterator[bytes]


def open_download(repo: Repository, snap: Snapshot, spec: str) -> Download:
    """A regular file's content, read piece by piece as the iterator is consumed (the
    filesystem stays open until it is exhausted or closed)."""
    loc = parse_location(snap, spec)
    if loc.path is None:
        raise ConfigError(f"{spec!r} names a disk or a partition, not a file: give DISK[:PART]:/PATH")
    files = SnapshotFiles(repo, snap)
    try:
        fs, entry = files.entry(loc)
        if entry.type != "file":
            raise GuestPathError(f"{shown(entry.path)} is a {entry.type}, not a file", disk=loc.disk, path=loc.path)
        read = fs.reader(entry)
    except BaseException:
        files.close()
        raise

    def pieces() -> Iterator[bytes]:
        try:
            offset = 0
            while offset < entry.size:
                data = read(offset, min(PIECE, entry.size - offset))
                if not data:
                    break
                offset += len(data)
                yield data
        finally:
            files.close()

    return Download(shown(entry.name), entry.size, pieces())

"""Test doubles for the engine: in-memory disks and sources with scripted change tracking."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from vmvault.disk.base import DiskImage, Extent, ExtentKind, coalesce
from vmvault.hypervisors.base import DEFAULT_OPTIONS, BackupOptions, BackupSession, PreviousBackup, Source, SourceDisk


class MemoryDisk(DiskImage):
    """A disk held in a bytearray; ``allocated`` lists DATA ranges (the rest is ZERO).

    Counts the bytes read so tests can assert what an incremental touched.
    """

    format = "raw"

    def __init__(self, data: bytearray, allocated: list[tuple[int, int]] | None = None) -> None:
        self.data = data
        self.allocated = allocated if allocated is not None else [(0, len(data))]
        self.bytes_read = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.data)

    def extents(self) -> Iterator[Extent]:
        pos = 0
        out = []
        for off, length in sorted(self.allocated):
            if off > pos:
                out.append(Extent(pos, off - pos, ExtentKind.ZERO))
            out.append(Extent(off, length, ExtentKind.DATA))
            pos = off + length
        if pos < self.size:
            out.append(Extent(pos, self.size - pos, ExtentKind.ZERO))
        return coalesce(out)

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.bytes_read += length
        return bytes(self.data[offset : offset + length])


class SparseDisk(DiskImage):
    """A large disk holding only ``pieces`` (offset -> bytes); zeros elsewhere."""

    format = "raw"

    def __init__(self, size: int, pieces: dict[int, bytes]) -> None:
        self._size = size
        self.pieces = pieces

    @property
    def size(self) -> int:
        return self._size

    def extents(self) -> Iterator[Extent]:
        out, pos = [], 0
        for off, data in sorted(self.pieces.items()):
            if off > pos:
                out.append(Extent(pos, off - pos, ExtentKind.ZERO))
            out.append(Extent(off, len(data), ExtentKind.DATA))
            pos = off + len(data)
        if pos < self._size:
            out.append(Extent(pos, self._size - pos, ExtentKind.ZERO))
        return coalesce(out)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for off, data in self.pieces.items():
            first, end = max(off, offset), min(off + len(data), offset + length)
            if first < end:
                out[first - offset : end - offset] = data[first - off : end - off]
        return bytes(out)


class Far:
    """``call`` made slow, as over a link ``delay`` seconds long, counting its calls and the
    most of them under way at once (what reading ahead is judged by)."""

    def __init__(self, call: Callable[..., Any], delay: float = 0.02) -> None:
        self._call = call
        self._delay = delay
        self._lock = threading.Lock()
        self._now = 0
        self.calls = 0
        self.most = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._now += 1
            self.calls += 1
            self.most = max(self.most, self._now)
        try:
            time.sleep(self._delay)
            return self._call(*args, **kwargs)
        finally:
            with self._lock:
                self._now -= 1


class ScriptedSession(BackupSession):
    def __init__(self, disks: list[SourceDisk]) -> None:
        self.vm = {"name": "test-vm", "hypervisor": "test"}
        self.disks = disks
        self.files = []
        self.consistency = "crash-consistent"
        self.warnings = []
        self.extra = {}
        self.completed: str | None = None
        self.closed = False

    def complete(self, snapshot_id: str) -> None:
        self.completed = snapshot_id

    def close(self) -> None:
        self.closed = True


class ScriptedSource(Source):
    """Hands out the given disk; ``changed`` (when set) is reported as change tracking."""

    kind = "test"

    def __init__(self, disk: MemoryDisk, location: str = "test://vm") -> None:
        self.disk = disk
        self.location = location
        self.changed: list[tuple[int, int]] | None = None
        self.token = 0
        self.last_previous: PreviousBackup | None = None
        self.sessions: list[ScriptedSession] = []

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        self.last_previous = previous
        self.token += 1
        cbt: dict[str, Any] = {"kind": "test", "token": self.token}
        changed = self.changed if previous is not None else None
        session = ScriptedSession([SourceDisk("vda", self.disk, "raw", changed=changed, cbt=cbt)])
        self.sessions.append(session)
        return session

"""The connector interface: what the backup engine asks of a hypervisor (or of plain files).

A ``Source`` names something to back up (a VM folder, an image file, a running QEMU, a
Hyper-V VM). ``Source.open_session`` makes a *consistent, frozen view* of it and returns a
``BackupSession``: disk readers (``DiskImage``), changed ranges where change tracking is
usable, the VM's other files, and metadata. The engine reads the session, writes the
snapshot, then calls ``complete`` (success: e.g. keep the new change-tracking bitmap) and
always ``close`` (remove every temporary checkpoint, export, job or file). After ``close``
the VM must be exactly as it was before, apart from the single tracking state the
connector documents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Self

from vmvault.disk.base import DiskImage

__all__ = [
    "CONSISTENCY_LEVELS",
    "BackupSession",
    "PreviousBackup",
    "Source",
    "SourceDisk",
    "SourceFile",
]

#: from weakest to strongest; recorded in every snapshot
CONSISTENCY_LEVELS = ("crash-consistent", "filesystem-consistent", "application-consistent", "offline")


@dataclass
class SourceDisk:
    """One disk (or one layer of a checkpoint chain) to store."""

    #: stable key within the VM, e.g. ``Virtual Hard Disks/web.vhdx`` or ``vda``
    name: str
    #: what to read; for a chain layer (``layer=True``) its own extents are stored
    image: DiskImage
    #: the format of the original file, the default for restore
    format: str
    #: changed byte ranges (offset, length) since ``PreviousBackup``; None = unknown, read all
    changed: list[tuple[int, int]] | None = None
    #: change-tracking state to record in the snapshot for the next incremental
    cbt: dict[str, Any] | None = None
    #: True: store this layer alone (its PARENT ranges are recorded, not read)
    layer: bool = False
    #: for a layer, the ``name`` of its parent layer in the same snapshot
    parent_name: str | None = None
    #: connector-specific facts worth keeping (controller, device id, block size, GUIDs, ...)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceFile:
    """A non-disk file of the VM (configuration, NVRAM, saved state, ...)."""

    name: str  # relative path inside the VM
    size: int
    mode: int
    mtime_ns: int
    open: Callable[[], IO[bytes]]


@dataclass
class PreviousBackup:
    """What the engine knows of the last good snapshot of the same source."""

    snapshot_id: str
    #: disk name -> the ``cbt`` state recorded for it
    disks: dict[str, dict[str, Any]]


class BackupSession(ABC):
    #: VM facts recorded in the snapshot: name, id, hypervisor, generation, ...
    vm: dict[str, Any]
    disks: list[SourceDisk]
    files: list[SourceFile]
    #: one of CONSISTENCY_LEVELS
    consistency: str
    #: things the user must hear about (fallbacks, lost change tracking, ...)
    warnings: list[str]
    #: connector-specific record of the checkpoint tree etc., stored verbatim in the snapshot
    extra: dict[str, Any]

    def complete(self, snapshot_id: str) -> None:  # noqa: B027 - optional hook
        """The snapshot is safely stored: commit change-tracking state."""

    @abstractmethod
    def close(self) -> None:
        """Leave nothing behind, whether or not ``complete`` was called. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Source(ABC):
    #: "files", "qemu", "hyperv", "hyperv-lab", ...
    kind: str
    #: canonical location; snapshots of the same location form one history
    location: str

    @abstractmethod
    def open_session(self, previous: PreviousBackup | None) -> BackupSession:
        """Freeze a consistent view. Raises HypervisorError/SourceError with nothing left behind."""

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

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import IO, Any, Self, TypeVar

from vmvault.disk.base import DiskImage
from vmvault.errors import ConfigError, HypervisorError, VmvaultError

__all__ = [
    "CONNECTOR_OPTIONS",
    "CONSISTENCY_LEVELS",
    "DEFAULT_OPTIONS",
    "TRACKING_SAMPLE",
    "BackupOptions",
    "BackupSession",
    "PreviousBackup",
    "Registration",
    "RestoreNote",
    "RestoredVm",
    "Source",
    "SourceDisk",
    "SourceFile",
    "open_or_clean_up",
]

#: from weakest to strongest; recorded in every snapshot
CONSISTENCY_LEVELS = ("crash-consistent", "filesystem-consistent", "application-consistent", "offline")


@dataclass(frozen=True)
class BackupOptions:
    """How to back up a source: one typed value from the command line (``vmvault backup``
    flags) or the daemon's configuration (``[sources.NAME]`` and ``[jobs.NAME]`` keys) to the
    engine and the connector's ``open_session``. Nothing reaches a connector any other way (no
    environment variable, no module global), so two jobs of one daemon with different
    options never see each other's.

    ``allow_crash_consistent``, ``exclude`` and ``full`` apply to every source; the options in
    :data:`CONNECTOR_OPTIONS` only to connectors whose registry entry lists them
    (``vmvault.hypervisors.registry``), and giving one to another connector is an error
    rather than silently nothing.
    """

    #: when an application-consistent checkpoint fails (VSS in the guest), take a
    #: crash-consistent one instead of failing (recorded in the snapshot and warned about)
    allow_crash_consistent: bool = False
    #: disks and files not to back up: shell patterns matched against the stored name and its
    #: last component (``*.iso``, ``Virtual Hard Disks/scratch.vhdx``); a pattern leaving out a
    #: checkpoint layer must leave out its whole disk (the base)
    exclude: tuple[str, ...] = ()
    #: ignore change tracking: read every allocated byte (deduplication still applies)
    full: bool = False
    #: where a connector keeps temporary files during the backup (QEMU's fleecing overlays)
    scratch_dir: str | None = None
    #: folders outside a VM folder (or an image's folder) where disk parents may be
    allow_parent_dirs: tuple[str, ...] = ()
    #: follow links in a VM folder that lead inside it or into an ``allow_parent_dirs`` folder
    follow_links: bool = False
    #: on an incremental, re-read this many chunks the change tracking calls unchanged and
    #: compare them with the parent snapshot (a difference: loud warning, the disk read whole)
    tracking_sample: int = 0

    def __post_init__(self) -> None:
        # tuples whatever the caller passed (a list from argparse or TOML), so the value stays
        # hashable and nobody can change it behind a session's back
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "allow_parent_dirs", tuple(self.allow_parent_dirs))
        for pattern in self.exclude:
            if not isinstance(pattern, str) or not pattern.strip() or not pattern.isprintable():
                raise ConfigError(f"exclude pattern {pattern!r}: give a non-empty, printable shell pattern")
        for d in self.allow_parent_dirs:
            if not isinstance(d, str) or not d.strip():
                raise ConfigError(f"allowed parent folder {d!r} must be a non-empty path")
        if self.scratch_dir is not None and (not isinstance(self.scratch_dir, str) or not self.scratch_dir.strip()):
            raise ConfigError(f"scratch folder {self.scratch_dir!r} must be a non-empty path")
        if (
            isinstance(self.tracking_sample, bool)
            or not isinstance(self.tracking_sample, int)
            or not (0 <= self.tracking_sample <= 1 << 20)
        ):
            raise ConfigError(f"tracking sample {self.tracking_sample!r}: give a number of chunks from 0 to {1 << 20}")

    def parent_folders(self) -> list[str]:
        """``allow_parent_dirs`` as absolute paths; ConfigError for one that is not a folder."""
        found: list[str] = []
        for d in self.allow_parent_dirs:
            if not os.path.isdir(d):
                raise ConfigError(f"allowed parent folder {d!r} is not a folder")
            found.append(os.path.abspath(d))
        return found

    def given(self) -> frozenset[str]:
        """The names of the options set to something other than their default."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) != f.default)

    def merged(self, more: BackupOptions) -> BackupOptions:
        """These options with ``more`` added: lists joined (duplicates once), flags or-ed, a
        scratch folder taken from ``more`` when it gives one (the daemon's job over its source)."""
        return BackupOptions(
            allow_crash_consistent=self.allow_crash_consistent or more.allow_crash_consistent,
            exclude=tuple(dict.fromkeys(self.exclude + more.exclude)),
            full=self.full or more.full,
            scratch_dir=more.scratch_dir if more.scratch_dir is not None else self.scratch_dir,
            allow_parent_dirs=tuple(dict.fromkeys(self.allow_parent_dirs + more.allow_parent_dirs)),
            follow_links=self.follow_links or more.follow_links,
            tracking_sample=more.tracking_sample if more.tracking_sample else self.tracking_sample,
        )


#: options only some connectors take (the rest apply to every source)
CONNECTOR_OPTIONS = frozenset({"scratch_dir", "allow_parent_dirs", "follow_links"})
#: what a backup does when nobody says otherwise
DEFAULT_OPTIONS = BackupOptions()
#: chunks the CLI and the daemon re-read on an incremental to check the change tracking
#: (``BackupOptions.tracking_sample``; the engine's own default is 0: callers choose)
TRACKING_SAMPLE = 8


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
    #: the file to store; None when it vanished or was replaced since the connector found it
    #: (the connector has added a warning saying so, and the snapshot goes without it)
    open: Callable[[], IO[bytes] | None]


@dataclass
class PreviousBackup:
    """What the engine knows of the last good snapshot of the same source."""

    snapshot_id: str
    #: disk name -> the ``cbt`` state recorded for it
    disks: dict[str, dict[str, Any]]
    #: disk name -> the format the snapshot recorded it in (a source that tells formats by
    #: content keeps a raw disk raw: ``Source.formats_pinned``)
    formats: dict[str, str] = field(default_factory=dict)


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

    def before_snapshot(self) -> None:  # noqa: B027 - optional hook
        """Every disk and file has been read; raise (SourceError) if what was read is no longer
        a consistent view (an offline VM was started meanwhile). Nothing is stored then."""

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


_S = TypeVar("_S", bound=BackupSession)


def open_or_clean_up(session: _S, open_session: Callable[[], object], location: str) -> _S:
    """``open_session()`` (the connector's freeze of ``session``), or, when it fails, ``session``
    closed so nothing is left behind and the error raised: a VmvaultError as it is (a cleanup
    failure noted on it), anything unforeseen as a HypervisorError naming ``location``."""
    try:
        open_session()
    except BaseException as exc:
        try:
            session.close()
        except VmvaultError as cleanup:
            exc.add_note(f"cleanup after the failure also failed: {cleanup}")
        if isinstance(exc, VmvaultError) or not isinstance(exc, Exception):
            raise
        raise HypervisorError(f"{location}: opening the backup session failed: {exc!r}") from exc
    return session


class Source(ABC):
    """What to back up, parsed from a source argument by its connector (the registry's
    ``open_source``); how to back it up comes with each ``open_session``."""

    #: "files", "qemu", "hyperv", "hyperv-lab", ...: one of its registry entry's ``kinds``
    kind: str
    #: canonical location; snapshots of the same location form one history
    location: str
    #: whether ``open_session`` is given the previous snapshot also for a backup that reads
    #: every byte (``--full``), with no change tracking state: a source without change
    #: tracking that tells a disk's format by its content reads it in the recorded format
    #: (a guest writes the content of its raw disk, and could make it look like another format)
    formats_pinned: bool = False

    @abstractmethod
    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        """Freeze a consistent view, honouring ``options``. Raises HypervisorError/SourceError
        (ConfigError for options it cannot honour) with nothing left behind."""


@dataclass(frozen=True)
class Registration:
    """``restore --define [--start]``: register the restored VM with libvirt."""

    #: the libvirt connection; None: the snapshot's own (libvirt snapshots), else the default
    uri: str | None = None
    #: start the domain once it is defined
    start: bool = False
    #: ``kvm`` or ``qemu`` (plain emulation) for a domain built from facts; None: kvm when offered
    domain_type: str | None = None


@dataclass(frozen=True)
class RestoredVm:
    """What a restore wrote, as handed to the connector that made the snapshot (its registry
    entry's ``after_restore``), which may then give a clone its identity, write a definition
    to start the VM with, or say how to register it."""

    #: the snapshot's ``source.kind``
    kind: str
    #: the snapshot's ``vm`` record, as the backup stored it (also for a clone)
    vm: Mapping[str, Any]
    #: the folder the VM was restored into
    folder: str
    #: stored disk name (as in the snapshot, before any clone renaming) -> restored file, for
    #: every disk and layer written
    disks: Mapping[str, str]
    #: stored disk name -> format written
    formats: Mapping[str, str]
    #: stored file name (as in the snapshot) -> restored file, for the other files written
    files: Mapping[str, str]
    #: the new VM's name for ``--as-clone``, else None
    clone_name: str | None = None
    #: only some disks or files were asked for (``--include``)
    partial: bool = False
    #: register the restored VM with libvirt (``--define``), else None
    register: Registration | None = None


@dataclass
class RestoreNote:
    """What a connector's ``after_restore`` did: facts for ``--json`` and lines for the summary."""

    facts: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

"""Restore a VM: the snapshot's folder, as it was or as a clone, then its connector's step.

For offline VM folders (and image files) a clone is the restored folder with every file and
disk whose name carries the VM's name renamed to the clone's name, so both can sit side by
side. Then the connector that made the snapshot (found in the connector registry by the
snapshot's ``source.kind``) does what it knows: QEMU writes a script and a libvirt domain
(with a new UUID and MAC addresses for a clone), the Hyper-V lab host imports a clone with
a new VM ID, Hyper-V says how to register the folder on a host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from vmvault.disk import DIFFERENCING_FORMATS
from vmvault.errors import ConfigError
from vmvault.hypervisors.base import Registration, RestoredVm, RestoreNote
from vmvault.hypervisors.registry import connector_for_kind
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

from .progress import ProgressReporter
from .restore import RestoreResult, restore, restore_selected, safe_relpath, select

__all__ = [
    "MAX_CLONE_NAME",
    "VmRestore",
    "after_restore",
    "check_clone_name",
    "check_register",
    "restore_clone",
    "restore_vm",
]


@dataclass
class VmRestore:
    """A restore and what the snapshot's connector did after it."""

    result: RestoreResult
    note: RestoreNote = field(default_factory=RestoreNote)


def _renamed(name: str, old: str, new: str) -> str:
    head, tail = os.path.split(name)
    return os.path.join(head, tail.replace(old, new)) if old and old in tail else name


#: a clone's name becomes a folder name and part of file names: it must fit one name of the
#: file system with room for what surrounds it in renamed files
MAX_CLONE_NAME = 200


def check_clone_name(clone_name: str) -> None:
    """Refuse a clone name that cannot name a folder (empty, a path, a NUL byte, too long)."""
    if not clone_name or not clone_name.strip():
        raise ConfigError("--as-clone needs a name for the new VM; an empty one is not a name")
    if "/" in clone_name or "\\" in clone_name or clone_name in (".", "..") or "\0" in clone_name:
        raise ConfigError(f"invalid clone name {clone_name!r}: it must be one folder name, not a path")
    if len(clone_name.encode("utf-8", "surrogateescape")) > MAX_CLONE_NAME:
        raise ConfigError(
            f"the clone name is {len(clone_name.encode('utf-8', 'surrogateescape'))} bytes; "
            f"at most {MAX_CLONE_NAME} fit a folder name"
        )


def _as_clone(snap: Snapshot, clone_name: str) -> Snapshot:
    """``snap`` with the names of a clone (its disks and files in the same order)."""
    check_clone_name(clone_name)
    old = str(snap.vm.get("name") or "")
    return replace(
        snap,
        disks=[
            replace(
                d,
                name=_renamed(d.name, old, clone_name),
                parent=_renamed(d.parent, old, clone_name) if d.parent else None,
            )
            for d in snap.disks
        ],
        files=[replace(f, name=_renamed(f.name, old, clone_name)) for f in snap.files],
        vm=snap.vm | {"name": clone_name, "cloned_from": old},
    )


def after_restore(
    snap: Snapshot,
    result: RestoreResult,
    *,
    restored_as: Snapshot | None = None,
    clone_name: str | None = None,
    partial: bool = False,
    register: Registration | None = None,
) -> RestoreNote:
    """Run the step of the connector that made ``snap`` (nothing for a kind no connector owns);
    with ``register``, its ``define`` step instead, which also registers the VM with libvirt.

    ``restored_as`` is the snapshot as it was restored when that differs (a clone's names, in
    the same order); the connector sees the snapshot's own names and ``vm`` record.
    """
    connector = connector_for_kind(str(snap.source.get("kind")))
    step = connector.define if connector is not None and register is not None else None
    if connector is not None and register is None:
        step = connector.after_restore
    if connector is None or step is None:
        return RestoreNote()
    as_restored = restored_as or snap
    disk_name = {new.name: d.name for new, d in zip(as_restored.disks, snap.disks, strict=True)}
    # (the engine names restored files below the target as given, which may be relative)
    disks = {disk_name[d["name"]]: os.path.abspath(d["path"]) for d in result.disks}
    formats = {disk_name[d["name"]]: d["format"] for d in result.disks}
    written = {os.path.abspath(p) for p in result.files}
    files: dict[str, str] = {}
    for new, f in zip(as_restored.files, snap.files, strict=True):
        path = os.path.join(result.target, safe_relpath(new.name))
        if path in written:
            files[f.name] = path
    restored = RestoredVm(
        kind=str(snap.source.get("kind")),
        vm=snap.vm,
        folder=result.target,
        disks=disks,
        formats=formats,
        files=files,
        clone_name=clone_name,
        partial=partial,
        register=register,
    )
    try:
        note: RestoreNote = connector.load(step)(restored)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        # the vm record comes from the storage: a malformed one is bad input, not a crash
        raise ConfigError(
            f"snapshot {snap.short_id}: its record of the VM is malformed ({type(exc).__name__}: {str(exc)[:120]}); "
            f"the files are restored in {result.target}, but no VM could be defined from them"
        ) from exc
    return note


def check_register(snap: Snapshot, *, format: str | None, include: list[str] | None) -> None:
    """Refuse ``restore --define`` before anything is written when it cannot work: a kind
    no connector can register, a partial restore, or disks libvirt would not run."""
    kind = str(snap.source.get("kind"))
    connector = connector_for_kind(kind)
    if connector is None or connector.define is None:
        raise ConfigError(f"--define: snapshots of kind {kind!r} cannot be registered with libvirt")
    if include:
        raise ConfigError("--define needs the whole VM restored, not --include")
    formats = {format or d.format for d in snap.disks}
    if not formats <= {"raw", "qcow2"}:
        raise ConfigError(
            f"--define: libvirt runs raw and qcow2 disks, this snapshot has {', '.join(sorted(formats))}; "
            "add --format qcow2"
        )


def restore_vm(
    repo: Repository,
    snap: Snapshot,
    target: str,
    *,
    clone_name: str | None = None,
    format: str | None = None,
    flatten: bool = False,
    include: list[str] | None = None,
    progress: ProgressReporter | None = None,
    register: Registration | None = None,
    numeric_owner: bool = False,
) -> VmRestore:
    """Restore ``snap`` into ``target`` (as a clone: into ``target/clone_name``, with the names
    and identity of a new VM), then run its connector's step; ``register`` also defines the
    VM with libvirt (and starts it), never over an existing domain."""
    if register is not None:
        check_register(snap, format=format, include=include)
    if clone_name is None:
        result = restore(
            repo,
            snap,
            target,
            format=format,
            flatten=flatten,
            include=include,
            progress=progress,
            numeric_owner=numeric_owner,
        )
        return VmRestore(result, after_restore(snap, result, partial=bool(include), register=register))
    clone = _as_clone(snap, clone_name)
    # ``include`` names what the snapshot calls its disks and files, not the clone's new names
    # a format without parents (raw) cannot hold the layers: flatten them
    flatten = flatten or (
        any(d.layer for d in snap.disks) and format is not None and format not in DIFFERENCING_FORMATS
    )
    selected = select(snap, include, flatten=flatten)
    names = zip(
        [d.name for d in snap.disks] + [f.name for f in snap.files],
        [d.name for d in clone.disks] + [f.name for f in clone.files],
        strict=True,
    )
    chosen = None if selected is None else {new for old, new in names if old in selected}
    result = restore_selected(
        repo,
        clone,
        target,
        format=format,
        flatten=flatten,
        selected=chosen,
        subfolder=clone_name,  # created, or an existing real folder; never a link
        progress=progress,
        numeric_owner=numeric_owner,
    )
    note = after_restore(
        snap, result, restored_as=clone, clone_name=clone_name, partial=bool(include), register=register
    )
    return VmRestore(result, note)


def restore_clone(
    repo: Repository,
    snap: Snapshot,
    target: str,
    clone_name: str,
    *,
    format: str | None = None,
    flatten: bool = False,
    include: list[str] | None = None,
    progress: ProgressReporter | None = None,
    numeric_owner: bool = False,
) -> RestoreResult:
    """Restore ``snap`` into ``target/clone_name`` with names and identity of a new VM.

    ``include`` selects by the snapshot's (original) names. The clone's folder is created, or
    an existing real folder is used; a link there is refused, as everywhere in a restore target.
    """
    done = restore_vm(
        repo,
        snap,
        target,
        clone_name=clone_name,
        format=format,
        flatten=flatten,
        include=include,
        progress=progress,
        numeric_owner=numeric_owner,
    )
    return done.result

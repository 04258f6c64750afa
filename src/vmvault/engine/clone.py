"""Restore as a clone: a new VM with its own name and identity beside the original.

For offline VM folders (and image files) the clone is the restored folder with every file
and disk whose name carries the VM's name renamed to the clone's name, so both can sit side
by side. Connectors that know more (QEMU: UUID, MAC addresses; Hyper-V: VM ID, registration)
add their own step through ``CLONE_HOOKS``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import replace

from vmvault.errors import ConfigError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

from .progress import Progress
from .restore import RestoreResult, restore

__all__ = ["CLONE_HOOKS", "restore_clone"]

#: source kind -> function(result, snapshot, clone name) that gives the clone its identity
CLONE_HOOKS: dict[str, Callable[[RestoreResult, Snapshot, str], None]] = {}
#: connectors whose module may define ``clone_hook`` (same signature), looked up on use so
#: connectors need not import the engine
_HOOK_MODULES = {"hyperv-lab": "vmvault.hypervisors.hyperv_lab", "hyperv": "vmvault.hypervisors.hyperv"}


def _renamed(name: str, old: str, new: str) -> str:
    head, tail = os.path.split(name)
    return os.path.join(head, tail.replace(old, new)) if old and old in tail else name


def restore_clone(
    repo: Repository,
    snap: Snapshot,
    target: str,
    clone_name: str,
    *,
    format: str | None = None,
    flatten: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore ``snap`` into ``target/clone_name`` with names and identity of a new VM."""
    if not clone_name or "/" in clone_name or clone_name in (".", ".."):
        raise ConfigError(f"invalid clone name {clone_name!r}")
    old = str(snap.vm.get("name") or "")
    clone = replace(
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
    folder = os.path.join(target, clone_name)
    result = restore(repo, clone, folder, format=format, flatten=flatten, progress=progress)
    kind = str(snap.source.get("kind"))
    hook = CLONE_HOOKS.get(kind)
    if hook is None and kind in _HOOK_MODULES:
        hook = getattr(importlib.import_module(_HOOK_MODULES[kind]), "clone_hook", None)
    if hook is not None:
        hook(result, clone, clone_name)
    return result

"""A Hyper-V VM as files: configuration, disks and the checkpoint tree, read from a folder.

Hyper-V lays a VM out as (also the layout ``Export-VM`` writes)::

    VMNAME/
      Virtual Machines/<VM-ID>.vmcx   (2016+; .xml before)  + <VM-ID>.vmgs, <VM-ID>.VMRS, ...
      Virtual Hard Disks/VMNAME.vhdx                        the base disk(s)
      Virtual Hard Disks/VMNAME_<GUID>.avhdx                checkpoint children, beside their parent
      Snapshots/<CHECKPOINT-ID>.vmcx                        one configuration per checkpoint

A checkpoint's configuration names the disk files frozen when it was taken (the layer it
owns); the VM's configuration names the current leaves, whose ``.avhdx`` chains lead back
through the checkpoints' layers to the base ``.vhdx``. Disk files are linked by their own
parent locators (opened with our VHDX reader), not by what a configuration claims, so a
configuration that cannot be read still leaves a usable model: its disks are discovered from
the files, and ``config_error`` says why.

Key names used for checkpoints (``properties/parent_snapshot_id``, ``properties/snapshot_type``)
are the ones the lab host writes; real VMCX files have not been checked for them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from vmvault.disk import detect_format, open_image
from vmvault.errors import FormatError, SourceError, VmvaultError
from vmvault.hypervisors._vmcx import VmConfig, parse_config

__all__ = [
    "CONFIG_SUFFIXES",
    "RCT_SUFFIX",
    "Checkpoint",
    "DiskFile",
    "HyperVVm",
    "discover",
    "discover_all",
    "resolve_pathname",
]

CONFIG_SUFFIXES = (".vmcx", ".xml")
DISK_FILE_SUFFIXES = (".vhdx", ".avhdx", ".vhd", ".avhd")
#: change-tracking state beside a disk (Hyper-V: .rct/.mrt; the lab host: .rct JSON)
RCT_SUFFIX = ".rct"
TRACKING_SUFFIXES = (".rct", ".mrt")


@dataclass
class DiskFile:
    path: str
    rel: str
    format: str
    parent: str | None  # resolved parent path (None for a base disk)
    virtual_size: int
    file_size: int
    error: str | None = None


@dataclass
class Checkpoint:
    id: str
    name: str
    parent_id: str
    created: float | None
    type: str
    config_path: str
    #: slot -> the disk file this checkpoint froze (the layer it owns)
    disks: dict[str, str] = field(default_factory=dict)

    @property
    def is_recovery(self) -> bool:
        return self.type.lower() == "recovery"


@dataclass
class HyperVVm:
    folder: str
    name: str
    vm_id: str
    generation: int
    config_path: str | None
    config_error: str | None
    checkpoints: list[Checkpoint]
    #: slot -> current leaf disk file
    current: dict[str, str]
    parent_checkpoint_id: str
    disks: dict[str, DiskFile]
    #: other files (configuration, NVRAM, saved state), relative to the folder
    other_files: list[str]
    warnings: list[str] = field(default_factory=list)
    #: slot -> pathname the VM's configuration names but no file here matches
    missing: dict[str, str] = field(default_factory=dict)

    # ---- the disk graph -------------------------------------------------------------------

    def children(self, path: str) -> list[str]:
        return sorted(p for p, d in self.disks.items() if d.parent == path)

    def chain(self, path: str) -> list[str]:
        """``path`` and its ancestors, base first."""
        out: list[str] = []
        node: str | None = path
        while node is not None and node not in out:
            out.append(node)
            d = self.disks.get(node)
            node = d.parent if d is not None else None
        return list(reversed(out))

    def referenced(self) -> set[str]:
        """Every disk file some configuration (the VM's or a checkpoint's) depends on."""
        refs: set[str] = set()
        for leaf in list(self.current.values()) + [p for c in self.checkpoints for p in c.disks.values()]:
            refs.update(self.chain(leaf))
        return refs

    def orphans(self) -> list[str]:
        if self.config_error is not None:
            return []  # without a configuration nothing can be called unreferenced
        refs = self.referenced()
        return sorted(p for p in self.disks if p not in refs)

    def checkpoint(self, cp_id: str) -> Checkpoint:
        for c in self.checkpoints:
            if c.id.upper() == cp_id.upper():
                return c
        raise SourceError(f"VM {self.name}: no checkpoint {cp_id}")

    def depth(self, cp: Checkpoint) -> int:
        by_id = {c.id: c for c in self.checkpoints}
        n, node, seen = 1, cp, {cp.id}
        while node.parent_id and node.parent_id in by_id and node.parent_id not in seen:
            node = by_id[node.parent_id]
            seen.add(node.id)
            n += 1
        return n

    def chain_depth(self) -> int:
        """Differencing levels under the current state (0 = no checkpoint)."""
        return max((len(self.chain(p)) - 1 for p in self.current.values()), default=0)

    def structure(self) -> dict[str, Any]:
        """A comparable description: files, disk parents, checkpoints (for tests and audits)."""
        return {
            "disks": {
                d.rel: (self.disks[d.parent].rel if d.parent in self.disks else d.parent) for d in self.disks.values()
            },
            "current": {slot: self.disks[p].rel if p in self.disks else p for slot, p in self.current.items()},
            "checkpoints": sorted(
                (c.id, c.name, c.parent_id, tuple(sorted((s, os.path.basename(p)) for s, p in c.disks.items())))
                for c in self.checkpoints
            ),
            "files": sorted(self.other_files),
        }


def _basename(pathname: str) -> str:
    return pathname.replace("\\", "/").rsplit("/", 1)[-1]


def resolve_pathname(
    pathname: str, folder: str, index: dict[str, str], renamed: tuple[str, str] | None = None
) -> str | None:
    """A configuration's (often Windows) disk path as a file here.

    The file of that name inside the VM folder (``index``: lower-case basename -> path) comes
    first: an exported, restored or cloned VM keeps its disks there while its configuration
    still names the old location. Then (``renamed=(old, new)``) the name with the VM's old
    name replaced, then the path as it is.
    """
    base = _basename(pathname)
    found = index.get(base.lower())
    if found is None and renamed is not None and renamed[0]:
        found = index.get(base.replace(renamed[0], renamed[1]).lower())
    if found is None and pathname and os.path.isfile(pathname):
        found = os.path.abspath(pathname)
    return found


def _read_config(path: str) -> VmConfig:
    tree = parse_config(path)
    return VmConfig.from_tree(tree, file_name=os.path.basename(path), path=path)


def _config_files(folder: str) -> list[str]:
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SourceError(f"{folder}: {exc.strerror}") from exc
    return [os.path.join(folder, n) for n in names if n.lower().endswith(CONFIG_SUFFIXES)]


def discover(folder: str, *, renamed: tuple[str, str] | None = None) -> HyperVVm:
    """The model of the VM in ``folder``. Raises SourceError when it is not a VM folder.

    ``renamed=(old, new)``: disk files may carry ``new`` where the configuration says ``old``
    (a clone restored under another name)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise SourceError(f"{folder}: no such VM folder")
    warnings: list[str] = []
    disk_paths: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            low = fname.lower()
            if low.endswith((*TRACKING_SUFFIXES, ".tmp")):
                continue  # change-tracking state and files being replaced are no part of the VM
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise SourceError(f"{full}: {exc.strerror}") from exc
            if not stat.S_ISREG(st.st_mode):
                continue
            if low.endswith(DISK_FILE_SUFFIXES):
                disk_paths.append(full)
            else:
                others.append(os.path.relpath(full, folder).replace(os.sep, "/"))

    disks: dict[str, DiskFile] = {}
    for path in disk_paths:
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        fsize = os.path.getsize(path)
        try:
            fmt = detect_format(path)
            with open_image(path) as img:
                parent = img.parent
                disks[path] = DiskFile(
                    path, rel, fmt, os.path.abspath(parent.path) if parent else None, img.size, fsize
                )
        except VmvaultError as exc:
            warnings.append(f"{rel}: cannot be opened: {exc}")
            disks[path] = DiskFile(path, rel, "vhdx", None, 0, fsize, error=str(exc))
    index = {os.path.basename(p).lower(): p for p in disk_paths}

    vm_configs = _config_files(os.path.join(folder, "Virtual Machines"))
    config_path: str | None = None
    config: VmConfig | None = None
    config_error: str | None = None
    if not vm_configs:
        config_error = "no configuration file in 'Virtual Machines'"
    elif len(vm_configs) > 1:
        config_error = f"{len(vm_configs)} configuration files in 'Virtual Machines'; expected one"
    else:
        config_path = vm_configs[0]
        try:
            config = _read_config(config_path)
        except FormatError as exc:
            config_error = str(exc)

    checkpoints: list[Checkpoint] = []
    current: dict[str, str] = {}
    missing: dict[str, str] = {}
    if config is not None:
        for drive in config.disks:
            found = resolve_pathname(drive.pathname, folder, index, renamed)
            if found is None:
                warnings.append(f"{drive.slot}: disk {drive.pathname} not found")
                missing[drive.slot] = drive.pathname
                continue
            current[drive.slot] = found
        for cpath in _config_files(os.path.join(folder, "Snapshots")):
            try:
                cc = _read_config(cpath)
            except FormatError as exc:
                warnings.append(f"checkpoint configuration unreadable: {exc}")
                continue
            cp_disks: dict[str, str] = {}
            for drive in cc.disks:
                p = resolve_pathname(drive.pathname, folder, index, renamed)
                if p is None:
                    warnings.append(f"checkpoint {cc.name}: disk {drive.pathname} not found")
                else:
                    cp_disks[drive.slot] = p
            cp_id = cc.vm_id or os.path.splitext(os.path.basename(cpath))[0].upper()
            checkpoints.append(
                Checkpoint(
                    cp_id,
                    cc.name,
                    cc.parent_checkpoint_id,
                    cc.creation_time,
                    cc.checkpoint_type or "standard",
                    cpath,
                    cp_disks,
                )
            )
        name, vm_id, generation = config.name, config.vm_id, config.generation
        parent_cp = config.parent_checkpoint_id
    else:
        warnings.append(
            f"VM configuration unreadable ({config_error}); disks discovered from the files and their parent locators"
        )
        has_child = {d.parent for d in disks.values() if d.parent}
        for i, path in enumerate(sorted(p for p in disks if p not in has_child)):
            current[f"file{i}"] = path
        name, vm_id, generation, parent_cp = os.path.basename(folder), "", 0, ""
    return HyperVVm(
        folder=folder,
        name=name,
        vm_id=vm_id,
        generation=generation,
        config_path=config_path,
        config_error=config_error,
        checkpoints=_tree_order(checkpoints),
        current=current,
        parent_checkpoint_id=parent_cp,
        disks=disks,
        other_files=others,
        warnings=warnings,
        missing=missing,
    )


def _tree_order(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Parents before children; siblings by creation time."""
    ids = {c.id for c in checkpoints}
    out: list[Checkpoint] = []
    pending = sorted(checkpoints, key=lambda c: (c.created or 0, c.id))
    placed: set[str] = set()
    while pending:
        ready = [c for c in pending if not c.parent_id or c.parent_id not in ids or c.parent_id in placed]
        if not ready:  # a cycle in damaged configurations: keep the rest in time order
            ready = pending
        for c in ready:
            out.append(c)
            placed.add(c.id)
        pending = [c for c in pending if c.id not in placed]
    return out


def discover_all(root: str) -> list[HyperVVm]:
    """``root`` itself when it is a VM folder, else every VM folder directly inside it."""
    root = os.path.abspath(root)
    if os.path.isdir(os.path.join(root, "Virtual Machines")) or os.path.isdir(os.path.join(root, "Virtual Hard Disks")):
        return [discover(root)]
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise SourceError(f"{root}: {exc.strerror}") from exc
    return [
        discover(os.path.join(root, n))
        for n in names
        if os.path.isdir(os.path.join(root, n, "Virtual Machines"))
        or os.path.isdir(os.path.join(root, n, "Virtual Hard Disks"))
    ]

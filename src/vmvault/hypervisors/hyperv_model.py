"""A Hyper-V VM as files: configuration, disks and the checkpoint tree, read from a folder.

Two layouts are read. A **VM folder** (``discover``) holds one VM; Hyper-V lays it out as
(also the layout ``Export-VM`` writes)::

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

A **host folder** (``discover_host``) is what a Hyper-V host keeps by default: every VM's
configuration in one shared folder (``C:\\ProgramData\\Microsoft\\Windows\\Hyper-V``), disks in a
shared ``Virtual Hard Disks`` (inside it, or its sibling
``C:\\ProgramData\\Microsoft\\Windows\\Virtual Hard Disks``, the default since Windows Server 2016)::

    HOST/
      Virtual Machines/<VM-ID>.vmcx + <VM-ID>.vmgs, <VM-ID>.VMRS, <VM-ID>/   one set per VM
      Snapshots/<CHECKPOINT-ID>.vmcx + .VMRS, <CHECKPOINT-ID>/              one set per checkpoint
      Virtual Hard Disks/*.vhdx, *.avhdx                                   every VM's disks

There is one VM per configuration. Files belong to a VM by name (its ID) or by reference: a
disk is the VM's when its configuration or one of its checkpoints' names it, or when it is
an ancestor (by the disks' own parent locators) of one that is; a disk no configuration
references is an orphan. A configuration that cannot be parsed still names its disks in its
bytes (UTF-16 strings in a VMCX, text in XML): those names count as references, so one
damaged configuration neither hides the other VMs' orphans nor makes its own disks look
orphaned. When it names none, the files no readable configuration claims are reported as
*unattributed* rather than as orphans.

Key names used for checkpoints (``properties/parent_snapshot_id``, ``properties/snapshot_type``)
are the ones the lab host writes; real VMCX files have not been checked for them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmvault import platform
from vmvault.disk import ParentRule, open_checked, open_image
from vmvault.errors import ConfigError, FormatError, SourceError, VmvaultError

# the configuration layout's public face: read here, written by whoever stands in for a host
# (the lab host of vmvault.testing), so no other package reaches into _vmcx
from vmvault.hypervisors._vmcx import (
    IDE_CONTROLLER,
    SCSI_CONTROLLER,
    ConfigTree,
    VmConfig,
    parse_config,
    render_xml_config,
)
from vmvault.hypervisors.walk import HINT_DISKS, HINT_HOST, HINT_VM, MAX_ENTRIES, regular_files, too_many

__all__ = [
    "CONFIG_SUFFIXES",
    "DISK_FOLDER",
    "IDE_CONTROLLER",
    "RCT_SUFFIX",
    "SCSI_CONTROLLER",
    "SNAPSHOT_FOLDER",
    "VM_FOLDER",
    "Checkpoint",
    "ConfigTree",
    "DiskFile",
    "HostFolder",
    "HyperVVm",
    "discover",
    "discover_all",
    "discover_host",
    "host_root",
    "is_host_folder",
    "render_xml_config",
    "resolve_pathname",
    "salvage_disk_names",
    "split_host_spec",
    "vm_folders",
]

CONFIG_SUFFIXES = (".vmcx", ".xml")
#: the folders of a VM folder and of a host folder
VM_FOLDER = "Virtual Machines"
SNAPSHOT_FOLDER = "Snapshots"
DISK_FOLDER = "Virtual Hard Disks"
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
    #: for an unreadable configuration: the disk files the names still legible in its bytes
    #: resolve to (``salvage_disk_names``); they stand in for its current disks
    salvaged: list[str] = field(default_factory=list)

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
        """Every disk file some configuration (the VM's or a checkpoint's) depends on. For an
        unreadable VM configuration the disks named legibly in it (``salvaged``) stand in for
        the current ones, which were only guessed from the files."""
        own = self.salvaged if self.config_error is not None else list(self.current.values())
        refs: set[str] = set()
        for leaf in [*own, *(p for c in self.checkpoints for p in c.disks.values())]:
            refs.update(self.chain(leaf))
        return refs

    def orphans(self) -> list[str]:
        """Disk files no configuration references (none can be named while the VM's
        configuration is unreadable and names no disk legibly: see ``unattributed``)."""
        if self.config_error is not None and not self.salvaged:
            return []
        refs = self.referenced()
        return sorted(p for p in self.disks if p not in refs)

    def unattributed(self) -> list[str]:
        """Disk files that are this VM's current disks or orphans, and nothing tells which: its
        configuration is unreadable and names no disk legibly, and no checkpoint names them."""
        if self.config_error is None or self.salvaged:
            return []
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


def _config_files(folder: str, hint: str = HINT_VM) -> list[str]:
    try:
        entries = platform.list_folder(folder, limit=MAX_ENTRIES)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno == errno.E2BIG:
            raise too_many(folder, MAX_ENTRIES, hint) from exc
        raise SourceError(f"{folder}: {exc.strerror}") from exc
    return [os.path.join(folder, n) for n, _ in entries if n.lower().endswith(CONFIG_SUFFIXES)]


def discover(folder: str, *, renamed: tuple[str, str] | None = None) -> HyperVVm:
    """The model of the VM in ``folder``. Raises SourceError when it is not a VM folder.

    ``renamed=(old, new)``: disk files may carry ``new`` where the configuration says ``old``
    (a clone restored under another name)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise SourceError(f"{folder}: no such VM folder")
    warnings: list[str] = []
    disk_paths: list[tuple[str, os.stat_result]] = []
    others: list[str] = []
    for full, st in regular_files([folder], warnings):
        low = os.path.basename(full).lower()
        if low.endswith((*TRACKING_SUFFIXES, ".tmp")):
            continue  # change-tracking state and files being replaced are no part of the VM
        if low.endswith(DISK_FILE_SUFFIXES):
            disk_paths.append((full, st))
        else:
            others.append(os.path.relpath(full, folder).replace(os.sep, "/"))

    disks: dict[str, DiskFile] = {}
    for path, st in disk_paths:
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        try:
            # the file the walk saw, not what its name leads to now (the folder's owner may
            # have swapped in a link to a host file or device since)
            with open_image(path, expect=(st.st_dev, st.st_ino)) as img:
                parent = img.parent
                disks[path] = DiskFile(
                    path, rel, img.format, os.path.abspath(parent.path) if parent else None, img.size, st.st_size
                )
        except VmvaultError as exc:
            warnings.append(f"{rel}: cannot be opened: {exc}")
            disks[path] = DiskFile(path, rel, "vhdx", None, 0, st.st_size, error=str(exc))
    index = {os.path.basename(p).lower(): p for p, _st in disk_paths}

    vm_configs = _config_files(os.path.join(folder, VM_FOLDER))
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
    salvaged: list[str] = []
    # checkpoints' configurations are read whatever became of the VM's: they name the frozen
    # disks, references that hold even when the VM's own configuration is unreadable
    for cpath in _config_files(os.path.join(folder, SNAPSHOT_FOLDER)):
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
    if config is not None:
        for drive in config.disks:
            found = resolve_pathname(drive.pathname, folder, index, renamed)
            if found is None:
                warnings.append(f"{drive.slot}: disk {drive.pathname} not found")
                missing[drive.slot] = drive.pathname
                continue
            current[drive.slot] = found
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
        for cfg_path in vm_configs:
            salvaged.extend(_salvage(cfg_path, lambda n: index.get(_basename(n).lower())))
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
        salvaged=sorted(set(salvaged)),
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


def _is_layout(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, VM_FOLDER)) or os.path.isdir(os.path.join(folder, DISK_FOLDER))


def vm_folders(root: str) -> list[str]:
    """``root`` itself when it is a VM folder or a host folder, else every such folder directly
    inside it."""
    root = os.path.abspath(root)
    if _is_layout(root):
        return [root]
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise SourceError(f"{root}: {exc.strerror}") from exc
    return [os.path.join(root, n) for n in names if _is_layout(os.path.join(root, n))]


def discover_all(root: str) -> list[HyperVVm]:
    """``root`` itself when it is a VM folder, else every VM folder directly inside it (each
    read as one VM; ``vm_folders`` and ``is_host_folder`` tell host folders apart)."""
    return [discover(f) for f in vm_folders(root)]


# ============================================================================ host folders


def is_host_folder(folder: str) -> bool:
    """Is ``folder`` a host folder (several VMs' configurations in one ``Virtual Machines``)?

    Yes with two or more configurations. With one, when the disks are not inside the folder
    but in the sibling ``Virtual Hard Disks`` (a host's default layout holding one VM), or when
    a checkpoint configuration names another VM (one whose configuration is gone).
    """
    try:
        configs = _config_files(os.path.join(folder, VM_FOLDER))
    except SourceError:
        return False
    if len(configs) >= 2:
        return True
    if len(configs) != 1:
        return False
    if not os.path.isdir(os.path.join(folder, DISK_FOLDER)) and _sibling_disk_folder(folder) is not None:
        return True
    own = _stem(os.path.basename(configs[0]))
    for cpath in _config_files(os.path.join(folder, SNAPSHOT_FOLDER)):
        try:
            owner = _read_tree(cpath)[1]
        except FormatError:
            continue
        if owner and owner != own:
            return True
    return False


def host_root(path: str) -> str:
    """The host folder ``path`` names: itself, or the parent of a ``Virtual Machines`` folder
    given directly."""
    path = os.path.abspath(path)
    if os.path.basename(path).lower() == VM_FOLDER.lower() and not _is_layout(path):
        return os.path.dirname(path)
    return path


def split_host_spec(spec: str) -> tuple[str, str] | None:
    """``HOSTFOLDER#VM`` -> (host folder, VM name or ID), when ``spec`` is not itself a path and
    a part of it before a ``#`` is a folder (the one holding ``Virtual Machines`` first, so folder
    and VM names may hold ``#`` too); else None."""
    if "#" not in spec or os.path.lexists(spec):
        return None
    splits = [
        (spec[:i], spec[i + 1 :])
        for i, c in enumerate(spec)
        if c == "#" and i and spec[i + 1 :] and os.path.isdir(spec[:i])
    ]
    if not splits:
        return None
    hosts = [(f, vm) for f, vm in splits if os.path.isdir(os.path.join(host_root(f), VM_FOLDER))]
    folder, vm = (hosts or splits)[0]
    return host_root(folder), vm


def _sibling_disk_folder(root: str) -> str | None:
    sibling = os.path.join(os.path.dirname(os.path.abspath(root)), DISK_FOLDER)
    return sibling if os.path.isdir(sibling) else None


#: where a disk's pathname survives in a configuration's bytes: its file suffix ...
_DISK_SUFFIX = re.compile(r"\.a?vhdx?(?![A-Za-z0-9])", re.IGNORECASE)
#: ... preceded by characters a path may hold (whatever comes before is cut off)
_NOT_IN_PATHS = frozenset(chr(c) for c in range(32)) | frozenset('"<>|?*')
#: bounds on the work one damaged (or hostile) configuration can cause
SALVAGE_READ = 16 * 1024 * 1024
SALVAGE_NAMES = 1000
SALVAGE_PATH = 4096


def salvage_disk_names(path: str) -> list[str]:
    """The disk pathnames still legible in a configuration file that does not parse: UTF-16LE
    strings (VMCX values; both byte alignments) and 8-bit text (XML, or UTF-16 XML). Empty
    when the file cannot be read at all. A guess, used only to keep disks from being called
    orphans, never to read them. Bounded: the first 16 MiB, 1000 names, 4096 characters each."""
    try:
        fd, _st = open_checked(path, block_devices=False, what="a VM configuration")
    except SourceError:
        return []
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(SALVAGE_READ)
    except OSError:
        return []
    texts = [data.decode("utf-16-le", "replace"), data[1:].decode("utf-16-le", "replace"), data.decode("latin-1")]
    names: dict[str, None] = {}
    for text in texts:
        previous = 0
        for m in _DISK_SUFFIX.finditer(text):
            start = m.start()
            # back to the first character no path holds, never past the previous name: every
            # character is looked at once at most
            lo = max(previous, start - SALVAGE_PATH)
            previous = m.end()
            i = start
            while i > lo and text[i - 1] not in _NOT_IN_PATHS:
                i -= 1
            if i < start:
                names[text[i : m.end()]] = None
            if len(names) >= SALVAGE_NAMES:
                return list(names)
    return list(names)


def _salvage(config_path: str, resolve: Callable[[str], str | None]) -> list[str]:
    """The disk files the legible names of an unreadable configuration resolve to."""
    out: list[str] = []
    for name in salvage_disk_names(config_path):
        found = resolve(name)
        if found is not None:
            out.append(found)
    return out


@dataclass
class HostFolder:
    """The VMs of a host folder (see the module documentation), one per configuration."""

    root: str
    #: where disk files were looked for: the root, the sibling ``Virtual Hard Disks``, extra ones
    disk_folders: list[str]
    #: one per configuration in ``Virtual Machines``; an unreadable one has ``config_error``
    vms: list[HyperVVm]
    #: every disk file found in ``disk_folders``, by path
    disks: dict[str, DiskFile]
    #: disk files no configuration references
    orphans: list[str]
    #: disk files no readable configuration references while an unreadable one names no disk
    #: legibly: they may be its disks or orphans
    unattributed: list[str]
    #: checkpoint configurations that belong to no VM here (their disks still count as referenced)
    stray_checkpoints: list[Checkpoint]
    #: files in ``Virtual Machines`` and ``Snapshots`` named after no VM and no checkpoint here
    stray_files: list[str]
    warnings: list[str]

    def location(self, vm: HyperVVm) -> str:
        """``HOSTFOLDER#NAME`` (``#ID`` when the name is not unique): what ``vmvault backup`` takes."""
        same = [v for v in self.vms if v.name.lower() == vm.name.lower()]
        return f"{self.root}#{vm.name if len(same) == 1 and vm.config_error is None else vm.vm_id or vm.name}"

    def select(self, selector: str) -> HyperVVm:
        """The VM ``selector`` names: its ID (braces optional), else its name (exactly, else
        ignoring case). SourceError when none does; ConfigError when several share the name."""
        wanted = selector.strip().strip("{}")
        for vm in self.vms:
            if vm.vm_id and vm.vm_id.upper() == wanted.upper():
                return vm
        for exact in (True, False):
            found = [v for v in self.vms if (v.name == selector if exact else v.name.lower() == selector.lower())]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                ids = ", ".join(v.vm_id or os.path.basename(v.config_path or "?") for v in found)
                raise ConfigError(f"{self.root}: {len(found)} VMs are named {selector!r} ({ids}); name one by its ID")
        known = ", ".join(sorted(v.name for v in self.vms)) or "none"
        raise SourceError(f"{self.root}: no VM named {selector!r} (VMs: {known})")


def _scan_disk_files(folders: list[str], warnings: list[str]) -> list[tuple[str, os.stat_result]]:
    """Disk files below ``folders`` with their ``lstat`` (regular files only; links are not
    followed), each once. A host folder holds a few dozen files per VM, and disk folders may be
    big: at most ten times a VM folder's entries are examined."""
    found = regular_files(folders, warnings, limit=10 * MAX_ENTRIES, hint=HINT_DISKS)
    return [(path, st) for path, st in found if os.path.basename(path).lower().endswith(DISK_FILE_SUFFIXES)]


def _resolver(index: dict[str, list[tuple[str, str]]], warnings: list[str]) -> Callable[[str], str | None]:
    """A function mapping a configuration's (Windows) disk path to the one disk file here it
    names: by file name; among several of that name (``index``: lower-case name -> (path, path
    below its searched folder)), the one whose path below its searched folder ends the
    configured path, else the one sharing the most trailing folders with it. None when nothing
    (or nothing unambiguous) matches."""

    def resolve(pathname: str) -> str | None:
        candidates = index.get(_basename(pathname).lower(), [])
        if len(candidates) <= 1:
            return candidates[0][0] if candidates else None
        want = [p.lower() for p in pathname.replace("\\", "/").split("/") if p][::-1]

        def score(candidate: tuple[str, str]) -> tuple[bool, int]:
            have = [p.lower() for p in candidate[1].split("/") if p][::-1]
            n = 0
            while n < min(len(want), len(have)) and want[n] == have[n]:
                n += 1
            return n == len(have), n

        ranked = sorted(candidates, key=score, reverse=True)
        if score(ranked[0]) == score(ranked[1]):
            paths = ", ".join(c[0] for c in ranked)
            warnings.append(f"disk {pathname} matches several files ({paths}); none taken")
            return None
        return ranked[0][0]

    return resolve


def _read_tree(path: str) -> tuple[VmConfig, str]:
    """A configuration and, for a checkpoint's, the ID of the VM it belongs to (``vm_id``)."""
    tree = parse_config(path)
    cfg = VmConfig.from_tree(tree, file_name=os.path.basename(path), path=path)
    conf = tree.get("configuration")
    props = conf.get("properties") if isinstance(conf, dict) else None
    owner = props.get("vm_id") if isinstance(props, dict) else None
    return cfg, str(owner or "").strip("{}").upper()


def _stem(name: str) -> str:
    return name.split(".", 1)[0].upper()


def _owned_files(folder: str, stem: str, root: str, warnings: list[str]) -> list[str]:
    """Files of ``folder`` named ``<stem>.*`` and everything in its subfolder ``<stem>``, as
    paths relative to ``root``; regular files only (anything else is named in a warning)."""
    out: list[str] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    stack = [os.path.join(folder, n) for n in reversed(names) if _stem(n) == stem]
    while stack:
        path = stack.pop()
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                stack.extend(os.path.join(path, n) for n in sorted(os.listdir(path), reverse=True))
            except OSError as exc:
                warnings.append(f"{rel}: cannot list: {exc.strerror}")
        elif stat.S_ISREG(st.st_mode):
            if not rel.lower().endswith((*TRACKING_SUFFIXES, ".tmp")):
                out.append(rel)
        else:
            warnings.append(f"{rel}: not a regular file; not part of the VM")
    return out


def discover_host(root: str, *, disk_folders: tuple[str, ...] = ()) -> HostFolder:
    """The VMs of the host folder ``root`` (see the module documentation).

    Disk files are looked for below ``root``, in its sibling ``Virtual Hard Disks`` and below
    ``disk_folders``; a configuration's disk path is matched to them by name (and, between
    files of one name, by its trailing folders), never opened where it points. Parents are
    followed only inside those folders. Raises SourceError when ``root`` has no ``Virtual
    Machines`` folder.
    """
    root = host_root(root)
    vm_dir, cp_dir = os.path.join(root, VM_FOLDER), os.path.join(root, SNAPSHOT_FOLDER)
    if not os.path.isdir(vm_dir):
        raise SourceError(f"{root}: no {VM_FOLDER!r} folder: not a Hyper-V host folder")
    folders = [root]
    sibling = _sibling_disk_folder(root)
    if sibling is not None:
        folders.append(sibling)
    folders.extend(os.path.abspath(f) for f in disk_folders)
    warnings: list[str] = []
    rule = ParentRule.inside(folders)

    disks: dict[str, DiskFile] = {}
    index: dict[str, list[tuple[str, str]]] = {}
    for path, st in _scan_disk_files(folders, warnings):
        inside = os.path.commonpath([root, path]) == root
        rel = os.path.relpath(path, root).replace(os.sep, "/") if inside else path
        fsize = st.st_size
        try:
            with open_image(path, rule=rule, expect=(st.st_dev, st.st_ino)) as img:
                parent = img.parent
                disks[path] = DiskFile(
                    path, rel, img.format, os.path.abspath(parent.path) if parent else None, img.size, fsize
                )
        except VmvaultError as exc:
            disks[path] = DiskFile(path, rel, "vhdx", None, 0, fsize, error=str(exc))
        under = next(os.path.relpath(path, f) for f in folders if os.path.commonpath([f, path]) == f)
        index.setdefault(os.path.basename(path).lower(), []).append((path, under.replace(os.sep, "/")))
    resolve = _resolver(index, warnings)

    def chain(path: str) -> list[str]:
        out: list[str] = []
        node: str | None = path
        while node is not None and node not in out:
            out.append(node)
            d = disks.get(node)
            node = d.parent if d is not None else None
        return out

    # checkpoint configurations, each with the VM it names (if it names one)
    checkpoints: list[tuple[Checkpoint, str]] = []
    referenced: set[str] = set()
    for cpath in _config_files(cp_dir, HINT_HOST):
        try:
            cc, owner = _read_tree(cpath)
        except FormatError as exc:
            warnings.append(f"checkpoint configuration unreadable: {exc}")
            for named in _salvage(cpath, resolve):
                referenced.update(chain(named))
            continue
        cp_disks: dict[str, str] = {}
        for drive in cc.disks:
            found = resolve(drive.pathname)
            if found is None:
                warnings.append(f"checkpoint {cc.name}: disk {drive.pathname} not found")
            else:
                cp_disks[drive.slot] = found
        cp_id = cc.vm_id or _stem(os.path.basename(cpath))
        cp = Checkpoint(
            cp_id, cc.name, cc.parent_checkpoint_id, cc.creation_time, cc.checkpoint_type or "standard", cpath, cp_disks
        )
        checkpoints.append((cp, owner))

    # one VM per configuration
    vms: list[HyperVVm] = []
    unreadable_without_names: list[HyperVVm] = []
    for cfg_path in _config_files(vm_dir, HINT_HOST):
        stem = _stem(os.path.basename(cfg_path))
        vm_warnings: list[str] = []
        try:
            cfg, _owner = _read_tree(cfg_path)
        except FormatError as exc:
            salvaged = sorted(set(_salvage(cfg_path, resolve)))
            vm = HyperVVm(
                folder=root,
                name=stem,
                vm_id=_guid_or_empty(stem),
                generation=0,
                config_path=cfg_path,
                config_error=str(exc),
                checkpoints=[],
                current={},
                parent_checkpoint_id="",
                disks={},
                other_files=[],
                warnings=vm_warnings,
                salvaged=salvaged,
            )
            if not salvaged:
                unreadable_without_names.append(vm)
            vms.append(vm)
            continue
        current: dict[str, str] = {}
        missing: dict[str, str] = {}
        for drive in cfg.disks:
            found = resolve(drive.pathname)
            if found is None:
                vm_warnings.append(f"{drive.slot}: disk {drive.pathname} not found")
                missing[drive.slot] = drive.pathname
            else:
                current[drive.slot] = found
        vm_id = cfg.vm_id or _guid_or_empty(stem)
        vms.append(
            HyperVVm(
                folder=root,
                name=cfg.name,
                vm_id=vm_id,
                generation=cfg.generation,
                config_path=cfg_path,
                config_error=None,
                checkpoints=[],
                current=current,
                parent_checkpoint_id=cfg.parent_checkpoint_id,
                disks={},
                other_files=[],
                warnings=vm_warnings,
                missing=missing,
            )
        )

    # each checkpoint to its VM: by the VM ID it names; else by its disks being ancestors of
    # the VM's current disks; else by its parent checkpoint's VM
    by_id = {v.vm_id.upper(): v for v in vms if v.vm_id}
    owner_of: dict[str, HyperVVm] = {}
    for cp, owner in checkpoints:
        if owner in by_id:
            owner_of[cp.id] = by_id[owner]
    for cp, _owner in checkpoints:
        if cp.id in owner_of or not cp.disks:
            continue
        for vm in vms:
            below = {p for leaf in [*vm.current.values(), *vm.salvaged] for p in chain(leaf)}
            if set(cp.disks.values()) <= below:
                owner_of[cp.id] = vm
                break
    for _ in range(len(checkpoints)):
        for cp, _owner in checkpoints:
            if cp.id not in owner_of and cp.parent_id in owner_of:
                owner_of[cp.id] = owner_of[cp.parent_id]
    strays: list[Checkpoint] = []
    for cp, _owner in checkpoints:
        vm_of = owner_of.get(cp.id)
        if vm_of is None:
            strays.append(cp)
        else:
            vm_of.checkpoints.append(cp)
        for p in cp.disks.values():
            referenced.update(chain(p))

    # each VM's files: its disks (by reference and parent locators), its named files
    claimed: set[str] = set()
    for vm in vms:
        vm.checkpoints = _tree_order(vm.checkpoints)
        leaves = [*vm.current.values(), *vm.salvaged, *(p for c in vm.checkpoints for p in c.disks.values())]
        own = {p for leaf in leaves for p in chain(leaf)}
        missing_parents = sorted(p for p in own if p not in disks)
        for p in missing_parents:
            vm.warnings.append(f"parent disk {p} is not among the files here")
        vm.disks = {p: disks[p] for p in sorted(own) if p in disks}
        for d in vm.disks.values():
            if d.error is not None:
                vm.warnings.append(f"{d.rel}: cannot be opened: {d.error}")
        referenced.update(own)
        stem = _stem(os.path.basename(vm.config_path or ""))
        vm.other_files = _owned_files(vm_dir, stem, root, vm.warnings)
        for cp in vm.checkpoints:
            vm.other_files += _owned_files(cp_dir, _stem(os.path.basename(cp.config_path)), root, vm.warnings)
        claimed.update(f.upper() for f in vm.other_files)
    for cp in strays:
        claimed.update(f.upper() for f in _owned_files(cp_dir, _stem(os.path.basename(cp.config_path)), root, []))
    stray_files = [
        rel for folder in (vm_dir, cp_dir) for rel in _loose_files(folder, root) if rel.upper() not in claimed
    ]

    unreferenced = sorted(p for p in disks if p not in referenced)
    return HostFolder(
        root=root,
        disk_folders=folders,
        vms=sorted(vms, key=lambda v: (v.name.lower(), v.vm_id)),
        disks=disks,
        orphans=[] if unreadable_without_names else unreferenced,
        unattributed=unreferenced if unreadable_without_names else [],
        stray_checkpoints=strays,
        stray_files=stray_files,
        warnings=warnings,
    )


def _loose_files(folder: str, root: str) -> list[str]:
    """Regular files directly in ``folder`` (relative to ``root``), except change-tracking and
    temporary files."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for n in names:
        path = os.path.join(folder, n)
        if os.path.isfile(path) and not os.path.islink(path) and not n.lower().endswith((*TRACKING_SUFFIXES, ".tmp")):
            out.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return out


def _guid_or_empty(text: str) -> str:
    try:
        return str(uuid.UUID(text.strip("{}"))).upper()
    except ValueError:
        return ""

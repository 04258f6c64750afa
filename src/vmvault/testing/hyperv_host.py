"""A Hyper-V host folder for tests and demos. TEST MACHINERY: production code never imports
``vmvault.testing``.

A real host keeps every VM's configuration in one shared folder (by default
``C:\\ProgramData\\Microsoft\\Windows\\Hyper-V``) and the disks in one shared
``Virtual Hard Disks`` (inside it, or its sibling, the default since Windows Server 2016)::

    HOST/Virtual Machines/<VM-ID>.vmcx, <VM-ID>.vmgs, <VM-ID>.VMRS
    HOST/Snapshots/<CHECKPOINT-ID>.vmcx
    HOST/Virtual Hard Disks/NAME.vhdx, NAME_<GUID>.avhdx      (or HOST/../Virtual Hard Disks/)

``HostFolderBuilder`` makes that layout on real VHDX files: VMs, guest writes and standard
checkpoints (a ``.avhdx`` child beside each current disk, the checkpoint's configuration
naming the frozen disks). Configurations name disks by the Windows paths a host would write
and are written as VMCX (``build_vmcx``) or in the XML form.

``build_vmcx`` writes a HyperVStorage container in the layout ``vmvault.hypervisors._vmcx``
reads (vhdx-format.md Appendix B): headers with CRC-32, an object table at 0x2000, key tables
of typed entries, file objects for values of 0x800 bytes and more. No real ``.vmcx`` file was
at hand; the reader's tests use the same builder.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from vmvault.disk import chain
from vmvault.disk.vhdx import create_vhdx, open_vhdx_for_write
from vmvault.hypervisors.hyperv_model import DISK_FOLDER, SNAPSHOT_FOLDER, VM_FOLDER, render_xml_config
from vmvault.testing.hyperv_lab import _config_tree

__all__ = ["KEY_TABLE_OFFSET", "WINDOWS_HOST_FOLDER", "HostFolderBuilder", "build_vmcx"]

MIB = 1024 * 1024
#: where a host keeps its VMs by default
WINDOWS_HOST_FOLDER = "C:\\ProgramData\\Microsoft\\Windows\\Hyper-V"

T_INT, T_UINT, T_DOUBLE, T_STRING, T_ARRAY, T_BOOL, T_NODE = 3, 4, 5, 6, 7, 8, 9
KEY_TABLE_OFFSET = 0x10000


def _entry(key: str, kind: int, value: bytes, parent: tuple[int, int], flags: int = 0) -> bytes:
    name = key.encode() + b"\0"
    size = 21 + len(name) + len(value)
    header = struct.pack("<HIHIIIB", kind | flags << 8, size, parent[0], parent[1], 0, 0, len(name))
    return header + name + value


def _header(seq: int, *, log_offset: int, version: int = 0x400, good: bool = True) -> bytes:
    fields = [0x01282014, 0, seq, version, 0, 0x1000, log_offset, 0x1000, 0x1000]
    raw = bytearray(struct.pack("<IIHIQIQQI", *fields))
    crc = zlib.crc32(bytes(raw)) & 0xFFFFFFFF
    raw[4:8] = struct.pack("<I", crc if good else crc ^ 1)
    return bytes(raw)


def build_vmcx(
    tree: dict[str, Any],
    *,
    seqs: tuple[int, int] = (1, 2),
    bad_header: int | None = None,
    version: int = 0x400,
    dirty_log: bool = False,
    large: int = 0x800,
    chain: str | None = None,
) -> bytes:
    """A HyperVStorage container holding ``tree`` (one key table, index 1). ``chain``: list the
    key table in a second object table at 0x4000 reached through a type-1 entry ("ok"), one
    that points back to the first ("loop"), or one without its signature ("bad")."""
    table = bytearray(struct.pack("<HHHI", 0x0002, 1, 1, 0))
    files: list[bytes] = []
    file_base = KEY_TABLE_OFFSET + 0x10000

    def add(node: dict[str, Any], parent: tuple[int, int]) -> None:
        for key, value in node.items():
            pos = len(table)
            if isinstance(value, dict):
                table.extend(_entry(key, T_NODE, bytes(12), parent))
                add(value, (1, pos))
                continue
            if isinstance(value, bool):
                kind, raw = T_BOOL, struct.pack("<I", int(value))
            elif isinstance(value, int):
                kind, raw = (T_INT, struct.pack("<q", value)) if value < 0 else (T_UINT, struct.pack("<Q", value))
            elif isinstance(value, float):
                kind, raw = T_DOUBLE, struct.pack("<d", value)
            elif isinstance(value, str):
                kind, raw = T_STRING, value.encode("utf-16-le")
            else:
                kind, raw = T_ARRAY, bytes(value)
            if kind in (T_STRING, T_ARRAY) and len(raw) >= large:
                offset = file_base + sum(-(-len(f) // 0x1000) * 0x1000 for f in files)
                files.append(raw)
                table.extend(_entry(key, kind, struct.pack("<IQ", len(raw), offset), parent, flags=1))
            elif kind in (T_STRING, T_ARRAY):
                table.extend(_entry(key, kind, struct.pack("<I", len(raw)) + raw, parent))
            else:
                table.extend(_entry(key, kind, raw, parent))

    add(tree, (0, 0))
    table.extend(bytes(21))  # size 0 ends the table
    objects = [(2, KEY_TABLE_OFFSET, -(-len(table) // 0x1000) * 0x1000)]
    pos = file_base
    for f in files:
        objects.append((3, pos, -(-len(f) // 0x1000) * 0x1000))
        pos += objects[-1][2]
    size = max(pos, KEY_TABLE_OFFSET + objects[0][2])
    out = bytearray(size)
    log_offset = 0x3000
    for slot, off in enumerate((0, 0x1000)):
        out[off : off + 0x2E] = _header(
            seqs[slot], log_offset=log_offset, version=version, good=bad_header not in (slot, -1)
        )
    out[log_offset : log_offset + 12] = struct.pack("<III", 0x01110003, 0, 1 if dirty_log else 0)
    first, second = objects, []
    if chain is not None:
        first, second = [(1, 0x4000, 0x1000), *objects[1:]], [objects[0]]
        if chain == "loop":
            second.append((1, 0x2000, 0x1000))
    for where, entries in ((0x2000, first), (0x4000, second)):
        if where == 0x4000 and chain is None:
            break
        ot = bytearray(struct.pack("<II", 0x01110001 if (where, chain) != (0x4000, "bad") else 0xBAD, len(entries)))
        for kind, off, n in entries:
            ot += struct.pack("<BIQIB", kind, 0, off, n, 1)
        out[where : where + len(ot)] = ot
    out[KEY_TABLE_OFFSET : KEY_TABLE_OFFSET + len(table)] = table
    pos = file_base
    for f in files:
        out[pos : pos + len(f)] = f
        pos += -(-len(f) // 0x1000) * 0x1000
    return bytes(out)


@dataclass
class _Vm:
    id: str
    name: str
    generation: int
    #: slot -> current leaf (a local path)
    current: dict[str, str]
    parent_checkpoint: str = ""
    checkpoints: list[str] = field(default_factory=list)


class HostFolderBuilder:
    """VMs in a host folder at ``root`` (created). ``disks_beside``: disks in the sibling
    ``Virtual Hard Disks`` (a host's default) instead of ``root/Virtual Hard Disks``;
    ``config_format``: ``vmcx`` or ``xml``."""

    def __init__(
        self,
        root: str,
        *,
        disks_beside: bool = False,
        config_format: str = "vmcx",
        windows_root: str = WINDOWS_HOST_FOLDER,
    ) -> None:
        self.root = os.path.abspath(root)
        self.config_format = config_format
        self.windows_root = windows_root
        if disks_beside:
            self.disk_folder = os.path.join(os.path.dirname(self.root), DISK_FOLDER)
            self.windows_disks = windows_root.rsplit("\\", 1)[0] + "\\" + DISK_FOLDER
        else:
            self.disk_folder = os.path.join(self.root, DISK_FOLDER)
            self.windows_disks = windows_root + "\\" + DISK_FOLDER
        for folder in (os.path.join(self.root, VM_FOLDER), os.path.join(self.root, SNAPSHOT_FOLDER), self.disk_folder):
            os.makedirs(folder, exist_ok=True)
        self.vms: dict[str, _Vm] = {}

    # ---- files -----------------------------------------------------------------------------

    def windows_path(self, local: str) -> str:
        """The path a host's configuration gives a disk file of ``disk_folder``."""
        return self.windows_disks + "\\" + os.path.basename(local)

    def config_path(self, vm_id: str) -> str:
        return os.path.join(self.root, VM_FOLDER, f"{vm_id}.{self.config_format}")

    def checkpoint_path(self, cp_id: str) -> str:
        return os.path.join(self.root, SNAPSHOT_FOLDER, f"{cp_id}.{self.config_format}")

    def _write_config(self, path: str, tree: dict[str, Any]) -> None:
        data = build_vmcx(tree) if self.config_format == "vmcx" else render_xml_config(tree)
        with open(path, "wb") as f:
            f.write(data)

    def _write_vm_config(self, vm: _Vm) -> None:
        tree = _config_tree(
            name=vm.name,
            global_id=vm.id,
            generation=vm.generation,
            drives={s: self.windows_path(p) for s, p in vm.current.items()},
            parent_snapshot_id=vm.parent_checkpoint,
            created=time.time(),
        )
        self._write_config(self.config_path(vm.id), tree)

    # ---- VMs -------------------------------------------------------------------------------

    def create_vm(self, name: str, disk_sizes: tuple[int, ...] = (8 * MIB,), *, generation: int = 2) -> str:
        """A new VM with empty dynamic disks ``NAME.vhdx``, ``NAME_1.vhdx``, ...; its ID."""
        vm_id = str(uuid.uuid4()).upper()
        kind = "scsi" if generation == 2 else "ide"
        current: dict[str, str] = {}
        for i, size in enumerate(disk_sizes):
            path = os.path.join(self.disk_folder, f"{name}.vhdx" if i == 0 else f"{name}_{i}.vhdx")
            if os.path.lexists(path):  # a second VM of the same name gets its own disks, as Hyper-V would
                path = os.path.join(self.disk_folder, f"{name}_{vm_id[:8]}_{i}.vhdx")
            create_vhdx(path, size, block_size=2 * MIB).close()
            current[f"{kind}0:{i}"] = path
        vm = self.vms[vm_id] = _Vm(vm_id, name, generation, current)
        self._write_vm_config(vm)
        for suffix, size in ((".vmgs", 4096), (".VMRS", 8192)):
            with open(os.path.join(self.root, VM_FOLDER, vm_id + suffix), "wb") as f:
                f.write(os.urandom(size))
        return vm_id

    def write(self, vm_id: str, slot: str, offset: int, data: bytes) -> None:
        """A guest write into the VM's current disk."""
        with open_vhdx_for_write(self.vms[vm_id].current[slot]) as w:
            w.write(offset, data)

    def checkpoint(self, vm_id: str, name: str, *, kind: str = "standard") -> str:
        """A checkpoint: a ``.avhdx`` child beside each current disk, which the VM uses from now
        on; the checkpoint's configuration names the frozen disks. Returns its ID."""
        vm = self.vms[vm_id]
        cp_id = str(uuid.uuid4()).upper()
        frozen = dict(vm.current)
        tree = _config_tree(
            name=name,
            global_id=cp_id,
            generation=vm.generation,
            drives={s: self.windows_path(p) for s, p in frozen.items()},
            parent_snapshot_id=vm.parent_checkpoint,
            created=time.time(),
            snapshot_type=kind,
            vm_id=vm.id,
        )
        self._write_config(self.checkpoint_path(cp_id), tree)
        vm.current = {slot: chain.checkpoint(leaf) for slot, leaf in frozen.items()}
        vm.parent_checkpoint = cp_id
        vm.checkpoints.append(cp_id)
        self._write_vm_config(vm)
        return cp_id

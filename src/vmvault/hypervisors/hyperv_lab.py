"""A Hyper-V "lab host": the host operations a backup depends on, done on real files.

There is no Windows host here, so this module implements what Hyper-V does to a VM's files
with our own VHDX engine, keeping the names, layout and parent locators Hyper-V uses:

* a VM is a folder (``Virtual Machines/<ID>.xml``, ``Virtual Hard Disks/``, ``Snapshots/``),
  see ``hyperv_model``; configurations are written in the XML form;
* a **standard checkpoint** creates, for every disk, a child ``<base>_<GUID>.avhdx`` beside
  the current leaf and redirects writes to it; the frozen parent is never written again;
* **apply** throws the current state's differencing files away and starts a new child of
  the checkpoint's frozen disks;
* **delete** merges: the checkpoint's frozen file takes in its only child's data and the
  child file disappears (what is left after a Hyper-V merge: the parent's file name);
  configurations that named the child now name the parent;
* a **recovery checkpoint** (a backup's) is the same, marked ``recovery``; ``convert`` merges
  it back and keeps a change-tracking **reference point**, like ``ConvertToReferencePoint``;
* **change tracking** (the analogue of RCT): every guest write is recorded, per disk, into
  every open reference point (``<base disk>.rct``, JSON, 64 KiB granularity);
* a **running VM** is a thread writing random data into the leaf disks while a backup runs,
  keeping a model of what every disk must contain.

Merges go through ``disk.chain.merge`` (crash-safe; the merged child's own children are
re-pointed). Limit (said where it bites): deleting a checkpoint whose frozen layer has several
children is refused (Hyper-V can; the lab does not need it).

``open_lab_source("hyperv-lab://DIR/VMNAME")`` backs a lab VM up the way the Hyper-V
connector backs up a real one: recovery checkpoint → read the frozen layers → changed ranges
against the previous reference point (else a full read with a warning) → convert. Every
failure removes the recovery checkpoint; ones left by a crashed run are removed at start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

from vmvault.disk import chain, open_image
from vmvault.disk.base import DiskImage, Extent, ExtentKind
from vmvault.disk.vhdx import VhdxWriter, create_vhdx, open_vhdx, open_vhdx_for_write
from vmvault.errors import ChangeTrackingError, ConfigError, HypervisorError, SourceError, VmvaultError
from vmvault.hypervisors._vmcx import IDE_CONTROLLER, SCSI_CONTROLLER, ConfigTree, render_xml_config
from vmvault.hypervisors.base import BackupSession, PreviousBackup, Source, SourceDisk, SourceFile
from vmvault.hypervisors.hyperv_model import RCT_SUFFIX, Checkpoint, HyperVVm, discover

__all__ = [
    "RECOVERY_MARKER",
    "LabHost",
    "LabSession",
    "LabSource",
    "RunningVm",
    "open_lab_source",
]

MIB = 1024 * 1024
#: every recovery checkpoint vmvault creates is named with this prefix (found again after a crash)
RECOVERY_MARKER = "vmvault-recovery"
#: change-tracking granularity of the lab (Hyper-V's RCT tracks in blocks of similar size)
RCT_BLOCK = 64 * 1024
#: reference points kept per disk (older ones are dropped, as Hyper-V drops old RCT ids)
RCT_KEEP = 4
#: fault injection for tests, also from the environment (comma-separated) for subprocesses
FAULT_ENV = "VMVAULT_LAB_FAULTS"

_running_lock = threading.Lock()
_running: dict[str, RunningVm] = {}


def _new_id() -> str:
    return str(uuid.uuid4()).upper()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ============================================================================ change tracking


class RctFile:
    """Reference points of one virtual disk: id -> set of changed 64 KiB blocks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.points: dict[str, set[int]] = {}
        self.pending: dict[str, set[int]] = {}
        self.order: list[str] = []
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
                self.points = {k: set(v) for k, v in doc["points"].items()}
                self.pending = {k: set(v) for k, v in doc["pending"].items()}
                self.order = list(doc["order"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ChangeTrackingError(f"{path}: change-tracking state unreadable: {exc}") from exc

    def save(self) -> None:
        doc = {
            "points": {k: sorted(v) for k, v in self.points.items()},
            "pending": {k: sorted(v) for k, v in self.pending.items()},
            "order": self.order,
        }
        _atomic_write(self.path, json.dumps(doc).encode())

    def record(self, offset: int, length: int) -> None:
        blocks = range(offset // RCT_BLOCK, (offset + length - 1) // RCT_BLOCK + 1)
        for s in list(self.points.values()) + list(self.pending.values()):
            s.update(blocks)

    def begin(self, ref: str) -> None:
        self.pending[ref] = set()

    def commit(self, ref: str) -> None:
        if ref in self.pending:
            self.points[ref] = self.pending.pop(ref)
            self.order.append(ref)
            while len(self.order) > RCT_KEEP:
                self.points.pop(self.order.pop(0), None)

    def discard(self, ref: str) -> None:
        self.pending.pop(ref, None)

    def reset(self) -> None:
        self.points, self.pending, self.order = {}, {}, []

    def changes(self, ref: str, size: int) -> list[tuple[int, int]] | None:
        blocks = self.points.get(ref)
        if blocks is None:
            return None
        out: list[tuple[int, int]] = []
        for b in sorted(blocks):
            off = b * RCT_BLOCK
            n = min(RCT_BLOCK, size - off)
            if n <= 0:
                continue
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((off, n))
        return out


# ============================================================================ the running VM


class RunningVm:
    """A writer thread standing in for a running guest: random writes into the leaf disks."""

    def __init__(
        self, host: LabHost, name: str, *, seed: int = 0, interval: float = 0.001, max_write: int = 64 * 1024
    ) -> None:
        self.host = host
        self.name = name
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self.interval = interval
        self.max_write = max_write
        self.writes = 0
        self.error: BaseException | None = None
        self._writers: dict[str, VhdxWriter] = {}
        self._stop = threading.Event()
        vm = host.model(name)
        self.leaves = dict(vm.current)
        self.rct = {slot: host._rct(vm, slot) for slot in vm.current}
        self.models: dict[str, bytearray] = {}
        #: recovery checkpoint id -> what each disk held when it was taken
        self.frozen: dict[str, dict[str, bytes]] = {}
        #: recovery checkpoint id -> guest writes made before it
        self.writes_at: dict[str, int] = {}
        for slot, path in self.leaves.items():
            with open_image(path) as img:
                self.models[slot] = bytearray(img.read(0, img.size))
        self._thread = threading.Thread(target=self._loop, name=f"lab-vm-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _writer(self, slot: str) -> VhdxWriter:
        w = self._writers.get(slot)
        if w is None:
            w = self._writers[slot] = open_vhdx_for_write(self.leaves[slot])
        return w

    def write(self, slot: str, offset: int, data: bytes) -> None:
        with self.lock:
            self._writer(slot).write(offset, data)
            self.models[slot][offset : offset + len(data)] = data
            self.host._record_write(self.name, slot, offset, len(data))
            self.writes += 1

    def release(self) -> None:
        """Close the leaf writers (everything flushed); they reopen on the next write."""
        with self.lock:
            writers, self._writers = self._writers, {}
            for w in writers.values():
                w.close()

    def retarget(self, leaves: dict[str, str]) -> None:
        with self.lock:
            self.release()
            self.leaves = dict(leaves)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                slot = self.rng.choice(sorted(self.models))
                size = len(self.models[slot])
                n = self.rng.randrange(1, self.max_write // 4096 + 1) * 4096
                off = self.rng.randrange(0, max(1, (size - n) // 4096)) * 4096
                self.write(slot, off, self.rng.randbytes(n))
                time.sleep(self.interval)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.release()
        with _running_lock:
            if _running.get(self.host.folder(self.name)) is self:
                del _running[self.host.folder(self.name)]
        if self.error is not None:
            raise HypervisorError(f"lab VM {self.name}: writer failed: {self.error}") from self.error


# ============================================================================ the host


def _controller_instance(vm_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "vmvault-lab-controller-" + vm_id)).upper()


def _config_tree(
    *,
    name: str,
    global_id: str,
    generation: int,
    drives: dict[str, str],
    parent_snapshot_id: str,
    created: float,
    snapshot_type: str = "",
    vm_id: str = "",
) -> ConfigTree:
    kind = "scsi" if generation == 2 else "ide"
    instance = _controller_instance(vm_id or global_id)
    props: dict[str, Any] = {
        "name": name,
        "global_id": global_id,
        "subtype": 1 if generation == 2 else 0,
        # FILETIME (100 ns since 1601), the form Hyper-V stores
        "creation_time": struct.pack("<Q", int((created + 11_644_473_600) * 10_000_000)),
        "parent_snapshot_id": parent_snapshot_id,
    }
    if snapshot_type:
        props["snapshot_type"] = snapshot_type
        props["vm_id"] = vm_id
    controllers: dict[str, Any] = {}
    for slot, path in sorted(drives.items()):
        ctrl, loc = slot.split(":")
        cidx = int(ctrl[len(kind) :])
        controllers.setdefault(f"controller{cidx}", {})[f"drive{int(loc)}"] = {"type": "VHD", "pathname": path}
    return {
        "configuration": {
            "properties": props,
            "manifest": {
                "vdev000": {"device": SCSI_CONTROLLER if kind == "scsi" else IDE_CONTROLLER, "instance": instance}
            },
            f"_{instance}_": controllers,
        }
    }


class LabHost:
    """VMs in folders under ``root``, operated on the way Hyper-V operates on them."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.faults: set[str] = {f for f in os.environ.get(FAULT_ENV, "").split(",") if f}

    # ---- helpers -------------------------------------------------------------------------

    def folder(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"invalid VM name {name!r}")
        return os.path.join(self.root, name)

    def model(self, name: str) -> HyperVVm:
        folder = self.folder(name)
        if not os.path.isdir(folder):
            raise SourceError(f"lab host {self.root}: no VM {name!r}")
        return discover(folder)

    def running(self, name: str) -> RunningVm | None:
        with _running_lock:
            return _running.get(self.folder(name))

    def fault(self, point: str) -> None:
        if point in self.faults:
            raise HypervisorError(f"lab host: injected failure at {point}")

    @contextlib.contextmanager
    def _quiesced(self, name: str) -> Iterator[RunningVm | None]:
        vm = self.running(name)
        if vm is None:
            yield None
            return
        with vm.lock:
            vm.release()
            yield vm
            vm.retarget(self.model(name).current)

    def _rct(self, vm: HyperVVm, slot: str) -> RctFile:
        running = self.running(os.path.basename(vm.folder))
        if running is not None and slot in running.rct:
            return running.rct[slot]  # the running VM's copy is the live one
        base = vm.chain(vm.current[slot])[0]
        return RctFile(os.path.splitext(base)[0] + RCT_SUFFIX)

    def _record_write(self, name: str, slot: str, offset: int, length: int) -> None:
        running = self.running(name)
        rct = running.rct[slot] if running is not None else self._rct(self.model(name), slot)
        rct.record(offset, length)
        rct.save()

    def _write_vm_config(self, vm: HyperVVm, drives: dict[str, str], parent_cp: str) -> None:
        if vm.config_path is None or vm.config_error is not None:
            # never overwrite a configuration we could not read
            raise HypervisorError(f"lab VM {vm.name}: configuration unusable ({vm.config_error})")
        created = os.stat(vm.config_path).st_mtime
        tree = _config_tree(
            name=vm.name,
            global_id=vm.vm_id,
            generation=vm.generation,
            drives=drives,
            parent_snapshot_id=parent_cp,
            created=created,
        )
        _atomic_write(vm.config_path, render_xml_config(tree))

    def _write_cp_config(self, vm: HyperVVm, cp: Checkpoint, drives: dict[str, str], created: float) -> None:
        tree = _config_tree(
            name=cp.name,
            global_id=cp.id,
            generation=vm.generation,
            drives=drives,
            parent_snapshot_id=cp.parent_id,
            created=created,
            snapshot_type=cp.type,
            vm_id=vm.vm_id,
        )
        _atomic_write(cp.config_path, render_xml_config(tree))

    # ---- VMs -----------------------------------------------------------------------------

    def create_vm(
        self, name: str, disk_sizes: tuple[int, ...] = (64 * MIB,), *, generation: int = 2, block_size: int = 2 * MIB
    ) -> HyperVVm:
        folder = self.folder(name)
        if os.path.exists(folder):
            raise ConfigError(f"{folder} exists")
        vm_id = _new_id()
        os.makedirs(os.path.join(folder, "Virtual Machines"))
        os.makedirs(os.path.join(folder, "Virtual Hard Disks"))
        os.makedirs(os.path.join(folder, "Snapshots"))
        kind = "scsi" if generation == 2 else "ide"
        drives: dict[str, str] = {}
        for i, size in enumerate(disk_sizes):
            fname = f"{name}.vhdx" if i == 0 else f"{name}_{i}.vhdx"
            path = os.path.join(folder, "Virtual Hard Disks", fname)
            create_vhdx(path, size, block_size=block_size).close()
            RctFile(os.path.splitext(path)[0] + RCT_SUFFIX).save()
            drives[f"{kind}0:{i}"] = path
        tree = _config_tree(
            name=name,
            global_id=vm_id,
            generation=generation,
            drives=drives,
            parent_snapshot_id="",
            created=time.time(),
        )
        _atomic_write(os.path.join(folder, "Virtual Machines", f"{vm_id}.xml"), render_xml_config(tree))
        if generation == 2:  # the guest state file every gen-2 VM has (opaque to a backup)
            _atomic_write(os.path.join(folder, "Virtual Machines", f"{vm_id}.vmgs"), os.urandom(64 * 1024))
        return self.model(name)

    def start(self, name: str, **kwargs: Any) -> RunningVm:
        with _running_lock:
            if self.folder(name) in _running:
                raise HypervisorError(f"lab VM {name} is already running")
        vm = RunningVm(self, name, **kwargs)
        with _running_lock:
            _running[self.folder(name)] = vm
        vm.start()
        return vm

    def write(self, name: str, slot: str, offset: int, data: bytes) -> None:
        """A guest write (through the running VM if there is one)."""
        running = self.running(name)
        if running is not None:
            running.write(slot, offset, data)
            return
        vm = self.model(name)
        w = open_vhdx_for_write(vm.current[slot])
        try:
            w.write(offset, data)
        finally:
            w.close()
        self._record_write(name, slot, offset, len(data))

    def read_disk(self, name: str, slot: str) -> bytes:
        vm = self.model(name)
        with open_image(vm.current[slot]) as img:
            return img.read(0, img.size)

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoint(self, name: str, cp_name: str, *, kind: str = "standard") -> str:
        """Take a checkpoint; returns its id."""
        with self._quiesced(name):
            return self._checkpoint(name, cp_name, kind)

    def _checkpoint(self, name: str, cp_name: str, kind: str) -> str:
        vm = self.model(name)
        if vm.config_path is None or vm.config_error is not None:
            raise HypervisorError(f"lab VM {name}: configuration unusable ({vm.config_error})")
        cp_id = _new_id()
        cp = Checkpoint(
            cp_id,
            cp_name,
            vm.parent_checkpoint_id,
            time.time(),
            kind,
            os.path.join(vm.folder, "Snapshots", f"{cp_id}.xml"),
        )
        created: list[str] = []
        try:
            new_leaves: dict[str, str] = {}
            for slot, leaf in sorted(vm.current.items()):
                base = os.path.splitext(os.path.basename(vm.chain(leaf)[0]))[0]
                child = os.path.join(os.path.dirname(leaf), f"{base}_{_new_id()}.avhdx")
                create_vhdx(child, 0, parent=leaf, block_size=2 * MIB).close()
                created.append(child)
                new_leaves[slot] = child
                self.fault("create_checkpoint")
            self._write_cp_config(vm, cp, vm.current, cp.created or time.time())
            created.append(cp.config_path)
            self._write_vm_config(vm, new_leaves, cp_id)
            if kind == "recovery":
                for slot in vm.current:
                    rct = self._rct(vm, slot)
                    rct.begin(cp_id)
                    rct.save()
        except BaseException:
            # the host rolls a failed checkpoint back: nothing of it stays
            for path in created:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if vm.config_path is not None:
                self._write_vm_config(vm, vm.current, vm.parent_checkpoint_id)
            raise
        return cp_id

    def apply_checkpoint(self, name: str, cp_id: str) -> None:
        """Discard the current state and continue from the checkpoint (a new child of its disks)."""
        with self._quiesced(name):
            vm = self.model(name)
            cp = vm.checkpoint(cp_id)
            frozen = {p for c in vm.checkpoints for p in c.disks.values()}
            new_leaves: dict[str, str] = {}
            for slot, leaf in sorted(cp.disks.items()):
                base = os.path.splitext(os.path.basename(vm.chain(leaf)[0]))[0]
                child = os.path.join(os.path.dirname(leaf), f"{base}_{_new_id()}.avhdx")
                create_vhdx(child, 0, parent=leaf, block_size=2 * MIB).close()
                new_leaves[slot] = child
            old = dict(vm.current)
            self._write_vm_config(vm, new_leaves, cp.id)
            for path in old.values():
                if path not in frozen and not vm.children(path):
                    os.unlink(path)
            # the disks' content jumped: every reference point is void
            vm2 = self.model(name)
            for slot in vm2.current:
                rct = self._rct(vm2, slot)
                rct.reset()
                rct.save()
            running = self.running(name)
            if running is not None:
                for slot, path in vm2.current.items():
                    with open_image(path) as img:
                        running.models[slot][:] = img.read(0, img.size)

    def delete_checkpoint(self, name: str, cp_id: str) -> None:
        """Delete = merge the checkpoint's frozen layer with its only child."""
        with self._quiesced(name):
            self._delete(name, cp_id)

    def _delete(self, name: str, cp_id: str) -> None:
        vm = self.model(name)
        cp = vm.checkpoint(cp_id)
        if vm.missing:
            # a file some configuration needs is gone: deleting anything now could lose data
            raise HypervisorError(
                f"lab VM {name}: its configuration names missing disks ({', '.join(vm.missing.values())}); "
                "refusing to delete or merge checkpoint files"
            )
        others = [c for c in vm.checkpoints if c.id != cp.id]
        # plan first, so a refusal changes nothing
        plan: list[tuple[str, str | None]] = []
        for _slot, frozen in sorted(cp.disks.items()):
            kids = vm.children(frozen)
            in_use = frozen in vm.current.values() or any(frozen in c.disks.values() for c in others)
            if not kids:
                plan.append((frozen, None) if not in_use else (frozen, frozen))
            elif len(kids) == 1:
                plan.append((frozen, kids[0]))
            else:
                raise HypervisorError(
                    f"lab host: deleting checkpoint {cp.name!r} needs a merge of "
                    f"{os.path.basename(frozen)} with {len(kids)} children; the lab merges a single child only"
                )
        renames: dict[str, str] = {}
        for frozen, child in plan:
            if child is None:
                os.unlink(frozen)
            elif child != frozen:
                _merge_into_parent(child, frozen)
                renames[child] = frozen
        new_current = {s: renames.get(p, p) for s, p in vm.current.items()}
        new_parent = cp.parent_id if vm.parent_checkpoint_id == cp.id else vm.parent_checkpoint_id
        self._write_vm_config(vm, new_current, new_parent)
        for c in others:
            drives = {s: renames.get(p, p) for s, p in c.disks.items()}
            if drives != c.disks or c.parent_id == cp.id:
                if c.parent_id == cp.id:
                    c.parent_id = cp.parent_id
                self._write_cp_config(vm, c, drives, c.created or time.time())
        os.unlink(cp.config_path)

    # ---- backup operations (what the WMI snapshot service does for a backup application) ---

    def create_recovery_checkpoint(self, name: str, marker: str) -> str:
        with self._quiesced(name) as running:
            cp_id = self._checkpoint(name, marker, "recovery")
            if running is not None:  # what the frozen disks hold, for tests to compare with
                running.frozen[cp_id] = {slot: bytes(m) for slot, m in running.models.items()}
                running.writes_at[cp_id] = running.writes
            return cp_id

    def convert_to_reference_point(self, name: str, cp_id: str) -> str:
        """Merge the recovery checkpoint back and keep its reference point; returns its id."""
        self.fault("convert")
        with self._quiesced(name):
            vm = self.model(name)
            cp = vm.checkpoint(cp_id)
            if not cp.is_recovery:
                raise HypervisorError(f"checkpoint {cp.name} is not a recovery checkpoint")
            self._delete(name, cp_id)
            vm = self.model(name)
            for slot in vm.current:
                rct = self._rct(vm, slot)
                rct.commit(cp_id)
                rct.save()
        return cp_id

    def remove_recovery_checkpoint(self, name: str, cp_id: str) -> None:
        """Merge the recovery checkpoint back without keeping a reference point."""
        with self._quiesced(name):
            vm = self.model(name)
            if not any(c.id == cp_id for c in vm.checkpoints):
                return
            cp = vm.checkpoint(cp_id)
            finished = {
                slot: frozen for slot, frozen in cp.disks.items() if slot in vm.missing and not vm.children(frozen)
            }
            if finished:
                # A merge back completed but the configuration was not rewritten (the process
                # died in between): the frozen file now holds the data; point the VM at it.
                self._write_vm_config(vm, {**vm.current, **finished}, vm.parent_checkpoint_id)
            self._delete(name, cp_id)
            vm = self.model(name)
            for slot in vm.current:
                rct = self._rct(vm, slot)
                rct.discard(cp_id)
                rct.save()

    def changes(self, name: str, slot: str, ref: str) -> list[tuple[int, int]] | None:
        vm = self.model(name)
        with open_image(vm.current[slot]) as img:
            size = img.size
        return self._rct(vm, slot).changes(ref, size)

    def remove_stale_recovery_checkpoints(self, name: str) -> list[str]:
        """Recovery checkpoints of ours whose backup process is gone; returns what was done."""
        done: list[str] = []
        for cp in self.model(name).checkpoints:
            if not (cp.is_recovery and cp.name.startswith(RECOVERY_MARKER)):
                continue
            if _owner_alive(cp.name):
                continue
            self.remove_recovery_checkpoint(name, cp.id)
            done.append(f"removed recovery checkpoint {cp.name!r} left behind by an interrupted backup")
        return done

    # ---- registration (Import-VM) ----------------------------------------------------------

    def import_vm(self, name: str, *, new_id: bool = False, renamed: tuple[str, str] | None = None) -> HyperVVm:
        """Register a VM folder copied under ``root``: configurations are pointed at the disks
        found in the folder (as ``Import-VM`` does after ``Compare-VM``), optionally with a
        new VM ID (``-GenerateNewId``). ``renamed=(old, new)``: disk files were renamed from
        the old VM name to the new one (a clone)."""
        vm = discover(self.folder(name), renamed=renamed)
        if vm.config_path is None:
            raise HypervisorError(f"{vm.folder}: cannot import: {vm.config_error}")
        missing = [w for w in vm.warnings if "not found" in w]
        if missing:
            raise HypervisorError(f"{vm.folder}: cannot import: " + "; ".join(missing))
        if new_id:
            nid = _new_id()
            old_prefix = os.path.join(os.path.dirname(vm.config_path), vm.vm_id)
            for f in os.listdir(os.path.dirname(vm.config_path)):
                full = os.path.join(os.path.dirname(vm.config_path), f)
                if full.upper().startswith(old_prefix.upper()):
                    os.rename(full, os.path.join(os.path.dirname(full), nid + f[len(vm.vm_id) :]))
            vm.config_path = os.path.join(os.path.dirname(vm.config_path), f"{nid}.xml")
            vm.vm_id = nid
        vm.name = name
        self._write_vm_config(vm, vm.current, vm.parent_checkpoint_id)
        for c in vm.checkpoints:
            self._write_cp_config(vm, c, c.disks, c.created or time.time())
        return self.model(name)


def _owner_alive(marker: str) -> bool:
    """``vmvault-recovery pid=N host=H ...``: is that backup process still running here?"""
    fields = dict(p.split("=", 1) for p in marker.split() if "=" in p)
    if fields.get("host") != socket.gethostname():
        return False  # another machine's: it cannot be running against this host's files
    try:
        os.kill(int(fields.get("pid", "0")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(fields.get("pid", "0")) > 0


def _merge_into_parent(child: str, parent: str) -> None:
    """Fold ``child`` into ``parent`` (``disk.chain.merge``: crash-safe, grandchildren re-pointed).

    A child with no data of its own and no children is simply deleted, so a recovery
    checkpoint of a VM that wrote nothing leaves the parent byte-identical.
    """
    with open_vhdx(child) as img:
        empty = all(e.kind is ExtentKind.PARENT for e in img.extents())
    if empty and not chain.children(child):
        os.unlink(child)
        return
    try:
        merged = chain.merge(child)
    except ConfigError as exc:
        raise HypervisorError(f"lab host: cannot merge {os.path.basename(child)}: {exc}") from exc
    if os.path.realpath(merged) != os.path.realpath(parent):
        raise HypervisorError(f"lab host: {child} merged into {merged}, expected {parent}")


# ============================================================================ backup source


class _FailingImage(DiskImage):
    """Wraps an image and fails once ``budget`` bytes were read (fault injection)."""

    def __init__(self, inner: DiskImage, budget: int) -> None:
        self.inner = inner
        self.format = inner.format
        self.budget = budget
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def parent(self) -> DiskImage | None:
        return self.inner.parent

    def extents(self) -> Iterator[Extent]:
        return self.inner.extents()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.budget -= length
            if self.budget < 0:
                raise SourceError(f"{self.path}: injected read failure at offset {offset:#x}")
        return self.inner.read(offset, length)

    def close(self) -> None:
        self.inner.close()


def _file_opener(path: str) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        try:
            return open(path, "rb")
        except OSError as exc:
            raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc

    return opener


def _bytes_opener(data: bytes) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        # the engine fstat()s what it stores, so a real (anonymous) file, not a BytesIO
        f = tempfile.TemporaryFile()  # noqa: SIM115 - returned open to the caller
        f.write(data)
        f.seek(0)
        return f

    return opener


def checkpoint_record(vm: HyperVVm, skip: set[str]) -> dict[str, Any]:
    """The checkpoint tree as stored in a snapshot's ``extra``."""
    rel = {p: d.rel for p, d in vm.disks.items()}
    return {
        "vm_id": vm.vm_id,
        "generation": vm.generation,
        "parent_checkpoint": vm.parent_checkpoint_id,
        "checkpoints": [
            {
                "id": c.id,
                "name": c.name,
                "parent": c.parent_id,
                "created": c.created,
                "type": c.type,
                "disks": {s: rel.get(p, p) for s, p in c.disks.items()},
            }
            for c in vm.checkpoints
            if c.id not in skip
        ],
    }


class LabSession(BackupSession):
    def __init__(self, source: LabSource, previous: PreviousBackup | None) -> None:
        self.source = source
        self.host = source.host
        self.vm = {}
        self.disks = []
        self.files = []
        self.warnings = []
        self.extra = {}
        self._images: list[DiskImage] = []
        self._cp: str | None = None
        self._converted = False
        self._closed = False
        try:
            self._open(previous)
        except BaseException:
            self.close()
            raise

    def _open(self, previous: PreviousBackup | None) -> None:
        host, name = self.host, self.source.name
        self.warnings += host.remove_stale_recovery_checkpoints(name)
        before = host.model(name)
        running = host.running(name) is not None
        if before.config_error is not None:
            # Nothing to ask the host to freeze: a stopped VM's files are read as they are,
            # disks found from the files and their parent locators; the folder is not touched.
            if running:
                raise HypervisorError(
                    f"lab VM {name} is running but its configuration is unreadable ({before.config_error}); "
                    "cannot take a recovery checkpoint"
                )
            self.consistency = "offline"
            self.warnings += before.warnings
            after, recovery_leaves, frozen_leaf = before, set(), {p: s for s, p in before.current.items()}
            config_bytes = None
            skip: set[str] = set()
        else:
            assert before.config_path is not None
            with open(before.config_path, "rb") as f:
                config_bytes = f.read()
            # the lab has no guest to quiesce: a running VM's view is crash-consistent
            self.consistency = "crash-consistent" if running else "offline"
            marker = f"{RECOVERY_MARKER} pid={os.getpid()} host={socket.gethostname()} t={int(time.time())}"
            self._cp = host.create_recovery_checkpoint(name, marker)
            if "hang-after-checkpoint" in host.faults:
                time.sleep(3600)  # a test kills the process here
            after = host.model(name)
            cp = after.checkpoint(self._cp)
            recovery_leaves = set(after.current.values())
            frozen_leaf = {p: s for s, p in cp.disks.items()}
            skip = {os.path.abspath(cp.config_path)}
        self.vm = {
            "hypervisor": "hyperv-lab",
            "name": after.name,
            "id": after.vm_id,
            "generation": after.generation,
            "host": host.root,
        }
        prev_by_slot: dict[str, str] = {}
        if previous is not None:
            for cbt in previous.disks.values():
                if cbt.get("vm_id") == after.vm_id and cbt.get("slot") and cbt.get("rct_id"):
                    prev_by_slot[str(cbt["slot"])] = str(cbt["rct_id"])
        budget = 2 * MIB if "read" in host.faults else -1
        for path, d in sorted(after.disks.items()):
            if path in recovery_leaves:
                continue
            if d.error is not None:
                raise SourceError(f"{d.rel}: {d.error}")
            img: DiskImage = open_image(path)
            self._images.append(img)
            guid = str(getattr(img, "data_write_guid", ""))
            if budget >= 0:
                img = _FailingImage(img, budget)
            disk = SourceDisk(
                name=d.rel,
                image=img,
                format="vhdx" if d.format == "vhdx" else d.format,
                layer=d.parent is not None,
                parent_name=after.disks[d.parent].rel if d.parent in after.disks else None,
                meta={"file_size": d.file_size},
            )
            slot = frozen_leaf.get(path)
            if slot is not None:
                disk.meta["slot"] = slot
                if self._cp is not None:
                    disk.cbt = {"rct_id": self._cp, "slot": slot, "vm_id": after.vm_id}
                ref = prev_by_slot.get(slot)
                if ref is not None and self._cp is not None:
                    disk.changed = host.changes(name, slot, ref)
                    if disk.changed is None:
                        self.warnings.append(
                            f"{d.rel}: change-tracking reference {ref} is gone (reset by apply or lost); "
                            "reading the whole disk, deduplication keeps the stored data small"
                        )
            elif guid:
                # A checkpoint's frozen layer never changes while it has children; its
                # DataWriteGuid proves it is the same file as last time: nothing changed.
                # (The engine reads layers whole for now; this is ready for layer incrementals.)
                disk.cbt = {"vm_id": after.vm_id, "data_write_guid": guid}
                prev = previous.disks.get(d.rel) if previous is not None else None
                if prev is not None and prev.get("data_write_guid") == guid:
                    disk.changed = []
            self.disks.append(disk)
        for rel in after.other_files:
            full = os.path.join(after.folder, rel)
            if os.path.abspath(full) in skip:
                continue
            st = os.stat(full)
            if config_bytes is not None and full == before.config_path:
                opener, size = _bytes_opener(config_bytes), len(config_bytes)
            else:
                opener, size = _file_opener(full), st.st_size
            self.files.append(SourceFile(rel, size, st.st_mode & 0o7777, st.st_mtime_ns, opener))
        self.extra = {"hyperv": checkpoint_record(after, {self._cp} if self._cp else set())}

    def complete(self, snapshot_id: str) -> None:
        if self._cp is None or self._converted:
            return
        try:
            self.host.convert_to_reference_point(self.source.name, self._cp)
        except VmvaultError as exc:
            raise HypervisorError(
                f"snapshot {snapshot_id[:8]} is stored, but the reference point could not be kept ({exc}); "
                "the recovery checkpoint was removed and the next backup reads everything"
            ) from exc
        self._converted = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for img in self._images:
            img.close()
        self._images = []
        if self._cp is not None and not self._converted:
            try:
                self.host.remove_recovery_checkpoint(self.source.name, self._cp)
            except VmvaultError as exc:
                raise HypervisorError(
                    f"lab VM {self.source.name}: the recovery checkpoint {self._cp} could not be removed: {exc}; "
                    "the next backup removes it"
                ) from exc


class RestoreResultLike(Protocol):
    target: str


class SnapshotLike(Protocol):
    vm: dict[str, Any]


class LabSource(Source):
    kind = "hyperv-lab"

    def __init__(self, root: str, name: str) -> None:
        self.host = LabHost(root)
        self.name = name
        self.location = f"hyperv-lab://{self.host.root}/{name}"
        self.host.model(name)  # fails early when there is no such VM

    def open_session(self, previous: PreviousBackup | None) -> BackupSession:
        return LabSession(self, previous)


def parse_lab_spec(spec: str) -> tuple[str, str | None]:
    """``hyperv-lab://DIR/VMNAME`` -> (DIR, VMNAME); ``hyperv-lab://DIR`` (a host folder) -> (DIR, None)."""
    if not spec.startswith("hyperv-lab://"):
        raise ConfigError(f"not a lab source: {spec!r}")
    rest = spec[len("hyperv-lab://") :].rstrip("/")
    if not rest:
        raise ConfigError("hyperv-lab:// needs a folder: hyperv-lab://DIR/VMNAME")
    rest = os.path.abspath(rest)
    is_vm = any(os.path.isdir(os.path.join(rest, d)) for d in ("Virtual Machines", "Virtual Hard Disks"))
    if os.path.isdir(rest) and not is_vm:
        return rest, None
    return os.path.dirname(rest), os.path.basename(rest)


def open_lab_source(spec: str) -> LabSource:
    root, name = parse_lab_spec(spec)
    if name is None:
        raise ConfigError(f"{spec}: name a VM: hyperv-lab://DIR/VMNAME")
    return LabSource(root, name)


def lab_clone_hook(result: RestoreResultLike, snap: SnapshotLike, clone_name: str) -> None:
    """Give a restored clone of a lab VM its own identity: new VM ID, configurations pointing
    at the clone's disk files (``Import-VM -Copy -GenerateNewId``)."""
    folder = result.target
    old = str(snap.vm.get("cloned_from") or "")
    LabHost(os.path.dirname(folder)).import_vm(os.path.basename(folder), new_id=True, renamed=(old, clone_name))


#: found by ``vmvault.engine.clone`` for snapshots of kind "hyperv-lab"
clone_hook = lab_clone_hook

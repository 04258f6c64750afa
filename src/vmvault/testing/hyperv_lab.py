"""A Hyper-V "lab host" for tests and demos: the host side of the Hyper-V connector, done
on real VHDX files. TEST MACHINERY: nothing in vmvault's production code imports this
package (a test enforces it); ``hyperv-lab://DIR/VM`` reaches it through a lazy import.

There is no Windows host here, so this module implements what Hyper-V does to a VM's files
with our own VHDX engine, keeping the names, layout and parent locators Hyper-V uses:

* a VM is a folder (``Virtual Machines/<ID>.xml``, ``Virtual Hard Disks/``, ``Snapshots/``),
  see ``vmvault.hypervisors.hyperv_model``; configurations are written in the XML form;
* a **standard checkpoint** creates, for every disk, a child ``<base>_<GUID>.avhdx`` beside
  the current leaf and redirects writes to it; the frozen parent is never written again;
* **apply** throws the current state's differencing files away and starts a new child of
  the checkpoint's frozen disks;
* **delete** merges: the checkpoint's frozen file takes in its only child's data and the
  child file disappears; configurations that named the child now name the parent;
* a **recovery checkpoint** (a backup's) is the same, marked ``recovery``; converting it
  merges it back and keeps a **reference point**, like ``ConvertToReferencePoint``;
* **change tracking** (the analogue of RCT): every guest write is recorded, per disk, into
  every open reference point (``<base disk>.rct``, JSON, 64 KiB granularity); reference points
  stay until destroyed, as on Hyper-V;
* a **running VM** is a thread writing random data into the leaf disks while a backup runs,
  keeping a model of what every disk must contain.

``LabTransport`` answers the Hyper-V connector's steps (``vmvault.hypervisors.hyperv.steps``)
with these operations, so ``hyperv-lab://DIR/VM`` runs the real ``HyperVSession`` end to
end. Faults (``LabHost.faults``, or ``VMVAULT_LAB_FAULTS`` for subprocesses, comma-separated):
``step:NAME`` fails a step before it acts, ``late:NAME`` after it acted (a timeout whose work
happened), ``create`` fails checkpoint creation midway (rolled back), ``vss`` fails an
application-consistent checkpoint of a running VM, ``rename`` fails the naming of a recovery
checkpoint, ``changes-stall`` makes change tracking process nothing, ``migrate`` moves the VM
to another host, ``hang-in-create`` / ``hang-after-checkpoint`` stop the step for an hour
(a test kills the process there).

Limits (said where they bite): deleting a checkpoint whose frozen layer has several children
is refused (Hyper-V can); there is no guest, so "application-consistent" means the writer
thread was paused at a write boundary.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from vmvault.disk import chain, open_image
from vmvault.disk.base import ExtentKind
from vmvault.disk.vhdx import VhdxWriter, create_vhdx, open_vhdx, open_vhdx_for_write
from vmvault.errors import ChangeTrackingError, ConfigError, HypervisorError, SourceError
from vmvault.hypervisors.audit import VmAudit
from vmvault.hypervisors.base import RestoredVm, RestoreNote
from vmvault.hypervisors.folder_audit import audit_folder
from vmvault.hypervisors.hyperv.session import HyperVSource
from vmvault.hypervisors.hyperv.steps import SUBTYPE_DVD, SUBTYPE_HARD_DISK, ParamValue
from vmvault.hypervisors.hyperv_model import (
    IDE_CONTROLLER,
    RCT_SUFFIX,
    SCSI_CONTROLLER,
    Checkpoint,
    ConfigTree,
    HyperVVm,
    discover,
    discover_all,
    render_xml_config,
)

__all__ = [
    "FAULT_ENV",
    "LabClock",
    "LabHost",
    "LabTransport",
    "RunningVm",
    "after_restore",
    "audit",
    "lab_source",
    "open_lab_source",
    "parse_lab_spec",
]

MIB = 1024 * 1024
#: change-tracking granularity of the lab (Hyper-V's RCT tracks in blocks of similar size)
RCT_BLOCK = 64 * 1024
#: GetVirtualDiskChanges in the lab processes at most this much per call, so the
#: connector's loop over partial answers runs
CHANGES_WINDOW = 4 * MIB
#: fault injection for tests, also from the environment (comma-separated) for subprocesses
FAULT_ENV = "VMVAULT_LAB_FAULTS"

_running_lock = threading.Lock()
_running: dict[str, RunningVm] = {}


class LabClock:
    """Seconds since the epoch that a test moves by hand (``advance``)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rct_id(cp_id: str, slot: str) -> str:
    """The lab's RCT id of ``slot`` at the reference point made from checkpoint ``cp_id``."""
    return f"rctX:{cp_id.lower()}:{slot}"


def _iso(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).isoformat()


def _new_id() -> str:
    return str(uuid.uuid4()).upper()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{threading.get_ident()}.tmp"
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
        # kept until destroyed (DestroyReferencePoint): Hyper-V does not drop them by itself
        if ref in self.pending:
            self.points[ref] = self.pending.pop(ref)
            self.order.append(ref)

    def drop(self, ref: str) -> None:
        self.points.pop(ref, None)
        self.pending.pop(ref, None)
        self.order = [r for r in self.order if r != ref]

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

    def __init__(self, root: str, *, clock: Callable[[], float] = time.time, hostname: str = "LAB-HV01") -> None:
        self.root = os.path.abspath(root)
        self.clock = clock
        self.hostname = hostname
        self.faults: set[str] = {f for f in os.environ.get(FAULT_ENV, "").split(",") if f}

    # ---- host state outside the VM folders (what Hyper-V keeps in its own store) -----------

    def _state_path(self, vm_id: str) -> str:
        return os.path.join(self.root, ".lab-host", f"{vm_id}.json")

    def host_state(self, vm_id: str) -> dict[str, Any]:
        try:
            with open(self._state_path(vm_id), encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            doc = {}
        doc.setdefault("merge_enabled_state", 1)
        doc.setdefault("reference_points", {})
        doc.setdefault("extra_drives", [])
        return dict(doc)

    def save_host_state(self, vm_id: str, doc: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self._state_path(vm_id)), exist_ok=True)
        _atomic_write(self._state_path(vm_id), json.dumps(doc).encode())

    def vm_by_id(self, vm_id: str) -> HyperVVm:
        for vm in self.vms():
            if vm.vm_id.upper() == vm_id.upper():
                return vm
        raise HypervisorError(f"lab host: no virtual machine with ID {vm_id}")

    def vms(self) -> list[HyperVVm]:
        """The VMs Hyper-V would list: folders whose configuration reads."""
        return [vm for vm in discover_all(self.root) if vm.config_error is None]

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
        self,
        name: str,
        disk_sizes: tuple[int, ...] = (64 * MIB,),
        *,
        generation: int = 2,
        block_size: int = 2 * MIB,
        display_name: str | None = None,
        extra_drives: tuple[tuple[str, str, str], ...] = (),
    ) -> HyperVVm:
        """A VM in folder ``name`` (shown as ``display_name``); ``extra_drives``: (slot, kind,
        path) drives that are not virtual hard disks: ``dvd`` images, ``passthrough`` disks."""
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
            name=display_name or name,
            global_id=vm_id,
            generation=generation,
            drives=drives,
            parent_snapshot_id="",
            created=self.clock(),
        )
        _atomic_write(os.path.join(folder, "Virtual Machines", f"{vm_id}.xml"), render_xml_config(tree))
        if generation == 2:  # the guest state file every gen-2 VM has (opaque to a backup)
            _atomic_write(os.path.join(folder, "Virtual Machines", f"{vm_id}.vmgs"), os.urandom(64 * 1024))
        if extra_drives:
            state = self.host_state(vm_id)
            state["extra_drives"] = [list(d) for d in extra_drives]
            self.save_host_state(vm_id, state)
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
            self.clock(),
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
                self.fault("create")
            self._write_cp_config(vm, cp, vm.current, cp.created or self.clock())
            created.append(cp.config_path)
            self._write_vm_config(vm, new_leaves, cp_id)
            if kind == "recovery":
                for slot in vm.current:
                    rct = self._rct(vm, slot)
                    rct.begin(rct_id(cp_id, slot))
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
                self._write_cp_config(vm, c, drives, c.created or self.clock())
        os.unlink(cp.config_path)

    # ---- backup operations (what the WMI snapshot service does for a backup application) ---

    def create_recovery_checkpoint(self, name: str, cp_name: str) -> str:
        """A recovery checkpoint named ``cp_name`` (Hyper-V names it; the backup renames it)."""
        with self._quiesced(name) as running:
            cp_id = self._checkpoint(name, cp_name, "recovery")
            if running is not None:  # what the frozen disks hold, for tests to compare with
                running.frozen[cp_id] = {slot: bytes(m) for slot, m in running.models.items()}
                running.writes_at[cp_id] = running.writes
            return cp_id

    def rename_checkpoint(self, name: str, cp_id: str, new_name: str) -> None:
        vm = self.model(name)
        cp = vm.checkpoint(cp_id)
        cp.name = new_name
        self._write_cp_config(vm, cp, cp.disks, cp.created or self.clock())

    def convert_to_reference_point(self, name: str, cp_id: str) -> str:
        """Merge the recovery checkpoint back and keep its reference point; returns its id."""
        with self._quiesced(name):
            vm = self.model(name)
            cp = vm.checkpoint(cp_id)
            if not cp.is_recovery:
                raise HypervisorError(f"checkpoint {cp.name} is not a recovery checkpoint")
            self._delete(name, cp_id)
            vm = self.model(name)
            point = f"Microsoft:{_new_id()}"
            ids: dict[str, str] = {}
            for slot in vm.current:
                rct = self._rct(vm, slot)
                rct.commit(rct_id(cp_id, slot))
                rct.save()
                ids[slot] = rct_id(cp_id, slot)
            state = self.host_state(vm.vm_id)
            state["reference_points"][point] = {"checkpoint": cp_id, "rct_ids": ids}
            self.save_host_state(vm.vm_id, state)
        return point

    def destroy_reference_point(self, name: str, point: str) -> bool:
        with self._quiesced(name):
            vm = self.model(name)
            state = self.host_state(vm.vm_id)
            entry = state["reference_points"].pop(point, None)
            if entry is None:
                return False
            for slot in vm.current:
                rct = self._rct(vm, slot)
                rct.drop(str(entry["rct_ids"].get(slot, "")))
                rct.save()
            self.save_host_state(vm.vm_id, state)
            return True

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
                rct.discard(rct_id(cp_id, slot))
                rct.save()

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
            self._write_cp_config(vm, c, c.disks, c.created or self.clock())
        return self.model(name)


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


# ============================================================================ the transport


class LabTransport:
    """Answers the Hyper-V connector's steps on a ``LabHost``; replies cross as JSON."""

    def __init__(self, lab: LabHost) -> None:
        self.lab = lab
        self.host = lab.hostname
        self.calls: list[str] = []

    def run(self, step: str, params: Mapping[str, ParamValue], timeout: float) -> Any:
        handler: Callable[[dict[str, Any]], Any] | None = getattr(self, f"_step_{step}", None)
        if handler is None:
            raise HypervisorError(f"{step}: the lab host does not answer this step")
        self.calls.append(step)
        self.lab.fault(f"step:{step}")
        result = handler(dict(params))
        if f"late:{step}" in self.lab.faults:
            raise HypervisorError(f"{step}: no answer from the lab host within {timeout:.0f} s (injected)")
        return json.loads(json.dumps(result))  # only JSON crosses a transport

    def _vm(self, params: Mapping[str, Any]) -> tuple[str, HyperVVm]:
        vm = self.lab.vm_by_id(str(params["VmId"]))
        return os.path.basename(vm.folder), vm

    def _step_resolve(self, p: dict[str, Any]) -> Any:
        name = str(p["Name"]).casefold()  # -eq: literal, case-insensitive
        return {"vms": [{"id": vm.vm_id, "name": vm.name} for vm in self.lab.vms() if vm.name.casefold() == name]}

    def _step_describe(self, p: dict[str, Any]) -> Any:
        folder, vm = self._vm(p)
        state = self.lab.host_state(vm.vm_id)
        drives = [{"slot": s, "kind": "hard", "path": path} for s, path in sorted(vm.current.items())]
        drives += [{"slot": s, "kind": k, "path": path} for s, k, path in state["extra_drives"]]
        ids = {vm.vm_id.upper()} | {c.id.upper() for c in vm.checkpoints}
        files = []
        for rel in vm.other_files:
            stem = os.path.basename(rel).split(".", 1)[0].upper()
            top = rel.split("/", 1)[0]
            if stem in ids and top in ("Virtual Machines", "Snapshots") and not rel.lower().endswith(".vmrs"):
                files.append(os.path.join(vm.folder, rel))
        return {
            "id": vm.vm_id,
            "name": vm.name,
            "generation": vm.generation,
            "state": "Running" if self.lab.running(folder) is not None else "Off",
            "host": self.lab.hostname,
            "drives": drives,
            "files": files,
            "checkpoints": [
                {
                    "id": c.id,
                    "name": c.name,
                    "type": "Recovery" if c.is_recovery else "Standard",
                    "parent": c.parent_id,
                    "created": _iso(c.created),
                    "disks": [path for _s, path in sorted(c.disks.items())],
                }
                for c in vm.checkpoints
            ],
        }

    def _step_enable_merge(self, p: dict[str, Any]) -> Any:
        _folder, vm = self._vm(p)
        state = self.lab.host_state(vm.vm_id)
        before = int(state["merge_enabled_state"])
        if before != 1:
            state["merge_enabled_state"] = 1
            self.lab.save_host_state(vm.vm_id, state)
        return {"found": True, "was_enabled": before == 1, "state_before": before}

    def _step_list_recovery(self, p: dict[str, Any]) -> Any:
        _folder, vm = self._vm(p)
        return {
            "checkpoints": [
                {"instance_id": f"Microsoft:{c.id}", "name": c.name, "created": _iso(c.created)}
                for c in vm.checkpoints
                if c.is_recovery
            ]
        }

    def _step_create_recovery(self, p: dict[str, Any]) -> Any:
        folder, vm = self._vm(p)
        level, guest = int(p["ConsistencyLevel"]), int(p["GuestBackupType"])
        if level not in (1, 2) or guest not in (0, 1, 2):
            raise HypervisorError(f"CreateSnapshot failed with return value 4 (invalid parameter: {level}, {guest})")
        if level == 1 and self.lab.running(folder) is not None and "vss" in self.lab.faults:
            raise HypervisorError(
                "CreateSnapshot failed: job state 10, error 32768: Could not create backup checkpoint for virtual "
                f"machine '{vm.name}': the guest's VSS writers are not stable (0x800423F4)"
            )
        default = f"{vm.name} - Backup - ({datetime.fromtimestamp(self.lab.clock(), UTC):%m/%d/%Y - %H:%M:%S})"
        cp_id = self.lab.create_recovery_checkpoint(folder, default)
        state = self.lab.host_state(vm.vm_id)
        state.setdefault("created", {})[cp_id] = {"consistency_level": level, "guest_backup_type": guest}
        self.lab.save_host_state(vm.vm_id, state)
        if "hang-in-create" in self.lab.faults:
            time.sleep(3600)  # a test kills the process here, before the ID is returned
        renamed, error = True, ""
        try:
            self.lab.fault("rename")
            self.lab.rename_checkpoint(folder, cp_id, str(p["Marker"]))
        except HypervisorError as exc:
            renamed, error = False, f"ModifySystemSettings failed: {exc}"
        return {
            "instance_id": f"Microsoft:{cp_id}",
            "name": str(p["Marker"]) if renamed else default,
            "renamed": renamed,
            "rename_error": error,
        }

    def _step_checkpoint_disks(self, p: dict[str, Any]) -> Any:
        _folder, vm = self._vm(p)
        cp = vm.checkpoint(str(p["CheckpointId"]))
        if "hang-after-checkpoint" in self.lab.faults:
            time.sleep(3600)  # a test kills the process here, the checkpoint's ID journaled
        disks = [
            {"instance_id": f"Microsoft:{cp.id}\\{slot}", "subtype": SUBTYPE_HARD_DISK, "path": path}
            for slot, path in sorted(cp.disks.items())
        ]
        for slot, kind, path in self.lab.host_state(vm.vm_id)["extra_drives"]:
            if kind == "dvd":  # an ISO in the DVD drive is a logical disk (ResourceType 31) too
                disks.append({"instance_id": f"Microsoft:{cp.id}\\{slot}", "subtype": SUBTYPE_DVD, "path": path})
        return {"disks": disks}

    def _step_changes(self, p: dict[str, Any]) -> Any:
        path, limit = str(p["Path"]), str(p["LimitId"])
        offset, length = int(p["ByteOffset"]), int(p["ByteLength"])
        for vm in self.lab.vms():
            for slot, leaf in vm.current.items():
                if os.path.abspath(path) in vm.chain(leaf):
                    with open_image(path) as img:
                        size = img.size
                    if offset + length > size:
                        raise HypervisorError("GetVirtualDiskChanges failed with return value 32773 (past the end)")
                    ranges = self.lab._rct(vm, slot).changes(limit, size)
                    if ranges is None:
                        raise HypervisorError(
                            "GetVirtualDiskChanges failed with return value 32773: the RCT id is unknown "
                            "to this disk (reset or expired)"
                        )
                    processed = 0 if "changes-stall" in self.lab.faults else min(length, CHANGES_WINDOW)
                    end = offset + processed
                    clipped = [(max(o, offset), min(o + n, end)) for o, n in ranges if o < end and o + n > offset]
                    return {
                        "processed": processed,
                        "offsets": [a for a, _b in clipped],
                        "lengths": [b - a for a, b in clipped],
                    }
        raise HypervisorError(f"GetVirtualDiskChanges failed with return value 32779 (file not found: {path})")

    def _step_host_of(self, p: dict[str, Any]) -> Any:
        folder, _vm = self._vm(p)
        moved = "migrate" in self.lab.faults
        return {
            "host": "LAB-HV02" if moved else self.lab.hostname,
            "status": "Operating normally",
            "state": "Running" if self.lab.running(folder) is not None else "Off",
        }

    def _step_convert(self, p: dict[str, Any]) -> Any:
        folder, vm = self._vm(p)
        self.lab.fault("convert")
        point = self.lab.convert_to_reference_point(folder, str(p["CheckpointId"]).upper())
        vm = self.lab.model(folder)
        ids = self.lab.host_state(vm.vm_id)["reference_points"][point]["rct_ids"]
        # the parallel arrays come in an order of their own: pairing is by disk id
        slots = sorted(ids, reverse=True)
        return {
            "reference_point": point,
            "disk_ids": [f"Microsoft:{vm.vm_id}\\{s}" for s in slots],
            "rct_ids": [ids[s] for s in slots],
            "disks": [{"instance_id": f"Microsoft:{vm.vm_id}\\{s}", "path": vm.current[s]} for s in sorted(ids)],
        }

    def _step_list_reference_points(self, p: dict[str, Any]) -> Any:
        _folder, vm = self._vm(p)
        points = self.lab.host_state(vm.vm_id)["reference_points"]
        return {
            "reference_points": [
                {
                    "instance_id": point,
                    "disk_ids": [f"Microsoft:{vm.vm_id}\\{s}" for s in sorted(e["rct_ids"])],
                    "rct_ids": [e["rct_ids"][s] for s in sorted(e["rct_ids"])],
                }
                for point, e in points.items()
            ]
        }

    def _step_destroy_reference_point(self, p: dict[str, Any]) -> Any:
        folder, _vm = self._vm(p)
        return {"destroyed": self.lab.destroy_reference_point(folder, str(p["ReferencePointId"]))}

    def _step_destroy_checkpoint(self, p: dict[str, Any]) -> Any:
        folder, vm = self._vm(p)
        wanted = str(p["CheckpointId"]).upper()
        cp = next((c for c in vm.checkpoints if c.id.upper() == wanted), None)
        if cp is None:
            return {"destroyed": False}
        if cp.is_recovery:
            self.lab.remove_recovery_checkpoint(folder, cp.id)
        else:
            self.lab.delete_checkpoint(folder, cp.id)
        return {"destroyed": True}

    def _step_compare_import(self, p: dict[str, Any]) -> Any:
        folder = os.path.dirname(os.path.dirname(os.path.abspath(str(p["Path"]))))
        if os.path.dirname(folder) != self.lab.root:
            return {
                "imported": False,
                "id": "",
                "name": "",
                "incompatibilities": [{"id": "40000", "message": f"{folder} is not a folder of the lab host"}],
            }
        try:
            vm = self.lab.import_vm(os.path.basename(folder), new_id=True)
        except HypervisorError as exc:
            problem = {"id": "40010", "message": str(exc)}
            return {"imported": False, "id": "", "name": "", "incompatibilities": [problem]}
        return {"imported": True, "id": vm.vm_id, "name": vm.name, "incompatibilities": []}


# ============================================================================ the source


def parse_lab_spec(spec: str) -> tuple[str, str | None]:
    """``hyperv-lab://DIR/VMNAME`` -> (DIR, VMNAME); ``hyperv-lab://DIR`` (a host folder) -> (DIR, None)."""
    if not spec.startswith("hyperv-lab://"):
        raise ConfigError(f"not a lab source: {spec!r}")
    rest = spec[len("hyperv-lab://") :].split("?", 1)[0].rstrip("/")
    if not rest:
        raise ConfigError("hyperv-lab:// needs a folder: hyperv-lab://DIR/VMNAME")
    rest = os.path.abspath(rest)
    is_vm = any(os.path.isdir(os.path.join(rest, d)) for d in ("Virtual Machines", "Virtual Hard Disks"))
    if os.path.isdir(rest) and not is_vm:
        return rest, None
    return os.path.dirname(rest), os.path.basename(rest)


def lab_source(lab: LabHost, name: str, query: str = "") -> HyperVSource:
    """The real Hyper-V connector for VM ``name`` of ``lab``, over a ``LabTransport``."""
    return HyperVSource(
        f"hyperv-lab://lab/{quote(name)}" + (f"?{query}" if query else ""),
        transport=LabTransport(lab),
        kind="hyperv-lab",
        clock=lab.clock,
        location=f"hyperv-lab://{lab.root}/{name}",
    )


def open_lab_source(spec: str) -> HyperVSource:
    root, name = parse_lab_spec(spec)
    if name is None:
        raise ConfigError(f"{spec}: name a VM: hyperv-lab://DIR/VMNAME")
    if not os.path.isdir(root):
        raise SourceError(f"lab host {root}: no such folder")
    return lab_source(LabHost(root), name, spec.split("?", 1)[1] if "?" in spec else "")


def after_restore(restored: RestoredVm) -> RestoreNote:
    """Give a restored clone of a lab VM its own identity: a new VM ID, configurations pointing
    at the clone's disk files (``Import-VM -Copy -GenerateNewId``). A plain restore needs nothing."""
    if restored.clone_name is None:
        return RestoreNote()
    folder = restored.folder
    old = str(restored.vm.get("name") or "")
    vm = LabHost(os.path.dirname(folder)).import_vm(
        os.path.basename(folder), new_id=True, renamed=(old, restored.clone_name)
    )
    return RestoreNote(facts={"vm_id": vm.vm_id}, lines=[f"  imported on the lab host as {vm.name} ({vm.vm_id})"])


def audit(target: str, now: float) -> list[VmAudit]:
    """``hyperv-lab://DIR[/VM]``: the lab host's VMs, read from their folders."""
    root, name = parse_lab_spec(target)
    return audit_folder(root if name is None else os.path.join(root, name), now)

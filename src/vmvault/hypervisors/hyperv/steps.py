"""The step protocol: everything the Hyper-V connector asks of a host, as named steps.

A step has typed parameters and a typed reply. The connector (``session``) calls the
methods of ``HostClient``; a transport (``transports``: local PowerShell, WinRM; or the lab
host of ``vmvault.testing``) carries the step by name with its parameters and returns the
reply as decoded JSON. Every reply is parsed here, defensively: the host is untrusted and
PowerShell has quirks (a one-element array arrives as the element itself, an absent array as
``null``), so every field is checked and anything unexpected is a ``HypervisorError`` naming
the step and the field, never an ``AttributeError`` deep in the connector.

Identifiers that reach the host (VM and checkpoint IDs) are GUIDs, checked here before they
are sent and again by the scripts' ``[guid]`` parameters.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from vmvault.errors import HypervisorError

__all__ = [
    "RECOVERY_SNAPSHOT_TYPE",
    "STEPS",
    "SUBTYPE_DVD",
    "SUBTYPE_FLOPPY",
    "SUBTYPE_HARD_DISK",
    "Changes",
    "CheckpointInfo",
    "CreatedCheckpoint",
    "Drive",
    "HostClient",
    "HostOf",
    "Imported",
    "MergeState",
    "ParamValue",
    "RecoveryCheckpoint",
    "ReferencePoint",
    "SnapshotDisk",
    "StepTransport",
    "VmDescription",
    "VmMatch",
    "guid",
]

ParamValue = str | int | bool

#: Msvm_VirtualSystemSnapshotService.CreateSnapshot SnapshotType for a recovery checkpoint
RECOVERY_SNAPSHOT_TYPE = 32768
#: Msvm_StorageAllocationSettingData.ResourceSubType values of ResourceType 31 (logical disk)
SUBTYPE_HARD_DISK = "Microsoft:Hyper-V:Virtual Hard Disk"
SUBTYPE_DVD = "Microsoft:Hyper-V:Virtual CD/DVD Disk"
SUBTYPE_FLOPPY = "Microsoft:Hyper-V:Virtual Floppy Disk"

#: step name -> parameter name -> type. Scripts, the lab host and the tests follow this table.
STEPS: dict[str, dict[str, type]] = {
    "resolve": {"Name": str},
    "describe": {"VmId": str},
    "enable_merge": {"VmId": str, "JobTimeout": int},
    "list_recovery": {"VmId": str},
    "create_recovery": {
        "VmId": str,
        "ConsistencyLevel": int,
        "GuestBackupType": int,
        "Marker": str,
        "JobTimeout": int,
    },
    "checkpoint_disks": {"VmId": str, "CheckpointId": str},
    "changes": {"Path": str, "LimitId": str, "ByteOffset": int, "ByteLength": int, "JobTimeout": int},
    "host_of": {"VmId": str},
    "convert": {"VmId": str, "CheckpointId": str, "JobTimeout": int},
    "list_reference_points": {"VmId": str},
    "destroy_reference_point": {"VmId": str, "ReferencePointId": str, "JobTimeout": int},
    "destroy_checkpoint": {"VmId": str, "CheckpointId": str, "JobTimeout": int},
    "inventory": {},
    "compare_import": {"Path": str, "VirtualMachinePath": str, "VhdDestinationPath": str, "VhdSourcePath": str},
}


class StepTransport(Protocol):
    """Carries one step to a host. ``host`` names it in messages."""

    host: str

    def run(self, step: str, params: Mapping[str, ParamValue], timeout: float) -> Any:
        """Run ``step`` with ``params``; return the decoded JSON result or raise HypervisorError."""
        ...


def guid(text: str, what: str) -> str:
    """``text`` as an upper-case GUID (``{...}`` and case accepted), else HypervisorError."""
    try:
        return str(uuid.UUID(str(text).strip().strip("{}"))).upper()
    except ValueError as exc:
        raise HypervisorError(f"{what}: {text!r} is not a GUID") from exc


# ---- defensive reading of a reply ----------------------------------------------------------


class _Reply:
    """Typed access to one JSON object of a step's reply; errors name the step and the field."""

    def __init__(self, step: str, value: Any, where: str = "reply") -> None:
        if not isinstance(value, dict):
            raise HypervisorError(f"{step}: {where} is {_kind(value)}, expected an object")
        self.step, self.value, self.where = step, value, where

    def _bad(self, key: str, expected: str) -> HypervisorError:
        return HypervisorError(f"{self.step}: {self.where}.{key} is {_kind(self.value.get(key))}, expected {expected}")

    def text(self, key: str, *, empty: bool = True) -> str:
        v = self.value.get(key)
        if v is None and empty:
            return ""
        if not isinstance(v, str) or (not empty and not v):
            raise self._bad(key, "a string" if empty else "a non-empty string")
        return v

    def integer(self, key: str, *, minimum: int = 0) -> int:
        v = self.value.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return v

    def opt_integer(self, key: str) -> int | None:
        return None if self.value.get(key) is None else self.integer(key)

    def flag(self, key: str) -> bool:
        v = self.value.get(key)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def array(self, key: str) -> list[Any]:
        """A JSON array; ``null``/absent is empty and a lone value is a one-element array
        (how PowerShell hands out a collection of one), but no element may be ``null``."""
        v = self.value.get(key)
        items = [] if v is None else v if isinstance(v, list) else [v]
        for i, item in enumerate(items):
            if item is None:
                raise HypervisorError(f"{self.step}: {self.where}.{key}[{i}] is null")
        return items

    def texts(self, key: str) -> list[str]:
        items = self.array(key)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise HypervisorError(f"{self.step}: {self.where}.{key}[{i}] is {_kind(item)}, expected a string")
        return items

    def integers(self, key: str) -> list[int]:
        items = self.array(key)
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise HypervisorError(f"{self.step}: {self.where}.{key}[{i}] is {item!r}, expected an integer >= 0")
        return items

    def objects(self, key: str) -> list[_Reply]:
        return [_Reply(self.step, item, f"{self.where}.{key}[{i}]") for i, item in enumerate(self.array(key))]

    def time(self, key: str) -> float | None:
        """An ISO 8601 time (``DateTime.ToString('o')``) as epoch seconds; empty is None."""
        text = self.text(key)
        if not text:
            return None
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise self._bad(key, "an ISO 8601 time") from exc


def _kind(v: Any) -> str:
    if v is None:
        return "missing or null"
    if isinstance(v, bool):
        return f"the boolean {v}"
    if isinstance(v, list):
        return f"an array of {len(v)}"
    if isinstance(v, dict):
        return "an object"
    return f"{type(v).__name__} {str(v)[:60]!r}"


# ---- reply types -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VmMatch:
    id: str
    name: str


@dataclass(frozen=True)
class Drive:
    """A drive of the VM: ``kind`` is ``hard`` (a virtual hard disk file), ``passthrough``
    (a host disk), ``dvd``, ``floppy`` or ``fc`` (a virtual Fibre Channel adapter)."""

    slot: str
    kind: str
    path: str


DRIVE_KINDS = ("hard", "passthrough", "dvd", "floppy", "fc")


@dataclass(frozen=True)
class CheckpointInfo:
    id: str
    name: str
    parent: str
    type: str
    created: float | None
    disks: list[str]

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "parent": self.parent,
            "type": self.type,
            "created": self.created,
            "disks": self.disks,
        }


@dataclass(frozen=True)
class VmDescription:
    id: str
    name: str
    generation: int
    state: str
    host: str
    drives: list[Drive]
    checkpoints: list[CheckpointInfo]
    #: this VM's configuration files and its checkpoints' (host paths)
    files: list[str]

    @property
    def hard_disks(self) -> list[Drive]:
        return [d for d in self.drives if d.kind == "hard"]


@dataclass(frozen=True)
class MergeState:
    found: bool
    was_enabled: bool
    state_before: int | None


@dataclass(frozen=True)
class RecoveryCheckpoint:
    instance_id: str
    id: str
    name: str
    created: float | None


@dataclass(frozen=True)
class CreatedCheckpoint:
    instance_id: str
    id: str
    name: str
    renamed: bool
    rename_error: str


@dataclass(frozen=True)
class SnapshotDisk:
    instance_id: str
    path: str
    subtype: str


@dataclass(frozen=True)
class Changes:
    processed: int
    ranges: list[tuple[int, int]]


@dataclass(frozen=True)
class HostOf:
    host: str
    status: str
    state: str


@dataclass(frozen=True)
class ReferencePoint:
    instance_id: str
    disk_ids: list[str]
    rct_ids: list[str]
    #: the VM's virtual hard disks when converted: (WMI instance id, host path)
    disks: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Imported:
    imported: bool
    id: str
    name: str
    incompatibilities: list[tuple[str, str]]


def _checkpoint_id(step: str, instance_id: str) -> str:
    """``Microsoft:GUID`` (a snapshot's Msvm_VirtualSystemSettingData.InstanceID) -> GUID."""
    prefix, _, rest = instance_id.partition(":")
    if prefix.lower() != "microsoft" or not rest:
        raise HypervisorError(f"{step}: checkpoint instance id {instance_id!r} is not 'Microsoft:GUID'")
    return guid(rest, f"{step}: checkpoint instance id")


# ---- the client --------------------------------------------------------------------------------


class HostClient:
    """Typed steps over a transport; every reply validated."""

    def __init__(self, transport: StepTransport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout
        #: steps called, in order (for messages and tests)
        self.calls: list[str] = []

    @property
    def host(self) -> str:
        return self.transport.host

    @property
    def job_timeout(self) -> int:
        # the scripts give up on a WMI job a little before the transport gives up on them,
        # so a timeout is reported by the host with the job's state
        return max(1, int(self.timeout * 0.9))

    def _run(self, step: str, **params: ParamValue) -> _Reply:
        spec = STEPS[step]
        if set(params) != set(spec):
            raise HypervisorError(f"{step}: parameters {sorted(params)} differ from {sorted(spec)}")
        for name, value in params.items():
            if type(value) is not spec[name]:
                raise HypervisorError(f"{step}: parameter {name} must be {spec[name].__name__}")
        self.calls.append(step)
        return _Reply(step, self.transport.run(step, params, self.timeout))

    def resolve(self, name: str) -> list[VmMatch]:
        r = self._run("resolve", Name=name)
        return [VmMatch(guid(v.text("id"), "resolve: VM id"), v.text("name")) for v in r.objects("vms")]

    def describe(self, vm_id: str) -> VmDescription:
        r = self._run("describe", VmId=guid(vm_id, "VM id"))
        drives = []
        for d in r.objects("drives"):
            kind = d.text("kind")
            if kind not in DRIVE_KINDS:
                raise HypervisorError(f"describe: {d.where}.kind {kind!r} is not one of {', '.join(DRIVE_KINDS)}")
            drives.append(Drive(d.text("slot"), kind, d.text("path")))
        checkpoints = [
            CheckpointInfo(
                guid(c.text("id"), "describe: checkpoint id"),
                c.text("name"),
                guid(c.text("parent"), "describe: checkpoint parent") if c.text("parent") else "",
                c.text("type"),
                c.time("created"),
                c.texts("disks"),
            )
            for c in r.objects("checkpoints")
        ]
        return VmDescription(
            id=guid(r.text("id", empty=False), "describe: VM id"),
            name=r.text("name", empty=False),
            generation=r.integer("generation", minimum=1),
            state=r.text("state"),
            host=r.text("host"),
            drives=drives,
            checkpoints=checkpoints,
            files=r.texts("files"),
        )

    def enable_merge(self, vm_id: str) -> MergeState:
        r = self._run("enable_merge", VmId=guid(vm_id, "VM id"), JobTimeout=self.job_timeout)
        return MergeState(r.flag("found"), r.flag("was_enabled"), r.opt_integer("state_before"))

    def list_recovery(self, vm_id: str) -> list[RecoveryCheckpoint]:
        r = self._run("list_recovery", VmId=guid(vm_id, "VM id"))
        out = []
        for c in r.objects("checkpoints"):
            iid = c.text("instance_id", empty=False)
            out.append(RecoveryCheckpoint(iid, _checkpoint_id("list_recovery", iid), c.text("name"), c.time("created")))
        return out

    def create_recovery(
        self, vm_id: str, *, consistency_level: int, guest_backup_type: int, marker: str
    ) -> CreatedCheckpoint:
        r = self._run(
            "create_recovery",
            VmId=guid(vm_id, "VM id"),
            ConsistencyLevel=consistency_level,
            GuestBackupType=guest_backup_type,
            Marker=marker,
            JobTimeout=self.job_timeout,
        )
        iid = r.text("instance_id", empty=False)
        return CreatedCheckpoint(
            iid, _checkpoint_id("create_recovery", iid), r.text("name"), r.flag("renamed"), r.text("rename_error")
        )

    def checkpoint_disks(self, vm_id: str, checkpoint_id: str) -> list[SnapshotDisk]:
        r = self._run("checkpoint_disks", VmId=guid(vm_id, "VM id"), CheckpointId=guid(checkpoint_id, "checkpoint"))
        return [SnapshotDisk(d.text("instance_id"), d.text("path"), d.text("subtype")) for d in r.objects("disks")]

    def changes(self, path: str, limit_id: str, offset: int, length: int) -> Changes:
        r = self._run(
            "changes", Path=path, LimitId=limit_id, ByteOffset=offset, ByteLength=length, JobTimeout=self.job_timeout
        )
        offsets, lengths = r.integers("offsets"), r.integers("lengths")
        if len(offsets) != len(lengths):
            raise HypervisorError(
                f"changes: {len(offsets)} ChangedByteOffsets but {len(lengths)} ChangedByteLengths for {path}"
            )
        return Changes(r.integer("processed"), list(zip(offsets, lengths, strict=True)))

    def host_of(self, vm_id: str) -> HostOf:
        r = self._run("host_of", VmId=guid(vm_id, "VM id"))
        return HostOf(r.text("host"), r.text("status"), r.text("state"))

    def convert(self, vm_id: str, checkpoint_id: str) -> ReferencePoint:
        r = self._run(
            "convert",
            VmId=guid(vm_id, "VM id"),
            CheckpointId=guid(checkpoint_id, "checkpoint"),
            JobTimeout=self.job_timeout,
        )
        disks = [(d.text("instance_id"), d.text("path")) for d in r.objects("disks")]
        return ReferencePoint(r.text("reference_point", empty=False), r.texts("disk_ids"), r.texts("rct_ids"), disks)

    def list_reference_points(self, vm_id: str) -> list[ReferencePoint]:
        r = self._run("list_reference_points", VmId=guid(vm_id, "VM id"))
        return [
            ReferencePoint(p.text("instance_id", empty=False), p.texts("disk_ids"), p.texts("rct_ids"))
            for p in r.objects("reference_points")
        ]

    def destroy_reference_point(self, vm_id: str, reference_point: str) -> bool:
        r = self._run(
            "destroy_reference_point",
            VmId=guid(vm_id, "VM id"),
            ReferencePointId=reference_point,
            JobTimeout=self.job_timeout,
        )
        return r.flag("destroyed")

    def destroy_checkpoint(self, vm_id: str, checkpoint_id: str) -> bool:
        r = self._run(
            "destroy_checkpoint",
            VmId=guid(vm_id, "VM id"),
            CheckpointId=guid(checkpoint_id, "checkpoint"),
            JobTimeout=self.job_timeout,
        )
        return r.flag("destroyed")

    def inventory(self) -> dict[str, Any]:
        """The reply rebuilt from its checked fields, each of the type the script writes: what
        ``audit`` reads is only ever that (a disk's size that was text had it fail)."""
        r = self._run("inventory")
        vms = [
            {
                "id": vm.text("id"),
                "name": vm.text("name"),
                "path": vm.text("path"),
                "disks": [
                    {"path": d.text("path"), "size": d.integer("size"), "parent": d.text("parent")}
                    for d in vm.objects("disks")
                ],
                "checkpoints": [
                    {key: c.text(key) for key in ("id", "name", "parent", "type", "created")}
                    for c in vm.objects("checkpoints")
                ],
                "recovery": vm.texts("recovery"),
            }
            for vm in r.objects("vms")
        ]
        orphans = [{"path": o.text("path", empty=False), "size": o.integer("size")} for o in r.objects("orphans")]
        return {"host": r.text("host"), "vms": vms, "orphans": orphans, "problems": r.texts("problems")}

    def compare_import(self, path: str, vm_path: str, vhd_destination: str, vhd_source: str) -> Imported:
        r = self._run(
            "compare_import",
            Path=path,
            VirtualMachinePath=vm_path,
            VhdDestinationPath=vhd_destination,
            VhdSourcePath=vhd_source,
        )
        problems = [(p.text("id"), p.text("message")) for p in r.objects("incompatibilities")]
        return Imported(r.flag("imported"), r.text("id"), r.text("name"), problems)


#: what a test double or the lab host implements per step: params -> JSON-like result
StepHandler = Callable[[Mapping[str, ParamValue]], Any]

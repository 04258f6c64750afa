"""The audit of VM folders and host folders (the files connector's, and the lab host's):
Hyper-V's layouts read by ``hyperv_model``, checkpoints and recovery checkpoints from the
configurations, orphans from the disk files no configuration references.

A VM folder gives one report. A host folder (every VM's configuration in one shared
``Virtual Machines``) gives one report per configuration and, when anything there belongs to
no VM, one report for the host folder itself: orphaned disks, disks that only an unreadable
configuration might claim, checkpoint configurations and other files of no VM.
``HOSTFOLDER#VM`` audits one VM of a host folder.
"""

from __future__ import annotations

import os
import time

from vmvault.errors import ConfigError
from vmvault.hypervisors.audit import CheckpointSummary, VmAudit, orphan_problem
from vmvault.hypervisors.hyperv.recovery import Marker, owner_alive
from vmvault.hypervisors.hyperv_model import (
    HostFolder,
    HyperVVm,
    discover,
    discover_host,
    host_root,
    is_host_folder,
    split_host_spec,
    vm_folders,
)

__all__ = ["audit_folder"]

#: the name of the report about a host folder itself (not a VM)
HOST_REPORT = "(host folder)"


def _vm_report(vm: HyperVVm, now: float, location: str | None = None) -> VmAudit:
    problems: list[str] = []
    checkpoints = [c for c in vm.checkpoints if not c.is_recovery]
    ages = [now - c.created for c in checkpoints if c.created is not None]
    leftovers = []
    for c in vm.checkpoints:
        if not c.is_recovery:
            continue
        marker = Marker.parse(c.name)
        if marker is not None and owner_alive(marker.host, marker.pid, marker.run):
            continue  # a backup is running right now
        leftovers.append(c.name)
        problems.append(f"recovery checkpoint {c.name!r} left behind by a failed backup")
    orphans = [{"path": p, "size": vm.disks[p].file_size} for p in vm.orphans()]
    for p in vm.orphans():
        problems.append(orphan_problem(vm.disks[p].rel, vm.disks[p].file_size))
    if vm.config_error is not None:
        problems.append(f"configuration unreadable: {vm.config_error}")
        if vm.salvaged:
            named = ", ".join(vm.disks[p].rel if p in vm.disks else p for p in vm.salvaged)
            problems.append(f"its disks are taken from the names still legible in the configuration: {named}")
    for p in vm.unattributed():
        d = vm.disks[p]
        problems.append(
            f"{d.rel} ({d.file_size:,} bytes): no readable configuration references it; it is a current disk "
            "of this VM or an orphan, and the unreadable configuration does not tell"
        )
    for slot, pathname in sorted(vm.missing.items()):
        problems.append(f"disk {pathname} ({slot}) named by the configuration is not found")
    for d in vm.disks.values():
        if d.error is not None:
            problems.append(f"{d.rel}: {d.error}")
    summary = CheckpointSummary.of_ages(
        ages,
        count=len(checkpoints),
        chain_depth=vm.chain_depth(),
        differencing_bytes=sum(d.file_size for d in vm.disks.values() if d.parent is not None),
        items=[
            {
                "id": c.id,
                "name": c.name,
                "parent": c.parent_id,
                "created": c.created,
                "type": c.type,
                "depth": vm.depth(c),
            }
            for c in checkpoints
        ],
    )
    return VmAudit(
        name=vm.name,
        id=vm.vm_id,
        location=location or vm.folder,
        checkpoints=summary,
        recovery_checkpoints_left=leftovers,
        orphans=orphans,
        problems=problems,
    )


def _host_reports(host: HostFolder, now: float) -> list[VmAudit]:
    """One report per VM of a host folder, then one about the host folder when anything there
    belongs to no VM."""
    reports = [_vm_report(vm, now, host.location(vm)) for vm in host.vms]
    problems: list[str] = []
    orphans = [{"path": p, "size": host.disks[p].file_size} for p in host.orphans]
    problems += [orphan_problem(host.disks[p].rel, host.disks[p].file_size) for p in host.orphans]
    unreadable = [os.path.basename(v.config_path or "") for v in host.vms if v.config_error and not v.salvaged]
    for p in host.unattributed:
        d = host.disks[p]
        problems.append(
            f"{d.rel} ({d.file_size:,} bytes): no readable configuration references it; it is a disk of the VM "
            f"whose configuration is unreadable ({', '.join(unreadable)}) or an orphan"
        )
    for p in [*host.orphans, *host.unattributed]:
        if host.disks[p].error is not None:
            problems.append(f"{host.disks[p].rel}: {host.disks[p].error}")
    for cp in host.stray_checkpoints:
        rel = os.path.relpath(cp.config_path, host.root)
        problems.append(f"checkpoint configuration {rel} ({cp.name!r}) belongs to no VM here")
    for rel in host.stray_files:
        try:
            size = f"{os.lstat(os.path.join(host.root, rel)).st_size:,} bytes"
        except OSError:
            size = "gone"
        problems.append(f"leftover file {rel} ({size}): named after no VM and no checkpoint here")
    problems += [w for w in host.warnings if "cannot list" in w]
    if problems:
        reports.append(
            VmAudit(name=HOST_REPORT, id="", location=host.root, orphans=orphans, problems=problems, host=True)
        )
    return reports


def audit_folder(target: str, now: float | None = None) -> list[VmAudit]:
    """Reports for a VM folder, a host folder, a folder of either, or one VM of a host folder
    (``HOSTFOLDER#VM``)."""
    now = time.time() if now is None else now
    spec = split_host_spec(target)
    if spec is not None:
        host = discover_host(spec[0])
        vm = host.select(spec[1])
        return [_vm_report(vm, now, host.location(vm))]
    if not os.path.isdir(target):
        raise ConfigError(f"audit: {target} is not a folder")
    reports: list[VmAudit] = []
    for folder in vm_folders(host_root(target)):
        if is_host_folder(folder):
            reports += _host_reports(discover_host(folder), now)
        else:
            reports.append(_vm_report(discover(folder), now))
    return reports

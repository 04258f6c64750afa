"""The Hyper-V connector's registry entry points (``vmvault.hypervisors.registry``).

``open_source`` parses ``hyperv://[HOST]/VM``; ``after_restore`` says how to register a
restored VM on a host (vmvault restores into a local folder and does not import a VM on a
host by itself); ``audit`` turns a host's ``inventory`` into audit reports.
"""

from __future__ import annotations

import os
import time
from typing import Any

from vmvault.hypervisors.audit import CheckpointSummary, VmAudit, iso_to_epoch, orphan_problem
from vmvault.hypervisors.base import RestoredVm, RestoreNote
from vmvault.hypervisors.hyperv.session import HyperVSource, inventory
from vmvault.hypervisors.hyperv_model import CONFIG_SUFFIXES

__all__ = ["after_restore", "audit", "audit_inventory", "open_source"]


def open_source(spec: str) -> HyperVSource:
    return HyperVSource(spec)


def _configuration(restored: RestoredVm) -> str | None:
    """The restored VM's own configuration file (``Virtual Machines/<ID>.vmcx``), if restored."""
    for name, path in sorted(restored.files.items()):
        parts = name.replace("\\", "/").split("/")
        if len(parts) >= 2 and parts[-2].lower() == "virtual machines" and name.lower().endswith(CONFIG_SUFFIXES):
            return path
    return None


def after_restore(restored: RestoredVm) -> RestoreNote:
    """How to register the restored folder on a host: ``Compare-VM -Copy -GenerateNewId`` with
    ``-VhdSourcePath`` (docs/hyperv.md, "Restore"); a clone gets its new VM ID that way."""
    config = _configuration(restored)
    if config is None:
        return RestoreNote()
    rel = os.path.relpath(config, restored.folder)
    disks = os.path.join(os.path.dirname(os.path.dirname(rel)), "Virtual Hard Disks")
    # a PowerShell string in single quotes: a quote is doubled (the names come from the storage,
    # and the line is meant to be pasted)
    rel, disks = rel.replace("'", "''"), disks.replace("'", "''")
    new_id = " (a new VM ID for the clone)" if restored.clone_name is not None else ""
    return RestoreNote(
        facts={"configuration": config},
        lines=[
            f"  to register it on a Hyper-V host{new_id}: copy the folder there, then Compare-VM -Path "
            f"'<copy>\\{rel}' -Copy -GenerateNewId -VhdSourcePath '<copy>\\{disks}' and Import-VM "
            "(docs/hyperv.md, Restore)"
        ],
    )


def audit_inventory(doc: dict[str, Any], now: float | None = None) -> list[VmAudit]:
    """Reports from a Hyper-V host's ``inventory`` reply."""
    now = time.time() if now is None else now
    out: list[VmAudit] = []
    for vm in doc.get("vms") or []:
        cps = [c for c in vm.get("checkpoints") or [] if str(c.get("type", "")).lower() != "recovery"]
        created = [iso_to_epoch(str(c.get("created", ""))) for c in cps]
        ages = [now - t for t in created if t is not None]
        disks = vm.get("disks") or []
        depth = 0
        by_path = {str(d.get("path", "")).lower(): d for d in disks}
        for d in disks:
            n, p = 0, d
            # bounded: a parent loop in what the host says must not hang the audit
            while p and p.get("parent") and n <= len(disks):
                n += 1
                p = by_path.get(str(p["parent"]).lower())
            depth = max(depth, n)
        leftovers = [str(n) for n in vm.get("recovery") or []]
        out.append(
            VmAudit(
                name=str(vm.get("name") or ""),
                id=str(vm.get("id") or ""),
                location=str(vm.get("path") or ""),
                checkpoints=CheckpointSummary.of_ages(
                    ages,
                    count=len(cps),
                    chain_depth=depth,
                    differencing_bytes=sum(int(d.get("size") or 0) for d in disks if d.get("parent")),
                    items=cps,
                ),
                recovery_checkpoints_left=leftovers,
                problems=[f"recovery checkpoint {n!r} left behind by a failed backup" for n in leftovers],
            )
        )
    orphans = doc.get("orphans") or []
    # disks the host could not inspect (Get-VHD failed) and folders it could not list
    host_problems = [str(p) for p in doc.get("problems") or []]
    if orphans or host_problems:
        out.append(
            VmAudit(
                name=f"(host {doc.get('host', '?')})",
                id="",
                location="",
                orphans=orphans,
                problems=[orphan_problem(str(o.get("path")), int(o.get("size") or 0)) for o in orphans] + host_problems,
                host=True,
            )
        )
    return out


def audit(target: str, now: float) -> list[VmAudit]:
    """``hyperv://[HOST]``: every VM of the host, from one ``inventory`` step."""
    return audit_inventory(inventory(target), now)

"""``vmvault audit``: checkpoints are not backups — find where they are standing in for one.

Per VM: checkpoints (count, age, chain depth, bytes held in differencing files), disk files
no configuration references (orphans), recovery checkpoints left by failed backups, and,
with a repository, VMs with no snapshot newer than ``--max-age``. Exit 3 when anything is
found, 0 otherwise.

Targets: a VM folder or a folder of VM folders, ``hyperv-lab://DIR[/VM]``, ``hyperv://[HOST]``.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from datetime import datetime
from typing import Any

from vmvault.errors import ConfigError
from vmvault.hypervisors.hyperv_model import HyperVVm, discover_all

from ._common import EXIT, Output, open_repository, table
from .progress import human_bytes

__all__ = ["audit_folder", "audit_inventory", "parse_age", "register"]

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNITS = {"": 3600, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """``26h``, ``90m``, ``3d``, ``1w``, ``3600s`` (a bare number is hours) -> seconds."""
    m = _AGE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (use e.g. 26h, 3d, 90m)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _iso_to_epoch(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _vm_report(vm: HyperVVm, now: float) -> dict[str, Any]:
    from vmvault.hypervisors.hyperv_lab import RECOVERY_MARKER, _owner_alive

    problems: list[str] = []
    checkpoints = [c for c in vm.checkpoints if not c.is_recovery]
    ages = [now - c.created for c in checkpoints if c.created is not None]
    diff_bytes = sum(d.file_size for p, d in vm.disks.items() if d.parent is not None)
    leftovers = []
    for c in vm.checkpoints:
        if not c.is_recovery:
            continue
        if c.name.startswith(RECOVERY_MARKER) and _owner_alive(c.name):
            continue  # a backup is running right now
        leftovers.append(c.name)
        problems.append(f"recovery checkpoint {c.name!r} left behind by a failed backup")
    orphans = [{"path": p, "size": vm.disks[p].file_size} for p in vm.orphans()]
    for p in vm.orphans():
        problems.append(f"orphaned disk file {vm.disks[p].rel} ({human_bytes(vm.disks[p].file_size)})")
    if vm.config_error is not None:
        problems.append(f"configuration unreadable: {vm.config_error}")
    for d in vm.disks.values():
        if d.error is not None:
            problems.append(f"{d.rel}: {d.error}")
    return {
        "name": vm.name,
        "id": vm.vm_id,
        "location": vm.folder,
        "checkpoints": {
            "count": len(checkpoints),
            "oldest_age_seconds": round(max(ages)) if ages else None,
            "newest_age_seconds": round(min(ages)) if ages else None,
            "chain_depth": vm.chain_depth(),
            "differencing_bytes": diff_bytes,
            "list": [
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
        },
        "recovery_checkpoints_left": leftovers,
        "orphans": orphans,
        "problems": problems,
    }


def audit_folder(target: str, now: float | None = None) -> list[dict[str, Any]]:
    """Reports for a VM folder, a folder of VM folders or a lab host."""
    now = time.time() if now is None else now
    return [_vm_report(vm, now) for vm in discover_all(target)]


def audit_inventory(doc: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """Reports from a Hyper-V host's ``inventory`` reply."""
    now = time.time() if now is None else now
    out: list[dict[str, Any]] = []
    for vm in doc.get("vms") or []:
        cps = [c for c in vm.get("checkpoints") or [] if str(c.get("type", "")).lower() != "recovery"]
        created = [_iso_to_epoch(str(c.get("created", ""))) for c in cps]
        ages = [now - t for t in created if t is not None]
        disks = vm.get("disks") or []
        depth = 0
        by_path = {str(d.get("path", "")).lower(): d for d in disks}
        for d in disks:
            n, p = 0, d
            while p and p.get("parent") and n <= len(disks):
                n += 1
                p = by_path.get(str(p["parent"]).lower())
            depth = max(depth, n)
        leftovers = [str(n) for n in vm.get("recovery") or []]
        out.append(
            {
                "name": vm.get("name"),
                "id": vm.get("id"),
                "location": vm.get("path"),
                "checkpoints": {
                    "count": len(cps),
                    "oldest_age_seconds": round(max(ages)) if ages else None,
                    "newest_age_seconds": round(min(ages)) if ages else None,
                    "chain_depth": depth,
                    "differencing_bytes": sum(int(d.get("size") or 0) for d in disks if d.get("parent")),
                    "list": cps,
                },
                "recovery_checkpoints_left": leftovers,
                "orphans": [],
                "problems": [f"recovery checkpoint {n!r} left behind by a failed backup" for n in leftovers],
            }
        )
    orphans = doc.get("orphans") or []
    if orphans:
        out.append(
            {
                "name": f"(host {doc.get('host', '?')})",
                "id": "",
                "location": "",
                "checkpoints": {"count": 0, "chain_depth": 0, "differencing_bytes": 0, "list": []},
                "recovery_checkpoints_left": [],
                "orphans": orphans,
                "problems": [
                    f"orphaned disk file {o.get('path')} ({human_bytes(int(o.get('size') or 0))})" for o in orphans
                ],
            }
        )
    return out


def _add_backup_age(reports: list[dict[str, Any]], args: argparse.Namespace, now: float) -> None:
    repo = open_repository(args)
    last: dict[str, float] = {}
    for snap in repo.list_snapshots():
        t = _iso_to_epoch(snap.time)
        if t is None:
            continue
        for key in (str(snap.vm.get("id") or ""), str(snap.vm.get("name") or "")):
            if key:
                last[key.upper()] = max(last.get(key.upper(), 0.0), t)
    for r in reports:
        if not r["id"] and str(r["name"]).startswith("(host"):
            continue
        t = last.get(str(r["id"]).upper()) if r["id"] else None
        t = t or last.get(str(r["name"]).upper())
        r["last_backup_age_seconds"] = round(now - t) if t else None
        if t is None:
            r["problems"].append("no snapshot of this VM in the repository")
        elif now - t > args.max_age:
            r["problems"].append(
                f"last snapshot is {_age(now - t)} old (more than {_age(args.max_age)}): checkpoints are not backups"
            )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_audit(args: argparse.Namespace) -> int:
    out = Output(args)
    now = time.time()
    target: str = args.target
    if target.startswith("hyperv://"):
        from vmvault.hypervisors.hyperv import inventory

        reports = audit_inventory(inventory(target), now)
    elif target.startswith("hyperv-lab://"):
        from vmvault.hypervisors.hyperv_lab import parse_lab_spec

        root, name = parse_lab_spec(target)
        reports = audit_folder(root if name is None else os.path.join(root, name), now)
    elif "://" in target:
        raise ConfigError(f"audit: unknown target {target!r}: give a folder, hyperv-lab://DIR or hyperv://HOST")
    else:
        if not os.path.isdir(target):
            raise ConfigError(f"audit: {target} is not a folder")
        reports = audit_folder(target, now)
    if getattr(args, "repo", None) or os.environ.get("VMVAULT_REPO"):
        _add_backup_age(reports, args, now)
    problems = sum(len(r["problems"]) for r in reports)
    rows = [
        [
            r["name"],
            r["checkpoints"]["count"],
            _age(r["checkpoints"].get("oldest_age_seconds")),
            r["checkpoints"]["chain_depth"],
            human_bytes(r["checkpoints"]["differencing_bytes"]),
            _age(r.get("last_backup_age_seconds")) if "last_backup_age_seconds" in r else "-",
            len(r["problems"]),
        ]
        for r in reports
    ]
    lines = [table(["VM", "CHECKPOINTS", "OLDEST", "DEPTH", "AVHDX BYTES", "LAST BACKUP", "PROBLEMS"], rows)]
    for r in reports:
        for p in r["problems"]:
            lines.append(f"  {r['name']}: {p}")
    if not reports:
        lines = ["no VMs found"]
    lines.append(f"{len(reports)} VM(s), {problems} problem(s)")
    out.result({"vms": reports, "problems": problems}, "\n".join(lines))
    return EXIT["problems"] if problems else EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "audit",
        parents=[common],
        help="list checkpoints, orphaned disks, leftover recovery checkpoints and VMs without a recent backup",
    )
    p.add_argument("target", help="VM folder, folder of VM folders, hyperv-lab://DIR or hyperv://HOST")
    p.add_argument(
        "--max-age", type=parse_age, default=parse_age("26h"), help="a VM's newest snapshot must be younger (26h)"
    )
    p.set_defaults(func=cmd_audit)

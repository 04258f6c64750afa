"""Audit: checkpoints are not backups — find where they are standing in for one.

Per VM: checkpoints (count, age, chain depth, bytes held in differencing files), disk files
no configuration references (orphans), recovery checkpoints left by failed backups, and,
given the snapshots of a repository, VMs with no snapshot newer than a maximum age.

:func:`audit` dispatches a target through the connector registry to the connector's audit
function (its entry's ``audit``, e.g. ``folder_audit.audit_folder`` for folders, or the
Hyper-V connector's for a host); this module holds what every audit shares: the report
type and the comparison with a repository's snapshots. ``vmvault audit`` (``cli/audit.py``)
only parses arguments and renders what these return.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

from vmvault import times
from vmvault.errors import ConfigError
from vmvault.hypervisors.registry import CONNECTORS, connector_for

__all__ = [
    "CheckpointSummary",
    "SnapshotFacts",
    "VmAudit",
    "add_backup_ages",
    "audit",
    "format_age",
    "iso_to_epoch",
    "orphan_problem",
]


@dataclass
class CheckpointSummary:
    count: int = 0
    oldest_age_seconds: int | None = None
    newest_age_seconds: int | None = None
    chain_depth: int = 0
    differencing_bytes: int = 0
    #: one dict per checkpoint: id, name, parent, created, type, depth (as the connector knows
    #: them); ``list`` in the JSON form
    items: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of_ages(cls, ages: list[float], **rest: Any) -> CheckpointSummary:
        return cls(
            oldest_age_seconds=round(max(ages)) if ages else None,
            newest_age_seconds=round(min(ages)) if ages else None,
            **rest,
        )


@dataclass
class VmAudit:
    """What the audit found about one VM (or, with an empty ``id``, about the host itself)."""

    name: str
    id: str
    location: str
    checkpoints: CheckpointSummary = field(default_factory=CheckpointSummary)
    recovery_checkpoints_left: list[str] = field(default_factory=list)
    #: ``{"path": ..., "size": ...}`` of each disk file nothing references
    orphans: list[dict[str, Any]] = field(default_factory=list)
    #: one sentence each; any problem makes ``vmvault audit`` exit 3
    problems: list[str] = field(default_factory=list)
    #: seconds since the VM's newest snapshot, once :func:`add_backup_ages` ran (None: no snapshot)
    last_backup_age_seconds: int | None = None
    #: True once :func:`add_backup_ages` looked at this VM
    backup_checked: bool = False
    #: a report about the host (disks of no VM, folders that could not be read), not a VM
    host: bool = False

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["checkpoints"]["list"] = doc["checkpoints"].pop("items")
        for item in doc["checkpoints"]["list"]:
            # JSON times are ISO 8601 with their offset, never epoch numbers (README, "Times")
            created = item.get("created")
            if isinstance(created, int | float) and not isinstance(created, bool):
                with contextlib.suppress(ValueError):
                    item["created"] = times.iso_time(created)
        for private in ("backup_checked", "host"):
            doc.pop(private)
        if not self.backup_checked:
            doc.pop("last_backup_age_seconds")
        return doc


class SnapshotFacts(Protocol):
    """What the audit needs of a snapshot (``repo.snapshot.Snapshot`` has it)."""

    @property
    def vm(self) -> Mapping[str, Any]: ...

    @property
    def time(self) -> str: ...


def iso_to_epoch(text: str) -> float | None:
    """An ISO 8601 time as seconds since the epoch; None when it is not one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def orphan_problem(path: str, size: int) -> str:
    return f"orphaned disk file {path} ({size:,} bytes): no configuration references it"


def audit(target: str, now: float | None = None) -> list[VmAudit]:
    """Reports for ``target``, by the connector its scheme names (a path: a folder)."""
    now = time.time() if now is None else now
    try:
        connector = connector_for(target)
    except ConfigError:
        connector = None
    if connector is None or connector.audit is None:
        usages = ", ".join(c.audit_usage for c in CONNECTORS if c.audit is not None and not c.demo)
        raise ConfigError(f"audit: {target!r} is not a target an audit can read; give {usages}")
    reports: list[VmAudit] = connector.load(connector.audit)(target, now)
    return reports


def add_backup_ages(reports: Iterable[VmAudit], snapshots: Iterable[SnapshotFacts], max_age: float, now: float) -> None:
    """Record each VM's newest snapshot age, and a problem when there is none or it is older
    than ``max_age`` seconds. A snapshot belongs to a VM by VM ID, or else by name (case-blind)."""
    last: dict[str, float] = {}
    for snap in snapshots:
        t = iso_to_epoch(snap.time)
        if t is None:
            continue
        for key in (str(snap.vm.get("id") or ""), str(snap.vm.get("name") or "")):
            if key:
                last[key.upper()] = max(last.get(key.upper(), 0.0), t)
    for r in reports:
        if r.host:
            continue
        t = (last.get(r.id.upper()) if r.id else None) or last.get(r.name.upper())
        r.backup_checked = True
        r.last_backup_age_seconds = round(now - t) if t else None
        if t is None:
            r.problems.append("no snapshot of this VM in the repository")
        elif now - t > max_age:
            r.problems.append(
                f"last snapshot is {format_age(now - t)} old (more than {format_age(max_age)}): "
                "checkpoints are not backups"
            )


def format_age(seconds: float) -> str:
    """``93600`` -> ``1.1d``: an age as the audit shows it."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"

"""The JSON shapes of what vmvault reports about a repository, defined once.

``vmvault snapshots``, ``show``, ``ls``, ``diff``, ``stats``, ``tag``, ``forget``, ``key list``
and the dashboard's API print these documents, so one entity has one shape wherever it
appears:

* a **snapshot** is :func:`snapshot_summary` in lists and :func:`snapshot_detail` (the summary
  plus more keys, none changing type) when shown alone;
* ``vm`` is always an object with at least ``name`` (the VM's recorded name, else the last
  part of the source location) and whatever identity the connector recorded (``id``,
  ``uuid``);
* ``disks`` and ``files`` are always lists of objects (never a count); ``file_count`` and
  ``disk_count`` give the counts;
* ids are always full (64 hex digits), with ``short_id`` beside them where a person may
  want the short form;
* times are ISO 8601 with offset (``vmvault.times.iso_time``), sizes in bytes, modes as numbers
  (``420``; the text output writes ``0644``).
"""

from __future__ import annotations

import contextlib
from typing import Any

from vmvault import times
from vmvault.repo.filters import vm_name
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

__all__ = [
    "disk_summary",
    "file_summary",
    "key_summary",
    "snapshot_detail",
    "snapshot_summary",
    "stored_bytes",
    "vm_record",
]


def vm_record(snap: Snapshot) -> dict[str, Any]:
    """``{"name": ..., ...}``: the snapshot's VM record with its name always present."""
    record = dict(snap.vm) if isinstance(snap.vm, dict) else {}
    record["name"] = vm_name(snap)
    return record


def stored_bytes(snap: Snapshot) -> int | None:
    """What storing this snapshot added to the repository (compressed and encrypted), as its
    backup recorded it; None for snapshots that did not record it (copies and repairs keep
    the original's figure)."""
    value = snap.stats.get("bytes_added") if isinstance(snap.stats, dict) else None
    return value if isinstance(value, int) and value >= 0 else None


def disk_summary(d: DiskRecord) -> dict[str, Any]:
    return {
        "name": d.name,
        "format": d.format,
        "size": d.size,
        "layer": d.layer,
        "parent": d.parent,
        "bytes_read": d.stats.get("bytes_read") if isinstance(d.stats, dict) else None,
    }


def file_summary(f: FileRecord) -> dict[str, Any]:
    return {"name": f.name, "size": f.size, "mode": f.mode, "mtime": times.iso_time(f.mtime_ns / 1e9)}


def snapshot_summary(snap: Snapshot) -> dict[str, Any]:
    """One snapshot in a list (``vmvault snapshots --json``)."""
    return {
        "id": snap.id,
        "short_id": snap.short_id,
        "time": times.iso_time(snap.time),
        "hostname": snap.hostname,
        "username": snap.username,
        "source": dict(snap.source),
        "vm": vm_record(snap),
        "consistency": snap.consistency,
        "tags": list(snap.tags),
        "parent": snap.parent,
        "size": snap.total_size(),
        "stored": stored_bytes(snap),
        "disk_count": len(snap.disks),
        "file_count": len(snap.files),
        "disks": [disk_summary(d) for d in snap.disks],
        "files": [file_summary(f) for f in snap.files],
        "warnings": list(snap.warnings),
    }


def snapshot_detail(snap: Snapshot) -> dict[str, Any]:
    """One snapshot shown alone (``vmvault show --json``): the summary plus how it is stored."""
    doc = snapshot_summary(snap)
    for out, d in zip(doc["disks"], snap.disks, strict=True):
        out |= {
            "chunk_size": d.chunk_size,
            "index_blocks": len(d.index),
            "change_tracking": d.cbt is not None,
            "meta": dict(d.meta),
            "stats": dict(d.stats),
        }
    for out, f in zip(doc["files"], snap.files, strict=True):
        out["chunks"] = len(f.chunks)
    doc |= {"program": snap.program, "stats": dict(snap.stats), "extra": dict(snap.extra)}
    return doc


def key_summary(key: Any, *, current: bool) -> dict[str, Any]:
    """A key object (``repo.keys.KeyInfo``) as ``key list`` and ``key add/remove`` print it:
    full ids always."""
    doc = dict(vars(key))
    if "created" in doc:
        # a damaged key object's text is shown as it is
        with contextlib.suppress(ValueError, TypeError):
            doc["created"] = times.iso_time(doc["created"])
    doc["current"] = current
    return doc

"""The repository: packs of encrypted chunks, index files, snapshots, and their maintenance.

Public surface (see docs/design/repository-format.md for the format)::

    Repository.init / Repository.open     create or open a repository
    Snapshot, DiskRecord, FileRecord      snapshot manifests
    RetentionPolicy, apply_policy         which snapshots a GFS policy keeps (pure)
    forget, forget_ids, prune             remove snapshots, garbage-collect data (exclusive lock)
    repair_index, repair_snapshots        ways out of damage: rebuild the index from the packs,
                                          cut lost data out of snapshots (exclusive lock)
    check                                 verify structure and, with read_data, every byte
"""

from __future__ import annotations

from vmvault.repo.check import Affected, CheckReport, Problem, check
from vmvault.repo.prune import ForgetReport, PruneReport, forget, forget_ids, prune
from vmvault.repo.repair import RepairReport, SnapshotRepairReport, repair_index, repair_snapshots
from vmvault.repo.repository import BlobWriter, RepoConfig, Repository
from vmvault.repo.retention import RetentionPolicy, RetentionResult, apply_policy
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

__all__ = [
    "Affected",
    "BlobWriter",
    "CheckReport",
    "DiskRecord",
    "FileRecord",
    "ForgetReport",
    "Problem",
    "PruneReport",
    "RepairReport",
    "RepoConfig",
    "Repository",
    "RetentionPolicy",
    "RetentionResult",
    "Snapshot",
    "SnapshotRepairReport",
    "apply_policy",
    "check",
    "forget",
    "forget_ids",
    "prune",
    "repair_index",
    "repair_snapshots",
]

"""How much a repository, a VM and a snapshot hold: ``vmvault stats`` and the dashboard.

Three sizes, as restic and borg name them:

* **logical**: bytes as a guest reads them, each snapshot counted whole: the allocated chunks
  of each disk's current state (checkpoint layers resolved) plus the files;
* **unique**: plaintext bytes of the distinct chunks those snapshots reference (what is left
  after deduplication);
* **stored**: bytes those chunks take in the repository's packs, compressed and encrypted.

The deduplication ratio is logical / unique, the compression ratio unique / stored. Only data
chunks count; index blocks, manifests and pack headers are the repository's overhead (the
repository's row also gives the storage's total).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmvault.repo.filters import vm_name
from vmvault.repo.index_block import ChunkResolver, is_chunk
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

__all__ = ["SnapshotUsage", "UsageRow", "snapshot_usage", "usage"]


@dataclass
class SnapshotUsage:
    """One snapshot: its logical bytes and the distinct chunks it references."""

    logical: int = 0
    #: chunk id -> plaintext length
    chunks: dict[bytes, int] = field(default_factory=dict)


def snapshot_usage(repo: Repository, snap: Snapshot) -> SnapshotUsage:
    """Reads each disk's index blocks once (verified); no chunk is read."""
    out = SnapshotUsage()
    parents = {d.parent for d in snap.disks if d.layer and d.parent}
    for record in snap.disks:
        if record.name in parents:
            continue  # a layer below another: the top of its chain reads through it
        resolver = ChunkResolver(repo, snap, record)
        cs = record.chunk_size
        for chunk, entry in resolver.entries(flatten=True):
            if not is_chunk(entry):
                continue
            length = min(cs, record.size - chunk * cs)
            out.logical += length
            out.chunks.setdefault(entry, length)
    for f in snap.files:
        out.logical += f.size
        cs = repo.config.chunk_size
        for k, hexid in enumerate(f.chunks):
            try:
                out.chunks.setdefault(bytes.fromhex(hexid), min(cs, f.size - k * cs))
            except ValueError:
                continue  # check reports a malformed id
    return out


@dataclass
class UsageRow:
    """The sizes of a group of snapshots (one VM, or the whole repository)."""

    name: str
    snapshots: int = 0
    logical: int = 0
    unique: int = 0
    stored: int = 0
    chunks: int = 0
    #: chunks the index does not know (damage: ``vmvault check`` says more)
    unindexed: int = 0

    @property
    def dedup_ratio(self) -> float | None:
        return self.logical / self.unique if self.unique else None

    @property
    def compression_ratio(self) -> float | None:
        return self.unique / self.stored if self.stored else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "snapshots": self.snapshots,
            "logical": self.logical,
            "unique": self.unique,
            "stored": self.stored,
            "chunks": self.chunks,
            "unindexed_chunks": self.unindexed,
            "dedup_ratio": None if self.dedup_ratio is None else round(self.dedup_ratio, 3),
            "compression_ratio": None if self.compression_ratio is None else round(self.compression_ratio, 3),
        }


def _row(repo: Repository, name: str, usages: Iterable[SnapshotUsage]) -> UsageRow:
    row = UsageRow(name)
    seen: dict[bytes, int] = {}
    for u in usages:
        row.snapshots += 1
        row.logical += u.logical
        seen.update(u.chunks)
    for chunk_id, length in seen.items():
        loc = repo.index.lookup(chunk_id)
        row.chunks += 1
        if loc is None:
            row.unindexed += 1
            continue
        row.unique += loc.entry.raw_length or length
        row.stored += loc.entry.length
    return row


def usage(repo: Repository, snaps: Sequence[Snapshot]) -> tuple[list[UsageRow], UsageRow]:
    """One row per VM (by :func:`vm_name`, sorted by name) and one for all of ``snaps``."""
    per_snap = {s.id: snapshot_usage(repo, s) for s in snaps}
    by_vm: dict[str, list[SnapshotUsage]] = {}
    for s in snaps:
        by_vm.setdefault(vm_name(s), []).append(per_snap[s.id])
    rows = [_row(repo, name, by_vm[name]) for name in sorted(by_vm)]
    return rows, _row(repo, "all", per_snap.values())

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

import functools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmvault.repo.filters import vm_name
from vmvault.repo.index_block import ChunkResolver, is_chunk
from vmvault.repo.index_cache import write_many
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

__all__ = ["UsageRow", "snapshot_logical", "usage"]

#: chunk references written to the scratch table at a time
_BATCH = 10_000
#: distinct chunks looked up at a time
_LOOKUPS = 500


def _walk(repo: Repository, snap: Snapshot, chunk: Callable[[bytes, int], object]) -> int:
    """Calls ``chunk(id, plaintext length)`` for every chunk ``snap`` references (repeats
    included) and returns its logical bytes. Reads each disk's index blocks once (verified);
    no chunk is read."""
    logical = 0
    parents = {d.parent for d in snap.disks if d.layer and d.parent}
    for record in snap.disks:
        if record.name in parents:
            continue  # a layer below another: the top of its chain reads through it
        resolver = ChunkResolver(repo, snap, record)
        cs = record.chunk_size
        for k, entry in resolver.entries(flatten=True):
            if not is_chunk(entry):
                continue
            length = min(cs, record.size - k * cs)
            logical += length
            chunk(entry, length)
    for f in snap.files:
        logical += f.size
        cs = repo.config.chunk_size
        for k, hexid in enumerate(f.chunks):
            try:
                chunk(bytes.fromhex(hexid), min(cs, f.size - k * cs))
            except ValueError:
                continue  # check reports a malformed id
    return logical


def snapshot_logical(repo: Repository, snap: Snapshot) -> int:
    """The snapshot's logical bytes, holding none of its chunk ids."""
    return _walk(repo, snap, lambda _id, _length: None)


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


def usage(repo: Repository, snaps: Sequence[Snapshot]) -> tuple[list[UsageRow], UsageRow]:
    """One row per VM (by :func:`vm_name`, sorted by name) and one for all of ``snaps``
    (summaries will do: each is read again whole, one at a time).

    Every chunk reference goes to a scratch table (``IndexCache.scratch``) with its VM; each
    group's distinct chunks are then read back in id order and looked up 500 at a time, so
    memory holds a batch of ids, not the chunks (a dict of every chunk before: about 100 bytes
    a chunk, 4 GiB at 40 M chunks)."""
    names = sorted({vm_name(s) for s in snaps})
    group = {name: n for n, name in enumerate(names)}
    rows = [UsageRow(name) for name in names]
    total = UsageRow("all")
    with repo.index.synced_cache().scratch() as db:
        db.execute("CREATE TABLE s.refs(grp INTEGER NOT NULL, id BLOB NOT NULL, length INTEGER NOT NULL)")
        batch: list[tuple[int, bytes, int]] = []

        def add(grp: int, chunk_id: bytes, length: int) -> None:
            batch.append((grp, chunk_id, length))
            if len(batch) >= _BATCH:
                write_many(db, "INSERT INTO s.refs VALUES (?, ?, ?)", batch)
                batch.clear()

        for snap in repo.whole(snaps, listed=True):
            g = group[vm_name(snap)]
            logical = _walk(repo, snap, functools.partial(add, g))
            for row in (rows[g], total):
                row.snapshots += 1
                row.logical += logical
        write_many(db, "INSERT INTO s.refs VALUES (?, ?, ?)", batch)
        db.execute("CREATE INDEX s.refs_by_group ON refs(grp, id)")
        for g, row in enumerate(rows):
            _count(repo, db.execute("SELECT id, min(length) FROM s.refs WHERE grp = ? GROUP BY id", (g,)), row)
        _count(repo, db.execute("SELECT id, min(length) FROM s.refs GROUP BY id"), total)
    return rows, total


def _count(repo: Repository, distinct: sqlite3.Cursor, row: UsageRow) -> None:
    """Adds each (chunk id, length) of ``distinct`` (each chunk once) to ``row``, looked up in
    batches: its unique bytes (the stored copy's plaintext length), stored bytes, unindexed."""
    while batch := distinct.fetchmany(_LOOKUPS):
        found = repo.index.locations_many([bytes(r[0]) for r in batch])
        for chunk_id, length in batch:
            row.chunks += 1
            locations = found.get(bytes(chunk_id))
            if not locations:
                row.unindexed += 1
                continue
            entry = locations[0].entry
            row.unique += entry.raw_length or length
            row.stored += entry.length

"""Forget snapshots by retention policy; prune (garbage-collect) what no snapshot needs.

Both run under the repository's EXCLUSIVE lock, so no backup is writing meanwhile: every
pack in storage that no index file names was left by a killed writer and may go.

Prune's order of work (docs/design/repository-format.md, "Prune") is what makes a
``kill -9`` at any instant harmless. Every step either only adds objects, or removes
objects that nothing live refers to any more:

1. Read every index file and every snapshot; refuse to go on if any is unreadable, if an
   index block a snapshot needs is unreadable, or if a blob a snapshot needs is in no
   index or only in packs missing from storage (deleting on a partial view could delete
   data a snapshot needs; ``check`` says what is damaged).
2. Mark every blob the remaining snapshots reference: each disk's INDEX blobs and every
   DATA chunk they name, and every file chunk.
3. Copy the used blobs of packs whose unused share is above ``max_unused`` into new packs
   (BlobWriter: packs first, then an index file naming them). Killed here: the old packs
   and index files are untouched; the new packs are duplicates.
4. Write ONE consolidated index file naming every pack that stays and every new pack, and
   superseding every index file that existed (superseded ones too: a file superseded by a
   file that is then deleted must not come back to life). Readers ignore superseded files
   from this moment on, so the packs below are unreferenced from here.
5. Delete the superseded index files. Killed here: leftovers are superseded (a warning).
6. Delete unreferenced packs: unused, repacked, duplicates and orphans. Killed here:
   leftovers are orphans (a warning), deleted by the next prune.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from vmvault.errors import IntegrityError, LockedError, ObjectNotFoundError, RepositoryError, SnapshotNotFoundError
from vmvault.repo._layout import ID_SIZE, PARENT_ID, ZERO_ID, BlobType
from vmvault.repo.immutability import require_full_access, retained, retention_days
from vmvault.repo.index import IndexFile
from vmvault.repo.locks import REFRESH_SECONDS, STALE_SECONDS, RepositoryLock, list_locks
from vmvault.repo.pack import BlobEntry, open_blob, pack_name, parse_pack_header
from vmvault.repo.repository import Repository
from vmvault.repo.retention import RetentionPolicy, RetentionResult, apply_policy
from vmvault.repo.snapshot import Snapshot

__all__ = [
    "DEFAULT_MAX_UNUSED",
    "ForgetReport",
    "PruneReport",
    "RepairReport",
    "forget",
    "forget_ids",
    "prune",
    "referenced_blobs",
    "repair_index",
]

#: repack a pack when more than this share of its bytes is unused
DEFAULT_MAX_UNUSED = 0.1

Progress = Callable[[str, int, int], None]


# ---- helpers -----------------------------------------------------------------------------


def _object_id(name: str, prefix: str) -> bytes | None:
    """The id in ``index/<hex>`` or ``data/<xx>/<hex>``; None for any other name (left alone)."""
    try:
        obj_id = bytes.fromhex(name.rsplit("/", 1)[1])
    except ValueError:
        return None
    if len(obj_id) != ID_SIZE:
        return None
    if prefix == "data/" and name != pack_name(obj_id):
        return None
    return obj_id


def _stored_packs(repo: Repository) -> dict[bytes, int]:
    out = {}
    for o in repo.backend.list("data/"):
        pack_id = _object_id(o.name, "data/")
        if pack_id is not None:
            out[pack_id] = o.size
    return out


def _still_exclusive(repo: Repository, lock: RepositoryLock, what: str) -> None:
    """Refuse to go on unless our lock is still there and fresh and nobody else holds one.

    Holding the lock object is not enough: a process suspended for longer than
    STALE_SECONDS (a paused VM, SIGSTOP) looks dead to others, and a backup may have started
    meanwhile and deduplicated against blobs this prune is about to delete. So every
    destructive step is preceded by this check.
    """
    now = time.time()
    mine = None
    others = []
    for info in list_locks(repo.backend, repo.key):
        if info.name == lock.name:
            mine = info
        elif not info.is_stale(now):
            others.append(info)
    if mine is None or now - mine.time > STALE_SECONDS - REFRESH_SECONDS:
        raise LockedError(
            f"prune stopped before {what}: its exclusive lock went stale or was removed (was the process "
            "suspended?). The repository is consistent; run prune again."
        )
    if others:
        text = "; ".join(o.describe() for o in others)
        raise LockedError(f"prune stopped before {what}: another process took a lock meanwhile ({text})")


# ---- forget ------------------------------------------------------------------------------


@dataclass
class ForgetReport:
    dry_run: bool
    policy: RetentionPolicy
    result: RetentionResult
    removed: list[str] = field(default_factory=list)
    #: snapshots the policy would remove but that are still under retention (kept)
    retained: list[str] = field(default_factory=list)
    #: snapshots that could not be read, so the policy did not consider them (id, error)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kept(self) -> list[str]:
        return [s.id for s in self.result.keep]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "policy": self.policy.to_dict(),
            "groups": self.result.to_dict()["groups"],
            "kept": self.kept,
            "removed": [s.id for s in self.result.remove if s.id not in self.retained]
            if self.dry_run
            else self.removed,
            "retained": list(self.retained),
            "unreadable": [{"id": i, "error": e} for i, e in self.unreadable],
        }


def forget(repo: Repository, policy: RetentionPolicy, *, dry_run: bool = False) -> ForgetReport:
    """Delete the snapshot manifests ``policy`` does not keep (their data stays until ``prune``)."""
    require_full_access(repo, "forget")
    with repo.lock(exclusive=True, operation="forget"):
        unreadable: list[tuple[str, str]] = []
        snaps = repo.list_snapshots(on_error=lambda sid, exc: unreadable.append((sid, str(exc))))
        result = apply_policy(snaps, policy)
        report = ForgetReport(dry_run=dry_run, policy=policy, result=result, unreadable=unreadable)
        held = retained(repo, [f"snapshots/{s.id}" for s in result.remove])
        report.retained = [s.id for s in result.remove if f"snapshots/{s.id}" in held]
        if not dry_run:
            for snap in result.remove:
                if f"snapshots/{snap.id}" in held:
                    continue
                repo.delete_snapshot(snap.id)
                report.removed.append(snap.id)
        return report


def forget_ids(repo: Repository, refs: Iterable[str], *, dry_run: bool = False) -> list[str]:
    """Delete the snapshots named by full ids or unique prefixes, readable or not.

    The way out when ``check`` reports a damaged snapshot manifest: prune refuses to run
    while one exists, because it cannot tell which data that snapshot needs.
    """
    require_full_access(repo, "forget")
    with repo.lock(exclusive=True, operation="forget"):
        known = repo.snapshot_ids()
        chosen: list[str] = []
        for ref in refs:
            matches = [s for s in known if s.startswith(ref)] if ref else []
            if len(matches) != 1:
                raise SnapshotNotFoundError(
                    f"{ref!r} matches {len(matches)} snapshots" + ("; give more characters" if matches else "")
                )
            chosen.append(matches[0])
        if not dry_run:
            for snap_id in chosen:
                repo.delete_snapshot(snap_id)
        return chosen


# ---- reachability ------------------------------------------------------------------------


def iter_index_entries(raw: bytes) -> Iterable[bytes]:
    return (raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE))


def referenced_blobs(repo: Repository, snapshots: Iterable[Snapshot]) -> set[bytes]:
    """Every blob id the snapshots need: INDEX blobs, the DATA chunks they name, file chunks.

    Each distinct INDEX blob is read once (unchanged index blocks are shared between
    snapshots). Raises IntegrityError when an index block cannot be read.
    """
    used: set[bytes] = set()
    for snap in snapshots:
        try:
            _mark_snapshot(repo, snap, used)
        except ValueError as exc:  # a manifest that authenticates but names an id that is not hex
            raise IntegrityError(f"snapshot {snap.short_id}: malformed blob id: {exc}", object_id=snap.id) from exc
    return used


def _mark_snapshot(repo: Repository, snap: Snapshot, used: set[bytes]) -> None:
    for disk in snap.disks:
        for block in disk.index:
            if block is None:
                continue
            block_id = bytes.fromhex(block)
            if block_id in used:
                continue
            raw = repo.get_blob(BlobType.INDEX, block_id)
            used.add(block_id)
            used.update(e for e in iter_index_entries(raw) if e != ZERO_ID and e != PARENT_ID)
    for f in snap.files:
        used.update(bytes.fromhex(c) for c in f.chunks)


# ---- prune -------------------------------------------------------------------------------


@dataclass
class PruneReport:
    dry_run: bool
    max_unused: float
    snapshots: int = 0
    index_files_before: int = 0
    packs_before: int = 0
    bytes_before: int = 0
    blobs_used: int = 0
    blobs_removed: int = 0
    bytes_removed: int = 0  # sealed bytes of removed blobs
    packs_deleted: int = 0  # wholly unused, repacked, orphan and duplicate-only packs
    orphan_packs: int = 0  # packs in storage that no index names (left by killed writers)
    missing_packs: int = 0  # indexed packs absent from storage, holding nothing needed
    packs_repacked: int = 0
    blobs_repacked: int = 0
    bytes_repacked: int = 0
    packs_written: int = 0
    index_files_removed: int = 0
    index_files_written: int = 0
    #: packs and index files prune would delete but that are under retention (kept)
    packs_retained: int = 0
    index_files_retained: int = 0
    packs_after: int = 0
    bytes_after: int = 0
    actions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Pack:
    id: bytes
    entries: list[BlobEntry]
    size: int | None  # in storage; None: missing
    keep: list[BlobEntry] = field(default_factory=list)  # the copies of used blobs chosen here

    @property
    def blob_bytes(self) -> int:
        return sum(e.length for e in self.entries)

    @property
    def used_bytes(self) -> int:
        return sum(e.length for e in self.keep)


def _read_index_files(repo: Repository) -> dict[bytes, IndexFile]:
    files: dict[bytes, IndexFile] = {}
    for obj in repo.backend.list("index/"):
        file_id = _object_id(obj.name, "index/")
        if file_id is None:
            continue  # not ours: left alone
        try:
            files[file_id] = repo.read_index_file(file_id)
        except ObjectNotFoundError:
            continue
        except IntegrityError as exc:
            raise IntegrityError(
                f"prune stopped, nothing was changed: {exc}. Without every index file prune cannot tell "
                "which packs are in use; run `vmvault check` and repair the index first.",
                name=obj.name,
            ) from exc
    return files


def prune(
    repo: Repository,
    *,
    dry_run: bool = False,
    max_unused: float = DEFAULT_MAX_UNUSED,
    progress: Progress | None = None,
) -> PruneReport:
    """Remove every blob no snapshot references; see the module docstring for the order.

    ``max_unused`` (0..1): a pack holding used blobs is rewritten when more than this share
    of its blob bytes is unused; wholly unused packs are always deleted.
    """
    if not 0.0 <= max_unused <= 1.0:
        raise RepositoryError(f"max_unused must be between 0 and 1, not {max_unused}")
    require_full_access(repo, "prune")
    with repo.lock(exclusive=True, operation="prune") as lock:
        try:
            return _prune_locked(repo, lock, dry_run, max_unused, progress)
        finally:
            # whatever happened, the in-memory index must describe the repository as it now is
            repo.load_index()


def _prune_locked(
    repo: Repository, lock: RepositoryLock, dry_run: bool, max_unused: float, progress: Progress | None
) -> PruneReport:
    report = PruneReport(dry_run=dry_run, max_unused=max_unused)
    backend = repo.backend

    # 1. everything that exists
    files = _read_index_files(repo)
    problems = repo.load_index()
    if problems:  # an index file changed under us: give up rather than guess
        raise IntegrityError(f"prune stopped, nothing was changed: {'; '.join(problems)}")
    report.index_files_before = len(files)
    superseded = {s for f in files.values() for s in f.supersedes}
    stored = _stored_packs(repo)
    report.packs_before = len(stored)
    report.bytes_before = sum(stored.values())

    packs: dict[bytes, _Pack] = {}
    for file_id, f in files.items():
        if file_id in superseded:
            continue
        for pack_id, entries in f.packs.items():
            p = packs.setdefault(pack_id, _Pack(pack_id, [], stored.get(pack_id)))
            have = {(e.id, e.offset) for e in p.entries}
            p.entries.extend(e for e in entries if (e.id, e.offset) not in have)

    unreadable: list[str] = []
    snaps = repo.list_snapshots(on_error=lambda sid, exc: unreadable.append(f"{sid[:8]}: {exc}"))
    if unreadable:
        raise IntegrityError(
            "prune stopped, nothing was changed: unreadable snapshots (" + "; ".join(unreadable) + "). "
            "Prune cannot tell which data they need; run `vmvault check`, then forget them."
        )
    report.snapshots = len(snaps)

    # 2. what the snapshots need
    try:
        used = referenced_blobs(repo, snaps)
    except (IntegrityError, SnapshotNotFoundError) as exc:
        raise IntegrityError(
            f"prune stopped, nothing was changed: {exc}. Run `vmvault check` to see which snapshots are affected."
        ) from exc
    report.blobs_used = len(used)

    # choose one stored copy of each used blob; prefer packs that are mostly used, so
    # duplicates left by concurrent backups end up in packs that go away
    order = sorted(
        (p for p in packs.values() if p.size is not None),
        key=lambda p: (-sum(1 for e in p.entries if e.id in used) / max(1, len(p.entries)), p.id),
    )
    placed: set[bytes] = set()
    for p in order:
        for e in p.entries:
            if e.id in used and e.id not in placed:
                p.keep.append(e)
                placed.add(e.id)
    missing = used - placed
    if missing:
        sample = ", ".join(sorted(m.hex() for m in missing)[:5])
        raise IntegrityError(
            f"prune stopped, nothing was changed: {len(missing)} blobs the snapshots need are in no index "
            f"or only in missing packs (e.g. {sample}). Run `vmvault check` to see which snapshots are affected."
        )

    delete: list[bytes] = []
    repack: list[_Pack] = []
    keep: list[_Pack] = []
    for p in sorted(packs.values(), key=lambda p: p.id):
        if p.size is None:
            report.missing_packs += 1
            report.actions.append(f"drop missing pack {p.id.hex()} from the index (it held nothing needed)")
            continue
        if not p.keep:
            delete.append(p.id)
        elif p.blob_bytes and (p.blob_bytes - p.used_bytes) / p.blob_bytes > max_unused:
            repack.append(p)
        else:
            keep.append(p)
            continue
        kept_ids = {e.id for e in p.keep}
        report.blobs_removed += sum(1 for e in p.entries if e.id not in kept_ids)
        report.bytes_removed += sum(e.length for e in p.entries if e.id not in kept_ids)
    orphans = sorted(set(stored) - set(packs))
    # retention: a pack still inside it stays, indexed as it is (an orphan stays an orphan)
    held = retained(repo, [pack_name(i) for i in delete + [p.id for p in repack] + orphans])
    if held:
        for p in [packs[i] for i in delete] + repack:
            if pack_name(p.id) in held:
                keep.append(p)
                kept_ids = {e.id for e in p.keep}
                report.blobs_removed -= sum(1 for e in p.entries if e.id not in kept_ids)
                report.bytes_removed -= sum(e.length for e in p.entries if e.id not in kept_ids)
        delete = [i for i in delete if pack_name(i) not in held]
        repack = [p for p in repack if pack_name(p.id) not in held]
        orphans = [i for i in orphans if pack_name(i) not in held]
        report.packs_retained = len(held)
        report.actions.append(f"kept {len(held)} packs still under retention ({retention_days(repo)} days)")
    report.orphan_packs = len(orphans)
    report.packs_repacked = len(repack)
    report.blobs_repacked = sum(len(p.keep) for p in repack)
    report.bytes_repacked = sum(p.used_bytes for p in repack)
    doomed = delete + [p.id for p in repack] + orphans
    report.packs_deleted = len(doomed)

    nothing_to_do = not doomed and not report.missing_packs and len(files) <= 1 and not superseded & set(files)
    if not nothing_to_do and not doomed and not report.missing_packs and retention_days(repo) is not None:
        # only index files would be merged, and if none of them may be deleted yet, a new
        # index file would just be one more object under retention
        names = [f"index/{i.hex()}" for i in files]
        nothing_to_do = len(retained(repo, names)) == len(names)
    if dry_run or nothing_to_do:
        report.index_files_written = 0
        # for a dry run: an estimate (repacked blobs are counted at their current size)
        report.packs_after = report.packs_before - len(doomed) if dry_run else report.packs_before
        removed = sum(stored[i] for i in doomed) - report.bytes_repacked
        report.bytes_after = report.bytes_before - removed if dry_run else report.bytes_before
        return report

    # 3. repack: new packs (and an index file naming them) before anything is removed
    new_entries: dict[bytes, list[BlobEntry]] = {}
    written_index: set[bytes] = set()
    if repack:
        scratch = Repository(backend, repo.config, repo.key, repo.key_id)  # empty index: copy everything given
        writer = scratch.writer(upload_threads=2, index_every=1 << 30)
        try:
            for n, p in enumerate(repack):
                if progress is not None:
                    progress("repack", n, len(repack))
                name = pack_name(p.id)
                data = backend.get(name)
                if hashlib.sha256(data).digest() != p.id:
                    raise IntegrityError(
                        f"prune stopped before removing anything: pack {p.id.hex()} does not match its name "
                        "(damaged); run `vmvault check --read-data`",
                        name=name,
                    )
                for e in p.keep:
                    try:
                        plain = open_blob(repo.key, e.type, e.id, data[e.offset : e.offset + e.length])
                    except IntegrityError as exc:
                        raise IntegrityError(
                            f"prune stopped before removing anything: {exc} (in pack {p.id.hex()}); "
                            "run `vmvault check --read-data` to see which snapshots it affects",
                            object_id=e.id.hex(),
                            name=name,
                        ) from exc
                    writer.add(e.type, e.id, plain)
            writer.flush()
        finally:
            writer.close(flush=False)
        new_entries = {pid: sorted(es, key=lambda e: e.offset) for pid, es in scratch.index.packs().items()}
        written_index = scratch.index_file_ids()
        report.packs_written = len(new_entries)
        report.actions.append(f"repacked {len(repack)} packs into {len(new_entries)}")

    # 4. one index file that names everything that stays and supersedes every other index file
    consolidated = IndexFile(
        packs={p.id: sorted(p.entries, key=lambda e: e.offset) for p in keep} | new_entries,
        supersedes=sorted(set(files) | written_index),
    )
    _still_exclusive(repo, lock, "writing the new index")
    new_id = repo.write_index_file(consolidated)
    report.index_files_written = 1

    # 5. superseded index files, then 6. unreferenced packs
    old_index = [f"index/{i.hex()}" for i in sorted(set(files) | written_index) if i != new_id]
    held_index = retained(repo, old_index)
    report.index_files_retained = len(held_index)
    for name in old_index:
        if name not in held_index:  # a retained one stays, superseded: readers ignore it
            backend.delete(name)
            report.index_files_removed += 1
    for n, pack_id in enumerate(doomed):
        if progress is not None:
            progress("delete", n, len(doomed))
        if n % 256 == 0:
            _still_exclusive(repo, lock, "deleting packs")
        backend.delete(pack_name(pack_id))

    after = [o.size for o in backend.list("data/")]
    report.packs_after = len(after)
    report.bytes_after = sum(after)
    return report


# ---- repair ------------------------------------------------------------------------------


@dataclass
class RepairReport:
    dry_run: bool
    index_files_before: int = 0
    index_files_damaged: list[str] = field(default_factory=list)
    packs_kept: int = 0  # listed by a readable index file and present
    packs_recovered: int = 0  # present, listed by no readable index file, header read
    packs_unreadable: list[str] = field(default_factory=list)  # header damaged: not indexed
    packs_dropped: list[str] = field(default_factory=list)  # indexed but missing from storage
    index_files_written: int = 0
    index_files_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repair_index(repo: Repository, *, dry_run: bool = False, from_scratch: bool = False) -> RepairReport:
    """Rebuild the index from the packs in storage, under the exclusive lock.

    Packs named by a readable index file keep their entries (``from_scratch`` re-reads
    every pack's header instead); every other pack's header is read from the pack. One
    new index file supersedes every index file present, damaged ones included; only then
    are the old files deleted, so a kill at any point leaves a usable index. Packs whose
    header cannot be read are left out (prune deletes them; ``check`` then names what
    they held). Indexed packs missing from storage are dropped from the index, so no
    backup deduplicates against blobs that are gone.
    """
    require_full_access(repo, "index repair")
    with repo.lock(exclusive=True, operation="repair-index") as lock:
        try:
            return _repair_locked(repo, lock, dry_run, from_scratch)
        finally:
            repo.load_index()


def _repair_locked(repo: Repository, lock: RepositoryLock, dry_run: bool, from_scratch: bool) -> RepairReport:
    backend = repo.backend
    report = RepairReport(dry_run=dry_run)
    present: list[bytes] = []
    readable: dict[bytes, IndexFile] = {}
    for obj in backend.list("index/"):
        file_id = _object_id(obj.name, "index/")
        if file_id is None:
            continue
        present.append(file_id)
        try:
            readable[file_id] = repo.read_index_file(file_id)
        except ObjectNotFoundError:
            present.pop()
        except IntegrityError:
            report.index_files_damaged.append(obj.name)
    report.index_files_before = len(present)
    superseded = {s for f in readable.values() for s in f.supersedes}
    stored = _stored_packs(repo)

    packs: dict[bytes, list[BlobEntry]] = {}
    if not from_scratch:
        for file_id, f in readable.items():
            if file_id in superseded:
                continue
            for pack_id, entries in f.packs.items():
                if pack_id not in stored:
                    if pack_id.hex() not in report.packs_dropped:
                        report.packs_dropped.append(pack_id.hex())
                    continue
                have = packs.setdefault(pack_id, [])
                seen = {(e.id, e.offset) for e in have}
                have.extend(e for e in entries if (e.id, e.offset) not in seen)
        report.packs_kept = len(packs)
    for pack_id in sorted(set(stored) - set(packs)):
        name = pack_name(pack_id)
        try:
            packs[pack_id] = parse_pack_header(repo.key, backend.get(name), name=name)
            report.packs_recovered += 1
        except (IntegrityError, ObjectNotFoundError):
            report.packs_unreadable.append(pack_id.hex())
    if dry_run:
        return report
    new_index = IndexFile(
        packs={p: sorted(es, key=lambda e: e.offset) for p, es in sorted(packs.items())},
        supersedes=sorted(present),
    )
    _still_exclusive(repo, lock, "writing the new index")
    new_id = repo.write_index_file(new_index)
    report.index_files_written = 1
    old_index = [f"index/{i.hex()}" for i in sorted(present) if i != new_id]
    held_index = retained(repo, old_index)
    for name in old_index:
        if name not in held_index:
            backend.delete(name)
            report.index_files_removed += 1
    return report

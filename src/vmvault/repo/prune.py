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
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from vmvault.errors import IntegrityError, LockedError, ObjectNotFoundError, RepositoryError, SnapshotNotFoundError
from vmvault.repo._layout import ID_SIZE, BlobType
from vmvault.repo.ahead import PACKS_AHEAD, ahead
from vmvault.repo.filters import SnapshotFilter
from vmvault.repo.immutability import require_full_access, retained, retention_days
from vmvault.repo.index import parse_index
from vmvault.repo.index_block import NOT_CHUNKS
from vmvault.repo.index_cache import Grouped, ScratchRows, rows_digest
from vmvault.repo.locks import REFRESH_SECONDS, STALE_SECONDS, RepositoryLock, list_locks
from vmvault.repo.names import index_id
from vmvault.repo.names import pack_id as parse_pack_id
from vmvault.repo.pack import BlobEntry, expected_pack_size, open_blob, pack_name
from vmvault.repo.progress import PhaseCallback
from vmvault.repo.repository import Repository
from vmvault.repo.retention import RetentionPolicy, RetentionResult, apply_policy
from vmvault.repo.rewrite import IndexFileWriter
from vmvault.repo.snapshot import Snapshot

__all__ = [
    "DEFAULT_MAX_UNUSED",
    "ForgetReport",
    "PruneReport",
    "forget",
    "forget_ids",
    "prune",
    "referenced_blobs",
]

#: repack a pack when more than this share of its bytes is unused
DEFAULT_MAX_UNUSED = 0.1


# ---- helpers -----------------------------------------------------------------------------


def _object_id(name: str, prefix: str) -> bytes | None:
    """The id in ``index/<hex>`` or ``data/<xx>/<hex>``; None for any other name (left alone,
    never deleted: repo/names.py)."""
    return parse_pack_id(name) if prefix == "data/" else index_id(name)


def _still_exclusive(repo: Repository, lock: RepositoryLock, what: str, *, operation: str = "prune") -> None:
    """Refuse to go on unless our lock is still there and fresh and nobody else holds one.

    Holding the lock object is not enough: a process suspended for longer than
    STALE_SECONDS (a paused VM, SIGSTOP) looks dead to others, and a backup may have started
    meanwhile and deduplicated against blobs this prune is about to delete. So every
    destructive step is preceded by this check.
    """
    now = time.time()
    infos = list_locks(repo.backend, repo.key)
    mine = next((info for info in infos if info.name == lock.name), None)
    # the storage's time of this lock's last refresh: at most REFRESH_SECONDS behind the storage's
    # clock, so another lock's age is if anything taken as shorter than it is
    stored = mine.stored if mine is not None else None
    others = [info for info in infos if info.name != lock.name and not info.is_stale(now, storage_now=stored)]
    if mine is None or now - mine.time > STALE_SECONDS - REFRESH_SECONDS:
        raise LockedError(
            f"{operation} stopped before {what}: its exclusive lock went stale or was removed (was the process "
            f"suspended?). The repository is consistent; run {operation} again."
        )
    if others:
        text = "; ".join(o.describe() for o in others)
        raise LockedError(f"{operation} stopped before {what}: another process took a lock meanwhile ({text})")


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


def forget(
    repo: Repository, policy: RetentionPolicy, *, dry_run: bool = False, select: SnapshotFilter | None = None
) -> ForgetReport:
    """Delete the snapshot manifests ``policy`` does not keep (their data stays until ``prune``).
    ``select``: the policy judges only the snapshots this filter matches; others are untouched."""
    require_full_access(repo, "forget")
    with repo.lock(exclusive=True, operation="forget"):
        unreadable: list[tuple[str, str]] = []
        snaps = repo.list_snapshots(on_error=lambda sid, exc: unreadable.append((sid, str(exc))), summaries=True)
        if select is not None:
            snaps = select.select(snaps)
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
            used.update(repo.read_index_block(block_id).chunk_ids())
            used.add(block_id)
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


#: a live index file smaller than this is folded into the files prune writes (12.5)
SMALL_INDEX_FILE = 4 << 20
#: blob rows inserted into the scratch database per statement
_BATCH = 10_000


def _unreadable_index(problems: list[str]) -> IntegrityError:
    return IntegrityError(
        f"prune stopped, nothing was changed: {'; '.join(problems[:3])}. Without every index file prune cannot "
        "tell which packs are in use; run `vmvault repair index` first."
    )


def prune(
    repo: Repository,
    *,
    dry_run: bool = False,
    max_unused: float = DEFAULT_MAX_UNUSED,
    progress: PhaseCallback | None = None,
) -> PruneReport:
    """Remove every blob no snapshot references; see the module docstring for the order.

    ``max_unused`` (0..1): a pack holding used blobs is rewritten when more than this share
    of its blob bytes is unused; wholly unused packs are always deleted. Memory does not grow
    with the repository: the working sets are tables of a scratch database on disk
    (repository-format.md, section 12.5).
    """
    if not 0.0 <= max_unused <= 1.0:
        raise RepositoryError(f"max_unused must be between 0 and 1, not {max_unused}")
    require_full_access(repo, "prune")
    with repo.lock(exclusive=True, operation="prune") as lock:
        try:
            return _prune_locked(repo, lock, dry_run, max_unused, progress)
        finally:
            # whatever happened, the index must describe the repository as it now is
            repo.load_index()


def _tick(progress: PhaseCallback | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


def _prune_locked(
    repo: Repository, lock: RepositoryLock, dry_run: bool, max_unused: float, progress: PhaseCallback | None
) -> PruneReport:
    report = PruneReport(dry_run=dry_run, max_unused=max_unused)
    # 1. everything that exists: every index file (in this host's cache), every pack
    problems = repo.load_index(progress=lambda d, t: _tick(progress, "index", d, t))
    if problems:
        raise _unreadable_index(problems)
    files = repo.index.cache.present_files()  # id -> live
    report.index_files_before = len(files)
    _require_cache_agrees(repo, files, progress)
    files = repo.index.cache.present_files()
    cache = repo.index.cache
    unreadable: list[str] = []
    # (the storage's copies, as check reads them: a snapshot damaged there stops the prune even
    # while this host's copy reads, since other hosts cannot read it)
    snaps = repo.list_snapshots(
        on_error=lambda sid, exc: unreadable.append(f"{sid[:8]}: {exc}"), kept=False, summaries=True
    )
    if unreadable:
        raise IntegrityError(
            "prune stopped, nothing was changed: unreadable snapshots (" + "; ".join(unreadable) + "). "
            "Prune cannot tell which data they need; remove them with `vmvault forget ID`."
        )
    report.snapshots = len(snaps)
    with cache.scratch() as db:
        _list_stored(repo, db, report, progress)
        # 2. what the snapshots need
        try:
            _mark_used(repo, db, snaps, progress)
        except (IntegrityError, SnapshotNotFoundError) as exc:
            raise IntegrityError(
                f"prune stopped, nothing was changed: {exc}. Run `vmvault check` to see which snapshots are "
                "affected, then `vmvault repair index` and `vmvault repair snapshots --forget`."
            ) from exc
        report.blobs_used = db.execute("SELECT count(*) FROM s.used").fetchone()[0]
        _require_every_used_blob(db)
        # 3. per pack: what is used, which copy of a blob stored twice stays
        _pack_accounting(db, progress)
        _decide(repo, db, report, max_unused)
        affected = _affected_files(db, files, report)
        garbage = any(not live for live in files.values())  # superseded files still present
        nothing_to_do = not report.packs_deleted and not report.missing_packs and not affected and not garbage
        only_merging = not nothing_to_do and not report.packs_deleted and not report.missing_packs
        if only_merging and retention_days(repo) is not None:
            # only index files would be merged, and if none of them may be deleted yet, a new
            # index file would just be one more object under retention
            names = [f"index/{i.hex()}" for i in files]
            nothing_to_do = len(retained(repo, names)) == len(names)
        if dry_run or nothing_to_do:
            report.index_files_written = 0
            if dry_run:  # an estimate: repacked blobs are counted at their current size
                removed = db.execute(
                    "SELECT coalesce(sum(size), 0) FROM s.stored WHERE id IN (SELECT id FROM s.doomed)"
                ).fetchone()[0]
                report.packs_after = report.packs_before - report.packs_deleted
                report.bytes_after = report.bytes_before - removed + report.bytes_repacked
            else:
                report.packs_after, report.bytes_after = report.packs_before, report.bytes_before
            return report
        # 4. repack: new packs, indexed by their own new index files, before anything is removed
        repacked_packs, repacked_files = _repack(repo, db, report, progress)
        # 5. the packs of the affected index files that stay, into new index files, the last
        # of which supersedes the affected ones
        with IndexFileWriter(repo) as out:
            _relist(repo, db, affected, out, progress)
            out.absorb(repacked_files)
            superseded = out.finish(
                set(affected) | set(repacked_files) | {f for f, live in files.items() if not live},
                before=lambda: _still_exclusive(repo, lock, "writing the new index"),
            )
            report.index_files_written = len(out.written) + len(repacked_files)
        repo.confirm_written({}, out.written, operation="prune", earlier=(repacked_packs, repacked_files))
        # 6. superseded index files, then the packs nothing lists any more
        old_index = [f"index/{i.hex()}" for i in superseded]
        held_index = retained(repo, old_index)
        report.index_files_retained = len(held_index)
        for name in old_index:
            if name not in held_index:  # a retained one stays, superseded: readers ignore it
                repo.backend.delete(name)
                report.index_files_removed += 1
        _delete_packs(repo, db, lock, report, progress)
    report.packs_after = 0
    report.bytes_after = 0
    for _pack_id, size in repo.iter_stored_packs():
        report.packs_after += 1
        report.bytes_after += size
    return report


def _file_digests(
    repo: Repository, files: dict[bytes, bool], progress: PhaseCallback | None
) -> tuple[dict[bytes, tuple[int, int] | None], set[bytes]]:
    """The cache holds what each file said when it was first read; the files themselves must
    still read (another host without this cache depends on them): every one, parsed one at a
    time (read a few at once ahead).
    What they say is kept as a digest (``rows_digest``, with the cache's numbers of their
    packs), with the ids they supersede. Unreadable files stop prune."""
    cache = repo.index.cache
    problems: list[str] = []
    digests: dict[bytes, tuple[int, int] | None] = {}
    replaced: set[bytes] = set()  # superseded by a present file
    sizes = cache.file_sizes()
    # read as many at once as the storage serves best, parsed here one at a time
    for n, (file_id, payload) in enumerate(repo.index_payloads((f, sizes.get(f, 0)) for f in files)):
        _tick(progress, "index files", n, len(files))
        try:
            if not isinstance(payload, bytes):
                raise payload
            parsed = parse_index(payload, name=f"index/{file_id.hex()}")
        except ObjectNotFoundError:
            problems.append(f"index/{file_id.hex()} vanished while prune ran")
            continue
        except IntegrityError as exc:
            problems.append(str(exc))
            continue
        digests[file_id] = rows_digest(parsed, cache.pack_numbers(rec.pack_id for rec in parsed.records))
        replaced.update(old for old in parsed.supersedes if old != file_id)
    _tick(progress, "index files", len(files), len(files))
    if problems:
        raise _unreadable_index(problems)
    return digests, replaced


def _require_cache_agrees(repo: Repository, files: dict[bytes, bool], progress: PhaseCallback | None) -> None:
    """Stop unless this host's index cache says what the index files say: which files are
    live, and every row of each (by digest). Prune deletes the packs the cache's rows leave
    unused, so a row that lies (a damaged or tampered cache) could delete data a snapshot
    needs. A cache that disagrees is rebuilt from the files once (and the files read again:
    the digests name packs by the cache's numbers); disagreeing again, prune stops."""
    for attempt in range(2):
        digests, replaced = _file_digests(repo, files, progress)
        wrong = repo.index.disagreement(files, replaced, digests)
        if wrong is None:
            return
        if attempt:
            raise IntegrityError(
                f"prune stopped, nothing was changed: this host's index cache {repo.index.cache.path} disagrees "
                f"with the index files ({wrong}) even rebuilt; remove it and run prune again"
            )
        repo.index.reset(f"it disagrees with the index files about {wrong}")
        problems = repo.load_index()
        if problems:
            raise _unreadable_index(problems)
        files = repo.index.cache.present_files()


def _list_stored(repo: Repository, db: sqlite3.Connection, report: PruneReport, progress: PhaseCallback | None) -> None:
    report.packs_before, report.bytes_before = repo.list_stored_into(db, progress)
    # the cache's numbers of the packs in storage: the passes over every row look a pack up
    # here by its number, in a table a few bytes a pack, not through its 32-byte id
    db.execute("CREATE TABLE s.present(no INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO s.present SELECT p.no FROM packs p JOIN s.stored st ON st.id = p.id ORDER BY p.no")


def _mark_used(repo: Repository, db: sqlite3.Connection, snaps: list[Snapshot], progress: PhaseCallback | None) -> None:
    """Every blob the snapshots (summaries) need into ``s.used``: their index blocks (each
    distinct one read once), the chunks those name, their files' chunks. Each snapshot is read
    again whole while it is walked, one at a time (repository-format.md 12.10)."""
    db.execute("CREATE TABLE s.blocks(id BLOB PRIMARY KEY) WITHOUT ROWID")
    used = ScratchRows(db, "s.used_all", _BATCH)
    with Grouped(db) as group:
        for n, snap in enumerate(repo.whole(snaps)):
            _tick(progress, "snapshots", n, len(snaps))
            try:
                for disk in snap.disks:
                    for block in disk.index:
                        if block is None:
                            continue
                        block_id = bytes.fromhex(block)
                        group.step()
                        if db.execute("INSERT OR IGNORE INTO s.blocks VALUES (?)", (block_id,)).rowcount == 0:
                            continue  # unchanged index blocks are shared between snapshots: read once
                        used.add(block_id)
                        used.add_packed(repo.read_index_block(block_id).encode(), ID_SIZE, NOT_CHUNKS)
                for f in snap.files:
                    used.update(bytes.fromhex(c) for c in f.chunks)
            except ValueError as exc:  # a manifest that authenticates but names an id that is not hex
                raise IntegrityError(f"snapshot {snap.short_id}: malformed blob id: {exc}", object_id=snap.id) from exc
        used.flush()
    _tick(progress, "snapshots", len(snaps), len(snaps))
    db.execute("CREATE TABLE s.used(id BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute("INSERT OR IGNORE INTO s.used SELECT id FROM s.used_all ORDER BY id")
    db.execute("DROP TABLE s.used_all")


#: live rows of blobs in packs present in storage, one per (blob, pack)
_LIVE_STORED = (
    "SELECT DISTINCT b.id AS id, b.pack AS pack, b.type AS type, b.offset AS offset, b.length AS length,"
    " b.raw_length AS raw_length FROM blobs b JOIN files f ON f.no = b.file JOIN s.present sp ON sp.no = b.pack"
    " WHERE f.live"
)
#: a live row of the blob ``u.id`` in a pack present in storage
_STORED_COPY = (
    "SELECT 1 FROM blobs b JOIN files f ON f.no = b.file JOIN s.present sp ON sp.no = b.pack"
    " WHERE b.id = u.id AND f.live"
)


def _require_every_used_blob(db: sqlite3.Connection) -> None:
    missing = [
        bytes(r[0]).hex() for r in db.execute(f"SELECT u.id FROM s.used u WHERE NOT EXISTS ({_STORED_COPY}) LIMIT 5")
    ]
    if missing:
        count = db.execute(f"SELECT count(*) FROM s.used u WHERE NOT EXISTS ({_STORED_COPY})").fetchone()[0]
        raise IntegrityError(
            f"prune stopped, nothing was changed: {count} blobs the snapshots need are in no index "
            f"or only in missing packs (e.g. {', '.join(sorted(missing))}). Run `vmvault check` to see which "
            "snapshots are affected, then `vmvault repair index` and `vmvault repair snapshots --forget`."
        )


def _pack_accounting(db: sqlite3.Connection, progress: PhaseCallback | None) -> None:
    """``s.pstat``: per pack named by a live row, its blob bytes and the bytes of the used
    blobs whose copy stays there; ``s.dropped``: copies of used blobs that do not stay (the
    blob stays in the most used of its packs, as in restic)."""
    _tick(progress, "packs", 0, 0)
    # the blobs with more than one live row (listed by several files, or stored in several
    # packs), in one pass over the rows in id order; few, in a repository pruned before
    db.execute("CREATE TABLE s.multi(id BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute(
        "INSERT INTO s.multi SELECT b.id FROM blobs b JOIN files f ON f.no = b.file WHERE f.live"
        " GROUP BY b.id HAVING count(*) > 1"
    )
    # a blob counts once in a pack however many live files list it there: a row of one of
    # those blobs counts unless an earlier live file has the same (blob, pack, length). Only
    # they are looked at twice; a DISTINCT of every row built a temporary B-tree of them all
    # The rows are sorted by pack to be summed: the inner query hands the sort three integers a
    # row (a subquery with a LIMIT is not merged into the outer one, whose sort took each row
    # with the used blob's 32-byte id, only to test it for NULL): at 4 M chunks SQLite's
    # temporary file for it is 40 MiB instead of 162, for the same CPU time
    db.execute(
        "CREATE TABLE s.pstat AS SELECT pack, sum(length) AS total, count(*) AS n, sum(used * length) AS used,"
        " sum(used) AS n_used FROM (SELECT b.pack AS pack, b.length AS length, u.id IS NOT NULL AS used"
        " FROM blobs b JOIN files f ON f.no = b.file LEFT JOIN s.used u ON u.id = b.id WHERE f.live"
        " AND (b.id NOT IN (SELECT id FROM s.multi) OR NOT EXISTS (SELECT 1 FROM blobs e JOIN files ef"
        " ON ef.no = e.file WHERE e.id = b.id AND e.file < b.file AND e.pack = b.pack AND e.length = b.length"
        " AND ef.live)) LIMIT -1) GROUP BY pack"
    )
    db.execute("CREATE UNIQUE INDEX s.pstat_pack ON pstat(pack)")
    db.execute("CREATE TABLE s.dropped(id BLOB NOT NULL, pack INTEGER NOT NULL, PRIMARY KEY(id, pack)) WITHOUT ROWID")
    # the blobs with live copies in several stored packs: some of those with several rows
    db.execute(
        "CREATE TABLE s.dups AS SELECT b.id AS id FROM s.multi m JOIN blobs b ON b.id = m.id"
        " JOIN files f ON f.no = b.file JOIN s.present sp ON sp.no = b.pack WHERE f.live"
        " GROUP BY b.id HAVING count(DISTINCT b.pack) > 1"
    )
    dup_rows = db.execute(
        f"SELECT l.id, l.pack, l.length, ps.used * 1.0 / max(ps.total, 1), p.id FROM"
        f" ({_LIVE_STORED} AND b.id IN (SELECT id FROM s.dups)) l JOIN s.used u ON u.id = l.id"
        " JOIN s.pstat ps ON ps.pack = l.pack JOIN packs p ON p.no = l.pack ORDER BY l.id"
    )
    group: list[tuple[bytes, int, int, float, bytes]] = []

    def settle() -> None:
        # the copy in the most used pack stays (ties: the smallest pack id)
        best = min(group, key=lambda r: (-r[3], r[4]))
        for blob_id, pack, length, _share, _pid in group:
            if pack != best[1]:
                db.execute("INSERT OR IGNORE INTO s.dropped VALUES (?, ?)", (blob_id, pack))
                db.execute("UPDATE s.pstat SET used = used - ?, n_used = n_used - 1 WHERE pack = ?", (length, pack))

    with Grouped(db) as grouped:
        for row in dup_rows.fetchall():
            item = (bytes(row[0]), int(row[1]), int(row[2]), float(row[3]), bytes(row[4]))
            if group and group[0][0] != item[0]:
                grouped.step()
                settle()
                group = []
            group.append(item)
        if group:
            settle()


def _pack_stats(db: sqlite3.Connection) -> Iterator[tuple[int, bytes, int | None, int, int, int, int]]:
    """(pack number, pack id, stored size or None, total, blobs, used, used blobs) of every
    pack of ``s.pstat`` in pack id order, read a page at a time after the last id seen: a list
    of every pack would grow with the repository (about 240 bytes a pack)."""
    page = (
        "SELECT ps.pack, p.id, st.size, ps.total, ps.n, ps.used, ps.n_used FROM packs p"
        " JOIN s.pstat ps ON ps.pack = p.no LEFT JOIN s.stored st ON st.id = p.id WHERE p.id > ? ORDER BY p.id LIMIT ?"
    )
    after = b""
    while rows := db.execute(page, (after, _BATCH)).fetchall():
        after = bytes(rows[-1][1])
        yield from rows


def _decide(repo: Repository, db: sqlite3.Connection, report: PruneReport, max_unused: float) -> None:
    """``s.decision``: the packs deleted, repacked or dropped as missing; ``s.doomed``: the
    stored packs to delete at the end (those, and orphans). Packs under retention stay."""
    db.execute("CREATE TABLE s.decision(pack INTEGER PRIMARY KEY, action TEXT NOT NULL)")
    db.execute("CREATE TABLE s.doomed(id BLOB PRIMARY KEY) WITHOUT ROWID")
    days = retention_days(repo)
    with Grouped(db) as group:
        for pack_no, raw_id, size, total, n, used, n_used in _pack_stats(db):
            pack_id = bytes(raw_id)
            if size is None:
                report.missing_packs += 1
                report.actions.append(f"drop missing pack {pack_id.hex()} from the index (it held nothing needed)")
                group.step()
                db.execute("INSERT INTO s.decision VALUES (?, 'missing')", (pack_no,))
                continue
            if n_used == 0:
                action = "delete"
            elif total and (total - used) / total > max_unused:
                action = "repack"
            else:
                continue
            if days is not None and retained(repo, [pack_name(pack_id)]):
                report.packs_retained += 1
                continue  # stays, indexed as it is
            group.step()
            db.execute("INSERT INTO s.decision VALUES (?, ?)", (pack_no, action))
            db.execute("INSERT INTO s.doomed VALUES (?)", (pack_id,))
            report.blobs_removed += n - n_used
            report.bytes_removed += total - used
            if action == "repack":
                report.packs_repacked += 1
                report.blobs_repacked += n_used
                report.bytes_repacked += used
    # orphans: stored packs that no live index file names (left by killed writers)
    orphans = db.execute(
        "SELECT st.id FROM s.stored st WHERE NOT EXISTS (SELECT 1 FROM packs p JOIN s.pstat ps ON ps.pack = p.no"
        " WHERE p.id = st.id)"
    ).fetchall()
    for (raw_id,) in orphans:
        if days is not None and retained(repo, [pack_name(bytes(raw_id))]):
            report.packs_retained += 1
            continue
        db.execute("INSERT OR IGNORE INTO s.doomed VALUES (?)", (bytes(raw_id),))
        report.orphan_packs += 1
    if report.packs_retained:
        report.actions.append(f"kept {report.packs_retained} packs still under retention ({days} days)")
    report.packs_deleted = db.execute("SELECT count(*) FROM s.doomed").fetchone()[0]


def _affected_files(db: sqlite3.Connection, files: dict[bytes, bool], report: PruneReport) -> list[bytes]:
    """The live index files prune rewrites: those listing a pack deleted, repacked or missing,
    and, when there are several, the small ones (folded into large files)."""
    changed = {
        bytes(r[0])
        for r in db.execute(
            "SELECT f.id FROM files f WHERE f.live AND f.no IN (SELECT DISTINCT b.file FROM blobs b"
            " JOIN s.decision d ON d.pack = b.pack)"
        )
    }
    small = [
        bytes(r[0])
        for r in db.execute("SELECT id FROM files WHERE live AND present AND blobs * 45 < ?", (SMALL_INDEX_FILE,))
    ]
    if len(small) > 1 or changed:
        changed.update(small)
    # (files already superseded are superseded again and deleted, never read)
    return [f for f in files if f in changed and files[f]]


def _open_kept(
    repo: Repository, pack_id: bytes, size: int, rows: list[tuple[bytes, int, int, int, int]]
) -> list[tuple[BlobType, bytes, bytes]]:
    """Read one pack to repack whole and open the blobs that stay (``rows``: id, type, offset,
    length, raw length); in a reading thread of ``_repack``."""
    name = pack_name(pack_id)
    # bounded by what a writer makes: an oversized pack fails the hash below unread
    data = repo.backend.get(name, 0, repo.pack_limit + 1) if size <= repo.pack_limit else b""
    if hashlib.sha256(data).digest() != pack_id:
        raise IntegrityError(
            f"prune stopped before removing anything: pack {pack_id.hex()} does not match its name "
            "(damaged); run `vmvault check --read-data`",
            name=name,
        )
    out = []
    for blob_id, blob_type, offset, length, raw_length in rows:
        try:
            sealed = data[offset : offset + length]
            plain = open_blob(repo.key, BlobType(blob_type), blob_id, sealed, max_size=raw_length)
        except IntegrityError as exc:
            raise IntegrityError(
                f"prune stopped before removing anything: {exc} (in pack {pack_id.hex()}); "
                "run `vmvault check --read-data` to see which snapshots it affects",
                object_id=blob_id.hex(),
                name=name,
            ) from exc
        out.append((BlobType(blob_type), blob_id, plain))
    return out


def _repack(
    repo: Repository, db: sqlite3.Connection, report: PruneReport, progress: PhaseCallback | None
) -> tuple[dict[bytes, int], list[bytes]]:
    """Copy the staying blobs of every pack to repack into new packs (their own index files);
    returns the new packs (id -> length) and those index files, read back."""
    repack = [
        (int(r[0]), bytes(r[1]), int(r[2]))
        for r in db.execute(
            "SELECT d.pack, p.id, st.size FROM s.decision d JOIN packs p ON p.no = d.pack"
            " JOIN s.stored st ON st.id = p.id WHERE d.action = 'repack' ORDER BY p.id"
        )
    ]
    if not repack:
        return {}, []
    db.execute(
        "CREATE TABLE s.keep AS SELECT l.pack, l.id, l.type, l.offset, l.length, l.raw_length FROM"
        f" ({_LIVE_STORED} AND b.pack IN (SELECT pack FROM s.decision WHERE action = 'repack')) l"
        " JOIN s.used u ON u.id = l.id"
        " WHERE NOT EXISTS (SELECT 1 FROM s.dropped x WHERE x.id = l.id AND x.pack = l.pack)"
    )
    db.execute("CREATE INDEX s.keep_pack ON keep(pack)")
    writer = repo.writer(upload_threads=2, dedup=False)

    def kept() -> Iterator[tuple[tuple[bytes, int, list[tuple[bytes, int, int, int, int]]], int]]:
        for pack_no, pack_id, size in repack:
            rows = db.execute(
                "SELECT id, type, offset, length, raw_length FROM s.keep WHERE pack = ? ORDER BY offset", (pack_no,)
            ).fetchall()
            entries = [(bytes(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]
            yield (pack_id, size, entries), min(size, repo.pack_limit + 1)

    try:
        # packs are read and opened as many at once as the storage serves best, at most
        # PACKS_AHEAD bytes of them (at least one); their blobs are written in the packs' order
        for n, ((_pack_id, _size, _rows), blobs) in enumerate(
            ahead(
                kept(),
                lambda item: _open_kept(repo, *item),
                workers=repo.backend.prepare_reads(),
                max_weight=PACKS_AHEAD,
            )
        ):
            _tick(progress, "repack", n, len(repack))
            for blob_type, blob_id, plain in blobs:
                writer.add(blob_type, blob_id, plain)
        writer.flush()
    finally:
        writer.close(flush=False)
    repo.confirm_written(writer.uploaded_lengths, writer.index_files, operation="prune")
    report.packs_written = writer.packs_written
    report.actions.append(f"repacked {len(repack)} packs into {writer.packs_written}")
    _tick(progress, "repack", len(repack), len(repack))
    return dict(writer.uploaded_lengths), list(writer.index_files)


def _relist(
    repo: Repository,
    db: sqlite3.Connection,
    affected: list[bytes],
    out: IndexFileWriter,
    progress: PhaseCallback | None,
) -> None:
    """Write the packs that stay of the affected files into new index files (``out``, at most
    ``REWRITE_LIMIT`` each); the last is left to ``finish``."""
    db.execute("CREATE TABLE s.relisted(id BLOB PRIMARY KEY) WITHOUT ROWID")
    with Grouped(db) as group:
        for n, file_id in enumerate(affected):
            _tick(progress, "index files", n, len(affected))
            parsed = parse_index(repo.read_index_payload(file_id), name=f"index/{file_id.hex()}")
            for rec in parsed.records:
                row = db.execute(
                    "SELECT d.action, st.size FROM packs p LEFT JOIN s.decision d ON d.pack = p.no"
                    " LEFT JOIN s.stored st ON st.id = p.id WHERE p.id = ?",
                    (rec.pack_id,),
                ).fetchone()
                if row is None or row[0] is not None or row[1] is None:
                    continue  # deleted, repacked or missing (or unknown): not listed again
                group.step()
                if db.execute("INSERT OR IGNORE INTO s.relisted VALUES (?)", (rec.pack_id,)).rowcount == 0:
                    continue  # already listed by an earlier affected file
                entries = rec.entries()
                out.add(rec.pack_id, entries, rec.length or _confirmed_length(entries, int(row[1])))
    _tick(progress, "index files", len(affected), len(affected))


def _confirmed_length(entries: list[BlobEntry], size: int) -> int:
    """A pack's length for a version-2 record when its listed size is the size its entries
    predict (0, not recorded, otherwise: check reports the difference)."""
    return size if expected_pack_size(entries) == size else 0


def _delete_packs(
    repo: Repository, db: sqlite3.Connection, lock: RepositoryLock, report: PruneReport, progress: PhaseCallback | None
) -> None:
    total = report.packs_deleted
    cur = db.execute("SELECT id FROM s.doomed ORDER BY id")
    n = 0
    while batch := cur.fetchmany(_BATCH):
        for (raw_id,) in batch:
            _tick(progress, "delete", n, total)
            if n % 256 == 0:
                _still_exclusive(repo, lock, "deleting packs")
            repo.backend.delete(pack_name(bytes(raw_id)))
            n += 1
    _tick(progress, "delete", total, total)

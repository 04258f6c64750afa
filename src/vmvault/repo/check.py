"""Check a repository's structure and, optionally, every byte of its data.

Structure (cheap: lists objects, reads small ones):
config, key files, locks, every index file, every snapshot manifest, every index block
a snapshot needs, that every blob a snapshot needs is in the index, and that every indexed
pack exists with the size its index entries imply. Packs no index names and superseded
index files are warnings: a killed backup or prune leaves them and the next prune removes
them.

``read_data`` downloads each pack (or a deterministic pseudo-random ``subset`` of them),
checks that its SHA-256 is its name, parses its header, compares the header with the index,
and opens every blob (decrypt, decompress, re-hash against its id).

Where the storage enforces retention (S3 Object Lock), every data, index and snapshot object
still inside the retention period must be locked by it: one that is not is an error
(``object-not-locked``; ``vmvault repair locks`` locks it), and one hidden by a delete marker
while the storage holds it locked was deleted by someone else (``object-deleted``; ``vmvault
repair undelete`` brings it back).

Every problem names the damaged object and everything it affects: each snapshot (id, time,
source) and each disk or file in it, with the byte ranges (chunk index x chunk size) that
can no longer be restored. A damaged object nothing references is still an error: a later
backup would deduplicate against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault import shape
from vmvault.errors import (
    BackendPermissionError,
    IntegrityError,
    ObjectNotFoundError,
    SnapshotNotFoundError,
    VmvaultError,
)
from vmvault.repo._layout import FORMAT_VERSION, ID_SIZE, PACK_MAGIC, PACK_TRAILER, BlobType
from vmvault.repo._limits import ENVELOPE_OVERHEAD, MAX_SMALL_OBJECT, largest_blob, read_bounded
from vmvault.repo.ahead import PACKS_AHEAD, ahead
from vmvault.repo.crypto import HMAC_SHA256
from vmvault.repo.fetch import BlobFetcher
from vmvault.repo.filters import SnapshotFilter
from vmvault.repo.immutability import deleted_objects, unlocked_objects
from vmvault.repo.index import PackRecord, ParsedIndex, parse_index
from vmvault.repo.index_block import NOT_CHUNKS, IndexBlock
from vmvault.repo.index_cache import Grouped, ScratchRows, rows_digest, write_many
from vmvault.repo.keys import list_keys
from vmvault.repo.locks import list_locks
from vmvault.repo.names import index_id, key_id, lock_name, shown, snapshot_id, status_id
from vmvault.repo.names import pack_id as parse_pack_id
from vmvault.repo.pack import BlobEntry, expected_pack_size, open_blob, pack_name, parse_pack_header
from vmvault.repo.progress import PhaseCallback
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot
from vmvault.repo.status import StatusStore

__all__ = ["DELETED", "UNLOCKED", "Affected", "CheckReport", "Problem", "check"]


ERROR = "error"
WARNING = "warning"
#: the kind of problem of an object the storage should hold locked and does not
UNLOCKED = "object-not-locked"
#: ... of one a delete hid while the storage holds it locked
DELETED = "object-deleted"
#: rows inserted into the scratch database per statement
_BATCH = 10_000


@dataclass
class Affected:
    """One disk or file of one snapshot that a problem makes (partly) unrestorable."""

    snapshot: str
    time: str
    source: dict[str, str]
    kind: str  # "disk", "file" or "snapshot" (the manifest itself)
    name: str
    #: [start, end) byte ranges of the disk or file, merged
    ranges: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "time": self.time,
            "source": dict(self.source),
            "kind": self.kind,
            "name": self.name,
            "ranges": [list(r) for r in self.ranges],
            "bytes": sum(e - s for s, e in self.ranges),
        }


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    kind: str  # e.g. "pack-missing", "blob-damaged", "index-file-damaged", "orphan-pack"
    object: str  # the object's name in storage, or "blob <id>"
    message: str
    object_id: str = ""
    affects: list[Affected] = field(default_factory=list)
    #: the blobs this problem makes unreadable (internal: used to find what is affected)
    blob_ids: set[bytes] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "kind": self.kind,
            "object": self.object,
            "object_id": self.object_id,
            "message": self.message,
            "affects": [a.to_dict() for a in self.affects],
        }


@dataclass
class CheckReport:
    read_data: bool
    subset: float | None
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    #: snapshots with no error affecting them
    intact_snapshots: list[str] = field(default_factory=list)
    damaged_snapshots: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "read_data": self.read_data,
            "subset": self.subset,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "stats": dict(self.stats),
            "intact_snapshots": list(self.intact_snapshots),
            "damaged_snapshots": list(self.damaged_snapshots),
        }


def check(
    repo: Repository,
    *,
    read_data: bool = False,
    subset: float | None = None,
    progress: PhaseCallback | None = None,
    seed: int = 0,
    lock: bool = True,
    select: SnapshotFilter | None = None,
) -> CheckReport:
    """Check ``repo``; see the module docstring. ``subset`` (0..1] of the packs is read when
    ``read_data``; which ones depends only on ``seed`` and the pack ids, so a run can be
    repeated, and successive seeds cover different packs. ``lock=False`` skips taking a
    shared lock (for read-only storage). ``select``: ``read_data`` reads only the packs
    holding data the snapshots it matches need (the structure is checked whole)."""
    if subset is not None and not 0.0 < subset <= 1.0:
        raise ValueError(f"subset must be in (0, 1], not {subset}")
    ctx = repo.lock(exclusive=False, operation="check") if lock else contextlib.nullcontext()
    with ctx as held:
        own = held.name if held is not None else None
        checker = _Checker(repo, progress, own)
        checker.select = select
        return checker.run(read_data=read_data, subset=subset, seed=seed)


def select_subset(pack_ids: list[bytes], fraction: float, seed: int) -> list[bytes]:
    """ceil(fraction x n) packs, ranked by SHA-256(seed || pack id): deterministic, well spread."""
    return sorted(_smallest(iter(pack_ids), len(pack_ids), fraction, seed))


def _smallest(pack_ids: Iterator[bytes], n: int, fraction: float, seed: int) -> list[bytes]:
    """The ceil(fraction x n) of ``n`` packs with the smallest SHA-256(seed || pack id), held
    in a heap of that size (not all ``n``)."""
    count = math.ceil(fraction * n)
    prefix = seed.to_bytes(8, "little")
    ranked = ((hashlib.sha256(prefix + p).digest(), p) for p in pack_ids)
    return [p for _rank, p in heapq.nsmallest(count, ranked)]


def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """``[start, end)`` ranges sorted, overlapping and touching ones merged."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


#: uses of index blocks gathered before their blocks are read, together (``_Checker._check_blocks``)
_BLOCK_GROUP = 1024


@dataclass
class _BlockUse:
    """One index block of a disk of a snapshot, to check once the block is read."""

    snap: Snapshot  # (a summary: its id, time and source)
    disk: str
    layer: bool
    block: int
    start: int
    end: int
    #: the entries the block must have there
    expected: int
    block_id: bytes


#: bytes of packs ``check --read-data`` holds at once, at most (always at least one pack)
READ_DATA_BYTES = PACKS_AHEAD


@dataclass
class _PackRead:
    """What reading one pack found (``_Checker._read_pack``)."""

    missing: bool = False
    oversized: bool = False
    bytes_read: int = 0
    blobs_read: int = 0
    #: ``(kind, message)`` of the pack's own problems (its name, its header)
    pack_problems: list[tuple[str, str]] = field(default_factory=list)
    #: the blobs that did not open, with why
    damaged: list[tuple[BlobEntry, IntegrityError]] = field(default_factory=list)


class _Checker:
    def __init__(self, repo: Repository, progress: PhaseCallback | None, own_lock: str | None) -> None:
        self.repo = repo
        self.backend = repo.backend
        self.progress = progress
        self.own_lock = own_lock
        self.problems: list[Problem] = []
        self.covered: set[bytes] = set()  # blobs some problem already reports
        self._said: dict[tuple[str, str, str, str], Problem] = {}
        self.snapshots: list[Snapshot] = []
        self.stats: dict[str, int] = {}
        #: read only the data of the snapshots this matches (``check --read-data --vm ...``)
        self.select: SnapshotFilter | None = None
        #: the scratch database (repo/index_cache.py): the packs in storage (``s.stored``), the
        #: packs live index files list (``s.listed``), the index blocks and blobs the snapshots
        #: need (``s.blocks``, ``s.needed``); nothing of that size is held in memory
        self.db: sqlite3.Connection | None = None

    def add(
        self,
        severity: str,
        kind: str,
        obj: str,
        message: str,
        *,
        object_id: str = "",
        blobs: set[bytes] | None = None,
    ) -> Problem:
        p = Problem(severity, kind, obj, message, object_id=object_id, blob_ids=set(blobs or ()))
        key = (severity, kind, obj, message)
        if key in self._said:  # a pack listed twice, read twice: one problem
            return self._said[key]
        self._said[key] = p
        self.covered |= p.blob_ids
        self.problems.append(p)
        return p

    def tick(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    # ---- the run -------------------------------------------------------------------------

    def run(self, *, read_data: bool, subset: float | None, seed: int) -> CheckReport:
        self.check_config()
        self.check_keys()
        self.check_locks()
        # this host's index cache, synced: where every blob is. Every index file is read again
        # below and the cache compared with them: a cache that says otherwise is rebuilt once
        self.repo.load_index(progress=lambda d, t: self.tick("index", d, t))
        before = (len(self.problems), dict(self._said), set(self.covered))
        wrong = self.check_structure(read_data, subset, seed, final=False)
        if wrong is not None:
            # what was found from the cache's view is dropped: the run starts again from the files
            del self.problems[before[0] :]
            self._said, self.covered = before[1], before[2]
            path = self.repo.index.cache.path
            self.repo.index.reset(f"it disagrees with the index files about {wrong}")
            self.repo.load_index(progress=lambda d, t: self.tick("index", d, t))
            self.add(
                WARNING,
                "index-cache-rebuilt",
                path,
                f"this host's index cache disagreed with the index files about {wrong} (damaged, or written by "
                "someone else); rebuilt from the index files, and the repository checked against them",
            )
            self.check_structure(read_data, subset, seed, final=True)
        self.check_object_locks()
        report = CheckReport(read_data=read_data, subset=subset, problems=self.problems, stats=self.stats)
        damaged = {a.snapshot for p in self.problems if p.severity == ERROR for a in p.affects}
        report.damaged_snapshots = sorted(damaged)
        report.intact_snapshots = sorted(s.id for s in self.snapshots if s.id not in damaged)
        return report

    def check_structure(self, read_data: bool, subset: float | None, seed: int, *, final: bool) -> str | None:
        """Everything from the listing of ``data/`` on. Returns, without going on, what this
        host's index cache says otherwise than the index files (unless ``final``: then that is
        an error, and the check goes on)."""
        with self.repo.index.cache.scratch() as db:
            self.db = db
            try:
                self.list_packs()
                wrong = self.check_index_files()
                if wrong is not None:
                    if not final:
                        return wrong
                    self.add(
                        ERROR,
                        "index-cache-disagrees",
                        self.repo.index.cache.path,
                        f"this host's index cache disagrees with the index files about {wrong} even rebuilt (is "
                        "another process writing it?): where blobs are was taken from it, so what is said below "
                        "of missing blobs and what they affect may be wrong; remove it and check again",
                    )
                self.check_orphans()
                self.load_snapshots()
                self.check_names()
                self.walk_snapshots()
                if read_data:
                    self.read_packs(subset, seed)
                self.find_affected()
            finally:
                self.db = None
        return None

    def check_object_locks(self) -> None:
        """Where the storage enforces retention (S3 Object Lock): every object it should still
        hold locked is (``immutability.unlocked_objects``), and no delete hid one it holds
        locked (``immutability.deleted_objects``). One unlocked is an error: its data is intact,
        but not protected as the repository says it is. One hidden is an error too: the
        repository misses it (as a missing pack or snapshot) until it is brought back."""
        try:
            review = unlocked_objects(self.repo, progress=lambda done, total: self.tick("locks", done, total))
        except BackendPermissionError as exc:
            self.add(WARNING, "object-locks-not-checked", self.backend.url, f"{exc}; give them that right to check")
        else:
            if review.checked:
                self.stats["objects_lock_checked"] = review.checked
                self.stats["objects_lock_looked_up"] = review.looked_up
            for obj in review.unlocked:
                self.add(ERROR, UNLOCKED, obj.name, f"{obj.describe()}; `vmvault repair locks` locks it")
        try:
            deleted = deleted_objects(self.repo)
        except BackendPermissionError as exc:
            self.add(WARNING, "deleted-objects-not-checked", self.backend.url, f"{exc}")
            return
        for gone in deleted:
            self.add(ERROR, DELETED, gone.hidden.name, f"{gone.describe()}; `vmvault repair undelete` brings it back")

    def check_config(self) -> None:
        try:
            doc = shape.loads(read_bounded(self.backend, "config", MAX_SMALL_OBJECT, what="config"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except ObjectNotFoundError:
            self.add(ERROR, "config-missing", "config", "the config object is missing")
            return
        except IntegrityError as exc:
            self.add(ERROR, "config-damaged", "config", str(exc))
            return
        except (ValueError, UnicodeDecodeError) as exc:
            self.add(ERROR, "config-damaged", "config", f"the config is not readable JSON: {exc}")
            return
        cfg = self.repo.config
        # (a config before version 3 names no id function: HMAC-SHA-256, section 4)
        now = (doc.get("id"), doc.get("chunk_size"), doc.get("chunk_id", HMAC_SHA256))
        if now != (cfg.id, cfg.chunk_size, cfg.chunk_id):
            self.add(
                ERROR, "config-changed", "config", "the config differs from the one read when the repository was opened"
            )
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            self.add(ERROR, "config-version", "config", f"unsupported format version {version!r}")

    def check_keys(self) -> None:
        names = [o.name for o in self.backend.list("keys/") if key_id(o.name) is not None]
        self.stats["keys"] = len(names)
        if self.repo.config.encrypted and not names:
            self.add(ERROR, "keys-missing", "keys/", "the repository has no key files")
        # what opening would skip: damaged, planted, or KDF parameters out of bounds
        for info in list_keys(self.backend):
            if info.problem:
                self.add(ERROR, "key-damaged", f"keys/{info.id}", info.problem)

    def check_locks(self) -> None:
        locks = list_locks(self.backend, self.repo.key)
        # its own lock is not counted: "1 lock" in an idle repository would be check itself
        self.stats["locks"] = sum(1 for lock in locks if lock.name != self.own_lock)
        # the storage's time of check's own lock (taken or refreshed minutes ago at most)
        stored = next((lock.stored for lock in locks if lock.name == self.own_lock), None)
        for lock in locks:
            if lock.name == self.own_lock:
                continue
            if lock.operation == "unreadable":
                self.add(WARNING, "lock-unreadable", lock.name, "unreadable lock; an exclusive locker removes it")
            elif lock.is_stale(storage_now=stored):
                self.add(WARNING, "lock-stale", lock.name, f"stale {lock.describe()}; ignored and removed by prune")
            else:
                self.add(WARNING, "lock-held", lock.name, f"held: {lock.describe()}")

    def check_names(self) -> None:
        """Objects in keys/, locks/, snapshots/ and status/ whose names vmvault never writes
        (ignored by every reader and never deleted; index/ and data/ are reported as they are
        read), status records that cannot be read, and what the storage's listings skipped:
        links, FIFOs, names that are not UTF-8."""
        for prefix, ours in (
            ("keys/", lambda n: key_id(n) is not None),
            ("locks/", lock_name),
            ("snapshots/", lambda n: snapshot_id(n) is not None),
            ("status/", lambda n: status_id(n) is not None),
        ):
            for obj in self.backend.list(prefix):
                if not ours(obj.name):
                    self.unexpected(obj.name)
        for name, why in StatusStore(self.repo).read().problems:
            self.add(WARNING, "status-record-unreadable", shown(name), f"{why}; dashboards ignore it")
        for name, why in sorted(self.backend.skipped().items()):
            self.add(WARNING, "unsafe-entry", name, f"skipped by every listing: {why}")

    def unexpected(self, name: str) -> None:
        self.add(
            WARNING,
            "unexpected-object",
            shown(name),
            "not a name vmvault writes: ignored, and never deleted by vmvault (remove it by hand if it is yours)",
        )

    @property
    def sql(self) -> sqlite3.Connection:
        assert self.db is not None
        return self.db

    def list_packs(self) -> None:
        """``s.stored``: every pack in storage and its size, listed as ``Repository.pack_listings``
        says (every odd name under ``data/`` is reported)."""
        db = self.sql
        db.execute("CREATE TABLE s.stored(id BLOB PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID")
        batch: list[tuple[bytes, int]] = []
        for prefix in self.repo.pack_listings():
            for obj in self.backend.list(prefix):
                pack_id = parse_pack_id(obj.name)
                if pack_id is None:
                    self.unexpected(obj.name)
                    continue
                batch.append((pack_id, obj.size))
                if len(batch) >= _BATCH:
                    write_many(db, "INSERT OR IGNORE INTO s.stored VALUES (?, ?)", batch)
                    batch = []
        write_many(db, "INSERT OR IGNORE INTO s.stored VALUES (?, ?)", batch)
        count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM s.stored").fetchone()
        self.stats["packs_stored"] = count
        self.stats["bytes_stored"] = size

    def _stored_size(self, pack_id: bytes) -> int | None:
        row = self.sql.execute("SELECT size FROM s.stored WHERE id = ?", (pack_id,)).fetchone()
        return None if row is None else int(row[0])

    def live_files(self) -> Iterator[tuple[bytes, ParsedIndex]]:
        """Every live index file, read again and parsed, one at a time (those that cannot be
        read are reported by ``check_index_files``, and forgotten by the cache)."""
        for file_id, payload in self.repo.index_payloads(self.repo.index.cache.live_files_sized()):
            if isinstance(payload, bytes):
                with contextlib.suppress(IntegrityError):
                    yield file_id, parse_index(payload, name=f"index/{file_id.hex()}")

    def check_index_files(self) -> str | None:
        """Read every index file: report the damaged ones (and make this host's cache forget
        them) and the superseded ones; check every pack a live one lists against storage
        (``s.listed``: each pack once). Returns what the cache says otherwise than the files
        (which are live, and a digest of every row of each live one), or None."""
        db = self.sql
        db.execute("CREATE TABLE s.listed(id BLOB PRIMARY KEY) WITHOUT ROWID")
        cache = self.repo.index.cache
        live = cache.present_files()  # ingested by the sync above: id -> live
        listed = list(self.backend.list("index/"))
        readable: set[bytes] = set()
        damaged: list[bytes] = []
        #: what the files say, to compare the cache with: the rows of each file the cache
        #: holds, and the ids the files supersede
        digests: dict[bytes, tuple[int, int] | None] = {}
        replaced: set[bytes] = set()
        pack_problems: list[tuple[str, Callable[[], Problem]]] = []
        for obj in listed:
            if index_id(obj.name) is None:
                self.unexpected(obj.name)
        files = [(file_id, obj.size) for obj in listed if (file_id := index_id(obj.name)) is not None]
        with Grouped(db) as group:
            for n, (file_id, payload) in enumerate(self.repo.index_payloads(files)):
                self.tick("index", n, len(files))
                name = f"index/{file_id.hex()}"
                try:
                    if isinstance(payload, ObjectNotFoundError):
                        continue  # removed since the listing
                    if not isinstance(payload, bytes):
                        raise payload
                    parsed = parse_index(payload, name=name)
                except IntegrityError as exc:
                    self.add(
                        ERROR,
                        "index-file-damaged",
                        name,
                        f"{exc}. The packs it lists are unknown to readers; blobs only it listed are reported "
                        "missing below, and prune refuses to run until the index is repaired",
                        object_id=file_id.hex(),
                    )
                    # what this host's cache holds of it is not what other readers see
                    damaged.append(file_id)
                    continue
                readable.add(file_id)
                replaced.update(old for old in parsed.supersedes if old != file_id)
                if file_id in live:  # (a superseded one too: it is live again if what supersedes it is damaged)
                    digests[file_id] = rows_digest(parsed, cache.pack_numbers(rec.pack_id for rec in parsed.records))
                if not live.get(file_id, True):
                    self.add(
                        WARNING,
                        "index-file-superseded",
                        name,
                        "superseded index file (left by an interrupted prune); the next prune deletes it",
                        object_id=file_id.hex(),
                    )
                    continue
                for rec in parsed.records:
                    # every listing of a pack is checked (a second one may say something else)
                    group.step()
                    db.execute("INSERT OR IGNORE INTO s.listed VALUES (?)", (rec.pack_id,))
                    found = self._check_pack_size(rec)
                    if found is not None:
                        pack_problems.append(found)
        self.tick("index", len(files), len(files))
        # a damaged file is forgotten, rows and all: this host's backups then store again what
        # only it listed, as a host that never read it does (its next sync reports it); and
        # no copy of a blob is counted below that only a damaged file lists
        forgotten = [f for f in damaged if f in live]
        cache.forget(forgotten)
        if forgotten:
            self.add(
                WARNING,
                "index-cache-forgot",
                cache.path,
                f"this host's index cache had read {len(forgotten)} index files before they were damaged in "
                f"storage ({', '.join('index/' + f.hex() for f in forgotten)}); it no longer uses what they listed",
            )
        for _name, report in sorted(pack_problems, key=lambda p: p[0]):
            report()
        self.stats["index_files"] = len(readable)
        self.stats["packs_indexed"] = db.execute("SELECT count(*) FROM s.listed").fetchone()[0]
        # compared: the files the cache holds as present that read now (one gone since the
        # sync, or damaged, is not the cache's fault)
        read = {f: is_live for f, is_live in cache.present_files().items() if f in readable}
        wrong = self.repo.index.disagreement(read, replaced, digests)
        self.stats["blobs_indexed"] = self.repo.index.stats().blobs
        return wrong

    def _readable_copy(self, pack_id: bytes, entry: BlobEntry) -> bool:
        """Whether the stored pack ``pack_id`` can still hold ``entry`` (present and long enough)."""
        size = self._stored_size(pack_id)
        return size is not None and entry.offset + entry.length <= size - PACK_TRAILER.size

    def _reads_from(self, pack_id: bytes, entries: list[BlobEntry]) -> set[bytes]:
        """The blobs in ``entries`` that are lost if this pack's copy is: no other indexed copy
        lies in a pack that is present and long enough (readers fall back to other copies)."""
        out = set()
        for e in entries:
            others = [loc for loc in self.repo.index.locations(e.id) if loc.pack_id != pack_id]
            if not any(self._readable_copy(loc.pack_id, loc.entry) for loc in others):
                out.add(e.id)
        return out

    def _check_pack_size(self, rec: PackRecord) -> tuple[str, Callable[[], Problem]] | None:
        """The problem with one live pack's size, to report (sorted by pack), or None."""
        pack_id = rec.pack_id
        name = pack_name(pack_id)
        size = self._stored_size(pack_id)
        if size is not None and rec.length and size == rec.length:
            return None  # the length the writer recorded (a version-2 index file): the common case
        entries = rec.entries()
        if size is None:
            return name, lambda: self.add(
                ERROR,
                "pack-missing",
                name,
                f"indexed pack with {len(entries)} blobs is missing from storage",
                object_id=pack_id.hex(),
                blobs=self._reads_from(pack_id, entries),
            )
        if rec.length:
            # the length the writer recorded (a version-2 index file): nothing to recompute
            expected = rec.length
            if size == expected:
                return None
        else:
            blobs_end = rec.blobs_end()
            expected = expected_pack_size(entries)
            if size == expected:
                return None
            # another zstd version may compress the header differently: ask the trailer
            with contextlib.suppress(VmvaultError):
                if size >= blobs_end + PACK_TRAILER.size:
                    hlen, magic = PACK_TRAILER.unpack(
                        self.backend.get(name, size - PACK_TRAILER.size, PACK_TRAILER.size)
                    )
                    if magic == PACK_MAGIC and blobs_end + hlen + PACK_TRAILER.size == size:
                        return None
        if size < expected:
            cut = {e.id for e in entries if e.offset + e.length > size}
            return name, lambda: self.add(
                ERROR,
                "pack-truncated",
                name,
                f"pack is {size} bytes, its index implies {expected}: truncated "
                f"({len(cut)} of {len(entries)} blobs cut off, and its header)",
                object_id=pack_id.hex(),
                blobs=cut & self._reads_from(pack_id, entries),
            )
        return name, lambda: self.add(
            ERROR,
            "pack-size",
            name,
            f"pack is {size} bytes, its index implies {expected} (its blobs are still readable)",
            object_id=pack_id.hex(),
        )

    def check_orphans(self) -> None:
        cur = self.sql.execute(
            "SELECT id FROM s.stored st WHERE NOT EXISTS (SELECT 1 FROM s.listed l WHERE l.id = st.id) ORDER BY id"
        )
        for (raw,) in cur.fetchall():
            pack_id = bytes(raw)
            self.add(
                WARNING,
                "orphan-pack",
                pack_name(pack_id),
                "pack named by no index file (left by an interrupted backup or prune); the next prune deletes it",
                object_id=pack_id.hex(),
            )

    def load_snapshots(self) -> None:
        """``self.snapshots``: every readable snapshot as a summary (section 12.10 of
        repository-format.md): its ids are read again, one snapshot at a time, by ``_whole``."""
        ids = self.repo.snapshot_ids()
        self.snapshots = []  # (a second pass after the cache was rebuilt starts again)
        for snap_id in ids:
            try:
                self.snapshots.append(self.repo.load_snapshot(snap_id).summary())
            except (IntegrityError, SnapshotNotFoundError) as exc:
                p = self.add(ERROR, "snapshot-damaged", f"snapshots/{snap_id}", str(exc), object_id=snap_id)
                p.affects.append(Affected(snap_id, "?", {}, "snapshot", "(manifest)", []))
        self.snapshots.sort(key=lambda s: (s.time, s.id))
        self.stats["snapshots"] = len(ids)

    def _whole(self, summaries: Iterable[Snapshot]) -> Iterator[Snapshot]:
        """The snapshots read again whole, one at a time (``Repository.whole``), so one
        snapshot's index block ids are in memory at once, not every snapshot's. One that no
        longer reads is an error (one gone meanwhile, possible only without the lock, is
        passed over)."""
        return self.repo.whole(summaries, on_error=self._unreadable_again)

    def _unreadable_again(self, summary: Snapshot, exc: IntegrityError | SnapshotNotFoundError) -> None:
        if isinstance(exc, IntegrityError):
            p = self.add(ERROR, "snapshot-damaged", f"snapshots/{summary.id}", str(exc), object_id=summary.id)
            p.affects.append(Affected(summary.id, summary.time, dict(summary.source), "snapshot", "(manifest)", []))

    def walk_snapshots(self) -> None:
        """Every index block must open and fit its disk; every blob a snapshot needs must be indexed.

        ``s.blocks``: each distinct index block, read once (its entries and whether it defers
        to a parent; NULL both for an unreadable one); ``s.needed``: every chunk they and the
        snapshots' files name."""
        db = self.sql
        db.execute("CREATE TABLE s.blocks(id BLOB PRIMARY KEY, count INTEGER, defers INTEGER) WITHOUT ROWID")
        needed = ScratchRows(db, "s.needed_all")
        reads = self.backend.prepare_reads()
        with Grouped(db) as self._group, BlobFetcher(self.repo, BlobType.INDEX, max_requests=reads) as self._blocks:
            self._uses: list[_BlockUse] = []
            for n, snap in enumerate(self._whole(self.snapshots)):
                self.tick("snapshots", n, len(self.snapshots))
                summary = snap.summary()
                for disk in snap.disks:
                    self._walk_disk(summary, disk, needed)
                for f in snap.files:
                    self._walk_file(snap, f, needed)
            self._check_blocks(needed)
            needed.flush()
        self.tick("snapshots", len(self.snapshots), len(self.snapshots))
        needed.flush()
        db.execute("CREATE TABLE s.needed(id BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("INSERT OR IGNORE INTO s.needed SELECT id FROM s.needed_all ORDER BY id")
        db.execute("DROP TABLE s.needed_all")
        missing = [
            bytes(r[0])
            for r in db.execute(
                "SELECT n.id FROM s.needed n WHERE NOT EXISTS (SELECT 1 FROM blobs b JOIN files f ON f.no = b.file"
                " WHERE b.id = n.id AND f.live) ORDER BY n.id"
            )
        ]
        missing = [b for b in missing if b not in self.covered and b not in self.repo.index]
        orphans = db.execute(
            "SELECT count(*) FROM s.stored st WHERE NOT EXISTS (SELECT 1 FROM s.listed l WHERE l.id = st.id)"
        ).fetchone()[0]
        hint = f"; {orphans} packs are in no index, `vmvault repair index` may find it there" if orphans else ""
        for blob_id in missing:
            self.add(
                ERROR,
                "blob-missing",
                f"blob {blob_id.hex()}",
                f"chunk {blob_id.hex()} is in no index{hint}",
                object_id=blob_id.hex(),
                blobs={blob_id},
            )
        self.stats["index_blocks"] = db.execute("SELECT count(*) FROM s.blocks").fetchone()[0]
        self.stats["data_blobs_referenced"] = db.execute("SELECT count(*) FROM s.needed").fetchone()[0]

    def _inconsistent(self, snap: Snapshot, kind: str, name: str, start: int, end: int, message: str) -> None:
        p = self.add(ERROR, "snapshot-inconsistent", f"snapshots/{snap.id}", message, object_id=snap.id)
        p.affects.append(Affected(snap.id, snap.time, dict(snap.source), kind, name, [[start, end]]))

    def _read_block(self, block_id: bytes) -> IndexBlock | None:
        try:
            raw: bytes | IntegrityError = self.repo.get_blob(BlobType.INDEX, block_id)
        except IntegrityError as exc:
            raw = exc
        return self._block_from(block_id, raw)

    def _block_from(self, block_id: bytes, raw: bytes | IntegrityError | None) -> IndexBlock | None:
        """The index block read as ``raw`` (or the error reading it alone raised), or None
        when it is unreadable (reported)."""
        if not isinstance(raw, bytes):
            if block_id not in self.covered:
                kind = "blob-missing" if block_id not in self.repo.index else "blob-damaged"
                message = str(raw or f"index block {block_id.hex()} was not read")
                self.add(ERROR, kind, f"blob {block_id.hex()}", message, object_id=block_id.hex(), blobs={block_id})
            return None
        try:
            return IndexBlock.decode(raw)
        except IntegrityError as exc:
            self.add(
                ERROR,
                "index-block-damaged",
                f"blob {block_id.hex()}",
                str(exc),
                object_id=block_id.hex(),
                blobs={block_id},
            )
            return None

    def _walk_disk(self, snap: Snapshot, disk: DiskRecord, needed: ScratchRows) -> None:
        cs, span = disk.chunk_size, disk.index_span
        if cs <= 0 or span <= 0 or disk.size < 0:
            self._inconsistent(snap, "disk", disk.name, 0, max(0, disk.size), "impossible chunk or index geometry")
            return
        n_chunks = -(-disk.size // cs)
        if len(disk.index) != -(-n_chunks // span):
            self._inconsistent(
                snap,
                "disk",
                disk.name,
                0,
                disk.size,
                f"disk {disk.name}: {len(disk.index)} index blocks for {n_chunks} chunks of {cs} bytes "
                f"({span} per block)",
            )
        for b, block in enumerate(disk.index):
            if block is None:
                continue
            start, end = b * span * cs, min(disk.size, (b + 1) * span * cs)
            try:
                block_id = bytes.fromhex(block)
            except ValueError:
                self._inconsistent(snap, "disk", disk.name, start, end, f"index block id {block!r} is not hex")
                continue
            expected = min(span, n_chunks - b * span)
            self._uses.append(_BlockUse(snap, disk.name, disk.layer, b, start, end, expected, block_id))
            if len(self._uses) >= _BLOCK_GROUP:
                self._check_blocks(needed)

    def _check_blocks(self, needed: ScratchRows) -> None:
        """Read the blocks the uses gathered so far name (those not read before) and check each
        use: its block has as many entries as its place in the disk, and defers to a parent
        only in a layer. Gathered across disks and snapshots, so that reads go out together."""
        uses, self._uses = self._uses, []
        self._read_blocks([u.block_id for u in uses], needed)
        for u in uses:
            count, defers = self.sql.execute(
                "SELECT count, defers FROM s.blocks WHERE id = ?", (u.block_id,)
            ).fetchone()
            if count is None:
                continue
            if count != u.expected:
                self._inconsistent(
                    u.snap, "disk", u.disk, u.start, u.end, f"disk {u.disk}: index block {u.block} has {count} entries"
                )
            if defers and not u.layer:
                self._inconsistent(
                    u.snap, "disk", u.disk, u.start, u.end, f"disk {u.disk} is not a layer but defers to a parent"
                )

    def _read_blocks(self, block_ids: list[bytes], needed: ScratchRows) -> None:
        """Read those of ``block_ids`` not read before, each once (unchanged blocks are shared
        between snapshots), together: runs of a pack's blocks in one ranged read, as many reads
        at once as the storage serves best (``self._blocks``). Each gets its row in ``s.blocks``
        (its entries and whether it defers to a parent; NULL both for an unreadable one) and the
        chunks it names go into ``needed``."""
        todo = [
            block_id
            for block_id in dict.fromkeys(block_ids)
            if self.sql.execute("SELECT 1 FROM s.blocks WHERE id = ?", (block_id,)).fetchone() is None
        ]
        if not todo:
            return
        for block_id, raw in self._blocks.fetch((b, b) for b in todo):
            found = self._block_from(block_id, raw)
            if found is None:
                meta: tuple[int | None, int | None] = (None, None)
            else:
                needed.add_packed(found.encode(), ID_SIZE, NOT_CHUNKS)
                meta = (len(found), int(found.defers))
            self._group.step()
            self.sql.execute("INSERT INTO s.blocks VALUES (?, ?, ?)", (block_id, *meta))

    def _walk_file(self, snap: Snapshot, f: FileRecord, needed: ScratchRows) -> None:
        cs = self.repo.config.chunk_size
        if len(f.chunks) != -(-f.size // cs):
            self._inconsistent(
                snap, "file", f.name, 0, f.size, f"file {f.name}: {len(f.chunks)} chunks for {f.size} bytes"
            )
            return
        for k, c in enumerate(f.chunks):
            try:
                blob_id = bytes.fromhex(c)
            except ValueError:
                self._inconsistent(
                    snap, "file", f.name, k * cs, min(f.size, (k + 1) * cs), f"chunk id {c!r} is not hex"
                )
                continue
            needed.add(blob_id)
            loc = self.repo.index.lookup(blob_id)
            want = min(cs, f.size - k * cs)
            if loc is not None and loc.entry.raw_length != want:
                self._inconsistent(
                    snap,
                    "file",
                    f.name,
                    k * cs,
                    k * cs + want,
                    f"file {f.name}: chunk {k} is {loc.entry.raw_length} bytes, the file's size implies {want}",
                )

    def _select_wanted(self) -> None:
        """``s.wanted``: the blobs (index blocks and chunks) the snapshots ``select`` matches
        need; their index blocks are read again, each once."""
        assert self.select is not None
        db = self.sql
        chosen = self.select.select(self.snapshots)
        self.stats["snapshots_selected"] = len(chosen)
        rows = ScratchRows(db, "s.wanted_all")
        blocks: set[bytes] = set()  # one id per index block of the chosen snapshots
        for snap in self._whole(chosen):
            for disk in snap.disks:
                for block in disk.index:
                    if block is None:
                        continue
                    with contextlib.suppress(ValueError):  # reported by walk_snapshots
                        block_id = bytes.fromhex(block)
                        if block_id in blocks:
                            continue
                        blocks.add(block_id)
                        rows.add(block_id)
                        found = self._read_block(block_id)
                        if found is not None:
                            rows.add_packed(found.encode(), ID_SIZE, NOT_CHUNKS)
            for f in snap.files:
                for c in f.chunks:
                    with contextlib.suppress(ValueError):
                        rows.add(bytes.fromhex(c))
        rows.flush()
        db.execute("CREATE TABLE s.wanted(id BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("INSERT OR IGNORE INTO s.wanted SELECT id FROM s.wanted_all ORDER BY id")
        db.execute("DROP TABLE s.wanted_all")

    def read_packs(self, subset: float | None, seed: int) -> None:
        """Read the chosen packs (all, or the subset ``select_subset`` picks) while going
        through the live index files again: each pack once, with the entries the first live
        file lists for it. Memory: the packs being read (at most :data:`READ_DATA_BYTES`, at
        least one), and the subset's size when there is a subset."""
        db = self.sql
        candidates = "SELECT l.id FROM s.listed l JOIN s.stored st ON st.id = l.id"
        if self.select is not None:
            # only packs holding a live copy of something the chosen snapshots need
            self._select_wanted()
            candidates += (
                " WHERE l.id IN (SELECT p.id FROM s.wanted w JOIN blobs b ON b.id = w.id"
                " JOIN files f ON f.no = b.file AND f.live JOIN packs p ON p.no = b.pack)"
            )
        db.execute("CREATE TABLE s.chosen(id BLOB PRIMARY KEY) WITHOUT ROWID")
        if subset is None:
            db.execute(f"INSERT INTO s.chosen {candidates}")
        else:
            n = db.execute(f"SELECT count(*) FROM ({candidates})").fetchone()[0]
            ranked = (bytes(r[0]) for r in db.execute(candidates).fetchall())
            write_many(db, "INSERT INTO s.chosen VALUES (?)", ((p,) for p in _smallest(ranked, n, subset, seed)))
        total = db.execute("SELECT count(*) FROM s.chosen").fetchone()[0]
        db.execute("CREATE TABLE s.done(id BLOB PRIMARY KEY) WITHOUT ROWID")
        self.stats["packs_read"] = 0
        self.stats["blobs_read"] = 0
        self.stats["bytes_read"] = 0
        limit = self.repo.pack_limit
        done = 0

        def chosen(group: Grouped) -> Iterator[tuple[tuple[bytes, list[BlobEntry], int, bool], int]]:
            for _file_id, parsed in self.live_files():
                for rec in parsed.records:
                    if db.execute("SELECT 1 FROM s.chosen WHERE id = ?", (rec.pack_id,)).fetchone() is None:
                        continue
                    # each listing is compared with the pack (a pack listed twice is read twice: rare)
                    group.step()
                    first = bool(db.execute("INSERT OR IGNORE INTO s.done VALUES (?)", (rec.pack_id,)).rowcount)
                    size = self._stored_size(rec.pack_id) or 0
                    yield (rec.pack_id, rec.entries(), size, first), min(size, limit + 1)

        self.tick("read-data", 0, total)
        # packs are read and verified as many at once as the storage serves best (a restore's
        # count), at most READ_DATA_BYTES of them (at least one); what each shows is reported
        # here, in the order the index files list them
        with Grouped(db, every=256) as group:
            for (pack_id, entries, _size, first), read in ahead(
                chosen(group),
                lambda item: self._read_pack(*item[:3]),
                workers=self.backend.prepare_reads(),
                max_weight=READ_DATA_BYTES,
            ):
                self._report_pack(pack_id, entries, read)
                if first:
                    done += 1
                    self.tick("read-data", done, total)
        self.tick("read-data", total, total)

    def _read_pack(self, pack_id: bytes, entries: list[BlobEntry], size: int) -> _PackRead:
        """Read one pack and open each of ``entries`` from it (in a reading thread: what it finds
        is returned, and reported by ``_report_pack``)."""
        name = pack_name(pack_id)
        out = _PackRead()
        data: bytes | None = None
        if size > self.repo.pack_limit:
            # never read whole: its blobs are still read one by one, each bounded by the index
            out.oversized = True
        else:
            try:
                data = self.backend.get(name, 0, self.repo.pack_limit + 1)
            except ObjectNotFoundError:
                out.missing = True
                return out
            out.bytes_read += len(data)
            out.pack_problems = self._whole_pack_problems(pack_id, data, entries)
        largest = largest_blob(self.repo.config.chunk_size)
        for e in entries:
            out.blobs_read += 1
            try:
                if e.length > largest + ENVELOPE_OVERHEAD or e.raw_length > largest:
                    raise IntegrityError(f"the index says blob {e.id.hex()} is {e.length} bytes, more than any blob")
                if data is not None:
                    sealed = data[e.offset : e.offset + e.length]
                else:
                    try:
                        sealed = self.backend.get(name, e.offset, e.length)
                    except ObjectNotFoundError:
                        sealed = b""
                    out.bytes_read += len(sealed)
                if len(sealed) != e.length:
                    raise IntegrityError(f"blob {e.id.hex()} is cut off by the end of the pack")
                plain = open_blob(self.repo.key, e.type, e.id, sealed, max_size=e.raw_length)
                if len(plain) != e.raw_length:
                    raise IntegrityError(f"blob {e.id.hex()} is {len(plain)} bytes, the index says {e.raw_length}")
            except IntegrityError as exc:
                out.damaged.append((e, exc))
        return out

    def _report_pack(self, pack_id: bytes, entries: list[BlobEntry], read: _PackRead) -> None:
        """Report what reading one pack found (``_read_pack``), in the checking thread."""
        name = pack_name(pack_id)
        if read.oversized:
            self.add(
                ERROR,
                "pack-oversized",
                name,
                f"pack is {self._stored_size(pack_id)} bytes, larger than any pack of this repository "
                f"({self.repo.pack_limit}): damaged or planted; not read whole",
                object_id=pack_id.hex(),
            )
        if read.missing:
            if pack_id.hex() not in {p.object_id for p in self.problems}:
                self.add(
                    ERROR,
                    "pack-missing",
                    name,
                    "pack vanished while checking",
                    object_id=pack_id.hex(),
                    blobs=self._reads_from(pack_id, entries),
                )
            return
        if not read.oversized:
            self.stats["packs_read"] += 1
        self.stats["bytes_read"] += read.bytes_read
        self.stats["blobs_read"] += read.blobs_read
        for kind, message in read.pack_problems:
            self.add(ERROR, kind, name, message, object_id=pack_id.hex())
        # the blobs lost with this pack (no other readable copy): looked up only if one is damaged
        reads_here = self._reads_from(pack_id, [e for e, _ in read.damaged]) if read.damaged else set()
        for e, exc in read.damaged:
            if e.id in self.covered and e.id in reads_here:
                continue
            what = "chunk" if e.type is BlobType.DATA else "index block"
            extra = "" if e.id in reads_here else " (a duplicate copy: readers use another pack)"
            self.add(
                ERROR,
                "blob-damaged",
                f"blob {e.id.hex()}",
                f"{what} in pack {pack_id.hex()} at offset {e.offset}: {exc}{extra}",
                object_id=e.id.hex(),
                blobs={e.id} & reads_here,
            )

    def _whole_pack_problems(self, pack_id: bytes, data: bytes, entries: list[BlobEntry]) -> list[tuple[str, str]]:
        """``(kind, message)`` of each problem of a pack read whole: its name, its header."""
        out = []
        if hashlib.sha256(data).digest() != pack_id:
            out.append(("pack-damaged", "pack content does not match its name (SHA-256)"))
        try:
            header = parse_pack_header(self.repo.key, data, name=pack_name(pack_id))
        except IntegrityError as exc:
            intact = "blobs are read through the index, so those below that open are intact"
            out.append(("pack-header-damaged", f"{exc} ({intact})"))
        else:
            if {e.pack() for e in header} != {e.pack() for e in entries}:
                out.append(
                    (
                        "pack-index-mismatch",
                        f"the pack header lists {len(header)} blobs, the index {len(entries)}, and they differ",
                    )
                )
        return out

    # ---- what is affected ------------------------------------------------------------

    def find_affected(self) -> None:
        bad: set[bytes] = set()
        for p in self.problems:
            bad |= p.blob_ids
        if not bad:
            return
        hits: dict[bytes, dict[tuple[str, str, str], list[list[int]]]] = {b: {} for b in bad}
        snaps = {s.id: s for s in self.snapshots}
        for snap, kind, name, start, end, blob_id in self._references(bad):
            hits[blob_id].setdefault((snap, kind, name), []).append([start, end])
        for p in self.problems:
            merged: dict[tuple[str, str, str], list[list[int]]] = {}
            for b in p.blob_ids:
                for key, ranges in hits[b].items():
                    merged.setdefault(key, []).extend(ranges)
            for (snap_id, kind, name), ranges in sorted(merged.items(), key=lambda kv: (snaps[kv[0][0]].time, kv[0])):
                s = snaps[snap_id]
                p.affects.append(Affected(s.id, s.time, dict(s.source), kind, name, merge_ranges(ranges)))

    def _references(self, bad: set[bytes]) -> Iterator[tuple[str, str, str, int, int, bytes]]:
        """(snapshot, "disk"/"file", name, start, end, blob) for every reference to a bad blob."""
        positions: dict[bytes, list[tuple[int, bytes]]] = {}  # index block -> [(entry no, bad id)]
        for snap in self._whole(self.snapshots):
            for disk in snap.disks:
                cs, span = disk.chunk_size, disk.index_span
                for b, block in enumerate(disk.index):
                    if block is None:
                        continue
                    block_id = bytes.fromhex(block)
                    first = b * span
                    if block_id in bad:
                        end = min(disk.size, (first + span) * cs)
                        yield snap.id, "disk", disk.name, first * cs, end, block_id
                        continue
                    if block_id not in positions:
                        try:
                            entries = list(self.repo.read_index_block(block_id))
                        except IntegrityError:
                            entries = []  # reported already; its chunks cannot be known
                        positions[block_id] = [(i, e) for i, e in enumerate(entries) if e in bad]
                    for i, blob_id in positions[block_id]:
                        k = first + i
                        yield snap.id, "disk", disk.name, k * cs, min(disk.size, (k + 1) * cs), blob_id
            cs = self.repo.config.chunk_size
            for f in snap.files:
                for k, c in enumerate(f.chunks):
                    blob_id = bytes.fromhex(c)
                    if blob_id in bad:
                        yield snap.id, "file", f.name, k * cs, min(f.size, (k + 1) * cs), blob_id

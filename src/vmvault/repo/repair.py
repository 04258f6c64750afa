"""Ways out of damage: rebuild the index from the packs present, cut lost data out of snapshots.

Modelled on restic's ``repair index`` and ``repair snapshots`` (docs/design/repository-format.md,
section 9, "Ways out of damage"). Both run under the exclusive lock.

``repair_index`` makes the index list exactly the blobs that can be read:

* entries of packs missing from storage are dropped (so nothing deduplicates against them);
* packs present but named by no readable index file are indexed from their headers (two
  bounded range reads each);
* a pack whose size or header no longer matches its index entries, or (with ``read_data``)
  whose bytes no longer match its name, is salvaged: every blob of it that still opens is
  copied into a new pack, and the damaged pack is left out of the index (an orphan the next
  prune deletes). Nothing is deleted but superseded index files, and only after the one new
  index file that supersedes them is written.

``repair_snapshots`` then rewrites each snapshot that needs a blob the index lacks (or a pack
that is gone) as a new snapshot, tagged ``repaired``, with the lost data cut out: a disk keeps
its size and layout, and each lost chunk, or each lost index block's whole range, reads as
zeros; a file with a lost chunk is left out (a partial configuration file or NVRAM is worse
than none). What was lost is listed in the new snapshot's ``extra.lost`` and warnings. The
original is kept unless ``forget`` is given; it is removed only after its repaired copy is
stored, so no readable data is lost by it. A snapshot whose manifest cannot be read cannot be
repaired: it is reported, for ``vmvault forget ID``. As in restic, running ``backup`` again is
better when the source still has the data: a backup after a loss stores the data again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from vmvault import __version__
from vmvault.errors import ConfigError, IntegrityError, ObjectNotFoundError, SnapshotNotFoundError, UnsafeStorageError
from vmvault.repo._layout import ID_SIZE, BlobType
from vmvault.repo._limits import ENVELOPE_OVERHEAD, MAX_INDEX_FILE, largest_blob
from vmvault.repo.ahead import PACKS_AHEAD, ahead
from vmvault.repo.check import merge_ranges
from vmvault.repo.immutability import require_full_access, retained
from vmvault.repo.index import parse_index
from vmvault.repo.index_block import NOT_CHUNKS, ZERO_ID, IndexBlock, IndexBlockBuilder, chunk_count, is_chunk
from vmvault.repo.index_cache import Grouped, ScratchRows, in_parts, write_many
from vmvault.repo.locks import RepositoryLock
from vmvault.repo.pack import BlobEntry, expected_pack_size, open_blob, pack_name, read_pack_header
from vmvault.repo.progress import PhaseCallback
from vmvault.repo.prune import _object_id, _still_exclusive
from vmvault.repo.repository import BlobWriter, Repository
from vmvault.repo.rewrite import IndexFileWriter
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

__all__ = [
    "REPAIRED_TAG",
    "RepairReport",
    "SnapshotRepair",
    "SnapshotRepairReport",
    "repair_index",
    "repair_snapshots",
]

#: the tag every snapshot written by repair_snapshots carries
REPAIRED_TAG = "repaired"
#: index blocks repair_snapshots remembers as whole (about 150 bytes each)
_INTACT_BLOCKS = 250_000


def _tick(progress: PhaseCallback | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


# ---- repair index --------------------------------------------------------------------------


@dataclass
class RepairReport:
    dry_run: bool
    read_data: bool = False
    index_files_before: int = 0
    index_files_damaged: list[str] = field(default_factory=list)
    packs_kept: int = 0  # listed by a readable index file, present and matching it
    packs_recovered: int = 0  # present, listed by no readable index file, header read
    packs_unreadable: list[str] = field(default_factory=list)  # no usable header and unknown to the index
    packs_dropped: list[str] = field(default_factory=list)  # indexed but missing from storage
    #: damaged packs whose readable blobs were copied into new packs; left out of the index
    packs_salvaged: list[str] = field(default_factory=list)
    blobs_salvaged: int = 0
    #: blobs of missing or salvaged packs that could not be read and have no other copy
    blobs_lost: int = 0
    packs_written: int = 0
    index_files_written: int = 0
    index_files_removed: int = 0

    @property
    def data_lost(self) -> bool:
        """Whether data the index listed, or a pack held, is gone: snapshots may need repair."""
        return bool(self.blobs_lost or self.packs_unreadable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"data_lost": self.data_lost}


def repair_index(
    repo: Repository,
    *,
    dry_run: bool = False,
    from_scratch: bool = False,
    read_data: bool = False,
    progress: PhaseCallback | None = None,
) -> RepairReport:
    """Rebuild the index from the packs in storage, under the exclusive lock (module docstring).

    ``from_scratch`` reads every pack's header instead of trusting readable index files;
    ``read_data`` downloads every pack (each bounded by the repository's pack limit) and
    salvages those whose bytes do not match their name.
    """
    require_full_access(repo, "index repair")
    with repo.lock(exclusive=True, operation="repair-index") as lock:
        try:
            return _repair_index_locked(repo, lock, dry_run, from_scratch, read_data, progress)
        finally:
            repo.load_index()


def _matches_index(repo: Repository, pack_id: bytes, size: int, entries: list[BlobEntry]) -> bool:
    """Whether the stored pack still is what its index entries describe (size, else header)."""
    if size == expected_pack_size(entries):
        return True
    # another zstd version may seal the header to another length: ask the pack itself
    try:
        header = read_pack_header(repo.backend, repo.key, pack_id, size, limit=repo.pack_limit)
    except (IntegrityError, ObjectNotFoundError, UnsafeStorageError):
        return False
    return {e.pack() for e in header} == {e.pack() for e in entries}


def _whole_pack_intact(repo: Repository, pack_id: bytes, size: int) -> bool:
    if size > repo.pack_limit:
        return False
    try:
        data = repo.backend.get(pack_name(pack_id), 0, repo.pack_limit + 1)
    except (ObjectNotFoundError, UnsafeStorageError):
        return False
    return hashlib.sha256(data).digest() == pack_id


#: rows inserted into the scratch database per statement
_BATCH = 10_000
#: the file number of rows read from a pack's own header (index files are numbered from 1)
_HEADER = 0


def _repair_index_locked(
    repo: Repository,
    lock: RepositoryLock,
    dry_run: bool,
    from_scratch: bool,
    read_data: bool,
    progress: PhaseCallback | None,
) -> RepairReport:
    """The working sets are tables of a scratch database on disk, as in check and prune
    (repository-format.md, section 12.9): memory holds the index file being read, the one
    being written (``IndexFileWriter``), one pack's entries and the ids of the index files,
    whatever the repository's size.

    * ``s.rows``: every entry of every readable, live index file (none ``from_scratch``), with
      its file's number; ``s.hdr``: the entries read from packs' own headers;
    * ``s.stored``: the packs in storage; ``s.good``: those the new index lists; ``s.damaged``:
      those to salvage;
    * ``s.failed``: blobs that could not be read where the index put them; ``s.salvaged``:
      blobs copied into new packs. A failed blob with no good copy is lost.
    """
    report = RepairReport(dry_run=dry_run, read_data=read_data)
    with repo.index.cache.scratch() as db:
        db.execute(
            "CREATE TABLE s.rows(file INTEGER NOT NULL, pack BLOB NOT NULL, offset INTEGER NOT NULL, id BLOB NOT NULL,"
            " type INTEGER NOT NULL, length INTEGER NOT NULL, raw INTEGER NOT NULL)"
        )
        db.execute("CREATE TABLE s.hdr AS SELECT * FROM s.rows WHERE 0")
        db.execute("CREATE TABLE s.files(no INTEGER PRIMARY KEY, id BLOB NOT NULL)")
        db.execute("CREATE TABLE s.gone(id BLOB PRIMARY KEY) WITHOUT ROWID")
        for table in ("good", "damaged"):
            db.execute(f"CREATE TABLE s.{table}(pack BLOB PRIMARY KEY) WITHOUT ROWID")
        for table in ("failed", "salvaged"):
            db.execute(f"CREATE TABLE s.{table}(id BLOB PRIMARY KEY) WITHOUT ROWID")
        present = _read_index_files(repo, db, report, from_scratch, progress)
        stored, _bytes = repo.list_stored_into(db, progress)
        # blobs of missing packs are lost unless another copy is found
        report.packs_dropped = [
            bytes(r[0]).hex()
            for r in db.execute(
                "SELECT DISTINCT pack FROM s.rows WHERE pack NOT IN (SELECT id FROM s.stored) ORDER BY pack"
            )
        ]
        db.execute("INSERT OR IGNORE INTO s.failed SELECT id FROM s.rows WHERE pack NOT IN (SELECT id FROM s.stored)")
        with contextlib.ExitStack() as stack:
            out = None if dry_run else stack.enter_context(IndexFileWriter(repo))
            _sort_packs(repo, db, report, out, read_data, stored, progress)
            writer = _salvage_damaged(repo, db, report, dry_run, progress)
            report.blobs_lost = _count_lost(db)
            if out is None or writer is None:
                return report
            report.packs_written = writer.packs_written
            out.absorb(writer.index_files)
            replaced = out.finish(
                set(present) | set(writer.index_files),
                before=lambda: _still_exclusive(repo, lock, "writing the new index", operation="repair index"),
            )
            report.index_files_written = len(out.written) + len(writer.index_files)
            repo.confirm_written(writer.uploaded_lengths, [*writer.index_files, *out.written], operation="repair index")
    old_index = [f"index/{i.hex()}" for i in replaced]
    held_index = retained(repo, old_index)
    for name in old_index:
        if name not in held_index:
            repo.backend.delete(name)
            report.index_files_removed += 1
    return report


def _read_index_files(
    repo: Repository, db: sqlite3.Connection, report: RepairReport, from_scratch: bool, progress: PhaseCallback | None
) -> list[bytes]:
    """Every index file, one at a time: a readable one's entries into ``s.rows`` (unless
    ``from_scratch``), a damaged one into the report. Returns the ids of the files present;
    the rows of files another readable file supersedes are dropped at the end."""
    present: list[bytes] = []
    superseded: set[bytes] = set()
    listed = list(repo.backend.list("index/"))
    number = _HEADER
    for n, obj in enumerate(listed):
        _tick(progress, "index files", n, len(listed))
        file_id = _object_id(obj.name, "index/")
        if file_id is None:
            continue
        try:
            if obj.size > MAX_INDEX_FILE:
                raise IntegrityError(f"{obj.name} is {obj.size} bytes, more than any index file")
            parsed = parse_index(repo.read_index_payload(file_id), name=obj.name)
        except ObjectNotFoundError:
            continue
        except IntegrityError:
            present.append(file_id)
            report.index_files_damaged.append(obj.name)
            continue
        present.append(file_id)
        superseded.update(parsed.supersedes)
        if from_scratch:
            continue
        number += 1
        db.execute("INSERT INTO s.files VALUES (?, ?)", (number, file_id))
        batch: list[tuple[int, bytes, int, bytes, int, int, int]] = []
        for rec in parsed.records:
            batch.extend((number, rec.pack_id, o, i, t, n_, r) for t, i, o, n_, r in rec.rows())
            if len(batch) >= _BATCH:
                write_many(db, "INSERT INTO s.rows VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
                batch = []
        write_many(db, "INSERT INTO s.rows VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
    _tick(progress, "index files", len(listed), len(listed))
    report.index_files_before = len(present)
    write_many(db, "INSERT OR IGNORE INTO s.gone VALUES (?)", [(f,) for f in superseded])
    db.execute("DELETE FROM s.rows WHERE file IN (SELECT f.no FROM s.files f JOIN s.gone g ON g.id = f.id)")
    # a pack's entries in offset order, the first file's copy of an entry listed twice first
    db.execute("CREATE INDEX s.rows_by_pack ON rows(pack, offset, file)")
    return present


def _merged(rows: Iterable[tuple[int, bytes, int, int, int]]) -> list[BlobEntry]:
    """``(type, id, offset, length, raw)`` rows of one pack, in offset order, as entries: an
    entry listed by several index files once (the first file's)."""
    seen: set[tuple[bytes, int]] = set()
    out: list[BlobEntry] = []
    for t, blob_id, offset, length, raw in rows:
        key = (bytes(blob_id), offset)
        if key not in seen:
            seen.add(key)
            out.append(BlobEntry(BlobType(t), key[0], offset, length, raw))
    return out


def _sort_packs(
    repo: Repository,
    db: sqlite3.Connection,
    report: RepairReport,
    out: IndexFileWriter | None,
    read_data: bool,
    stored: int,
    progress: PhaseCallback | None,
) -> None:
    """Each pack in storage, in id order with the entries the index files give it: kept when
    it still matches them, else to salvage; one they do not know is read from its header. The
    good ones go straight into the new index files (``out``), which supersede nothing until
    ``finish``: a run killed here leaves extra files that list present packs only."""
    cur = db.execute(
        "SELECT st.id, st.size, r.type, r.id, r.offset, r.length, r.raw FROM s.stored st"
        " LEFT JOIN s.rows r ON r.pack = st.id ORDER BY st.id, r.offset, r.file"
    )
    good: list[tuple[bytes]] = []
    damaged: list[tuple[bytes]] = []
    hdr: list[tuple[int, bytes, int, bytes, int, int, int]] = []

    def flush() -> None:
        write_many(db, "INSERT INTO s.good VALUES (?)", good)
        write_many(db, "INSERT INTO s.damaged VALUES (?)", damaged)
        write_many(db, "INSERT INTO s.hdr VALUES (?, ?, ?, ?, ?, ?, ?)", hdr)
        good.clear()
        damaged.clear()
        hdr.clear()

    def packs() -> Iterator[tuple[tuple[bytes, int, list[Any]], int]]:
        for (pack_id, size), group in itertools.groupby(_fetched(cur), key=lambda r: (bytes(r[0]), r[1])):
            rows = [r[2:] for r in group if r[2] is not None]
            # a pack read whole weighs its bytes; one whose header (at most) is read, nothing
            yield (pack_id, size, rows), min(size, repo.pack_limit + 1) if read_data else 0

    def look(item: tuple[bytes, int, list[Any]]) -> tuple[str, list[BlobEntry]]:
        """What a pack is (in a reading thread): kept, recovered (from its header), damaged
        (its entries from the index or its header) or unreadable."""
        pack_id, size, rows = item
        if rows:
            entries = _merged(rows)
            intact = _matches_index(repo, pack_id, size, entries)
            if intact and read_data:
                intact = _whole_pack_intact(repo, pack_id, size)
            return ("kept" if intact else "damaged"), entries
        try:
            entries = read_pack_header(repo.backend, repo.key, pack_id, size, limit=repo.pack_limit)
        except (IntegrityError, ObjectNotFoundError, UnsafeStorageError):
            return "unreadable", []
        if read_data and not _whole_pack_intact(repo, pack_id, size):
            return "damaged-header", entries
        return "recovered", entries

    # each pack's header or bytes come as many at once as the storage serves best (a round trip
    # each from remote storage), at most PACKS_AHEAD bytes of them; what they are is written here
    looked = ahead(packs(), look, workers=repo.backend.prepare_reads(), max_weight=PACKS_AHEAD)
    for n, ((pack_id, size, _rows), (found, entries)) in enumerate(looked):
        _tick(progress, "packs", n, stored)
        if found in ("recovered", "damaged-header"):
            hdr.extend((_HEADER, pack_id, e.offset, e.id, e.type, e.length, e.raw_length) for e in entries)
        if found == "unreadable":
            report.packs_unreadable.append(pack_id.hex())
            continue
        if found in ("damaged", "damaged-header"):
            damaged.append((pack_id,))
            continue
        if found == "kept":
            report.packs_kept += 1
        else:
            report.packs_recovered += 1
        good.append((pack_id,))
        if out is not None:
            # kept (its size matched its entries) or read from its header: its listed size is its length
            out.add(pack_id, entries, size)
        if len(good) + len(damaged) + len(hdr) >= _BATCH:
            flush()
    flush()
    _tick(progress, "packs", stored, stored)


def _fetched(cur: sqlite3.Cursor) -> Iterator[Any]:
    while batch := cur.fetchmany(_BATCH):
        yield from batch


def _salvage_damaged(
    repo: Repository, db: sqlite3.Connection, report: RepairReport, dry_run: bool, progress: PhaseCallback | None
) -> BlobWriter | None:
    """Every blob of a damaged pack that still opens goes into a new pack (indexed by the
    writer's own index files); the writer, closed, or None in a dry run."""
    damaged = [bytes(r[0]) for r in db.execute("SELECT pack FROM s.damaged ORDER BY pack")]
    if damaged:
        db.execute("CREATE INDEX s.hdr_by_pack ON hdr(pack, offset)")
    writer: BlobWriter | None = None if dry_run else repo.writer(upload_threads=2, dedup=False)
    try:
        for n, pack_id in enumerate(damaged):
            _tick(progress, "salvage", n, len(damaged))
            report.packs_salvaged.append(pack_id.hex())
            rows = db.execute(
                "SELECT type, id, offset, length, raw FROM (SELECT * FROM s.rows WHERE pack = ?1"
                " UNION ALL SELECT * FROM s.hdr WHERE pack = ?1) ORDER BY offset, file",
                (pack_id,),
            ).fetchall()
            failed: list[tuple[bytes]] = []
            saved: list[tuple[bytes]] = []
            for e, plain in _salvage(repo, pack_id, _merged(rows), failed):
                report.blobs_salvaged += 1
                saved.append((e.id,))
                if writer is not None:
                    writer.add(e.type, e.id, plain)
            write_many(db, "INSERT OR IGNORE INTO s.failed VALUES (?)", failed)
            write_many(db, "INSERT OR IGNORE INTO s.salvaged VALUES (?)", saved)
        if writer is not None:
            writer.flush()
    finally:
        if writer is not None:
            writer.close(flush=False)
    return writer


def _count_lost(db: sqlite3.Connection) -> int:
    """The failed blobs with no copy in a pack the new index lists and none salvaged. Looked up
    by id only when some failed (the index that needs is built then)."""
    if db.execute("SELECT NOT EXISTS (SELECT id FROM s.failed EXCEPT SELECT id FROM s.salvaged)").fetchone()[0]:
        return 0
    db.execute("CREATE INDEX s.rows_by_id ON rows(id)")
    db.execute("CREATE INDEX s.hdr_by_id ON hdr(id)")
    return int(
        db.execute(
            "SELECT count(*) FROM s.failed x WHERE x.id NOT IN (SELECT id FROM s.salvaged)"
            " AND NOT EXISTS (SELECT 1 FROM s.rows r JOIN s.good g ON g.pack = r.pack WHERE r.id = x.id)"
            " AND NOT EXISTS (SELECT 1 FROM s.hdr h JOIN s.good g ON g.pack = h.pack WHERE h.id = x.id)"
        ).fetchone()[0]
    )


def _salvage(
    repo: Repository, pack_id: bytes, entries: list[BlobEntry], failed: list[tuple[bytes]]
) -> Iterator[tuple[BlobEntry, bytes]]:
    """Every blob of a damaged pack that still opens (one bounded range read each); the ids of
    the others are added to ``failed``."""
    name = pack_name(pack_id)
    largest = largest_blob(repo.config.chunk_size)
    for e in entries:
        if e.length > largest + ENVELOPE_OVERHEAD or e.raw_length > largest:
            failed.append((e.id,))
            continue
        try:
            sealed = repo.backend.get(name, e.offset, e.length)
            if len(sealed) != e.length:
                raise IntegrityError("cut short")
            plain = open_blob(repo.key, e.type, e.id, sealed, max_size=e.raw_length)
            if len(plain) != e.raw_length:
                raise IntegrityError("wrong length")
        except (IntegrityError, ObjectNotFoundError, UnsafeStorageError):
            failed.append((e.id,))
            continue
        yield e, plain


# ---- repair snapshots ----------------------------------------------------------------------


@dataclass
class SnapshotRepair:
    """One damaged snapshot: what it lost and what was done."""

    snapshot: str
    time: str
    source: dict[str, str]
    #: {"kind": "disk"|"file", "name", "ranges": [[start, end], ...], "bytes"}
    lost: list[dict[str, Any]] = field(default_factory=list)
    #: the repaired snapshot's id; None when nothing readable was left or in a dry run
    new_snapshot: str | None = None
    #: "repaired", "would repair", "nothing left", "already repaired"
    action: str = ""
    #: True once the original was deleted
    forgotten: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SnapshotRepairReport:
    dry_run: bool
    forget: bool
    checked: int = 0
    intact: int = 0
    repaired: list[SnapshotRepair] = field(default_factory=list)
    #: manifests that cannot be read: (id, error); only `vmvault forget ID` removes them
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    index_blocks_written: int = 0

    @property
    def damaged_remaining(self) -> int:
        """Snapshots still needing data that is gone once this run is over."""
        left = sum(1 for r in self.repaired if not r.forgotten)
        return left + len(self.unreadable)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "forget": self.forget,
            "checked": self.checked,
            "intact": self.intact,
            "repaired": [r.to_dict() for r in self.repaired],
            "unreadable": [{"id": i, "error": e} for i, e in self.unreadable],
            "index_blocks_written": self.index_blocks_written,
            "damaged_remaining": self.damaged_remaining,
        }


def repair_snapshots(
    repo: Repository,
    refs: Iterable[str] = (),
    *,
    forget: bool = False,
    dry_run: bool = False,
    progress: PhaseCallback | None = None,
) -> SnapshotRepairReport:
    """Rewrite every snapshot (or those named by ``refs``: ids or unique prefixes) that needs
    data the repository no longer has; see the module docstring."""
    require_full_access(repo, "snapshot repair")
    with repo.lock(exclusive=True, operation="repair-snapshots"):
        repo.load_index()
        # blobs of packs that are gone count as gone, whatever the index files say
        repo.forget_lost_packs(progress)
        report = SnapshotRepairReport(dry_run=dry_run, forget=forget)
        unreadable: list[tuple[str, str]] = []
        # (the storage's copies: a snapshot damaged there is unreadable, whatever this host kept)
        snaps = repo.list_snapshots(
            on_error=lambda sid, exc: unreadable.append((sid, str(exc))), kept=False, summaries=True
        )
        wanted = _select(repo, list(refs), [s.id for s in snaps] + [u[0] for u in unreadable])
        if wanted is not None:
            snaps = [s for s in snaps if s.id in wanted]
            unreadable = [u for u in unreadable if u[0] in wanted]
        report.unreadable = unreadable
        report.checked = len(snaps) + len(unreadable)
        fixes: list[tuple[SnapshotRepair, Snapshot | None]] = []
        with repo.index.synced_cache().scratch() as db:
            unreadable_parts = _walk(repo, snaps, db, progress)
            gone = _Gone(repo, db, progress)
            if not unreadable_parts and not gone.count:
                report.intact = len(snaps)  # the usual answer, without reading the blocks again
                return report
            writer = None if dry_run else repo.writer(upload_threads=2)
            # index blocks found whole: snapshots of one disk share most of theirs
            intact: set[str] = set()
            try:
                for n, snap in enumerate(repo.whole(snaps)):
                    _tick(progress, "repair", n, len(snaps))
                    fix = _cut(repo, snap, gone, writer, report, intact)
                    if fix is None:
                        report.intact += 1
                    else:
                        fixes.append(fix)
                _tick(progress, "repair", len(snaps), len(snaps))
                if writer is not None:
                    writer.flush()  # the new index blocks, and an index file naming them, first
            finally:
                if writer is not None:
                    writer.close(flush=False)
        known = set(repo.snapshot_ids())
        for item, new in fixes:
            report.repaired.append(item)
            if dry_run:
                item.action = "would repair" if new is not None else "nothing left"
                continue
            if new is None:
                item.action = "nothing left"
            else:
                payload_id = hashlib.sha256(_payload(new)).hexdigest()
                item.action = "already repaired" if payload_id in known else "repaired"
                item.new_snapshot = repo.save_snapshot(new)
            if forget:
                repo.delete_snapshot(item.snapshot)
                item.forgotten = True
        return report


def _payload(snap: Snapshot) -> bytes:
    """The stored JSON of ``snap``, as ``Repository.save_snapshot`` makes it (its id is the hash)."""
    if not snap.program:
        snap.program = f"vmvault {__version__}"
    return json.dumps(snap.to_dict(), sort_keys=True).encode()


def _select(repo: Repository, refs: list[str], ids: list[str]) -> set[str] | None:
    if not refs:
        return None
    chosen: set[str] = set()
    for ref in refs:
        if not ref:
            raise ConfigError("an empty snapshot id was given")
        matches = [i for i in ids if i.startswith(ref)]
        if len(matches) != 1:
            raise SnapshotNotFoundError(
                f"{ref!r} matches {len(matches)} snapshots" + ("; give more characters" if matches else "")
            )
        chosen.add(matches[0])
    return chosen


def _blocks(disk: DiskRecord) -> Iterator[tuple[int, str | None, int]]:
    """(first chunk, block id, entries it must hold) of each index block of ``disk``; a block
    of a disk whose geometry is impossible must hold more than it can (it is lost)."""
    try:
        n_chunks = chunk_count(disk)
    except IntegrityError:
        n_chunks = 0  # impossible geometry: no block fits its disk, each one is lost
    for b, block in enumerate(disk.index):
        first = b * disk.index_span
        yield first, block, max(0, min(disk.index_span, n_chunks - first))


def _walk(repo: Repository, snaps: list[Snapshot], db: sqlite3.Connection, progress: PhaseCallback | None) -> bool:
    """``s.needed``: every chunk the snapshots (summaries, each read again whole while it is
    walked) name, each once (each distinct index block read once); whether some index block or
    file chunk reference could not be read (then the snapshots are walked again to cut it out).
    Memory holds a batch of ids and one snapshot, not the chunks."""
    db.execute("CREATE TABLE s.blocks(id TEXT PRIMARY KEY) WITHOUT ROWID")
    needed = ScratchRows(db, "s.needed_all")
    unreadable = False
    with Grouped(db) as group:
        for n, snap in enumerate(repo.whole(snaps)):
            _tick(progress, "snapshots", n, len(snaps))
            for disk in snap.disks:
                for _first, block, count in _blocks(disk):
                    if block is None:
                        continue
                    group.step()
                    if db.execute("INSERT OR IGNORE INTO s.blocks VALUES (?)", (f"{block}/{count}",)).rowcount == 0:
                        continue  # unchanged blocks are shared between snapshots
                    found = _read_block(repo, block, count)
                    if found is None:
                        unreadable = True
                    else:
                        needed.add_packed(found.encode(), ID_SIZE, NOT_CHUNKS)
            for f in snap.files:
                for c in f.chunks:
                    chunk = _chunk_id(c)
                    if chunk is None:
                        unreadable = True
                    else:
                        needed.add(chunk)
        needed.flush()
    _tick(progress, "snapshots", len(snaps), len(snaps))
    db.execute("CREATE TABLE s.needed(id BLOB PRIMARY KEY) WITHOUT ROWID")
    db.execute("INSERT OR IGNORE INTO s.needed SELECT id FROM s.needed_all ORDER BY id")
    db.execute("DROP TABLE s.needed_all")
    return unreadable


class _Gone:
    """The chunks of ``s.needed`` that have no copy left (``s.gone``), found in one pass in id
    order (``RepoIndex.lacking``); ``of`` answers for a block's chunks from that table."""

    def __init__(self, repo: Repository, db: sqlite3.Connection, progress: PhaseCallback | None) -> None:
        self.db = db
        self.count = 0
        db.execute("CREATE TABLE s.gone(id BLOB PRIMARY KEY) WITHOUT ROWID")
        for ids in repo.index.lacking(db, "s.needed", lambda done, total: _tick(progress, "chunks", done, total)):
            write_many(db, "INSERT OR IGNORE INTO s.gone VALUES (?)", ((i,) for i in ids))
            self.count += len(ids)

    def of(self, refs: Iterable[bytes]) -> set[bytes]:
        """Those of ``refs`` that are gone."""
        if not self.count:
            return set()
        return {bytes(r[0]) for r in in_parts(self.db, "SELECT id FROM s.gone WHERE id IN ({marks})", refs)}


def _cut(
    repo: Repository,
    snap: Snapshot,
    gone: _Gone,
    writer: BlobWriter | None,
    report: SnapshotRepairReport,
    intact: set[str],
) -> tuple[SnapshotRepair, Snapshot | None] | None:
    """The repair of ``snap`` and its repaired copy (None when nothing readable is left), or
    None when it needs nothing that is gone."""
    item = SnapshotRepair(snap.id, snap.time, dict(snap.source))
    disks: list[DiskRecord] = []
    for disk in snap.disks:
        new_index, ranges = _cut_disk(repo, disk, gone, writer, report, intact)
        if ranges:
            item.lost.append(
                {"kind": "disk", "name": disk.name, "ranges": ranges, "bytes": sum(e - s for s, e in ranges)}
            )
            disk = dataclasses.replace(disk, index=new_index)
        disks.append(disk)
    files: list[FileRecord] = []
    for f in snap.files:
        ids = [_chunk_id(c) for c in f.chunks]
        if None not in ids and not gone.of(i for i in ids if i is not None):
            files.append(f)
        else:
            item.lost.append({"kind": "file", "name": f.name, "ranges": [[0, f.size]], "bytes": f.size})
    if not item.lost:
        return None
    has_data = files or any(b is not None for d in disks for b in d.index)
    if not has_data:
        return item, None
    what = "; ".join(f"{x['kind']} {x['name']}: {x['bytes']} bytes" for x in item.lost)
    new = dataclasses.replace(
        snap,
        disks=disks,
        files=files,
        tags=sorted(set(snap.tags) | {REPAIRED_TAG}),
        warnings=[*snap.warnings, f"repaired from snapshot {snap.id[:8]}: lost data cut out ({what})"],
        extra={**snap.extra, "repaired_from": snap.id, "lost": item.lost},
        program="",
    )
    return item, new


def _chunk_id(chunk: object) -> bytes | None:
    """A file's chunk id as bytes; None for a manifest that authenticates but names no id."""
    try:
        return bytes.fromhex(chunk)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return None


def _cut_disk(
    repo: Repository,
    disk: DiskRecord,
    gone: _Gone,
    writer: BlobWriter | None,
    report: SnapshotRepairReport,
    intact: set[str],
) -> tuple[list[str | None], list[list[int]]]:
    """The disk's index with every lost chunk made ZERO_ID (a lost index block: all of its
    range), and the lost byte ranges, merged. ``intact``: blocks already found whole with as
    many entries (``<id>/<count>``), not read again; those found whole are added, up to
    ``_INTACT_BLOCKS``."""
    cs = disk.chunk_size
    lost: list[list[int]] = []
    new_index: list[str | None] = []
    for first, block, count in _blocks(disk):
        if block is None:
            new_index.append(None)
            continue
        known = f"{block}/{count}"
        if known in intact:
            new_index.append(block)
            continue
        found = _read_block(repo, block, count)
        if found is None:
            lost.append([first * cs, min(disk.size, (first + count) * cs)])
            new_index.append(None)
            continue
        refs = list(found)
        lacking = gone.of(r for r in refs if is_chunk(r))
        if not lacking:
            if len(intact) < _INTACT_BLOCKS:
                intact.add(known)
            new_index.append(block)
            continue
        cut = IndexBlockBuilder.from_block(found)
        for i, ref in enumerate(refs):
            if ref in lacking:
                cut.fill(i, i + 1, ZERO_ID)
                k = first + i
                lost.append([k * cs, min(disk.size, (k + 1) * cs)])
        if writer is None:
            new_index.append(repo.index_block_ref(cut.build()))
        else:
            before = writer.index_blocks_added
            new_index.append(writer.add_index_block(cut.build()))
            report.index_blocks_written += writer.index_blocks_added - before
    return new_index, merge_ranges(lost)


def _read_block(repo: Repository, block: str, count: int) -> IndexBlock | None:
    """The index block, or None when it cannot be read or does not hold ``count`` entries."""
    if count <= 0:
        return None
    try:
        return repo.read_index_block(block, count=count)
    except IntegrityError:
        return None

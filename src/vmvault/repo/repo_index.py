"""Where each blob of a repository is: the per-host index cache, this process's own uploads,
and which packs this process has confirmed present (repository-format.md, section 12.4).

``Repository.index`` is a :class:`RepoIndex`. It opens the cache (repo/index_cache.py) at its
first use and syncs it once (``sync`` again brings it up to date; commands do that after
taking their lock). Lookups give every live copy of a blob (``locations``); a copy in a
pack found missing or too short is left out. Deduplication asks ``has_present``: a copy in
a pack this process uploaded, or confirmed with one small read.

An incremental backup of a large disk confirms every pack its parent's chunks are in: a
disk of 2 TiB stored in 16 MiB packs asks about 100,000 packs, one round trip each to an
object store. Once the packs asked about in one folder of ``data/`` (the 256 folders named by
a pack id's first byte) cost as many reads as listing that folder would
(``Backend.names_per_read``), the folder is listed instead, once per sync, and its packs the
cache knows are judged from the listing: missing, or shorter than the one-byte read would
need (section 12.4). A listing's size is the storage's word as a one-byte read's answer is.
Memory holds one folder's listing while it is judged, then only the packs it found gone.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from vmvault.backends.base import Backend
from vmvault.errors import ObjectNotFoundError, UnsafeStorageError
from vmvault.repo._layout import PACK_TRAILER, BlobType
from vmvault.repo.index import BlobLocation, parse_index
from vmvault.repo.index_cache import CacheDamaged, CachedRow, IndexCache, IngestBatch
from vmvault.repo.names import pack_id as pack_id_of
from vmvault.repo.pack import BlobEntry, pack_name

T = TypeVar("T")

__all__ = ["IndexStats", "LostPacks", "RepoIndex"]


@dataclass
class IndexStats:
    blobs: int
    data_blobs: int
    #: plaintext bytes of the distinct DATA blobs
    data_bytes: int


@dataclass
class LostPacks:
    """Packs the index names that a presence check found gone or cut short."""

    missing: set[bytes] = field(default_factory=set)
    #: present, but shorter than the index says (blobs past the end are gone)
    short: set[bytes] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.missing or self.short)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} packs named by the index are missing from storage")
        if self.short:
            parts.append(f"{len(self.short)} packs are shorter than the index says")
        return " and ".join(parts)


class RepoIndex:
    """The index of one open repository. Thread-safe.

    ``open_cache`` makes the IndexCache (at first use); ``listing`` lists ``index/`` as
    (file id, size, stamp); ``fetch(id, size)`` reads and verifies one index file's payload (None
    when it vanished).
    """

    def __init__(
        self,
        backend: Backend,
        open_cache: Callable[[], IndexCache],
        listing: Callable[[], Iterable[tuple[bytes, int, str]]],
        fetch: Callable[[bytes, int], bytes | None],
    ) -> None:
        self._backend = backend
        self._open_cache = open_cache
        self._listing = listing
        self._fetch = fetch
        self._cache: IndexCache | None = None
        self._lock = threading.RLock()
        self._synced = False
        #: blobs this process uploaded that no ingested index file names yet
        self._overlay: dict[bytes, list[BlobLocation]] = {}
        #: pack id -> confirmed present (True) or found gone/short (False)
        self._confirmed: dict[bytes, bool] = {}
        #: folders of data/ listed since the last sync (first byte of their packs' ids) -> the
        #: packs the cache knows there that the listing found missing (True) or short (False)
        self._listed: dict[int, dict[bytes, bool]] = {}
        #: single confirmations made per folder since the last sync
        self._asked_in: dict[int, int] = {}
        #: one lock per folder being listed (a second thread waits for the first's listing)
        self._listing_gates: dict[int, threading.Lock] = {}
        #: packs per folder the cache knows (estimated at the first confirmation after a sync)
        self._per_folder: float | None = None
        #: counts syncs: a listing taken before a sync is not kept after it
        self._generation = 0
        #: packs treated as gone whatever a check says (from a listing of data/)
        self._excluded: set[bytes] = set()
        #: packs found shorter than the index says: pack id -> stored size (blobs that end
        #: before the trailer would start still read)
        self._short: dict[bytes, int] = {}
        #: time.monotonic() of the last sync (a reader that misses syncs again, not too often)
        self.synced_at = float("-inf")
        self.lost = LostPacks()
        #: what the user should hear about the cache (a rebuilt or temporary cache)
        self.warnings: list[str] = []

    # ---- the cache ---------------------------------------------------------------------

    @property
    def cache(self) -> IndexCache:
        with self._lock:
            if self._cache is None:
                self._cache = self._open_cache()
                self._take_warnings()
            return self._cache

    def _take_warnings(self) -> None:
        if self._cache is not None and self._cache.warnings:
            self.warnings.extend(self._cache.warnings)
            self._cache.warnings.clear()

    def sync(self, *, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Bring the cache up to date with the repository's index files; returns the problems
        (unreadable index files). Confirmations of pack presence are forgotten."""
        with self._lock:
            # new files are read as many at once as the storage serves best
            reads = None if self._backend is None else self._backend.prepare_reads
            try:
                problems = self.cache.sync(self._listing(), self._fetch, progress=progress, reads=reads)
            except CacheDamaged as exc:
                self.cache.reset(str(exc))
                problems = self.cache.sync(self._listing(), self._fetch, progress=progress, reads=reads)
            self._take_warnings()
            self._synced = True
            self.synced_at = time.monotonic()
            self._confirmed = {k: v for k, v in self._confirmed.items() if k in self._own}
            self._listed.clear()
            self._asked_in.clear()
            self._per_folder = None
            self._generation += 1
            return problems

    @property
    def _own(self) -> set[bytes]:
        return {loc.pack_id for locs in self._overlay.values() for loc in locs}

    def synced_cache(self) -> IndexCache:
        """The cache, synced first if this object never synced it."""
        return self._ensure()

    def _ensure(self) -> IndexCache:
        if not self._synced:
            with self._lock:
                if not self._synced:
                    self.sync()
        return self.cache

    def _asked(self, question: Callable[[IndexCache], T]) -> T:
        """``question`` of the cache; a cache found damaged is reset, rebuilt and asked again."""
        cache = self._ensure()
        try:
            return question(cache)
        except CacheDamaged as exc:
            with self._lock:
                cache.reset(str(exc))
                self._synced = False
            return question(self._ensure())

    def _rows(self, blob_id: bytes) -> list[CachedRow]:
        return self._asked(lambda cache: cache.rows(blob_id))

    def _rows_many(self, blob_ids: list[bytes]) -> dict[bytes, list[CachedRow]]:
        return self._asked(lambda cache: cache.rows_many(blob_ids))

    def close(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.discard()
                self._cache = None
            self._synced = False

    # ---- lookups -----------------------------------------------------------------------

    def locations(self, blob_id: bytes) -> list[BlobLocation]:
        """Every copy of ``blob_id`` this process knows: its own uploads first, then the live
        index (one per pack), leaving out packs found gone."""
        with self._lock:
            own = list(self._overlay.get(blob_id, ()))
        return self._located(blob_id, own, self._rows(blob_id))

    def locations_many(self, blob_ids: Iterable[bytes]) -> dict[bytes, list[BlobLocation]]:
        """``locations`` of each of ``blob_ids`` (every id is a key; no copy: an empty list),
        looked up in the cache with a few queries for all of them."""
        wanted = list(dict.fromkeys(blob_ids))
        with self._lock:
            own = {b: list(self._overlay.get(b, ())) for b in wanted}
        rows = self._rows_many(wanted)
        return {b: self._located(b, own[b], rows.get(b, ())) for b in wanted}

    def located_of(self, blob_ids: Iterable[bytes]) -> set[bytes]:
        """Those of ``blob_ids`` that ``locations`` gives a copy of, without building the copies
        (``repair snapshots`` asks about every chunk of every snapshot)."""
        wanted = list(dict.fromkeys(blob_ids))
        with self._lock:
            found = {b for b in wanted if self._overlay.get(b)}
        rest = [b for b in wanted if b not in found]
        if rest:
            ends = self._asked(lambda cache: cache.ends_many(rest))
            found.update(blob_id for blob_id, pack_id, end in ends if not self._gone(pack_id, end))
        return found

    def lacking(
        self, conn: sqlite3.Connection, table: str, progress: Callable[[int, int], None] | None = None
    ) -> Iterator[list[bytes]]:
        """On ``conn`` (from the cache's ``scratch``): the ids of ``table`` (a scratch table whose
        primary key is ``id``) that ``locations`` gives no copy of, in batches, in id order.

        The table and the cache are walked together in id order (``IndexCache.without_copy``),
        which yields the ids with no live row outside the packs this object may count as gone
        (left out, short, or found missing); those few are then asked as ``located_of`` does.
        ``repair snapshots`` asks this of every chunk of every snapshot: a lookup per id read
        the cache's pages in random order, growing faster than the repository."""
        cache = self._ensure()
        with self._lock:
            doubtful = self._excluded | set(self._short) | {p for p, ok in self._confirmed.items() if not ok}
        for batch in cache.without_copy(conn, table, doubtful, progress):
            have = self.located_of(batch)
            if gone := [b for b in batch if b not in have]:
                yield gone

    def _located(self, blob_id: bytes, own: list[BlobLocation], rows: Iterable[CachedRow]) -> list[BlobLocation]:
        out = own
        seen = {loc.pack_id for loc in out}
        for row in rows:
            if row.pack_id in seen or self._gone(row.pack_id, row.offset + row.length):
                continue
            seen.add(row.pack_id)
            out.append(BlobLocation(row.pack_id, BlobEntry(BlobType(row.type), blob_id, *row[2:5])))
        return out

    def _gone(self, pack_id: bytes, blob_end: int) -> bool:
        if pack_id in self._excluded:
            return True
        cut = self._short.get(pack_id)
        if cut is not None:
            return blob_end > cut - PACK_TRAILER.size
        return self._confirmed.get(pack_id) is False and pack_id in self.lost.missing

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        found = self.locations(blob_id)
        return found[0] if found else None

    def __contains__(self, blob_id: object) -> bool:
        return isinstance(blob_id, bytes) and bool(self.locations(blob_id))

    def uploaded(self, blob_id: bytes) -> bool:
        """Whether this process uploaded ``blob_id`` and no ingested index file names it yet."""
        return blob_id in self._overlay

    def has_present(self, blob_id: bytes) -> bool:
        """Whether a copy of ``blob_id`` is in a pack this process uploaded or confirmed
        present and long enough (deduplication may rely on it: section 7, backup rule 4)."""
        with self._lock:
            if blob_id in self._overlay:
                return True
        return self._in_present_pack(self._rows(blob_id))

    def present_of(self, blob_ids: Iterable[bytes]) -> set[bytes]:
        """Those of ``blob_ids`` that ``has_present`` holds true of, looked up in the cache with
        a few queries for all of them: a backup asks about a batch of chunks at once, and a query
        each cost it a round through SQLite, the cache's lock and the GIL per chunk."""
        wanted = list(dict.fromkeys(blob_ids))
        with self._lock:
            found = {b for b in wanted if b in self._overlay}
        rest = [b for b in wanted if b not in found]
        if rest:
            rows = self._rows_many(rest)
            self._list_ahead(row.pack_id for copies in rows.values() for row in copies)
            found.update(b for b, copies in rows.items() if self._in_present_pack(copies))
        return found

    def _list_ahead(self, packs: Iterable[bytes]) -> None:
        """Before confirming ``packs`` one after another: list each folder where they alone
        would cost more single reads than its listing (``_folder_listed``)."""
        unknown = {p for p in packs if p and p not in self._confirmed}
        per_folder: dict[int, int] = {}
        for pack_id in unknown:
            per_folder[pack_id[0]] = per_folder.get(pack_id[0], 0) + 1
        for folder, coming in per_folder.items():
            if coming > 1:
                self._folder_listed(folder, coming)

    def _in_present_pack(self, rows: list[CachedRow]) -> bool:
        """Whether one of a blob's cached copies is in a pack not left out and confirmed present."""
        return any(
            row.pack_id not in self._excluded and self.confirm(row.pack_id, row.pack_length, row.pack_end)
            for row in rows
        )

    def confirm(self, pack_id: bytes, length: int, end: int) -> bool:
        """Whether the pack is present and at least its recorded length (else long enough for
        every blob listed in it), asked of the storage once per process."""
        known = self._confirmed.get(pack_id)
        if known is not None:
            return known
        need = length or end + PACK_TRAILER.size
        listed = self._folder_listed(pack_id[0]) if pack_id else None
        if listed is not None:
            ok, missing = pack_id not in listed, listed.get(pack_id, False)
        else:
            try:
                ok = len(self._backend.get(pack_name(pack_id), need - 1, 1)) == 1
                missing = False
            except (ObjectNotFoundError, UnsafeStorageError):
                ok, missing = False, True
        with self._lock:
            self._confirmed[pack_id] = ok
            if not ok:
                (self.lost.missing if missing else self.lost.short).add(pack_id)
        return ok

    def _folder_listed(self, folder: int, coming: int = 1) -> dict[bytes, bool] | None:
        """The packs of ``data/<folder>/`` found missing (True) or short (False) by listing
        the folder, listed now when the confirmations asked there, with the ``coming`` ones,
        cost more reads than the listing does; None while they do not (module docstring).
        Only a single confirmation (``coming`` 1) counts as asked: it is read when this
        returns None."""
        per_folder = self._per_folder
        if per_folder is None:
            per_folder = self._per_folder = self._asked(lambda cache: cache.pack_count()) / 256
        with self._lock:
            found = self._listed.get(folder)
            if found is not None:
                return found
            asked = self._asked_in.get(folder, 0) + coming
            if asked <= max(1.0, per_folder / max(1, self._backend.names_per_read)):
                if coming == 1:
                    self._asked_in[folder] = asked
                return None
            gate = self._listing_gates.setdefault(folder, threading.Lock())
            generation = self._generation
        with gate:
            with self._lock:
                found = self._listed.get(folder)
            if found is None:
                found = self._list_folder(folder)
                with self._lock:
                    if generation == self._generation:
                        self._listed[folder] = found
        return found

    def _list_folder(self, folder: int) -> dict[bytes, bool]:
        """Every pack of ``data/<folder>/`` the cache knows that the folder's listing lacks
        (True) or lists shorter than a confirmation would need (False). Only the packs the
        cache knows are held while the listing streams by: whatever else the storage lists
        there (it may list anything) costs no memory."""
        need = {
            pack_id: length or end + PACK_TRAILER.size
            for pack_id, length, end in self._asked(lambda cache: cache.packs_in_folder(folder))
        }
        gone = dict.fromkeys(need, True)
        for info in self._backend.list(f"data/{folder:02x}/"):
            found = pack_id_of(info.name)
            if found in need:
                if info.size >= need[found]:
                    gone.pop(found, None)
                else:
                    gone[found] = False
        return gone

    def exclude(self, packs: Iterable[bytes], short: dict[bytes, int] | None = None) -> None:
        """Treat ``packs`` as gone, and the blobs of ``short`` packs (id -> stored size) that
        end past the size as gone (a listing of ``data/`` found them missing or cut)."""
        with self._lock:
            self._excluded.update(packs)
            self._short.update(short or {})
            for pack_id in self._excluded | set(self._short):
                self._confirmed[pack_id] = False

    # ---- this process's uploads --------------------------------------------------------

    def add_pack(self, pack_id: bytes, entries: Iterable[BlobEntry]) -> None:
        """A pack this process has just uploaded: its blobs are known (and present) at once."""
        with self._lock:
            self._confirmed[pack_id] = True
            for e in entries:
                locs = self._overlay.setdefault(e.id, [])
                if all(loc.pack_id != pack_id for loc in locs):
                    locs.append(BlobLocation(pack_id, e))

    def ingested(self, file_id: bytes, payload: bytes, size: int = 0, *, batch: IngestBatch | None = None) -> None:
        """An index file this process has just written: into the cache, and its packs' blobs
        out of the overlay (a failure to add it to the cache only keeps them in the overlay;
        the next sync downloads it). With a ``batch`` (:meth:`batch`), it is only staged there,
        and goes into the cache with the batch's other files (:meth:`commit_batch`)."""
        try:
            parsed = parse_index(payload, name=f"index/{file_id.hex()}")
            if batch is not None:
                if not batch.closed:
                    batch.add(file_id, parsed, size)
                return
            self.cache.ingest(file_id, parsed, size)
        except Exception as exc:
            self._cache_failed(exc, batch)
            return
        self._out_of_overlay({rec.pack_id for rec in parsed.records})

    def batch(self) -> IngestBatch | None:
        """A batch for the index files this process is about to write one after another (prune
        and repair writing the index again), None when the cache cannot make one (the files
        are then downloaded by the next sync)."""
        try:
            return self.cache.batch()
        except Exception as exc:
            self._cache_failed(exc, None)
            return None

    def commit_batch(self, batch: IngestBatch | None) -> None:
        """Put the files staged in ``batch`` into the cache, and their packs' blobs out of the
        overlay; the batch is closed."""
        if batch is None:
            return
        try:
            if batch.closed:
                return
            batch.commit()
            with self._lock:
                overlaid = {loc.pack_id for locs in self._overlay.values() for loc in locs}
            self._out_of_overlay(batch.staged_packs(overlaid))
        except Exception as exc:
            self._cache_failed(exc, batch)
        finally:
            batch.close()

    def _cache_failed(self, exc: Exception, batch: IngestBatch | None) -> None:
        """Adding written files to the cache failed: a damaged cache is built again (the next
        sync fills it), anything else (a full disk) is left to the next sync."""
        if batch is not None:
            batch.close()
        if isinstance(exc, CacheDamaged):
            with self._lock:
                self.cache.reset(str(exc))
                self._synced = False

    def _out_of_overlay(self, written: set[bytes]) -> None:
        """Forget this process's own locations in the ``written`` packs (the cache has them)."""
        if not written:
            return
        with self._lock:
            for blob_id in [b for b, locs in self._overlay.items() if any(loc.pack_id in written for loc in locs)]:
                left = [loc for loc in self._overlay[blob_id] if loc.pack_id not in written]
                if left:
                    self._overlay[blob_id] = left
                else:
                    del self._overlay[blob_id]

    # ---- whole-index views (maintenance, tests, the dashboard) -------------------------

    def stats(self) -> IndexStats:
        """Distinct live blobs, DATA blobs and their plaintext bytes: one pass over the cache."""
        blobs, data, data_bytes = self._ensure().totals()
        return IndexStats(blobs, data, data_bytes)

    def __len__(self) -> int:
        return self.stats().blobs

    def packs(self) -> dict[bytes, list[BlobEntry]]:
        """The first copy of every blob, by pack. The whole index in memory: for tests and
        small repositories only (check and prune stream instead)."""
        out: dict[bytes, list[BlobEntry]] = {}
        seen: set[bytes] = set()
        for blob_id, row in self._ensure().iter_live():
            if blob_id in seen or self._gone(row.pack_id, row.offset + row.length):
                continue
            seen.add(blob_id)
            out.setdefault(row.pack_id, []).append(BlobEntry(BlobType(row.type), blob_id, *row[2:5]))
        with self._lock:
            for blob_id, locs in self._overlay.items():
                if blob_id not in seen:
                    out.setdefault(locs[0].pack_id, []).append(locs[0].entry)
        return out

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """(blob id, its first copy) for every blob: a pass over the whole index."""
        for pack_id, entries in self.packs().items():
            for e in entries:
                yield e.id, BlobLocation(pack_id, e)

    def live_packs(self) -> Iterator[tuple[bytes, int, int]]:
        """(pack id, recorded length or 0, end of its last blob) of every pack the live index
        names: one pass over the cache."""
        return self._ensure().live_packs()

    def disagreement(
        self, files: dict[bytes, bool], replaced: set[bytes], digests: dict[bytes, tuple[int, int] | None]
    ) -> str | None:
        """What this host's cache says otherwise than the index files, or None. ``files``: the
        cache's present files (id -> live, ``IndexCache.present_files``); ``replaced``: the ids
        that present files supersede, and ``digests`` their ``rows_digest``, read from the files
        themselves. Compared: which files are live, and every row of each live one."""
        live = {f for f in files if f not in replaced}
        wrong = next((f"index/{f.hex()} live" for f in files if files[f] != (f in live)), None)
        if wrong is not None:
            return wrong
        found = self._ensure().live_digests()
        return next(
            (
                f"the rows of index/{f.hex()}"
                for f in live
                if f not in digests or (digests[f] is not None and found.get(f, (0, 0)) != digests[f])
            ),
            None,
        )

    def reset(self, why: str) -> None:
        """Delete the cache and start an empty one, with a warning (the next sync fills it)."""
        with self._lock:
            self.cache.reset(why)
            self._synced = False
            self._take_warnings()

    def verify(self, blob_id: bytes) -> bool:
        """Whether the cache's rows of ``blob_id`` say what the index files they came from say
        (a read through them failed: the cache may be damaged). False resets the cache."""
        cache = self._ensure()
        try:
            for row in cache.rows(blob_id):
                file_id = cache.file_id(row.file)
                payload = None if file_id is None else self._fetch(file_id, 0)
                if file_id is None or payload is None:
                    continue  # gone meanwhile: the next sync drops it
                parsed = parse_index(payload, name=f"index/{file_id.hex()}")
                rec = next((r for r in parsed.records if r.pack_id == row.pack_id), None)
                if rec is None or not any(
                    (i, t, o, n, r) == (blob_id, row.type, row.offset, row.length, row.raw_length)
                    for t, i, o, n, r in rec.rows()
                ):
                    raise CacheDamaged(f"its entry of blob {blob_id.hex()} is not what index/{file_id.hex()} says")
        except CacheDamaged as exc:
            with self._lock:
                cache.reset(str(exc))
                self._synced = False
                self._take_warnings()
            return False
        return True

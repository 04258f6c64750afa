"""The per-host index cache: every live index entry of one repository, on disk (section 12.3).

A SQLite database per repository and storage location in the cache folder
(``$VMVAULT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vmvault``, else ``~/.cache/vmvault``)::

    meta(key, value)                          schema version, repository id, location
    files(no, id, present, live, ...)         every index file ingested
    supersedes(file, old)                     the superseded ids each file lists
    packs(no, id, length, end)                recorded length (0: unknown), end of its last blob
    blobs(id, file, pack, type, offset,       one row per entry of each ingested file
          length, raw_length)

``sync`` brings it up to date from a listing of ``index/``: files not yet ingested are read
(through the caller, which verifies them) and inserted, each file with all its rows in one
transaction; ``present`` and ``live`` are recomputed in one more. A lookup reads rows of live
files only. Memory is the page caches (a few MiB per connection), whatever the repository's
size; lookups cost one B-tree descent. Every thread's lookups share one connection (one page
cache): a connection per thread filled a page cache each once the cache was larger than them.

Crash safety is SQLite's (WAL, ``synchronous=NORMAL``): killed at any instant, each file is
in the cache whole or not at all. A database SQLite finds damaged, or whose schema or
repository does not match, is deleted and built again (``IndexCache.reset``). Several
processes of one host share a database (a sync holds ``<database>.lock``); each host has its
own, and all converge on the repository's index files, which are immutable. Each process that
has the database open holds a shared lock on ``<database>.use`` (:func:`hold_in_use`), so
``vmvault cache`` removes only caches no process uses (SQLite's files deleted under an open
connection can damage the database that replaces them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from vmvault import platform
from vmvault.errors import IntegrityError, RepositoryError
from vmvault.repo.ahead import PACKS_AHEAD, ahead, index_file_weight
from vmvault.repo.index import ParsedIndex, parse_index

__all__ = [
    "TEMPORARY_PREFIX",
    "USE_SUFFIX",
    "CacheDamaged",
    "CachedRow",
    "Grouped",
    "IndexCache",
    "IngestBatch",
    "ScratchMap",
    "ScratchRows",
    "cache_root",
    "hold_in_use",
    "in_parts",
    "lock_unused",
    "private_dir",
    "rows_digest",
    "write_many",
]

SCHEMA = 1
#: page cache of the connection every thread's lookups share (KiB): lookups need a few levels
#: of one B-tree
_READ_CACHE_KIB = 4096
#: page cache of a connection that syncs or runs maintenance queries
_WRITE_CACHE_KIB = 16384
#: rows staged before they are sorted into ``blobs`` in one transaction
_BATCH_ROWS = 1_000_000
#: rows of files that are gone are deleted once there are this many and half the live rows
_COMPACT_MIN = 100_000
#: a writer that waits longer than this for another process's transaction gives up
_BUSY_SECONDS = 600

_SCHEMA_SQL = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS files(no INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, present INTEGER NOT NULL,"
    " live INTEGER NOT NULL, version INTEGER NOT NULL, blobs INTEGER NOT NULL, has_rows INTEGER NOT NULL,"
    " size INTEGER NOT NULL, stamp TEXT)",
    "CREATE TABLE IF NOT EXISTS supersedes(file INTEGER NOT NULL, old BLOB NOT NULL, PRIMARY KEY(file, old))"
    " WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS supersedes_old ON supersedes(old)",
    "CREATE TABLE IF NOT EXISTS packs(no INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, length INTEGER NOT NULL,"
    " end INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS blobs(id BLOB NOT NULL, file INTEGER NOT NULL, pack INTEGER NOT NULL,"
    " type INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL, raw_length INTEGER NOT NULL,"
    " PRIMARY KEY(id, file, pack)) WITHOUT ROWID",
    # COMPLIANCE retention this host saw on a version of an object (name, the listing's stamp
    # and time of that version): a later check need not ask again (section 12.3)
    "CREATE TABLE IF NOT EXISTS locks(name TEXT PRIMARY KEY, stamp TEXT NOT NULL, written REAL NOT NULL,"
    " until REAL NOT NULL) WITHOUT ROWID",
)

#: live rows of one blob, the earliest ingested file first
_LOOKUP = (
    "SELECT p.id, b.type, b.offset, b.length, b.raw_length, p.length, p.end, b.file FROM blobs b"
    " JOIN files f ON f.no = b.file JOIN packs p ON p.no = b.pack WHERE b.id = ? AND f.live ORDER BY b.file"
)
#: live rows of several blobs (``?`` stands for the list of ids), each blob's earliest ingested file first
_LOOKUP_MANY = (
    "SELECT b.id, p.id, b.type, b.offset, b.length, b.raw_length, p.length, p.end, b.file FROM blobs b"
    " JOIN files f ON f.no = b.file JOIN packs p ON p.no = b.pack WHERE b.id IN ({marks}) AND f.live"
    " ORDER BY b.id, b.file"
)
#: where the live rows of several blobs end: (blob id, pack id, end of the blob in the pack)
_ENDS_MANY = (
    "SELECT b.id, p.id, b.offset + b.length FROM blobs b JOIN files f ON f.no = b.file JOIN packs p ON p.no = b.pack"
    " WHERE b.id IN ({marks}) AND f.live"
)
#: ids in one ``_LOOKUP_MANY`` (SQLite before 3.32 allows 999 parameters in a statement)
_LOOKUP_MANY_IDS = 500
_CONTAINS = "SELECT 1 FROM blobs b JOIN files f ON f.no = b.file WHERE b.id = ? AND f.live LIMIT 1"
_LIVE = (
    "UPDATE files SET live = present AND NOT EXISTS (SELECT 1 FROM supersedes s JOIN files f2 ON f2.no = s.file"
    " WHERE s.old = files.id AND f2.present AND f2.no != files.no)"
)


class CachedRow(NamedTuple):
    """A live entry: where one copy of a blob is."""

    pack_id: bytes
    type: int
    offset: int
    length: int
    raw_length: int
    #: the pack's recorded length (0: not recorded) and the end of its last blob
    pack_length: int
    pack_end: int
    #: the cache's number of the index file that lists it
    file: int


class CacheDamaged(Exception):
    """The database is damaged or not this repository's; ``IndexCache.reset`` rebuilds it."""


#: the name a temporary cache folder starts with (in the system's temporary folder), made when
#: the cache folder cannot be used; removed when the command ends, by ``vmvault cache clean``
#: when a killed command left it
TEMPORARY_PREFIX = "vmvault-index-"


def cache_root() -> str:
    """``$VMVAULT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vmvault``, else ``~/.cache/vmvault``."""
    return os.environ.get("VMVAULT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmvault"
    )


def private_dir(path: str) -> None:
    """Create the cache folder ``path`` 0700 (and the cache root above it, when vmvault makes
    it), or check that the existing one is a real folder of this user, narrowed to 0700.

    Whoever can write the folder can plant rows a backup deduplicates against (a chunk
    "stored" in a pack that does not hold it: the new snapshot would miss it), and whoever
    can read it learns every chunk id: a folder of another user, or a link, is not used."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(os.path.dirname(path), mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a folder")
    _own(path, st)


def _own(path: str, st: os.stat_result) -> None:
    """Refuse ``path`` unless it belongs to this user; narrow a wider mode (0700 or 0600)."""
    uid = platform.current_uid()
    if uid is None:
        return  # Windows: a user's cache lies in their own profile
    if st.st_uid != uid:
        raise OSError(f"{path} belongs to another user (uid {st.st_uid}), who could change what it says")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700 if stat.S_ISDIR(st.st_mode) else 0o600)


#: beside each database: a shared lock on ``<database>.use`` says a process has it open, and
#: its modification time is the last opening (``vmvault cache``, repo/host_cache.py)
USE_SUFFIX = ".use"


def hold_in_use(db_path: str) -> int | None:
    """Say that this process uses the cache at ``db_path`` until the returned descriptor is
    closed: a shared lock on ``<database>.use``, its modification time set to now. A lock
    taken on a file that :func:`lock_unused`'s caller removed meanwhile is taken again on the
    new one. None where the lock cannot be had (a file system without locks): the cache is
    used all the same, and ``vmvault cache``, unable to lock it either, leaves it alone."""
    path = db_path + USE_SUFFIX
    for _ in range(100):
        try:
            fd = platform.open_nofollow(path, os.O_RDONLY | os.O_CREAT | platform.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            platform.lock_shared(fd, wait=True)
        except OSError:  # no locks on this file system
            os.close(fd)
            return None
        try:
            if platform.same_file(os.fstat(fd), os.lstat(path)):
                with contextlib.suppress(OSError):
                    os.utime(fd) if os.utime in os.supports_fd else os.utime(path)
                return fd
        except FileNotFoundError:
            pass  # removed while this process waited: lock the new one
        os.close(fd)
    return None


def lock_unused(db_path: str, *, create: bool = True) -> int | None:
    """An exclusive lock on the cache at ``db_path``, without waiting: its descriptor while no
    process holds the cache (:func:`hold_in_use` waits until it is closed), else None. The
    caller removes the cache's files, ``<database>.use`` last, then closes the descriptor.
    ``OSError`` where the file system takes no locks, and ``FileNotFoundError`` without
    ``create`` when no process ever held the cache (a question that must not make the file:
    its modification time is the cache's last use)."""
    path = db_path + USE_SUFFIX
    fd = platform.open_nofollow(path, os.O_RDWR | (os.O_CREAT if create else 0) | platform.O_CLOEXEC, 0o600)
    try:
        if platform.lock(fd, wait=False) and platform.same_file(os.fstat(fd), os.lstat(path)):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


class IndexCache:
    """The index cache of one repository at one location. Thread-safe: lookups of every
    thread take turns on one connection (``close`` closes it); syncs and maintenance open
    their own."""

    def __init__(self, repo_id: str, location: str, *, root: str | None = None) -> None:
        self.repo_id = repo_id
        self.location = location
        #: warnings for the user (a cache folder that cannot be used, a rebuilt cache)
        self.warnings: list[str] = []
        self._tmp: str | None = None
        self._reader: sqlite3.Connection | None = None
        #: held while the shared connection runs a statement and its rows are fetched
        self._reading_lock = threading.Lock()
        #: called before each commit of a sync (tests kill the process there)
        self.before_commit: Callable[[str], None] | None = None
        folder = os.path.join(root or cache_root(), "index")
        name = f"{repo_id}-{hashlib.sha256(location.encode()).hexdigest()[:16]}.sqlite"
        #: closes the descriptor of the shared lock on ``<database>.use``, held while this
        #: process uses the cache (at ``discard``, or when the object is collected unclosed)
        self._use: weakref.finalize[[int], IndexCache] | None = None
        try:
            private_dir(folder)
            self._open_at(os.path.join(folder, name))
        except (OSError, sqlite3.Error, CacheDamaged) as exc:
            self._tmp = tempfile.mkdtemp(prefix=TEMPORARY_PREFIX)
            self.warnings.append(
                f"the index cache folder {folder} cannot be used ({exc}); a temporary one is built for this run"
            )
            self._open_at(os.path.join(self._tmp, name))

    def _open_at(self, path: str) -> None:
        self._release()
        self.path = path
        self._lockfile = path + ".lock"
        held = hold_in_use(path)
        if held is not None:
            self._use = weakref.finalize(self, os.close, held)
        self._prepare()

    def _release(self) -> None:
        if self._use is not None:
            self._use()
            self._use = None

    # ---- the database file -------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this cache's lock (between processes; a sync holds it)."""
        fd = platform.open_nofollow(self._lockfile, os.O_RDWR | os.O_CREAT | platform.O_CLOEXEC, 0o600)
        try:
            platform.lock(fd, wait=True)
            yield
        finally:
            os.close(fd)

    def _prepare(self) -> None:
        """Create the database, or check the one there; a damaged or foreign one is replaced."""
        with self.locked():
            try:
                self._check_or_create()
            except CacheDamaged as exc:
                self._remove_files()
                self.warnings.append(f"the index cache {self.path} was unusable ({exc}); it is built again")
                self._check_or_create()

    def _check_or_create(self) -> None:
        self._check_files()
        fresh = not os.path.exists(self.path)
        if fresh:
            # created 0600 (SQLite gives its -wal and -shm files the same mode)
            os.close(platform.open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | platform.O_CLOEXEC, 0o600))
        try:
            conn = self._connect(_WRITE_CACHE_KIB)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _damage(exc):
                raise
            raise CacheDamaged(str(exc)) from exc
        try:
            try:
                if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                    raise CacheDamaged("cannot use write-ahead logging")
                existing = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not fresh and "meta" not in existing:
                    raise CacheDamaged("not an index cache")
                conn.execute("BEGIN IMMEDIATE")
                for sql in _SCHEMA_SQL:
                    conn.execute(sql)
                if "stamp" not in {row[1] for row in conn.execute("PRAGMA table_info(files)")}:
                    # made before stamps were kept: each file takes the stamp of its next listing
                    conn.execute("ALTER TABLE files ADD COLUMN stamp TEXT")
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                want = {"schema": str(SCHEMA), "repository": self.repo_id, "location": self.location}
                if not meta:
                    conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(want.items()))
                elif meta != want:
                    raise CacheDamaged(f"it describes {meta.get('repository')} at {meta.get('location')}")
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) and not _damage(exc):
                    raise
                raise CacheDamaged(str(exc)) from exc
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            conn.close()

    def _check_files(self) -> None:
        """The database and SQLite's files beside it: regular files of this user, 0600 (a
        folder that was wider before may hold files someone else put there); anything else
        is damage, and the cache is built again."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                st = os.lstat(self.path + suffix)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise CacheDamaged(f"{self.path + suffix} is not a regular file")
            try:
                _own(self.path + suffix, st)
            except OSError as exc:
                raise CacheDamaged(str(exc)) from exc

    def _connect(self, cache_kib: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_SECONDS, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{cache_kib}")
        conn.execute("PRAGMA cell_size_check=ON")
        _temp_files_in(conn, os.path.dirname(self.path))
        return conn

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection the lookups of every thread share, held by this thread until its
        rows are read. One page cache for all: with a connection per thread, a backup's
        workers each filled a page cache of their own once the cache outgrew one (+16 MiB
        of peak memory at 4 M chunks); SQLite runs a lookup in a few microseconds, and the
        workers spend their time hashing and compressing."""
        with self._reading_lock, _translated(self):
            if self._reader is None:
                self._reader = self._connect(_READ_CACHE_KIB)
            yield self._reader

    def reset(self, why: str) -> None:
        """Delete the database and start an empty one (the next sync fills it)."""
        self.close()
        with self.locked():
            self._remove_files()
            self.warnings.append(f"the index cache {self.path} was damaged ({why}); it is built again")
            self._check_or_create()

    def close(self) -> None:
        with self._reading_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(sqlite3.Error):
                reader.close()

    def discard(self) -> None:
        """Close, remove a temporary cache, and leave the cache to others (``vmvault cache``
        may remove it from now on)."""
        self.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._release()

    # ---- sync --------------------------------------------------------------------------

    def sync(
        self,
        listing: Iterable[tuple[bytes, int] | tuple[bytes, int, str]],
        fetch: Callable[[bytes, int], bytes | None],
        *,
        progress: Callable[[int, int], None] | None = None,
        reads: Callable[[], int] | None = None,
    ) -> list[str]:
        """Bring the cache up to date with ``listing`` (every index file's id, listed size and,
        where the storage gives one, stamp: ``ObjectInfo.stamp``; taken now). ``fetch(id,
        size)`` returns a file's verified payload, None when it has vanished, or raises
        IntegrityError (it is called from ``reads()`` threads at once, asked only when there are
        files to read); unreadable files are returned as problems (and tried again by the next
        sync)."""
        listed: dict[bytes, int] = {}
        stamps: dict[bytes, str] = {}
        for file_id, size, *stamp in listing:
            listed[file_id] = size
            # the stamp comes from the storage's listing: a long one (an S3 server may send any
            # ETag) is kept as its digest, so the cache's rows stay small
            text = stamp[0] if stamp else ""
            stamps[file_id] = text if len(text) <= 64 else hashlib.sha256(text.encode(errors="replace")).hexdigest()
        problems: list[str] = []
        with self.locked(), _translated(self):
            conn = self._connect(_WRITE_CACHE_KIB)
            try:
                known = {bytes(r[0]): (int(r[1]), r[2]) for r in conn.execute("SELECT id, size, stamp FROM files")}
                self._mark_present(conn, listed)
                # a live file whose rows were compacted away (it came back) is read again
                again = [bytes(r[0]) for r in conn.execute("SELECT id FROM files WHERE live AND NOT has_rows")]
                # so is one whose size or stamp changed since it was read (written again in storage):
                # its name is the hash of its content, so it reads only as the same content, and
                # then keeps its rows; one that no longer reads is forgotten with them, and reported
                changed = [
                    i
                    for i, (size, stamp) in known.items()
                    if i in listed and i not in again and _changed(size, stamp, listed[i], stamps[i])
                ]
                unreadable = self._read_again(conn, changed, listed, stamps, fetch, problems)
                again += unreadable
                if again:
                    self._forget_files(conn, again)
                for file_id in again:
                    known.pop(file_id, None)
                new = sorted(i for i in listed if i not in known and i not in unreadable)
                self._ingest_many(conn, new, listed, fetch, problems, progress, reads)
                self._mark_present(conn, listed)
                self._take_stamps(conn, stamps)
                self._compact(conn)
            finally:
                conn.close()
        return problems

    def _read_again(
        self,
        conn: sqlite3.Connection,
        changed: list[bytes],
        listed: dict[bytes, int],
        stamps: dict[bytes, str],
        fetch: Callable[[bytes, int], bytes | None],
        problems: list[str],
    ) -> list[bytes]:
        """Read the ``changed`` files again (outside any transaction); record the size and stamp
        of those that still read. Returns those that do not (their problems added)."""
        same: list[tuple[int, str, bytes]] = []
        unreadable: list[bytes] = []
        for file_id in changed:
            try:
                if fetch(file_id, listed[file_id]) is not None:  # verified: the same content
                    same.append((listed[file_id], stamps[file_id], file_id))
            except IntegrityError as exc:
                problems.append(f"{exc} (changed in storage since this host read it)")
                unreadable.append(file_id)
        if same:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("UPDATE files SET size = ?, stamp = ? WHERE id = ?", same)
            self._commit(conn, "read again")
        return unreadable

    def _take_stamps(self, conn: sqlite3.Connection, stamps: dict[bytes, str]) -> None:
        """Files without a stamp (just ingested, or from before stamps) take the listing's."""
        unstamped = [bytes(r[0]) for r in conn.execute("SELECT id FROM files WHERE stamp IS NULL")]
        taken = [(stamps[i], i) for i in unstamped if stamps.get(i)]
        if taken:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("UPDATE files SET stamp = ? WHERE id = ? AND stamp IS NULL", taken)
            self._commit(conn, "stamps")

    def ingest(self, file_id: bytes, payload: bytes | ParsedIndex, size: int = 0) -> None:
        """Add an index file this process has just written (its payload in hand, verified by
        construction, or parsed), so that it need not be downloaded again."""
        parsed = payload if isinstance(payload, ParsedIndex) else parse_index(payload, name=f"index/{file_id.hex()}")
        with self.batch() as batch:
            batch.add(file_id, parsed, size)
            batch.commit("ingest")

    def batch(self, conn: sqlite3.Connection | None = None) -> IngestBatch:
        """An :class:`IngestBatch` on a connection of its own (else on ``conn``, the caller's)."""
        return IngestBatch(self, conn)

    def _commit(self, conn: sqlite3.Connection, what: str) -> None:
        if self.before_commit is not None:
            self.before_commit(what)
        conn.execute("COMMIT")

    def _mark_present(self, conn: sqlite3.Connection, listed: dict[bytes, int]) -> None:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS listed(id BLOB PRIMARY KEY) WITHOUT ROWID")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM temp.listed")
        conn.executemany("INSERT OR IGNORE INTO temp.listed VALUES (?)", ((i,) for i in listed))
        conn.execute("UPDATE files SET present = (id IN (SELECT id FROM temp.listed))")
        conn.execute(_LIVE)
        self._commit(conn, "present")

    def _forget_files(self, conn: sqlite3.Connection, file_ids: Iterable[bytes]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        nos = [
            int(row[0])
            for file_id in file_ids
            if (row := conn.execute("SELECT no FROM files WHERE id = ?", (file_id,)).fetchone()) is not None
        ]
        if nos:
            # their rows too, in one pass over the table (which has no index on ``file``; files
            # are forgotten only when their stored copy changed): the next file may get a number
            marks = ",".join("?" * len(nos))
            conn.execute(f"DELETE FROM blobs WHERE file IN ({marks})", nos)
            conn.execute(f"DELETE FROM supersedes WHERE file IN ({marks})", nos)
            conn.execute(f"DELETE FROM files WHERE no IN ({marks})", nos)
            # what they superseded counts again, as for a reader that never read them
            conn.execute(_LIVE)
        self._commit(conn, "forget")

    def forget(self, file_ids: Iterable[bytes]) -> None:
        """Forget these index files and their rows (their stored copy no longer reads: what this
        cache took from it is not what any other reader sees). The next sync reads them again,
        and reports them while they do not read."""
        wanted = list(file_ids)
        if not wanted:
            return
        with self.locked(), _translated(self), contextlib.closing(self._connect(_WRITE_CACHE_KIB)) as conn:
            try:
                self._forget_files(conn, wanted)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _ingest_many(
        self,
        conn: sqlite3.Connection,
        new: list[bytes],
        listed: dict[bytes, int],
        fetch: Callable[[bytes, int], bytes | None],
        problems: list[str],
        progress: Callable[[int, int], None] | None,
        reads: Callable[[], int] | None = None,
    ) -> None:
        """Ingest ``new`` files: each read (``reads()`` at once) and staged (:class:`IngestBatch`)
        outside any transaction, so other processes' writes are not held up by downloads; every
        ``_BATCH_ROWS`` rows the staged files go in, in one transaction, sorted. Each
        transaction holds whole files.

        An empty cache (a host's first sync, or a rebuild) takes every file in one transaction
        instead, inserted in one sorted pass: batches into a large table of random keys would
        rewrite most of its pages each time."""
        if new:  # (a sync that finds nothing new makes no batch)
            fresh = len(new) > 1 and conn.execute("SELECT NOT EXISTS (SELECT 1 FROM blobs)").fetchone()[0]
            with self.batch(conn) as batch:
                at_once = reads() if reads is not None and len(new) > 1 else 1
                for file_id, parsed in _fetched(new, listed, fetch, problems, progress, at_once):
                    batch.add(file_id, parsed, listed[file_id])
                    if not fresh and batch.rows >= _BATCH_ROWS:
                        batch.commit("files")
                batch.commit("files")
        if progress is not None:
            progress(len(new), len(new))

    def _compact(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        _drop_dead_rows(conn)
        # files gone from storage whose rows are gone too: nothing left to remember
        gone = "SELECT no FROM files WHERE NOT present AND NOT has_rows"
        conn.execute(f"DELETE FROM supersedes WHERE file IN ({gone})")
        conn.execute(f"DELETE FROM files WHERE no IN ({gone})")
        self._commit(conn, "compact")

    # ---- lookups -----------------------------------------------------------------------

    def rows(self, blob_id: bytes) -> list[CachedRow]:
        """Every live row of ``blob_id``, earliest ingested file first."""
        with self._reading() as conn:
            return [CachedRow(bytes(r[0]), *r[1:]) for r in conn.execute(_LOOKUP, (blob_id,))]

    def rows_many(self, blob_ids: Iterable[bytes]) -> dict[bytes, list[CachedRow]]:
        """``rows`` of each of ``blob_ids`` (a blob without live rows is left out), in one
        query per ``_LOOKUP_MANY_IDS`` ids: a restore plans thousands of chunks at a time,
        and a query each cost it a round through SQLite and the GIL per chunk."""
        out: dict[bytes, list[CachedRow]] = {}
        with self._reading() as conn:
            for r in in_parts(conn, _LOOKUP_MANY, blob_ids):
                out.setdefault(bytes(r[0]), []).append(CachedRow(bytes(r[1]), *r[2:]))
        return out

    def ends_many(self, blob_ids: Iterable[bytes]) -> list[tuple[bytes, bytes, int]]:
        """(blob id, pack id, end of the blob in the pack) of each live row of ``blob_ids``: what
        a check for a copy needs, without building rows (a third of ``rows_many``'s time)."""
        with self._reading() as conn:
            return list(in_parts(conn, _ENDS_MANY, blob_ids))

    def contains(self, blob_id: bytes) -> bool:
        with self._reading() as conn:
            return conn.execute(_CONTAINS, (blob_id,)).fetchone() is not None

    def file_id(self, file_no: int) -> bytes | None:
        with self._reading() as conn:
            row = conn.execute("SELECT id FROM files WHERE no = ?", (file_no,)).fetchone()
        return None if row is None else bytes(row[0])

    def pack_count(self) -> int:
        """How many packs the cache has seen (an upper bound of the live ones)."""
        with self._reading() as conn:
            return int(conn.execute("SELECT count(*) FROM packs").fetchone()[0])

    def packs_in_folder(self, folder: int) -> list[tuple[bytes, int, int]]:
        """(pack id, recorded length, end of its last blob) of every pack the cache has seen
        whose id begins with the byte ``folder``: the packs of ``data/<folder as hex>/``."""
        if not 0 <= folder <= 255:
            raise ValueError(f"a folder of data/ is a byte, not {folder}")
        query = "SELECT id, length, end FROM packs WHERE id >= ?"
        bounds: tuple[bytes, ...] = (bytes([folder]),)
        if folder < 255:
            query += " AND id < ?"
            bounds += (bytes([folder + 1]),)
        with self._reading() as conn:
            return [(bytes(r[0]), int(r[1]), int(r[2])) for r in conn.execute(query, bounds)]

    def pack_numbers(self, pack_ids: Iterable[bytes]) -> dict[bytes, int]:
        """The cache's numbers of these packs, those it knows (``rows_digest`` takes them)."""
        with self._reading() as conn:
            return {
                bytes(r[0]): int(r[1])
                for r in in_parts(conn, "SELECT id, no FROM packs WHERE id IN ({marks})", pack_ids)
            }

    def known_locks(self, objects: Iterable[tuple[str, str, float]]) -> dict[str, float]:
        """Of ``objects`` (name, the listing's stamp and time of its version), those this host
        saw locked (``remember_locks``) as that very version: name -> when the lock ends."""
        with self._reading() as conn:
            found: dict[str, float] = {}
            for name, stamp, written in objects:
                row = conn.execute(
                    "SELECT until FROM locks WHERE name = ? AND stamp = ? AND written = ?", (name, stamp, written)
                ).fetchone()
                if row is not None:
                    found[name] = float(row[0])
            return found

    def remember_locks(
        self, locks: Sequence[tuple[str, str, float, float]], *, expired_before: float | None = None
    ) -> None:
        """Record (name, stamp, written, until): the storage holds that version of the object
        under COMPLIANCE retention until ``until``, which nobody can shorten. With
        ``expired_before``, the records of locks that ended before it go too (their objects are
        no longer looked up)."""
        if not locks and expired_before is None:
            return
        with _translated(self), contextlib.closing(self._connect(_WRITE_CACHE_KIB)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?)", locks)
                if expired_before is not None:
                    conn.execute("DELETE FROM locks WHERE until < ?", (expired_before,))
                self._commit(conn, "locks")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def live_files(self) -> list[bytes]:
        """The ids of the live index files, in ingest order."""
        with self._reading() as conn:
            return [bytes(r[0]) for r in conn.execute("SELECT id FROM files WHERE live ORDER BY no")]

    def file_sizes(self) -> dict[bytes, int]:
        """The size of every present index file in storage when it was read (0: not known)."""
        with self._reading() as conn:
            return {bytes(r[0]): int(r[1]) for r in conn.execute("SELECT id, size FROM files WHERE present")}

    def live_files_sized(self) -> list[tuple[bytes, int]]:
        """``live_files`` with the size each had in storage when it was read."""
        with self._reading() as conn:
            return [(bytes(r[0]), int(r[1])) for r in conn.execute("SELECT id, size FROM files WHERE live ORDER BY no")]

    def present_files(self) -> dict[bytes, bool]:
        """Every index file of the last listing the cache ingested: id -> live."""
        with self._reading() as conn:
            rows = conn.execute("SELECT id, live FROM files WHERE present ORDER BY no")
            return {bytes(r[0]): bool(r[1]) for r in rows}

    def iter_live(self) -> Iterator[tuple[bytes, CachedRow]]:
        """Every live row in blob id order (a blob in several packs: several rows)."""
        with _translated(self):
            cur = self._connect(_READ_CACHE_KIB).execute(
                "SELECT b.id, p.id, b.type, b.offset, b.length, b.raw_length, p.length, p.end, b.file FROM blobs b"
                " JOIN files f ON f.no = b.file JOIN packs p ON p.no = b.pack WHERE f.live ORDER BY b.id, b.file"
            )
            try:
                while batch := cur.fetchmany(10_000):
                    for r in batch:
                        yield bytes(r[0]), CachedRow(bytes(r[1]), *r[2:])
            finally:
                cur.connection.close()

    def live_digests(self) -> dict[bytes, tuple[int, int]]:
        """Per live index file, ``rows_digest`` of its rows as this cache holds them: one pass
        over the cache (check and prune compare them with the files themselves)."""
        counts: defaultdict[int, int] = defaultdict(int)
        sums: defaultdict[int, int] = defaultdict(int)
        with _translated(self), contextlib.closing(self._connect(_WRITE_CACHE_KIB)) as conn:
            # a row names its pack by the cache's number, not by id: a join with ``packs`` for
            # every row was a random lookup each in a table larger than the page cache
            cur = conn.execute(
                "SELECT b.file, b.id, b.pack, b.type, b.offset, b.length, b.raw_length FROM blobs b"
                " JOIN files f ON f.no = b.file WHERE f.live"
            )
            # the least Python per row: SQLite gives BLOBs as bytes, so row[1:] is the tuple
            # rows_digest hashes; the sums are reduced to 64 bits once, at the end
            while batch := cur.fetchmany(10_000):
                for row in batch:
                    counts[row[0]] += 1
                    sums[row[0]] += hash(row[1:])
            names = {int(r[0]): bytes(r[1]) for r in conn.execute("SELECT no, id FROM files WHERE live")}
        return {names[no]: (count, sums[no] & _MASK) for no, count in counts.items() if no in names}

    def live_packs(self) -> Iterator[tuple[bytes, int, int]]:
        """(pack id, recorded length, end of its last blob) of every pack a live row names."""
        with _translated(self):
            conn = self._connect(_WRITE_CACHE_KIB)
            try:
                cur = conn.execute(
                    "SELECT id, length, end FROM packs WHERE no IN"
                    " (SELECT b.pack FROM blobs b JOIN files f ON f.no = b.file WHERE f.live) ORDER BY id"
                )
                while batch := cur.fetchmany(10_000):
                    for r in batch:
                        yield bytes(r[0]), int(r[1]), int(r[2])
            finally:
                conn.close()

    def lost_packs(self, conn: sqlite3.Connection, *, tail: int) -> tuple[list[bytes], dict[bytes, int]]:
        """On ``conn`` (from :meth:`scratch`, holding the listing ``s.stored``): the packs live
        rows name that storage lacks, and those it holds too short for their last blob plus
        ``tail`` bytes (id -> stored size); one pass over the live rows, both in id order."""
        missing: list[bytes] = []
        short: dict[bytes, int] = {}
        with _translated(self):
            cur = conn.execute(
                "SELECT p.id, st.size FROM packs p LEFT JOIN s.stored st ON st.id = p.id"
                " WHERE p.no IN (SELECT b.pack FROM blobs b JOIN files f ON f.no = b.file WHERE f.live)"
                " AND (st.size IS NULL OR p.end > st.size - ?) ORDER BY p.id",
                (tail,),
            )
            for pack_id, size in cur:
                if size is None:
                    missing.append(bytes(pack_id))
                else:
                    short[bytes(pack_id)] = int(size)
        return missing, short

    def live_blobs_in(self, conn: sqlite3.Connection, pack_ids: Iterable[bytes]) -> Iterator[bytes]:
        """On ``conn`` (from :meth:`scratch`): the distinct ids of the live rows in these packs."""
        with _translated(self):
            conn.execute("CREATE TABLE IF NOT EXISTS s.chosen(id BLOB PRIMARY KEY) WITHOUT ROWID")
            conn.execute("DELETE FROM s.chosen")
            write_many(conn, "INSERT OR IGNORE INTO s.chosen VALUES (?)", ((p,) for p in pack_ids))
            cur = conn.execute(
                "SELECT DISTINCT b.id FROM s.chosen c JOIN packs p ON p.id = c.id JOIN blobs b ON b.pack = p.no"
                " JOIN files f ON f.no = b.file WHERE f.live"
            )
            while batch := cur.fetchmany(10_000):
                for row in batch:
                    yield bytes(row[0])

    def without_copy(
        self,
        conn: sqlite3.Connection,
        table: str,
        leave_out: Iterable[bytes],
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[list[bytes]]:
        """On ``conn`` (from :meth:`scratch`): the ids of ``table`` (a scratch table whose primary
        key is ``id``) that no live row names outside the packs ``leave_out``, in batches, in id
        order. Both are walked in id order, a 256th of the id space at a time (the
        ``progress(done, 256)`` steps), so each page of the cache is read once, where a lookup
        per id reads pages all over it."""
        absent = (
            f"SELECT n.id FROM {table} n WHERE {{within}} AND NOT EXISTS (SELECT 1 FROM blobs b JOIN files f"
            " ON f.no = b.file WHERE b.id = n.id AND f.live AND b.pack NOT IN (SELECT no FROM s.left_out))"
            " ORDER BY n.id"
        )
        with _translated(self):
            conn.execute("DROP TABLE IF EXISTS s.left_out")
            conn.execute("CREATE TABLE s.left_out(no INTEGER PRIMARY KEY)")
            write_many(
                conn, "INSERT OR IGNORE INTO s.left_out SELECT no FROM packs WHERE id = ?", ((p,) for p in leave_out)
            )
            for first in range(256):
                # by the first byte; the first range also takes an empty id, the last one has no end
                low = bytes([first]) if first else b""
                if first == 255:
                    cur = conn.execute(absent.format(within="n.id >= ?"), (low,))
                else:
                    cur = conn.execute(absent.format(within="n.id >= ? AND n.id < ?"), (low, bytes([first + 1])))
                while batch := cur.fetchmany(_LOOKUP_MANY_IDS):
                    yield [bytes(r[0]) for r in batch]
                if progress is not None:
                    progress(first + 1, 256)

    def totals(self) -> tuple[int, int, int]:
        """(distinct live blobs, distinct live DATA blobs, their plaintext bytes): one pass."""
        with _translated(self), contextlib.closing(self._connect(_WRITE_CACHE_KIB)) as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(type = 1), 0), coalesce(sum(CASE WHEN type = 1 THEN raw END), 0)"
                " FROM (SELECT b.id, min(b.type) type, min(b.raw_length) raw FROM blobs b"
                " JOIN files f ON f.no = b.file WHERE f.live GROUP BY b.id)"
            ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    @contextlib.contextmanager
    def scratch(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own (larger page cache) with a new, empty scratch database
        attached as ``s``, for the working sets of check, prune, repair, stats and copy;
        removed afterwards, and by the next call if the process was killed. SQLite's
        temporary files are made in the same folder (``_temp_files_in``). An SQLite error
        in the ``with`` body (the folder full, above all) is a RepositoryError saying what
        to do (``_scratch_error``)."""
        folder = os.path.dirname(self.path)
        for leftover in os.listdir(folder):
            head, _, rest = leftover.partition(".scratch-")
            pid = rest.split("-", 1)[0]
            if rest and os.path.join(folder, head) == self.path and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, leftover))
        path = f"{self.path}.scratch-{os.getpid()}-{os.urandom(4).hex()}"
        os.close(platform.open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | platform.O_CLOEXEC, 0o600))
        conn = self._connect(_WRITE_CACHE_KIB)
        try:
            with _translated(self):
                conn.execute("ATTACH DATABASE ? AS s", (path,))
                conn.execute("PRAGMA s.journal_mode=OFF")
                conn.execute("PRAGMA s.synchronous=OFF")
                conn.execute(f"PRAGMA s.cache_size=-{_WRITE_CACHE_KIB}")
            try:
                yield conn
            except sqlite3.Error as exc:
                translated = _scratch_error(self, exc)
                if translated is None:
                    raise  # a misuse of SQLite is a bug in vmvault: its traceback is wanted
                raise translated from exc
        finally:
            conn.close()
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)

    def maintenance(self) -> sqlite3.Connection:
        """A connection of its own with a larger page cache, for check and prune (the caller
        closes it)."""
        return self._connect(_WRITE_CACHE_KIB)


class IngestBatch:
    """Index files staged one after another, then put into the cache together, in one
    transaction, their rows in one sorted pass (``commit``). Every ingest goes through one:
    a sync's (in batches of ``_BATCH_ROWS`` rows; all at once into an empty cache), a written
    file's, and those of prune and repair, which write the whole index again, a file at a
    time: ingested one by one into a cache still holding the old rows, each file's rows were
    spread over the whole table (at 40 M chunks ``repair index`` spent most of 1,188 s there).

    Staging writes only temporary tables of the batch's connection (in a temporary file in
    the cache folder, ``_temp_files_in``), never the cache: nothing is locked while files
    are staged, and a process killed before ``commit`` leaves the cache as it was (its next
    sync reads the files from storage). Memory holds no file: rows are staged as they are
    parsed. A commit drops the rows of files the batch supersedes first
    (``_drop_dead_rows``): when no other live file has rows, the table is emptied whole and
    the new rows go into an empty B-tree, as in a first sync."""

    def __init__(self, cache: IndexCache, conn: sqlite3.Connection | None = None) -> None:
        self._cache = cache
        self._own = conn is None
        self._conn = conn
        self._committed = False
        #: rows staged since the last commit
        self.rows = 0
        with _translated(cache):
            if self._conn is None:
                self._conn = cache._connect(_WRITE_CACHE_KIB)
            for sql in _STAGE_SQL:
                self._conn.execute(sql)
            self._clear()

    def __enter__(self) -> IngestBatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("this ingest batch is closed")
        return self._conn

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the batch's own connection (its staged rows go with it); uncommitted files are
        not in the cache."""
        conn, self._conn = self._conn, None
        if conn is not None and self._own:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _clear(self) -> None:
        for table in _STAGE_TABLES:
            self.conn.execute(f"DELETE FROM temp.{table}")
        self.rows = 0
        self._committed = False

    def add(self, file_id: bytes, parsed: ParsedIndex, size: int = 0) -> None:
        """Stage one index file (``size``: its stored size, 0 when not known); a file staged
        already is not staged again."""
        conn = self.conn
        with _translated(self._cache):
            if self._committed:
                self._clear()
            conn.execute("BEGIN")
            try:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO temp.sfiles(id, version, blobs, size) VALUES (?, ?, ?, ?)",
                    (file_id, parsed.version, parsed.blob_count(), size),
                )
                if cur.rowcount:
                    ref = cur.lastrowid
                    conn.executemany(
                        "INSERT INTO temp.ssupersedes VALUES (?, ?)", ((ref, old) for old in parsed.supersedes)
                    )
                    for rec in parsed.records:
                        # a pack listed by several files: its length where one records it, the
                        # end of the last blob any of them lists (no RETURNING: the SQLite 3.34 of
                        # RHEL 9 lacks it)
                        end = rec.blobs_end()
                        found = conn.execute("SELECT ref FROM temp.spacks WHERE id = ?", (rec.pack_id,)).fetchone()
                        if found is None:
                            pack = conn.execute(
                                "INSERT INTO temp.spacks(id, length, end) VALUES (?, ?, ?)",
                                (rec.pack_id, rec.length, end),
                            ).lastrowid
                        else:
                            pack = found[0]
                            conn.execute(
                                "UPDATE temp.spacks SET length = CASE WHEN length THEN length ELSE ? END,"
                                " end = max(end, ?) WHERE ref = ?",
                                (rec.length, end, pack),
                            )
                        conn.executemany(
                            "INSERT INTO temp.srows VALUES (?, ?, ?, ?, ?, ?, ?)",
                            ((i, ref, pack, t, o, n, r) for t, i, o, n, r in rec.rows()),
                        )
                    self.rows += parsed.blob_count()
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def commit(self, what: str = "files") -> None:
        """Put the staged files into the cache in one transaction (those it holds already
        are left as they are): their ``files``, ``supersedes`` and ``packs`` rows, which files
        are live, the rows of files no longer live when ``_drop_dead_rows`` says so, then the
        staged rows sorted. ``what`` names the commit for ``IndexCache.before_commit``."""
        conn = self.conn
        with _translated(self._cache):
            if self._committed or not conn.execute("SELECT EXISTS (SELECT 1 FROM temp.sfiles)").fetchone()[0]:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                staged = conn.execute("SELECT ref, id, version, blobs, size FROM temp.sfiles ORDER BY ref").fetchall()
                for ref, file_id, version, blobs, size in staged:
                    if conn.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone() is None:
                        no = conn.execute(
                            "INSERT INTO files(id, present, live, version, blobs, has_rows, size)"
                            " VALUES (?, 1, 0, ?, ?, 1, ?)",
                            (file_id, version, blobs, size),
                        ).lastrowid
                        conn.execute("UPDATE temp.sfiles SET no = ? WHERE ref = ?", (no, ref))
                conn.execute(
                    "INSERT OR IGNORE INTO supersedes SELECT f.no, s.old FROM temp.ssupersedes s"
                    " JOIN temp.sfiles f ON f.ref = s.ref WHERE f.no IS NOT NULL"
                )
                # packs the cache knows: their length where it had none, the end of their last blob
                # (no UPDATE ... FROM: SQLite 3.31 of Ubuntu 20.04 lacks it)
                length, end = (f"(SELECT s.{c} FROM temp.spacks s WHERE s.id = packs.id)" for c in ("length", "end"))
                conn.execute(
                    f"UPDATE packs SET length = CASE WHEN length THEN length ELSE {length} END, end = max(end, {end})"
                    " WHERE id IN (SELECT id FROM temp.spacks)"
                )
                conn.execute("INSERT OR IGNORE INTO packs(id, length, end) SELECT id, length, end FROM temp.spacks")
                conn.execute("UPDATE temp.spacks SET no = (SELECT no FROM packs WHERE packs.id = spacks.id)")
                # new files are present (listed now, or written now); they may supersede others
                conn.execute(_LIVE)
                _drop_dead_rows(conn, new="SELECT no FROM temp.sfiles WHERE no IS NOT NULL")
                # sorted, the rows go into the B-tree leaf after leaf
                conn.execute(
                    "INSERT OR IGNORE INTO blobs SELECT r.id, f.no, p.no, r.type, r.offset, r.length, r.raw_length"
                    " FROM temp.srows r JOIN temp.sfiles f ON f.ref = r.file JOIN temp.spacks p ON p.ref = r.pack"
                    " WHERE f.no IS NOT NULL ORDER BY r.id, f.no, p.no"
                )
                self._cache._commit(conn, what)
                self._committed = True
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def staged_packs(self, pack_ids: Iterable[bytes]) -> set[bytes]:
        """Which of ``pack_ids`` the files staged (or committed last) list."""
        with _translated(self._cache):
            return {
                p
                for p in pack_ids
                if self.conn.execute("SELECT 1 FROM temp.spacks WHERE id = ?", (p,)).fetchone() is not None
            }


_STAGE_TABLES = ("sfiles", "ssupersedes", "spacks", "srows")
_STAGE_SQL = (
    "CREATE TEMP TABLE IF NOT EXISTS sfiles(ref INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE,"
    " version INTEGER NOT NULL, blobs INTEGER NOT NULL, size INTEGER NOT NULL, no INTEGER)",
    "CREATE TEMP TABLE IF NOT EXISTS ssupersedes(ref INTEGER NOT NULL, old BLOB NOT NULL)",
    "CREATE TEMP TABLE IF NOT EXISTS spacks(ref INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, length INTEGER NOT NULL,"
    " end INTEGER NOT NULL, no INTEGER)",
    "CREATE TEMP TABLE IF NOT EXISTS srows(id BLOB, file INTEGER, pack INTEGER, type INTEGER, offset INTEGER,"
    " length INTEGER, raw_length INTEGER)",
)


def _drop_dead_rows(conn: sqlite3.Connection, new: str = "SELECT NULL WHERE 0") -> None:
    """In the caller's transaction: delete the rows of files no longer live once there are
    ``_COMPACT_MIN`` of them and half as many as live ones (``new``: a query of the numbers
    of files whose rows are about to be inserted, counted as live). When no live file other
    than those has rows, every row is dead: the table is emptied whole, which SQLite does
    page by page without reading a row, rather than searched row by row."""
    dead, live = conn.execute(
        "SELECT coalesce(sum(CASE WHEN NOT live AND has_rows THEN blobs END), 0),"
        " coalesce(sum(CASE WHEN live THEN blobs END), 0) FROM files"
    ).fetchone()
    if dead < _COMPACT_MIN or dead * 2 < live:
        return
    if conn.execute(
        f"SELECT NOT EXISTS (SELECT 1 FROM files WHERE live AND has_rows AND no NOT IN ({new}))"
    ).fetchone()[0]:
        conn.execute("DELETE FROM blobs")
    else:
        conn.execute("DELETE FROM blobs WHERE file IN (SELECT no FROM files WHERE NOT live AND has_rows)")
    conn.execute("UPDATE files SET has_rows = 0 WHERE NOT live")


def in_parts(conn: sqlite3.Connection, sql: str, ids: Iterable[bytes]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``sql`` (its ``{marks}`` standing for a list of ids) for ``ids``, repeats
    left out, asked ``_LOOKUP_MANY_IDS`` at a time."""
    wanted = list(dict.fromkeys(ids))
    for start in range(0, len(wanted), _LOOKUP_MANY_IDS):
        part = wanted[start : start + _LOOKUP_MANY_IDS]
        yield from conn.execute(sql.format(marks=",".join("?" * len(part))), part)


_MASK = (1 << 64) - 1

_temp_lock = threading.Lock()
_temp_folder: str | None = None


def _temp_files_in(conn: sqlite3.Connection, folder: str) -> None:
    """SQLite's temporary files (the sorts of check and prune, hundreds of MiB at 4 M chunks;
    the rows a first sync stages) go to the cache folder, beside the scratch databases, not
    to /var/tmp or /tmp (often a small RAM disk): the folder of the first cache the process
    opens, unless ``SQLITE_TMPDIR`` says where. SQLite reads that variable when it starts,
    which ``import sqlite3`` does, so only the (deprecated) ``temp_store_directory`` pragma
    can still choose. It is set once and never changed: SQLite frees the previous value,
    which another thread may be reading."""
    global _temp_folder
    with _temp_lock:
        if _temp_folder is not None or os.environ.get("SQLITE_TMPDIR"):
            return
        _temp_folder = folder
    conn.execute("PRAGMA temp_store_directory = '" + folder.replace("'", "''") + "'")


def _changed(size: int, stamp: str | None, listed_size: int, listed_stamp: str) -> bool:
    """Whether a file's listing differs from when it was read (0 and None: not recorded; "":
    the storage gives no stamp)."""
    return bool(size and listed_size != size) or bool(stamp and listed_stamp and listed_stamp != stamp)


def _fetched(
    new: list[bytes],
    listed: dict[bytes, int],
    fetch: Callable[[bytes, int], bytes | None],
    problems: list[str],
    progress: Callable[[int, int], None] | None,
    reads: int,
) -> Iterator[tuple[bytes, ParsedIndex]]:
    """Each index file of ``new``, fetched (``reads`` at once) and parsed one at a time, in
    order (progress before each); one deleted by a prune since the listing is skipped, a damaged
    one is added to ``problems``."""

    def read(file_id: bytes) -> bytes | IntegrityError | None:
        try:
            return fetch(file_id, listed[file_id])
        except IntegrityError as exc:
            return exc

    # read ``reads`` at once ahead of the parsing (a round trip each from remote storage), at
    # most PACKS_AHEAD bytes of them; parsed here, one at a time, in the order given
    files = ((f, index_file_weight(listed[f])) for f in new)
    for n, (file_id, payload) in enumerate(ahead(files, read, workers=reads, max_weight=PACKS_AHEAD)):
        if progress is not None:
            progress(n, len(new))
        if payload is None:
            continue  # deleted by a prune since the listing
        try:
            if isinstance(payload, IntegrityError):
                raise payload
            parsed = parse_index(payload, name=f"index/{file_id.hex()}")
        except IntegrityError as exc:
            problems.append(str(exc))
            continue
        yield file_id, parsed


def rows_digest(parsed: ParsedIndex, numbers: dict[bytes, int]) -> tuple[int, int] | None:
    """(rows, a sum of their hashes) of what an index file says, as ``live_digests`` computes
    it from a cache's rows: equal unless the rows differ from the file. ``numbers``: the
    cache's numbers of the file's packs (``IndexCache.pack_numbers``); a row names its pack by
    that number, as the cache's rows do, so a row that names another pack, or a pack the cache
    numbers otherwise, changes the sum (a pack the cache does not know is hashed as None, which
    no row of the cache names). Python's hash is seeded afresh in each process, so rows cannot
    be chosen to collide. None for a file that lists a pack twice or a blob twice in a pack
    (the cache keeps one row of each: not comparable)."""
    count = total = 0
    packs: set[bytes] = set()
    for rec in parsed.records:
        if rec.pack_id in packs:
            return None
        packs.add(rec.pack_id)
        pack_no = numbers.get(rec.pack_id)
        ids: set[bytes] = set()
        for blob_type, blob_id, offset, length, raw_length in rec.rows():
            if blob_id in ids:
                return None
            ids.add(blob_id)
            count += 1
            total += hash((blob_id, pack_no, blob_type, offset, length, raw_length))
    return count, total & _MASK


class Grouped:
    """Writes of one connection grouped into transactions of ``every`` statements (call
    ``step`` before each): in autocommit mode every statement is a transaction of its own,
    and check and prune make millions. The caller's ``with`` commits the last group (rolls it
    back on an exception)."""

    def __init__(self, conn: sqlite3.Connection, every: int = 20_000) -> None:
        self.conn = conn
        self.every = every
        self.n = 0

    def step(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")
            self.n = 0
        self.n += 1
        if self.n > self.every:
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN")
            self.n = 1

    def __enter__(self) -> Grouped:
        return self

    def __exit__(self, kind: object, *_rest: object) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")


class ScratchRows:
    """Blob ids appended to a new table of a scratch database (``IndexCache.scratch``) in
    batches of ``every``."""

    def __init__(self, db: sqlite3.Connection, table: str, every: int = 10_000) -> None:
        self.db = db
        self.table = table
        self.every = every
        self.batch: list[tuple[bytes]] = []
        db.execute(f"CREATE TABLE {table}(id BLOB NOT NULL)")

    def add(self, blob_id: bytes) -> None:
        self.batch.append((blob_id,))
        if len(self.batch) >= self.every:
            self.flush()

    def update(self, ids: Iterable[bytes]) -> None:
        for blob_id in ids:
            self.add(blob_id)

    def add_packed(self, raw: bytes, size: int, leave_out: Sequence[bytes] = ()) -> None:
        """The ids packed back to back in ``raw`` (``size`` bytes each; an index block), but
        those in ``leave_out``, split by SQLite: a third of the time of a tuple per id."""
        if not raw:
            return
        skip = f" WHERE id NOT IN ({','.join('?' * len(leave_out))})" if leave_out else ""
        self.db.execute(
            f"INSERT INTO {self.table} SELECT id FROM (WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1"
            f" FROM k WHERE i + 1 < ?) SELECT substr(?, i * ? + 1, ?) AS id FROM k){skip}",
            (-(-len(raw) // size), raw, size, size, *leave_out),
        )

    def flush(self) -> None:
        write_many(self.db, f"INSERT INTO {self.table} VALUES (?)", self.batch)
        self.batch = []


class ScratchMap:
    """Blob ids mapped to blob ids in a new table of a scratch database (``IndexCache.scratch``):
    a dict whose entries live on disk, for pairings that grow with the data (``copy``'s source
    id -> target id). A later ``put`` of a key replaces the earlier value, as a dict's does.
    Use it from one thread."""

    def __init__(self, db: sqlite3.Connection, table: str) -> None:
        self.db = db
        self.table = table
        db.execute(f"CREATE TABLE {table}(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def put(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        write_many(self.db, f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?)", pairs)

    def get(self, key: bytes) -> bytes | None:
        row = self.db.execute(f"SELECT v FROM {self.table} WHERE k = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """The entries of those ``keys`` that have one, asked ``_LOOKUP_MANY_IDS`` at a time."""
        sql = f"SELECT k, v FROM {self.table} WHERE k IN ({{marks}})"
        return {bytes(k): bytes(v) for k, v in in_parts(self.db, sql, keys)}


def write_many(conn: sqlite3.Connection, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
    """``executemany`` in one transaction (the caller's, when one is open)."""
    if conn.in_transaction:
        conn.executemany(sql, rows)
        return
    conn.execute("BEGIN")
    try:
        conn.executemany(sql, rows)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: what SQLite's messages about a damaged database say
_DAMAGE_WORDS = re.compile("malformed|not a database|corrupt|disk image", re.IGNORECASE)


def _damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the database itself is damaged (not busy, not full)."""
    return not isinstance(exc, sqlite3.OperationalError) or bool(_DAMAGE_WORDS.search(str(exc)))


def _scratch_error(cache: IndexCache, exc: sqlite3.Error) -> RepositoryError | None:
    """What an SQLite error while a scratch database is in use means to the user: a full
    folder (the usual one; the command stops as a kill would, which each of them survives),
    or a damaged cache, which holds nothing that cannot be read again from the repository.
    None for a misuse of SQLite (a bug, not the user's to solve)."""
    if isinstance(exc, sqlite3.DatabaseError) and _DAMAGE_WORDS.search(str(exc)):
        return RepositoryError(
            f"the index cache {cache.path} or its scratch database is damaged ({exc}); the cache holds only"
            " what is read again from the repository: remove that file and run the command again"
        )
    if isinstance(exc, sqlite3.OperationalError):
        return RepositoryError(f"the scratch database in {os.path.dirname(cache.path)}: {exc}{_room_hint(exc)}")
    return None


def _room_hint(exc: sqlite3.Error) -> str:
    """What to do when SQLite's error says the folder is full (a full tmpfs says "disk I/O
    error" as often as "database or disk is full")."""
    if not any(w in str(exc).lower() for w in ("full", "disk i/o")):
        return ""
    return (
        ". That folder holds this host's index cache (about 70 bytes a chunk of the repository) and"
        " the working sets of check, prune, repair, stats and copy (up to about 140 bytes a chunk more"
        " while they run): free space there or set VMVAULT_CACHE_DIR to a folder with room, then run"
        " the command again"
    )


@contextlib.contextmanager
def _translated(cache: IndexCache) -> Iterator[None]:
    """SQLite's errors as vmvault's: damage is CacheDamaged (the caller rebuilds), anything
    else (a full disk, a lock held too long) a RepositoryError naming the cache."""
    try:
        yield
    except sqlite3.Error as exc:
        if _damage(exc):
            raise CacheDamaged(str(exc)) from exc
        raise RepositoryError(f"the index cache {cache.path}: {exc}{_room_hint(exc)}") from exc

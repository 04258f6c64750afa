"""This host's caches, listed and removed (``vmvault cache``; sections 12.3, 12.8 and 12.11).

The cache folder (``index_cache.cache_root``) holds, per repository and storage location, an
index cache (``index/<name>.sqlite`` and SQLite's files beside it), copies of snapshots
(``snapshots/<name>/``) and copies of index blocks (``blocks/<name>/``), where ``<name>`` is
``<repository id>-<16 hex digits of SHA-256(location)>``. Each is a cache: removed, it costs
the time and the reads to build it again, nothing else. A host that backed up to many
repositories, or to one that is gone, keeps their caches until they are removed: the index
cache alone is about 70 bytes a chunk (24.5 GiB at 400 M chunks).

An entry is removed only while no process uses it: :func:`index_cache.lock_unused` takes the
exclusive lock that every process holding the index cache open shares
(:func:`index_cache.hold_in_use`), and keeps it while the files go, so no command opens the
cache half removed. The snapshots' and blocks' copies need no lock: a reader whose folder
disappears reads the storage (their failures cost reads only). Entries are found by name
only: nothing in the cache folder but names of the forms above is ever removed, no link is
followed (a link where a folder should be is removed as the link it is), and the folder must
be this user's (``index_cache.private_dir``).

Temporary caches (``$TMPDIR/vmvault-index-*``, made when the cache folder cannot be used and
removed when the command ends) are left behind by a killed command: :func:`leftovers` finds
those of this user that no process holds and nothing changed for ten minutes (a command makes
the folder a moment before it locks the cache in it).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from vmvault import platform
from vmvault.repo.index_cache import TEMPORARY_PREFIX, USE_SUFFIX, cache_root, lock_unused, private_dir

__all__ = [
    "CLEAN_AFTER_DAYS",
    "KINDS",
    "CacheEntry",
    "entries",
    "leftovers",
    "remove_entry",
    "remove_leftover",
    "unused_since",
]

#: ``vmvault cache clean`` removes caches unused for this many days unless told otherwise
CLEAN_AFTER_DAYS: Final[int] = 30

#: the kinds of cache each entry may have, in the order they are listed
KINDS: Final[tuple[str, ...]] = ("index", "snapshots", "blocks")

#: an entry's name: the repository id (32 hex digits; other lengths are accepted, as a
#: repository made by another version may have) and the location's hash
_NAME = re.compile(r"([0-9a-f]{8,64})-([0-9a-f]{16})")

#: the files of an index cache beside ``<name>.sqlite``: SQLite's, the sync lock, the use lock
#: (last), and scratch databases of check, prune, repair and copy (``.scratch-<pid>-<hex>``)
_INDEX_SUFFIXES: Final[tuple[str, ...]] = ("", "-wal", "-shm", "-journal", ".lock")
#: seconds a temporary cache folder is left alone after its last change: a command makes it,
#: then locks the cache in it (``hold_in_use``), a moment later
_STARTING: Final[float] = 600.0
_SCRATCH = re.compile(r"\.scratch-\d+-[0-9a-f]+(-journal|-wal|-shm)?")


@dataclass
class CacheEntry:
    """One repository's caches at one location."""

    #: ``<repository id>-<16 hex digits of SHA-256(location)>``
    name: str
    repository: str
    #: the location the index cache records (None: no index cache, or it cannot be read)
    location: str | None = None
    #: bytes per kind (``KINDS``), only the kinds present
    sizes: dict[str, int] = field(default_factory=dict)
    #: the newest modification time among its files (POSIX seconds): their last use
    last_used: float = 0.0
    #: whether a process has its index cache open now (None: cannot tell, no locks there)
    in_use: bool | None = False

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def public(self) -> dict[str, object]:
        """The entry as ``--json`` prints it."""
        return {
            "name": self.name,
            "repository": self.repository,
            "location": self.location,
            "bytes": self.total,
            "sizes": {kind: self.sizes[kind] for kind in KINDS if kind in self.sizes},
            "last_used": self.last_used,
            "in_use": self.in_use,
        }


def entries(root: str | None = None) -> list[CacheEntry]:
    """Every entry in the cache folder ``root`` (default: ``cache_root()``), most recently used
    first. A cache folder that does not exist holds none; one that is not this user's folder
    is an ``OSError``."""
    root = root or cache_root()
    found: dict[str, CacheEntry] = {}
    if not os.path.lexists(root):
        return []
    _check_root(root)
    index_folder = os.path.join(root, "index")
    listed = _listing(index_folder)
    for kind in KINDS:
        for name, path, st in _names_in(os.path.join(root, kind), ".sqlite" if kind == "index" else ""):
            entry = found.get(name)
            if entry is None:
                entry = found[name] = CacheEntry(name, name.split("-")[0])
            size, newest = _index_measure(index_folder, name, st, listed) if kind == "index" else _measure(path, st)
            entry.sizes[kind] = entry.sizes.get(kind, 0) + size
            entry.last_used = max(entry.last_used, newest)
    for entry in found.values():
        if "index" in entry.sizes:
            db = os.path.join(index_folder, entry.name + ".sqlite")
            entry.location = _location(db)
            entry.in_use = _in_use(db)
    return sorted(found.values(), key=lambda e: (-e.last_used, e.name))


def unused_since(cutoff: float, root: str | None = None) -> tuple[int, int]:
    """How many index caches in ``root`` no process used since ``cutoff`` (POSIX seconds), and
    their bytes: a look at the index folder alone (its files' times and sizes), cheap enough
    for every command (``vmvault cache list`` measures everything)."""
    index_folder = os.path.join(root or cache_root(), "index")
    listed = _listing(index_folder)
    count = size = 0
    for name, _path, st in _names_in(index_folder, ".sqlite"):
        total, newest = _index_measure(index_folder, name, st, listed)
        if newest < cutoff:
            count, size = count + 1, size + total
    return count, size


def remove_entry(name: str, root: str | None = None) -> bool:
    """Remove the entry ``name`` from the cache folder ``root``: False, and nothing removed,
    while a process uses it (or where the lock cannot be had). ``OSError`` for a file that
    cannot be removed (what was removed before it stays removed: each is a cache)."""
    root = root or cache_root()
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not the name of a cache entry")
    _check_root(root)
    index_folder = os.path.join(root, "index")
    db = os.path.join(index_folder, name + ".sqlite")
    held: int | None = None
    if os.path.isdir(index_folder) and not os.path.islink(index_folder):
        try:
            held = lock_unused(db)
        except OSError:
            held = None
        if held is None:
            return False
    try:
        if held is not None:
            try:
                os.unlink(db)
            except FileNotFoundError:
                pass
            except PermissionError:
                if platform.WINDOWS:  # pragma: no cover - open there, which Windows does not delete
                    return False
                raise
            for path in _related(index_folder, name, use=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for kind in KINDS[1:]:
            _remove_tree(os.path.join(root, kind, name))
        if held is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(db + USE_SUFFIX)
    finally:
        if held is not None:
            os.close(held)
    return True


def leftovers(folder: str | None = None) -> list[tuple[str, int, float]]:
    """Temporary caches of this user in ``folder`` (default: the system's temporary folder)
    that no process holds: (path, bytes, newest modification time) each."""
    folder = folder or tempfile.gettempdir()
    out = []
    uid = platform.current_uid()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TEMPORARY_PREFIX)]
    except OSError:
        return []
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        if any(_in_use(db) is not False for db in _databases(path)):
            continue
        size, newest = _measure(path, st)
        if time.time() - newest < _STARTING:
            continue  # made a moment ago: a command may not hold it yet
        out.append((path, size, newest))
    return sorted(out)


def remove_leftover(path: str) -> bool:
    """Remove the temporary cache ``path`` (from :func:`leftovers`) unless a process took it
    meanwhile: False then."""
    held = []
    try:
        for db in _databases(path):
            fd = lock_unused(db)
            if fd is None:
                return False
            held.append(fd)
        _remove_tree(path)
    except OSError:
        return False
    finally:
        for fd in held:
            os.close(fd)
    return True


# ------------------------------------------------------------------------------- helpers


def _check_root(root: str) -> None:
    """The cache folder must be this user's real folder (``private_dir``: a link, or a folder
    of another user, who could make this host remove what it names, is refused)."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{root} is not a folder")
    private_dir(root)


def _names_in(folder: str, suffix: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """The entries of one kind in ``folder``: (entry name, path, ``lstat``) of each item named
    ``<name><suffix>`` (``.sqlite`` files in ``index/``, folders in ``snapshots/`` and
    ``blocks/``; a link or a file where a folder should be is listed as itself, so that
    removing it removes only it). A folder that is a link holds none."""
    if os.path.islink(folder):
        return
    try:
        with os.scandir(folder) as it:
            listed = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return
    for item in listed:
        name = item.name.removesuffix(suffix) if suffix else item.name
        if (suffix and name == item.name) or not _NAME.fullmatch(name):
            continue
        with contextlib.suppress(OSError):
            yield name, item.path, item.stat(follow_symlinks=False)


def _measure(path: str, st: os.stat_result) -> tuple[int, float]:
    """Bytes allocated under ``path`` (a file, or a folder walked without following links) and
    the newest modification time among them."""
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_mtime
    size, newest = 0, st.st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            with contextlib.suppress(OSError):
                child = os.lstat(os.path.join(dirpath, name))
                newest = max(newest, child.st_mtime)
                if stat.S_ISREG(child.st_mode):
                    size += child.st_size
    return size, newest


def _index_measure(index_folder: str, name: str, st: os.stat_result, listed: list[str]) -> tuple[int, float]:
    """The bytes of the index cache ``name`` (its database, whose ``lstat`` is ``st``, and the
    files beside it) and its last use: the newest of their modification times but ``-shm``'s,
    which SQLite's readers write (a look is no use)."""
    size, newest = st.st_size, st.st_mtime
    for related in _related(index_folder, name, listed=listed):
        with contextlib.suppress(OSError):
            other = os.lstat(related)
            size += other.st_size if stat.S_ISREG(other.st_mode) else 0
            if not related.endswith("-shm"):
                newest = max(newest, other.st_mtime)
    return size, newest


def _related(index_folder: str, name: str, *, use: bool = True, listed: list[str] | None = None) -> list[str]:
    """The files of the index cache ``name`` other than ``<name>.sqlite``: SQLite's, the sync
    lock, the use lock (unless not ``use``) and scratch databases. ``listed``: the folder's
    names, when the caller listed it already (one listing for every entry)."""
    base = name + ".sqlite"
    suffixes = _INDEX_SUFFIXES[1:] + ((USE_SUFFIX,) if use else ())
    if listed is None:
        try:
            listed = os.listdir(index_folder)
        except OSError:
            listed = []
    present = set(listed)
    out = [base + s for s in suffixes if base + s in present]
    out += [item for item in listed if item.startswith(base) and _SCRATCH.fullmatch(item[len(base) :])]
    return [os.path.join(index_folder, item) for item in out]


def _listing(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _databases(folder: str) -> list[str]:
    """The index caches in a temporary cache folder: each ``<name>.sqlite`` or its use lock
    alone (a process holds the lock before it makes the database)."""
    with contextlib.suppress(OSError):
        names = {n.removesuffix(USE_SUFFIX) for n in os.listdir(folder)}
        return sorted(os.path.join(folder, n) for n in names if n.endswith(".sqlite"))
    return []


def _location(db: str) -> str | None:
    """The location the index cache ``db`` records in its ``meta`` table, read from the file
    alone (``immutable``: SQLite then makes no ``-wal`` or ``-shm`` file and touches none, whose
    times are the cache's last use). None when it cannot be read: damaged, not an index cache,
    or new and in use, its first rows still in the write-ahead log only."""
    try:
        st = os.lstat(db)
        if not stat.S_ISREG(st.st_mode):
            return None
        uri = pathlib.Path(db).absolute().as_uri() + "?mode=ro&immutable=1"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'location'").fetchone()
    except (OSError, sqlite3.Error):
        return None
    return str(row[0]) if row else None


def _in_use(db: str) -> bool | None:
    """Whether a process holds the index cache ``db`` now (None: no locks there to tell)."""
    try:
        fd = lock_unused(db, create=False)
    except FileNotFoundError:
        return False  # never held by a process since ``.use`` files exist
    except OSError:
        return None
    if fd is None:
        return True
    os.close(fd)
    return False


def _remove_tree(path: str) -> None:
    """Remove ``path``: a folder with what is in it (links removed, never followed), or a
    file or link; nothing when it is gone. A copy written into it meanwhile by a process
    that still had it open is removed with a second pass."""
    for attempt in range(2):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt:
                raise

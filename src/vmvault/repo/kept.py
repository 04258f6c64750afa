"""This host's copies of a repository's objects that never change, sealed exactly as stored
(sections 12.8 and 12.11).

:class:`KeptCopies` is a folder of such copies, one file per object named by its id, in
``<cache folder>/<kind>/<repository id>-<location hash>/``: the snapshots
(repo/snapshot_cache.py) and the index blocks (:class:`KeptBlocks`). A copy saves a read,
never a check: its reader opens it as it opens the storage's copy (envelope authenticated,
content compared with the id) and discards one that fails. The folder is 0700 and this
user's (``index_cache.private_dir``); no file in it is opened through a link, and anything
but a regular file of at most the kind's size is no copy.

No copy is written into a file system with less than ``LEAVE_FREE`` bytes free: the index
cache in the same folder needs the room more.

Crash safety: a copy is written to a temporary name and renamed into place, without an fsync:
a copy cut short by a crash fails its check and is read again. Several processes may share
the folder: each rename replaces the same object. Failures of the folder only cost reads: it
then stays out of the way, and no method raises for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Sequence

from vmvault import platform
from vmvault.errors import ConfigError
from vmvault.repo._layout import ID_SIZE
from vmvault.repo._limits import ENVELOPE_OVERHEAD, MAX_INDEX_SPAN
from vmvault.repo.index_cache import cache_root, private_dir
from vmvault.repo.names import is_hex_id

__all__ = ["BLOCKS_KEPT", "BLOCKS_SETTING", "KeptBlocks", "KeptCopies", "blocks_limit"]

_READ_FLAGS = os.O_RDONLY | platform.O_NONBLOCK | platform.O_CLOEXEC | platform.O_BINARY
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | platform.O_CLOEXEC | platform.O_BINARY
_TEMPORARY = ".tmp-"

#: the bytes of index blocks kept per repository and location: the blocks of 8 TiB of disks
#: (128 KiB each per GiB), the least recently used deleted past it
BLOCKS_KEPT = 1 << 30

#: the environment variable that sets another limit than ``BLOCKS_KEPT`` (``blocks_limit``)
BLOCKS_SETTING = "VMVAULT_CACHE_BLOCKS"

_SIZE = re.compile(r"(\d{1,15})\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def blocks_limit() -> int:
    """The bytes of index blocks to keep per repository and location: ``$VMVAULT_CACHE_BLOCKS``
    (bytes, or with K, M, G or T: powers of 1024; 0 keeps none), else ``BLOCKS_KEPT``. A value
    that is no size is a ``ConfigError``."""
    text = os.environ.get(BLOCKS_SETTING, "").strip()
    if not text:
        return BLOCKS_KEPT
    found = _SIZE.fullmatch(text)
    if found is None:
        raise ConfigError(f"{BLOCKS_SETTING}={text!r} is no size (bytes, or with K, M, G or T, e.g. 4G; 0 keeps none)")
    return int(found[1]) << _SHIFT[found[2].upper()]


#: room a copy leaves free in the cache folder's file system: the index cache and the scratch
#: databases of check, prune and copy need it more (a copy only saves a read)
LEAVE_FREE = 256 << 20


class KeptCopies:
    """Sealed copies of one repository's objects of one kind, at one location (module
    docstring). Every method is safe from any thread and never raises for the folder's own
    failures. Copies are named by their objects' ids (64 hex digits, ``names.is_hex_id``: no
    other name is ever a path here). A subclass names its ``kind``, the largest copy it keeps
    (``max_size``) and, with ``limit``, the bytes it keeps at most: then a read marks a copy as
    used and a write past the limit deletes the least recently used."""

    kind = "objects"
    max_size = 0
    limit: int | None = None

    def __init__(self, repo_id: str, location: str, *, root: str | None = None, enabled: bool = True) -> None:
        name = f"{repo_id}-{hashlib.sha256(location.encode()).hexdigest()[:16]}"
        parent = os.path.join(root or cache_root(), self.kind)
        #: the folder of copies; None: nothing is kept (disabled, or the folder is unusable)
        self.folder: str | None = None
        self._lock = threading.Lock()
        #: the bytes in the folder, as last counted and since added (limited kinds)
        self._held: int | None = None
        if enabled:
            try:
                private_dir(parent)
                private_dir(os.path.join(parent, name))
                self.folder = os.path.join(parent, name)
            except OSError:
                pass  # every object is read from the storage

    def get(self, name: str) -> bytes | None:
        """The sealed copy kept as ``name``, not yet checked (a copy read short fails its
        check); None when there is none (or it is not a regular file of at most ``max_size``
        bytes)."""
        if self.folder is None or not is_hex_id(name):
            return None
        try:
            fd = platform.open_nofollow(os.path.join(self.folder, name), _READ_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_size:
                return None
            data = platform.pread(fd, st.st_size, 0)
            if self.limit is not None and os.utime in os.supports_fd:
                os.utime(fd)  # used now: the last to go
            return data
        except OSError:
            return None
        finally:
            os.close(fd)

    def put(self, name: str, sealed: bytes | Sequence[bytes]) -> None:
        """Keep ``sealed`` (bytes, or the parts of an envelope in order) as ``name`` (best
        effort)."""
        parts = [sealed] if isinstance(sealed, bytes | bytearray | memoryview) else list(sealed)
        size = sum(len(p) for p in parts)
        if self.folder is None or not is_hex_id(name) or size > self.max_size:
            return
        try:
            if shutil.disk_usage(self.folder).free < LEAVE_FREE + size:
                return
        except OSError:
            return
        path = os.path.join(self.folder, name)
        tmp = f"{path}{_TEMPORARY}{secrets.token_hex(6)}"
        try:
            fd = platform.open_nofollow(tmp, _WRITE_FLAGS, 0o600)
        except OSError:
            return
        try:
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view[: platform.WRITE_SLICE]) :]
            finally:
                os.close(fd)
            platform.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        if self.limit is not None:
            self._added(size)

    def discard(self, name: str) -> None:
        """Forget the copy of ``name`` (it failed its check)."""
        if self.folder is not None and is_hex_id(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, name))

    def keep_only(self, names: set[str]) -> None:
        """Delete the copies of objects not in ``names`` (the storage's listing) and temporary
        files left by an interrupted ``put``."""
        if self.folder is None:
            return
        try:
            found = os.listdir(self.folder)
        except OSError:
            return
        for name in found:
            if name not in names:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.folder, name))

    def _added(self, size: int) -> None:
        assert self.limit is not None
        with self._lock:
            if self._held is None:
                self._held = sum(size for _name, size, _used in self._entries())
            else:
                self._held += size
            if self._held > self.limit:
                self._held = self._trim(self.limit * 3 // 4)

    def _entries(self) -> list[tuple[str, int, float]]:
        """(name, size, last use) of each regular file in the folder."""
        out: list[tuple[str, int, float]] = []
        if self.folder is None:
            return out
        with contextlib.suppress(OSError), os.scandir(self.folder) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        out.append((entry.name, st.st_size, st.st_mtime))
        return out

    def _trim(self, keep: int) -> int:
        """Delete the least recently used copies (and temporary files of interrupted writes,
        first) until at most ``keep`` bytes are left; returns the bytes left."""
        assert self.folder is not None
        entries = sorted(self._entries(), key=lambda e: (_TEMPORARY not in e[0], e[2]))
        held = sum(size for _name, size, _used in entries)
        for name, size, _used in entries:
            if held <= keep:
                break
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, name))
                held -= size
        return held


class KeptBlocks(KeptCopies):
    """This host's copies of a repository's index blocks (INDEX blobs), named by their ids in
    hex, ``limit`` bytes at most (``blocks_limit()`` unless given; section 12.11)."""

    kind = "blocks"
    max_size = MAX_INDEX_SPAN * ID_SIZE + ENVELOPE_OVERHEAD
    limit = BLOCKS_KEPT

    def __init__(
        self, repo_id: str, location: str, *, root: str | None = None, enabled: bool = True, limit: int | None = None
    ) -> None:
        self.limit = blocks_limit() if limit is None else limit
        super().__init__(repo_id, location, root=root, enabled=enabled and self.limit > 0)

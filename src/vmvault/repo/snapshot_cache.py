"""This host's copies of a repository's snapshots, as they are stored (section 12.8).

``restore latest``, ``snapshots``, ``show latest``, a backup looking for its parent: each
lists ``snapshots/`` and reads every snapshot, and their number grows with the retention and
the number of VMs (hundreds, each one round trip to a remote store). A snapshot never changes
once written (its name is the SHA-256 of its content), so this host keeps each one it read
or wrote, sealed exactly as stored, in
``<cache folder>/snapshots/<repository id>-<location hash>/<snapshot id>``, and reads from
storage only the snapshots written since.

Trust. The cache saves reads, never a check: a cached snapshot is opened as one read from
the storage is (its envelope authenticated with the repository's key, its content hashed and
compared with its name), and one that fails is deleted and read from the storage again. It
is used only for ids the caller has just listed in the storage, so a snapshot forgotten
there (or withheld by the storage) is gone here too; the folder is 0700 and this user's
(``index_cache.private_dir``), and no file in it is opened through a link. ``check`` and
``repair snapshots`` read the storage itself, whatever is cached, and so does ``prune``.

Crash safety: a copy is written to a temporary name and renamed into place; a file cut
short by a crash fails its check and is read again. Several processes may share the
folder: each rename replaces the same bytes. Copies of snapshots no longer listed are
deleted by the next listing (``keep_only``). Failures of the cache folder only cost reads:
the cache then stays out of the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat

from vmvault import platform
from vmvault.repo._limits import MAX_SNAPSHOT
from vmvault.repo.index_cache import cache_root, private_dir
from vmvault.repo.names import snapshot_id

__all__ = ["SnapshotCache"]

_READ_FLAGS = os.O_RDONLY | platform.O_NONBLOCK | platform.O_CLOEXEC | platform.O_BINARY
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | platform.O_CLOEXEC | platform.O_BINARY


def _is_id(snap_id: str) -> bool:
    """A snapshot id of the form vmvault names snapshots with (no other name is a path here)."""
    return snapshot_id(f"snapshots/{snap_id}") == snap_id


class SnapshotCache:
    """Sealed snapshots of one repository at one location (module docstring). Every method
    is safe from any thread and never raises for the cache's own failures."""

    def __init__(self, repo_id: str, location: str, *, root: str | None = None, enabled: bool = True) -> None:
        name = f"{repo_id}-{hashlib.sha256(location.encode()).hexdigest()[:16]}"
        parent = os.path.join(root or cache_root(), "snapshots")
        #: the folder of copies; None: nothing is kept (disabled, or the folder is unusable)
        self.folder: str | None = None
        if enabled:
            try:
                private_dir(parent)
                private_dir(os.path.join(parent, name))
                self.folder = os.path.join(parent, name)
            except OSError:
                pass  # every snapshot is read from the storage

    def get(self, snap_id: str) -> bytes | None:
        """The sealed snapshot kept for ``snap_id``, not yet checked (a copy read short fails
        its check); None when there is none (or it is not a regular file of at most
        ``MAX_SNAPSHOT`` bytes)."""
        if self.folder is None or not _is_id(snap_id):
            return None
        try:
            fd = platform.open_nofollow(os.path.join(self.folder, snap_id), _READ_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SNAPSHOT:
                return None
            return platform.pread(fd, st.st_size, 0)
        except OSError:
            return None
        finally:
            os.close(fd)

    def put(self, snap_id: str, sealed: bytes) -> None:
        """Keep ``sealed`` as the snapshot ``snap_id`` (best effort)."""
        if self.folder is None or not _is_id(snap_id) or len(sealed) > MAX_SNAPSHOT:
            return
        path = os.path.join(self.folder, snap_id)
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            fd = platform.open_nofollow(tmp, _WRITE_FLAGS, 0o600)
        except OSError:
            return
        try:
            try:
                view = memoryview(sealed)
                while view:
                    view = view[os.write(fd, view[: platform.WRITE_SLICE]) :]
            finally:
                os.close(fd)
            platform.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def discard(self, snap_id: str) -> None:
        """Forget the copy of ``snap_id`` (it failed its check)."""
        if self.folder is not None and _is_id(snap_id):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, snap_id))

    def keep_only(self, snap_ids: set[str]) -> None:
        """Delete the copies of snapshots not in ``snap_ids`` (the storage's listing) and
        temporary files left by an interrupted ``put``."""
        if self.folder is None:
            return
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if name not in snap_ids:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.folder, name))

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

Crash safety and sharing: repo/kept.py, whose folder of copies this is. Copies of snapshots
no longer listed are deleted by the next listing (``keep_only``).
"""

from __future__ import annotations

from vmvault.repo._limits import MAX_SNAPSHOT
from vmvault.repo.kept import KeptCopies

__all__ = ["SnapshotCache"]


class SnapshotCache(KeptCopies):
    """Sealed snapshots of one repository at one location, named by their ids (module
    docstring)."""

    kind = "snapshots"
    max_size = MAX_SNAPSHOT

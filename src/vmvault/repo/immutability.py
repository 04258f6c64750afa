"""Retention (``immutable_days``) and key roles: what a client declines to delete.

Two safeguards against a compromised or careless client, both described for users in
docs/storage.md:

* **Retention.** A repository created with ``immutable_days=N`` keeps every data, index
  and snapshot object for at least N days after it was written. Forget and prune skip
  such objects and report them as retained; nothing else changes, so the repository stays
  consistent (a retained pack stays indexed, a retained superseded index file stays
  superseded). On S3 with Object Lock the storage ENFORCES this too (every object is
  written with COMPLIANCE retention); everywhere else it is ADVISORY: this client
  declines, another client could still delete.
* **Roles.** A key added with the ``backup-only`` role opens the repository for backups,
  restores and checks, and this client refuses forget, prune, index repair and key
  management with it. The role is ADVISORY too: whoever holds any key holds the master
  key. Enforcement needs storage credentials without delete rights (docs/storage.md).

Locks, keys and status records never get retention: locks must go away when released, a
leaked passphrase must be removable, and a host's status record is replaced as it reports.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from vmvault.errors import ImmutableError
from vmvault.repo import keys
from vmvault.repo.repository import Repository

__all__ = ["RETAINED_PREFIXES", "require_full_access", "retained", "retention_days"]

#: objects that get retention
RETAINED_PREFIXES = ("data/", "index/", "snapshots/")


def require_full_access(repo: Repository, operation: str) -> None:
    """Refuse ``operation`` when the repository was opened with a backup-only key."""
    if repo.role != keys.FULL:
        raise ImmutableError(
            f"{operation} refused: the repository was opened with key {repo.key_id[:8]}, whose role is "
            f"{repo.role}: it may back up, restore and check, but not {operation}. Use a key with full "
            "rights. (This refusal is made by the client; docs/storage.md shows storage setups that "
            "enforce it.)"
        )


def retention_days(repo: Repository) -> int | None:
    """The repository's retention period, or the one an S3 location gives with
    ``?immutable-days=N`` (its objects are then locked by the storage, so deleting them
    would only hide them behind delete markers)."""
    if repo.config.immutable_days is not None:
        return repo.config.immutable_days
    return repo.backend.retention_days


def retained(repo: Repository, names: Iterable[str], *, now: float | None = None) -> set[str]:
    """The objects among ``names`` still inside the retention period (all of them when the
    storage cannot say when one was written: unknown counts as retained)."""
    days = retention_days(repo)
    if days is None:
        return set()
    now = time.time() if now is None else now
    out = set()
    for name in names:
        if not name.startswith(RETAINED_PREFIXES):
            continue
        written = repo.backend.modified(name)
        if written is None or written + days * 86400 > now:
            out.add(name)
    return out

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

Where the storage enforces retention, whether it really holds each object is checked, not
assumed (``unlocked_objects``, run by ``check``): a server that ignored the lock headers of an
upload, a process killed between a multipart upload's completion and its PutObjectRetention,
or an object written by a client that asked for no retention leaves an object anyone holding
the storage credentials may delete. ``lock_objects`` (``vmvault repair locks``) gives each
the retention it should have had. Likewise an object hidden by a delete marker while the
storage still holds its deleted version locked was deleted by someone else than vmvault
(``deleted_objects``, also run by ``check``); ``undelete_objects`` (``vmvault repair
undelete``) removes the markers, and the object is back.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vmvault import times
from vmvault.backends.base import HiddenObject, ObjectInfo
from vmvault.errors import ImmutableError, ObjectNotFoundError
from vmvault.repo import keys
from vmvault.repo.repository import Repository

__all__ = [
    "LOCK_SLACK",
    "RETAINED_PREFIXES",
    "Deleted",
    "LockReview",
    "Unlocked",
    "deleted_objects",
    "lock_objects",
    "require_full_access",
    "retained",
    "retention_days",
    "undelete_objects",
    "unlocked_objects",
]

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


#: how much shorter than its period an object's retention may end and still count as whole:
#: the storage's clock and this host's differ a little, and a multipart object's time is when
#: its upload began while its retention was counted from when it was asked for
LOCK_SLACK = 3600.0
#: objects looked up at once
_LOOKUPS = 500


@dataclass(frozen=True)
class Unlocked:
    """An object the storage should still keep locked, and does not or not long enough."""

    name: str
    #: when it was written (seconds since the epoch)
    written: float
    #: when the repository's retention of it ends: ``written`` + ``immutable_days``
    due: float
    #: when the storage's retention of it ends; None: it has none
    until: float | None

    def describe(self) -> str:
        held = (
            "has no Object Lock retention" if self.until is None else f"is locked only until {times.local(self.until)}"
        )
        return (
            f"written {times.local(self.written)}, it must be kept until {times.local(self.due)} but {held}: "
            "anyone holding the storage's credentials can delete it"
        )


@dataclass(frozen=True)
class LockReview:
    """What ``unlocked_objects`` found: the objects not locked as they should be, how many
    objects it asked the storage about, and how many it knew locked from this host's earlier
    lookups (the index cache's record of COMPLIANCE locks: section 12.3)."""

    unlocked: list[Unlocked]
    looked_up: int
    known: int

    @property
    def checked(self) -> int:
        return self.looked_up + self.known


def unlocked_objects(
    repo: Repository,
    *,
    now: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    remember: bool = True,
) -> LockReview:
    """The data, index and snapshot objects the storage should still hold locked (written
    less than the retention period ago) whose own retention is missing or ends early. Empty
    where the storage enforces nothing (advisory retention has nothing to check). Listings
    give each object's time where they can; each object still inside the period costs one
    lookup of its retention, once: a COMPLIANCE lock long enough is recorded in this host's
    index cache with the version's listing stamp and time (nobody can shorten it), and that
    version is not asked about again (``remember=False``: every object is asked)."""
    days = retention_days(repo)
    if days is None or not repo.backend.enforces_immutability:
        return LockReview([], 0, 0)
    now = time.time() if now is None else now
    period = days * 86400.0
    found: list[Unlocked] = []
    looked = known = 0
    cache = repo.index.cache if remember else None
    with ThreadPoolExecutor(repo.backend.prepare_reads(), thread_name_prefix="vmvault-locks") as pool:
        listing = _retained_listing(repo)
        while batch := list(itertools.islice(listing, _LOOKUPS)):
            due = [(obj, written, written + period) for obj, written in batch if written + period - LOCK_SLACK > now]
            seen = cache.known_locks((o.name, o.stamp, w) for o, w, _ in due if _versioned(o)) if cache else {}
            ask = [
                (obj, written, must) for obj, written, must in due if seen.get(obj.name, -math.inf) < must - LOCK_SLACK
            ]
            known += len(due) - len(ask)
            learned: list[tuple[str, str, float, float]] = []
            for (obj, written, must), until in zip(
                ask, pool.map(lambda item: _retention(repo, item[0].name), ask), strict=True
            ):
                looked += 1
                if until is None or until < must - LOCK_SLACK:
                    found.append(Unlocked(obj.name, written, must, until))
                elif until != math.inf and _versioned(obj):
                    learned.append((obj.name, obj.stamp, written, until))
            if cache is not None:
                cache.remember_locks(learned)
            if progress is not None:
                progress(looked + known, 0)
    if cache is not None:
        cache.remember_locks([], expired_before=now)
    return LockReview(found, looked, known)


def _versioned(obj: ObjectInfo) -> bool:
    """Whether the listing names this version of ``obj`` (its stamp, S3's ETag, and its time):
    a lock is remembered only for a version told apart from any later one."""
    return bool(obj.stamp) and obj.modified is not None


def lock_objects(repo: Repository, objects: Iterable[Unlocked]) -> int:
    """Give each of ``objects`` the retention it should have (until its ``due``); the number
    locked. An object gone meanwhile is skipped; a refusal of the storage is raised."""
    done = 0
    for obj in objects:
        try:
            if not repo.backend.retain(obj.name, obj.due):
                raise ImmutableError(f"{repo.backend.url}: this storage cannot lock objects")
        except ObjectNotFoundError:
            continue
        done += 1
    return done


@dataclass(frozen=True)
class Deleted:
    """An object a delete hid while the storage holds the deleted version locked."""

    hidden: HiddenObject
    #: when the storage's retention of the hidden version ends
    until: float

    def describe(self) -> str:
        return (
            f"deleted (a delete marker hides it), though the storage holds the version written "
            f"{times.local(self.hidden.written)} locked until {times.local(self.until)}: not by vmvault, which "
            "deletes nothing before its retention ends"
        )


def deleted_objects(repo: Repository, *, now: float | None = None) -> list[Deleted]:
    """The data, index and snapshot objects hidden by delete markers whose kept version the
    storage still holds locked: deleted by someone else than vmvault (its forget and prune
    decline everything inside the retention period) and still to be had back. Empty where
    the storage enforces nothing. One listing of the versions per listing of the objects, and
    one lookup per hidden object."""
    if retention_days(repo) is None or not repo.backend.enforces_immutability:
        return []
    now = time.time() if now is None else now
    found = []
    for prefix in _retained_listings(repo):
        for hidden in repo.backend.hidden(prefix):
            try:
                until = repo.backend.retention_of(hidden.name, hidden.version)
            except ObjectNotFoundError:
                continue
            if until is not None and until > now:
                found.append(Deleted(hidden, until))
    return found


def undelete_objects(repo: Repository, objects: Iterable[Deleted]) -> int:
    """Bring each of ``objects`` back (its delete markers removed); the number brought back."""
    done = 0
    for obj in objects:
        if not repo.backend.unhide(obj.hidden):
            raise ImmutableError(f"{repo.backend.url}: this storage keeps nothing deleted")
        done += 1
    return done


def _retained_listings(repo: Repository) -> list[str]:
    """The listings that name every object under ``RETAINED_PREFIXES`` (packs as
    ``Repository.pack_listings`` lists them)."""
    return [*(p for p in RETAINED_PREFIXES if p != "data/"), *repo.pack_listings()]


def _retained_listing(repo: Repository) -> Iterator[tuple[ObjectInfo, float]]:
    """Every object under the retained prefixes with when it was written (the listing's time,
    else a lookup; unknown counts as now)."""
    for prefix in _retained_listings(repo):
        for obj in repo.backend.list(prefix):
            written = obj.modified if obj.modified is not None else repo.backend.modified(obj.name)
            yield obj, time.time() if written is None else written


def _retention(repo: Repository, name: str) -> float | None:
    """The storage's retention of ``name``; infinite when it is gone since the listing (a prune
    of an expired object): nothing is left to lock."""
    try:
        return repo.backend.retention_of(name)
    except ObjectNotFoundError:
        return math.inf

"""Repository locks: shared for backups, exclusive for prune.

A lock is an object ``locks/<random id>`` holding sealed JSON (host, pid, time, kind). To
take a lock a process writes its own lock object first, then lists ``locks/``: a backup
(shared) backs off if any live exclusive lock exists; prune (exclusive) backs off if any
other live lock exists. Because both sides write before they look, two conflicting
processes can both back off, but never both proceed. Holders refresh their lock every
``REFRESH_SECONDS``; a lock not refreshed for ``STALE_SECONDS``, or one held by a dead
process on this host, is stale and ignored (and removed by the next exclusive locker).

How long a lock went unrefreshed is measured on the storage's clock where the storage keeps the
time each object was written (a local folder, SFTP, S3): the time the storage gave the lock
against the time it gave the reader's own lock, written just before. Hosts' clocks disagree
(a Hyper-V host without time sync, a VM that drifted): measured by the time a lock claims
against the reader's clock, a live lock of a host 40 minutes behind looked stale to every other
host, whose prune then removed it and deleted data the running backup was writing, and a dead
host's lock claiming a future time was never stale. The claimed time is used only where the
storage keeps none (a memory backend), and is what ``describe`` shows.

Only names of the form ``locks/<32 hex>`` are locks (``repo/names.py``): anything else in
``locks/`` was not written by vmvault, is ignored, and is never deleted, however unreadable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from vmvault import shape, times
from vmvault.backends.base import Backend
from vmvault.errors import BackendError, IntegrityError, LockedError, ObjectNotFoundError
from vmvault.repo._limits import MAX_SMALL_OBJECT, read_bounded
from vmvault.repo.crypto import MasterKey, open_envelope, seal_envelope
from vmvault.repo.names import lock_name

__all__ = ["LockInfo", "RepositoryLock", "list_locks", "remove_locks", "storage_now"]

_log = logging.getLogger("vmvault.repo")

REFRESH_SECONDS = 300
STALE_SECONDS = 1800


@dataclass(frozen=True)
class LockInfo:
    name: str
    hostname: str
    pid: int
    time: float
    exclusive: bool
    operation: str
    #: when the storage last wrote the lock object (its own clock), None where it keeps no time
    stored: float | None = None

    def describe(self) -> str:
        when = times.local(self.time) if self.time else "never"
        kind = "exclusive" if self.exclusive else "shared"
        return f"{kind} lock for {self.operation} by pid {self.pid} on {self.hostname} (refreshed {when})"

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hostname": self.hostname,
            "pid": self.pid,
            "time": times.iso_time(self.time),
            "exclusive": self.exclusive,
            "operation": self.operation,
        }

    def is_stale(self, now: float | None = None, *, storage_now: float | None = None) -> bool:
        """Not refreshed for ``STALE_SECONDS``: by the storage's clock when both this lock's
        stored time and ``storage_now`` (the storage's time of an object the caller just wrote)
        are known, else by the time the lock claims against ``now`` (this host's clock); or held
        by a process of this host that is gone."""
        if self.stored is not None and storage_now is not None:
            age = storage_now - self.stored
        else:
            age = (time.time() if now is None else now) - self.time
        if age > STALE_SECONDS:
            return True
        if self.hostname == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


def _aad(name: str) -> bytes:
    return b"lock " + name.encode()


#: a lock's time must lie in years vmvault can print (datetime ends in 9999)
_LATEST_TIME = 253402300799.0


def _lock_info(name: str, doc: object) -> LockInfo:
    """A lock's fields, each checked: a pid that ``os.kill`` takes, a time that can be printed.
    ValueError (or KeyError, TypeError) for anything else."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    pid = doc["pid"]
    when = doc["time"]
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        raise ValueError(f"bad pid {pid!r}")
    if not isinstance(when, int | float) or isinstance(when, bool) or not 0.0 <= when <= _LATEST_TIME:
        raise ValueError(f"bad time {when!r}")
    return LockInfo(
        name, str(doc["hostname"]), pid, float(when), bool(doc["exclusive"]), str(doc.get("operation", "?"))
    )


def list_locks(backend: Backend, key: MasterKey) -> list[LockInfo]:
    """Every lock object, with the time the storage wrote it; names vmvault does not write are
    not locks and are left out."""
    out = []
    for obj in backend.list("locks/"):
        if not lock_name(obj.name):
            continue
        try:
            stored = backend.modified(obj.name)
            sealed = read_bounded(backend, obj.name, MAX_SMALL_OBJECT, what=obj.name)
            doc = shape.loads(open_envelope(key, sealed, _aad(obj.name), what=obj.name, max_size=MAX_SMALL_OBJECT))
            out.append(dataclasses.replace(_lock_info(obj.name, doc), stored=stored))
        except ObjectNotFoundError:
            continue  # removed while we listed
        except (IntegrityError, ValueError, KeyError, TypeError, OverflowError):
            # unreadable lock: treat as a stale one from an unknown process
            out.append(LockInfo(obj.name, "?", 0, 0.0, True, "unreadable"))
    return out


def storage_now(backend: Backend, key: MasterKey) -> float | None:
    """The storage's clock now: the time it gives a lock object written for the purpose (then
    removed; where it cannot be removed, it goes stale like any other). None where the storage
    keeps no times."""
    probe = RepositoryLock(backend, key, exclusive=False, operation="clock")
    probe.write()
    try:
        return backend.modified(probe.name)
    finally:
        with contextlib.suppress(BackendError):
            backend.delete(probe.name)


def remove_locks(backend: Backend, key: MasterKey, *, every: bool = False) -> tuple[list[LockInfo], list[LockInfo]]:
    """``vmvault unlock``: remove stale locks (and unreadable ones), or with ``every`` all locks,
    live ones included (only when no vmvault process can be running: a live backup or prune
    would lose its protection). Names vmvault does not write are never removed. Returns
    ``(removed, kept)``."""
    removed, kept = [], []
    now = None if every else storage_now(backend, key)
    for lock in list_locks(backend, key):
        if every or lock.is_stale(storage_now=now):
            with contextlib.suppress(ObjectNotFoundError):  # its owner released it meanwhile
                backend.delete(lock.name)
            removed.append(lock)
        else:
            kept.append(lock)
    return removed, kept


#: a difference between this host's clock and the storage's worth a warning (locks are judged
#: by the storage's clock; snapshot times and retention by this host's)
SKEW_SECONDS = 300
_skews_said: set[str] = set()


def _say_skew(backend: Backend, stored: float | None) -> None:
    """Warn, once per storage and process, when the storage's clock (the time it gave an
    object just written) and this host's differ by more than ``SKEW_SECONDS``."""
    if stored is None or backend.url in _skews_said:
        return
    skew = time.time() - stored
    if abs(skew) > SKEW_SECONDS:
        _skews_said.add(backend.url)
        _log.warning(
            "this host's clock is %d minutes %s the storage's (%s): locks are judged by the storage's clock, "
            "but snapshot times and retention by this host's; set the clock right (NTP)",
            round(abs(skew) / 60),
            "ahead of" if skew > 0 else "behind",
            backend.url,
        )


class RepositoryLock:
    """Take with ``with RepositoryLock(...):``; refreshed in the background while held."""

    def __init__(self, backend: Backend, key: MasterKey, *, exclusive: bool, operation: str) -> None:
        self.backend = backend
        self.key = key
        self.exclusive = exclusive
        self.operation = operation
        self.name = f"locks/{secrets.token_hex(16)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: wall-clock time of the last successful write of the lock object
        self._written = 0.0
        #: set when a gap between writes was long enough for others to call the lock stale
        self._lost = False
        self.held = False

    def write(self) -> None:
        """Write (or rewrite) the lock object."""
        now = time.time()
        if self._written and now - self._written > STALE_SECONDS - REFRESH_SECONDS:
            # suspended (SIGSTOP, a paused VM) or the storage was unreachable: others may have
            # ignored this lock meanwhile; rewriting it now does not undo what they did
            self._lost = True
        doc = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "exclusive": self.exclusive,
            "operation": self.operation,
        }
        self.backend.put(self.name, seal_envelope(self.key, json.dumps(doc).encode(), _aad(self.name)))
        self._written = now

    def verify(self, what: str) -> None:
        """Raise LockedError unless the lock has been held without a gap since it was taken.

        A backup calls this before writing its snapshot (repository-format.md, section 8):
        if its lock went stale meanwhile, a prune may have deleted packs the backup reuses
        or wrote, and a snapshot written now could name missing data.
        """
        if not self.held:
            return
        if self._lost or time.time() - self._written > STALE_SECONDS - REFRESH_SECONDS:
            self._lost = True
            raise LockedError(
                f"stopped before {what}: this process's {'exclusive' if self.exclusive else 'shared'} lock was "
                f"not refreshed for more than {(STALE_SECONDS - REFRESH_SECONDS) // 60} minutes (was the process "
                "suspended, or the storage unreachable?), so a prune may have run meanwhile. Nothing "
                "incomplete was written; run the command again (uploaded data that still exists is reused)."
            )

    def acquire(self) -> None:
        self.write()
        now = self.backend.modified(self.name)  # the storage's clock (None: it keeps none)
        _say_skew(self.backend, now)
        conflicts = []
        for lock in list_locks(self.backend, self.key):
            if lock.name == self.name:
                continue
            if lock.is_stale(storage_now=now):
                if self.exclusive and lock_name(lock.name):  # never a name vmvault did not write
                    self.backend.delete(lock.name)
                continue
            if self.exclusive or lock.exclusive:
                conflicts.append(lock)
        if conflicts:
            # credentials without delete rights (a backup-only setup) cannot take the lock back:
            # it then goes stale like a dead process's, and the conflict is still what to report
            with contextlib.suppress(BackendError):
                self.backend.delete(self.name)
            text = "; ".join(c.describe() for c in conflicts)
            raise LockedError(
                f"the repository is locked: {text}. Wait for it to finish; a lock from a process that died "
                f"is ignored after {STALE_SECONDS // 60} minutes (or at once on the same host), and "
                "`vmvault unlock --remove-all` removes every lock once you know no vmvault process runs."
            )
        self.held = True
        self._thread = threading.Thread(target=self._refresh_loop, name="vmvault-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            with contextlib.suppress(Exception):  # a failed refresh is retried at the next interval
                self.write()

    def release(self) -> None:
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with contextlib.suppress(Exception):  # the lock goes stale on its own; never mask the real outcome
            self.backend.delete(self.name)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

"""One daemon per configuration, one run of a job at a time (docs/automation.md, "One daemon,
one run of each job").

The locks are operating-system file locks (:func:`vmvault.platform.lock`: ``flock`` on POSIX,
``msvcrt.locking`` on Windows) on files in a folder beside the job history, ``<history>.locks/``:

* ``daemon``: held by ``vmvault daemon`` for its whole life. A second daemon whose
  configuration names the same history (the same configuration file, or a copy of it)
  stops at once with :class:`LockedError` (exit 11). Two daemons would both run every job,
  and one's retention could forget the snapshot the other just made.
* ``job-<hash of the name>``: held while one attempt of that job runs, by the daemon or by
  ``vmvault run``. A ``vmvault run`` of a job that is running exits 11; a daemon firing of a
  job that a ``vmvault run`` is running is skipped and logged, like an overlapping firing.

A lock held by a process that dies is released by the kernel, so nothing goes stale: the
files stay (deleting a lock file while another process waits on it would let two holders
in). Each file holds a line of JSON naming its holder, for the error message, and for the
record of a run whose holder died (``StateLock.previous_holder``). Whether a holder is alive
is asked by taking the lock for a moment (``StateLock.holder``, ``status.settle_interrupted``);
the daemon and ``vmvault run`` take theirs with a short wait, so such a look never costs them
a firing. The folder is created 0700 and the files 0600, opened without following links.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import stat
import time
from typing import Any

from vmvault import platform, shape
from vmvault.errors import ConfigError, LockedError

__all__ = ["StateLock", "daemon_lock", "describe_holder", "job_lock", "locks_folder", "open_private"]


def _try_lock(fd: int) -> bool:
    return platform.lock(fd, wait=False)


def locks_folder(history: str) -> str:
    return os.path.abspath(history) + ".locks"


def _private_folder(path: str) -> None:
    """Create ``path`` 0700, or check that the existing one is a real folder and tighten it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the lock folder {path}: {exc.strerror}") from exc
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{path} must be a folder, not a link or a file: vmvault keeps its daemon and job locks there"
        )
    if st.st_mode & 0o077 and st.st_uid == platform.current_uid():
        os.chmod(path, 0o700)


def open_private(path: str, flags: int, what: str) -> int:
    """Open ``path`` (created 0600 when ``flags`` has ``O_CREAT``) without following a link;
    it must be a regular file, and a wider mode is narrowed to 0600. Returns the descriptor.
    A missing file raises ``FileNotFoundError``; anything else wrong, ``ConfigError``."""
    try:
        fd = platform.open_nofollow(path, flags | platform.O_CLOEXEC | platform.O_BINARY, 0o600)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(f"{what} {path} is a link; vmvault does not follow it") from exc
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077 and hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StateLock:
    """An exclusive, non-blocking lock on one file; released by :meth:`release`, by leaving
    a ``with`` block, or by the process ending."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None
        #: what the lock file said before :meth:`acquire` wrote ours (a dead holder's name)
        self.previous_holder: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: float = 0.0, **holder: Any) -> StateLock:
        """Take the lock or raise :class:`LockedError` naming who holds it. ``wait``: keep
        trying this many seconds first (a ``vmvault jobs`` looking whether a holder is alive
        holds a lock for a moment; a daemon must not lose a firing to it). The holder found
        in the file before ours is written stays in :attr:`previous_holder`."""
        if self._fd is not None:
            return self
        _private_folder(os.path.dirname(self.path))
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT, "the lock file")
        try:
            deadline = time.monotonic() + wait
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    holder_text = describe_holder(_read_holder(fd))
                    raise LockedError(f"{self.what} is already running ({holder_text}; lock {self.path})")
                time.sleep(0.05)
            self.previous_holder = _read_holder(fd)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                **holder,
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (what its holder wrote), or None when nobody does. Looks
        for a moment by taking the lock without writing to the file; a process taking it
        meanwhile with ``acquire(wait=...)`` waits that moment out."""
        if self._fd is not None:
            return {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            fd = open_private(self.path, os.O_RDONLY, "the lock file")
        except FileNotFoundError:
            return None
        try:
            if _try_lock(fd):
                return None  # closing the descriptor releases it again
            return _read_holder(fd) or {"pid": "?", "host": "?"}
        finally:
            os.close(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        doc = shape.loads(raw.decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 1234 on hv01, by `vmvault daemon`, since ...`` from a lock file's holder record."""
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("command"):
        parts.append(f"by `{holder['command']}`")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def daemon_lock(history: str) -> StateLock:
    """The lock a daemon holds for the history file its configuration names."""
    return StateLock(
        os.path.join(locks_folder(history), "daemon"),
        f"a vmvault daemon for the job history {history} (only one daemon per configuration)",
    )


def job_lock(history: str, job: str) -> StateLock:
    """The lock one attempt of ``job`` holds, in the daemon or in ``vmvault run``."""
    digest = hashlib.sha256(job.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return StateLock(os.path.join(locks_folder(history), f"job-{digest}"), f"job {job!r}")

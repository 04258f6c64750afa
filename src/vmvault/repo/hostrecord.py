"""What this host has seen of each repository, kept on this host, outside the repository.

The storage is not trusted, and some changes to it leave a repository that is consistent and
valid in itself: every object authentic, only the wrong ones. This record lets a host notice
what the storage alone cannot prove (docs/design/repository-format.md, section 10.1):

* the repository at a location is a different repository now (another id);
* a repository seen encrypted now says it is unencrypted (key objects deleted, config
  rewritten without a MAC), or the config of an unencrypted one changed (it has no MAC, and
  a config is written once and never changes);
* snapshots this host wrote are gone though this host did not forget them (withheld,
  deleted, or the repository rolled back), and snapshots this host forgot are back
  (replayed).

It also remembers which key opened the repository last, so that key is tried first.

Layout, below the state folder (vmvault/state.py), per user::

    repositories/<repository id>.json       RepoRecord as JSON
    repositories/locations/<hash>.json      {"url": ..., "id": ...}: which repository a location held
    repositories/.lock                      flock held while a record is read and rewritten

Files are 0600 in 0700 folders and replaced atomically. Nothing here is needed to restore:
losing the folder only loses these checks until the repository is used again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault import platform
from vmvault.state import state_dir

__all__ = ["HostRecords", "RepoRecord", "now"]

#: forgotten snapshot ids kept per repository (oldest dropped first)
MAX_FORGOTTEN = 10000
_HEX = re.compile(r"[0-9a-f]+")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class RepoRecord:
    id: str
    encrypted: bool
    #: hex SHA-256 of the config object as last read
    config_sha256: str
    #: the key that opened it last from this host
    key_id: str | None = None
    first_seen: str = ""
    last_seen: str = ""
    #: snapshots this host wrote and has not forgotten: id -> when recorded (after the write)
    written: dict[str, float] = field(default_factory=dict)
    #: snapshots this host forgot: id -> when recorded (after the delete), oldest first
    forgotten: dict[str, float] = field(default_factory=dict)
    #: the highest format version this host saw in its config (0: none recorded yet)
    version: int = 0
    #: hex SHA-256 of a config this host is writing (`migrate`): accepted too until the
    #: repository is opened again, so a kill before or after the write refuses neither
    config_pending: str = ""

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RepoRecord:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        return cls(
            id=str(doc["id"]),
            encrypted=bool(doc["encrypted"]),
            config_sha256=str(doc["config_sha256"]),
            key_id=None if doc.get("key_id") is None else str(doc["key_id"]),
            first_seen=str(doc.get("first_seen", "")),
            last_seen=str(doc.get("last_seen", "")),
            written={str(k): float(v) for k, v in dict(doc.get("written", {})).items()},
            forgotten={str(k): float(v) for k, v in dict(doc.get("forgotten", {})).items()},
            version=int(doc.get("version", 0)),
            config_pending=str(doc.get("config_pending", "")),
        )

    def wrote(self, snap_id: str) -> None:
        self.written[snap_id] = time.time()

    def forgot(self, snap_id: str) -> None:
        self.written.pop(snap_id, None)
        self.forgotten.pop(snap_id, None)
        self.forgotten[snap_id] = time.time()
        for old in list(self.forgotten)[: max(0, len(self.forgotten) - MAX_FORGOTTEN)]:
            del self.forgotten[old]


class HostRecords:
    """This host's records (of the user running vmvault). Methods raise OSError or ValueError
    when the folder cannot be used; callers then warn and go on without the record."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root or state_dir("repositories")

    def record_path(self, repo_id: str) -> str:
        if not _HEX.fullmatch(repo_id):
            # config.read_config accepts only 32 hex digits; never let an id name another file
            raise ValueError(f"not a repository id: {repo_id!r}")
        return os.path.join(self.root, f"{repo_id}.json")

    def location_path(self, url: str) -> str:
        return os.path.join(self.root, "locations", hashlib.sha256(url.encode()).hexdigest()[:40] + ".json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the records' lock: read-modify-write of a record is atomic between processes
        (and threads: each call opens its own file description)."""
        os.makedirs(os.path.join(self.root, "locations"), mode=0o700, exist_ok=True)
        fd = platform.open_nofollow(
            os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT | platform.O_CLOEXEC, 0o600
        )
        try:
            platform.lock(fd, wait=True)
            yield
        finally:
            os.close(fd)

    def load(self, repo_id: str) -> RepoRecord | None:
        """The record, or None when there is none. A damaged record raises ValueError."""
        raw = self._read(self.record_path(repo_id))
        if raw is None:
            return None
        try:
            rec = RepoRecord.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.record_path(repo_id)} is damaged ({exc})") from exc
        if rec.id != repo_id:
            raise ValueError(f"{self.record_path(repo_id)} is damaged (it is the record of {rec.id})")
        return rec

    def save(self, rec: RepoRecord) -> None:
        self._write(self.record_path(rec.id), rec.to_json())

    def location(self, url: str) -> str | None:
        """The id of the repository this host last saw at ``url``."""
        raw = self._read(self.location_path(url))
        if raw is None:
            return None
        try:
            doc: dict[str, Any] = json.loads(raw)
            if doc["url"] != url:
                return None  # a hash collision in 160 bits: not ours
            return str(doc["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.location_path(url)} is damaged ({exc})") from exc

    def set_location(self, url: str, repo_id: str) -> None:
        self._write(self.location_path(url), json.dumps({"url": url, "id": repo_id, "time": now()}).encode())

    @staticmethod
    def _read(path: str) -> bytes | None:
        try:
            fd = platform.open_nofollow(path, os.O_RDONLY | platform.O_CLOEXEC | platform.O_BINARY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(16 << 20)

    @staticmethod
    def _write(path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = platform.open_nofollow(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | platform.O_CLOEXEC | platform.O_BINARY, 0o600
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            platform.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

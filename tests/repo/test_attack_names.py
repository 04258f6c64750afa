"""Whoever writes the storage puts objects with odd names in it.

Threat model: docs/design/repository-format.md, section 10.3. The rule under test: only a
name of exactly the form vmvault writes (``vmvault.repo.names``) is an object. Any other
name, whether it resembles ours (upper-case hex, spaces ``bytes.fromhex`` skips, a wrong
length, a pack in the wrong folder) or not (NUL bytes, terminal escapes, bytes that are not
UTF-8, digits of other scripts), is never read, never deleted, never crashes anything, and
is reported by ``check`` with its name escaped.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.repo.builders import PASS, Content, backup, make_repo, write_dead_lock
from tests.servers import S3Server, running_s3, s3_client_environment
from vmvault.backends.base import Backend, ObjectInfo
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import LockedError
from vmvault.repo import keys, names
from vmvault.repo.check import check
from vmvault.repo.crypto import seal_envelope
from vmvault.repo.locks import list_locks
from vmvault.repo.prune import forget, forget_ids, prune
from vmvault.repo.repair import repair_index
from vmvault.repo.repository import Repository
from vmvault.repo.retention import RetentionPolicy

H = "ab" * 32

#: names that are not objects, per folder; each would have fooled a parser at some point
ODD: dict[str, list[str]] = {
    "locks/": [
        "locks/garbage",
        "locks/" + "AB" * 16,  # upper case
        "locks/" + "ab" * 15 + "a",  # too short
        "locks/" + "ab" * 17,  # too long
        "locks/" + "ab" * 16 + "\n",  # a trailing newline
        "locks/" + " ".join(["ab"] * 16),  # bytes.fromhex skips the spaces
        "locks/" + "\u0661" * 32,  # Arabic-Indic digits: str.isdigit() says yes
        "locks/sub/" + "ab" * 16,  # one level too deep
        "locks/\x1b[2J\x1b[31mowned",  # rewrites the terminal
        "locks/nul\x00" + "ab" * 16,
    ],
    "keys/": ["keys/" + H.upper(), "keys/" + H[:-1], "keys/" + H + ".bak", "keys/\x1b]0;title\x07"],
    "snapshots/": ["snapshots/" + H + "0", "snapshots/" + H.upper(), "snapshots/\u202e" + H, "snapshots/" + H + "/x"],
    "index/": ["index/" + H.upper(), "index/" + " ".join(["ab"] * 32), "index/notes.txt", "index/" + H[:-2]],
    "data/": [
        "data/00/" + H,  # in the wrong folder
        "data/ab/cd/" + H,  # one level too deep
        "data/AB/" + H.upper(),
        "data/ab/" + H + "\x00",
        "data/" + H,
    ],
}
ALL_ODD = [name for group in ODD.values() for name in group]


class Recording(Backend):
    """A backend that remembers every name read, looked up or deleted."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url
        self.touched: list[tuple[str, str]] = []

    def put(self, name: str, data: bytes) -> None:
        self.touched.append(("put", name))
        self.inner.put(name, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.touched.append(("get", name))
        return self.inner.get(name, offset, length)

    def exists(self, name: str) -> bool:
        self.touched.append(("exists", name))
        return self.inner.exists(name)

    def modified(self, name: str) -> float | None:
        self.touched.append(("modified", name))
        return self.inner.modified(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.touched.append(("delete", name))
        self.inner.delete(name)

    def skipped(self) -> dict[str, str]:
        return self.inner.skipped()


def repository_with_odd_names(inner: Backend, odd: list[str]) -> tuple[Repository, dict[str, bytes]]:
    repo = make_repo(inner)
    backup(repo, Content(disks={"disk": os.urandom(6 * 4096)}, files={"vm.conf": b"name=vm\n"}))
    backup(repo, Content(disks={"disk": os.urandom(6 * 4096)}))
    write_dead_lock(repo, exclusive=True)
    # odd names hold garbage, or copies of real objects (a copy of a lock is a readable lock)
    real_lock = next(o.name for o in inner.list("locks/"))
    planted = {}
    for n, name in enumerate(odd):
        planted[name] = inner.get(real_lock) if n % 2 else b"\x00garbage\xff" * (n + 1)
    return repo, planted


def plant(backend: Backend, planted: dict[str, bytes]) -> None:
    for name, data in planted.items():
        backend.put(name, data)


def run_everything(repo: Repository) -> None:
    """What a user can do that lists the storage: each must work despite the odd names."""
    repo = Repository.open(repo.backend, PASS)
    assert len(repo.list_snapshots()) == 2
    repo.find_snapshot("latest")
    keys.list_keys(repo.backend)
    with repo.lock(exclusive=True, operation="prune"):
        pass
    check(repo, read_data=True)
    forget(repo, RetentionPolicy(last=1, group_by=()))
    prune(repo)
    repair_index(repo)
    forget_ids(repo, [repo.snapshot_ids()[0][:8]], dry_run=True)
    assert check(repo, read_data=True).ok


def test_odd_names_are_never_read_or_deleted() -> None:
    recording = Recording(MemoryBackend())
    repo, planted = repository_with_odd_names(recording.inner, ALL_ODD)
    repo.backend = recording
    plant(recording.inner, planted)
    run_everything(repo)
    for name, data in planted.items():
        assert recording.inner.get(name) == data, f"{name!r} changed or vanished"
    reached = [(op, name) for op, name in recording.touched if name in planted]
    assert reached == [], "an odd name reached the backend"
    # and the dead lock with a proper name was removed, as before
    assert len(list_locks(recording.inner, repo.key)) == 0


def test_check_reports_each_odd_name_escaped() -> None:
    backend = MemoryBackend()
    _, planted = repository_with_odd_names(backend, ALL_ODD)
    plant(backend, planted)
    report = check(Repository.open(backend, PASS))
    shown = {p.object for p in report.warnings if p.kind == "unexpected-object"}
    assert shown == {names.shown(n) for n in ALL_ODD}
    for text in shown:
        assert text.isascii() and text.isprintable(), repr(text)
    assert report.ok, [p.message for p in report.errors]
    json.dumps(report.to_dict(), ensure_ascii=False).encode()  # printable as JSON, too


def test_parsers_accept_exactly_what_vmvault_writes() -> None:
    lock = "locks/" + "0f" * 16
    assert names.lock_name(lock) and names.key_id("keys/" + H) == H and names.snapshot_id("snapshots/" + H) == H
    assert names.index_id("index/" + H) == bytes.fromhex(H) and names.pack_id(f"data/ab/{H}") == bytes.fromhex(H)
    for odd in ALL_ODD:
        assert not names.lock_name(odd)
        assert names.key_id(odd) is None and names.snapshot_id(odd) is None
        assert names.index_id(odd) is None and names.pack_id(odd) is None
    # each parser takes only its own folder
    assert names.key_id("snapshots/" + H) is None and names.index_id("keys/" + H) is None
    assert names.pack_id("index/" + H) is None and not names.lock_name("keys/" + "0f" * 16)


def test_delete_snapshot_refuses_a_name_it_did_not_write() -> None:
    repo = make_repo(MemoryBackend())
    for bad in ("../config", H.upper(), "", H + "/x"):
        with pytest.raises(ValueError):
            repo.delete_snapshot(bad)


def test_odd_names_on_a_local_disk(tmp_path: Path) -> None:
    """The same on a real file system, with names only a file system has: bytes that are not
    UTF-8, a FIFO and a socket named like objects."""
    root = tmp_path / "repo"
    odd = [n for n in ALL_ODD if "\x00" not in n and not n.endswith("/x")]
    recording = Recording(LocalBackend(str(root)))
    repo, planted = repository_with_odd_names(recording.inner, odd)
    repo.backend = recording
    plant(recording.inner, planted)
    raw = os.path.join(os.fsencode(root / "snapshots"), b"\xff\xfe" + H.encode())
    Path(os.fsdecode(raw)).write_bytes(b"x")
    os.mkfifo(root / "locks" / ("0e" * 16))
    run_everything(repo)
    for name, data in planted.items():
        assert recording.inner.get(name) == data, f"{name!r} changed or vanished"
    assert os.path.exists(raw) and os.path.exists(root / "locks" / ("0e" * 16))
    assert [(op, name) for op, name in recording.touched if name in planted] == []


def test_forged_lock_fields_never_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """In an unencrypted repository anyone can forge a lock: absurd pids and times make it an
    unreadable (stale) lock, not an OverflowError from os.kill or datetime."""
    repo = make_repo(MemoryBackend(), encrypted=False)
    host = socket.gethostname()
    forged = []
    for n, doc in enumerate(
        [
            {"hostname": host, "pid": 2**64, "time": time.time(), "exclusive": True},
            {"hostname": host, "pid": -1, "time": time.time(), "exclusive": True},
            {"hostname": host, "pid": True, "time": time.time(), "exclusive": True},
            {"hostname": "elsewhere", "pid": 5, "time": 1e300, "exclusive": True},
            {"hostname": "elsewhere", "pid": 5, "time": float("nan"), "exclusive": True},
            {"hostname": "elsewhere", "pid": 5, "time": -1e300, "exclusive": True},
            ["not", "an", "object"],
        ]
    ):
        name = f"locks/{n:032x}"
        repo.backend.put(name, seal_envelope(repo.key, json.dumps(doc).encode(), b"lock " + name.encode()))
        forged.append(name)
    infos = list_locks(repo.backend, repo.key)
    assert sorted(i.name for i in infos) == forged
    assert all(i.operation == "unreadable" and i.is_stale() for i in infos)
    assert all(i.describe() for i in infos)
    with repo.lock(exclusive=True, operation="prune"):  # removes them as stale
        pass
    assert list_locks(repo.backend, repo.key) == []
    # a well-formed live lock from elsewhere still blocks, and is described
    name = "locks/" + "7" * 32
    doc = {"hostname": "elsewhere", "pid": 5, "time": time.time(), "exclusive": True, "operation": "prune"}
    repo.backend.put(name, seal_envelope(repo.key, json.dumps(doc).encode(), b"lock " + name.encode()))
    with pytest.raises(LockedError, match="elsewhere"):
        repo.lock(exclusive=False, operation="backup").acquire()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_client_environment(), running_s3(tmp_path_factory.mktemp("moto"), buckets=("odd-names",)) as server:
        yield server


@pytest.mark.integration
def test_odd_keys_on_s3(moto: S3Server) -> None:
    """An object store takes any key: NUL bytes, escapes, ``..`` parts, U+202E."""
    from vmvault.backends.s3 import open_s3

    client: Any = moto.client()
    bucket = "odd-names"
    prefix = f"repo-{os.urandom(4).hex()}"
    recording = Recording(open_s3(moto.url(bucket, prefix)))
    odd = [n for n in ALL_ODD if not n.endswith("\n")] + ["locks/../../escape", "snapshots/./" + H]
    repo, planted = repository_with_odd_names(recording.inner, odd)
    repo.backend = recording
    for name, data in planted.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
    run_everything(repo)
    for name, data in planted.items():
        assert client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read() == data, repr(name)
    assert [(op, name) for op, name in recording.touched if name in planted] == []
    recording.inner.close()

"""Keys (passphrases change without touching data), locks, and opening what is not (yet) ours."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

import pytest

from tests.repo.builders import PASS, Content, backup, disk_image, make_repo, restore_all, write_dead_lock
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import (
    IntegrityError,
    LockedError,
    NotARepositoryError,
    PasswordError,
    RepositoryError,
    RepositoryExistsError,
    UnsupportedVersionError,
)
from vmvault.repo import Repository, check, locks
from vmvault.repo import keys as repo_keys
from vmvault.repo.crypto import seal_envelope
from vmvault.repo.format import FORMAT_VERSION
from vmvault.repo.locks import STALE_SECONDS, list_locks, remove_locks


def data_objects(repo: Repository) -> dict[str, bytes]:
    """Everything a key change must leave byte-identical."""
    out = {}
    for prefix in ("config", "data/", "index/", "snapshots/"):
        for o in repo.backend.list(prefix):
            out[o.name] = repo.backend.get(o.name)
    return out


def test_wrong_passphrase(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path)))
    with pytest.raises(PasswordError):
        Repository.open(repo.backend, b"wrong")
    with pytest.raises(RepositoryError, match="encrypted"):
        Repository.open(repo.backend, None)
    asked: list[int] = []
    opened = Repository.open(repo.backend, lambda: asked.append(1) or PASS)
    assert asked == [1] and opened.key == repo.key


def test_add_change_remove_keys_without_rewriting_data(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path)))
    content = Content(disks={"d": disk_image(9, 10)})
    snap = backup(repo, content)
    before = data_objects(repo)
    first = repo.key_id

    second = repo_keys.add_key(repo.backend, repo.key, b"second passphrase")
    keyfile_secret = bytes(range(32))
    third = repo_keys.add_key(repo.backend, repo.key, keyfile_secret, kind="keyfile")
    assert {k.id for k in repo_keys.list_keys(repo.backend)} == {first, second, third}
    assert {k.kind for k in repo_keys.list_keys(repo.backend)} == {"passphrase", "keyfile"}

    via_second = Repository.open(repo.backend, b"second passphrase")
    assert via_second.key_id == second
    assert Repository.open(repo.backend, keyfile_secret).key_id == third

    # "change passphrase" = add the new one, remove the old one
    with pytest.raises(RepositoryError, match="this session is using"):
        repo_keys.remove_key(repo.backend, first, current=first)
    repo_keys.remove_key(repo.backend, first, current=second)
    with pytest.raises(PasswordError):
        Repository.open(repo.backend, PASS)
    repo_keys.remove_key(repo.backend, third, current=second)
    with pytest.raises(RepositoryError, match="last key"):
        repo_keys.remove_key(repo.backend, second, current="someone else")

    assert data_objects(repo) == before
    reopened = Repository.open(repo.backend, b"second passphrase")
    assert restore_all(reopened, reopened.load_snapshot(snap.id)) == content
    assert check(reopened, read_data=True).ok


def test_damaged_key_file_does_not_hide_a_good_one(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path)))
    repo.backend.put("keys/" + "0" * 64, b"not json")
    assert Repository.open(repo.backend, PASS).key == repo.key
    with pytest.raises(PasswordError, match="unusable key objects"):
        Repository.open(repo.backend, b"wrong")


def test_tampered_config_is_refused(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path)))
    doc = json.loads(repo.backend.get("config"))
    doc["chunk_size"] = 8192
    repo.backend.put("config", json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="MAC"):
        Repository.open(repo.backend, PASS)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path)))
    doc = json.loads(repo.backend.get("config"))
    doc["version"] = FORMAT_VERSION + 1
    repo.backend.put("config", json.dumps(doc).encode())
    with pytest.raises(UnsupportedVersionError, match="Upgrade"):
        Repository.open(repo.backend, PASS)


@pytest.mark.parametrize("config", [None, b"", b"{}", b"[1, 2]", b"\xff\xfe", b'{"format": "restic"}'])
def test_not_a_repository(tmp_path: Path, config: bytes | None) -> None:
    backend = LocalBackend(str(tmp_path))
    if config is not None:
        backend.put("config", config)
    with pytest.raises(NotARepositoryError):
        Repository.open(backend, PASS)


def test_init_twice_is_refused(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path)))
    with pytest.raises(RepositoryExistsError):
        Repository.init(repo.backend, PASS)


# ---- locks -------------------------------------------------------------------------------


def test_shared_locks_coexist_exclusive_conflicts() -> None:
    repo = make_repo(MemoryBackend())
    with repo.lock(exclusive=False, operation="backup"), repo.lock(exclusive=False, operation="backup"):
        assert len(list_locks(repo.backend, repo.key)) == 2
        with pytest.raises(LockedError, match="shared lock for backup"):
            repo.lock(exclusive=True, operation="prune").acquire()
        assert len(list_locks(repo.backend, repo.key)) == 2  # the refused locker cleaned up after itself
    with repo.lock(exclusive=True, operation="prune"):
        with pytest.raises(LockedError, match="exclusive lock for prune"):
            repo.lock(exclusive=False, operation="backup").acquire()
        with pytest.raises(LockedError):
            repo.lock(exclusive=True, operation="prune").acquire()
    assert list_locks(repo.backend, repo.key) == []


@pytest.mark.parametrize("exclusive", [True, False])
def test_stale_lock_of_a_dead_pid_is_ignored(exclusive: bool) -> None:
    repo = make_repo(MemoryBackend())
    dead = write_dead_lock(repo, exclusive=True)
    with repo.lock(exclusive=exclusive, operation="x"):
        names = {lock.name for lock in list_locks(repo.backend, repo.key)}
    # an exclusive locker also removes it; a shared one leaves it
    assert (dead in names) is not exclusive


def test_lock_from_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(MemoryBackend())

    def foreign(age: float) -> str:
        name = f"locks/{int(age):032x}"
        doc = {"hostname": "elsewhere", "pid": 1, "time": time.time() - age, "exclusive": True, "operation": "prune"}
        repo.backend.put(name, seal_envelope(repo.key, json.dumps(doc).encode(), b"lock " + name.encode()))
        return name

    recent = foreign(10)
    with pytest.raises(LockedError, match="elsewhere"):
        repo.lock(exclusive=False, operation="backup").acquire()
    repo.backend.delete(recent)
    foreign(STALE_SECONDS + 60)  # not refreshed for too long: its holder is gone
    with repo.lock(exclusive=False, operation="backup"):
        pass


def _lock_of_another_host(repo: Repository, *, claims: float, exclusive: bool) -> str:
    """A lock written now by a process on another host whose clock says ``claims``."""
    name = f"locks/{secrets.token_hex(16)}"
    doc = {"hostname": "elsewhere", "pid": 7, "time": claims, "exclusive": exclusive, "operation": "backup"}
    repo.backend.put(name, seal_envelope(repo.key, json.dumps(doc).encode(), b"lock " + name.encode()))
    return name


def test_a_live_lock_of_a_host_whose_clock_is_behind_is_live(tmp_path: Path) -> None:
    """A backup on a host whose clock is two hours behind has just written its lock: a prune
    here, an unlock and a check see it held (its claimed time looked stale: the prune removed
    it and went on deleting what the backup was writing)."""
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    name = _lock_of_another_host(repo, claims=time.time() - 7200, exclusive=False)
    with pytest.raises(LockedError, match="shared lock for backup by pid 7 on elsewhere"):
        repo.lock(exclusive=True, operation="prune").acquire()
    removed, kept = remove_locks(repo.backend, repo.key)
    assert removed == [] and [lock.name for lock in kept] == [name]
    assert [lock.name for lock in list_locks(repo.backend, repo.key)] == [name]  # (and no clock probe left)
    report = check(repo)  # (under its own shared lock)
    assert [p.kind for p in report.problems if p.object == name] == ["lock-held"]


def test_a_dead_host_s_lock_claiming_a_future_time_goes_stale_by_the_storage_s_clock(tmp_path: Path) -> None:
    """A host whose clock was two hours ahead died holding a lock the storage last wrote more
    than STALE_SECONDS ago: stale (by the time it claims it would never have been)."""
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    name = _lock_of_another_host(repo, claims=time.time() + 7200, exclusive=True)
    then = time.time() - STALE_SECONDS - 60
    os.utime(tmp_path / "repo" / name, (then, then))
    with repo.lock(exclusive=True, operation="prune"):
        pass
    assert not repo.backend.exists(name)


def test_a_storage_clock_an_hour_ahead_is_said_once_and_locks_are_judged_by_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class AheadOfUs(LocalBackend):
        def modified(self, name: str) -> float | None:
            stored = super().modified(name)
            return None if stored is None else stored + 3600

    monkeypatch.setattr(locks, "_skews_said", set())
    repo = make_repo(AheadOfUs(str(tmp_path / "repo")))
    fresh = _lock_of_another_host(repo, claims=time.time(), exclusive=False)
    with caplog.at_level(logging.WARNING, logger="vmvault.repo"):
        for _ in range(2):
            with pytest.raises(LockedError, match="elsewhere"):
                repo.lock(exclusive=True, operation="prune").acquire()
    said = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    assert len(said) == 1 and "60 minutes behind the storage's" in said[0], said
    repo.backend.delete(fresh)


def test_unreadable_lock_is_treated_as_stale() -> None:
    repo = make_repo(MemoryBackend())
    garbage = "locks/" + "0a" * 16
    repo.backend.put(garbage, b"\x00" * 40)
    # sealed by a key holder, JSON nested deeper than the parser goes: a RecursionError,
    # which escaped as a traceback from every command that takes a lock
    nested = "locks/" + "0b" * 16
    repo.backend.put(nested, seal_envelope(repo.key, b"[" * 60000, b"lock " + nested.encode()))
    with repo.lock(exclusive=True, operation="prune"):
        pass
    assert not repo.backend.exists(garbage) and not repo.backend.exists(nested)

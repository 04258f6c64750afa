"""This host's copies of the snapshots (repo/snapshot_cache.py): a listing reads from the
storage only the snapshots it has not kept, and a kept copy is checked as a read from the
storage is, never trusted: damaged, swapped, cut short or replaced by a link, it is read from
the storage again. The backend is test_fetch's ``Watched`` (it records every read)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.repo.builders import PASS, KeepsOtherBytes, make_repo
from tests.repo.test_fetch import Watched
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import IntegrityError, SnapshotNotFoundError
from vmvault.repo.check import check
from vmvault.repo.prune import prune
from vmvault.repo.repair import repair_snapshots
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot
from vmvault.repo.snapshot_cache import SnapshotCache


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _save(repo: Repository, n: int, first: int = 0) -> list[str]:
    return [
        repo.save_snapshot(
            Snapshot(
                time=f"2026-12-04T09:00:{first + i:02d}+00:00",
                hostname="host",
                username="root",
                source={"location": f"/vm/{first + i}"},
            )
        )
        for i in range(n)
    ]


def _snapshot_reads(backend: Watched) -> list[str]:
    return [name.removeprefix("snapshots/") for name, _o, _l in backend.reads if name.startswith("snapshots/")]


def _other_host(backend: Watched, tmp_path: Path, name: str = "other") -> Repository:
    """The same repository opened by another host: a cache folder of its own."""
    return Repository.open(backend, PASS, cache_root=str(tmp_path / name))


def _kept(repo: Repository, snap_id: str) -> Path:
    cache = SnapshotCache(repo.config.id, repo.backend.url, root=repo.cache_root)
    assert cache.folder is not None
    return Path(cache.folder) / snap_id


def test_a_listing_reads_only_the_snapshots_this_host_has_not_kept(tmp_path: Path) -> None:
    backend = Watched()
    repo = make_repo(backend)
    mine = _save(repo, 5)  # kept as they are written
    here = Repository.open(backend, PASS)
    backend.reads.clear()
    assert [s.id for s in here.list_snapshots()] == mine
    assert _snapshot_reads(backend) == []

    other = _other_host(backend, tmp_path)
    theirs = _save(other, 3, first=10)
    backend.reads.clear()
    assert [s.id for s in here.list_snapshots()] == mine + theirs
    assert sorted(_snapshot_reads(backend)) == sorted(theirs), "each new snapshot read once"
    backend.reads.clear()
    assert here.find_snapshot("latest").id == theirs[-1]
    assert here.find_snapshot(theirs[0][:10]).id == theirs[0]
    assert _snapshot_reads(backend) == []
    # a host with an empty cache reads them all once
    fresh = _other_host(backend, tmp_path, "fresh")
    backend.reads.clear()
    assert len(fresh.list_snapshots()) == 8 and len(_snapshot_reads(backend)) == 8
    assert len(fresh.list_snapshots()) == 8 and len(_snapshot_reads(backend)) == 8


@pytest.mark.parametrize("how", ["flipped", "cut short", "empty", "another snapshot's", "a link", "a folder", "a FIFO"])
def test_a_bad_copy_is_read_from_the_storage_again(how: str, tmp_path: Path) -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _save(repo, 3)
    path = _kept(repo, ids[1])
    good = path.read_bytes()
    if how == "flipped":
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    elif how == "cut short":
        path.write_bytes(good[: len(good) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "another snapshot's":
        path.write_bytes(_kept(repo, ids[0]).read_bytes())
    elif how == "a link":
        outside = tmp_path / "planted"
        outside.write_bytes(_kept(repo, ids[0]).read_bytes())
        path.unlink()
        path.symlink_to(outside)
    elif how == "a folder":
        path.unlink()
        path.mkdir()
    else:  # opened without blocking, and refused: not a regular file
        path.unlink()
        os.mkfifo(path)
    backend.reads.clear()
    listed = Repository.open(backend, PASS).list_snapshots()
    assert [s.id for s in listed] == ids
    assert listed[1].source == {"location": "/vm/1"}
    assert _snapshot_reads(backend) == [ids[1]]
    if how != "a folder":
        assert path.read_bytes() == good and not path.is_symlink(), "the bad copy was replaced"
    if how == "a link":
        assert (tmp_path / "planted").read_bytes() == _kept(repo, ids[0]).read_bytes(), "nothing written through it"


def test_a_forgotten_snapshot_is_not_listed_and_its_copy_goes(tmp_path: Path) -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _save(repo, 3)
    other = _other_host(backend, tmp_path)
    other.delete_snapshot(ids[0])  # forgotten from another host
    backend.inner.delete(f"snapshots/{ids[1]}")  # or withheld by the storage
    here = Repository.open(backend, PASS)
    assert [s.id for s in here.list_snapshots()] == [ids[2]]
    assert not _kept(repo, ids[0]).exists() and not _kept(repo, ids[1]).exists()
    assert here.find_snapshot("latest").id == ids[2]
    with pytest.raises(SnapshotNotFoundError):
        here.find_snapshot(ids[1][:12])
    # a leftover of an interrupted write goes too
    leftover = _kept(repo, ids[2]).with_name(ids[2] + ".tmp-0123456789ab")
    leftover.write_bytes(b"half")
    here.list_snapshots()
    assert not leftover.exists() and _kept(repo, ids[2]).exists()


def test_check_prune_and_repair_read_the_storage_s_copy() -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _save(repo, 2)
    sealed = bytearray(backend.inner.get(f"snapshots/{ids[0]}"))
    sealed[-1] ^= 1
    backend.inner.put(f"snapshots/{ids[0]}", bytes(sealed))
    here = Repository.open(backend, PASS)
    # this host's intact copy still restores it ...
    assert [s.id for s in here.list_snapshots()] == ids
    # ... but the damage in the storage is found where it is looked for
    report = check(here)
    assert any(p.kind == "snapshot-damaged" and p.object_id == ids[0] for p in report.errors), report.to_dict()
    assert [u[0] for u in repair_snapshots(here, dry_run=True).unreadable] == [ids[0]]
    with pytest.raises(IntegrityError, match="prune stopped"):
        prune(here)
    problems: list[str] = []
    here.list_snapshots(on_error=lambda sid, exc: problems.append(sid), kept=False)
    assert problems == [ids[0]]
    with pytest.raises(IntegrityError):
        here.load_snapshot(ids[0])  # by id alone: the storage's copy


def test_load_by_id_alone_reads_the_storage() -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _save(repo, 1)
    backend.inner.delete(f"snapshots/{ids[0]}")
    with pytest.raises(SnapshotNotFoundError):
        Repository.open(backend, PASS).load_snapshot(ids[0])


def test_an_unusable_cache_folder_costs_reads_only(tmp_path: Path) -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _save(repo, 2)
    root = tmp_path / "root"
    root.mkdir()
    (root / "snapshots").write_text("not a folder")
    here = Repository.open(backend, PASS, cache_root=str(root))
    backend.reads.clear()
    assert [s.id for s in here.list_snapshots()] == ids
    assert [s.id for s in here.list_snapshots()] == ids
    assert len(_snapshot_reads(backend)) == 4
    assert (root / "snapshots").read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing a folder's owner needs root")
def test_a_folder_of_another_user_is_not_used(tmp_path: Path) -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _save(repo, 1)
    root = tmp_path / "root"
    (root / "snapshots").mkdir(parents=True)
    os.chown(root / "snapshots", 12345, 12345)
    here = Repository.open(backend, PASS, cache_root=str(root))
    backend.reads.clear()
    assert [s.id for s in here.list_snapshots()] == ids
    assert [s.id for s in here.list_snapshots()] == ids
    assert len(_snapshot_reads(backend)) == 2
    assert list((root / "snapshots").iterdir()) == []


def test_copies_are_private_and_a_memory_repository_keeps_none(tmp_path: Path) -> None:
    backend = Watched()
    repo = make_repo(backend)
    ids = _save(repo, 1)
    path = _kept(repo, ids[0])
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    root = tmp_path / "mem"
    mem = Repository.init(MemoryBackend(), PASS, cache_root=str(root))
    _save(mem, 2)
    assert len(mem.list_snapshots()) == 2
    assert not (root / "snapshots").exists() or not any((root / "snapshots").rglob("*"))


def test_only_snapshot_ids_name_copies(tmp_path: Path) -> None:
    """Names that are not snapshot ids are never paths in the cache folder, whoever passes them."""
    cache = SnapshotCache("r" * 32, "file:///x", root=str(tmp_path / "root"))
    assert cache.folder is not None
    (tmp_path / "root" / "victim").write_bytes(b"keep")
    for name in ("../../victim", "A" * 64, "a" * 63, "a" * 64 + "/x", ""):
        cache.put(name, b"sealed")
        assert cache.get(name) is None
        cache.discard(name)
    assert os.listdir(cache.folder) == []
    assert (tmp_path / "root" / "victim").read_bytes() == b"keep"


def test_a_snapshot_the_storage_does_not_keep_is_not_saved(tmp_path: Path) -> None:
    """This host reads its own copy of a snapshot in place of the storage's: a snapshot object
    the storage kept other bytes of read well here and failed only on another host, the one a
    restore after losing this host runs on. It is read back when written: an error, and no
    snapshot, neither in the storage nor in this host's copies."""
    backend = KeepsOtherBytes()
    repo = make_repo(backend)
    backend.garble, backend.prefix = True, "snapshots/"
    with pytest.raises(IntegrityError, match=r"other bytes read back: .*; the snapshot was not saved"):
        _save(repo, 1)
    assert list(backend.list("snapshots/")) == []
    assert repo.list_snapshots() == [] and _other_host(backend, tmp_path).list_snapshots() == []
    backend.garble = False
    saved = _save(repo, 1)
    assert [s.id for s in _other_host(backend, tmp_path, "third").list_snapshots()] == saved

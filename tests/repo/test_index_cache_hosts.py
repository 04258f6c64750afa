"""Several hosts on one repository, each with its own index cache (repository-format.md,
sections 12.3 and 12.4): a prune on one host never makes another host's stale cache restore
wrong data or deduplicate against packs that are gone; and what a killed check or prune
leaves of its scratch database is removed by the next one."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.repo.builders import PASS, Content, backup, dead_pid, disk_image, make_repo, restore_all
from vmvault.backends.base import ObjectInfo
from vmvault.backends.local import LocalBackend
from vmvault.repo import check, forget, prune
from vmvault.repo.index_cache import IndexCache
from vmvault.repo.repository import Repository
from vmvault.repo.retention import RetentionPolicy


def host(path: Path, cache: Path) -> Repository:
    return Repository.open(LocalBackend(str(path)), PASS, cache_root=str(cache))


def test_a_prune_on_one_host_and_a_stale_cache_on_another(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    a_cache, b_cache = tmp_path / "host-a", tmp_path / "host-b"
    first = Content(disks={"d": disk_image(1, 40)})
    second = Content(disks={"d": disk_image(2, 40)})
    repo = make_repo(LocalBackend(str(path)))
    repo.close()
    a = host(path, a_cache)
    backup(a, first, location="vm1")
    snap2 = backup(a, second, location="vm1")
    a.close()  # host A's cache now lists every chunk of both snapshots

    b = host(path, b_cache)
    forget(b, RetentionPolicy(last=1), select=None)
    report = prune(b)
    assert report.packs_deleted  # the first disk's chunks are gone from storage
    b.close()

    # host A again, its cache as it left it: it catches up at first use
    a = host(path, a_cache)
    a.load_index()
    # the index files prune superseded are out of A's lookups: nothing points into deleted packs
    gone = a.key.chunk_id(first.disks["d"][:4096])
    assert a.index.locations(gone) == []
    assert not a.index.lost  # found by syncing, not by stumbling on missing packs
    assert restore_all(a, a.load_snapshot(snap2.id)) == second
    # the first disk's chunks were pruned: stored again, not deduplicated against its old packs
    snap3 = backup(a, first, location="vm1")
    a.close()
    a = host(path, a_cache)
    assert restore_all(a, a.load_snapshot(snap3.id)) == first
    assert check(a, read_data=True).ok
    a.close()
    b = host(path, b_cache)
    assert check(b, read_data=True).ok
    assert restore_all(b, b.load_snapshot(snap3.id)) == first
    b.close()


def test_a_killed_runs_scratch_database_is_removed_by_the_next(tmp_path: Path) -> None:
    cache = IndexCache("ab" * 16, "file:///x", root=str(tmp_path))
    folder = Path(cache.path).parent
    dead = folder / f"{Path(cache.path).name}.scratch-{dead_pid()}-00000000"
    dead.write_bytes(b"left by a killed prune")
    alive = folder / f"{Path(cache.path).name}.scratch-{os.getpid()}-11111111"
    alive.write_bytes(b"a running check of this process")
    with cache.scratch() as conn:
        conn.execute("CREATE TABLE s.t(x)")
        mine = [p for p in folder.iterdir() if ".scratch-" in p.name and p not in (dead, alive)]
        assert len(mine) == 1
    assert not dead.exists()
    assert alive.exists()  # a live process's scratch database is left alone
    assert not mine[0].exists()  # and this one's is removed at the end
    cache.close()


def test_check_and_prune_list_folder_by_folder_above_one_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (check, prune and the backup's listing all ask ``Repository.pack_listings``)
    monkeypatch.setattr(sys.modules["vmvault.repo.repository"], "ONE_LISTING", 1)
    path = tmp_path / "repo"
    repo = make_repo(LocalBackend(str(path)))
    keep = Content(disks={"d": disk_image(2, 40)})
    backup(repo, Content(disks={"d": disk_image(1, 40)}), location="vm1")
    snap = backup(repo, keep, location="vm1")
    stored_before = len(dict(repo.iter_stored_packs()))
    listed: list[str] = []
    original = LocalBackend.list

    def counting(self: LocalBackend, prefix: str = "") -> Iterator[ObjectInfo]:
        listed.append(prefix)
        return original(self, prefix)

    monkeypatch.setattr(LocalBackend, "list", counting)
    repo = host(path, tmp_path / "cache")
    report = check(repo)
    assert report.ok and report.stats["packs_stored"] == stored_before
    assert "data/00/" in listed and "data/" not in listed
    forget(repo, RetentionPolicy(last=1))
    assert prune(repo).packs_deleted
    assert restore_all(repo, repo.load_snapshot(snap.id)) == keep
    assert check(repo, read_data=True).ok

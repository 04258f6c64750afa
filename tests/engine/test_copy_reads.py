"""What ``copy`` reads from storage per index block and per earlier copy: the blocks' reads are
made ahead, several at once (one after another they cost a round trip each); the pair a
snapshot follows is read once; a parent copy that no longer reads gives way to the location's
newest copy."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.engine.helpers import Far
from tests.repo.builders import CHUNK, Content, backup, disk_image, make_repo, read_disk, reopen
from vmvault.backends.local import LocalBackend
from vmvault.engine.copy import copy_snapshots
from vmvault.errors import IntegrityError
from vmvault.repo.check import check
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot


def _repos(tmp_path: Path) -> tuple[Repository, Repository]:
    return make_repo(LocalBackend(str(tmp_path / "src"))), make_repo(LocalBackend(str(tmp_path / "dst")))


def _changed(disk: bytes, chunk: int, seed: int) -> bytes:
    fresh = disk_image(seed, 1, zero_every=0)
    return disk[: chunk * CHUNK] + fresh + disk[(chunk + 1) * CHUNK :]


def _copy_of(dst: Repository, source_id: str) -> str:
    return next(s.id for s in reopen(dst).list_snapshots() if s.extra["copied_from"]["snapshot"] == source_id)


def _on_whole_loads(repo: Repository, monkeypatch: pytest.MonkeyPatch, seen: Callable[[str], None]) -> None:
    """Call ``seen`` with the id of each snapshot ``repo`` loads whole, before it is loaded (it
    may raise), but for the loads a listing makes (summaries)."""
    listing = threading.Event()
    load, list_snapshots = repo.load_snapshot, repo.list_snapshots

    def loading(snap_id: str, **kwargs: Any) -> Snapshot:
        if not listing.is_set():
            seen(snap_id)
        return load(snap_id, **kwargs)

    def listed(**kwargs: Any) -> list[Snapshot]:
        listing.set()
        try:
            return list_snapshots(**kwargs)
        finally:
            listing.clear()

    monkeypatch.setattr(repo, "load_snapshot", loading)
    monkeypatch.setattr(repo, "list_snapshots", listed)


def test_the_target_blocks_a_copy_takes_over_are_read_several_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 index blocks taken over, each read from a target 20 ms away: the reads overlap (one
    at a time before, 100 round trips in a row) and the copy reads back and checks clean."""
    src, dst = _repos(tmp_path)
    disk = disk_image(11, 400)
    first = backup(src, Content(disks={"sda": disk}))
    copy_snapshots(src, dst, workers=4)
    changed = _changed(disk, 7, 12)
    second = backup(src, Content(disks={"sda": changed}), parent=first.id)
    far = Far(dst.read_index_block)
    monkeypatch.setattr(dst, "read_index_block", far)
    report = copy_snapshots(src, dst, workers=4)
    assert report.index_blocks_reused == sum(b is not None for b in second.disks[0].index) - 1
    assert report.chunks_read == 1
    assert far.calls >= report.index_blocks_reused
    assert far.most >= 3, far.most
    monkeypatch.undo()
    dst = reopen(dst)
    copy = dst.load_snapshot(_copy_of(dst, second.id))
    assert read_disk(dst, copy.disks[0]) == changed
    assert check(dst, read_data=True).ok


def test_the_pair_a_snapshot_follows_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot copied after its parent's copy: the parent and its copy are read whole once
    (twice before: once for their blocks, again for the pair the snapshot follows)."""
    src, dst = _repos(tmp_path)
    disk = disk_image(13, 200)
    first = backup(src, Content(disks={"sda": disk}))
    copy_snapshots(src, dst)
    second = backup(src, Content(disks={"sda": _changed(disk, 3, 14)}), parent=first.id)
    loads: dict[str, list[str]] = {"src": [], "dst": []}
    _on_whole_loads(src, monkeypatch, loads["src"].append)
    _on_whole_loads(dst, monkeypatch, loads["dst"].append)
    report = copy_snapshots(src, dst)
    assert [c.source_id for c in report.copied] == [second.id]
    assert sorted(loads["src"]) == sorted([first.id, second.id]), loads
    assert len(loads["dst"]) == 1, loads
    assert report.chunks_read == 1


def test_a_parent_copy_that_no_longer_reads_gives_way_to_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C's parent is A, whose copy in the target was listed but no longer reads (damaged since,
    on a host that kept no copy of it); B (A with one chunk changed) is the location's newest
    copy. C, B with one more chunk of the same index block changed, follows B: one chunk is
    downloaded (52 before: the block's every chunk, nothing learnt for its place)."""
    src, dst = _repos(tmp_path)
    disk_a = disk_image(15, 256)
    a = backup(src, Content(disks={"sda": disk_a}), span=64)
    copy_snapshots(src, dst)
    disk_b = _changed(disk_a, 10, 16)
    b = backup(src, Content(disks={"sda": disk_b}), span=64, parent=a.id)
    copy_snapshots(src, dst)
    copy_a = _copy_of(dst, a.id)
    disk_c = _changed(disk_b, 12, 17)
    c = backup(src, Content(disks={"sda": disk_c}), span=64, parent=a.id)

    def damaged(snap_id: str) -> None:
        if snap_id == copy_a:
            raise IntegrityError(f"snapshot {snap_id}: damaged")

    _on_whole_loads(dst, monkeypatch, damaged)
    report = copy_snapshots(src, dst)
    assert [x.source_id for x in report.copied] == [c.id]
    assert report.chunks_read == 1, report.chunks_read
    monkeypatch.undo()
    dst = reopen(dst)
    assert read_disk(dst, dst.load_snapshot(_copy_of(dst, c.id)).disks[0]) == disk_c
    assert read_disk(dst, dst.load_snapshot(_copy_of(dst, b.id)).disks[0]) == disk_b

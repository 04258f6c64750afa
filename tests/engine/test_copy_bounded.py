"""``copy`` holds neither a pairing per chunk nor every earlier copy: the source -> target
pairings live in a scratch table, earlier copies are read whole one pair at a time (summaries
otherwise), and a changed index block has its chunks paired with the earlier block at its
place, not every block of the earlier copy."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.repo.builders import CHUNK, Content, backup, disk_image, make_repo, read_disk, reopen
from vmvault.backends.local import LocalBackend
from vmvault.engine.copy import CopyFilter, copy_snapshots
from vmvault.repo.check import check
from vmvault.repo.repository import Repository


def _repos(tmp_path: Path, name: str = "") -> tuple[Repository, Repository]:
    # local storage: a memory backend's objects would be counted as the copy's memory
    src = make_repo(LocalBackend(str(tmp_path / f"src{name}")), pack_size=1 << 20)
    dst = make_repo(LocalBackend(str(tmp_path / f"dst{name}")), pack_size=1 << 20)
    return src, dst


def _peak(run: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _changed(disk: bytes, chunk: int, seed: int) -> bytes:
    fresh = disk_image(seed, 1, zero_every=0)
    return disk[: chunk * CHUNK] + fresh + disk[(chunk + 1) * CHUNK :]


def _count_block_reads(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    reads: list[bytes] = []
    read = repo.read_index_block

    def counting(block_id: bytes, **kwargs: object) -> object:
        reads.append(block_id)
        return read(block_id, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repo, "read_index_block", counting)
    return reads


def test_a_first_copy_holds_no_pairing_per_chunk(tmp_path: Path) -> None:
    """1,000 against 10,000 chunks copied: the peak of Python memory stays within 0.5 MiB (a
    dict of every chunk's pairing grew by about 1.2 MiB)."""
    warm_src, warm_dst = _repos(tmp_path, "-warm")
    backup(warm_src, Content(disks={"sda": disk_image(7, 40)}), span=256)
    copy_snapshots(warm_src, warm_dst)  # anything done once per process, before the measurement
    peaks = {}
    for n in (1_000, 10_000):
        src, dst = _repos(tmp_path, str(n))
        snap = backup(src, Content(disks={"sda": disk_image(1, n)}), span=256)
        peaks[n] = _peak(lambda src=src, dst=dst: copy_snapshots(src, dst))
        dst = reopen(dst)
        (copy,) = dst.list_snapshots()
        assert read_disk(dst, copy.disks[0]) == read_disk(src, snap.disks[0])
    assert peaks[10_000] - peaks[1_000] < 512 * 1024, peaks


def test_a_copy_after_many_copies_holds_summaries_of_them(tmp_path: Path) -> None:
    """5 against 40 snapshots copied before: the next copy's peak stays within 0.5 MiB
    (holding every earlier copy whole, source and target, grew by about 2 MiB: these test
    manifests name an index block per 4 chunks)."""
    peaks = {}
    for k in (5, 40):
        src, dst = _repos(tmp_path, str(k))
        disk = disk_image(2, 1_000)
        for _ in range(k):
            backup(src, Content(disks={"sda": disk}))
        copy_snapshots(src, dst)
        backup(src, Content(disks={"sda": _changed(disk, 10, 99)}))
        peaks[k] = _peak(lambda src=src, dst=dst: copy_snapshots(src, dst))
    assert peaks[40] - peaks[5] < 512 * 1024, peaks


def test_a_changed_block_is_paired_with_the_earlier_block_at_its_place_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One chunk of 1,000 changed (250 index blocks): the source's blocks read are the
    changed one and the earlier one at its place (every block of the earlier copy before),
    and one chunk is downloaded."""
    src, dst = _repos(tmp_path)
    disk = disk_image(3, 1_000)
    first = backup(src, Content(disks={"sda": disk}))
    copy_snapshots(src, dst)
    changed = _changed(disk, 10, 5)
    second = backup(src, Content(disks={"sda": changed}), parent=first.id)
    src_reads = _count_block_reads(src, monkeypatch)
    report = copy_snapshots(src, dst)
    assert report.chunks_read == 1 and report.chunks_added == 1
    assert len(src_reads) == 2, len(src_reads)
    assert report.index_blocks_reused == sum(b is not None for b in second.disks[0].index) - 1
    dst = reopen(dst)
    copy = next(s for s in dst.list_snapshots() if s.extra["copied_from"]["snapshot"] == second.id)
    assert read_disk(dst, copy.disks[0]) == changed
    assert copy.parent is not None and copy.parent != copy.id


def test_a_clone_of_another_vm_takes_over_its_index_blocks(tmp_path: Path) -> None:
    """VM b's disk is a copy of VM a's: with a copied before, b's blocks are taken over and
    nothing is downloaded (the newest copy of every source location is learnt from)."""
    src, dst = _repos(tmp_path)
    disk = disk_image(4, 400)
    backup(src, Content(disks={"sda": disk}), location="a")
    copy_snapshots(src, dst)
    clone = backup(src, Content(disks={"sda": disk}), location="b")
    report = copy_snapshots(src, dst)
    assert report.chunks_read == 0 and report.chunks_added == 0
    assert report.index_blocks_reused == sum(b is not None for b in clone.disks[0].index)


def test_an_older_snapshot_copied_after_a_newer_one(tmp_path: Path) -> None:
    """Copied out of order (``--latest 1`` first, then everything): the older snapshot
    follows the newest copy of its location, downloads only the chunk that differs, and both
    copies read back and check clean."""
    src, dst = _repos(tmp_path)
    disk = disk_image(6, 300)
    old = backup(src, Content(disks={"sda": disk}))
    newer_disk = _changed(disk, 5, 8)
    new = backup(src, Content(disks={"sda": newer_disk}), parent=old.id)
    first = copy_snapshots(src, dst, filters=CopyFilter(latest=1))
    assert [c.source_id for c in first.copied] == [new.id]
    second = copy_snapshots(src, dst)
    assert [c.source_id for c in second.copied] == [old.id] and second.skipped == [new.id]
    assert second.chunks_read == 1
    dst = reopen(dst)
    by_source = {s.extra["copied_from"]["snapshot"]: s for s in dst.list_snapshots()}
    assert read_disk(dst, by_source[old.id].disks[0]) == disk
    assert read_disk(dst, by_source[new.id].disks[0]) == newer_disk
    assert check(dst, read_data=True).ok

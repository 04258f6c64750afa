"""``repair index`` in bounded memory (repository-format.md, section 12.9).

The rebuild keeps its working sets in a scratch database: what each index file lists, the
packs in storage, which packs the new index lists, the blobs that failed. These tests check
that the listing it writes is the packs' own (one record per present pack, each entry once,
whatever several or superseded index files said) and that its memory does not grow with
the number of entries. tests/repo/test_attack_damage.py holds the damage cases (lost,
truncated, flipped and unreadable packs, dry runs).
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from tests.repo.builders import PASS, Content, WatchedPacks, backup, disk_image, make_repo, reopen, restore_all
from vmvault.backends.local import LocalBackend
from vmvault.repo import check, repair, repair_index, repository
from vmvault.repo._layout import BlobType
from vmvault.repo.index import IndexFile, parse_index
from vmvault.repo.index_block import is_chunk
from vmvault.repo.index_cache import IndexCache
from vmvault.repo.pack import BlobEntry, expected_pack_size, pack_name, read_pack_header
from vmvault.repo.repository import Repository
from vmvault.repo.rewrite import IndexFileWriter


def _listing(repo: Repository) -> dict[bytes, list[tuple[int, bytes, int, int, int]]]:
    """What the live index files list: pack -> its rows, sorted (a pack listed twice fails)."""
    fresh = reopen(repo)
    live = fresh.index.cache.present_files()
    out: dict[bytes, list[tuple[int, bytes, int, int, int]]] = {}
    for file_id, is_live in live.items():
        if not is_live:
            continue
        parsed = parse_index(fresh.read_index_payload(file_id), name=file_id.hex())
        for rec in parsed.records:
            assert rec.pack_id not in out, "a pack is listed by two live index files"
            out[rec.pack_id] = sorted(rec.rows(), key=lambda r: r[2])
    return out


def _headers(
    repo: Repository, skip: frozenset[bytes] = frozenset()
) -> dict[bytes, list[tuple[int, bytes, int, int, int]]]:
    return {
        p: sorted(
            (
                (int(e.type), e.id, e.offset, e.length, e.raw_length)
                for e in read_pack_header(repo.backend, repo.key, p, n, limit=repo.pack_limit)
            ),
            key=lambda r: r[2],
        )
        for p, n in dict(repo.iter_stored_packs()).items()
        if p not in skip
    }


def test_the_new_index_lists_each_pack_once_as_its_header_does(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    contents = []
    for day in range(3):
        content = Content(disks={"sda": disk_image(day, 24)}, files={"vm.conf": b"x" * (300 + day)})
        contents.append((backup(repo, content), content))
    packs = repo.index.packs()
    first, unlisted = sorted(packs)[:2]
    originals = [bytes.fromhex(o.name.split("/")[1]) for o in repo.backend.list("index/")]
    listing_unlisted = [
        f
        for f in originals
        if any(r.pack_id == unlisted for r in parse_index(repo.read_index_payload(f), name="").records)
    ]
    # every pack but one listed again by a second file, entries in another order
    again = IndexFile(version=repo.index_version)
    for p in reversed(sorted(packs)):
        if p != unlisted:
            again.packs[p] = list(reversed(packs[p]))
    repo.write_index_file(again)
    # a file listing a pack with an entry it does not hold, then a file superseding it and the
    # files that list the one pack left out above: that pack is read from its header
    liar = IndexFile(version=repo.index_version)
    liar.packs[first] = [*packs[first], BlobEntry(BlobType.DATA, os.urandom(32), 1 << 20, 100, 100)]
    liar_id = repo.write_index_file(liar)
    repo.write_index_file(IndexFile(version=repo.index_version, supersedes=[liar_id, *listing_unlisted]))
    before = len(list(repo.backend.list("index/")))

    report = repair_index(reopen(repo))
    assert (report.packs_kept, report.packs_recovered) == (len(packs) - 1, 1)
    assert not report.data_lost and report.packs_salvaged == [] and report.packs_dropped == []
    assert report.index_files_before == before and report.index_files_removed == before
    assert _listing(repo) == _headers(repo)
    fresh = reopen(repo)
    for snap, content in contents:
        assert restore_all(fresh, snap) == content
    assert check(fresh, read_data=True).ok


def test_from_scratch_then_a_missing_pack(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    for day in range(2):
        backup(repo, Content(disks={"sda": disk_image(10 + day, 24)}, files={}))
    packs = sorted(dict(repo.iter_stored_packs()))
    lost = {e.id for e in repo.index.packs()[packs[0]]}
    repo.backend.delete(pack_name(packs[1]))
    report = repair_index(reopen(repo), from_scratch=True)
    # from scratch, the index files' entries are not read: the missing pack is unknown
    assert report.packs_recovered == len(packs) - 1 and report.packs_dropped == [] and not report.data_lost
    assert _listing(repo) == _headers(repo)
    repo.backend.delete(pack_name(packs[0]))
    report = repair_index(reopen(repo))
    assert report.packs_dropped == [packs[0].hex()] and report.blobs_lost == len(lost) and report.data_lost
    assert report.packs_kept == len(packs) - 2
    assert _listing(repo) == _headers(repo)


def _synthetic(repo: Repository, root: Path, entries: int, per_pack: int = 64) -> None:
    """``entries`` random blob ids in packs of ``per_pack`` that are sparse files of the size
    their entries give (repair compares sizes, not bytes), listed by index files of about
    40,000 entries; this host's cache brought up to date afterwards."""
    current = IndexFile(version=repo.index_version)
    in_file = 0
    for start in range(0, entries, per_pack):
        n = min(per_pack, entries - start)
        ids = os.urandom(32 * n)
        listed = [BlobEntry(BlobType.DATA, ids[i * 32 : i * 32 + 32], i * 1000, 1000, 900) for i in range(n)]
        pack_id = os.urandom(32)
        path = root / pack_name(pack_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = expected_pack_size(listed)
        with open(path, "wb") as f:
            f.truncate(size)
        current.packs[pack_id] = listed
        current.lengths[pack_id] = size
        in_file += n
        if in_file >= 40_000:
            repo.write_index_file(current)
            current, in_file = IndexFile(version=repo.index_version), 0
    if current.packs:
        repo.write_index_file(current)
    repo.load_index()


def _peak_of_repair(tmp_path: Path, entries: int, monkeypatch: pytest.MonkeyPatch) -> int:
    root = tmp_path / f"repo-{entries}"
    repo = make_repo(LocalBackend(str(root)))
    _synthetic(repo, root, entries)
    repo = Repository.open(repo.backend, PASS)
    repo.load_index()
    # index files of 256 KiB: the one file being written is the only listing held (at the
    # 64 MiB of a real file it would hide any growth of this size)
    monkeypatch.setattr(repair, "IndexFileWriter", functools.partial(IndexFileWriter, limit=256 << 10))
    gc.collect()
    tracemalloc.start()
    try:
        report = repair_index(repo)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.packs_kept == -(-entries // 64) and not report.data_lost
    assert report.index_files_removed == -(-entries // 40_000)
    return peak


def test_repair_memory_does_not_grow_with_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = _peak_of_repair(tmp_path, 20_000, monkeypatch)
    large = _peak_of_repair(tmp_path, 200_000, monkeypatch)
    # a listing held in memory costs at least 45 bytes an entry (about 130 as objects): 8 MiB
    # or more for the 180,000 more entries
    assert large - small < 3 << 20, f"peak {small / 2**20:.1f} MiB at 20,000 entries, {large / 2**20:.1f} at 200,000"


def _peak_of_forget_lost(tmp_path: Path, packs: int, monkeypatch: pytest.MonkeyPatch) -> int:
    # listed a data/xx/ folder at a time, as a repository of more than ONE_LISTING packs is
    # (one listing holds its 1/256th)
    monkeypatch.setattr(repository, "ONE_LISTING", 1000)
    # and into the scratch table 500 rows a statement (10,000 would be 1.6 MiB of either size)
    monkeypatch.setattr(repository, "_SCRATCH_BATCH", 500)
    root = tmp_path / f"lost-{packs}"
    repo = make_repo(LocalBackend(str(root)))
    _synthetic(repo, root, packs * 2, per_pack=2)
    repo = Repository.open(repo.backend, PASS)
    repo.load_index()
    gone = sorted(dict(repo.iter_stored_packs()))[packs // 2]
    in_gone = {e.id for e in repo.index.packs()[gone]}
    repo.backend.delete(pack_name(gone))
    gc.collect()
    tracemalloc.start()
    try:
        lost = repo.forget_lost_packs()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lost.missing_packs == [gone] and lost.short_packs == [] and lost.blobs == in_gone
    assert not any(b in repo.index for b in in_gone)
    return peak


def test_repair_snapshots_finds_lost_packs_in_memory_that_does_not_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``repair snapshots`` starts by leaving the blobs of missing and short packs out
    (``forget_lost_packs``): the listing of ``data/`` goes into a scratch table, not a dict."""
    small = _peak_of_forget_lost(tmp_path, 2_000, monkeypatch)
    large = _peak_of_forget_lost(tmp_path, 20_000, monkeypatch)
    # a listing held in memory costs about 200 bytes a pack: 3.4 MiB for the 18,000 more
    assert large - small < 1 << 20, f"peak {small / 2**20:.1f} MiB at 2,000 packs, {large / 2**20:.1f} at 20,000"


def test_a_missing_pack_whose_blobs_have_other_copies_loses_nothing(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    content = Content(disks={"sda": disk_image(7, 16)}, files={"vm.conf": b"conf" * 100})
    snap = backup(repo, content)
    first = set(dict(repo.iter_stored_packs()))
    # every blob stored a second time, as a backup after a loss (or a concurrent one) does
    writer = repo.writer(upload_threads=1, dedup=False)
    for blob_id, loc in list(repo.index.items()):
        writer.add(loc.entry.type, blob_id, repo.get_blob(loc.entry.type, blob_id))
    writer.close()
    gone = sorted(first)[0]
    repo.backend.delete(pack_name(gone))
    # and a truncated one, whose blobs all fail to open but have copies too
    cut = sorted(first)[1]
    path = tmp_path / "repo" / pack_name(cut)
    path.write_bytes(path.read_bytes()[:10])
    report = repair_index(reopen(repo))
    assert report.packs_dropped == [gone.hex()] and report.packs_salvaged == [cut.hex()]
    assert report.blobs_salvaged == 0 and report.blobs_lost == 0 and not report.data_lost
    fresh = reopen(repo)
    assert restore_all(fresh, snap) == content
    assert _listing(fresh) == _headers(fresh, skip=frozenset([cut]))


def test_repair_snapshots_reads_a_block_shared_by_snapshots_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    base = disk_image(3, 40)
    snaps = []
    for day in range(3):
        disk = bytearray(base)
        disk[day * 4096 : (day + 1) * 4096] = os.urandom(4096)  # one chunk differs a day
        snaps.append(backup(repo, Content(disks={"sda": bytes(disk)}, files={})))
    blocks = {b for s in snaps for b in s.disks[0].index if b is not None}
    assert sum(b is not None for s in snaps for b in s.disks[0].index) > len(blocks)  # shared ones
    reads: list[int] = []
    lookups: list[int] = []
    read_block = Repository.read_index_block
    ends_many = IndexCache.ends_many

    def reading(self: Repository, *args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        return read_block(self, *args, **kwargs)

    def looking(self: IndexCache, ids: Any) -> Any:
        ids = list(ids)
        lookups.append(len(ids))
        return ends_many(self, ids)

    monkeypatch.setattr(Repository, "read_index_block", reading)
    monkeypatch.setattr(IndexCache, "ends_many", looking)
    report = repair.repair_snapshots(reopen(repo))
    assert report.intact == 3 and report.repaired == []
    # each distinct block read once; every chunk found in the one pass in id order, none
    # asked on its own
    assert len(reads) == len(blocks) and lookups == []
    # a chunk lost from a block all three share is found in each of them
    shared = snaps[0].disks[0].index[-1]
    assert shared is not None and all(s.disks[0].index[-1] == shared for s in snaps)
    fresh = reopen(repo)
    chunk = next(c for c in fresh.read_index_block(shared) if is_chunk(c))
    loc = fresh.index.lookup(chunk)
    assert loc is not None
    named = {c for b in blocks for c in fresh.read_index_block(b) if is_chunk(c)}
    repo.backend.delete(pack_name(loc.pack_id))
    reads.clear()
    report = repair.repair_snapshots(reopen(repo), dry_run=True)
    assert sorted(r.snapshot for r in report.repaired) == sorted(s.id for s in snaps)
    # the blocks read again to cut the chunk out (once per snapshot naming it at most, those
    # found whole once); only the chunks without a copy outside the lost pack asked about on
    # their own
    naming = sum(b is not None for s in snaps for b in s.disks[0].index)
    assert len(blocks) < len(reads) <= len(blocks) + naming
    assert 0 < sum(lookups) < len(named) // 4


def test_packs_are_looked_at_several_at_once_and_the_rebuilt_index_is_the_same(tmp_path: Path) -> None:
    """A rebuild once read each pack (its header, or with ``read_data`` all of it) one after
    another, a round trip each from remote storage; now as many at once as the storage serves
    best, and what it writes is what one at a time wrote (the same repository, copied)."""
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    content = Content(disks={"sda": disk_image(5, 60)})
    snap = backup(repo, content)
    listings = {}
    for reads in (1, 4):
        shutil.copytree(tmp_path / "repo", tmp_path / f"repo{reads}")
        backend = WatchedPacks(str(tmp_path / f"repo{reads}"))
        backend.reads_at_once = reads
        copy = Repository.open(backend, PASS)
        report = repair_index(copy, from_scratch=True, read_data=True)
        assert report.packs_recovered > 8 and not report.packs_salvaged
        assert backend.most_running == reads
        fresh = reopen(copy)
        assert restore_all(fresh, fresh.load_snapshot(snap.id)) == content
        listings[reads] = _listing(copy)
    assert listings[1] == listings[4]

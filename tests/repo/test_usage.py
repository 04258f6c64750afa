"""``usage`` (``vmvault stats``): the sizes it gives, and memory that does not grow with the
number of chunks (the references go to a scratch table)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from tests.repo.builders import Content, backup, disk_image, make_repo, reopen
from vmvault.backends.memory import MemoryBackend
from vmvault.repo.index_block import is_chunk
from vmvault.repo.repository import Repository
from vmvault.repo.usage import UsageRow, snapshot_logical, usage


def _two_vms(n: int) -> Repository:
    repo = make_repo(MemoryBackend(), pack_size=1 << 20)
    shared = disk_image(9, 20)
    backup(repo, Content(disks={"sda": disk_image(1, n, shared=shared)}, files={"a.conf": b"a" * 5000}), location="a")
    backup(repo, Content(disks={"sda": disk_image(3, n, shared=shared)}, files={}), location="a")
    backup(repo, Content(disks={"sdb": disk_image(2, n // 2, shared=shared)}, files={}), location="b")
    repo = reopen(repo)
    repo.load_index()
    return repo


def _expected(repo: Repository, name: str, vm: str | None) -> UsageRow:
    """The row as a dict of every chunk gives it."""
    row = UsageRow(name)
    chunks: dict[bytes, int] = {}
    for snap in repo.list_snapshots():
        if vm is not None and snap.source["location"] != vm:
            continue
        row.snapshots += 1
        row.logical += snapshot_logical(repo, snap)
        for disk in snap.disks:
            for b, block in enumerate(disk.index):
                if block is None:
                    continue
                for i, ref in enumerate(repo.read_index_block(block)):
                    k = b * disk.index_span + i
                    if is_chunk(ref):
                        chunks.setdefault(ref, min(disk.chunk_size, disk.size - k * disk.chunk_size))
        for f in snap.files:
            for k, c in enumerate(f.chunks):
                chunks.setdefault(bytes.fromhex(c), min(repo.config.chunk_size, f.size - k * repo.config.chunk_size))
    for chunk_id, length in chunks.items():
        row.chunks += 1
        loc = repo.index.lookup(chunk_id)
        assert loc is not None
        row.unique += loc.entry.raw_length or length
        row.stored += loc.entry.length
    return row


def test_rows_are_what_a_dict_of_every_chunk_gives() -> None:
    repo = _two_vms(300)
    rows, total = usage(repo, repo.list_snapshots(summaries=True))
    assert [r.name for r in rows] == ["a", "b"]
    assert rows[0] == _expected(repo, "a", "a") and rows[1] == _expected(repo, "b", "b")
    assert total == _expected(repo, "all", None)
    assert total.unique < rows[0].unique + rows[1].unique  # the shared chunks count once in all
    assert total.unindexed == 0 and total.stored > 0


def test_memory_does_not_grow_with_the_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 against 20,000 chunks a disk: the peak of Python memory stays (a dict of every
    chunk grew by about 3.6 MiB). The snapshots are read whole before the measurement (these
    test snapshots name an index block per 4 chunks, so their manifests grow with the disks;
    real ones name one per 4,096)."""
    peaks = {}
    for n in (2_000, 20_000):
        repo = _two_vms(n)
        snaps = repo.list_snapshots(summaries=True)
        wholes = list(repo.whole(snaps))
        monkeypatch.setattr(repo, "whole", lambda _snaps, _wholes=wholes, **_kw: iter(_wholes))
        usage(repo, snaps)  # anything done once per process, before the measurement
        gc.collect()
        tracemalloc.start()
        try:
            _rows, total = usage(repo, snaps)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert total.chunks > n
    assert peaks[20_000] - peaks[2_000] < 1 << 20, peaks

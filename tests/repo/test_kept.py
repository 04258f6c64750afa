"""This host's copies of the index blocks (repo/kept.py, repository-format.md section 12.11):
an incremental backup, a copy or a restore on the host that wrote or read a block reads no
block from the storage; a kept block is checked as the stored one is (damaged, swapped, cut
short, a link or not a file: read from the storage again); a block whose pack is gone is gone
whatever is kept; check reads the storage; the copies stay within their limit, least recently
used first out; a nearly full cache folder keeps nothing. The backend is test_fetch's
``Watched`` (it records every read)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.engine.helpers import ScriptedSource, SparseDisk
from tests.repo.builders import PASS
from tests.repo.test_fetch import Watched
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import ConfigError, IntegrityError
from vmvault.repo import kept as kept_module
from vmvault.repo.check import check
from vmvault.repo.index_block import INDEX_SPAN
from vmvault.repo.kept import KeptBlocks
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 4096
BLOCK = INDEX_SPAN * CS
BLOCKS = 6


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _block_reads(backend: Watched) -> int:
    """Reads of index blocks: ranged reads of packs longer than the one byte a confirmation
    reads (a backup reads no chunk)."""
    return sum(1 for name, _offset, length in backend.reads if name.startswith("data/") and (length or 0) > 1)


def _backed_up(tmp_path: Path) -> tuple[Watched, ScriptedSource, Snapshot]:
    """A disk of six index blocks backed up into a repository this host keeps blocks of."""
    rnd = random.Random(5)
    disk = SparseDisk(BLOCKS * BLOCK, {b * BLOCK: rnd.randbytes(3 * CS) for b in range(BLOCKS)})
    backend = Watched()
    repo = Repository.init(backend, PASS, chunk_size=CS, cache_root=str(tmp_path / "host"))
    source = ScriptedSource(disk)  # type: ignore[arg-type]
    snap = backup(repo, source).snapshot
    return backend, source, snap


def _change(source: ScriptedSource) -> None:
    disk = source.disk
    assert isinstance(disk, SparseDisk)
    for b in range(BLOCKS):
        old = disk.pieces[b * BLOCK]
        disk.pieces[b * BLOCK] = old[:CS] + os.urandom(CS) + old[2 * CS :]
    source.changed = [(b * BLOCK + CS, CS) for b in range(BLOCKS)]


def _kept(repo: Repository) -> KeptBlocks:
    return KeptBlocks(repo.config.id, repo.backend.url, root=repo.cache_root)


def test_the_host_that_wrote_the_blocks_reads_none_of_them_again(tmp_path: Path) -> None:
    """Incrementals on the writing host read no index block from the storage (they read each
    parent block twice before: to confirm its chunks, and to change it); another host reads
    each once, then keeps it; restores there read none either."""
    backend, source, _first = _backed_up(tmp_path)
    here = Repository.open(backend, PASS, cache_root=str(tmp_path / "host"))
    _change(source)
    backend.reads.clear()
    second = backup(here, source).snapshot
    assert second.disks[0].stats["incremental"] == 1
    assert _block_reads(backend) == 0

    other = Repository.open(backend, PASS, cache_root=str(tmp_path / "other"))
    _change(source)
    backend.reads.clear()
    assert backup(other, source).snapshot.disks[0].stats["incremental"] == 1
    assert _block_reads(backend) == BLOCKS  # the parent's, once each (twice each before)
    third = other.find_snapshot("latest")
    blocks = [bytes.fromhex(b) for b in third.disks[0].index if b is not None]
    where = {
        (pack_name(loc.pack_id), loc.entry.offset, loc.entry.length) for b in blocks for loc in other.index.locations(b)
    }
    backend.reads.clear()
    restore(other, third, str(tmp_path / "out"))
    assert (tmp_path / "out" / "vda.raw").read_bytes() == source.disk.read(0, BLOCKS * BLOCK)
    # the restore read chunks, but no block: each was kept when the backup wrote it
    assert backend.reads and not where & set(backend.reads)


@pytest.mark.parametrize("harm", ["flipped", "swapped", "short", "link", "folder"])
def test_a_kept_block_is_checked_and_read_again_when_it_fails(tmp_path: Path, harm: str) -> None:
    backend, _source, snap = _backed_up(tmp_path)
    repo = Repository.open(backend, PASS, cache_root=str(tmp_path / "host"))
    ids = [b for b in snap.disks[0].index if b is not None]
    kept = _kept(repo)
    assert kept.folder is not None
    path = Path(kept.folder) / ids[0]
    good = path.read_bytes()
    path.unlink()
    if harm == "flipped":
        path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    elif harm == "swapped":
        path.write_bytes((Path(kept.folder) / ids[1]).read_bytes())
    elif harm == "short":
        path.write_bytes(good[:-1])
    elif harm == "link":
        (tmp_path / "elsewhere").write_bytes(good)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir()
    backend.reads.clear()
    block = repo.read_index_block(ids[0], kept=True)
    assert repo.key.chunk_id(block.encode()).hex() == ids[0]
    assert _block_reads(backend) == 1  # from the storage
    if harm != "folder":  # kept again, as read (a link replaced, never written through)
        assert not path.is_symlink() and path.read_bytes() == good
    if harm == "link":
        assert (tmp_path / "elsewhere").read_bytes() == good
    backend.reads.clear()
    repo.read_index_block(ids[1], kept=True)
    assert _block_reads(backend) == 0


def test_a_block_whose_pack_is_gone_is_gone_whatever_is_kept(tmp_path: Path) -> None:
    """The copy stands in for a read, not for the storage: a block whose pack was deleted
    there fails as it did, and the pack is reported lost (a backup then reads every byte)."""
    backend, _source, snap = _backed_up(tmp_path)
    repo = Repository.open(backend, PASS, cache_root=str(tmp_path / "host"))
    block_id = next(b for b in snap.disks[0].index if b is not None)
    (loc,) = repo.index.locations(bytes.fromhex(block_id))
    backend.delete(pack_name(loc.pack_id))
    assert _kept(repo).get(block_id) is not None
    with pytest.raises(IntegrityError, match="missing"):
        repo.read_index_block(block_id, kept=True)
    assert loc.pack_id in repo.index.lost.missing


def test_check_reads_the_stored_blocks_whatever_is_kept(tmp_path: Path) -> None:
    backend, _source, snap = _backed_up(tmp_path)
    block_id = next(b for b in snap.disks[0].index if b is not None)
    repo = Repository.open(backend, PASS, cache_root=str(tmp_path / "host"))
    (loc,) = repo.index.locations(bytes.fromhex(block_id))
    name = pack_name(loc.pack_id)
    stored = bytearray(backend.inner.get(name))
    stored[loc.entry.offset + 40] ^= 1
    backend.inner.put(name, bytes(stored))
    # this host still reads the block from its copy ...
    assert repo.read_index_block(block_id, kept=True)
    # ... and check reports the stored one damaged
    report = check(Repository.open(backend, PASS, cache_root=str(tmp_path / "host")))
    assert [p for p in report.problems if p.severity == "error" and block_id in f"{p.object_id} {p.message}"], report


def test_the_copies_stay_within_their_limit_least_recently_used_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMVAULT_CACHE_BLOCKS", "10000")
    kept = KeptBlocks("r" * 32, "file:///x", root=str(tmp_path))
    assert kept.limit == 10 * 1000
    assert kept.folder is not None
    names = [f"{i:064x}" for i in range(20)]
    for i, name in enumerate(names):
        kept.put(name, bytes(1000))
        if i >= 2:
            os.utime(Path(kept.folder) / names[0], (0, 2e9))  # kept in use
    left = sorted(os.listdir(kept.folder))
    assert sum(os.path.getsize(Path(kept.folder) / n) for n in left) <= 10 * 1000
    assert names[0] in left and names[-1] in left
    assert names[1] not in left  # the oldest unused went first
    # names that are no blob ids are never paths
    kept.put("../escape", bytes(10))
    assert kept.get("../escape") is None and not (tmp_path / "escape").exists()


def test_a_nearly_full_cache_folder_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kept_module, "LEAVE_FREE", 1 << 62)
    backend, _source, snap = _backed_up(tmp_path)
    repo = Repository.open(backend, PASS, cache_root=str(tmp_path / "host"))
    kept = _kept(repo)
    assert kept.folder is not None and os.listdir(kept.folder) == []
    backend.reads.clear()
    for b in snap.disks[0].index:
        if b is not None:
            repo.read_index_block(b, kept=True)
    assert _block_reads(backend) == BLOCKS


def test_the_setting_sets_the_limit_and_zero_keeps_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``VMVAULT_CACHE_BLOCKS``: a size with K, M, G or T; 0 keeps no block and reads each from
    the storage; a value that is no size stops the opening of the repository, before any work."""
    for text, limit in (("4G", 4 << 30), ("512 MiB", 512 << 20), ("64k", 64 << 10), ("123", 123), ("", 1 << 30)):
        monkeypatch.setenv("VMVAULT_CACHE_BLOCKS", text)
        assert kept_module.blocks_limit() == limit
    monkeypatch.setenv("VMVAULT_CACHE_BLOCKS", "0")
    backend, source, _first = _backed_up(tmp_path)
    here = Repository.open(backend, PASS, cache_root=str(tmp_path / "host"))
    assert _kept(here).folder is None
    _change(source)
    backend.reads.clear()
    assert backup(here, source).snapshot.disks[0].stats["incremental"] == 1
    assert _block_reads(backend) == 2 * BLOCKS  # each parent block read to confirm it, and to change it
    for bad in ("-1", "1.5G", "lots", "4X"):
        monkeypatch.setenv("VMVAULT_CACHE_BLOCKS", bad)
        with pytest.raises(ConfigError, match="VMVAULT_CACHE_BLOCKS"):
            Repository.open(backend, PASS, cache_root=str(tmp_path / "host"))

"""RepoIndex lookups: the batched presence questions answer as the one-blob ones do."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.hypervisors.files import FilesSource
from vmvault.repo._layout import PACK_TRAILER
from vmvault.repo.format import BlobType
from vmvault.repo.pack import BlobEntry, pack_name
from vmvault.repo.repository import Repository

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _backed_up(tmp_path: Path, seed: int, size: int) -> tuple[MemoryBackend, dict[bytes, list[BlobEntry]], list[bytes]]:
    """A repository in memory holding a backup of one random disk of ``size`` bytes: its
    backend, its packs' entries and the ids of the packs holding only data, sorted."""
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(random.Random(seed).randbytes(size))
    backend = MemoryBackend()
    repo = Repository.init(backend, b"passphrase", chunk_size=CS, pack_size=256 * 1024)
    backup(repo, FilesSource(str(vm)))
    packs = repo.index.packs()
    data_packs = sorted(p for p, entries in packs.items() if all(e.type is BlobType.DATA for e in entries))
    return backend, packs, data_packs


def test_present_of_is_has_present_of_each_blob(tmp_path: Path) -> None:
    """Stored blobs, blobs of a pack gone from storage, unknown ids, repeats and this process's
    own uploads: ``present_of`` holds exactly the ids ``has_present`` holds true of."""
    backend, packs, data_packs = _backed_up(tmp_path, 1, 2 << 20)
    assert len(data_packs) >= 2
    backend.delete(pack_name(data_packs[0]))
    gone = {e.id for e in packs[data_packs[0]]}

    repo = Repository.open(backend, b"passphrase")
    repo.load_index()
    writer = repo.writer()
    try:
        mine = random.Random(2).randbytes(1000)
        mine_id = repo.key.chunk_id(mine)
        writer.add(BlobType.DATA, mine_id, mine)
        writer.flush()  # uploaded by this process: known before any index file is read again
        stored = [e.id for entries in packs.values() for e in entries]
        unknown = [bytes([i]) * 32 for i in range(1, 4)]
        wanted = [*unknown, mine_id, *stored, *stored[:5]]
        random.Random(3).shuffle(wanted)
        # asked in one go first, so no pack is confirmed yet by a one-blob question
        together = repo.index.present_of(wanted)
        one_by_one = {b for b in wanted if repo.index.has_present(b)}
        assert together == one_by_one
        # any copy at all, as ``locations`` gives them: the lost pack's blobs are left out too
        assert repo.index.located_of(wanted) == {b for b in wanted if repo.index.locations(b)} == together
        assert mine_id in together and not together & gone and not together & set(unknown)
        assert set(stored) - gone <= together
        assert data_packs[0] in repo.index.lost.missing
    finally:
        writer.close()
    # another process: nothing of its own, the lost pack found by the batched question alone
    other = Repository.open(backend, b"passphrase")
    other.load_index()
    assert other.index.present_of(wanted) == (set(stored) - gone) | {mine_id}  # its index file was written
    assert other.index.located_of(wanted) == (set(stored) - gone) | {mine_id}
    assert other.index.lost.missing == {data_packs[0]}
    assert other.index.present_of([]) == set() == other.index.located_of([])


def test_lacking_is_what_located_of_leaves_out(tmp_path: Path) -> None:
    """The one pass in id order (``lacking``) over a scratch table finds exactly the ids that
    ``located_of`` gives no copy of: blobs of a pack gone from storage, of a pack cut short
    (those ending before the cut still count), this process's own uploads, unknown ids and ids
    of odd lengths at both ends of the id space."""
    backend, packs, data_packs = _backed_up(tmp_path, 4, 3 << 20)
    assert len(data_packs) >= 3
    backend.delete(pack_name(data_packs[0]))
    short = data_packs[1]
    first_end = min(e.offset + e.length for e in packs[short])
    stored = [e.id for entries in packs.values() for e in entries]

    repo = Repository.open(backend, b"passphrase")
    repo.load_index()
    repo.forget_lost_packs()
    # the short pack as a listing of data/ would find it: its first blob still whole
    repo.index.exclude([], {short: first_end + PACK_TRAILER.size})
    writer = repo.writer()
    try:
        mine = random.Random(5).randbytes(1000)
        mine_id = repo.key.chunk_id(mine)
        writer.add(BlobType.DATA, mine_id, mine)
        writer.flush()
        odd = [b"", b"\x00", b"\xff", b"\xff" * 33, b"\x7f" * 31, bytes(32), b"\xff" * 32]
        wanted = [*stored, mine_id, *odd, *(random.Random(6).randbytes(32) for _ in range(50))]
        with repo.index.synced_cache().scratch() as db:
            db.execute("CREATE TABLE s.asked(id BLOB PRIMARY KEY) WITHOUT ROWID")
            db.executemany("INSERT OR IGNORE INTO s.asked VALUES (?)", ((b,) for b in wanted))
            steps: list[tuple[int, int]] = []
            batches = list(repo.index.lacking(db, "s.asked", lambda done, total: steps.append((done, total))))
        found = [b for batch in batches for b in batch]
        expected = set(wanted) - repo.index.located_of(wanted)
        assert found == sorted(expected)  # each once, in id order
        assert set(odd) <= expected and mine_id not in expected
        assert {e.id for e in packs[data_packs[0]]} <= expected
        # the short pack: its blobs past the cut are gone, the first is not
        assert {e.id for e in packs[short] if e.offset + e.length > first_end} <= expected
        assert min(packs[short], key=lambda e: e.offset).id not in expected
        assert steps[-1] == (256, 256) and len(steps) == 256
    finally:
        writer.close()

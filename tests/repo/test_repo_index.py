"""RepoIndex lookups: the batched presence questions answer as the one-blob ones do."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.format import BlobType
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def test_present_of_is_has_present_of_each_blob(tmp_path: Path) -> None:
    """Stored blobs, blobs of a pack gone from storage, unknown ids, repeats and this process's
    own uploads: ``present_of`` holds exactly the ids ``has_present`` holds true of."""
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(random.Random(1).randbytes(2 << 20))
    backend = MemoryBackend()
    repo = Repository.init(backend, b"passphrase", chunk_size=CS, pack_size=256 * 1024)
    backup(repo, FilesSource(str(vm)))
    packs = repo.index.packs()
    data_packs = sorted(p for p, entries in packs.items() if all(e.type is BlobType.DATA for e in entries))
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

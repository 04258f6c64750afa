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


def _many_packs(tmp_path: Path) -> tuple[MemoryBackend, dict[bytes, list[BlobEntry]]]:
    """A repository in memory holding a backup of 4 MiB of random data in 4 KiB chunks, one
    chunk a pack: about 1,030 packs, four or so in each of the 256 folders of ``data/``."""
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(random.Random(7).randbytes(4 << 20))
    backend = MemoryBackend()
    repo = Repository.init(backend, b"passphrase", chunk_size=4096, pack_size=4096)
    backup(repo, FilesSource(str(vm)))
    return backend, repo.index.packs()


def test_many_packs_are_confirmed_by_listing_their_folders(tmp_path: Path) -> None:
    """An incremental of a large disk asks about every pack of its parent. A folder of
    ``data/`` where the packs asked about would cost more one-byte reads than listing it is
    listed instead: far fewer requests than packs, and the same answers, the packs found gone
    or cut short included (one of each in two folders)."""
    backend, packs = _many_packs(tmp_path)
    assert len(packs) > 1000
    ordered = sorted(packs)
    missing, short = ordered[10], ordered[500]
    backend.delete(pack_name(missing))
    backend.put(pack_name(short), backend.get(pack_name(short))[:-1])
    lost = {e.id for p in (missing, short) for e in packs[p]}
    stored = [e.id for entries in packs.values() for e in entries]

    repo = Repository.open(backend, b"passphrase")
    repo.load_index()
    backend.requests.reset()
    assert repo.index.present_of(stored) == set(stored) - lost
    asked = backend.requests.to_dict()
    # asked in one go: each folder holding two packs or more listed, the others' packs read
    in_folder = [sum(1 for p in packs if p[0] == folder) for folder in range(256)]
    assert asked["list"] == sum(1 for n in in_folder if n > 1), asked
    assert asked["get"] == sum(1 for n in in_folder if n == 1), asked
    assert asked["get"] + asked["list"] < len(packs) / 3, asked
    assert repo.index.lost.missing == {missing} and repo.index.lost.short == {short}
    # asked again, one blob at a time: answered without the storage
    backend.requests.reset()
    assert {b for b in stored if repo.index.has_present(b)} == set(stored) - lost
    assert backend.requests.to_dict()["get"] == backend.requests.to_dict()["list"] == 0


def test_a_folder_listing_reports_only_the_packs_asked_about(tmp_path: Path) -> None:
    """A pack gone from a listed folder is a loss only once a question needs it (a backup
    that never builds on it must not read its whole disk again); the listing answers for
    it then, without another read. A sync forgets the listings: a pack deleted after its
    folder was listed is found gone after the next sync."""
    backend, packs = _many_packs(tmp_path)
    by_folder: dict[int, list[bytes]] = {}
    for pack_id in sorted(packs):
        by_folder.setdefault(pack_id[0], []).append(pack_id)
    folder = next(ids for ids in by_folder.values() if len(ids) >= 4)
    first, second, gone, later = folder[:4]
    backend.delete(pack_name(gone))

    repo = Repository.open(backend, b"passphrase")
    repo.load_index()
    backend.requests.reset()
    assert repo.index.present_of([packs[first][0].id]) == {packs[first][0].id}
    assert (backend.requests.counts["get"], backend.requests.counts["list"]) == (1, 0)  # one read
    assert repo.index.present_of([packs[second][0].id]) == {packs[second][0].id}
    assert (backend.requests.counts["get"], backend.requests.counts["list"]) == (1, 1)  # then the listing
    assert not repo.index.lost
    backend.requests.reset()
    assert repo.index.present_of([packs[gone][0].id]) == set()
    assert repo.index.lost.missing == {gone}
    assert backend.requests.to_dict()["get"] == 0  # the listing said so

    backend.delete(pack_name(later))
    repo.index.sync()
    assert repo.index.present_of([packs[later][0].id]) == set()
    assert later in repo.index.lost.missing


def test_a_listing_taken_across_a_sync_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync forgets the listings; one under way while a sync ran is used for the question
    that asked for it, not kept for later ones: a pack deleted after that listing was taken is
    found gone by the next question."""
    backend, packs = _many_packs(tmp_path)
    by_folder: dict[int, list[bytes]] = {}
    for pack_id in sorted(packs):
        by_folder.setdefault(pack_id[0], []).append(pack_id)
    first, second, later = next(ids for ids in by_folder.values() if len(ids) >= 3)[:3]
    repo = Repository.open(backend, b"passphrase")
    repo.load_index()
    listing = repo.index._list_folder

    def listed_then_synced(folder: int) -> dict[bytes, bool]:
        found = listing(folder)
        backend.delete(pack_name(later))  # gone after the listing saw it
        repo.index.sync()
        return found

    monkeypatch.setattr(repo.index, "_list_folder", listed_then_synced)
    assert repo.index.present_of([packs[first][0].id]) == {packs[first][0].id}  # a read
    assert repo.index.present_of([packs[second][0].id]) == {packs[second][0].id}  # the listing
    monkeypatch.undo()
    assert repo.index.present_of([packs[later][0].id]) == set()
    assert later in repo.index.lost.missing


def test_names_the_index_does_not_know_change_no_answer(tmp_path: Path) -> None:
    """A storage may list anything in a folder of ``data/``: packs no index file names, names
    of other forms, a known pack's name in the wrong folder. None of it stands in for a pack
    the index knows, and none of it is held (only the known packs are judged)."""
    backend, packs = _many_packs(tmp_path)
    ordered = sorted(packs)
    gone = ordered[20]
    folder = f"data/{gone[0]:02x}/"
    backend.delete(pack_name(gone))
    for i in range(2000):  # packs no index file names
        backend.put(f"{folder}{gone[0]:02x}{i:062x}", b"x")
    backend.put(f"{folder}{gone.hex().upper()}", b"x" * 100_000)  # not our form
    other = f"{(gone[0] + 1) % 256:02x}"
    backend.put(f"data/{other}/{gone.hex()}", b"x" * 100_000)  # the right name, the wrong folder
    stored = [e.id for entries in packs.values() for e in entries]
    repo = Repository.open(backend, b"passphrase")
    repo.load_index()
    assert repo.index.present_of(stored) == {e.id for p, es in packs.items() if p != gone for e in es}
    assert repo.index.lost.missing == {gone} and not repo.index.lost.short

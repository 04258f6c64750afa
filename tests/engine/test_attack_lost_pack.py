"""A lost pack must not silently break every later backup (issue 9, High 8).

repository-format.md, section 10.2: a backup deduplicates only against blobs in packs that
are present (one listing of ``data/`` after loading the index), stores again whatever of a
lost pack its source still has, says so, and never trusts change tracking across a loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.helpers import MemoryDisk, ScriptedSource
from vmvault.backends.memory import MemoryBackend
from vmvault.disk.base import DiskImage, Extent, ExtentKind
from vmvault.engine.backup import backup
from vmvault.engine.copy import copy_snapshots
from vmvault.engine.restore import restore
from vmvault.errors import SourceError
from vmvault.hypervisors.base import DEFAULT_OPTIONS, BackupOptions, BackupSession, PreviousBackup, Source, SourceDisk
from vmvault.hypervisors.files import FilesSource
from vmvault.repo import check, prune, repair_index, repair_snapshots
from vmvault.repo.format import MAX_INDEX_BLOCKS, BlobType
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def new_repo() -> Repository:
    return Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS, pack_size=256 * 1024)


def reopen(repo: Repository) -> Repository:
    return Repository.open(repo.backend, b"passphrase")


def random_disk(size: int, seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


def lose_packs(repo: Repository, count: int = 1, *, data_only: bool = False) -> list[bytes]:
    """Delete ``count`` packs; ``data_only``: only packs that hold no index block."""
    packs = repo.index.packs()
    gone = [
        p
        for p in sorted(dict(repo.iter_stored_packs()))
        if not data_only or all(e.type is BlobType.DATA for e in packs.get(p, []))
    ][:count]
    for pack_id in gone:
        repo.backend.delete(pack_name(pack_id))
    return gone


def chunk_ids(repo: Repository, snap: Snapshot, block: int) -> list[bytes]:
    block_id = snap.disks[0].index[block]
    assert block_id is not None
    return list(repo.read_index_block(block_id))


def vm_folder(tmp_path: Path) -> Path:
    vm = tmp_path / "vm"
    (vm / "sub").mkdir(parents=True)
    (vm / "disk.raw").write_bytes(random.Random(1).randbytes(3 << 20))
    (vm / "vm.conf").write_text("name = vm1\n")
    (vm / "sub" / "nvram.bin").write_bytes(b"nv")
    return vm


@pytest.mark.parametrize("full", [False, True])
def test_backup_after_a_lost_pack_stores_the_data_again(tmp_path: Path, full: bool) -> None:
    vm = vm_folder(tmp_path)
    repo = new_repo()
    first = backup(repo, FilesSource(str(vm)))
    lose_packs(repo, 2)
    repo = reopen(repo)
    assert not check(repo).ok
    second = backup(repo, FilesSource(str(vm)), BackupOptions(full=full))
    assert second.bytes_new > 0 and second.chunks_new > 0, "it must not deduplicate against the lost packs"
    assert any("missing from storage" in w for w in second.warnings)
    out = tmp_path / "out"
    restore(repo, second.snapshot, str(out))
    assert (out / "disk.raw").read_bytes() == (vm / "disk.raw").read_bytes()
    assert (out / "vm.conf").read_text() == "name = vm1\n" and (out / "sub" / "nvram.bin").read_bytes() == b"nv"
    # the source was unchanged, so the same chunks heal the first snapshot too
    report = check(reopen(repo), read_data=True)
    assert report.damaged_snapshots == [] and first.snapshot.id in report.intact_snapshots
    # the dead entries go with repair index; then everything is clean
    assert not repair_index(reopen(repo)).data_lost
    prune(reopen(repo))
    assert check(reopen(repo), read_data=True).ok


def test_a_backup_with_nothing_lost_says_nothing(tmp_path: Path) -> None:
    vm = vm_folder(tmp_path)
    repo = new_repo()
    backup(repo, FilesSource(str(vm)))
    again = backup(repo, FilesSource(str(vm)))
    assert again.bytes_new < 4096 and not again.warnings


def test_change_tracking_is_not_trusted_after_a_loss() -> None:
    size = 4 << 20
    data = random_disk(size, 7)
    disk = MemoryDisk(data)
    repo = new_repo()
    source = ScriptedSource(disk)
    backup(repo, source)
    lose_packs(repo)
    source.changed = []  # change tracking says: nothing changed
    disk.bytes_read = 0
    second = backup(reopen(repo), source)
    assert disk.bytes_read == size, "every allocated byte is read again"
    assert second.snapshot.disks[0].stats["incremental"] == 0
    assert source.last_previous is None  # the connector is asked for a full backup
    assert second.snapshot.id in check(reopen(repo)).intact_snapshots


def test_an_incremental_re_reads_the_ranges_whose_chunks_the_index_dropped(tmp_path: Path) -> None:
    cs = 4096  # index blocks of 4096 chunks cover 16 MiB
    size = 6 * 4096 * cs  # 6 index blocks: mostly empty, a little data in each
    data = bytearray(size)
    allocated = []
    rng = random.Random(3)
    for b in range(6):
        off = b * 4096 * cs + 10 * cs
        data[off : off + 2 * cs] = rng.randbytes(2 * cs)
        allocated.append((off, 2 * cs))
    disk = MemoryDisk(data, allocated=allocated)
    # packs close once they hold a chunk: every chunk ends a pack, so packs of chunks alone exist
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=cs, pack_size=cs)
    source = ScriptedSource(disk)
    first = backup(repo, source)
    # lose a pack of chunks (no index block), then repair the index: the index no longer names
    # it, so only the parent's index blocks still refer to the chunks it held
    victim = next(p for p, es in sorted(repo.index.packs().items()) if all(e.type is BlobType.DATA for e in es))
    lost = {e.id for e in repo.index.packs()[victim]}
    repo.backend.delete(pack_name(victim))
    report = repair_index(reopen(repo))
    assert report.packs_dropped == [victim.hex()]
    broken_blocks = {b for b in range(6) if any(c in lost for c in chunk_ids(repo, first.snapshot, b))}
    source.changed = []
    disk.bytes_read = 0
    repo = reopen(repo)
    second = backup(repo, source)
    # only the allocated data of the broken blocks is read, nothing of the others
    assert 0 < len(broken_blocks) < 6 and disk.bytes_read == len(broken_blocks) * 2 * cs
    assert any("previous snapshot name data" in w for w in second.warnings)
    out = tmp_path / "out"
    restore(repo, second.snapshot, str(out))
    assert (out / "vda.raw").read_bytes() == bytes(data)
    report = check(repo, read_data=True)
    assert second.snapshot.id in report.intact_snapshots
    # the new snapshot stored the lost chunks again, so the first one reads again too
    assert first.snapshot.id in report.intact_snapshots


def test_a_repaired_parent_is_no_base_for_change_tracking(tmp_path: Path) -> None:
    size = 2 << 20
    data = random_disk(size, 9)
    disk = MemoryDisk(data)
    repo = new_repo()
    source = ScriptedSource(disk)
    backup(repo, source)
    # (a pack holding the only index block would leave nothing to repair: no parent at all)
    lose_packs(repo, data_only=True)
    repair_index(reopen(repo))
    fixed = repair_snapshots(reopen(repo), forget=True)
    assert fixed.repaired and fixed.damaged_remaining == 0
    source.changed = []
    disk.bytes_read = 0
    result = backup(reopen(repo), source)
    assert disk.bytes_read == size  # the repaired parent's zeroed ranges must not be carried over
    assert any("was repaired" in w for w in result.warnings)
    out = tmp_path / "out"
    restore(reopen(repo), result.snapshot, str(out))
    assert (out / "vda.raw").read_bytes() == bytes(data)


def test_an_unreadable_index_file_makes_the_backup_store_and_say_so(tmp_path: Path) -> None:
    size = 1 << 20
    disk = MemoryDisk(random_disk(size, 4))
    repo = new_repo()
    source = ScriptedSource(disk)
    backup(repo, source)
    for o in list(repo.backend.list("index/")):
        raw = bytearray(repo.backend.get(o.name))
        raw[-1] ^= 1
        repo.backend.put(o.name, bytes(raw))
    source.changed = []
    # a host that had not read those files (another host, or this one without its cache)
    other_host = Repository.open(repo.backend, b"passphrase", cache_root=str(tmp_path / "host2"))
    result = backup(other_host, source)
    assert result.bytes_new > size // 2 and any("index files are unreadable" in w for w in result.warnings)
    # this host read them before the damage: its cache still knows what they said, and the
    # packs are confirmed present, so its backup is whole (repository-format.md 12.3: what is
    # not detected); check, which reads every index file, reports them
    again = backup(reopen(repo), source)
    assert again.bytes_new == 0 and not again.warnings
    out = tmp_path / "out"
    restore(reopen(repo), again.snapshot, str(out))
    assert (out / "vda.raw").read_bytes() == bytes(disk.data)
    assert "index-file-damaged" in {p.kind for p in check(reopen(repo)).errors}


class HugeEmptyDisk(DiskImage):
    format = "raw"

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def extents(self) -> Iterator[Extent]:
        yield Extent(0, self._size, ExtentKind.ZERO)

    def read(self, offset: int, length: int) -> bytes:
        raise AssertionError("an empty disk is never read")


class OneDisk(Source):
    kind = "test"
    location = "test://huge"

    def __init__(self, image: DiskImage) -> None:
        self.image = image

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        session = ScriptedSource(MemoryDisk(bytearray(0))).open_session(None)
        session.disks = [SourceDisk("vda", self.image, "raw")]
        return session


def test_a_disk_beyond_the_index_limit_is_a_clear_source_error() -> None:
    repo = new_repo()
    too_big = (MAX_INDEX_BLOCKS + 1) * 4096 * CS
    with pytest.raises(SourceError, match="index blocks"):
        backup(repo, OneDisk(HugeEmptyDisk(too_big)))
    assert repo.snapshot_ids() == []
    # at the limit it is fine, and costs one snapshot entry per index block, nothing per chunk
    result = backup(repo, OneDisk(HugeEmptyDisk(1 << 46)))  # 64 TiB
    assert result.snapshot.disks[0].index == [None] * ((1 << 46) // (4096 * CS))


@pytest.mark.parametrize("repaired", [False, True])
def test_copy_into_a_target_that_lost_a_pack_copies_the_data_again(tmp_path: Path, repaired: bool) -> None:
    vm = vm_folder(tmp_path)
    src = new_repo()
    dst = Repository.init(MemoryBackend(), b"other passphrase", chunk_size=CS, pack_size=256 * 1024)
    backup(src, FilesSource(str(vm)))
    copy_snapshots(src, dst)
    lose_packs(dst, 2)
    dst = Repository.open(dst.backend, b"other passphrase")
    if repaired:  # the index no longer names the lost packs: only earlier copies' blocks do
        repair_index(dst)
    (vm / "vm.conf").write_text("name = vm1\nmemory = 4G\n")
    second = backup(src, FilesSource(str(vm)))
    report = copy_snapshots(src, dst)
    assert report.chunks_added > 0
    dst = Repository.open(dst.backend, b"other passphrase")
    result = check(dst, read_data=True)
    copied = next(
        s for s in dst.list_snapshots() if s.extra.get("copied_from", {}).get("snapshot") == second.snapshot.id
    )
    assert copied.id in result.intact_snapshots
    out = tmp_path / "out"
    restore(dst, copied, str(out))
    assert (out / "disk.raw").read_bytes() == (vm / "disk.raw").read_bytes()

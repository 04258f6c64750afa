"""Chunk id functions (repository-format.md, sections 3, 4 and 11): repositories made with
HMAC-SHA-256 ids (format versions 1 and 2, as earlier vmvault wrote them) keep working exactly
as before, and `copy` between them and a BLAKE3 repository computes every id anew, both ways.

Each id is checked against the formula of section 3, computed here with ``hmac`` and the
``blake3`` package directly, never with vmvault's own function.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import blake3
import pytest

from tests.repo.test_format_frozen import CS, ChainSource, pattern
from tests.repo.test_migrate import old_repo
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.copy import copy_snapshots
from vmvault.engine.reader import DiskReader
from vmvault.engine.restore import restore
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.check import check
from vmvault.repo.crypto import BLAKE3, HMAC_SHA256
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

PASS = b"correct horse"
#: section 6: the key of keyed-BLAKE3 ids is BLAKE3's derive_key of the id key with this context
CONTEXT = "vmvault 2026-12-03 keyed-BLAKE3 chunk id key"


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def expected_id(function: str, id_key: bytes | None, data: bytes) -> bytes:
    """A blob's id by the rules of section 3."""
    if function == HMAC_SHA256:
        return hashlib.sha256(data).digest() if id_key is None else hmac.digest(id_key, data, "sha256")
    if id_key is None:
        return blake3.blake3(data).digest()
    return blake3.blake3(data, key=blake3.blake3(id_key, derive_key_context=CONTEXT).digest()).digest()


def assert_ids(repo: Repository, function: str) -> int:
    """Every indexed blob (chunks and index blocks) is named by ``function``; returns how many."""
    assert repo.config.chunk_id == function == repo.key.id_function
    n = 0
    for blob_id, loc in repo.index.items():
        data = repo.get_blob(loc.entry.type, blob_id)
        assert expected_id(function, repo.key.id_key, data) == blob_id
        n += 1
    assert n > 0
    return n


def open_again(repo: Repository) -> Repository:
    return Repository.open(LocalBackend(repo.backend.url), PASS if repo.config.encrypted else None)


def read_disk(repo: Repository, snap: Snapshot, name: str) -> bytes:
    reader = DiskReader(repo, snap, name)
    try:
        return reader.read(0, reader.size)
    finally:
        reader.close()


def hmac_repository(path: Path, version: int, encrypted: bool, monkeypatch: pytest.MonkeyPatch) -> Repository:
    if version == 1:
        return old_repo(path, monkeypatch, encrypted=encrypted)
    return Repository.init(LocalBackend(str(path)), PASS if encrypted else None, chunk_size=CS, chunk_id=HMAC_SHA256)


OLD_FORMATS = [(1, True), (2, True), (1, False), (2, False)]


@pytest.mark.parametrize(
    ("version", "encrypted"), OLD_FORMATS, ids=[f"v{v}-{'enc' if e else 'plain'}" for v, e in OLD_FORMATS]
)
def test_an_hmac_repository_works_as_before_and_copies_to_blake3_and_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int, encrypted: bool
) -> None:
    old = hmac_repository(tmp_path / "old", version, encrypted, monkeypatch)
    config_bytes = old.backend.get("config")
    assert old.config.version == version and b"chunk_id" not in config_bytes

    # a checkpoint chain backed up twice, the second time incrementally (change tracking)
    src = ChainSource()
    states: dict[str, tuple[bytes, bytes]] = {}
    first = backup(old, src).snapshot
    states[first.id] = (bytes(src.base.data), bytes(src.layer.data))
    src.change(3 * CS + 17, pattern(5, CS))
    second = backup(old, src)
    assert [d.stats["incremental"] for d in second.snapshot.disks] == [1, 1]
    assert second.chunks_new <= 6  # the changed chunks and the index blocks naming them
    states[second.snapshot.id] = (bytes(src.base.data), bytes(src.layer.data))
    # and a VM folder, restored through the restore engine
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(pattern(7, 20 * CS) + bytes(4 * CS) + pattern(8, 3 * CS))
    (vm / "vm.conf").write_bytes(b"name = old\n")
    folder = backup(old, FilesSource(str(vm))).snapshot

    old = open_again(old)
    assert old.config.version == version and old.backend.get("config") == config_bytes
    n_old = assert_ids(old, HMAC_SHA256)
    assert check(old, read_data=True).ok
    for snap_id, (base, layer) in states.items():
        snap = old.load_snapshot(snap_id)
        assert read_disk(old, snap, "base.raw") == base and read_disk(old, snap, "layer.raw") == layer
    restore(old, old.load_snapshot(folder.id), str(tmp_path / "out-old"))
    assert (tmp_path / "out-old" / "disk.raw").read_bytes() == (vm / "disk.raw").read_bytes()

    # into a BLAKE3 repository: every chunk read and named anew
    new = Repository.init(LocalBackend(str(tmp_path / "new")), PASS if encrypted else None, chunk_size=CS)
    assert new.config.version == 3 and new.config.chunk_id == BLAKE3
    there = copy_snapshots(old, new)
    assert len(there.copied) == 3 and there.chunks_read == there.chunks_added > 0
    new = open_again(new)
    assert assert_ids(new, BLAKE3) == n_old  # the same blobs, under other ids
    assert check(new, read_data=True).ok
    copies = {s.extra["copied_from"]["snapshot"]: s for s in new.list_snapshots()}
    for snap_id, (base, layer) in states.items():
        copy = copies[snap_id]
        assert copy.disks[0].index != old.load_snapshot(snap_id).disks[0].index  # other ids
        assert read_disk(new, copy, "base.raw") == base and read_disk(new, copy, "layer.raw") == layer
    restore(new, copies[folder.id], str(tmp_path / "out-new"))
    assert (tmp_path / "out-new" / "disk.raw").read_bytes() == (vm / "disk.raw").read_bytes()

    # and back into the HMAC repository: the ids computed there again are the ones it holds,
    # so nothing is stored twice (only the three manifests are new)
    packs = {o.name for o in old.backend.list("data/")}
    back = copy_snapshots(new, old)
    assert len(back.copied) == 3 and back.chunks_read > 0
    assert back.chunks_added == 0 and back.blobs_added == 0 and back.packs_added == 0
    assert {o.name for o in old.backend.list("data/")} == packs
    old = open_again(old)
    assert old.backend.get("config") == config_bytes
    assert assert_ids(old, HMAC_SHA256) == n_old
    assert check(old, read_data=True).ok
    for snap in old.list_snapshots():
        origin = snap.extra.get("copied_from")
        if origin is None:
            continue
        original = new.load_snapshot(origin["snapshot"]).extra["copied_from"]["snapshot"]
        if original in states:
            base, layer = states[original]
            assert read_disk(old, snap, "base.raw") == base and read_disk(old, snap, "layer.raw") == layer
            assert snap.disks[0].index == old.load_snapshot(original).disks[0].index  # the same ids


def test_migrating_keeps_hmac_ids_and_deduplicates_against_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = old_repo(tmp_path / "repo", monkeypatch)
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(pattern(3, 16 * CS))
    backup(old, FilesSource(str(vm)))
    repo = open_again(old)
    assert repo.migrate()
    repo = open_again(repo)
    assert (repo.config.version, repo.config.chunk_id) == (2, HMAC_SHA256)
    again = backup(repo, FilesSource(str(vm)))
    assert again.chunks_new == 0  # the same content: the same ids as before the migration
    assert assert_ids(repo, HMAC_SHA256) > 16
    assert not repo.migrate()  # a repository is never migrated to another id function


def test_new_repositories_name_chunks_with_blake3(tmp_path: Path) -> None:
    for encrypted in (True, False):
        repo = Repository.init(LocalBackend(str(tmp_path / str(encrypted))), PASS if encrypted else None, chunk_size=CS)
        vm = tmp_path / f"vm-{encrypted}"
        vm.mkdir()
        (vm / "disk.raw").write_bytes(pattern(4, 9 * CS))
        snap = backup(repo, FilesSource(str(vm))).snapshot
        repo = open_again(repo)
        assert assert_ids(repo, BLAKE3) == 9 + 1  # nine chunks and one index block
        assert not repo.migrate()
        restore(repo, snap, str(tmp_path / f"out-{encrypted}"))
        assert (tmp_path / f"out-{encrypted}" / "disk.raw").read_bytes() == (vm / "disk.raw").read_bytes()

"""Maintenance on repositories written by the backup engine (not by the test builders)."""

from __future__ import annotations

import random
from pathlib import Path

from tests.repo.builders import PASS
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.hypervisors.files import FilesSource
from vmvault.repo import Repository, RetentionPolicy, check, forget, prune
from vmvault.repo.pack import pack_name

CS = 16 * 1024
SIZE = 2 << 20


def write_region(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_forget_prune_check_on_engine_backups(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    img = vm / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    rnd = random.Random(5)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), PASS, chunk_size=CS, pack_size=256 * 1024)
    states: dict[str, tuple[bytes, bytes]] = {}
    for day in range(4):
        write_region(img, day * 300_000 + 1000, rnd.randbytes(200_000))
        (vm / "vm.conf").write_text(f"generation = {day}\n")
        snap = backup(repo, FilesSource(str(vm))).snapshot
        states[snap.id] = (img.read_bytes(), (vm / "vm.conf").read_bytes())
    assert check(repo, read_data=True).ok

    before = sum(o.size for o in repo.backend.list("data/"))
    fr = forget(repo, RetentionPolicy(last=2))
    assert len(fr.removed) == 2
    report = prune(repo, max_unused=0.0)
    assert report.bytes_after < before and report.blobs_removed > 0

    repo = Repository.open(repo.backend, PASS)
    result = check(repo, read_data=True)
    assert result.ok and not result.warnings, result.to_dict()
    for n, sid in enumerate(fr.kept):
        out = tmp_path / f"out{n}"
        restore(repo, repo.load_snapshot(sid), str(out))
        assert ((out / "disk.raw").read_bytes(), (out / "vm.conf").read_bytes()) == states[sid]

    # damage one chunk only the newest snapshot has; check names that disk and byte range
    newest = max((repo.load_snapshot(s) for s in fr.kept), key=lambda s: s.time)
    k = (3 * 300_000 + 50_000) // CS
    disk = next(d for d in newest.disks if d.name == "disk.raw")
    block_id = disk.index[k // disk.index_span]
    assert block_id is not None
    chunk = repo.read_index_block(block_id)[k % disk.index_span]
    loc = repo.index.lookup(chunk)
    assert loc is not None
    path = Path(repo.backend.root) / pack_name(loc.pack_id)
    data = bytearray(path.read_bytes())
    data[loc.entry.offset + 10] ^= 1
    path.write_bytes(bytes(data))
    result = check(repo, read_data=True)
    (p,) = [p for p in result.errors if p.kind == "blob-damaged"]
    assert [(a.snapshot, a.name, a.ranges) for a in p.affects] == [(newest.id, "disk.raw", [[k * CS, (k + 1) * CS]])]
    assert result.damaged_snapshots == [newest.id]
    assert len(result.intact_snapshots) == 1


def test_backup_with_an_index_loaded_before_a_prune(tmp_path: Path) -> None:
    """A backup reloads the index under its shared lock (repository-format.md, section 7, backup rule 4)."""
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(random.Random(9).randbytes(256 * 1024))
    backend = LocalBackend(str(tmp_path / "repo"))
    repo = Repository.init(backend, PASS, chunk_size=CS)
    first = backup(repo, FilesSource(str(vm))).snapshot
    long_lived = Repository.open(backend, PASS)  # e.g. a daemon's handle, opened hours earlier
    other = Repository.open(backend, PASS)  # another host forgets everything and prunes
    other.delete_snapshot(first.id)
    prune(other)
    assert list(backend.list("data/")) == []
    backup(long_lived, FilesSource(str(vm)))  # the same data again
    assert check(Repository.open(backend, PASS)).ok

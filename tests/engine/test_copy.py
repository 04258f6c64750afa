"""Copy between repositories with different keys: only missing chunks travel, copies are
idempotent, a killed copy resumes, and the target checks clean and restores identically."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.copy import COPIED_FROM, CopyFilter, copy_snapshots, select_snapshots
from vmvault.engine.restore import restore
from vmvault.errors import RepositoryError, SnapshotNotFoundError
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.check import check
from vmvault.repo.format import BlobType
from vmvault.repo.repository import Repository

CS = 64 * 1024
SRC_PASS = b"source pass"
DST_PASS = b"target pass"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i : i + CS] for i in range(0, len(data), CS)]


def make_disk(seed: int, n_chunks: int, *, prefix: list[bytes] | None = None) -> bytes:
    """Random chunks, every fourth one all zero; ``prefix`` chunks first (shared content)."""
    rng = random.Random(seed)
    parts = list(prefix or [])
    for i in range(len(parts), n_chunks):
        parts.append(bytes(CS) if i % 4 == 3 else rng.randbytes(CS))
    return b"".join(parts)


def write_vm(folder: Path, disk: bytes, config: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "disk.raw").write_bytes(disk)
    (folder / "vm.conf").write_bytes(config)
    return folder


def distinct_nonzero(*blobs: bytes) -> set[bytes]:
    out = set()
    for b in blobs:
        for c in chunks_of(b):
            if c.count(0) != len(c):
                out.add(c)
    return out


def data_chunks(repo: Repository) -> int:
    return sum(1 for _i, loc in repo.index.items() if loc.entry.type is BlobType.DATA)


def stored_names(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and "locks" not in p.parts}


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Repository, Repository]:
    # small packs: a copy writes several, so a kill can land between them
    src = Repository.init(LocalBackend(str(tmp_path / "src")), SRC_PASS, chunk_size=CS, pack_size=256 * 1024)
    dst = Repository.init(LocalBackend(str(tmp_path / "dst")), DST_PASS, chunk_size=CS, pack_size=256 * 1024)
    return src, dst


def test_copy_uploads_only_missing_chunks_and_is_idempotent(
    repos: tuple[Repository, Repository], tmp_path: Path
) -> None:
    src, dst = repos
    shared = chunks_of(make_disk(1, 8))
    disk = make_disk(2, 40, prefix=shared)
    config = b"name = web01\n" * 100
    vm = write_vm(tmp_path / "vm", disk, config)
    snap = backup(src, FilesSource(str(vm)), tags=["nightly"]).snapshot

    # the target already holds the shared chunks (another VM backed up there directly)
    seed_disk = b"".join(shared) + make_disk(3, 4)
    seed_vm = write_vm(tmp_path / "seed", seed_disk, b"other\n")
    backup(dst, FilesSource(str(seed_vm)))
    before = stored_names(tmp_path / "dst")

    report = copy_snapshots(src, dst)

    expected = distinct_nonzero(disk, config) - distinct_nonzero(seed_disk, b"other\n")
    assert len(expected) < len(distinct_nonzero(disk, config))  # the seed really overlaps
    assert report.chunks_added == len(expected)
    assert report.raw_bytes_added == sum(len(c) for c in expected)
    assert [c.source_id for c in report.copied] == [snap.id]
    grown = sum(os.path.getsize(tmp_path / "dst" / n) for n in stored_names(tmp_path / "dst") - before)
    assert report.bytes_added > 0
    # the target grew by the sealed blobs plus pack headers, index files and the snapshot
    assert report.bytes_added <= grown < report.bytes_added + 64 * 1024

    # the copy's manifest says where it came from and names target ids, not source ids
    dst = Repository.open(dst.backend, DST_PASS)
    copy = dst.load_snapshot(report.copied[0].target_id)
    assert copy.extra[COPIED_FROM] == {"repository": src.config.id, "snapshot": snap.id}
    assert copy.tags == ["nightly"]
    assert copy.disks[0].index != snap.disks[0].index  # keyed ids differ between the repositories
    assert all(d.cbt is None for d in copy.disks)

    # a second copy is a no-op: nothing read, nothing uploaded, no object added
    after_first = stored_names(tmp_path / "dst")
    again = copy_snapshots(src, dst)
    assert again.copied == [] and again.skipped == [snap.id]
    assert again.chunks_read == 0 and again.blobs_added == 0
    assert stored_names(tmp_path / "dst") == after_first

    report_check = check(dst, read_data=True)
    assert report_check.ok, [p.to_dict() for p in report_check.problems]
    restore(dst, copy, str(tmp_path / "out"))
    assert (tmp_path / "out" / "disk.raw").read_bytes() == disk
    assert (tmp_path / "out" / "vm.conf").read_bytes() == config


def test_incremental_copy_reads_only_changed_chunks(repos: tuple[Repository, Repository], tmp_path: Path) -> None:
    src, dst = repos
    disk = bytearray(make_disk(5, 32))
    vm = write_vm(tmp_path / "vm", bytes(disk), b"cfg\n")
    backup(src, FilesSource(str(vm)))
    copy_snapshots(src, dst)

    # change three chunks (one of them to content that already exists elsewhere on the disk)
    rng = random.Random(9)
    disk[2 * CS : 3 * CS] = rng.randbytes(CS)
    disk[10 * CS : 11 * CS] = rng.randbytes(CS)
    disk[20 * CS : 21 * CS] = disk[0:CS]
    (vm / "disk.raw").write_bytes(bytes(disk))
    second = backup(src, FilesSource(str(vm))).snapshot

    report = copy_snapshots(src, dst)
    assert [c.source_id for c in report.copied] == [second.id]
    assert report.chunks_read == 2  # the copy of chunk 0 is known already
    assert report.chunks_added == 2
    assert report.raw_bytes_added == 2 * CS
    dst = Repository.open(dst.backend, DST_PASS)
    copy = dst.load_snapshot(report.copied[0].target_id)
    first_copy = next(s for s in dst.list_snapshots() if s.id != copy.id)
    assert copy.parent == first_copy.id  # the chain is kept in the target
    assert check(dst, read_data=True).ok
    restore(dst, copy, str(tmp_path / "out"))
    assert (tmp_path / "out" / "disk.raw").read_bytes() == bytes(disk)


def test_a_copy_asks_the_target_about_each_block_s_chunks_at_once(
    repos: tuple[Repository, Repository], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which chunks the target has is one question per index block, not one per chunk."""
    src, dst = repos
    disk = bytearray(make_disk(6, 48))
    vm = write_vm(tmp_path / "vm", bytes(disk), b"cfg\n")
    backup(src, FilesSource(str(vm)))
    copy_snapshots(src, dst)
    disk[5 * CS : 6 * CS] = random.Random(3).randbytes(CS)
    (vm / "disk.raw").write_bytes(bytes(disk))
    backup(src, FilesSource(str(vm)))
    asked: list[int] = []
    one_by_one: list[bytes] = []
    present_of, has_present = dst.index.present_of, dst.index.has_present
    monkeypatch.setattr(dst.index, "present_of", lambda ids: present_of(asked.append(len(ids := list(ids))) or ids))
    monkeypatch.setattr(dst.index, "has_present", lambda i: one_by_one.append(i) or has_present(i))
    report = copy_snapshots(src, dst)
    assert report.chunks_read == 1 and report.chunks_added == 1
    # (one by one: the block's own id, and what ``add`` checks of the blobs it stores)
    assert len(one_by_one) <= 6 and 0 < len(asked) <= 4 and max(asked) >= 30, (asked, len(one_by_one))
    monkeypatch.undo()
    assert check(Repository.open(dst.backend, DST_PASS), read_data=True).ok


def test_killed_copy_resumes_and_reuses_uploaded_packs(repos: tuple[Repository, Repository], tmp_path: Path) -> None:
    src, dst = repos
    disk = make_disk(7, 48)
    vm = write_vm(tmp_path / "vm", disk, b"cfg\n")
    snap = backup(src, FilesSource(str(vm))).snapshot
    total = len(distinct_nonzero(disk, b"cfg\n"))

    env = dict(os.environ, VMVAULT_TEST_CHEAP_KDF="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    # writes: 1 = lock, then packs (4 chunks each) and an index file after each pack
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine._copy_child", str(tmp_path / "src"), str(tmp_path / "dst"), "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    dst = Repository.open(LocalBackend(str(tmp_path / "dst")), DST_PASS)
    assert dst.snapshot_ids() == []  # no half-written snapshot is visible
    present = data_chunks(dst)
    assert 0 < present < total

    report = copy_snapshots(src, dst)
    assert [c.source_id for c in report.copied] == [snap.id]
    assert report.chunks_added == total - present  # what the killed run indexed is not sent again
    assert check(dst, read_data=True).ok
    restore(dst, dst.load_snapshot(report.copied[0].target_id), str(tmp_path / "out"))
    assert hashlib.sha256((tmp_path / "out" / "disk.raw").read_bytes()).digest() == hashlib.sha256(disk).digest()


def test_unencrypted_repositories_skip_downloads_of_chunks_the_target_has(tmp_path: Path) -> None:
    src = Repository.init(LocalBackend(str(tmp_path / "src")), None, chunk_size=CS)
    dst = Repository.init(LocalBackend(str(tmp_path / "dst")), None, chunk_size=CS)
    shared = chunks_of(make_disk(1, 8))
    disk = make_disk(2, 16, prefix=shared)
    backup(src, FilesSource(str(write_vm(tmp_path / "vm", disk, b"c\n"))))
    backup(dst, FilesSource(str(write_vm(tmp_path / "seed", b"".join(shared), b"c\n"))))
    report = copy_snapshots(src, dst)
    missing = distinct_nonzero(disk) - distinct_nonzero(b"".join(shared))
    assert report.chunks_read == len(missing) == report.chunks_added
    assert check(dst, read_data=True).ok


def test_different_chunk_sizes_are_refused(tmp_path: Path) -> None:
    src = Repository.init(LocalBackend(str(tmp_path / "src")), SRC_PASS, chunk_size=CS)
    dst = Repository.init(LocalBackend(str(tmp_path / "dst")), DST_PASS, chunk_size=2 * CS)
    with pytest.raises(RepositoryError, match="same chunk size"):
        copy_snapshots(src, dst)
    assert list(dst.backend.list("data/")) == []


def test_filters(repos: tuple[Repository, Repository], tmp_path: Path) -> None:
    src, dst = repos
    a = write_vm(tmp_path / "a", make_disk(1, 3), b"a\n")
    b = write_vm(tmp_path / "b", make_disk(2, 3), b"b\n")
    a1 = backup(src, FilesSource(str(a)), tags=["daily"]).snapshot
    a2 = backup(src, FilesSource(str(a)), tags=["daily", "keep"]).snapshot
    b1 = backup(src, FilesSource(str(b))).snapshot
    snaps = src.list_snapshots()
    assert {s.id for s in select_snapshots(snaps, CopyFilter(sources=(str(a),)))} == {a1.id, a2.id}
    assert {s.id for s in select_snapshots(snaps, CopyFilter(tags=("daily", "keep")))} == {a2.id}
    assert {s.id for s in select_snapshots(snaps, CopyFilter(latest=1))} == {a2.id, b1.id}
    assert {s.id for s in select_snapshots(snaps, CopyFilter(snapshots=(b1.id[:10],)))} == {b1.id}
    with pytest.raises(SnapshotNotFoundError):
        select_snapshots(snaps, CopyFilter(snapshots=("ffffffffffff",)))
    report = copy_snapshots(src, dst, filters=CopyFilter(tags=("keep",)))
    assert [c.source_id for c in report.copied] == [a2.id]
    report = copy_snapshots(src, dst)
    assert sorted(c.source_id for c in report.copied) == sorted([a1.id, b1.id])
    assert report.skipped == [a2.id]


def test_a_copy_reads_runs_of_chunks_not_one_request_each(repos: tuple[Repository, Repository], tmp_path: Path) -> None:
    # a copy from remote storage paid one request per chunk; it now reads the runs of a pack's
    # chunks side by side in one ranged read, as a restore does
    src, dst = repos
    disk = make_disk(21, 96)
    vm = write_vm(tmp_path / "vm", disk, b"cfg\n")
    backup(src, FilesSource(str(vm)))
    src = Repository.open(LocalBackend(str(tmp_path / "src")), SRC_PASS)
    before = src.backend.requests.to_dict()
    report = copy_snapshots(src, dst)
    gets = src.backend.requests.to_dict()["get"] - before["get"]
    assert report.chunks_read == len(distinct_nonzero(disk)) + 1  # the disk's chunks and the config's
    # 256 KiB packs hold three or four 64 KiB chunks: a read per pack, and a few for the
    # snapshot, its index blocks and files; one per chunk would be over 70
    assert gets <= report.chunks_read // 2, f"{gets} reads for {report.chunks_read} chunks"
    dst = Repository.open(dst.backend, DST_PASS)
    assert check(dst, read_data=True).ok
    restore(dst, dst.load_snapshot(report.copied[0].target_id), str(tmp_path / "out"))
    assert (tmp_path / "out" / "disk.raw").read_bytes() == disk


def test_a_damaged_chunk_in_the_source_fails_the_copy_and_names_it(
    repos: tuple[Repository, Repository], tmp_path: Path
) -> None:
    from vmvault.errors import IntegrityError
    from vmvault.repo.pack import pack_name

    src, dst = repos
    disk = make_disk(22, 16)
    vm = write_vm(tmp_path / "vm", disk, b"cfg\n")
    snap = backup(src, FilesSource(str(vm))).snapshot
    # flip a byte inside one chunk's sealed bytes in its pack
    victim = next(loc for _i, loc in src.index.items() if loc.entry.type is BlobType.DATA)
    path = tmp_path / "src" / pack_name(victim.pack_id)
    raw = bytearray(path.read_bytes())
    raw[victim.entry.offset + victim.entry.length // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    src = Repository.open(LocalBackend(str(tmp_path / "src")), SRC_PASS)
    with pytest.raises(IntegrityError):
        copy_snapshots(src, dst)
    dst = Repository.open(dst.backend, DST_PASS)
    assert not [s for s in dst.list_snapshots() if s.extra.get(COPIED_FROM, {}).get("snapshot") == snap.id]


def test_a_copied_snapshot_whose_read_back_fails_is_kept_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.engine.test_backup import DropsSnapshotReads

    src = Repository.init(LocalBackend(str(tmp_path / "src")), SRC_PASS, chunk_size=CS)
    target = DropsSnapshotReads()
    dst = Repository.init(target, DST_PASS, chunk_size=CS)
    snap = backup(src, FilesSource(str(write_vm(tmp_path / "vm", make_disk(4, 8), b"x\n")))).snapshot
    target.drops = 1
    report = copy_snapshots(src, dst)
    assert [c.source_id for c in report.copied] == [snap.id]
    assert "is stored, but reading it back to confirm it failed" in caplog.text
    assert len(Repository.open(target, DST_PASS).list_snapshots()) == 1

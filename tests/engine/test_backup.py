"""Backup and restore engine: round trips, sparseness, dedup, change tracking, faults."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import as_nobody, small_tmpfs
from tests.engine.helpers import MemoryDisk, ScriptedSource
from vmvault import platform
from vmvault.backends.base import Backend, ObjectInfo
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.disk.base import Extent, ExtentKind
from vmvault.engine.backup import backup, chunk_runs
from vmvault.engine.restore import restore
from vmvault.errors import BackendConnectionError, SourceError, StorageFullError
from vmvault.hypervisors.base import BackupOptions
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.check import check
from vmvault.repo.repository import Repository

CS = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def new_repo(backend: Backend | None = None, chunk_size: int = CS) -> Repository:
    return Repository.init(backend or MemoryBackend(), b"passphrase", chunk_size=chunk_size)


def sample_bytes(size: int, seed: int) -> bytearray:
    rng = random.Random(seed)
    data = bytearray(size)
    for off in range(0, size, 16 * 1024):
        kind = rng.random()
        if kind < 0.4:
            data[off : off + 16 * 1024] = rng.randbytes(16 * 1024)
        elif kind < 0.7:
            data[off : off + 16 * 1024] = (b"text %d " % off) * (16 * 1024 // len(b"text %d " % off)) + bytes(
                16 * 1024 % len(b"text %d " % off)
            )
    return data


# ---- chunk planning ---------------------------------------------------------------------


def _brute_force(extents: list[Extent], size: int, cs: int) -> list[str]:
    kinds = []
    for c in range(-(-size // cs)):
        lo, hi = c * cs, min((c + 1) * cs, size)
        seen = {e.kind for e in extents if e.offset < hi and e.end > lo}
        if seen == {ExtentKind.ZERO}:
            kinds.append("zero")
        elif seen == {ExtentKind.PARENT}:
            kinds.append("parent")
        else:
            kinds.append("data")
    return kinds


@given(
    pieces=st.lists(st.tuples(st.integers(1, 5 * 4096), st.sampled_from(list(ExtentKind))), min_size=1, max_size=30),
    cs_pow=st.integers(12, 14),
)
@settings(max_examples=300, deadline=None)
def test_chunk_runs_match_a_brute_force_model(pieces: list[tuple[int, ExtentKind]], cs_pow: int) -> None:
    cs = 1 << cs_pow
    extents, pos = [], 0
    for length, kind in pieces:
        extents.append(Extent(pos, length, kind))
        pos += length
    runs = list(chunk_runs(extents, pos, cs))
    flat = [k for first, end, k in runs for _ in range(first, end)]
    assert flat == _brute_force(extents, pos, cs)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))


# ---- round trips ------------------------------------------------------------------------


@pytest.mark.skipif(platform.HIDE_POSIX, reason="holes are found by SEEK_DATA; hidden, they read as data")
def test_sparse_image_round_trip_keeps_holes(tmp_path: Path) -> None:
    img = tmp_path / "vm" / "disk.raw"
    img.parent.mkdir()
    size = 8 << 20
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(os.urandom(300_000))
        f.seek(5 << 20)
        f.write(b"x" * 100_000)
    (tmp_path / "vm" / "vm.conf").write_text("name = t\n")
    os.chmod(tmp_path / "vm" / "vm.conf", 0o640)
    repo = new_repo()
    result = backup(repo, FilesSource(str(tmp_path / "vm")))
    # only the allocated extents are read (SEEK_DATA/SEEK_HOLE), rounded to chunks
    assert result.bytes_read < 1 << 20
    out = tmp_path / "out"
    restore(repo, result.snapshot, str(out))
    assert (out / "disk.raw").read_bytes() == img.read_bytes()
    assert os.stat(out / "disk.raw").st_blocks * 512 < 1 << 20, "restored image must stay sparse"
    conf = out / "vm.conf"
    assert conf.read_text() == "name = t\n"
    assert os.stat(conf).st_mode & 0o777 == 0o640
    assert os.stat(conf).st_mtime_ns == os.stat(tmp_path / "vm" / "vm.conf").st_mtime_ns


def test_second_backup_of_unchanged_data_stores_nothing_and_zero_chunks_are_never_stored() -> None:
    data = sample_bytes(4 << 20, 1)
    data[1 << 20 : 2 << 20] = bytes(1 << 20)  # allocated but zero
    disk = MemoryDisk(data)
    repo = new_repo()
    first = backup(repo, ScriptedSource(disk))
    stored = first.raw_new
    assert stored <= len(data) - (1 << 20) + 64 * 1024  # the zero MiB is not stored
    second = backup(repo, ScriptedSource(disk, location="test://other"))
    assert second.chunks_new == 0 and second.bytes_new == 0


def test_the_index_is_asked_once_per_batch_not_once_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deduplication asks the index about a batch's chunks together (``RepoIndex.present_of``),
    and a chunk repeated within a batch is sealed once; what is stored stays the same."""
    from vmvault.engine import backup as engine_backup
    from vmvault.repo import repo_index

    monkeypatch.setattr(engine_backup, "BATCH_BYTES", 8 * CS)
    data = bytearray(random.Random(3).randbytes(2 << 20))
    data[: 4 * CS] = data[4 * CS : 8 * CS]  # four chunks repeated within the first batch
    n_chunks = len(data) // CS
    repo = new_repo()
    asked: list[int] = []
    alone: list[bytes] = []
    together, one = repo_index.RepoIndex.present_of, repo_index.RepoIndex.has_present

    def counted(self: repo_index.RepoIndex, blob_ids: Iterator[bytes]) -> set[bytes]:
        wanted = list(blob_ids)
        asked.append(len(wanted))
        return together(self, wanted)

    def counted_one(self: repo_index.RepoIndex, blob_id: bytes) -> bool:
        alone.append(blob_id)
        return one(self, blob_id)

    monkeypatch.setattr(repo_index.RepoIndex, "present_of", counted)
    monkeypatch.setattr(repo_index.RepoIndex, "has_present", counted_one)
    first = backup(repo, ScriptedSource(MemoryDisk(data)))
    # a question per batch (its distinct chunks) and one for the index block
    assert len(asked) == n_chunks // 8 + 1 and sum(asked) == n_chunks - 4 + 1, asked
    assert first.chunks_new == n_chunks - 4 + 1  # the chunks once each, and one index block
    assert alone == [], "nothing is looked up alone"
    asked.clear()
    second = backup(repo, ScriptedSource(MemoryDisk(data), location="test://other"))
    assert second.chunks_new == 0 and len(asked) == n_chunks // 8 + 1 and alone == []
    monkeypatch.undo()
    assert check(repo, read_data=True).ok


def test_the_heap_keeps_the_pipelines_swing_while_the_backup_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the command line tuned malloc, the heap's freed top is kept up to twice the
    pipeline's budget during a backup and set back to what it was after it, also when the
    backup fails (the command line has every thread share one heap: tests/cli/test_cli.py)."""
    from vmvault.engine.backup import pipeline_budget

    calls: list[tuple[int, ...]] = []
    monkeypatch.setattr(platform, "keep_freed_memory", lambda *a, **k: calls.append(tuple(k.values())) or True)
    monkeypatch.setattr(platform, "kept_free", lambda: platform.KEPT_FREE)
    repo = new_repo()
    swing = 2 * pipeline_budget(repo.config.pack_size)
    backup(repo, ScriptedSource(MemoryDisk(sample_bytes(1 << 20, 4))))
    assert calls == [(swing,), (platform.KEPT_FREE,)]
    calls.clear()
    with pytest.raises(SourceError):
        backup(repo, ScriptedSource(ShrinkingDisk(sample_bytes(4 << 20, 5))))
    assert calls == [(swing,), (platform.KEPT_FREE,)]


def test_a_library_callers_malloc_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program that imports vmvault and never ran its command line keeps glibc's settings."""
    calls: list[str] = []
    monkeypatch.setattr(platform, "keep_freed_memory", lambda *a, **k: calls.append("kept") or True)
    monkeypatch.setattr(platform, "one_malloc_arena", lambda: calls.append("one heap") or True)
    monkeypatch.setattr(platform, "kept_free", lambda: None)
    backup(new_repo(), ScriptedSource(MemoryDisk(sample_bytes(1 << 20, 4))))
    assert calls == []


def test_restore_refuses_to_overwrite(tmp_path: Path) -> None:
    disk = MemoryDisk(sample_bytes(1 << 20, 2))
    repo = new_repo()
    snap = backup(repo, ScriptedSource(disk)).snapshot
    restore(repo, snap, str(tmp_path / "out"))
    with pytest.raises(Exception, match="exists"):
        restore(repo, snap, str(tmp_path / "out"))


# ---- change tracking --------------------------------------------------------------------


def test_incremental_reads_only_changed_chunks_and_restores_the_new_state(tmp_path: Path) -> None:
    size = 64 << 20  # 1024 chunks of 64 KiB: index blocks of 4096 chunks -> 1 block; use more
    data = sample_bytes(size, 3)
    disk = MemoryDisk(data)
    repo = new_repo()
    source = ScriptedSource(disk)
    first = backup(repo, source)
    assert first.snapshot.disks[0].stats["incremental"] == 0
    # the guest writes 3 small ranges
    writes = [(100_000, 5000), (30 << 20, 70_000), (size - 10, 10)]
    for off, length in writes:
        data[off : off + length] = os.urandom(length)
    source.changed = writes
    disk.bytes_read = 0
    second = backup(repo, source)
    assert source.last_previous is not None and source.last_previous.snapshot_id == first.snapshot.id
    assert source.last_previous.disks["vda"] == {"kind": "test", "token": 1}
    assert second.snapshot.disks[0].stats["incremental"] == 1
    touched_chunks = {o // CS for o, n in writes} | {(o + n - 1) // CS for o, n in writes}
    assert disk.bytes_read == len(touched_chunks) * CS
    assert source.sessions[-1].completed == second.snapshot.id and source.sessions[-1].closed
    out = tmp_path / "out"
    restore(repo, second.snapshot, str(out))
    assert (out / "vda.raw").read_bytes() == bytes(data)


def test_incremental_reuses_unchanged_index_blocks_without_reading_them() -> None:
    size = 3 * 4096 * 4096 + 5000  # 3 index blocks of 4 KiB chunks plus a partial one
    data = bytearray(size)
    data[0:4096] = b"a" * 4096
    data[-5000:] = b"b" * 5000
    disk = MemoryDisk(data, allocated=[(0, 4096), (size - 5000, 5000)])
    repo = new_repo(chunk_size=4096)
    source = ScriptedSource(disk)
    first = backup(repo, source)
    data[0:10] = b"0123456789"
    source.changed = [(0, 10)]
    disk.bytes_read = 0
    second = backup(repo, source)
    assert disk.bytes_read == 4096
    a, b = first.snapshot.disks[0].index, second.snapshot.disks[0].index
    assert a[0] != b[0] and a[1:] == b[1:]


def test_full_flag_ignores_change_tracking() -> None:
    disk = MemoryDisk(sample_bytes(2 << 20, 4))
    repo = new_repo()
    source = ScriptedSource(disk)
    backup(repo, source)
    source.changed = []
    disk.bytes_read = 0
    assert backup(repo, source).bytes_read == 0
    assert backup(repo, source, BackupOptions(full=True)).bytes_read == 2 << 20


# ---- faults -----------------------------------------------------------------------------


class FillingBackend(MemoryBackend):
    """Refuses pack writes once ``budget`` bytes of packs are stored, like a full disk."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def put(self, name: str, data: bytes) -> None:
        if name.startswith("data/"):
            used = sum(o.size for o in self.list("data/"))
            if used + len(data) > self.budget:
                raise StorageFullError("the repository's disk is full", name=name)
        super().put(name, data)


def test_full_storage_fails_cleanly_keeps_old_snapshots_and_recovers() -> None:
    backend = FillingBackend(budget=1 << 60)
    repo = Repository.init(backend, b"pw", chunk_size=CS, pack_size=1 << 20)
    small = MemoryDisk(sample_bytes(1 << 20, 5))
    keep = backup(repo, ScriptedSource(small, location="test://small")).snapshot
    big = MemoryDisk(bytearray(os.urandom(8 << 20)))
    backend.budget = sum(o.size for o in backend.list("data/")) + (3 << 20)
    with pytest.raises(StorageFullError):
        backup(repo, ScriptedSource(big, location="test://big"))
    assert [s.id for s in repo.list_snapshots()] == [keep.id], "no half-written snapshot may appear"
    assert check(repo, read_data=True).ok
    backend.budget = 1 << 60  # space freed
    uploaded_before = sum(o.size for o in backend.list("data/"))
    again = backup(repo, ScriptedSource(big, location="test://big"))
    assert again.bytes_new < 8 << 20, "packs uploaded before the failure are reused"
    assert sum(o.size for o in backend.list("data/")) - uploaded_before >= again.bytes_new
    assert check(repo, read_data=True).ok


class ShrinkingDisk(MemoryDisk):
    def read(self, offset: int, length: int) -> bytes:
        limit = 1 << 20  # the file was truncated to 1 MiB under us
        return super().read(offset, max(0, min(length, limit - offset)))


def test_source_shrinking_mid_read_is_a_clear_source_error() -> None:
    repo = new_repo()
    with pytest.raises(SourceError, match="changed size"):
        backup(repo, ScriptedSource(ShrinkingDisk(sample_bytes(4 << 20, 6))))
    assert repo.list_snapshots() == []


def test_vanished_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        FilesSource(str(tmp_path / "gone"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_permission_denied_on_source_and_repository_are_clear_errors(tmp_path: Path) -> None:
    import tempfile

    # pytest's own temp folders are private to root: use one the unprivileged user can enter
    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))
    tmp_path.chmod(0o755)
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"x" * 4096)
    secret.chmod(0o000)
    repo_dir = tmp_path / "repo"
    Repository.init(LocalBackend(str(repo_dir)), b"pw", chunk_size=CS)
    for p in [repo_dir, *repo_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # readable, not writable, by others
    readable = tmp_path / "ok.raw"
    readable.write_bytes(b"y" * 4096)
    readable.chmod(0o644)

    def backup_secret() -> str:
        FilesSource(str(secret)).open_session(None)
        return "no error"

    def backup_into_readonly_repo() -> str:
        repo = Repository.open(LocalBackend(str(repo_dir)), b"pw")
        backup(repo, FilesSource(str(readable)))
        return "no error"

    assert as_nobody(backup_secret).startswith("SourceError: ") and "Permission denied" in as_nobody(backup_secret)
    text = as_nobody(backup_into_readonly_repo)
    assert text.startswith("BackendPermissionError: ") and "Permission denied" in text, text
    shutil.rmtree(tmp_path)


def test_permission_denied_on_the_repository(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    repo = Repository.init(LocalBackend(str(repo_dir)), b"pw", chunk_size=CS)
    disk = MemoryDisk(sample_bytes(1 << 20, 7))

    class ReadOnly(LocalBackend):
        def put_parts(self, name: str, parts: Sequence[bytes]) -> None:  # (put too: it calls this)
            raise PermissionError(13, "Permission denied")

    ro = Repository.open(ReadOnly(str(repo_dir)), b"pw")
    with pytest.raises(Exception) as info:
        backup(ro, ScriptedSource(disk))
    assert "Permission denied" in str(info.value)
    assert repo.list_snapshots() == []


def test_list_objects_ignore_temporary_files(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    backend.put("data/ab/abc", b"x")
    (tmp_path / "data" / "ab" / "abd.tmp-123").write_bytes(b"partial")
    assert list(backend.list("data/")) == [ObjectInfo("data/ab/abc", 1)]


@pytest.fixture(name="small_tmpfs")
def small_tmpfs_fixture(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tmpfs", "24m") as mnt:
        yield mnt


@pytest.mark.integration
def test_real_disk_full_on_a_small_tmpfs(small_tmpfs: Path, tmp_path: Path) -> None:
    repo = Repository.init(LocalBackend(str(small_tmpfs / "repo")), b"pw", chunk_size=CS, pack_size=2 << 20)
    small = MemoryDisk(sample_bytes(2 << 20, 8))
    keep = backup(repo, ScriptedSource(small, location="test://small")).snapshot
    big = MemoryDisk(bytearray(os.urandom(48 << 20)))
    with pytest.raises(StorageFullError, match="full"):
        backup(repo, ScriptedSource(big, location="test://big"))
    repo = Repository.open(LocalBackend(str(small_tmpfs / "repo")), b"pw")
    assert [s.id for s in repo.list_snapshots()] == [keep.id]
    assert check(repo, read_data=True).ok
    # the administrator frees space (here: grows the file system); the next run succeeds
    subprocess.run(["mount", "-o", "remount,size=128m", str(small_tmpfs)], check=True)
    again = backup(repo, ScriptedSource(big, location="test://big"))
    assert again.bytes_new < 48 << 20
    out = tmp_path / "out"
    restore(repo, again.snapshot, str(out))
    assert (out / "vda.raw").read_bytes() == bytes(big.data)


class LayerDisk(MemoryDisk):
    """A checkpoint layer: ``own`` maps offset ranges to DATA or ZERO; the rest defers to ``base``."""

    def __init__(self, base: MemoryDisk, own: list[tuple[int, int, ExtentKind]]) -> None:
        super().__init__(bytearray(base.data))
        self.base = base
        self.own = own

    @property
    def parent(self) -> MemoryDisk:
        return self.base

    def extents(self) -> Iterator[Extent]:
        pos, out = 0, []
        for off, length, kind in sorted(self.own):
            if off > pos:
                out.append(Extent(pos, off - pos, ExtentKind.PARENT))
            out.append(Extent(off, length, kind))
            pos = off + length
        if pos < self.size:
            out.append(Extent(pos, self.size - pos, ExtentKind.PARENT))
        return iter(out)

    def write(self, off: int, data: bytes, kind: ExtentKind = ExtentKind.DATA) -> None:
        self.data[off : off + len(data)] = data
        self.own.append((off, len(data), kind))


def test_layer_incrementals_read_only_changed_chunks_and_restore_the_chain(tmp_path: Path) -> None:
    from vmvault.hypervisors.base import DEFAULT_OPTIONS, BackupSession, PreviousBackup, Source, SourceDisk

    size = 4 << 20
    base = MemoryDisk(sample_bytes(size, 9))
    leaf = LayerDisk(base, [])
    leaf.write(1 << 20, os.urandom(CS))

    class ChainSource(Source):
        kind, location = "test", "test://chain"
        changed: list[tuple[int, int]] | None = None

        def open_session(
            self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS
        ) -> BackupSession:
            from tests.engine.helpers import ScriptedSession

            frozen = [] if previous else None  # the base layer is frozen: nothing changed in it
            disks = [
                SourceDisk("base.vhdx", base, "raw", changed=frozen, cbt={"t": 1}),
                SourceDisk(
                    "leaf.avhdx",
                    leaf,
                    "raw",
                    changed=self.changed if previous else None,
                    cbt={"t": 1},
                    layer=True,
                    parent_name="base.vhdx",
                ),
            ]
            return ScriptedSession(disks)

    repo = new_repo()
    source = ChainSource()
    backup(repo, source)
    # the guest writes into the leaf: new data, explicit zeros over parent data
    leaf.write(2 << 20, os.urandom(100), ExtentKind.DATA)
    leaf.write(3 << 20, bytes(CS), ExtentKind.ZERO)
    source.changed = [(2 << 20, 100), (3 << 20, CS)]
    base.bytes_read = leaf.bytes_read = 0
    second = backup(repo, source)
    assert base.bytes_read == 0, "a frozen layer is not read again"
    assert leaf.bytes_read == CS, "only the changed data chunk is read (the zeroed one is not)"
    assert all(d.stats["incremental"] == 1 for d in second.snapshot.disks)
    out = tmp_path / "flat"
    restore(repo, second.snapshot, str(out), flatten=True, format="raw")
    assert (out / "leaf.avhdx").read_bytes() == bytes(leaf.data)


class DropsSnapshotReads(MemoryBackend):
    """Storage that keeps every snapshot it is given but drops the connection on the next
    ``drops`` reads of one (a network that fails just after the upload)."""

    drops = 0

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith("snapshots/") and self.drops:
            self.drops -= 1
            raise BackendConnectionError(f"{self.url}: the connection dropped reading {name}")
        return super().get(name, offset, length)


def test_a_snapshot_stored_whose_read_back_fails_is_a_warning_not_a_failed_backup() -> None:
    """The snapshot was stored (only confirming it failed): the backup had failed although its
    snapshot was there for the next one to build on."""
    backend = DropsSnapshotReads()
    repo = new_repo(backend)
    backend.drops = 1
    result = backup(repo, ScriptedSource(MemoryDisk(sample_bytes(1 << 20, 3))))
    assert any("is stored, but reading it back to confirm it failed" in w for w in result.warnings), result.warnings
    assert [s.id for s in Repository.open(backend, b"passphrase").list_snapshots()] == [result.snapshot.id]
    assert check(Repository.open(backend, b"passphrase"), read_data=True).ok

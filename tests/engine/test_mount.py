"""MountView, the tree and reads behind ``vmvault mount``, without FUSE: layout, names from
the storage, reads, holes, damage, many readers."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import random
import threading
from pathlib import Path

import pytest

from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.engine.mountfs import MountView
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.format import ChunkResolver
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 64 * 1024
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def make_vm(folder: Path, seed: int) -> dict[str, bytes]:
    """A VM folder: a sparse disk (data at 1 MiB and 5 MiB, holes elsewhere) and two files."""
    folder.mkdir(parents=True)
    data = bytearray(8 * MiB)
    data[MiB : 2 * MiB] = random.Random(seed).randbytes(MiB)  # no two chunks alike
    data[5 * MiB + 100 : 5 * MiB + 200] = b"x" * 100
    with open(folder / "disk.raw", "wb") as f:
        f.truncate(len(data))
        f.seek(MiB)
        f.write(data[MiB : 2 * MiB])
        f.seek(5 * MiB)
        f.write(data[5 * MiB : 5 * MiB + CS])
    (folder / "notes.txt").write_bytes(b"notes %d\n" % seed * 20000)  # several chunks
    (folder / "sub").mkdir()
    (folder / "sub" / "config.xml").write_bytes(b"<vm/>\n")
    return {"disk.raw": bytes(data), "notes.txt": (folder / "notes.txt").read_bytes(), "sub/config.xml": b"<vm/>\n"}


@pytest.fixture()
def repo_snaps(tmp_path: Path) -> tuple[Repository, list[Snapshot], dict[str, bytes]]:
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    content = make_vm(tmp_path / "web01", 1)
    first = backup(repo, FilesSource(str(tmp_path / "web01"))).snapshot
    (tmp_path / "web01" / "notes.txt").write_bytes(b"changed\n")
    second = backup(repo, FilesSource(str(tmp_path / "web01"))).snapshot
    second = dataclasses.replace(second, time="2099-01-01T00:00:00+00:00")  # surely the newest
    second.id = repo.list_snapshots()[-1].id
    return repo, [first, second], content


def folder_of(view: MountView, snap: Snapshot) -> str:
    (name,) = [n for n in view.readdir("/by-vm/web01") if n.endswith(snap.short_id)]
    return f"/by-vm/web01/{name}"


def read_all(view: MountView, path: str, piece: int = 128 * 1024) -> bytes:
    fh = view.open(path, os.O_RDONLY)
    try:
        out, pos = bytearray(), 0
        while data := view.read(fh, piece, pos):
            out += data
            pos += len(data)
        return bytes(out)
    finally:
        view.release(fh)


def test_the_tree_holds_each_snapshot_with_its_disks_files_and_a_latest_link(
    repo_snaps: tuple[Repository, list[Snapshot], dict[str, bytes]],
) -> None:
    repo, snaps, content = repo_snaps
    view = MountView(repo, snaps)
    try:
        assert view.readdir("/") == [".", "..", "by-vm"]
        names = view.readdir("/by-vm/web01")
        assert len(names) == 5 and "latest" in names
        assert view.readlink("/by-vm/web01/latest") == folder_of(view, snaps[1]).rsplit("/", 1)[1]
        top = folder_of(view, snaps[0])
        assert top.rsplit("/", 1)[1].startswith(snaps[0].time[:10] + "T")
        assert view.readdir(top) == [".", "..", "disk.raw", "notes.txt", "sub"]
        attrs = view.getattr(f"{top}/disk.raw")
        assert attrs["st_size"] == 8 * MiB and attrs["st_mode"] == 0o100444
        assert view.getattr(f"{top}/sub")["st_mode"] == 0o40555
        assert view.getattr("/by-vm/web01/latest")["st_mode"] & 0o170000 == 0o120000
        assert read_all(view, f"{top}/disk.raw") == content["disk.raw"]
        assert read_all(view, f"{top}/notes.txt") == content["notes.txt"]
        assert read_all(view, f"{top}/sub/config.xml") == content["sub/config.xml"]
        assert read_all(view, f"{folder_of(view, snaps[1])}/notes.txt") == b"changed\n"
        for bad, code in (("/nothing", errno.ENOENT), ("/by-vm/web01/latest/x", errno.ENOTDIR)):
            with pytest.raises(OSError) as err:
                view.getattr(bad)
            assert err.value.errno == code
        with pytest.raises(OSError) as err:
            view.open(f"{top}/disk.raw", os.O_RDWR)
        assert err.value.errno == errno.EROFS
    finally:
        view.close()


def test_holes_are_reported_as_holes(repo_snaps: tuple[Repository, list[Snapshot], dict[str, bytes]]) -> None:
    repo, snaps, _ = repo_snaps
    view = MountView(repo, snaps[:1])
    try:
        fh = view.open(f"{folder_of(view, snaps[0])}/disk.raw", os.O_RDONLY)
        data, hole = os.SEEK_DATA, os.SEEK_HOLE
        assert view.lseek(fh, 0, data) == MiB
        assert view.lseek(fh, 0, hole) == 0
        assert view.lseek(fh, MiB + 5, hole) == 2 * MiB
        assert view.lseek(fh, 2 * MiB, data) == 5 * MiB
        assert view.lseek(fh, 5 * MiB, hole) == 5 * MiB + CS
        with pytest.raises(OSError) as err:
            view.lseek(fh, 6 * MiB, data)  # no data after it
        assert err.value.errno == errno.ENXIO
        with pytest.raises(OSError) as err:
            view.lseek(fh, 8 * MiB, hole)
        assert err.value.errno == errno.ENXIO
        view.release(fh)
        fh = view.open(f"{folder_of(view, snaps[0])}/notes.txt", os.O_RDONLY)
        assert (
            view.lseek(fh, 10, data) == 10
            and view.lseek(fh, 10, hole) == view.getattr(f"{folder_of(view, snaps[0])}/notes.txt")["st_size"]
        )
    finally:
        view.close()


def test_names_from_the_storage_never_leave_their_folder(
    repo_snaps: tuple[Repository, list[Snapshot], dict[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    repo, snaps, content = repo_snaps
    snap = snaps[0]
    disk = snap.disks[0]
    hostile = dataclasses.replace(
        snap,
        vm={"name": "../../etc"},
        disks=[
            dataclasses.replace(disk, name="../escape.raw"),
            dataclasses.replace(disk, name="a/./b.raw"),
            dataclasses.replace(disk, name="x" * 300),
            dataclasses.replace(disk, name="nul\0.raw"),
            dataclasses.replace(disk, name="ok.raw"),
        ],
        files=[
            dataclasses.replace(snap.files[0], name="ok.raw"),  # a second name for the same place
            dataclasses.replace(snap.files[0], name="ok.raw/under"),  # a file used as a folder
            dataclasses.replace(snap.files[0], name="/abs"),
        ],
    )
    hostile.id = snap.id
    with caplog.at_level(logging.WARNING, logger="vmvault.mount"):
        view = MountView(repo, [hostile])
    try:
        assert view.readdir("/by-vm") == [".", "..", ".._.._etc"]
        (folder,) = [n for n in view.readdir("/by-vm/.._.._etc") if n != "latest" and n not in (".", "..")]
        assert view.readdir(f"/by-vm/.._.._etc/{folder}") == [".", "..", "ok.raw"]
        assert read_all(view, f"/by-vm/.._.._etc/{folder}/ok.raw") == content["disk.raw"]
        assert len(view.left_out) == 7
        assert len([r for r in caplog.records if "left out of the mount" in r.getMessage()]) == 7
    finally:
        view.close()


def _damage(repo: Repository, snap: Snapshot, chunk: int) -> None:
    chunk_id = ChunkResolver(repo, snap, snap.disks[0]).chunk_id(chunk)
    assert chunk_id is not None
    loc = repo.index.lookup(chunk_id)
    assert loc is not None and isinstance(repo.backend, MemoryBackend)
    name = pack_name(loc.pack_id)
    data = bytearray(repo.backend.get(name))
    data[loc.entry.offset + loc.entry.length // 2] ^= 0x40
    repo.backend.put(name, bytes(data))


def test_a_damaged_chunk_is_eio_for_its_range_with_one_log_line_and_the_rest_reads(
    repo_snaps: tuple[Repository, list[Snapshot], dict[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    repo, snaps, content = repo_snaps
    snap = snaps[0]
    damaged_chunk = (MiB + 3 * CS) // CS
    _damage(repo, snap, damaged_chunk)
    view = MountView(repo, [snap], readahead=4)
    path = f"{folder_of(view, snap)}/disk.raw"
    try:
        fh = view.open(path, os.O_RDONLY)
        with caplog.at_level(logging.ERROR, logger="vmvault.mount"):
            for _ in range(3):  # a program retrying: one log line a minute, EIO each time
                with pytest.raises(OSError) as err:
                    view.read(fh, 4096, damaged_chunk * CS + 8192)
                assert err.value.errno == errno.EIO
        (record,) = caplog.records
        line = record.getMessage()
        assert f"snapshot {snap.short_id}" in line and "disk disk.raw" in line
        assert f"offset {damaged_chunk * CS + 8192}" in line and "damaged" in line
        for offset in (0, MiB, damaged_chunk * CS - CS, damaged_chunk * CS + CS, 5 * MiB):
            assert view.read(fh, CS, offset) == content["disk.raw"][offset : offset + CS]
        view.release(fh)
    finally:
        view.close()


def test_many_readers_at_once_share_a_bounded_cache(
    repo_snaps: tuple[Repository, list[Snapshot], dict[str, bytes]],
) -> None:
    repo, snaps, content = repo_snaps
    view = MountView(repo, snaps, cache_bytes=4 * CS, readahead=4)
    paths = [f"{folder_of(view, s)}/disk.raw" for s in snaps] * 4
    want = hashlib.sha256(content["disk.raw"]).hexdigest()
    results: list[str] = []
    errors: list[BaseException] = []

    def reader(path: str, piece: int) -> None:
        try:
            results.append(hashlib.sha256(read_all(view, path, piece)).hexdigest())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(p, 4096 << (i % 6))) for i, p in enumerate(paths)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and results == [want] * len(paths)
        assert view.cache.cached_bytes <= 4 * CS
        assert view.cache.stats.hits > 0, "readers of the same chunks share them"
    finally:
        view.close()


def test_a_view_of_summaries_reads_each_opened_file_from_its_whole_snapshot(
    repo_snaps: tuple[Repository, list[Snapshot], dict[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """``vmvault mount`` of every snapshot gives the view summaries (repository-format.md
    12.10): an opened disk or file reads its snapshot again whole, held by the open file only;
    a snapshot that no longer reads makes the open EIO, logged, and the rest still reads."""
    repo, _snaps, content = repo_snaps
    summaries = repo.list_snapshots(summaries=True)
    assert all(s.is_summary for s in summaries)
    view = MountView(repo, summaries)
    try:
        first, second = (folder_of(view, s) for s in summaries)
        assert read_all(view, f"{first}/disk.raw") == content["disk.raw"]
        assert read_all(view, f"{first}/sub/config.xml") == content["sub/config.xml"]
        assert read_all(view, f"{second}/notes.txt") == b"changed\n"
        repo.backend.delete(f"snapshots/{summaries[0].id}")
        repo._snapshots_kept().discard(summaries[0].id)  # and this host's copy of it
        with caplog.at_level(logging.ERROR), pytest.raises(OSError) as err:
            view.open(f"{first}/notes.txt", os.O_RDONLY)
        assert err.value.errno == errno.EIO and summaries[0].short_id in caplog.text
        assert read_all(view, f"{second}/disk.raw") == content["disk.raw"]
    finally:
        view.close()

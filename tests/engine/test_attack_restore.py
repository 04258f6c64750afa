"""Whoever writes the restore target folder: a restore never writes where it should not.

Threat model: docs/design/repository-format.md, section 10.5. The target folder (and every
folder in it) may hold links to anywhere, dangling links named like the snapshot's disks and
files, files and folders named like a restore's temporary names; a restore must create every
file and folder without following a link, never replace an existing name, never leave a file
that looks complete under its final name, give modes no wider than stored, and fail with a
clear ``TargetError`` instead of a traceback. The property test at the end plants random trees
of links, files and folders and checks that nothing outside the target and nothing that was
already in the target changed.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import small_tmpfs as mount_tmpfs
from vmvault.backends.memory import MemoryBackend
from vmvault.disk import create_image, open_image
from vmvault.disk.chain import checkpoint
from vmvault.engine import target as target_mod
from vmvault.engine.backup import backup
from vmvault.engine.clone import restore_clone
from vmvault.engine.restore import RestoreResult, restore
from vmvault.engine.target import WORK_PREFIX, rename_noreplace
from vmvault.errors import ConfigError, IntegrityError, TargetError, TargetFullError, VmvaultError
from vmvault.hypervisors.files import FilesSource
from vmvault.hypervisors.qemu_restore import write_restore_files
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import FileRecord, Snapshot

CS = 64 * 1024
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def make_vm(folder: Path, *, chain: bool = False) -> Path:
    """A VM folder: a 0600 qcow2 disk with data, a setuid config file, a file in a subfolder,
    and (``chain``) a VHDX with a checkpoint."""
    (folder / "sub").mkdir(parents=True)
    with create_image(str(folder / "disk.qcow2"), "qcow2", 4 * MIB) as w:
        w.write(MIB, os.urandom(3 * CS))
    os.chmod(folder / "disk.qcow2", 0o600)
    (folder / "vm.conf").write_text("name = vm1\n")
    os.chmod(folder / "vm.conf", 0o4750)
    (folder / "sub" / "nvram.bin").write_bytes(os.urandom(3000))
    os.chmod(folder / "sub" / "nvram.bin", 0o640)
    if chain:
        with create_image(str(folder / "base.vhdx"), "vhdx", 8 * MIB) as w:
            w.write(0, os.urandom(CS))
        child = checkpoint(str(folder / "base.vhdx"))
        with open_image(child) as img:
            assert img.parent is not None
        from vmvault.disk.chain import open_for_write

        with open_for_write(child) as w:
            w.write(2 * MIB, os.urandom(CS))
    return folder


def new_repo() -> Repository:
    return Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)


@pytest.fixture
def vm(tmp_path: Path) -> Path:
    return make_vm(tmp_path / "vm")


@pytest.fixture
def snap_repo(vm: Path) -> tuple[Repository, Snapshot]:
    repo = new_repo()
    return repo, backup(repo, FilesSource(str(vm))).snapshot


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (links not followed): type, mode, mtime, content or link text."""
    out: dict[str, tuple[Any, ...]] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid, digest)
    return out


def outside_tree(base: Path) -> Path:
    out = base / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "file").write_bytes(b"outside file")
    os.chmod(out / "file", 0o600)
    (out / "dir" / "inner").write_bytes(b"inner")
    return out


def work_folders(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(WORK_PREFIX))


# ---- links in the target ------------------------------------------------------------------


def test_a_linked_subfolder_is_refused_before_anything_is_written(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot]
) -> None:
    repo, snap = snap_repo
    outside = outside_tree(tmp_path)
    before = tree(outside)
    t = tmp_path / "t"
    t.mkdir()
    (t / "sub").symlink_to(outside / "dir")
    with pytest.raises(TargetError, match="is a link"):
        restore(repo, snap, str(t))
    assert tree(outside) == before
    assert sorted(os.listdir(t)) == ["sub"], "refused before any disk or file was written"


@pytest.mark.parametrize("name", ["disk.qcow2", "vm.conf", "sub/nvram.bin"])
@pytest.mark.parametrize("to", ["created-by-restore", "file", "dir"])
def test_a_link_named_like_a_restored_file_is_an_existing_name(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot], name: str, to: str
) -> None:
    """Dangling (the restore must not create its target), to an outside file (neither written
    nor chmodded) or to an outside folder (nothing put in it)."""
    repo, snap = snap_repo
    outside = outside_tree(tmp_path)
    before = tree(outside)
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    (t / name).symlink_to(outside / to)
    with pytest.raises(TargetError, match="exists"):
        restore(repo, snap, str(t))
    assert tree(outside) == before
    assert work_folders(t) == []


def test_links_named_like_the_work_folder_or_partial_files_are_left_alone(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot]
) -> None:
    repo, snap = snap_repo
    outside = outside_tree(tmp_path)
    # a restore's work folder of someone else's making: a link to an outside folder that holds
    # names like partial files, and a real folder without a journal
    (outside / "dir" / "1.partial").write_bytes(b"victim")
    before = tree(outside)
    t = tmp_path / "t"
    t.mkdir()
    (t / f"{WORK_PREFIX}0123456789abcdef").symlink_to(outside / "dir")
    planted = t / f"{WORK_PREFIX}fedcba9876543210"
    planted.mkdir(mode=0o700)
    (planted / "1.partial").write_bytes(b"not ours")
    (t / "1.partial").symlink_to(outside / "file")
    in_target = tree(t)
    result = restore(repo, snap, str(t))
    assert tree(outside) == before
    after = tree(t)
    assert {k: after[k] for k in in_target} == in_target, "pre-existing entries are unchanged"
    assert any("0123456789abcdef" in n and "left" in n for n in result.notes)
    assert any("fedcba9876543210" in n and "no journal" in n for n in result.notes)
    assert (t / "disk.qcow2").is_file() and (t / "sub" / "nvram.bin").is_file()


def test_a_link_as_the_clone_folder_is_refused(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    repo, snap = snap_repo
    outside = outside_tree(tmp_path)
    before = tree(outside)
    t = tmp_path / "t"
    t.mkdir()
    (t / "web2").symlink_to(outside / "dir")
    with pytest.raises(TargetError, match="is a link"):
        restore_clone(repo, snap, str(t), "web2")
    assert tree(outside) == before


def test_the_target_the_user_names_may_be_a_link(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    """The path given is the user's choice (``/srv/restore -> /mnt/big``): it is followed;
    missing folders below it are created."""
    repo, snap = snap_repo
    real = tmp_path / "big"
    real.mkdir()
    (tmp_path / "restore").symlink_to(real)
    restore(repo, snap, str(tmp_path / "restore" / "a" / "b"))
    assert (real / "a" / "b" / "disk.qcow2").is_file()


@pytest.mark.parametrize("where", ["file", "file-in-path", "/dev/null", "/proc/vmvault-nonexistent/x"])
def test_an_unusable_target_is_a_clear_error(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot], where: str
) -> None:
    repo, snap = snap_repo
    (tmp_path / "file").write_text("x")
    target = {"file": str(tmp_path / "file"), "file-in-path": str(tmp_path / "file" / "t")}.get(where, where)
    with pytest.raises(TargetError):
        restore(repo, snap, target)
    assert (tmp_path / "file").read_text() == "x"


def test_a_file_where_a_subfolder_goes_is_refused(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    repo, snap = snap_repo
    t = tmp_path / "t"
    t.mkdir()
    (t / "sub").write_text("in the way")
    with pytest.raises(TargetError, match="not a folder"):
        restore(repo, snap, str(t))
    assert (t / "sub").read_text() == "in the way"


def test_existing_real_folders_and_other_files_are_fine(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    repo, snap = snap_repo
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    (t / "sub" / "other").write_text("kept")
    (t / "unrelated").write_text("kept")
    restore(repo, snap, str(t))
    assert (t / "sub" / "other").read_text() == "kept" and (t / "unrelated").read_text() == "kept"
    assert (t / "sub" / "nvram.bin").is_file()
    assert work_folders(t) == []


def test_two_stored_names_for_one_restored_name_are_refused(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot]
) -> None:
    repo, snap = snap_repo
    twin = dataclasses.replace(snap.files[0], name="disk.qcow2")
    bad = dataclasses.replace(snap, files=[*snap.files, twin])
    with pytest.raises(IntegrityError, match="both be restored as"):
        restore(repo, bad, str(tmp_path / "t"))
    folder = dataclasses.replace(snap.files[0], name="disk.qcow2/x")
    with pytest.raises(IntegrityError, match="both be restored as"):
        restore(repo, dataclasses.replace(snap, files=[*snap.files, folder]), str(tmp_path / "t2"))
    # a conversion that gives two disks one name is the user's to resolve, not damage
    converted = dataclasses.replace(snap.files[0], name="disk.raw")
    with pytest.raises(ConfigError, match="with --format raw"):
        restore(repo, dataclasses.replace(snap, files=[*snap.files, converted]), str(tmp_path / "t3"), format="raw")
    assert not any((tmp_path / t).exists() for t in ("t", "t2", "t3"))


def test_qemu_restore_files_never_follow_a_link(tmp_path: Path) -> None:
    outside = outside_tree(tmp_path)
    before = tree(outside)
    t = tmp_path / "t"
    t.mkdir()
    (t / "run-web.sh").symlink_to(outside / "file")
    disk = {"device": "vda", "node": "drive0", "format": "raw", "file": "/x", "model": "virtio"}
    vm = {"name": "web", "uuid": "u", "disks": [disk], "nics": []}
    with pytest.raises(TargetError, match="exists"):
        write_restore_files(vm, {"vda": str(t / "vda.raw")}, str(t))
    assert tree(outside) == before


# ---- renaming without replacing -----------------------------------------------------------


@pytest.mark.parametrize("way", ["renameat2", "link", "check-then-rename"])
def test_rename_noreplace_never_replaces_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    if way != "renameat2":
        monkeypatch.setattr(target_mod, "_renameat2", None)
    if way == "check-then-rename":

        def no_links(*_a: object, **_k: object) -> None:
            raise OSError(errno.EPERM, "no hard links here")

        monkeypatch.setattr(target_mod.os, "link", no_links)
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "src").write_text("new")
        (tmp_path / "file").write_text("old")
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        for existing in ("file", "dangling"):
            with pytest.raises(FileExistsError):
                rename_noreplace(d, "src", d, existing)
        assert (tmp_path / "file").read_text() == "old"
        assert not os.path.lexists(tmp_path / "nowhere")
        rename_noreplace(d, "src", d, "dst")
        assert (tmp_path / "dst").read_text() == "new" and not os.path.lexists(tmp_path / "src")
    finally:
        os.close(d)


# ---- modes and owners ---------------------------------------------------------------------


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.mark.parametrize("fmt", [None, "raw", "vhdx", "vhd", "qcow2"])
def test_modes_are_never_wider_than_stored(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot], fmt: str | None
) -> None:
    repo, snap = snap_repo
    result = restore(repo, snap, str(tmp_path / "t"), format=fmt)
    (disk,) = result.disks
    assert mode(Path(disk["path"])) == 0o600, "a 0600 disk stays 0600, whatever its format"
    assert mode(tmp_path / "t" / "sub" / "nvram.bin") == 0o640
    assert mode(tmp_path / "t" / "vm.conf") == 0o750, "setuid is dropped when the owner is not restored"


def test_a_disk_without_a_stored_mode_is_0600(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    repo, snap = snap_repo
    disk = dataclasses.replace(snap.disks[0], meta={})
    result = restore(repo, dataclasses.replace(snap, disks=[disk]), str(tmp_path / "t"))
    assert mode(Path(result.disks[0]["path"])) == 0o600


def test_numeric_owner_gives_back_owner_and_setuid(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("restoring owners needs root")
    vm = make_vm(tmp_path / "vm")
    os.chown(vm / "vm.conf", 1234, 5678)
    os.chmod(vm / "vm.conf", 0o4750)  # chown cleared it
    os.chown(vm / "disk.qcow2", 4321, 8765)
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    assert snap.file_owners["vm.conf"] == [1234, 5678]
    restore(repo, snap, str(tmp_path / "owned"), numeric_owner=True)
    st = os.lstat(tmp_path / "owned" / "vm.conf")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4750)
    st = os.lstat(tmp_path / "owned" / "disk.qcow2")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 8765, 0o600)
    restore(repo, snap, str(tmp_path / "mine"))
    st = os.lstat(tmp_path / "mine" / "vm.conf")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o750)
    # a snapshot written before owners were kept: setuid goes even with --numeric-owner
    old = dataclasses.replace(snap, file_owners={})
    restore(repo, old, str(tmp_path / "old"), numeric_owner=True)
    assert mode(tmp_path / "old" / "vm.conf") == 0o750


def test_numeric_owner_needs_root(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, snap = snap_repo
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="root"):
        restore(repo, snap, str(tmp_path / "t"), numeric_owner=True)
    assert not (tmp_path / "t").exists()


def test_snapshots_without_owners_keep_their_bytes(snap_repo: tuple[Repository, Snapshot]) -> None:
    _repo, snap = snap_repo
    assert "file_owners" in snap.to_dict()
    assert "file_owners" not in dataclasses.replace(snap, file_owners={}).to_dict()


# ---- names --------------------------------------------------------------------------------


def test_a_250_byte_name_restores(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    long_file = "f" * 245 + ".conf"
    long_disk = "d" * 246 + ".raw"
    (vm / long_file).write_text("long\n")
    (vm / long_disk).write_bytes(os.urandom(CS))
    assert len(long_file) == len(long_disk) == 250
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    restore(repo, snap, str(tmp_path / "t"))
    assert (tmp_path / "t" / long_file).read_text() == "long\n"
    assert (tmp_path / "t" / long_disk).read_bytes() == (vm / long_disk).read_bytes()


def test_a_clone_name_that_makes_names_too_long_is_refused_before_writing(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "vm-vm-vm.conf").write_text("x")
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    with pytest.raises(TargetError, match="at most 255"):
        restore_clone(repo, snap, str(tmp_path / "t"), "c" * 100)  # "vm" three times: 300 bytes
    assert os.listdir(tmp_path / "t" / ("c" * 100)) == []


@pytest.mark.parametrize("name", ["", " ", "a/b", "..", ".", "x\0y", "n" * 201])
def test_bad_clone_names_are_usage_errors(tmp_path: Path, snap_repo: tuple[Repository, Snapshot], name: str) -> None:
    repo, snap = snap_repo
    with pytest.raises(ConfigError):
        restore_clone(repo, snap, str(tmp_path / "t"), name)
    assert not (tmp_path / "t").exists()


# ---- include ------------------------------------------------------------------------------


def test_include_globs_and_folders(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    repo, snap = snap_repo
    r = restore(repo, snap, str(tmp_path / "a"), include=["*.conf"])
    assert r.disks == [] and [os.path.basename(f) for f in r.files] == ["vm.conf"]
    r = restore(repo, snap, str(tmp_path / "b"), include=["sub"])
    assert [os.path.relpath(f, tmp_path / "b") for f in r.files] == ["sub/nvram.bin"]
    r = restore(repo, snap, str(tmp_path / "c"), include=["disk.qcow2", "sub/*"])
    assert len(r.disks) == 1 and len(r.files) == 1


@pytest.mark.parametrize("pattern", ["typo", "", "disk.raw", "SUB"])
def test_an_include_that_matches_nothing_is_an_error(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot], pattern: str
) -> None:
    repo, snap = snap_repo
    with pytest.raises(ConfigError, match="matches"):
        restore(repo, snap, str(tmp_path / "t"), include=["vm.conf", pattern])
    assert not (tmp_path / "t").exists(), "nothing is restored when one pattern is wrong"


def test_a_layer_without_its_parent_says_so(tmp_path: Path) -> None:
    vm = make_vm(tmp_path / "vm", chain=True)
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    child = next(d.name for d in snap.disks if d.layer)
    with pytest.raises(ConfigError, match="include its parent layers too, or add --flatten"):
        restore(repo, snap, str(tmp_path / "t"), include=[child])
    with pytest.raises(ConfigError, match="parent layer"):
        restore(repo, snap, str(tmp_path / "t"), include=["base.vhdx"], flatten=True)
    r = restore(repo, snap, str(tmp_path / "flat"), include=[child], flatten=True)
    assert len(r.disks) == 1
    r = restore(repo, snap, str(tmp_path / "chain"), include=[child, "base.vhdx"])
    with open_image(r.disks[1]["path"]) as img:
        assert img.parent is not None and os.path.basename(img.parent.path) == "base.vhdx"


# ---- failures, kills and reruns -------------------------------------------------------------


def fail_once_on(repo: Repository, monkeypatch: pytest.MonkeyPatch, chunk_hex: str) -> None:
    """The chunk does not open until one restore has failed over it: read in a run of its pack
    (``open_located``) and then alone (``get_blob``), as a restore reads a damaged chunk."""
    real_get, real_open = repo.get_blob, repo.open_located
    state = {"failed": False}

    def get_blob(kind: Any, blob_id: bytes, **how: Any) -> bytes:
        if blob_id.hex() == chunk_hex and not state["failed"]:
            state["failed"] = True
            raise IntegrityError("simulated damage", object_id=chunk_hex)
        return real_get(kind, blob_id, **how)

    def open_located(kind: Any, blob_id: bytes, loc: Any, sealed: Any) -> bytes:
        if blob_id.hex() == chunk_hex and not state["failed"]:
            raise IntegrityError("simulated damage", object_id=chunk_hex)
        return real_open(kind, blob_id, loc, sealed)

    monkeypatch.setattr(repo, "get_blob", get_blob)
    monkeypatch.setattr(repo, "open_located", open_located)


def test_a_failed_restore_resumes_keeping_what_it_completed(
    tmp_path: Path, vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    nvram = next(f for f in snap.files if f.name == "sub/nvram.bin")
    fail_once_on(repo, monkeypatch, nvram.chunks[0])
    t = tmp_path / "t"
    with pytest.raises(IntegrityError, match="simulated damage"):
        restore(repo, snap, str(t))
    # the disk was complete and stays; the failed file left nothing; the journal stays for a rerun
    assert (t / "disk.qcow2").is_file() and not (t / "sub" / "nvram.bin").exists()
    (work,) = work_folders(t)
    assert os.listdir(t / work) == ["journal.json"]
    inode = os.lstat(t / "disk.qcow2").st_ino
    result = restore(repo, snap, str(t))
    assert result.kept == [str(t / "disk.qcow2"), str(t / "vm.conf")]
    assert os.lstat(t / "disk.qcow2").st_ino == inode
    assert any("resuming" in n for n in result.notes)
    assert (t / "sub" / "nvram.bin").read_bytes() == (vm / "sub" / "nvram.bin").read_bytes()
    assert work_folders(t) == []


def test_a_rerun_of_another_restore_does_not_adopt_files(
    tmp_path: Path, vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    nvram = next(f for f in snap.files if f.name == "sub/nvram.bin")
    fail_once_on(repo, monkeypatch, nvram.chunks[0])
    t = tmp_path / "t"
    with pytest.raises(IntegrityError):
        restore(repo, snap, str(t))
    # another restore (other options) into the same folder: the dead work folder goes, nothing is adopted
    result = restore(repo, snap, str(t), include=["sub"])
    assert result.kept == [] and any("removed the partial files" in n for n in result.notes)
    assert work_folders(t) == []
    # and the same restore now refuses the disk the first run left, as any existing name
    with pytest.raises(TargetError, match="exists"):
        restore(repo, snap, str(t))


def test_a_journal_naming_a_file_that_was_replaced_is_not_trusted(
    tmp_path: Path, vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    nvram = next(f for f in snap.files if f.name == "sub/nvram.bin")
    fail_once_on(repo, monkeypatch, nvram.chunks[0])
    t = tmp_path / "t"
    with pytest.raises(IntegrityError):
        restore(repo, snap, str(t))
    os.unlink(t / "disk.qcow2")
    (t / "disk.qcow2").write_bytes(b"someone else's")
    with pytest.raises(TargetError, match="exists"):
        restore(repo, snap, str(t))
    assert (t / "disk.qcow2").read_bytes() == b"someone else's"


def test_a_work_folder_with_a_journal_nested_too_deeply_is_not_trusted(
    tmp_path: Path, snap_repo: tuple[Repository, Snapshot]
) -> None:
    """Whoever can write the target may plant a work folder; its journal is JSON nested
    deeper than the parser goes (a RecursionError escaped as a traceback): it is no journal."""
    repo, snap = snap_repo
    t = tmp_path / "t"
    planted = t / f"{WORK_PREFIX}00000000000000bb"
    planted.mkdir(parents=True, mode=0o700)
    (planted / "journal.json").write_text("[" * 60000)
    result = restore(repo, snap, str(t))
    assert any("00000000000000bb" in n and "no journal" in n for n in result.notes), result.notes
    assert (t / "disk.qcow2").is_file()


def test_a_running_restores_work_folder_is_left_alone(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    repo, snap = snap_repo
    t = tmp_path / "t"
    live = t / f"{WORK_PREFIX}00000000000000aa"
    live.mkdir(parents=True, mode=0o700)
    (live / "1.partial").write_bytes(b"being written")
    (live / "journal.json").write_text(
        '{"format": "vmvault-restore-journal", "version": 1, "restore": {}, "placed": [], "pid": 1, "started": 0}'
    )
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = restore(repo, snap, str(t))
        assert any("running" in n for n in result.notes)
        assert (live / "1.partial").read_bytes() == b"being written"
    finally:
        os.close(fd)
    # once that restore is gone, the next run cleans its leftovers up
    shutil.rmtree(t / "sub")
    for name in ("disk.qcow2", "vm.conf"):
        os.unlink(t / name)
    result = restore(repo, snap, str(t))
    assert any("removed the partial files" in n for n in result.notes) and not live.exists()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mount_tmpfs(tmp_path / "tmpfs", "6m") as mnt:
        yield mnt


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhdx", "vhd"])
def test_a_full_target_is_the_target_being_full(tmp_path: Path, small_tmpfs: Path, fmt: str) -> None:
    vm = tmp_path / "big"
    vm.mkdir()
    with open(vm / "disk.raw", "wb") as f:
        f.write(os.urandom(12 * MIB))
    repo = new_repo()
    snap = backup(repo, FilesSource(str(vm))).snapshot
    with pytest.raises(TargetFullError, match="No space left"):
        restore(repo, snap, str(small_tmpfs / "t"), format=fmt)
    assert os.listdir(small_tmpfs / "t") == [], "nothing is left: no final name, no partial file"


# ---- property test: random trees of links, files and folders in the target -------------------


WORK = f"{WORK_PREFIX}0123456789abcdef"
#: names a restore needs (final names, folders, converted names) or uses (work folder, partial
#: names); ``<child>`` is the checkpoint's generated name
NAMES = [
    "disk.qcow2",
    "disk.raw",
    "disk.vhdx",
    "disk.vhd",
    "base.vhdx",
    "base.qcow2",
    "base.vhd",
    "<child>",
    "<child>.qcow2",
    "vm.conf",
    "sub",
    "sub/nvram.bin",
    "clone",
    "clone/disk.qcow2",
    "clone/sub",
    "clone/clone.conf",
    WORK,
    f"{WORK}/1.partial",
    f"{WORK}/journal.json",
    "1.partial",
    "journal.json",
    "other",
]


class Scene:
    """One repository with a VM that has files, a subfolder, a plain disk and a checkpoint chain."""

    def __init__(self, base: Path) -> None:
        self.vm = make_vm(base / "vm", chain=True)
        self.repo = new_repo()
        self.snap = backup(self.repo, FilesSource(str(self.vm))).snapshot
        self.child = next(d.name for d in self.snap.disks if d.layer)

    def name(self, token: str) -> str:
        stem = os.path.splitext(self.child)[0]
        return token.replace("<child>.qcow2", stem + ".qcow2").replace("<child>", self.child)


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    base = Path(tempfile.mkdtemp(prefix="vmvault-attack-restore-"))
    try:
        yield Scene(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


KINDS = ["file", "dir", "link-outside-file", "link-outside-dir", "dangling", "link-sibling", "link-up", "link-self"]
OPERATIONS = ["plain", "clone", "raw", "vhdx", "qcow2", "vhd", "flatten"]


def plant(target: Path, outside: Path, rel: str, kind: str) -> None:
    path = target / rel
    if not path.parent.is_dir() or path.parent.is_symlink() or os.path.lexists(path):
        return  # only into real folders made so far; first plant of a name wins
    if kind == "file":
        path.write_bytes(os.urandom(40))
        os.chmod(path, 0o640)
    elif kind == "dir":
        path.mkdir(mode=0o700 if WORK_PREFIX in rel else 0o755)
    elif kind == "link-outside-file":
        path.symlink_to(outside / "file")
    elif kind == "link-outside-dir":
        path.symlink_to(outside / "dir")
    elif kind == "dangling":
        path.symlink_to(outside / "new" / os.path.basename(rel))
    elif kind == "link-sibling":
        path.symlink_to(NAMES[len(rel) % len(NAMES)])
    elif kind == "link-up":
        path.symlink_to("../" * (rel.count("/") + 1))
    else:
        path.symlink_to(".")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    plants=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(KINDS)), max_size=6),
    operation=st.sampled_from(OPERATIONS),
)
@example(plants=[("sub", "link-outside-dir")], operation="plain")
@example(plants=[("sub", "link-up")], operation="vhd")
@example(plants=[("clone", "link-outside-dir")], operation="clone")
@example(plants=[("clone", "dir"), ("clone/sub", "link-outside-dir")], operation="clone")
@example(plants=[(WORK, "link-outside-dir")], operation="plain")
@example(plants=[(WORK, "dir"), (f"{WORK}/1.partial", "link-outside-file")], operation="vhdx")
@example(plants=[("1.partial", "link-outside-file"), ("journal.json", "dangling")], operation="raw")
@example(plants=[("disk.raw", "dangling")], operation="raw")
@example(plants=[("disk.vhdx", "link-outside-file"), ("base.qcow2", "dangling")], operation="plain")
@example(plants=[("<child>.qcow2", "dangling")], operation="qcow2")
def test_nothing_outside_the_target_and_nothing_already_in_it_changes(
    scene: Scene, plants: list[tuple[str, str]], operation: str
) -> None:
    base = Path(tempfile.mkdtemp(dir=scene.vm.parent, prefix="case-"))
    try:
        outside = outside_tree(base)
        target = base / "target"
        target.mkdir()
        for token, kind in plants:
            plant(target, outside, scene.name(token), kind)
        before_outside = tree(outside)
        before_base = sorted(os.listdir(base))
        before_target = tree(target)
        result: RestoreResult | None = None
        try:
            if operation == "clone":
                result = restore_clone(scene.repo, scene.snap, str(target), "clone")
            elif operation == "plain":
                result = restore(scene.repo, scene.snap, str(target))
            elif operation == "flatten":
                result = restore(scene.repo, scene.snap, str(target), flatten=True)
            else:
                result = restore(scene.repo, scene.snap, str(target), format=operation)
        except TargetError:
            pass  # refusing is always allowed; writing elsewhere never is
        except VmvaultError as exc:  # pragma: no cover - shown when the property fails
            raise AssertionError(f"a target problem must be a TargetError, not {exc!r}") from exc
        assert tree(outside) == before_outside, "something outside the target changed"
        assert sorted(os.listdir(base)) == before_base, "something appeared beside the target"
        after = tree(target)
        changed = {k: (v, after.get(k)) for k, v in before_target.items() if after.get(k) != v}
        # new entries may appear inside pre-existing real folders; nothing that was there changes
        assert changed == {}, f"pre-existing entries changed: {changed}"
        if result is not None:
            for path in result.files:
                rel = os.path.relpath(path, result.target)
                original = scene.vm / ("vm.conf" if rel == "clone.conf" else rel)
                assert Path(path).read_bytes() == original.read_bytes()
                assert not os.path.islink(path)
            for disk in result.disks:
                assert not os.path.islink(disk["path"])
                with open_image(disk["path"]) as restored, open_image(str(scene.vm / disk["name"])) as original:
                    assert restored.read(0, restored.size) == original.read(0, original.size)
            ours = [n for n in os.listdir(result.target) if n.startswith(WORK_PREFIX) and n not in before_target]
            assert ours == [], "a finished restore leaves no work folder"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_file_record_names_with_a_nul_byte_are_refused(tmp_path: Path, snap_repo: tuple[Repository, Snapshot]) -> None:
    repo, snap = snap_repo
    bad = FileRecord(name="a\0b", size=0, mode=0o644, mtime_ns=0, chunks=[])
    with pytest.raises(IntegrityError, match="NUL"):
        restore(repo, dataclasses.replace(snap, files=[bad]), str(tmp_path / "t"))

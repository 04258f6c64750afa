"""Hostile VM folders: links, special files, parents outside, files swapped during a backup.

Threat model: ``docs/design/repository-format.md`` section 10.4. The repository here is
unencrypted, so "the secret never reached the repository" is checked on every byte stored:
the secret is random (incompressible), and no stored object may contain a piece of it.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import as_nobody, require_tool, within
from vmvault.backends.memory import MemoryBackend
from vmvault.disk import ParentRule, create_image
from vmvault.disk.vhdx import create_vhdx
from vmvault.engine.backup import BackupResult, backup
from vmvault.errors import ConfigError, ParentError, SourceError
from vmvault.hypervisors import files as files_module
from vmvault.hypervisors import open_source
from vmvault.hypervisors.base import DEFAULT_OPTIONS, BackupOptions, BackupSession, PreviousBackup, Source
from vmvault.hypervisors.files import FilesSource
from vmvault.hypervisors.openers import checked_opener
from vmvault.repo.format import BlobType, ChunkResolver
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 64 * 1024
MIB = 1024 * 1024
#: what a host file holds; random, so compression cannot hide it in the stored objects
SECRET = b"HOST-SECRET:" + os.urandom(16 * 1024)


def qemu_img(*args: str) -> None:
    subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True)


@pytest.fixture
def repo() -> Repository:
    return Repository.init(MemoryBackend(), None, chunk_size=CS)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(vm folder with a qcow2 disk and a config, outside folder holding a host secret and a disk)."""
    vm = tmp_path / "vm"
    outside = tmp_path / "outside"
    (vm / "sub").mkdir(parents=True)
    outside.mkdir()
    with create_image(str(vm / "disk.qcow2"), "qcow2", MIB) as w:
        w.write(0, b"D" * 65536)
    (vm / "vm.conf").write_bytes(b"name=vm1\n")
    (vm / "sub" / "nvram.bin").write_bytes(b"nv\n")
    (outside / "secret").write_bytes(SECRET)
    with create_image(str(outside / "data.qcow2"), "qcow2", MIB) as w:
        w.write(0, SECRET)
    yield vm, outside


def leaked(repo: Repository) -> list[str]:
    """Stored objects holding any 64-byte piece of the secret."""
    pieces = [SECRET[i : i + 64] for i in range(0, len(SECRET) - 64, 4096)]
    backend = repo.backend
    out = []
    for obj in backend.list(""):
        data = backend.get(obj.name)
        if any(p in data for p in pieces):
            out.append(obj.name)
    return out


def stored_file(repo: Repository, snap: Snapshot, name: str) -> bytes:
    rec = next(f for f in snap.files if f.name == name)
    return b"".join(repo.get_blob(BlobType.DATA, bytes.fromhex(c)) for c in rec.chunks)


def stored_disk(repo: Repository, snap: Snapshot, name: str) -> bytes:
    rec = next(d for d in snap.disks if d.name == name)
    assert not rec.layer
    resolver = ChunkResolver(repo, snap, rec)
    out = bytearray(rec.size)
    for chunk in range(-(-rec.size // rec.chunk_size)):
        chunk_id = resolver.chunk_id(chunk)
        if chunk_id is not None:
            out[chunk * rec.chunk_size : (chunk + 1) * rec.chunk_size] = resolver.fetch(chunk_id)
    return bytes(out)


def names(result: BackupResult) -> tuple[list[str], list[str]]:
    snap = result.snapshot
    return sorted(d.name for d in snap.disks), sorted(f.name for f in snap.files)


# ============================================================================ what a folder holds


def test_links_and_special_files_are_named_never_read(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, outside = tree
    os.symlink(outside, vm / "Virtual Hard Disks")
    os.symlink(outside / "secret", vm / "notes.txt")
    os.symlink(outside / "data.qcow2", vm / "extra.qcow2")
    os.symlink(vm / "absent", vm / "dangling.vhdx")
    os.mkfifo(vm / "console.fifo")
    os.mknod(vm / "sub" / "null-device", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(vm / "qmp.sock"))
    try:
        result = within(30, lambda: backup(repo, FilesSource(str(vm))))
    finally:
        sock.close()
    assert names(result) == (["disk.qcow2"], ["sub/nvram.bin", "vm.conf"])
    warnings = "\n".join(result.warnings)
    for entry, why in [
        ("Virtual Hard Disks", "is a link"),
        ("notes.txt", "is a link"),
        ("extra.qcow2", "is a link"),
        ("dangling.vhdx", "is a link"),
        ("console.fifo", "is a FIFO"),
        ("sub/null-device", "is a character device"),
        ("qmp.sock", "is a socket"),
    ]:
        assert f"{entry}: not backed up: it {why}" in warnings, (entry, warnings)
    assert result.snapshot.warnings == result.warnings
    assert leaked(repo) == []


def test_symlinked_disk_folder_is_loud_and_can_be_followed_when_allowed(
    repo: Repository, tree: tuple[Path, Path]
) -> None:
    """Issue 9, item 11: ``ln -s /data/disks "vm2/Virtual Hard Disks"``."""
    vm, outside = tree
    vm2 = vm.parent / "vm2"
    vm2.mkdir()
    (vm2 / "vm2.conf").write_text("name=vm2\n")
    os.symlink(outside, vm2 / "Virtual Hard Disks")
    result = backup(repo, FilesSource(str(vm2)))
    assert names(result) == ([], ["vm2.conf"])
    assert any("Virtual Hard Disks: not backed up: it is a link" in w for w in result.warnings)
    assert any(w.startswith(f"no disk image found in {vm2}") for w in result.warnings)
    # following is asked for, but the link leads outside: still named, still not read
    result = backup(repo, FilesSource(str(vm2)), BackupOptions(follow_links=True))
    assert names(result) == ([], ["vm2.conf"])
    assert any("Virtual Hard Disks: not backed up: it is a link to" in w and "outside" in w for w in result.warnings)
    assert leaked(repo) == []
    # the administrator names the folder: the disks are backed up under the link's name
    result = backup(repo, FilesSource(str(vm2)), BackupOptions(follow_links=True, allow_parent_dirs=(str(outside),)))
    assert names(result) == (["Virtual Hard Disks/data.qcow2"], ["Virtual Hard Disks/secret", "vm2.conf"])
    assert stored_disk(repo, result.snapshot, "Virtual Hard Disks/data.qcow2")[: len(SECRET)] == SECRET


def test_followed_links_inside_the_folder_and_loops(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, _outside = tree
    os.symlink("vm.conf", vm / "alias.conf")
    os.symlink("..", vm / "sub" / "up")  # a loop back to the VM folder
    result = backup(repo, FilesSource(str(vm)), BackupOptions(follow_links=True))
    assert names(result) == (["disk.qcow2"], ["alias.conf", "sub/nvram.bin", "vm.conf"])
    assert stored_file(repo, result.snapshot, "alias.conf") == b"name=vm1\n"
    assert any("sub/up: not backed up: it is a link back to a folder that contains it" in w for w in result.warnings)


def test_a_deeply_nested_folder_is_walked_without_recursion(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, _outside = tree
    deep = vm
    for _ in range(1500):  # deeper than Python's recursion limit
        deep = deep / "d"
        deep.mkdir()
    (deep / "leaf.txt").write_text("deep\n")
    result = backup(repo, FilesSource(str(vm)))
    leaf = "/".join(["d"] * 1500) + "/leaf.txt"
    try:
        assert leaf in names(result)[1]
        assert stored_file(repo, result.snapshot, leaf) == b"deep\n"
    finally:
        # pytest removes its temporary folders recursively and would exceed the recursion limit
        os.unlink(deep / "leaf.txt")
        while deep != vm:
            os.rmdir(deep)
            deep = deep.parent


def test_a_folder_of_too_many_entries_is_refused_before_they_are_held(
    repo: Repository, tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever writes the VM folder could fill it with millions of empty files, each held (about
    3 KiB) until the snapshot is saved: 100,000 took 6.6 s and 305 MiB, so a few million took
    the host's memory. A scan examines at most ``MAX_ENTRIES`` entries, in all its folders,
    and a folder's listing stops one past what is left."""
    vm, _outside = tree
    monkeypatch.setattr(files_module, "MAX_ENTRIES", 6)  # disk.qcow2, sub, sub/nvram.bin, vm.conf
    for i in range(2):
        (vm / "sub" / f"f{i}").write_bytes(b"")
    assert names(backup(repo, FilesSource(str(vm))))[1] == ["sub/f0", "sub/f1", "sub/nvram.bin", "vm.conf"]
    (vm / "sub" / "f2").write_bytes(b"")
    listed: list[int | None] = []
    list_folder = files_module.platform.list_folder

    def counted(path: str, seen: os.stat_result | None = None, *, limit: int | None = None) -> object:
        listed.append(limit)
        return list_folder(path, seen, limit=limit)

    monkeypatch.setattr(files_module.platform, "list_folder", counted)
    with pytest.raises(SourceError, match=r"vm: more than 6 files and folders; a VM folder holds a few dozen: is "):
        backup(repo, FilesSource(str(vm)))
    assert listed == [6, 3]  # the top folder's three entries, then at most three more
    assert len(repo.list_snapshots()) == 1


def test_a_folder_with_nothing_to_store_is_an_error(repo: Repository, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"nothing to back up: no disk image and no file$"):
        backup(repo, FilesSource(str(empty)))
    os.symlink("/etc", empty / "etc")
    with pytest.raises(SourceError, match=r"nothing to back up: no disk image and no file; etc: not backed up: it is"):
        backup(repo, FilesSource(str(empty)))
    assert repo.list_snapshots() == []


def test_a_source_that_is_a_special_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "disk.img")
    with pytest.raises(SourceError, match="is a FIFO; vmvault backs up VM folders and disk images"):
        within(10, lambda: FilesSource(str(tmp_path / "disk.img")))
    with pytest.raises(ConfigError, match="allowed parent folder"):
        FilesSource(str(tmp_path)).open_session(None, BackupOptions(allow_parent_dirs=(str(tmp_path / "missing"),)))
    with pytest.raises(ConfigError, match="applies to VM folders and image files, and libvirt domains, not to running"):
        open_source("qemu+unix:///run/x.qmp", BackupOptions(allow_parent_dirs=(str(tmp_path),)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user (root reads everything)")
def test_unreadable_entries_are_named_and_an_unreadable_disk_fails() -> None:
    root = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        root.chmod(0o755)
        vm = root / "vm"
        (vm / "locked").mkdir(parents=True)
        with create_image(str(vm / "disk.qcow2"), "qcow2", MIB) as w:
            w.write(0, b"d" * 4096)
        (vm / "vm.conf").write_text("x\n")
        (vm / "private.log").write_text("p\n")
        (vm / "locked" / "inner").write_text("i\n")
        for p in [vm, *vm.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        (vm / "private.log").chmod(0o000)
        (vm / "locked").chmod(0o000)

        def scan() -> str:
            with FilesSource(str(vm)).open_session(None) as session:
                return "\n".join([*(f.name for f in session.files), *session.warnings])

        text = as_nobody(scan)
        assert "vm.conf" in text.splitlines()
        assert "private.log: not backed up:" in text and "Permission denied" in text
        assert "locked: not backed up: the folder cannot be listed (Permission denied)" in text
        (vm / "disk.qcow2").chmod(0o000)
        text = as_nobody(scan)
        assert text.startswith("SourceError: disk.qcow2: a disk image that cannot be read"), text
    finally:
        shutil.rmtree(root)


# ============================================================================ disk parents


def test_backing_file_on_a_host_file_is_refused_naming_disk_and_parent(
    repo: Repository, tree: tuple[Path, Path]
) -> None:
    """Issue 9, item 7: ``qemu-img create -f qcow2 -u -b /etc/shadow -F raw vm/disk.qcow2 1M``."""
    vm, outside = tree
    os.unlink(vm / "disk.qcow2")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", str(outside / "secret"), "-F", "raw", str(vm / "disk.qcow2"), "1M"
    )
    with pytest.raises(ParentError) as err:
        backup(repo, FilesSource(str(vm)))
    text = str(err.value)
    assert str(vm / "disk.qcow2") in text and str(outside / "secret") in text and "--allow-parent-dir" in text
    assert repo.list_snapshots() == [] and leaked(repo) == []
    # named explicitly, the folder is read; the disk is stored merged, and the warning says why
    result = backup(repo, FilesSource(str(vm)), BackupOptions(allow_parent_dirs=(str(outside),)))
    assert any("disk.qcow2: its parent" in w and "outside the VM folder" in w for w in result.warnings)
    assert stored_disk(repo, result.snapshot, "disk.qcow2")[: len(SECRET)] == SECRET


def test_vhdx_parent_outside_the_folder_is_refused(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, outside = tree
    base = outside / "base.vhdx"
    with create_vhdx(str(base), 8 * MIB, block_size=MIB) as w:
        w.write(0, SECRET)
    create_vhdx(str(vm / "disk.avhdx"), 0, parent=str(base), block_size=MIB).close()
    with pytest.raises(ParentError, match="outside the folders parents may be in"):
        backup(repo, FilesSource(str(vm)))
    assert leaked(repo) == []


def test_parent_inside_the_folder_makes_a_layer(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, _outside = tree
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", "../disk.qcow2", "-F", "qcow2", str(vm / "sub" / "top.qcow2"), "1M"
    )
    result = backup(repo, FilesSource(str(vm)))
    top = next(d for d in result.snapshot.disks if d.name == "sub/top.qcow2")
    assert top.layer and top.parent == "disk.qcow2"


def test_fifo_as_backing_file_never_hangs_a_backup(repo: Repository, tree: tuple[Path, Path]) -> None:
    """Issue 9, item 7: ``mkfifo vm/base.img`` as a backing file hung ``backup`` (and kept its lock fresh)."""
    vm, _outside = tree
    os.mkfifo(vm / "base.img")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.img", "-F", "raw", str(vm / "over.qcow2"), "1M")
    with pytest.raises(ParentError, match="a FIFO, not a file"):
        within(30, lambda: backup(repo, FilesSource(str(vm))))


def test_single_image_parents_stay_in_its_folder(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, outside = tree
    qemu_img("create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", str(vm / "top.qcow2"))
    result = backup(repo, FilesSource(str(vm / "top.qcow2")))
    assert names(result) == (["top.qcow2"], [])
    assert stored_disk(repo, result.snapshot, "top.qcow2")[:65536] == b"D" * 65536
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", "../outside/data.qcow2", "-F", "qcow2", str(vm / "evil.qcow2"), "1M"
    )
    with pytest.raises(ParentError, match="outside"):
        backup(repo, FilesSource(str(vm / "evil.qcow2")))
    result = backup(repo, FilesSource(str(vm / "evil.qcow2")), BackupOptions(allow_parent_dirs=(str(outside),)))
    assert stored_disk(repo, result.snapshot, "evil.qcow2")[: len(SECRET)] == SECRET


def test_a_disk_named_raw_is_read_raw_whatever_its_first_bytes(repo: Repository, tree: tuple[Path, Path]) -> None:
    """A guest writes its raw disk; a qcow2 header there must not make vmvault follow a backing name."""
    vm, outside = tree
    fake = vm / "fake.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(outside / "secret"), "-F", "raw", str(fake), "1M")
    content = fake.read_bytes().ljust(MIB, b"\x01")
    fake.unlink()
    (vm / "guest.raw").write_bytes(content)
    result = backup(repo, FilesSource(str(vm)))
    rec = next(d for d in result.snapshot.disks if d.name == "guest.raw")
    assert rec.format == "raw" and stored_disk(repo, result.snapshot, "guest.raw") == content
    # the same disk backed up alone, its header naming a disk beside it (allowed for a parent)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "disk.qcow2", "-F", "qcow2", str(fake), "1M")
    content = fake.read_bytes().ljust(2 * MIB, b"\x02")
    fake.unlink()
    (vm / "guest.raw").write_bytes(content)
    result = backup(repo, FilesSource(str(vm / "guest.raw")))
    (rec,) = result.snapshot.disks
    assert (rec.format, rec.size) == ("raw", 2 * MIB)  # before: a 1 MiB qcow2 reading disk.qcow2
    assert stored_disk(repo, result.snapshot, "guest.raw") == content
    assert leaked(repo) == []


@pytest.mark.parametrize("single", [False, True])
def test_an_img_disk_recorded_raw_stays_raw_when_the_guest_writes_a_header(
    repo: Repository, tree: tuple[Path, Path], single: bool
) -> None:
    """``.img`` names raw disks and qcow2 ones alike, so its first backup goes by its content;
    later ones read it in the format the previous snapshot recorded when that was raw (the
    guest writes a raw disk's first bytes), with a warning, in a ``--full`` backup too."""
    vm, _ = tree
    disk = vm / "guest.img"
    original = bytes(4096) + os.urandom(MIB - 4096)
    disk.write_bytes(original)
    source = lambda: FilesSource(str(disk if single else vm))  # noqa: E731
    first = backup(repo, source())
    assert next(d for d in first.snapshot.disks if d.name == "guest.img").format == "raw"
    fake = vm / "fake.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "disk.qcow2", "-F", "qcow2", str(fake), "1M")
    header = fake.read_bytes()
    fake.unlink()
    with open(disk, "r+b") as f:  # what the guest wrote at the start of its disk
        f.write(header)
    changed = header + original[len(header) :]
    for options in (DEFAULT_OPTIONS, BackupOptions(full=True)):
        result = backup(repo, source(), options)
        rec = next(d for d in result.snapshot.disks if d.name == "guest.img")
        assert rec.format == "raw" and stored_disk(repo, result.snapshot, "guest.img") == changed
        assert any("guest.img: read as raw, as snapshot" in w for w in result.warnings), result.warnings
    # a file that was qcow2 and now reads raw (its header gone) is read as it is, said aloud
    with create_image(str(vm / "other.img"), "qcow2", MIB) as w:
        w.write(0, b"Q" * 4096)
    first_look = backup(repo, FilesSource(str(vm)))  # its first backup: the content decides, said once
    assert [w for w in first_look.warnings if w.startswith("other.img: read as a qcow2 image")]
    assert not [w for w in backup(repo, FilesSource(str(vm))).warnings if w.startswith("other.img")]
    with open(vm / "other.img", "r+b") as f:
        f.write(bytes(512))
    result = backup(repo, FilesSource(str(vm)))
    assert next(d for d in result.snapshot.disks if d.name == "other.img").format == "raw"
    assert any("other.img: snapshot" in w and "recorded it as qcow2" in w for w in result.warnings)


@pytest.mark.parametrize("first", [True, False])
def test_a_header_the_guest_writes_after_the_probe_does_not_change_the_format(
    repo: Repository, tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    """The folder scan probes each file's format, then the file is opened again to be read: a
    guest writing a qcow2 header into its raw ``.img`` in between is read raw, as the probe (at
    its first backup) or the previous snapshot decided, not as qcow2 with a backing file."""
    vm, _ = tree
    disk = vm / "guest.img"
    original = bytes(4096) + os.urandom(MIB - 4096)
    disk.write_bytes(original)
    if not first:
        before = backup(repo, FilesSource(str(vm))).snapshot
        assert next(d for d in before.disks if d.name == "guest.img").format == "raw"
    fake = vm / "fake.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "disk.qcow2", "-F", "qcow2", str(fake), "1M")
    header = fake.read_bytes()
    fake.unlink()
    real = files_module.detect_format_fd

    def probe_then_guest_writes(fd: int, path: str) -> str:
        found = real(fd, path)
        if path.endswith("guest.img"):
            with open(disk, "r+b") as f:
                f.write(header)
        return found

    monkeypatch.setattr(files_module, "detect_format_fd", probe_then_guest_writes)
    result = backup(repo, FilesSource(str(vm)))
    rec = next(d for d in result.snapshot.disks if d.name == "guest.img")
    assert rec.format == "raw"  # before: a qcow2 of 1 MiB reading disk.qcow2 beside it
    assert stored_disk(repo, result.snapshot, "guest.img") == header + original[len(header) :]


# ============================================================================ swapped during the backup


class Hooked(Source):
    """A FilesSource with a hook between the folder scan and the reading of the data."""

    def __init__(self, inner: FilesSource, hook: Callable[[], None]) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.location = inner.location
        self.hook = hook

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        session = self.inner.open_session(previous, options)
        self.hook()
        return session


def swap_for_link(path: Path, target: Path) -> None:
    os.unlink(path)
    os.symlink(target, path)


def test_a_file_swapped_for_a_link_to_a_host_file_is_not_stored(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, outside = tree
    result = backup(repo, Hooked(FilesSource(str(vm)), lambda: swap_for_link(vm / "vm.conf", outside / "secret")))
    assert names(result) == (["disk.qcow2"], ["sub/nvram.bin"])
    assert any(w.startswith("vm.conf: not backed up: it changed after the folder was scanned") for w in result.warnings)
    assert result.snapshot.warnings == result.warnings
    assert leaked(repo) == []


def test_a_file_swapped_for_a_fifo_never_hangs(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, _outside = tree

    def to_fifo() -> None:
        os.unlink(vm / "vm.conf")
        os.mkfifo(vm / "vm.conf")

    result = within(30, lambda: backup(repo, Hooked(FilesSource(str(vm)), to_fifo)))
    assert names(result) == (["disk.qcow2"], ["sub/nvram.bin"])
    assert any("vm.conf: not backed up" in w for w in result.warnings)


def test_a_file_replaced_by_another_file_is_not_stored(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, outside = tree

    def replace() -> None:
        shutil.copy(outside / "secret", vm / "new")
        os.replace(vm / "new", vm / "vm.conf")

    result = backup(repo, Hooked(FilesSource(str(vm)), replace))
    assert "vm.conf" not in names(result)[1] and leaked(repo) == []


def test_a_file_changed_in_place_is_stored_as_read_with_a_warning(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, _outside = tree

    def append() -> None:
        with open(vm / "vm.conf", "ab") as f:
            f.write(b"memory=4096\n")

    result = backup(repo, Hooked(FilesSource(str(vm)), append))
    assert stored_file(repo, result.snapshot, "vm.conf") == b"name=vm1\nmemory=4096\n"
    assert any(w.startswith("vm.conf: changed between the folder scan and its read") for w in result.warnings)


def test_a_disk_swapped_after_the_scan_is_read_as_scanned(repo: Repository, tree: tuple[Path, Path]) -> None:
    vm, outside = tree
    result = backup(
        repo, Hooked(FilesSource(str(vm)), lambda: swap_for_link(vm / "disk.qcow2", outside / "data.qcow2"))
    )
    assert stored_disk(repo, result.snapshot, "disk.qcow2")[:65536] == b"D" * 65536
    assert leaked(repo) == []


def test_a_single_image_swapped_after_its_probe_is_read_as_probed(
    repo: Repository, tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image named alone is opened by its name once: whoever writes its folder swapping the
    name for a link to a host file between the format probe and the read changes nothing (it
    was opened a second time, following the link, and the host file was stored)."""
    vm, outside = tree
    image = vm / "alone.raw"
    original = os.urandom(MIB)
    image.write_bytes(original)
    os.chmod(image, 0o640)
    real = files_module.detect_format_fd

    def probe_then_swap(fd: int, path: str) -> str:
        found = real(fd, path)
        swap_for_link(image, outside / "secret")
        return found

    monkeypatch.setattr(files_module, "detect_format_fd", probe_then_swap)
    result = backup(repo, FilesSource(str(image)))
    assert stored_disk(repo, result.snapshot, "alone.raw") == original
    assert leaked(repo) == []
    meta = result.snapshot.disks[0].meta
    assert (meta["file_size"], meta["mode"]) == (MIB, 0o640)  # the image's, not the host file's


def test_a_folder_swapped_for_a_link_during_the_scan_is_not_entered(
    repo: Repository, tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever writes the VM folder can race the scan: ``sub`` is listed as a folder, then
    swapped for a link to a host folder before the scan goes into it. The scan went where the
    link led (by name) and stored the host's files as the VM's: ``sub/secret`` and the disk
    ``sub/data.qcow2``. Now a folder is listed through a descriptor of the very folder listed
    above, and one that became a link is named, never entered."""
    vm, outside = tree
    examine = files_module.FilesSession._examine

    def examine_then_swap(self: files_module.FilesSession, path: str, rel: str, *rest: os.stat_result) -> object:
        found = examine(self, path, rel, *rest)
        if rel == "sub":
            os.rename(vm / "sub", vm / "sub.away")
            os.symlink(outside, vm / "sub")
        return found

    monkeypatch.setattr(files_module.FilesSession, "_examine", examine_then_swap)
    result = backup(repo, FilesSource(str(vm)))
    assert names(result) == (["disk.qcow2"], ["vm.conf"])
    assert "sub: not backed up: the folder cannot be listed (is a link (not followed))" in result.warnings
    assert leaked(repo) == []


def test_a_host_folder_swapped_for_a_link_after_discovery_is_not_read(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM of a Hyper-V host folder is stored by the files the host's model names, examined by
    name: a folder on their way swapped for a link to a host folder (one holding files of those
    names) made the backup store the host's files. Now each file must lie, by the real path of
    the open file, in the host folder or an allowed folder."""
    from vmvault.testing.hyperv_host import HostFolderBuilder

    b = HostFolderBuilder(str(tmp_path / "host"), config_format="xml")
    b.checkpoint(b.create_vm("web"), "before update")
    snapshots, outside = Path(b.root) / "Snapshots", tmp_path / "outside"
    outside.mkdir()
    taken = sorted(f.name for f in snapshots.iterdir())
    assert taken
    for name in taken:
        (outside / name).write_bytes(SECRET)
    gather = files_module.HostVmSession._gather

    def swap_then_gather(self: files_module.HostVmSession, root: str, disks: list[object]) -> None:
        os.rename(snapshots, snapshots.with_name("Snapshots.away"))
        os.symlink(outside, snapshots)
        gather(self, root, disks)  # type: ignore[arg-type]

    monkeypatch.setattr(files_module.HostVmSession, "_gather", swap_then_gather)
    result = backup(repo, FilesSource(f"{b.root}#web"))
    assert not [f for f in names(result)[1] if f.startswith("Snapshots/")]
    warned = [w for w in result.warnings if w.startswith("Snapshots/")]
    assert len(warned) == len(taken) and all(f"lies at {outside}/" in w for w in warned), result.warnings
    assert leaked(repo) == []


def test_checked_opener_refuses_a_file_reached_through_a_swapped_folder(tmp_path: Path) -> None:
    home, outside = tmp_path / "home", tmp_path / "outside"
    (home / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "f").write_bytes(SECRET)
    os.rename(home / "sub", home / "sub.away")
    os.symlink(outside, home / "sub")
    path = home / "sub" / "f"
    warnings: list[str] = []
    opener = checked_opener(str(path), "sub/f", os.lstat(path), warnings, inside=ParentRule.inside([str(home)]))
    assert opener() is None
    assert warnings == [
        f"sub/f: not backed up: it changed after the folder was scanned ({path}: lies at {outside}/f, outside "
        f"inside {home} (a folder on its way was replaced by a link); not read)"
    ]
    assert checked_opener(str(path), "sub/f", os.lstat(path), [])() is not None  # the same without a place


def test_checked_opener_reports_a_change_during_the_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    warnings: list[str] = []
    opener = checked_opener(str(path), "f", os.lstat(path), warnings)
    fh = opener()
    assert fh is not None
    with fh:
        assert fh.read(10) == b"a" * 10
        with open(path, "ab") as f:
            f.write(b"b")
    assert warnings == ["f: changed while it was read; the stored copy may mix old and new content"]


@pytest.mark.parametrize("layout", ["VM folder", "host folder"])
def test_a_hyperv_disk_swapped_for_a_link_after_the_walk_is_not_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """The Hyper-V model (``vmvault audit``, the dashboard's Audit page, a host folder's VMs)
    opens each disk file the walk found to read its header. It opened it by name: a disk
    swapped for a link to a host disk or device after the walk had that read (as root) and
    shown as the VM's. Now it must be the file the walk saw."""
    from vmvault.hypervisors import hyperv_model
    from vmvault.testing.hyperv_host import HostFolderBuilder

    host_disk = tmp_path / "host.vhdx"
    create_vhdx(str(host_disk), 7 * MIB).close()
    if layout == "VM folder":
        root = tmp_path / "web"
        (root / "Virtual Hard Disks").mkdir(parents=True)
        create_vhdx(str(root / "Virtual Hard Disks" / "web.vhdx"), 2 * MIB).close()
    else:
        b = HostFolderBuilder(str(tmp_path / "host"), config_format="xml")
        b.create_vm("web", (2 * MIB,))
        root = Path(b.root)
    walk = hyperv_model.regular_files

    def walk_then_swap(*args: object, **kwargs: object) -> Iterator[tuple[str, os.stat_result]]:
        found = list(walk(*args, **kwargs))  # type: ignore[arg-type]
        for path, _st in found:
            if path.endswith(".vhdx"):
                os.rename(path, path + ".away")
                os.symlink(host_disk, path)
        return iter(found)

    monkeypatch.setattr(hyperv_model, "regular_files", walk_then_swap)
    model: hyperv_model.HyperVVm | hyperv_model.HostFolder
    model = hyperv_model.discover(str(root)) if layout == "VM folder" else hyperv_model.discover_host(str(root))
    assert model.disks, "the walk found no disk"
    for disk in model.disks.values():
        assert disk.virtual_size != 7 * MIB, f"{disk.rel}: the host's disk was read as the VM's"
        assert disk.error is not None and "is a link, not a disk image; not opened" in disk.error, disk


def test_a_fifo_named_like_a_hyperv_configuration_never_blocks(tmp_path: Path) -> None:
    """``vmvault audit`` and the Hyper-V connectors read configurations from VM folders too."""
    from vmvault.hypervisors.hyperv_model import discover

    vm = tmp_path / "web"
    (vm / "Virtual Machines").mkdir(parents=True)
    os.mkfifo(vm / "Virtual Machines" / "0A1B2C3D-0000-0000-0000-000000000000.vmcx")
    model = within(10, lambda: discover(str(vm)))
    assert model.config_error is not None and "is a FIFO, not a VM configuration" in model.config_error

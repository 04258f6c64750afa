"""Hostile disk images: parents that are host files, devices, FIFOs, sockets or impostors.

Threat model: ``docs/design/repository-format.md`` section 10.4 (whoever writes a VM folder or
a disk image). Each test builds what an attacker can write (a backing file name, a parent
locator, a link, a special file) and checks that vmvault refuses it with a clear error,
reads nothing it should not, never blocks, and changes no file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool, within
from vmvault.disk import ParentRule, create_image, detect_format, disk_format, open_image
from vmvault.disk import _vhdx_layout as L
from vmvault.disk._open import open_checked
from vmvault.disk.chain import MERGE_JOURNAL_SUFFIX, checkpoint, convert, merge, open_chain
from vmvault.disk.vhd import create_vhd
from vmvault.disk.vhdx import create_vhdx
from vmvault.errors import FormatError, ParentError, SourceError, VmvaultError

MIB = 1024 * 1024
SECRET = b"root:$6$hash-that-must-never-leave-this-file:19000:0:99999:7:::\n"


def qemu_img(*args: str) -> None:
    subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(vm folder, outside folder holding a host secret file)."""
    vm = tmp_path / "vm"
    outside = tmp_path / "outside"
    vm.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET * 64)
    yield vm, outside


def beside(path: Path, *also: Path) -> ParentRule:
    return ParentRule.beside(str(path), [str(a) for a in also])


def overlay(vm: Path, backing: str, fmt: str = "raw", name: str = "disk.qcow2") -> Path:
    path = vm / name
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, str(path), "1M")
    return path


def snapshot_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


# ============================================================================ qcow2 backing files


def test_qcow2_backing_host_file_absolute_is_refused(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    disk = overlay(vm, str(outside / "secret"))
    with pytest.raises(ParentError, match=r"outside the folders parents may be in.*--allow-parent-dir") as err:
        open_image(str(disk), rule=beside(disk))
    assert str(disk) in str(err.value) and str(outside / "secret") in str(err.value)
    # an explicitly allowed folder is read (and the host secret then is the parent's content)
    with open_image(str(disk), rule=beside(disk, outside)) as img:
        assert img.parent is not None and img.read(0, len(SECRET)) == SECRET


def test_qcow2_backing_relative_dotdot_is_refused(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    disk = overlay(vm, "../outside/secret")
    with pytest.raises(ParentError, match="outside the folders"):
        open_image(str(disk), rule=beside(disk))


def test_qcow2_backing_inside_the_folder_is_read(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    (vm / "sub").mkdir()
    (vm / "sub" / "base.raw").write_bytes(b"\x42" * MIB)
    disk = overlay(vm, "sub/base.raw")
    with open_image(str(disk), rule=beside(disk)) as img:
        assert img.read(MIB - 1, 1) == b"\x42"


def test_qcow2_backing_name_with_a_nul_byte_is_a_parent_error(layout: tuple[Path, Path]) -> None:
    """A NUL inside a recorded name (found by the fuzzer) is damage, not a ValueError from the OS."""
    vm, _outside = layout
    (vm / "ab.raw").write_bytes(bytes(MIB))
    disk = overlay(vm, "ab.raw")
    raw = bytearray(disk.read_bytes())
    at = raw.index(b"ab.raw")
    raw[at + 1] = 0
    disk.write_bytes(bytes(raw))
    with pytest.raises(ParentError, match="NUL byte"):
        open_image(str(disk), rule=beside(disk))


def test_qcow2_backing_link_leading_outside_is_refused(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    os.symlink(outside / "secret", vm / "base.raw")
    disk = overlay(vm, "base.raw")
    with pytest.raises(ParentError, match=f"the file {outside / 'secret'}.*outside"):
        open_image(str(disk), rule=beside(disk))
    # a link that stays inside is fine: what counts is the file actually opened
    (vm / "real.raw").write_bytes(b"\x07" * MIB)
    os.unlink(vm / "base.raw")
    os.symlink("real.raw", vm / "base.raw")
    with open_image(str(disk), rule=beside(disk)) as img:
        assert img.read(0, 1) == b"\x07"


def test_qcow2_backing_folder_link_in_the_path_is_refused(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    os.symlink(outside, vm / "images")
    disk = overlay(vm, "images/secret")
    with pytest.raises(ParentError, match="outside the folders"):
        open_image(str(disk), rule=beside(disk))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_qcow2_backing_character_device_is_refused_whatever_the_rule(layout: tuple[Path, Path], device: str) -> None:
    vm, _outside = layout
    disk = overlay(vm, device)
    for rule in (beside(disk), ParentRule()):
        with pytest.raises(ParentError, match="character device, not a file"):
            within(10, lambda r=rule: open_image(str(disk), rule=r))


def test_qcow2_backing_block_device_is_refused_without_opening_it(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    blocks = [f"/dev/{n}" for n in sorted(os.listdir("/dev")) if stat.S_ISBLK(os.stat(f"/dev/{n}").st_mode)]
    if not blocks:
        pytest.skip("this machine has no block device node in /dev")
    disk = overlay(vm, blocks[0])
    before = os.stat(blocks[0]).st_atime_ns
    with pytest.raises(ParentError, match="block device, not a file"):
        open_image(str(disk))
    assert os.stat(blocks[0]).st_atime_ns == before


def test_qcow2_backing_proc_file_is_refused_whatever_the_rule(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    disk = overlay(vm, "/proc/self/environ")
    with pytest.raises(ParentError, match="kernel pseudo file system"):
        open_image(str(disk))  # the default rule allows any folder, never /proc
    disk2 = overlay(vm, "/sys/kernel/mm/transparent_hugepage/enabled", name="d2.qcow2")
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        with pytest.raises(ParentError, match="kernel pseudo file system"):
            open_image(str(disk2))


def test_qcow2_backing_fifo_never_blocks(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    os.mkfifo(vm / "base.img")
    disk = overlay(vm, "base.img")
    for rule in (beside(disk), ParentRule()):
        with pytest.raises(ParentError, match="a FIFO, not a file"):
            within(10, lambda r=rule: open_image(str(disk), rule=r))
    with pytest.raises(ParentError, match="a FIFO"):
        within(10, lambda: open_chain(str(disk)))
    with pytest.raises(ParentError, match="a FIFO"):
        within(10, lambda: convert(str(disk), str(vm / "out.raw"), "raw"))
    assert not (vm / "out.raw").exists() and not (vm / "out.raw.partial").exists()


def test_qcow2_backing_socket_is_refused(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(vm / "base.img"))
        disk = overlay(vm, "base.img")
        with pytest.raises(ParentError, match="a socket, not a file"):
            within(10, lambda: open_image(str(disk), rule=beside(disk)))
    finally:
        sock.close()


def test_qcow2_recorded_raw_backing_is_never_probed(layout: tuple[Path, Path]) -> None:
    """A guest writes its raw disk: a qcow2 header there must not make vmvault follow its backing name."""
    vm, outside = layout
    guest_disk = vm / "base.raw"
    fake = vm / "fake.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(outside / "secret"), "-F", "raw", str(fake), "1M")
    guest_disk.write_bytes(fake.read_bytes().ljust(MIB, b"\0"))
    fake.unlink()
    disk = overlay(vm, "base.raw", fmt="raw")
    with open_image(str(disk), rule=beside(disk)) as img:
        assert img.parent is not None and img.parent.format == "raw" and img.parent.parent is None
        assert img.read(0, 4) == b"QFI\xfb"  # the guest's bytes, as the guest wrote them


def test_an_image_named_raw_is_raw_whatever_its_first_bytes(layout: tuple[Path, Path]) -> None:
    """``vmvault disk info/convert/checkpoint guest.raw`` after the guest wrote a qcow2 header
    naming another disk of its folder as backing file: read, converted and checkpointed as
    the raw disk it is (it was a 1 MiB qcow2 showing the other disk)."""
    vm, _outside = layout
    other = vm / "other.raw"
    other.write_bytes(b"O" * MIB)
    fake = vm / "fake.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "other.raw", "-F", "raw", str(fake), "1M")
    guest = vm / "guest.raw"
    content = fake.read_bytes().ljust(2 * MIB, b"G")
    guest.write_bytes(content)
    fake.unlink()
    assert detect_format(str(guest)) == "raw"
    with open_image(str(guest), rule=beside(guest)) as img:
        assert (img.format, img.size, img.parent) == ("raw", 2 * MIB, None)
        assert img.read(0, 2 * MIB) == content
    convert(str(guest), str(vm / "guest.vhdx"), "vhdx")
    with open_image(str(vm / "guest.vhdx")) as img:
        assert img.size == 2 * MIB and img.read(0, 2 * MIB) == content
    child = checkpoint(str(guest))
    with open_image(child, rule=beside(Path(child))) as img:
        assert img.parent is not None and img.parent.format == "raw" and img.read(0, 2 * MIB) == content


def test_qcow2_backing_chain_cycle_through_a_link_is_refused(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    a = vm / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "link.qcow2", "-F", "qcow2", str(vm / "b.qcow2"), "1M")
    os.symlink("a.qcow2", vm / "link.qcow2")
    with pytest.raises(ParentError, match="cyclic"):
        open_image(str(a), rule=beside(a))


# ============================================================================ the image named


@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket", "folder"])
def test_a_special_file_named_as_the_image_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "disk.img"
    sock = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.symlink("/dev/zero", path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    else:
        path.mkdir()
    try:
        for probe in (detect_format, open_image, open_chain):
            with pytest.raises(SourceError, match=r"is a (FIFO|character device|socket|folder), not a disk image"):
                within(10, lambda p=probe: p(str(path)))  # type: ignore[operator]
    finally:
        if sock is not None:
            sock.close()


def test_a_scanned_file_replaced_before_the_open_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"x" * 4096)
    st = os.lstat(path)
    with open_image(str(path), expect=(st.st_dev, st.st_ino)) as img:
        assert img.read(0, 1) == b"x"
    os.rename(path, tmp_path / "old.raw")
    path.write_bytes(b"y" * 4096)  # same name, another file
    with pytest.raises(SourceError, match="replaced by another file"):
        open_image(str(path), expect=(st.st_dev, st.st_ino))
    os.unlink(path)
    os.symlink(tmp_path / "old.raw", path)  # same file, reached through a link
    with pytest.raises(SourceError, match="is a link"):
        open_image(str(path), expect=(st.st_dev, st.st_ino))
    with pytest.raises(SourceError, match="is a link"):
        open_checked(str(path), nofollow=True)


# ============================================================================ VHDX parent locators


def make_vhdx_chain(folder: Path, parent_folder: Path) -> tuple[Path, Path]:
    base = parent_folder / "base.vhdx"
    with create_vhdx(str(base), 8 * MIB, block_size=MIB) as w:
        w.write(0, b"P" * MIB)
    child = folder / "child.avhdx"
    create_vhdx(str(child), 0, parent=str(base), block_size=MIB).close()
    return base, child


def set_locator(child: Path, **entries: str) -> None:
    """Rewrite the child's locator in place (what an attacker with write access can do)."""
    from vmvault.disk.vhdx import set_locator as rewrite_locator

    rewrite_locator(str(child), tuple(entries.items()))


def linkage(path: Path) -> str:
    with open_image(str(path)) as img:
        return "{" + str(img.data_write_guid) + "}"  # type: ignore[attr-defined]


def test_vhdx_parent_outside_the_folder_is_refused(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    _base, child = make_vhdx_chain(vm, outside)  # locator: absolute path and ..\outside\base.vhdx
    with pytest.raises(ParentError, match="outside the folders parents may be in") as err:
        open_image(str(child), rule=beside(child))
    assert str(outside / "base.vhdx") in str(err.value)
    with open_image(str(child), rule=beside(child, outside)) as img:
        assert img.read(0, 1) == b"P"


@pytest.mark.parametrize(
    "keys",
    [
        {"relative_path": "..\\outside\\base.vhdx"},
        {"relative_path": "..\\vm\\..\\outside\\base.vhdx"},
        {"absolute_win32_path": "{outside}/base.vhdx"},
        {"absolute_win32_path": "{outside}/base.vhdx", "relative_path": ".\\missing.vhdx"},
    ],
    ids=["dotdot", "dotdot-twice", "absolute", "absolute-after-missing-relative"],
)
def test_vhdx_locator_paths_leading_outside_are_refused(layout: tuple[Path, Path], keys: dict[str, str]) -> None:
    vm, outside = layout
    base, child = make_vhdx_chain(vm, vm)
    entries = {"parent_linkage": linkage(base), **{k: v.format(outside=outside) for k, v in keys.items()}}
    set_locator(child, **entries)
    os.rename(base, outside / "base.vhdx")
    with pytest.raises(ParentError, match="outside the folders"):
        open_image(str(child), rule=beside(child))
    with open_image(str(child), rule=beside(child, outside)) as img:  # the same file, allowed, is the parent
        assert img.parent is not None and img.read(0, 1) == b"P"


def test_vhdx_raw_parent_is_refused_even_inside_the_folder(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    base, child = make_vhdx_chain(vm, vm)
    (vm / "victim.db").write_bytes(b"important" * 100_000)
    set_locator(child, parent_linkage=linkage(base), relative_path=".\\victim.db")
    for rule in (beside(child), ParentRule()):
        with pytest.raises(ParentError, match="is a raw file; a VHDX child's parent must be a VHDX"):
            open_image(str(child), rule=rule)


def test_vhdx_qcow2_parent_is_refused(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    base, child = make_vhdx_chain(vm, vm)
    qemu_img("create", "-q", "-f", "qcow2", str(vm / "other.qcow2"), "8M")
    set_locator(child, parent_linkage=linkage(base), relative_path=".\\other.qcow2")
    with pytest.raises(ParentError, match="is a qcow2 file"):
        open_image(str(child))


def test_vhdx_mismatched_linkage_is_refused(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    _base, child = make_vhdx_chain(vm, vm)
    set_locator(child, parent_linkage="{" + str(uuid.uuid4()) + "}", relative_path=".\\base.vhdx")
    with pytest.raises(ParentError, match="does not match parent_linkage"):
        open_image(str(child))


def zero_data_write_guid(path: Path) -> None:
    """Give a VHDX a zero DataWriteGuid in both headers (valid checksums): a crafted parent."""
    with open(path, "r+b") as f:
        for off in L.HEADER_OFFSETS:
            f.seek(off)
            h = L.Header.unpack(f.read(L.HEADER_SIZE))
            f.seek(off)
            f.write(dataclasses.replace(h, data_write_guid=L.ZERO_GUID).pack())


def test_vhdx_zero_linkage_never_matches_even_a_zero_parent(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    base, child = make_vhdx_chain(vm, vm)
    zero = "{00000000-0000-0000-0000-000000000000}"
    set_locator(child, parent_linkage=zero, parent_linkage2=zero, relative_path=".\\base.vhdx")
    zero_data_write_guid(base)
    with open_image(str(base)) as img:
        assert img.data_write_guid == L.ZERO_GUID  # type: ignore[attr-defined]
    with pytest.raises(ParentError, match="zero GUID, which identifies no parent"):
        open_image(str(child))


def test_merge_of_a_crafted_avhdx_writes_nothing(layout: tuple[Path, Path]) -> None:
    """Issue 9, item 6: a locator ``..\\victimdir\\important.db`` with a zero linkage, merged."""
    vm, outside = layout
    victim_dir = outside.parent / "victimdir"
    victim_dir.mkdir()
    (victim_dir / "important.db").write_bytes(os.urandom(3 * MIB))
    base, child = make_vhdx_chain(vm, vm)
    os.unlink(child)  # made again with 1 MiB blocks: a new image never replaces an existing file
    with create_vhdx(str(child), 0, parent=str(base), block_size=MIB) as w:
        pass
    from vmvault.disk.vhdx import open_vhdx_for_write

    with open_vhdx_for_write(str(child)) as w:
        w.write(0, b"C" * MIB)  # data the merge would copy into the "parent"
    zero = "{00000000-0000-0000-0000-000000000000}"
    set_locator(child, parent_linkage=zero, relative_path="..\\victimdir\\important.db")
    os.unlink(base)  # "after its real parent is gone"
    before = snapshot_tree(victim_dir.parent)
    for allow in ((), (str(victim_dir),)):  # even a folder the user allowed holds no raw "parent"
        with pytest.raises(ParentError):
            merge(str(child), allow_dirs=allow)
    assert snapshot_tree(victim_dir.parent) == before
    assert sorted(os.listdir(victim_dir)) == ["important.db"]
    assert sorted(os.listdir(vm)) == ["child.avhdx"]


# ============================================================================ VHD parent locators


def make_vhd_chain(folder: Path, parent_folder: Path, unique_id: uuid.UUID | None = None) -> tuple[Path, Path]:
    base = parent_folder / "base.vhd"
    with create_vhd(str(base), 4 * MIB, unique_id=unique_id) as w:
        w.write(0, b"V" * 4096)
    child = folder / "child.avhd"
    create_vhd(str(child), 4 * MIB, parent=str(base)).close()
    return base, child


def test_vhd_parent_outside_the_folder_is_refused(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    _base, child = make_vhd_chain(vm, outside)  # W2ru ..\outside\base.vhd, W2ku absolute
    with pytest.raises(ParentError, match="outside the folders parents may be in"):
        open_image(str(child), rule=beside(child))
    with open_image(str(child), rule=beside(child, outside)) as img:
        assert img.read(0, 1) == b"V"


def test_vhd_zero_parent_unique_id_never_matches(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    _base, child = make_vhd_chain(vm, vm, unique_id=uuid.UUID(int=0))
    with pytest.raises(ParentError, match="ParentUniqueId is zero"):
        open_image(str(child))


def test_vhd_raw_file_in_the_parents_place_is_refused(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    base, child = make_vhd_chain(vm, vm)
    base.write_bytes(b"not a vhd" * 1000)
    with pytest.raises(ParentError, match="raw file; a VHD's parent must be a VHD"):
        open_image(str(child))


def test_vhd_fifo_in_the_parents_place_never_blocks(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    base, child = make_vhd_chain(vm, vm)
    base.unlink()
    os.mkfifo(base)
    with pytest.raises(ParentError, match="a FIFO, not a file"):
        within(10, lambda: open_image(str(child)))


# ============================================================================ chain operations


def test_checkpoint_and_convert_refuse_a_chain_leading_outside(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    disk = overlay(vm, str(outside / "secret"))
    with pytest.raises(ParentError, match="outside"):
        checkpoint(str(disk))
    with pytest.raises(ParentError, match="outside"):
        convert(str(disk), str(vm / "flat.raw"), "raw")
    assert sorted(os.listdir(vm)) == ["disk.qcow2"]
    # the user may name the folder, and then gets the data they asked for
    convert(str(disk), str(vm / "flat.raw"), "raw", allow_dirs=[str(outside)])
    assert (vm / "flat.raw").read_bytes()[: len(SECRET)] == SECRET


def test_merge_journal_naming_files_elsewhere_is_refused(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    base = vm / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    child = Path(checkpoint(str(base)))
    victim = outside / "victim.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(victim), "1M")
    journal = Path(str(child) + MERGE_JOURNAL_SUFFIX)
    doc = {"parent": str(base), "child": str(child), "grandchildren": [str(victim)], "stage": "replaced"}
    journal.write_text(json.dumps(doc))
    before = snapshot_tree(outside)
    with pytest.raises(SourceError, match=r"merge journal names .*victim\.qcow2.*not finishing it"):
        merge(str(child))
    assert snapshot_tree(outside) == before


def test_merge_journal_naming_a_nul_is_refused(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    base = vm / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    child = Path(checkpoint(str(base)))
    journal = Path(str(child) + MERGE_JOURNAL_SUFFIX)
    doc = {"parent": str(base), "child": str(child), "grandchildren": [f"{vm}/g\0.qcow2"], "stage": "replaced"}
    journal.write_text(json.dumps(doc))  # JSON spells the NUL \u0000; realpath raised ValueError
    with pytest.raises(SourceError, match=r"merge journal names .*not finishing it"):
        merge(str(child))


def test_merge_journal_nested_too_deeply_is_refused(layout: tuple[Path, Path]) -> None:
    """JSON deeper than the parser goes raised a RecursionError, not the SourceError."""
    vm, _outside = layout
    base = vm / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    child = Path(checkpoint(str(base)))
    Path(str(child) + MERGE_JOURNAL_SUFFIX).write_text("[" * 60000)
    with pytest.raises(SourceError, match=r"unreadable merge journal"):
        merge(str(child))


def test_merge_journal_fifo_never_blocks(layout: tuple[Path, Path]) -> None:
    vm, _outside = layout
    base = vm / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    child = Path(checkpoint(str(base)))
    os.mkfifo(str(child) + MERGE_JOURNAL_SUFFIX)
    with pytest.raises(SourceError, match=r"merge journal.*FIFO"):
        within(10, lambda: merge(str(child)))


def test_merge_does_not_follow_a_link_planted_as_its_journal_temporary(layout: tuple[Path, Path]) -> None:
    vm, outside = layout
    base = vm / "base.qcow2"
    with create_image(str(base), "qcow2", MIB) as w:
        w.write(0, b"b" * 4096)
    child = Path(checkpoint(str(base)))
    os.symlink(outside / "secret", str(child) + MERGE_JOURNAL_SUFFIX + ".tmp")
    before = (outside / "secret").read_bytes()
    assert merge(str(child)) == str(base)
    assert (outside / "secret").read_bytes() == before
    assert not child.exists()


def test_errors_are_vmvault_errors_with_one_line(layout: tuple[Path, Path]) -> None:
    """What the CLI prints: one line, naming the disk and the parent."""
    vm, outside = layout
    disk = overlay(vm, str(outside / "secret"))
    try:
        open_image(str(disk), rule=beside(disk))
    except VmvaultError as exc:
        assert "\n" not in str(exc) and isinstance(exc, FormatError)
    else:  # pragma: no cover - the refusal is tested above
        pytest.fail("not refused")
    started = time.monotonic()
    with pytest.raises(ParentError):
        open_image(str(disk), rule=beside(disk))
    assert time.monotonic() - started < 5


# ============================================================================ a name swapped between two opens


@pytest.mark.parametrize("fmt", ["vhdx", "vhd"])
def test_repointing_a_child_swapped_between_its_two_opens_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Re-pointing a child (a merge's grandchildren, ``disk`` commands) checks it through one
    open and writes its locator through a second, by name: a name swapped in between for a link
    to another VM's child had that file's locator rewritten. The second open must be the file
    the first one checked."""
    from vmvault.disk import _vhdx_write, vhd

    base, child, other = (tmp_path / f"{n}.{fmt}" for n in ("base", "child", "other"))
    if fmt == "vhdx":
        create_vhdx(str(base), 8 * MIB, block_size=MIB).close()
        for c in (child, other):
            create_vhdx(str(c), 0, parent=str(base), block_size=MIB).close()
        module, name = _vhdx_write, "open_vhdx_for_write"
    else:
        create_vhd(str(base), 4 * MIB).close()
        for c in (child, other):
            create_vhd(str(c), 4 * MIB, parent=str(base)).close()
        module, name = vhd, "open_vhd"
    before = other.read_bytes()
    first_open = getattr(module, name)

    def open_then_swap(path: str, **kw: object) -> object:
        opened = first_open(path, **kw)
        if os.path.abspath(path) == str(child):
            os.rename(child, tmp_path / "child.away")
            os.symlink(other, child)
        return opened

    monkeypatch.setattr(module, name, open_then_swap)
    with pytest.raises(SourceError, match="was replaced by another file since it was examined"):
        disk_format(fmt).set_parent(str(child), str(base), ParentRule.inside([str(tmp_path)]))
    assert other.read_bytes() == before

"""checkpoint / apply / merge / convert / compare on real files of every format."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool, small_tmpfs
from vmvault import platform
from vmvault.disk import DiskWriter, ExtentKind, create_image, detect_format, open_image
from vmvault.disk import chain as chain_module
from vmvault.disk.chain import (
    MERGE_JOURNAL_SUFFIX,
    apply,
    checkpoint,
    children,
    compare,
    convert,
    merge,
    open_chain,
    open_for_write,
)
from vmvault.disk.qcow2 import open_qcow2_for_write
from vmvault.disk.vhdx import create_vhdx, open_vhdx, open_vhdx_for_write
from vmvault.errors import ConfigError, ParentError, SourceError, UnsupportedFormatError, VmvaultError

MIB = 1024 * 1024
SIZE = 64 * MIB
FORMATS = ("vhdx", "vhd", "qcow2", "raw")
_GUID = r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}"


def writer_for(path: str) -> DiskWriter | None:
    """An in-place writer for a checkpoint layer (VHD has none: its layers are written at creation)."""
    fmt = detect_format(path)
    if fmt == "vhdx":
        return open_vhdx_for_write(path)
    if fmt == "qcow2":
        return open_qcow2_for_write(path)
    return None


def write(path: str, model: bytearray, offset: int, data: bytes) -> None:
    w = writer_for(path)
    assert w is not None
    with w:
        w.write(offset, data)
    model[offset : offset + len(data)] = data


def read_all(path: str | Path) -> bytes:
    with open_image(str(path)) as img:
        return img.read(0, img.size)


def make_base(tmp_path: Path, fmt: str, model: bytearray) -> str:
    base = str(tmp_path / f"disk.{fmt}")
    with create_image(base, fmt, len(model)) as w:
        w.write(0, b"A" * MIB)
        w.write(10 * MIB, b"B" * 4096)
    model[0:MIB] = b"A" * MIB
    model[10 * MIB : 10 * MIB + 4096] = b"B" * 4096
    return base


@pytest.fixture
def model() -> bytearray:
    return bytearray(SIZE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_names_and_reads_like_parent(tmp_path: Path, fmt: str, model: bytearray) -> None:
    base = make_base(tmp_path, fmt, model)
    before = os.stat(base)
    with open(base, "rb") as f:
        base_bytes = f.read()
    child = checkpoint(base)
    ext = {"vhdx": ".avhdx", "vhd": ".avhd"}.get(fmt, ".qcow2")
    assert re.fullmatch(rf"disk_{_GUID}{re.escape(ext)}", os.path.basename(child)), child
    assert os.path.dirname(child) == str(tmp_path)
    assert read_all(child) == model
    with open_image(child) as img:
        assert img.parent is not None and os.path.samefile(img.parent.path, base)
        assert all(e.kind is ExtentKind.PARENT for e in img.extents())
    # the parent was only read
    with open(base, "rb") as f:
        assert f.read() == base_bytes
    assert os.stat(base).st_mtime_ns == before.st_mtime_ns
    # a checkpoint of a checkpoint keeps the disk's stem (no GUID pile-up)
    grand = checkpoint(child)
    assert re.fullmatch(rf"disk_{_GUID}{re.escape(ext)}", os.path.basename(grand)), grand
    assert children(base) == [child] and children(child) == [grand]
    assert open_chain(grand).depth == 3


def test_checkpoint_name_option_and_refusals(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    child = checkpoint(base, name="Before update")
    assert child == str(tmp_path / "Before update.avhdx")
    with pytest.raises(ConfigError):
        checkpoint(base, name="Before update")
    with pytest.raises(ConfigError):
        checkpoint(base, name="../escape")
    with pytest.raises(SourceError):
        checkpoint(str(tmp_path / "missing.vhdx"))


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2", "raw"])
def test_writes_go_to_the_child_and_apply_discards_them(tmp_path: Path, fmt: str, model: bytearray) -> None:
    base = make_base(tmp_path, fmt, model)
    saved = bytes(model)
    child = checkpoint(base)
    write(child, model, 512, b"C" * 1000)
    write(child, model, 20 * MIB, b"D" * MIB)
    assert read_all(child) == model
    assert read_all(base) == saved
    assert apply(child) == base
    assert not os.path.exists(child)
    assert read_all(base) == saved


def test_apply_refuses_a_child_with_children_unless_subtree(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    c1 = checkpoint(base)
    c2 = checkpoint(c1)
    c3 = checkpoint(c2)
    with pytest.raises(ConfigError, match="below it"):
        apply(c1)
    assert all(os.path.exists(p) for p in (c1, c2, c3))
    assert apply(c1, discard_subtree=True) == base
    assert not any(os.path.exists(p) for p in (c1, c2, c3))
    with pytest.raises(ConfigError, match="no parent"):
        apply(base)


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2", "raw"])
def test_merge_leaf_into_parent(tmp_path: Path, fmt: str, model: bytearray) -> None:
    base = make_base(tmp_path, fmt, model)
    child = checkpoint(base)
    write(child, model, 512, b"C" * 1000)
    write(child, model, 20 * MIB, b"D" * MIB)
    assert merge(child) == os.path.abspath(base)
    assert not os.path.exists(child)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(base)]  # no scratch or journal left
    assert read_all(base) == model


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2"])
def test_merge_middle_layer_repoints_grandchild(tmp_path: Path, fmt: str, model: bytearray) -> None:
    base = make_base(tmp_path, fmt, model)
    c1 = checkpoint(base)
    write(c1, model, 512, b"C" * 1000)
    write(c1, model, 20 * MIB, b"D" * MIB)
    at_c1 = bytes(model)
    c2 = checkpoint(c1)
    write(c2, model, 30 * MIB, b"E" * 512)
    write(c2, model, 0, b"F" * 4096)
    assert merge(c1) == os.path.abspath(base)
    assert not os.path.exists(c1)
    assert read_all(c2) == model
    assert read_all(base) == at_c1
    with open_image(c2) as img:
        assert img.parent is not None and os.path.samefile(img.parent.path, base)
    # and the chain keeps working: write, checkpoint, merge again
    write(c2, model, 40 * MIB, b"G" * MIB)
    assert merge(c2) == os.path.abspath(base)
    assert read_all(base) == model


def test_merge_vhdx_linkage_is_hyperv_like(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    c1 = checkpoint(base)
    write(c1, model, 0, b"x" * 4096)
    c2 = checkpoint(c1)
    with open_vhdx(base) as img:
        old_guid, disk_id, block = img.data_write_guid, img.virtual_disk_id, img.block_size
    merge(c1)
    with open_vhdx(base) as img:
        # new data => new DataWriteGuid; the disk's identity and layout stay
        assert img.data_write_guid != old_guid
        assert img.virtual_disk_id == disk_id and img.block_size == block
        new_guid = img.data_write_guid
    with open_vhdx(c2) as img:
        loc = img.parent_locator
        assert loc["parent_linkage"] == "{" + str(new_guid) + "}"
        assert loc["relative_path"] == ".\\disk.vhdx"
        assert "parent_linkage2" not in loc
        assert img.info()["parent_linkage_checked"] is True


def test_merge_vhd_chain(tmp_path: Path, model: bytearray) -> None:
    """VHD layers are written at creation only: build the chain with create_image(parent=...)."""
    base = make_base(tmp_path, "vhd", model)
    c1 = str(tmp_path / "disk_1.avhd")
    with create_image(c1, "vhd", SIZE, parent=base) as w:
        w.write(512, b"C" * 1000)
        w.write(20 * MIB, b"D" * MIB)
    model[512:1512] = b"C" * 1000
    model[20 * MIB : 21 * MIB] = b"D" * MIB
    at_c1 = bytes(model)
    c2 = str(tmp_path / "disk_2.avhd")
    with create_image(c2, "vhd", SIZE, parent=c1) as w:
        w.write(30 * MIB, b"E" * 512)
    model[30 * MIB : 30 * MIB + 512] = b"E" * 512
    assert merge(c1) == os.path.abspath(base)
    assert read_all(base) == at_c1
    assert read_all(c2) == model
    with open_image(c2) as img:
        info = img.info()
        assert info["parent_name"] == "disk.vhd"
        assert img.parent is not None and os.path.samefile(img.parent.path, base)


def test_merge_refuses_when_parent_has_other_children(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    a = checkpoint(base)
    b = checkpoint(base)
    with pytest.raises(ConfigError, match="other children"):
        merge(a)
    assert os.path.exists(a) and os.path.exists(b)
    with pytest.raises(ConfigError, match="no parent"):
        merge(base)


def test_merge_resumes_after_child_deleted(tmp_path: Path, model: bytearray) -> None:
    """A crash between deleting the child and the journal: merge again just tidies up."""
    base = make_base(tmp_path, "vhdx", model)
    child = checkpoint(base)
    journal = child + MERGE_JOURNAL_SUFFIX
    with open(journal, "w") as f:
        json.dump({"parent": base, "child": child, "grandchildren": []}, f)
    os.unlink(child)
    assert merge(child) == base
    assert not os.path.exists(journal)


@pytest.mark.skipif(platform.HIDE_POSIX, reason="holes are found by SEEK_DATA; hidden, they read as data")
def test_convert_flattens_any_chain_to_any_format(tmp_path: Path) -> None:
    model = bytearray(4 * SIZE)
    base = make_base(tmp_path, "vhdx", model)
    c1 = checkpoint(base)
    write(c1, model, 20 * MIB, b"D" * MIB)
    write(c1, model, 33 * MIB + 7, b"odd")
    for fmt in FORMATS:
        dest = str(tmp_path / f"flat.{fmt}.out")
        convert(c1, dest, fmt)
        assert detect_format(dest) == fmt
        assert read_all(dest) == model
        assert compare(c1, dest) == []
        with open_image(dest) as img:
            assert img.parent is None
            stored = sum(e.length for e in img.extents() if e.kind is ExtentKind.DATA)
            # data lies in the first 34 MiB: at most two 32 MiB VHDX blocks
            assert stored <= SIZE, f"{fmt}: {stored} bytes stored, not sparse"
    with pytest.raises(ConfigError, match="exists"):
        convert(c1, str(tmp_path / "flat.raw.out"), "raw")
    with pytest.raises(ConfigError, match="unknown format"):
        convert(c1, str(tmp_path / "x"), "vmdk")


@pytest.mark.integration
def test_convert_output_passes_qemu(tmp_path: Path, model: bytearray) -> None:
    require_tool("qemu-img")
    base = make_base(tmp_path, "qcow2", model)
    c1 = checkpoint(base)
    write(c1, model, 20 * MIB, b"D" * MIB)
    for fmt in ("qcow2", "vhdx"):
        dest = str(tmp_path / f"flat.{fmt}")
        convert(c1, dest, fmt)
        subprocess.run(["qemu-img", "check", dest], check=True, capture_output=True)
        out = subprocess.run(
            ["qemu-img", "convert", "-O", "raw", dest, str(tmp_path / "q.raw")], check=True, capture_output=True
        )
        assert out.returncode == 0
        assert (tmp_path / "q.raw").read_bytes() == model


def test_compare_reports_sector_ranges(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    c1 = checkpoint(base)
    assert compare(base, c1) == []
    write(c1, model, 5 * MIB + 100, b"z" * 10)
    write(c1, model, 40 * MIB, b"q" * 1024)
    assert compare(base, c1) == [(5 * MIB, 512), (40 * MIB, 1024)]
    other = str(tmp_path / "small.raw")
    with create_image(other, "raw", SIZE - MIB):
        pass
    diffs = compare(base, other)
    assert diffs[-1] == (SIZE - MIB, MIB)
    assert diffs[0] == (0, MIB)


def test_chain_view(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    c1 = checkpoint(base)
    write(c1, model, 20 * MIB, b"D" * MIB)
    chain = open_chain(c1)
    assert [layer.path for layer in chain.layers] == [c1, base]
    assert chain.leaf.subtype == "differencing" and chain.base.subtype == "dynamic"
    assert chain.leaf.allocated_bytes == MIB
    assert chain.base.allocated_bytes == 32 * MIB  # one 32 MiB block holds both writes
    assert set(chain.leaf.guids) >= {"virtual_disk_id", "data_write_guid", "file_write_guid"}
    assert chain.leaf.guids["virtual_disk_id"] == chain.base.guids["virtual_disk_id"]
    doc = chain.as_dict()
    json.dumps(doc, default=str)
    assert doc["depth"] == 2


def test_missing_parent_is_a_parent_error(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    c1 = checkpoint(base)
    os.rename(base, str(tmp_path / "elsewhere.vhdx"))
    with pytest.raises(ParentError):
        merge(c1)
    with pytest.raises(ParentError):
        checkpoint(c1)


@pytest.fixture(name="small_tmpfs")
def small_tmpfs_fixture(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (needs root to mount; skipped otherwise)."""
    with small_tmpfs(tmp_path / "tmpfs", "24m") as mnt:
        yield mnt


def test_merge_on_a_full_disk_leaves_the_chain_as_it_was(small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = str(small_tmpfs / "disk.vhdx")
    model = bytearray(16 * MIB)
    with create_vhdx(base, 16 * MIB, block_size=MIB) as w:
        w.write(0, os.urandom(11 * MIB))
    model[: 11 * MIB] = read_all(base)[: 11 * MIB]
    child = checkpoint(base)
    write(child, model, 12 * MIB, b"c" * (2 * MIB))
    before = {p: Path(p).read_bytes() for p in (base, child)}
    # rebuilding the 11 MiB parent does not fit in what is left of 24 MiB: said before starting
    with pytest.raises(SourceError, match=r"needs up to .* bytes free"):
        merge(child)
    assert {p: Path(p).read_bytes() for p in (base, child)} == before
    # and should the file system fill up all the same (another writer), the write fails cleanly
    monkeypatch.setattr(chain_module, "_check_merge_space", lambda *args: None)
    with pytest.raises(VmvaultError, match="No space left"):
        merge(child)
    monkeypatch.undo()
    assert {p: Path(p).read_bytes() for p in (base, child)} == before
    assert sorted(os.listdir(small_tmpfs)) == sorted(os.path.basename(p) for p in (base, child))
    assert read_all(child) == model
    # with room, the same merge succeeds
    subprocess.run(["mount", "-o", "remount,size=96m", str(small_tmpfs)], check=True)
    assert merge(child) == base
    assert read_all(base) == model and not os.path.exists(child)


def test_open_for_write_refuses_a_parent(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    with open_for_write(base) as w:  # no children yet: allowed
        w.write(0, b"z" * 512)
    model[:512] = b"z" * 512
    child = checkpoint(base)
    with pytest.raises(ConfigError, match="checkpoints below it"):
        open_for_write(base)
    with open_for_write(child) as w:
        w.write(MIB, b"y" * 512)
    model[MIB : MIB + 512] = b"y" * 512
    assert read_all(child) == model
    vhd = make_base(tmp_path, "vhd", bytearray(SIZE))
    with pytest.raises(UnsupportedFormatError):
        open_for_write(vhd)


def test_merge_keeps_the_parent_file_mode(tmp_path: Path, model: bytearray) -> None:
    base = make_base(tmp_path, "vhdx", model)
    os.chmod(base, 0o600)
    child = checkpoint(base)
    write(child, model, 0, b"m" * 512)
    merge(child)
    assert os.stat(base).st_mode & 0o777 == 0o600
    assert read_all(base) == model


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_to_a_full_disk_is_a_clean_error(small_tmpfs: Path, tmp_path: Path, fmt: str) -> None:
    src = str(tmp_path / "big.vhdx")
    with create_vhdx(src, 32 * MIB, block_size=MIB) as w:
        w.write(0, os.urandom(30 * MIB))
    dest = small_tmpfs / f"out.{fmt}"
    # (the VHD and qcow2 writers report a full disk as a "short write")
    with pytest.raises(VmvaultError, match=r"No space left|cannot write|write failed|short write"):
        convert(src, str(dest), fmt)
    assert os.listdir(small_tmpfs) == []  # no half-written image, no .partial


def test_raw_writer_reports_a_full_disk_as_a_vmvault_error(small_tmpfs: Path) -> None:
    from vmvault.disk.raw import create_raw

    w = create_raw(str(small_tmpfs / "x.raw"), 64 * MIB)
    with pytest.raises(VmvaultError):  # at the write, or (written from a queue) at the close
        w.write(0, b"\x01" * (32 * MIB))
        w.close()
    w.close()  # a second close after the failure is quiet


def test_real_vhd_files_checkpoint_merge_convert(shared_dir: Path, tmp_path: Path) -> None:
    """The dfvfs VHDs of shared/testdata: a differencing VHD that names its parent by file name
    only, merged; a checkpoint over a qemu-made VHD, written at creation and merged back."""
    src = shared_dir / "testdata" / "vhd"
    for name in ("image.vhd", "image-differential.vhd", "ext2.vhd"):
        shutil.copy(src / name, tmp_path / name)
    parent, child = tmp_path / "image.vhd", tmp_path / "image-differential.vhd"
    view = read_all(child)
    assert merge(str(child)) == str(parent)
    assert read_all(parent) == view and not child.exists()
    # a checkpoint of the ext2 disk, with data, merged back; the file keeps its identity
    ext2 = tmp_path / "ext2.vhd"
    with open_image(str(ext2)) as img:
        uid, size = img.info()["unique_id"], img.size
    snap = tmp_path / "ext2_snap.avhd"
    with create_image(str(snap), "vhd", size, parent=str(ext2)) as w:
        w.write(1024, b"superblock?" * 10)
    want = read_all(snap)
    assert merge(str(snap)) == str(ext2)
    assert read_all(ext2) == want
    with open_image(str(ext2)) as img:
        assert img.info()["unique_id"] == uid
    flat = tmp_path / "ext2.vhdx"
    convert(str(ext2), str(flat), "vhdx")
    assert compare(str(ext2), str(flat)) == []


def test_names_as_parent_follows_the_reference_and_a_nul_names_nothing(tmp_path: Path) -> None:
    """The merge's check of which grandchild still names the merged child: the parent reference
    as the format stores it, resolved; a damaged name (a NUL in it) names no file at all."""
    require_tool("qemu-img")
    base, child, other = tmp_path / "base.qcow2", tmp_path / "child.qcow2", tmp_path / "other.qcow2"
    for name in (base, other):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(name), "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", str(child)], check=True
    )
    assert chain_module._names_as_parent(str(child), str(base), ())
    assert not chain_module._names_as_parent(str(child), str(other), ())
    assert not chain_module._names_as_parent(str(base), str(child), ())  # no parent at all
    # through a link to the parent: the same file
    (tmp_path / "alias.qcow2").symlink_to(base)
    assert chain_module._names_as_parent(str(child), str(tmp_path / "alias.qcow2"), ())
    # the stored name damaged: "base.qcow2" -> "bas\0.qcow2" names nothing, and raises nothing
    data = bytearray(child.read_bytes())
    at = data.index(b"base.qcow2")
    data[at + 3] = 0
    child.write_bytes(bytes(data))
    assert not chain_module._names_as_parent(str(child), str(base), ())

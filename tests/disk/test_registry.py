"""The disk format registry: every registered format round-trips through the generic entry
points (create, detect, open, parent references), and what ``vmvault.disk`` exports is derived
from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.pagecache import cached_pages, page_cache_droppable
from vmvault import platform
from vmvault.disk import (
    DIFFERENCING_FORMATS,
    DISK_SUFFIXES,
    FALLBACK_FORMAT,
    FORMATS,
    QEMU_FORMATS,
    DiskFormat,
    ParentRule,
    create_image,
    detect_format,
    disk_format,
    format_from_qemu,
    open_image,
    registry,
)
from vmvault.disk.base import CacheRelease
from vmvault.disk.chain import checkpoint, merge
from vmvault.errors import FormatError, ParentError, UnsupportedFormatError

MIB = 1024 * 1024
SIZE = 8 * MIB
ENTRIES = registry.ENTRIES
CHILD_FORMATS = [f for f in ENTRIES if f.can_be_child]


def ids(entries: list[DiskFormat] | tuple[DiskFormat, ...]) -> list[str]:
    return [f.name for f in entries]


def make(path: Path, fmt: str, *, parent: Path | None = None, data: bytes = b"") -> Path:
    with create_image(str(path), fmt, SIZE, parent=_s(parent)) as w:
        if data:
            w.write(MIB, data)
    return path


def _s(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def parent_format_for(entry: DiskFormat) -> DiskFormat:
    """A registered format ``entry`` accepts as a parent (its own, when it accepts that)."""
    if entry.accepts_parent(entry.name):
        return entry
    return next(f for f in ENTRIES if entry.accepts_parent(f.name))


# ---------------------------------------------------------------------------- what is derived


def test_exports_are_derived_from_the_registry() -> None:
    assert tuple(f.name for f in ENTRIES) == FORMATS
    assert set(DISK_SUFFIXES) == {s for f in ENTRIES for s in f.suffixes}
    assert tuple(f.name for f in ENTRIES if f.can_be_child) == DIFFERENCING_FORMATS
    assert registry.FALLBACK.name == FALLBACK_FORMAT and registry.FALLBACK.is_fallback


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_each_entry_is_complete_and_found_by_its_names(entry: DiskFormat) -> None:
    assert disk_format(entry.name) is entry
    assert registry.by_qemu_name(entry.qemu_name) is entry
    assert format_from_qemu(entry.qemu_name) == entry.name and entry.qemu_name in QEMU_FORMATS
    for suffix in entry.suffixes:
        assert registry.by_suffix("Some Disk" + suffix.upper()) is entry
    assert disk_format(entry.checkpoint_format).accepts_parent(entry.name)
    assert entry.checkpoint_suffix in disk_format(entry.checkpoint_format).suffixes


# ---------------------------------------------------------------------------- create, detect, open


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_every_format_round_trips_create_detect_open(tmp_path: Path, entry: DiskFormat) -> None:
    path = make(tmp_path / ("disk" + entry.suffixes[0]), entry.name, data=b"\x5a" * 4096)
    assert detect_format(str(path)) == entry.name
    # by content, not by name: the same file under a neutral name is still found
    neutral = tmp_path / "neutral.bin"
    shutil.copyfile(path, neutral)
    assert detect_format(str(neutral)) == entry.name
    with open_image(str(path)) as img:
        assert img.format == entry.name and img.size == SIZE and img.parent is None
        assert img.read(MIB, 4096) == b"\x5a" * 4096 and img.read(0, 4096) == bytes(4096)
    with open_image(str(path), format=entry.name) as img:
        assert img.read(MIB, 1) == b"\x5a"
    assert entry.read_parent(str(path)) is None


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_writes_larger_than_one_system_call_arrive_whole(tmp_path: Path, entry: DiskFormat) -> None:
    """Writers hand the system at most ``platform.WRITE_SLICE`` bytes a call: a piece of several
    slices and an odd tail, unaligned, reads back byte for byte."""
    data = os.urandom(3 * platform.WRITE_SLICE + 12345)
    path = str(tmp_path / ("big" + entry.suffixes[0]))
    with create_image(path, entry.name, SIZE) as w:
        w.write(MIB + 512, data)
    with open_image(path) as img:
        assert img.read(MIB + 512, len(data)) == data and img.read(MIB, 512) == bytes(512)


def test_no_format_claims_another_formats_file(tmp_path: Path) -> None:
    files = {e.name: make(tmp_path / ("d" + e.suffixes[0]), e.name) for e in ENTRIES}
    for name, path in files.items():
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(fd, 512, 0)
            tail = os.pread(fd, 512, os.fstat(fd).st_size - 512)
        finally:
            os.close(fd)
        claims = [e.name for e in ENTRIES if not e.is_fallback and e.probe(head, tail)]
        assert claims == ([] if disk_format(name).is_fallback else [name])


# ---------------------------------------------------------------------------- parent references


@pytest.mark.parametrize("entry", CHILD_FORMATS, ids=ids(CHILD_FORMATS))
def test_parent_reference_round_trips(tmp_path: Path, entry: DiskFormat) -> None:
    pformat = parent_format_for(entry)
    parent = make(tmp_path / ("base" + pformat.suffixes[0]), pformat.name, data=b"P" * 4096)
    child = make(tmp_path / ("child" + entry.suffixes[0]), entry.name, parent=parent)
    with open_image(str(parent)) as pimg:
        identity = pformat.identity(pimg)

    ref = entry.read_parent(str(child))
    assert ref is not None
    assert os.path.realpath(ref.paths[0]) == os.path.realpath(parent)
    assert ref.identity == identity  # None for qcow2, which records no identity
    assert ref.format == pformat.name

    # re-point at a byte-identical copy elsewhere in the folder: the reference follows it
    (tmp_path / "moved").mkdir()
    copy = tmp_path / "moved" / parent.name
    shutil.copyfile(parent, copy)
    entry.set_parent(str(child), str(copy), ParentRule.beside(str(child), [str(copy.parent)]))
    ref2 = entry.read_parent(str(child))
    assert ref2 is not None and os.path.realpath(ref2.paths[0]) == os.path.realpath(copy)
    assert ref2.identity == identity
    os.unlink(parent)  # the old parent is no longer needed
    with open_image(str(child)) as img:
        assert img.parent is not None and os.path.realpath(img.parent.path) == os.path.realpath(copy)
        assert img.read(MIB, 4096) == b"P" * 4096


@pytest.mark.parametrize("entry", [f for f in CHILD_FORMATS if f.parent_formats is not None], ids=lambda f: f.name)
def test_a_parent_of_a_format_the_child_refuses_is_refused(tmp_path: Path, entry: DiskFormat) -> None:
    other = next(f for f in ENTRIES if not entry.accepts_parent(f.name))
    parent = make(tmp_path / ("base" + other.suffixes[0]), other.name)
    with pytest.raises(FormatError):
        make(tmp_path / ("child" + entry.suffixes[0]), entry.name, parent=parent)
    assert not (tmp_path / ("child" + entry.suffixes[0])).exists()


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_checkpoint_and_merge_go_through_the_entry(tmp_path: Path, entry: DiskFormat) -> None:
    base = make(tmp_path / ("vm" + entry.suffixes[0]), entry.name, data=b"B" * 4096)
    child = checkpoint(str(base))
    assert child.endswith(entry.checkpoint_suffix) and detect_format(child) == entry.checkpoint_format
    written = b"C" * 4096
    try:
        with disk_format(entry.checkpoint_format).open_for_write(child) as w:
            w.write(MIB + 4096, written)
    except UnsupportedFormatError:  # VHD: no in-place writer; the merge still runs through the entry
        written = bytes(4096)
    assert merge(child) == str(base) and not os.path.exists(child)
    with open_image(str(base)) as img:
        assert img.format == entry.name
        assert img.read(MIB, 8192) == b"B" * 4096 + written


@pytest.mark.parametrize("entry", [f for f in ENTRIES if not f.can_be_child], ids=lambda f: f.name)
def test_a_format_without_parents_refuses_one(tmp_path: Path, entry: DiskFormat) -> None:
    base = make(tmp_path / "base.qcow2", "qcow2")
    with pytest.raises(FormatError, match="cannot hold a differencing child"):
        create_image(str(tmp_path / ("x" + entry.suffixes[0])), entry.name, SIZE, parent=str(base))
    plain = make(tmp_path / ("plain" + entry.suffixes[0]), entry.name)
    with pytest.raises(ParentError, match="has no parent"):
        open_image(str(plain), parent=str(base))


# ---------------------------------------------------------------------------- unknown formats


def test_an_unknown_format_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "disk.vmdk"
    with pytest.raises(UnsupportedFormatError, match=r"unknown disk format 'vmdk'; vmvault knows raw, vhdx"):
        create_image(str(target), "vmdk", SIZE)
    assert not target.exists()
    raw = make(tmp_path / "disk.raw", "raw")
    with pytest.raises(UnsupportedFormatError, match="unknown disk format 'vmdk'"):
        open_image(str(raw), format="vmdk")
    with pytest.raises(UnsupportedFormatError, match="unknown disk format"):
        disk_format("")
    assert registry.by_qemu_name("vmdk") is None and registry.by_suffix("disk.vmdk") is None
    with pytest.raises(UnsupportedFormatError, match="qemu format 'vmdk'"):
        format_from_qemu("vmdk")


def test_the_cli_refuses_an_unknown_format_without_a_traceback(tmp_path: Path) -> None:
    raw = make(tmp_path / "disk.raw", "raw")
    run = subprocess.run(
        ["vmvault", "disk", "convert", str(raw), str(tmp_path / "out.vmdk"), "--to", "vmdk"],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr and "vmdk" in run.stderr
    assert not (tmp_path / "out.vmdk").exists()


# ---------------------------------------------------------------------------- qemu reads what we record


@pytest.mark.parametrize("pformat", ENTRIES, ids=ids(ENTRIES))
def test_qcow2_overlays_record_the_backing_format_in_qemus_name(tmp_path: Path, pformat: DiskFormat) -> None:
    qemu_img = require_tool("qemu-img")
    parent = make(tmp_path / ("base" + pformat.suffixes[0]), pformat.name, data=b"Q" * 4096)
    child = make(tmp_path / "over.qcow2", "qcow2", parent=parent)
    ref = disk_format("qcow2").read_parent(str(child))
    assert ref is not None and ref.format == pformat.name
    run = subprocess.run(
        [qemu_img, "info", "--output=json", "-U", str(child)], capture_output=True, text=True, check=True
    )
    assert json.loads(run.stdout)["backing-filename-format"] == pformat.qemu_name


def test_qcow2_set_parent_keeps_qemus_header_extensions(tmp_path: Path) -> None:
    """Re-pointing rewrites the header cluster from the layout module's structures; the other
    extensions qemu wrote (its feature name table) survive, and qemu reads the result."""
    qemu_img = require_tool("qemu-img")
    first = make(tmp_path / "first.vhd", "vhd", data=b"1" * 4096)
    second = tmp_path / "second.vhd"
    shutil.copyfile(first, second)  # same UniqueId and content: a merged parent looks like this
    over = tmp_path / "over.qcow2"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-b", "first.vhd", "-F", "vpc", str(over)], check=True, cwd=tmp_path
    )
    with open_image(str(over)) as img:
        before = img.info()["header_extensions"]
    assert "feature_names" in before
    disk_format("qcow2").set_parent(str(over), str(second), ParentRule.beside(str(over)))
    with open_image(str(over)) as img:
        info = img.info()
        assert info["backing_file"] == "second.vhd" and info["backing_format"] == "vpc"
        assert sorted(info["header_extensions"]) == sorted(before)
        assert img.parent is not None and img.parent.path.endswith("second.vhd")
    run = subprocess.run([qemu_img, "info", "--output=json", str(over)], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["backing-filename"] == "second.vhd"
    subprocess.run([qemu_img, "check", "-q", str(over)], check=True)


@pytest.mark.parametrize("entry", CHILD_FORMATS, ids=ids(CHILD_FORMATS))
def test_a_child_accepts_its_rebuilt_parent_after_prepare_parent_swap(tmp_path: Path, entry: DiskFormat) -> None:
    """Merge steps 2-4 through the entries alone: the rebuilt parent (``create_like``) replaces
    the parent, and the child reads through either file at every moment."""
    pformat = parent_format_for(entry)
    parent = make(tmp_path / ("base" + pformat.suffixes[0]), pformat.name, data=b"P" * 4096)
    child = make(tmp_path / ("child" + entry.suffixes[0]), entry.name, parent=parent)
    rebuilt = tmp_path / "rebuilt.tmp"
    with open_image(str(parent)) as pimg, pformat.create_like(pimg, str(rebuilt), None) as w:
        w.write(MIB, b"P" * 4096)
    entry.prepare_parent_swap(str(child), str(parent), str(rebuilt))
    ref = entry.read_parent(str(child))
    assert ref is not None
    with open_image(str(rebuilt)) as new:
        new_identity = pformat.identity(new)
    if new_identity is not None:
        assert new_identity in (ref.identity, *ref.other_identities)
    with open_image(str(child)) as img:  # still on the old file
        assert img.read(MIB, 4096) == b"P" * 4096
    os.replace(rebuilt, parent)
    with open_image(str(child)) as img:  # and on the rebuilt one
        assert img.read(MIB, 4096) == b"P" * 4096


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.name)
def test_bytes_a_reader_is_done_with_leave_the_page_cache(
    tmp_path: Path, entry: DiskFormat, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read_done`` (a backup's workers after each batch): a raw file frees those bytes' pages,
    a format with a map its file's pages every ``CacheRelease.EVERY`` bytes; a child tells its
    parent, whose pages go too."""
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    monkeypatch.setattr(CacheRelease, "EVERY", MIB)
    data = os.urandom(6 * MIB)
    files = [make(tmp_path / f"disk{entry.suffixes[0]}", entry.name, data=data)]
    if entry.can_be_child:  # and a child of it: the parent is told too
        files.append(make(tmp_path / f"child{entry.suffixes[0]}", entry.name, parent=files[0], data=data[:MIB]))
    os.sync()  # (dirty pages are never dropped)
    with open_image(str(files[-1]), rule=ParentRule.beside(str(files[-1]))) as img:
        assert img.read(0, SIZE) != bytes(SIZE)
        assert all(cached_pages(f) > 0 for f in files)
        img.read_done(0, SIZE)
        assert {f.name: cached_pages(f) for f in files} == {f.name: 0 for f in files}

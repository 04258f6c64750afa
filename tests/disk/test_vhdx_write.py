"""Our VHDX writer, checked by qemu-img (check, convert) and libvhdi, including differencing chains."""

from __future__ import annotations

import itertools
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.disk.vhdx_samples import MIB, current_header, qemu_raw, read_at, region_table, run
from tests.pagecache import takes_direct
from vmvault.disk import Extent, ExtentKind, coalesce, create_image
from vmvault.disk import _vhdx_layout as L
from vmvault.disk.vhdx import VhdxWriter, create_vhdx, open_vhdx, open_vhdx_for_write
from vmvault.errors import FormatError, ParentError


def _pyvhdi() -> Any:
    """libvhdi's module; only a test that reads through it is skipped without it."""
    return pytest.importorskip("pyvhdi", reason="libvhdi-python (PyPI) is the independent differencing oracle")


def libvhdi_read(chain: list[Path], size: int) -> bytes:
    """Read a whole disk through libvhdi; ``chain`` is leaf first."""
    files = []
    for p in chain:
        f = _pyvhdi().file()
        f.open(str(p))
        files.append(f)
    for child, parent in itertools.pairwise(files):
        child.set_parent(parent)
    try:
        assert files[0].get_media_size() == size
        out = bytearray()
        step = 4 * MIB
        for off in range(0, size, step):
            out += files[0].read_buffer_at_offset(min(step, size - off), off)
        return bytes(out)
    finally:
        for f in files:
            f.close()


def random_writes(
    w: VhdxWriter, model: bytearray, rng: random.Random, count: int, *, align: int = 1, max_len: int = 3 * MIB
) -> None:
    size = len(model)
    for _ in range(count):
        off = rng.randrange(0, size // align) * align
        n = min(rng.randrange(1, max_len // align + 1) * align, size - off)
        data = bytes([rng.randrange(1, 256)]) * n if rng.random() < 0.5 else rng.randbytes(n)
        w.write(off, data)
        model[off : off + n] = data


def check_with_qemu(path: Path, tmp: Path, model: bytes) -> None:
    with open_vhdx(str(path)) as img:
        if img.logical_sector_size != 512:
            return  # qemu 7.2 refuses 4 KiB logical sectors (ENOTSUP); libvhdi checks those
    out = run("qemu-img", "check", str(path))
    assert "No errors were found" in out
    assert qemu_raw(path, tmp / (path.name + ".raw")) == model


@pytest.mark.integration
@pytest.mark.parametrize(
    ("size", "block_size", "fixed", "sector"),
    [
        (24 * MIB, 1 * MIB, False, 512),
        (40 * MIB + 4096, 2 * MIB, False, 4096),
        (70 * MIB, 32 * MIB, False, 512),
        (20 * MIB, 1 * MIB, True, 512),
        (33 * MIB, 8 * MIB, True, 4096),
    ],
)
def test_written_files_pass_qemu_and_libvhdi(
    tmp_path: Path, size: int, block_size: int, fixed: bool, sector: int
) -> None:
    require_tool("qemu-img")
    rng = random.Random(size ^ block_size)
    model = bytearray(size)
    path = tmp_path / "w.vhdx"
    with create_vhdx(str(path), size, block_size=block_size, fixed=fixed, logical_sector=sector) as w:
        random_writes(w, model, rng, 12)
        # reads through the writer see what was written, before any commit
        assert w.image.read(0, size) == model
    check_with_qemu(path, tmp_path, bytes(model))
    assert libvhdi_read([path], size) == model
    with open_vhdx(str(path)) as img:
        assert img.read(0, size) == model
        assert img.subtype == ("fixed" if fixed else "dynamic")
        assert img.logical_sector_size == sector and img.physical_sector_size == 4096
        for e in img.extents():
            if e.kind is ExtentKind.ZERO:
                assert model[e.offset : e.end].count(0) == e.length

    # reopen, write more, and check again
    with open_vhdx_for_write(str(path)) as w:
        random_writes(w, model, rng, 5)
    check_with_qemu(path, tmp_path, bytes(model))
    assert libvhdi_read([path], size) == model


@pytest.mark.integration
@pytest.mark.parametrize("block_size", [1 * MIB, 32 * MIB])
def test_a_new_file_is_written_past_the_page_cache_and_stays_valid(tmp_path: Path, block_size: int) -> None:
    """A restored VHDX (new, no parent) goes past the page cache, its headers, log and BAT in
    order with the payload: qemu-img and libvhdi read what was written, in 1 MiB runs (as a
    restore writes chunks) and at odd places; a child of it is written through the cache."""
    if not takes_direct(tmp_path):
        pytest.skip(f"the file system of {tmp_path} does not take O_DIRECT (or it is hidden)")
    require_tool("qemu-img")
    size = 70 * MIB + 512  # a last block that is not whole, ending off a 4 KiB boundary
    rng = random.Random(block_size)
    model = bytearray(size)
    path = tmp_path / "r.vhdx"
    with create_vhdx(str(path), size, block_size=block_size) as w:
        assert w.past_cache
        for off in range(0, size, MIB):  # more BAT entries than one log entry holds
            if rng.random() < 0.7:
                data = rng.randbytes(min(MIB, size - off))
                w.write(off, data)
                model[off : off + len(data)] = data
        random_writes(w, model, rng, 6)
        w.flush()
        assert w.image.read(0, size) == model
    check_with_qemu(path, tmp_path, bytes(model))
    assert libvhdi_read([path], size) == model
    child = tmp_path / "c.vhdx"
    with create_vhdx(str(child), 0, parent=str(path), block_size=block_size) as c:
        assert not c.past_cache
        c.write(5 * MIB + 100, b"child")
        model[5 * MIB + 100 : 5 * MIB + 105] = b"child"
    with open_vhdx(str(child)) as img:
        assert img.read(0, size) == model


def test_layout_is_hyperv_like(tmp_path: Path) -> None:
    path = tmp_path / "l.vhdx"
    vid = uuid.uuid4()
    with create_vhdx(str(path), 100 * MIB, virtual_disk_id=vid) as w:
        w.write(40 * MIB + 7, b"x" * 100)
    assert path.stat().st_size % MIB == 0
    regions = {e.guid: e for e in region_table(path).entries}
    assert regions[L.METADATA_REGION_GUID].file_offset == 2 * MIB
    assert regions[L.BAT_REGION_GUID].file_offset == 3 * MIB
    assert all(e.required for e in regions.values())
    assert L.RegionTable.unpack(read_at(path, 0x40000, 65536)) == region_table(path)
    slot, h = current_header(path)
    assert (h.log_offset, h.log_length, h.log_guid, h.version) == (MIB, MIB, L.ZERO_GUID, 1)
    other = L.Header.unpack(read_at(path, L.HEADER_OFFSETS[1 - slot], 4096))
    assert other.sequence_number == h.sequence_number - 1
    assert (other.file_write_guid, other.data_write_guid) == (h.file_write_guid, h.data_write_guid)
    table = L.MetadataTable.unpack(read_at(path, 2 * MIB, 65536))
    got = [(e.item_id, e.offset, e.length, int(e.flags)) for e in table.entries]
    assert got == [
        (L.FILE_PARAMETERS_GUID, 0x10000, 8, 4),
        (L.VIRTUAL_DISK_SIZE_GUID, 0x10008, 8, 6),
        (L.LOGICAL_SECTOR_SIZE_GUID, 0x10010, 4, 6),
        (L.PHYSICAL_SECTOR_SIZE_GUID, 0x10014, 4, 6),
        (L.VIRTUAL_DISK_ID_GUID, 0x10018, 16, 6),
    ]
    with open_vhdx(str(path)) as img:
        assert img.virtual_disk_id == vid
        (state, off) = L.unpack_bat_entry(img._bat[1])
        assert state == L.PayloadState.FULLY_PRESENT and off == 4 * MIB
        assert L.unpack_bat_entry(img._bat[0])[0] == L.PayloadState.NOT_PRESENT


def test_create_image_dispatch(tmp_path: Path) -> None:
    with create_image(str(tmp_path / "c.vhdx"), "vhdx", 8 * MIB) as w:
        w.write(0, b"abc")
    with open_vhdx(str(tmp_path / "c.vhdx")) as img:
        assert img.read(0, 4) == b"abc\0" and img.block_size == 32 * MIB


@pytest.mark.integration
@pytest.mark.parametrize("sector", [512, 4096])
def test_differencing_chain_matches_libvhdi(tmp_path: Path, sector: int) -> None:
    size = 40 * MIB
    rng = random.Random(sector)
    base = tmp_path / "base.vhdx"
    model = bytearray(size)
    with create_vhdx(str(base), size, block_size=2 * MIB, logical_sector=sector) as w:
        random_writes(w, model, rng, 8)
    chain = [base]
    models = [bytes(model)]
    for level in (1, 2):
        child = tmp_path / f"level{level}.avhdx"
        with create_vhdx(str(child), 0, parent=str(chain[-1]), block_size=2 * MIB) as w:
            random_writes(w, model, rng, 10, align=sector, max_len=300_000)
            random_writes(w, model, rng, 3, max_len=5000)  # unaligned: read-modify-write of sectors
            w.write(10 * MIB, bytes(range(256)) * 8192)  # one whole block -> FULLY_PRESENT
            model[10 * MIB : 12 * MIB] = bytes(range(256)) * 8192
        chain.append(child)
        models.append(bytes(model))
    for depth in range(1, len(chain)):
        leaf_first = list(reversed(chain[: depth + 1]))
        with open_vhdx(str(leaf_first[0])) as img:
            assert [i.path for i in img.chain()] == [str(p) for p in leaf_first]
            ours = img.read(0, size)
            assert ours == models[depth]
            assert libvhdi_read(leaf_first, size) == ours
            segs = coalesce(Extent(v, n, k) for v, n, k, _ in img._segments(0, size))
            assert list(img.extents()) == list(segs)
            kinds = {e.kind for e in img.extents()}
            assert kinds == {ExtentKind.DATA, ExtentKind.PARENT}
            merged = list(img.merged_extents())
            assert merged[0].offset == 0 and merged[-1].end == size
            info = img.info()
            assert info["subtype"] == "differencing" and info["parent_linkage_checked"] is True
            parent_guid = open_vhdx(str(leaf_first[1]), parent=None)
            try:
                assert img.parent_locator["parent_linkage"] == "{" + str(parent_guid.data_write_guid) + "}"
                assert img.virtual_disk_id == parent_guid.virtual_disk_id
            finally:
                parent_guid.close()
            assert img.parent_locator["relative_path"] == ".\\" + leaf_first[1].name
            assert img.parent_locator["absolute_win32_path"] == str(leaf_first[1])
            # block states: written blocks partial or full, never ZERO; SB entries present
            g = img._geom
            states = {L.unpack_bat_entry(img._bat[g.payload_index(b)])[0] for b in range(g.payload_blocks)}
            assert states <= {0, 6, 7} and 7 in states
            assert L.unpack_bat_entry(img._bat[g.payload_index(5)])[0] == L.PayloadState.FULLY_PRESENT
            assert L.unpack_bat_entry(img._bat[g.bitmap_index(0)])[0] == L.SectorBitmapState.PRESENT


def test_child_found_by_name_when_moved_and_by_override(tmp_path: Path) -> None:
    base = tmp_path / "a" / "base.vhdx"
    base.parent.mkdir()
    with create_vhdx(str(base), 4 * MIB, block_size=MIB) as w:
        w.write(0, b"P" * 4096)
    child = tmp_path / "a" / "child.avhdx"
    with create_vhdx(str(child), 4 * MIB, parent=str(base), block_size=MIB) as w:
        w.write(512, b"C" * 512)
    expected = b"P" * 512 + b"C" * 512 + b"P" * 3072
    # moved together to another folder: relative_path finds it
    moved = tmp_path / "b"
    shutil.copytree(base.parent, moved)
    shutil.rmtree(base.parent)
    with open_vhdx(str(moved / "child.avhdx")) as img:
        assert img.read(0, 4096) == expected
    # parent renamed: only the override finds it
    (moved / "base.vhdx").rename(moved / "renamed.vhdx")
    with pytest.raises(ParentError, match="not found"):
        open_vhdx(str(moved / "child.avhdx"))
    with open_vhdx(str(moved / "child.avhdx"), parent=str(moved / "renamed.vhdx")) as img:
        assert img.read(0, 4096) == expected


def test_reopened_child_keeps_writing(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(str(base), 8 * MIB, block_size=MIB) as w:
        w.write(0, b"\x01" * 8 * MIB)
    child = tmp_path / "child.avhdx"
    with create_vhdx(str(child), 0, parent=str(base), block_size=MIB) as w:
        w.write(0, b"\x02" * 1024)
    with open_vhdx(str(child)) as img:
        before = img.data_write_guid, img.file_write_guid
    with open_vhdx_for_write(str(child)) as w:
        w.write(1024, b"\x03" * 1024)
        w.write(MIB, b"\x04" * MIB)
    with open_vhdx(str(child)) as img:
        assert img.read(0, 3072) == b"\x02" * 1024 + b"\x03" * 1024 + b"\x01" * 1024
        assert img.read(MIB, MIB) == b"\x04" * MIB
        assert img.data_write_guid != before[0] and img.file_write_guid != before[1]
    assert libvhdi_read([child, base], 8 * MIB)[: 2 * MIB] == (
        b"\x02" * 1024 + b"\x03" * 1024 + b"\x01" * (MIB - 2048) + b"\x04" * MIB
    )


def test_writer_rejects_bad_arguments(tmp_path: Path) -> None:
    p = str(tmp_path / "x.vhdx")
    with pytest.raises(FormatError, match="sector"):
        create_vhdx(p, MIB, logical_sector=1024)
    with pytest.raises(FormatError, match="block size"):
        create_vhdx(p, MIB, block_size=3 * MIB)
    with pytest.raises(FormatError, match="multiple"):
        create_vhdx(p, MIB + 1)
    with pytest.raises(ParentError):
        create_vhdx(p, MIB, parent=str(tmp_path / "missing.vhdx"))
    with create_vhdx(p, MIB, block_size=MIB) as w, pytest.raises(ValueError, match="outside"):
        w.write(MIB - 1, b"ab")
    with pytest.raises(ParentError, match="own parent"):
        create_vhdx(p, 0, parent=p)


# --------------------------------------------------------------------------------------------
# crash safety: stop the writer at every write system call (half-writing that call)


class Crash(Exception):
    pass


def crash_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    original = VhdxWriter._pwrite
    state = {"n": 0}

    def pwrite(self: VhdxWriter, data: bytes | bytearray | memoryview, offset: int) -> None:
        state["n"] += 1
        if state["n"] == calls:
            original(self, bytes(data)[: len(data) // 2], offset)  # a torn write
            raise Crash
        original(self, data, offset)

    monkeypatch.setattr(VhdxWriter, "_pwrite", pwrite)


@pytest.mark.parametrize("differencing", [False, True])
def test_killed_writer_leaves_a_consistent_file(tmp_path: Path, differencing: bool) -> None:
    size, bs = 8 * MIB, MIB
    base = tmp_path / "base.vhdx"
    with create_vhdx(str(base), size, block_size=bs) as w:
        w.write(0, b"\x11" * size)
    target = tmp_path / "t.vhdx"
    if differencing:
        with create_vhdx(str(target), 0, parent=str(base), block_size=bs) as w:
            w.write(0, b"\x22" * 4096)
        old = b"\x22" * 4096 + b"\x11" * (size - 4096)
    else:
        with create_vhdx(str(target), size, block_size=bs) as w:
            w.write(0, b"\x22" * 4096)
        old = b"\x22" * 4096 + bytes(size - 4096)
    pristine = target.read_bytes()
    # the session under test: new blocks (whole and partial) and an in-block extension
    ops = [(2 * MIB, b"\x33" * bs), (5 * MIB + 4096, b"\x44" * 8192), (4096, b"\x55" * 4096)]
    new = bytearray(old)
    for off, data in ops:
        new[off : off + len(data)] = data
    calls = 0
    outcomes = set()
    while True:
        calls += 1
        target.write_bytes(pristine)
        with pytest.MonkeyPatch.context() as mp:
            crash_after(mp, calls)
            session: VhdxWriter | None = None
            try:
                session = open_vhdx_for_write(str(target))
                for off, data in ops:
                    session.write(off, data)
                session.close()
                finished = True
            except Crash:
                if session is not None:
                    session.image.close()
                finished = False
        with open_vhdx(str(target)) as img:
            got = img.read(0, size)
            outcomes.add(img.log_entries_replayed > 0)
        # Every 512-byte sector holds its old or its new contents (what a real disk guarantees),
        # and a block allocated in this session is visible whole or not at all.
        for s in range(0, size, 512):
            assert got[s : s + 512] in (old[s : s + 512], new[s : s + 512]), f"crash at write {calls}: {s:#x}"
        fresh = got[2 * MIB : 3 * MIB]
        assert fresh in (old[2 * MIB : 3 * MIB], new[2 * MIB : 3 * MIB]), f"crash at write {calls}"
        # a writable open replays the log into the file and leaves it clean and unchanged in content
        open_vhdx_for_write(str(target)).close()
        with open_vhdx(str(target)) as img:
            assert img.read(0, size) == got and img.log_entries_replayed == 0
        if not differencing and calls % 4 == 0:
            require_tool("qemu-img")
            check_with_qemu(target, tmp_path, got)
        if finished:
            assert got == new
            break
        assert calls < 200
    assert calls > 10 and outcomes == {False, True}  # some crashes left a log that had to be replayed
    if not differencing:
        require_tool("qemu-img")
        check_with_qemu(target, tmp_path, bytes(new))


def test_parent_locator_update_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(str(base), 4 * MIB, block_size=MIB) as w:
        w.write(0, b"P" * MIB)
    child = tmp_path / "child.avhdx"
    with create_vhdx(str(child), 0, parent=str(base), block_size=MIB) as w:
        w.write(4096, b"C" * 4096)
    with open_vhdx(str(child)) as img:
        old = img.parent_locator
        expected = img.read(0, 4 * MIB)
    new_entries = [
        ("parent_linkage", old["parent_linkage"]),
        ("parent_linkage2", "{" + str(uuid.uuid4()) + "}"),
        ("relative_path", ".\\base.vhdx"),
        ("volume_path", "\\\\?\\Volume{" + str(uuid.uuid4()) + "}\\vms\\" + "x" * 600 + "\\base.vhdx"),
    ]
    pristine = child.read_bytes()
    calls = 0
    seen = set()
    while True:
        calls += 1
        child.write_bytes(pristine)
        with pytest.MonkeyPatch.context() as mp:
            crash_after(mp, calls)
            session: VhdxWriter | None = None
            try:
                session = open_vhdx_for_write(str(child))
                session.set_parent_locator(new_entries)
                session.close()
                finished = True
            except Crash:
                if session is not None:
                    session.image.close()
                finished = False
        with open_vhdx(str(child)) as img:
            assert img.parent_locator in (old, dict(new_entries)), f"crash at write {calls}"
            seen.add(img.parent_locator == old)
            assert img.read(0, 4 * MIB) == expected
        if finished:
            break
    assert seen == {True, False}
    assert libvhdi_read([child, base], 4 * MIB) == expected
    with open_vhdx_for_write(str(child)) as w, pytest.raises(FormatError, match="parent_linkage"):
        w.set_parent_locator([("relative_path", "x")])
    with open_vhdx_for_write(str(base)) as w, pytest.raises(FormatError, match="only a differencing"):
        w.set_parent_locator(new_entries)

"""Damaged VHDX files: every failure is a FormatError (or ParentError) naming the structure."""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ShortRepr, cpu_time_limit
from tests.disk.test_vhdx_log import dirty_file
from tests.disk.vhdx_samples import (
    MIB,
    bat_entry_offset,
    current_header,
    metadata_item_offset,
    patch,
    read_at,
    region,
    region_table,
    set_header,
)
from vmvault.disk import _vhdx_layout as L
from vmvault.disk.vhdx import create_vhdx, open_vhdx, open_vhdx_for_write
from vmvault.errors import FormatError, ParentError, UnsupportedFormatError

SIZE = 8 * MIB


def make_base(path: Path) -> Path:
    with create_vhdx(str(path), SIZE, block_size=MIB) as w:
        w.write(0, b"\x11" * MIB)
        w.write(3 * MIB, b"\x33" * 1000)
    return path


def make_child(parent: Path, path: Path) -> Path:
    with create_vhdx(str(path), 0, parent=str(parent), block_size=MIB) as w:
        w.write(512, b"\x44" * 1024)
        w.write(5 * MIB, b"\x55" * MIB)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_base(tmp_path / "base.vhdx")


def expect(path: Path, structure: str, match: str = "", exc: type[FormatError] = FormatError) -> FormatError:
    with pytest.raises(exc, match=match) as info, open_vhdx(str(path)) as img:
        img.read(0, img.size)
    assert info.value.structure is not None and info.value.structure.startswith(structure), info.value
    assert info.value.path == str(path)
    return info.value


def flip(path: Path, offset: int) -> None:
    patch(path, offset, bytes([read_at(path, offset, 1)[0] ^ 0x5A]))


# ---------------------------------------------------------------------------------- headers


def test_one_bad_header_uses_the_other(base: Path) -> None:
    slot, h = current_header(base)
    flip(base, L.HEADER_OFFSETS[slot] + 100)
    with open_vhdx(str(base)) as img:
        assert img.read(0, 4) == b"\x11" * 4
        assert img.info()["header_sequence"] == h.sequence_number - 1


def test_both_headers_bad(base: Path) -> None:
    flip(base, L.HEADER_OFFSETS[0] + 40)
    flip(base, L.HEADER_OFFSETS[1])
    err = expect(base, "header", "no valid header")
    assert err.offset == L.HEADER_OFFSETS[0]


def test_equal_sequences_must_be_identical(base: Path) -> None:
    _slot, h = current_header(base)
    patch(base, L.HEADER_OFFSETS[0], h.pack())
    patch(base, L.HEADER_OFFSETS[1], dataclasses.replace(h, file_write_guid=uuid.uuid4()).pack())
    expect(base, "header", "cannot tell which is current")
    patch(base, L.HEADER_OFFSETS[1], h.pack())  # Disk2VHD writes identical copies: accepted
    open_vhdx(str(base)).close()


def test_header_version_and_log_version(base: Path) -> None:
    set_header(base, version=2)
    expect(base, "header", "version 2", UnsupportedFormatError)
    set_header(base, version=1, log_version=3, log_guid=uuid.uuid4())
    expect(base, "header", "log version 3", UnsupportedFormatError)


def test_log_outside_the_file(base: Path) -> None:
    set_header(base, log_guid=uuid.uuid4(), log_offset=64 * MIB)
    expect(base, "log", "truncated")
    set_header(base, log_offset=MIB + 4096)
    expect(base, "header", "1 MiB")


def test_not_a_vhdx(tmp_path: Path) -> None:
    p = tmp_path / "x.vhdx"
    p.write_bytes(b"conectix" + bytes(2 * MIB))
    expect(p, "file identifier", "not a VHDX")


# ---------------------------------------------------------------------------------- region table


def test_region_table_copy_two_is_used(base: Path) -> None:
    flip(base, L.REGION_TABLE_OFFSETS[0] + 20)
    with open_vhdx(str(base)) as img:
        assert img.read(3 * MIB, 4) == b"\x33" * 4


def test_both_region_tables_bad(base: Path) -> None:
    flip(base, L.REGION_TABLE_OFFSETS[0] + 20)
    flip(base, L.REGION_TABLE_OFFSETS[1] + 4)
    expect(base, "region table", "no valid region table")


def write_regions(path: Path, entries: tuple[L.RegionTableEntry, ...]) -> None:
    raw = L.RegionTable(entries).pack()
    for off in L.REGION_TABLE_OFFSETS:
        patch(path, off, raw)


def test_unknown_required_region_is_refused(base: Path) -> None:
    entries = region_table(base).entries
    write_regions(base, (*entries, L.RegionTableEntry(uuid.uuid4(), 64 * MIB, MIB, False)))
    with pytest.raises(FormatError):  # an optional unknown region past EOF is still checked
        open_vhdx(str(base))
    write_regions(base, (*entries, L.RegionTableEntry(uuid.uuid4(), 0, 0, True)))
    expect(base, "region table", "unknown required region", UnsupportedFormatError)


@pytest.mark.parametrize(
    ("file_offset", "message"),
    [(3 * MIB + 4096, "aligned"), (MIB, "overlap"), (512 * MIB, "truncated")],
)
def test_bad_region_placement(base: Path, file_offset: int, message: str) -> None:
    entries = tuple(
        dataclasses.replace(e, file_offset=file_offset) if e.guid == L.BAT_REGION_GUID else e
        for e in region_table(base).entries
    )
    write_regions(base, entries)
    expect(base, "region table", message)


def test_missing_metadata_region(base: Path) -> None:
    write_regions(base, tuple(e for e in region_table(base).entries if e.guid == L.BAT_REGION_GUID))
    expect(base, "region table", "metadata region is missing")


# ---------------------------------------------------------------------------------- metadata


def test_metadata_table_signature(base: Path) -> None:
    flip(base, region(base, L.METADATA_REGION_GUID).file_offset + 1)
    expect(base, "metadata table", "signature")


def test_unknown_required_metadata_item(base: Path) -> None:
    meta = region(base, L.METADATA_REGION_GUID).file_offset
    table = L.MetadataTable.unpack(read_at(base, meta, L.METADATA_TABLE_SIZE))
    extra = L.MetadataTableEntry(uuid.uuid4(), 0x20000, 8, L.MetadataFlags.IS_REQUIRED)
    patch(base, meta, L.MetadataTable((*table.entries, extra)).pack())
    expect(base, "metadata table", "unknown required metadata", UnsupportedFormatError)
    # the same item, not required, is skipped
    optional = dataclasses.replace(extra, flags=L.MetadataFlags.IS_USER)
    patch(base, meta, L.MetadataTable((*table.entries, optional)).pack())
    open_vhdx(str(base)).close()


def test_metadata_item_out_of_bounds(base: Path) -> None:
    meta = region(base, L.METADATA_REGION_GUID).file_offset
    table = L.MetadataTable.unpack(read_at(base, meta, L.METADATA_TABLE_SIZE))
    moved = tuple(
        dataclasses.replace(e, offset=MIB - 4) if e.item_id == L.VIRTUAL_DISK_SIZE_GUID else e for e in table.entries
    )
    patch(base, meta, L.MetadataTable(moved).pack())
    expect(base, "metadata table", "past the metadata region")
    missing = tuple(e for e in table.entries if e.item_id != L.VIRTUAL_DISK_ID_GUID)
    patch(base, meta, L.MetadataTable(missing).pack())
    expect(base, "metadata table", "virtual disk id is missing")


@pytest.mark.parametrize(
    ("item", "value", "structure", "message"),
    [
        (L.LOGICAL_SECTOR_SIZE_GUID, struct.pack("<I", 1024), "metadata logical sector size", "512 or 4096"),
        (L.PHYSICAL_SECTOR_SIZE_GUID, struct.pack("<I", 520), "metadata physical sector size", "512 or 4096"),
        (L.FILE_PARAMETERS_GUID, struct.pack("<II", 3 * MIB, 0), "metadata file parameters", "power of two"),
        (L.FILE_PARAMETERS_GUID, struct.pack("<II", 512 * MIB, 0), "metadata file parameters", "power of two"),
        (L.FILE_PARAMETERS_GUID, struct.pack("<II", MIB, 8), "metadata file parameters", "reserved"),
        (L.FILE_PARAMETERS_GUID, struct.pack("<II", MIB, 2), "metadata parent locator", "no parent locator"),
        (L.VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", 0), "metadata virtual disk size", "zero"),
        (L.VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", SIZE + 100), "metadata virtual disk size", "multiple"),
        (L.VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", 65 << 40), "metadata virtual disk size", "64 TiB"),
        (L.VIRTUAL_DISK_SIZE_GUID, struct.pack("<Q", 200 << 30), "BAT", "cannot hold"),
    ],
)
def test_bad_metadata_values(base: Path, item: uuid.UUID, value: bytes, structure: str, message: str) -> None:
    patch(base, metadata_item_offset(base, item), value)
    expect(base, structure, message)


# ---------------------------------------------------------------------------------- BAT


@pytest.mark.parametrize(
    ("index", "entry", "message"),
    [
        (2, (64 * MIB) | 6, "past the end of the file"),
        (2, (4 * MIB) | 6, "overlaps"),  # block 0's offset
        (2, (3 * MIB) | 6, "overlaps"),  # the BAT itself
        (2, (0) | 6, "header section"),
        (2, (4 * MIB) | 7, "PARTIALLY_PRESENT in a non-differencing"),
        (2, 4, "reserved state 4"),
    ],
)
def test_bad_bat_entries(base: Path, index: int, entry: int, message: str) -> None:
    patch(base, bat_entry_offset(base, index), struct.pack("<Q", entry))
    err = expect(base, "BAT", message)
    assert err.offset is not None


def test_sector_bitmap_entry_in_a_dynamic_file(tmp_path: Path) -> None:
    p = tmp_path / "big.vhdx"
    with create_vhdx(str(p), 5 << 30, block_size=32 * MIB) as w:  # 160 blocks: one SB slot at index 128
        w.write(0, b"x")
    patch(p, bat_entry_offset(p, 128), struct.pack("<Q", (64 * MIB) | 6))
    expect(p, "BAT", "non-differencing")


@pytest.mark.parametrize("keep", [500 * 1024, 3 * MIB + 65536, 5 * MIB + 12345])
def test_truncated_files(base: Path, keep: int) -> None:
    with open(base, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(FormatError, match=r"truncated|past the end|smaller than") as info:
        open_vhdx(str(base))
    assert info.value.structure in {"file", "region table", "BAT"}


# ---------------------------------------------------------------------------------- parents


def test_missing_parent(base: Path, tmp_path: Path) -> None:
    child = make_child(base, tmp_path / "child.avhdx")
    base.unlink()
    err = expect(child, "parent locator", "not found", ParentError)
    assert "base.vhdx" in str(err) and "child.avhdx" in str(err)


def test_modified_parent_breaks_the_link(base: Path, tmp_path: Path) -> None:
    child = make_child(base, tmp_path / "child.avhdx")
    with open_vhdx_for_write(str(base)) as w:
        w.write(0, b"changed")
    err = expect(child, "parent locator", "does not match parent_linkage", ParentError)
    assert str(base) in str(err) and str(child) in str(err)


def test_parent_linkage2_is_accepted(base: Path, tmp_path: Path) -> None:
    """A merge in progress: the parent already has the GUID stored as parent_linkage2."""
    child = make_child(base, tmp_path / "child.avhdx")
    with open_vhdx(str(base)) as img:
        real = img.data_write_guid
    loc = L.ParentLocator(
        L.VHDX_LOCATOR_TYPE,
        (
            ("parent_linkage", "{" + str(uuid.uuid4()) + "}"),
            ("parent_linkage2", "{" + str(real) + "}"),
            ("relative_path", ".\\base.vhdx"),
        ),
    )
    _replace_locator(child, loc)
    with open_vhdx(str(child)) as img:
        assert img.read(512, 4) == b"\x44" * 4


def _replace_locator(child: Path, loc: L.ParentLocator) -> None:
    meta = region(child, L.METADATA_REGION_GUID).file_offset
    table = L.MetadataTable.unpack(read_at(child, meta, L.METADATA_TABLE_SIZE))
    raw = loc.pack()
    entries = tuple(
        dataclasses.replace(e, length=len(raw)) if e.item_id == L.PARENT_LOCATOR_GUID else e for e in table.entries
    )
    patch(child, meta, L.MetadataTable(entries).pack())
    patch(child, metadata_item_offset(child, L.PARENT_LOCATOR_GUID), raw)


def test_locator_problems(base: Path, tmp_path: Path) -> None:
    child = make_child(base, tmp_path / "child.avhdx")
    _replace_locator(child, L.ParentLocator(uuid.uuid4(), (("parent_linkage", "{x}"),)))
    expect(child, "metadata parent locator", "not the VHDX locator", UnsupportedFormatError)
    _replace_locator(child, L.ParentLocator(L.VHDX_LOCATOR_TYPE, (("relative_path", ".\\base.vhdx"),)))
    expect(child, "metadata parent locator", "no parent_linkage")
    _replace_locator(child, L.ParentLocator(L.VHDX_LOCATOR_TYPE, (("parent_linkage", "{" + str(uuid.uuid4()) + "}"),)))
    expect(child, "metadata parent locator", "names no path")


def test_a_file_that_is_its_own_parent(base: Path, tmp_path: Path) -> None:
    child = make_child(base, tmp_path / "child.avhdx")
    os.replace(child, base)  # the child now sits where its locator's relative_path points: itself
    expect(base, "parent locator", "own ancestor", ParentError)


def test_a_longer_cycle(tmp_path: Path) -> None:
    a = make_base(tmp_path / "a.vhdx")
    b = make_child(a, tmp_path / "b.avhdx")
    c = make_child(b, tmp_path / "c.avhdx")
    # make a's place hold a child of c: a -> c -> b -> a
    tmp = make_child(c, tmp_path / "x.avhdx")
    _replace_locator(
        tmp,
        L.ParentLocator(
            L.VHDX_LOCATOR_TYPE,
            (
                ("parent_linkage", "{" + str(open_vhdx(str(c), parent=None).data_write_guid) + "}"),
                ("relative_path", ".\\c.avhdx"),
            ),
        ),
    )
    with pytest.raises(ParentError):  # b's linkage to the new a fails, or the cycle is found
        os.replace(tmp, a)
        open_vhdx(str(c))


def test_sector_size_mismatch(base: Path, tmp_path: Path) -> None:
    child = make_child(base, tmp_path / "child.avhdx")
    # the parent's BAT layout does not change with its sector size (8 blocks, no SB slot)
    patch(base, metadata_item_offset(base, L.LOGICAL_SECTOR_SIZE_GUID), struct.pack("<I", 4096))
    err = expect(child, "parent", "logical sectors", ParentError)
    assert str(base) in str(err)


def test_no_file_is_written_when_opening_read_only(base: Path, tmp_path: Path) -> None:
    child = make_child(base, tmp_path / "child.avhdx")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (base, child)}
    with open_vhdx(str(child)) as img:
        img.read(0, img.size)
        list(img.extents())
        img.info()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (base, child)} == before


# ---------------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> ShortRepr:
    d = tmp_path_factory.mktemp("fuzz")
    base = make_base(d / "base.vhdx")
    child = make_child(base, d / "child.avhdx")
    (d / "dirty").mkdir()
    dirty, _, _ = dirty_file(d / "dirty", 0x20000)
    files = {"base.vhdx": base.read_bytes(), "child.avhdx": child.read_bytes(), "dirty.vhdx": dirty.read_bytes()}
    return ShortRepr(files)


TARGETS = {
    # name: (offset, length, CRC field offset inside the structure or None)
    "header1": (0x10000, 4096, 4),
    "header2": (0x20000, 4096, 4),
    "regions1": (0x30000, 256, None),
    "metadata": (2 * MIB, 512, None),
    "items": (2 * MIB + 0x10000, 1200, None),
    "bat": (3 * MIB, 256, None),
    "sb_and_log": (MIB, 0x30000, None),
}


@settings(
    max_examples=250,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(["base.vhdx", "child.avhdx", "dirty.vhdx"]),
    target=st.sampled_from(sorted(TARGETS)),
    edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=6),
    fix_crc=st.booleans(),
)
def test_mutations_raise_only_format_errors(
    pristine: ShortRepr, name: str, target: str, edits: list[tuple[int, int]], fix_crc: bool
) -> None:
    off, length, crc_field = TARGETS[target]
    with tempfile.TemporaryDirectory() as d:
        for fname, data in pristine.items():
            Path(d, fname).write_bytes(data)
        path = Path(d, name)
        buf = bytearray(path.read_bytes())
        for pos, value in edits:
            buf[off + pos % length] = value
        if fix_crc:
            # keep checksums valid so the mutation reaches the checks behind them
            size = 4096 if target.startswith("header") else L.REGION_TABLE_SIZE
            start = off if crc_field is not None else (0x30000 if target == "regions1" else None)
            if start is not None:
                struct.pack_into("<I", buf, start + 4, 0)
                struct.pack_into("<I", buf, start + 4, L.crc32c(bytes(buf[start : start + size])))
        path.write_bytes(bytes(buf))
        try:
            with cpu_time_limit(10), open_vhdx(str(path)) as img:
                img.read(0, min(img.size, 6 * MIB))
                img.read(img.size - 4096, 4096)
                for _ in img.extents():
                    pass
                img.info()
        except FormatError:
            pass

"""VHD layout round trips and mutation of real headers (hypothesis)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import cpu_time_limit
from vmvault.disk._vhd_layout import (
    MAX_CHS_SECTORS,
    DynamicHeader,
    Footer,
    ParentLocator,
    chs_geometry,
    vhd_checksum,
)
from vmvault.disk.base import ExtentKind
from vmvault.disk.vhd import create_vhd, open_vhd
from vmvault.errors import FormatError

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
uuids = st.binary(min_size=16, max_size=16).map(lambda b: uuid.UUID(bytes=b))
tag = st.binary(min_size=4, max_size=4)

footers = st.builds(
    Footer,
    features=u32,
    format_version=u32,
    data_offset=u64,
    timestamp=u32,
    creator_app=tag,
    creator_version=u32,
    creator_host_os=tag,
    original_size=u64,
    current_size=u64,
    cylinders=u16,
    heads=u8,
    sectors_per_track=u8,
    disk_type=u32,
    unique_id=uuids,
    saved_state=u8,
)
locators = st.builds(ParentLocator, platform_code=tag, data_space=u32, data_length=u32, data_offset=u64)
headers = st.builds(
    DynamicHeader,
    table_offset=u64,
    max_table_entries=u32,
    block_size=u32,
    parent_unique_id=uuids,
    parent_timestamp=u32,
    # UTF-16BE NUL-padded: names without NUL and at most 256 UTF-16 units round-trip
    parent_unicode_name=st.text(st.characters(min_codepoint=1, max_codepoint=0xD7FF), max_size=200),
    locators=st.lists(locators, min_size=8, max_size=8).map(tuple),
    next_offset=u64,
    header_version=u32,
)


@given(footers)
def test_footer_round_trip(footer: Footer) -> None:
    raw = footer.pack()
    assert len(raw) == 512
    back = Footer.unpack(raw)
    assert back.checksum == vhd_checksum(raw, 64)
    assert back.pack() == raw
    assert back == Footer(**{**{f: getattr(footer, f) for f in footer.__dataclass_fields__}, "checksum": back.checksum})


@given(headers)
def test_dynamic_header_round_trip(header: DynamicHeader) -> None:
    raw = header.pack()
    assert len(raw) == 1024
    back = DynamicHeader.unpack(raw)
    assert back.pack() == raw
    assert back.parent_unicode_name == header.parent_unicode_name
    assert back.locators == header.locators
    assert back.checksum == vhd_checksum(raw, 36)


@given(st.integers(1, MAX_CHS_SECTORS + 10**6))
def test_chs_geometry_never_exceeds_the_disk(sectors: int) -> None:
    cyl, heads, spt = chs_geometry(sectors)
    assert cyl * heads * spt <= sectors
    assert cyl <= 65535 and heads <= 16 and spt <= 255
    if sectors <= MAX_CHS_SECTORS and sectors >= 17 * 4 * 1024:
        assert cyl * heads * spt > sectors * 0.95  # the spec's table loses little


# -- mutation of real and generated files ----------------------------------------------------------


def _samples(shared: Path | None) -> list[Path]:
    out: list[Path] = []
    if shared is not None:
        out += [shared / "testdata" / "vhd" / n for n in ("ext2.vhd", "image.vhd")]
    return out


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vhd-mut")
    with create_vhd(str(d / "base.vhd"), 4 * 1024 * 1024, block_size=512 * 1024) as w:
        w.write(0, os.urandom(100_000))
    with create_vhd(str(d / "child.vhd"), 4 * 1024 * 1024, parent=str(d / "base.vhd"), block_size=512 * 1024) as w:
        w.write(3000, os.urandom(70_000))
        w.write(2_000_000, os.urandom(5000))
    return d


def _check_mutant(data: bytes, offset: int, value: int, folder: Path, name: str) -> None:
    mutated = bytearray(data)
    mutated[offset] = value
    target = folder / name
    target.write_bytes(mutated)
    try:
        with cpu_time_limit(10), open_vhd(str(target)) as img:
            exts = list(img.extents())
            assert exts[-1].end == img.size if exts else img.size == 0
            for e in exts[:64]:
                assert len(img.read(e.offset, min(e.length, 1 << 20))) == min(e.length, 1 << 20)
            assert all(e.kind in ExtentKind for e in exts)
    except FormatError:
        pass  # the only acceptable failure (ParentError and UnsupportedFormatError are FormatErrors)


def _mutation_positions(size: int) -> st.SearchStrategy[int]:
    # footer copy, dynamic header, start of the BAT and block bitmaps, trailing footer
    return st.one_of(st.integers(0, min(size, 8192) - 1), st.integers(size - 512, size - 1))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_real_headers_fail_cleanly(shared_dir: Path, sample_dir: Path, data: st.DataObject) -> None:
    tmp = sample_dir  # each mutant overwrites the previous one
    for src in _samples(shared_dir):
        raw = src.read_bytes()
        offset = data.draw(_mutation_positions(len(raw)), label=f"{src.name} offset")
        value = data.draw(st.integers(0, 255), label="value")
        _check_mutant(raw, offset, value, tmp, src.name)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_differencing_files_fail_cleanly(sample_dir: Path, data: st.DataObject) -> None:
    raw = (sample_dir / "child.vhd").read_bytes()
    offset = data.draw(_mutation_positions(len(raw)), label="offset")
    value = data.draw(st.integers(0, 255), label="value")
    # the mutant sits beside base.vhd so that its parent resolves
    _check_mutant(raw, offset, value, sample_dir, "mutant.vhd")

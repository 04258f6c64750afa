"""qcow2 layout round trips and mutation of qemu-made images (hypothesis)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import cpu_time_limit, require_tool
from vmvault.disk._qcow2_layout import (
    BitmapDirectoryEntry,
    BitmapsExtension,
    Header,
    pack_extension,
    pack_feature_names,
    unpack_extension_header,
    unpack_feature_names,
)
from vmvault.disk.qcow2 import open_qcow2
from vmvault.errors import FormatError

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    version = draw(st.sampled_from([2, 3]))
    common = {
        "version": version,
        "backing_file_offset": draw(u64),
        "backing_file_size": draw(u32),
        "cluster_bits": draw(u32),
        "size": draw(u64),
        "crypt_method": draw(u32),
        "l1_size": draw(u32),
        "l1_table_offset": draw(u64),
        "refcount_table_offset": draw(u64),
        "refcount_table_clusters": draw(u32),
        "nb_snapshots": draw(u32),
        "snapshots_offset": draw(u64),
    }
    if version == 2:
        return Header(**common)
    hlen = draw(st.sampled_from([104, 112, 120]))
    return Header(
        **common,
        incompatible_features=draw(u64),
        compatible_features=draw(u64),
        autoclear_features=draw(u64),
        refcount_order=draw(u32),
        header_length=hlen,
        compression_type=draw(u8) if hlen > 104 else 0,
    )


@given(headers())
def test_header_round_trip(h: Header) -> None:
    raw = h.pack()
    assert len(raw) == (72 if h.version == 2 else h.header_length)
    assert raw[:4] == b"QFI\xfb"
    assert Header.unpack(raw) == h


@given(
    st.builds(
        BitmapDirectoryEntry,
        table_offset=u64,
        table_size=u32,
        flags=u32,
        type=u8,
        granularity_bits=u8,
        name=st.text(max_size=60),
        extra_data=st.binary(max_size=40),
    ),
    st.binary(max_size=16),
)
def test_bitmap_entry_round_trip(entry: BitmapDirectoryEntry, prefix: bytes) -> None:
    raw = entry.pack()
    assert len(raw) % 8 == 0
    back, nxt = BitmapDirectoryEntry.unpack(prefix + raw, len(prefix))
    assert back == entry and nxt == len(prefix) + len(raw)


@given(u32, st.binary(max_size=100))
def test_extension_round_trip(ext_type: int, data: bytes) -> None:
    raw = pack_extension(ext_type, data)
    assert len(raw) % 8 == 0
    assert unpack_extension_header(raw) == (ext_type, len(data))
    assert raw[8 : 8 + len(data)] == data


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 63), st.text("abcdefgh ", max_size=46)), max_size=10))
def test_feature_names_round_trip(entries: list[tuple[int, int, str]]) -> None:
    assert unpack_feature_names(pack_feature_names(entries)) == entries


@given(u32, u64, u64)
def test_bitmaps_extension_round_trip(nb: int, size: int, off: int) -> None:
    ext = BitmapsExtension(nb, size, off)
    assert BitmapsExtension.unpack(ext.pack()) == ext


# -- mutation --------------------------------------------------------------------------------------


def _run(*args: str) -> None:
    require_tool(args[0])
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def samples() -> Iterator[Path]:
    """Small qemu-made images: v2, v3 with a backing file and a bitmap, compressed, extended L2."""
    d = Path(tempfile.mkdtemp(prefix="qcow2-mut-"))
    _run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", str(d / "base.qcow2"), "2M")
    _run("qemu-io", "-c", "write -P 0x11 0 1M", str(d / "base.qcow2"))
    _run("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", str(d / "v2.qcow2"), "2M")
    _run("qemu-io", "-c", "write -P 0x22 100k 300k", str(d / "v2.qcow2"))
    _run(
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        str(d / "v3.qcow2"),
    )
    _run("qemu-io", "-c", "write -P 0x33 512k 64k", "-c", "write -z 0 8k", str(d / "v3.qcow2"))
    _run("qemu-img", "bitmap", "--add", str(d / "v3.qcow2"), "b0")
    _run(
        "qemu-img",
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        str(d / "base.qcow2"),
        str(d / "comp.qcow2"),
    )
    _run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", str(d / "ext.qcow2"), "2M")
    _run("qemu-io", "-c", "write -P 0x44 1000 20k", "-c", "write -z 64k 1k", str(d / "ext.qcow2"))
    yield d
    shutil.rmtree(d)


@pytest.mark.integration
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    name=st.sampled_from(["v2.qcow2", "v3.qcow2", "comp.qcow2", "ext.qcow2"]),
    data=st.data(),
)
def test_mutated_images_fail_cleanly(samples: Path, name: str, data: st.DataObject) -> None:
    raw = bytearray((samples / name).read_bytes())
    # header, extensions, L1, refcount structures and the first L2 tables live in the first clusters
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        if data.draw(st.booleans(), label="whole entry"):
            pos = data.draw(st.integers(0, min(len(raw), 64 * 1024) // 8 - 1), label="entry") * 8
            raw[pos : pos + 8] = data.draw(st.binary(min_size=8, max_size=8), label="value")
        else:
            pos = data.draw(st.integers(0, min(len(raw), 64 * 1024) - 1), label="byte")
            raw[pos] = data.draw(u8, label="value")
    target = samples / ("mutant-" + name)
    target.write_bytes(raw)
    try:
        with cpu_time_limit(10), open_qcow2(str(target)) as img:
            size = min(img.size, 4 * 1024 * 1024)
            assert len(img.read(0, size)) == size
            exts = list(img.extents())
            assert not exts or exts[-1].end == img.size
            img.info()
    except FormatError:
        pass  # the only acceptable failure; it carries the structure that is damaged

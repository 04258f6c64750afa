"""Reading qemu-made VHDX files: bytes equal ``qemu-img convert -O raw``, maps agree with the writes."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.disk.vhdx_samples import MIB, qemu_raw, qemu_vhdx, run
from vmvault.disk import Extent, ExtentKind, coalesce, open_image
from vmvault.disk.vhdx import open_vhdx

pytestmark = pytest.mark.integration

Case = tuple[int, int, bool, tuple[tuple[int, int, int], ...]]

CASES: list[Case] = [
    # (size, block size, fixed, writes as (pattern, offset, length))
    (16 * MIB, 1 * MIB, False, ((0xAB, 0, 4096), (0x11, 3 * MIB + 512, 70000), (0x22, 15 * MIB, MIB))),
    (100 * MIB, 8 * MIB, False, ((0xAB, MIB, 3 * MIB), (0x11, 50 * MIB, 100_000), (0x33, 99 * MIB, MIB))),
    (64 * MIB + 512, 32 * MIB, False, ((0x5A, 64 * MIB, 512), (0x01, 7, 3))),
    (200 * MIB, 256 * MIB, False, ((0x44, 199 * MIB, MIB),)),
    (20 * MIB, 1 * MIB, True, ((0xCD, 0, 5000),)),
    (48 * MIB, 2 * MIB, True, ((0xEE, 10 * MIB, 12 * MIB), (0x77, 47 * MIB, MIB))),
    (3 * MIB, 1 * MIB, False, ()),
]


def _ids(case: Case) -> str:
    size, bs, fixed, writes = case
    return f"{'fixed' if fixed else 'dynamic'}-{size}-{bs >> 20}M-{len(writes)}w"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_reads_equal_qemu_convert(tmp_path: Path, case: Case) -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")
    size, bs, fixed, writes = case
    img_path = qemu_vhdx(tmp_path / "d.vhdx", size, block_size=bs, fixed=fixed, writes=writes)
    expected = qemu_raw(img_path, tmp_path / "d.raw")
    assert len(expected) == size
    with open_vhdx(str(img_path)) as img:
        assert img.size == size
        assert img.subtype == ("fixed" if fixed else "dynamic")
        assert img.block_size == bs
        # whole-disk reads in engine-sized pieces, and unaligned odd-sized ones
        for piece in (64 * 1024, 4 * MIB):
            got = b"".join(img.read(o, piece) for o in range(0, size, piece))
            assert got == expected
        rng = random.Random(size)
        for _ in range(200):
            off = rng.randrange(size)
            n = rng.randrange(1, min(3 * bs, 6 * MIB))
            assert img.read(off, n) == expected[off : off + n]
        assert img.read(size, 10) == b""

        extents = list(img.extents())
        # the fast BAT scan agrees with the per-block segment walk that reads use
        assert extents == list(coalesce(Extent(v, n, k) for v, n, k, _ in img._segments(0, size)))
        assert extents[0].offset == 0 and extents[-1].end == size
        assert all(a.end == b.offset and a.kind is not b.kind for a, b in itertools.pairwise(extents))
        assert all(e.kind is not ExtentKind.PARENT for e in extents)
        data_blocks = {b for e in extents if e.kind is ExtentKind.DATA for b in range(e.offset // bs, -(-e.end // bs))}
        if fixed:
            assert data_blocks == set(range(-(-size // bs)))
        else:
            # qemu allocates exactly the blocks its writes touched
            written = {b for _, off, n in writes for b in range(off // bs, (off + n - 1) // bs + 1)}
            assert data_blocks == written
        # nothing outside our DATA extents holds a non-zero byte
        for e in extents:
            if e.kind is ExtentKind.ZERO:
                assert expected[e.offset : e.end].count(0) == e.length

        # qemu-img map reports data wherever ours does (qemu 7.2's vhdx driver maps everything as data)
        qmap = json.loads(run("qemu-img", "map", "--output=json", str(img_path)))
        qdata = [(m["start"], m["start"] + m["length"]) for m in qmap if m["data"]]
        for e in extents:
            if e.kind is ExtentKind.DATA:
                assert any(a <= e.offset and e.end <= b for a, b in qdata)
        info = img.info()
        assert info["log"] == "clean" and str(info["creator"]).startswith("QEMU")
        assert info["allocated_bytes"] == len(data_blocks) * bs


def test_open_image_dispatches_to_vhdx(tmp_path: Path) -> None:
    require_tool("qemu-img")
    p = qemu_vhdx(tmp_path / "x.vhdx", 4 * MIB, block_size=MIB, writes=((0x42, MIB, 10),))
    with open_image(str(p)) as img:
        assert img.format == "vhdx"
        assert img.read(MIB, 10) == b"\x42" * 10
        assert list(img.merged_extents())[1].kind is ExtentKind.DATA

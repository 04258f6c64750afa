"""Metadata checks (``disk/metadata_check.py``) against ``qemu-img check`` as the oracle.

qcow2 images are made by qemu-img and qemu-io (several layouts: v2, refcount widths, extended
L2, internal snapshots, bitmaps, compressed clusters), then damaged one structure at a time;
both checkers must count the same corruptions and leaks. VHDX and VHD damage that a full read
would not notice (overlapping blocks) must be found without reading data.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_tool
from vmvault.disk import open_image
from vmvault.disk.metadata_check import MetadataCheck, check_metadata
from vmvault.disk.qcow2 import create_qcow2
from vmvault.disk.vhd import create_vhd, open_vhd
from vmvault.disk.vhdx import create_vhdx

MIB = 1024 * 1024
OFFSET = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63


def qemu_img(*args: str) -> None:
    subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True, timeout=60)


def qemu_io(path: Path, *commands: str) -> None:
    argv = [require_tool("qemu-io")]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=60)


def qemu_check(path: Path) -> tuple[int, int]:
    """(corruptions, leaks) as ``qemu-img check`` counts them."""
    proc = subprocess.run(
        [require_tool("qemu-img"), "check", "--output=json", str(path)], capture_output=True, text=True, timeout=60
    )
    doc = json.loads(proc.stdout)
    return int(doc.get("corruptions", 0)), int(doc.get("leaks", 0))


def ours(path: Path) -> MetadataCheck:
    with open_image(str(path)) as img:
        return check_metadata(img)


def counts(path: Path) -> tuple[int, int]:
    found = ours(path)
    return len(found.problems), len(found.leaks)


# ---- a qcow2 file, field by field ----------------------------------------------------------


class Qcow2File:
    """Reads and patches the structures of a qcow2 file (big-endian, spec "Header")."""

    def __init__(self, path: Path) -> None:
        self.path = path
        head = path.read_bytes()[:104]
        self.cs = 1 << struct.unpack_from(">I", head, 20)[0]
        self.l1 = struct.unpack_from(">Q", head, 40)[0]
        self.rt = struct.unpack_from(">Q", head, 48)[0]
        self.bits = 1 << (struct.unpack_from(">I", head, 96)[0] if struct.unpack_from(">I", head, 4)[0] >= 3 else 4)

    def u64(self, offset: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return int(struct.unpack(">Q", f.read(8))[0])

    def put(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def l2_entry(self, index: int) -> tuple[int, int]:
        """(where, value) of entry ``index`` of the first L2 table."""
        where = (self.u64(self.l1) & OFFSET) + 8 * index
        return where, self.u64(where)

    def set_refcount(self, cluster: int, value: int) -> None:
        block = self.u64(self.rt) & OFFSET
        if self.bits >= 8:
            width = self.bits // 8
            self.put(block + width * cluster, value.to_bytes(width, "big"))
            return
        per_byte = 8 // self.bits
        pos = block + cluster // per_byte
        with open(self.path, "rb") as f:
            f.seek(pos)
            byte = f.read(1)[0]
        shift = self.bits * (cluster % per_byte)
        byte = (byte & ~(((1 << self.bits) - 1) << shift)) | (value << shift)
        self.put(pos, bytes([byte]))


def make_qcow2(path: Path, opts: str = "", *, snapshot: bool = False, bitmap: bool = False) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(path), "64M")
    qemu_io(path, "write -P 0x11 0 3M", "write -P 0x22 40M 1M")
    if snapshot:
        qemu_img("snapshot", "-c", "s1", str(path))
        qemu_io(path, "write -P 0x33 1M 1M")
    if bitmap:
        qemu_img("bitmap", "--add", str(path), "b0")
        qemu_io(path, "write -P 0x44 8M 1M")
    return path


@pytest.mark.parametrize(
    ("opts", "extra"),
    [
        ("", {}),
        ("compat=0.10", {}),
        ("refcount_bits=1", {}),
        ("refcount_bits=8", {}),
        ("refcount_bits=64", {}),
        ("extended_l2=on,cluster_size=128k", {}),
        ("cluster_size=512", {}),
        ("", {"snapshot": True, "bitmap": True}),
    ],
)
def test_clean_images_are_clean_to_both(tmp_path: Path, opts: str, extra: dict[str, bool]) -> None:
    path = make_qcow2(tmp_path / "a.qcow2", opts, **extra)
    assert qemu_check(path) == counts(path) == (0, 0)
    found = ours(path)
    assert found.tables >= 3 and found.problems == [] and found.notes == []


def test_compressed_and_our_own_images_are_clean(tmp_path: Path) -> None:
    src = make_qcow2(tmp_path / "a.qcow2", snapshot=True)
    for ctype in ("zlib", "zstd"):
        dest = tmp_path / f"c-{ctype}.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(src), str(dest))
        assert qemu_check(dest) == counts(dest) == (0, 0)
    mine = tmp_path / "mine.qcow2"
    with create_qcow2(str(mine), 64 * MIB, cluster_size=4096) as w:
        for i in range(40):
            w.write(i * 1_300_000, bytes([i + 1]) * 70_000)
    assert qemu_check(mine) == counts(mine) == (0, 0)


def _leak(q: Qcow2File) -> None:
    size = q.path.stat().st_size
    q.put(size, bytes(q.cs))  # a cluster nothing uses, with refcount 1
    q.set_refcount(size // q.cs, 1)


def _refcount_zero(q: Qcow2File) -> None:
    _where, entry = q.l2_entry(0)
    q.set_refcount((entry & OFFSET) // q.cs, 0)


def _used_twice(q: Qcow2File) -> None:
    _w0, e0 = q.l2_entry(0)
    w1, _e1 = q.l2_entry(1)
    q.put(w1, struct.pack(">Q", e0))


def _past_the_end(q: Qcow2File) -> None:
    w1, _e1 = q.l2_entry(1)
    q.put(w1, struct.pack(">Q", COPIED | (q.path.stat().st_size + 10 * q.cs)))


def _copied_cleared(q: Qcow2File) -> None:
    w1, e1 = q.l2_entry(1)
    q.put(w1, struct.pack(">Q", e1 & ~COPIED))


def _unaligned(q: Qcow2File) -> None:
    w1, e1 = q.l2_entry(1)
    q.put(w1, struct.pack(">Q", e1 + 512))


def _l1_copied_cleared(q: Qcow2File) -> None:
    q.put(q.l1, struct.pack(">Q", q.u64(q.l1) & ~COPIED))


def _l1_reserved_bit(q: Qcow2File) -> None:
    q.put(q.l1, struct.pack(">Q", q.u64(q.l1) | 2))


def _refcount_block_unaligned(q: Qcow2File) -> None:
    q.put(q.rt, struct.pack(">Q", q.u64(q.rt) + 512))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_leak, (0, 1)),
        (_refcount_zero, (2, 0)),  # the refcount, and the COPIED flag that no longer matches it
        (_used_twice, (1, 1)),  # one cluster used twice; the one no longer used leaks
        (_past_the_end, (2, 1)),
        (_copied_cleared, (1, 0)),
        (_unaligned, (2, 0)),  # misaligned, and the next cluster now counted twice
        (_l1_copied_cleared, (1, 0)),
        (_l1_reserved_bit, (1, 0)),
        (_refcount_block_unaligned, (1, 0)),  # the refcounts it held are unknown, not all wrong
    ],
)
def test_damage_is_counted_as_qemu_counts_it(
    tmp_path: Path, damage: Callable[[Qcow2File], None], expected: tuple[int, int]
) -> None:
    path = make_qcow2(tmp_path / "a.qcow2")
    damage(Qcow2File(path))
    assert qemu_check(path) == expected
    assert counts(path) == expected
    found = ours(path)
    assert found.leaked_bytes == expected[1] * 65536
    assert all(f.structure and f.message for f in found.problems)


@pytest.mark.parametrize("bits", [1, 8, 64])
def test_refcount_widths(tmp_path: Path, bits: int) -> None:
    path = make_qcow2(tmp_path / "a.qcow2", f"refcount_bits={bits}")
    q = Qcow2File(path)
    _leak(q)
    _refcount_zero(q)
    assert qemu_check(path) == counts(path) == (2, 1)


def test_a_shared_cluster_of_a_snapshot(tmp_path: Path) -> None:
    path = make_qcow2(tmp_path / "a.qcow2", snapshot=True)
    q = Qcow2File(path)
    _where, entry = q.l2_entry(5)  # written before the snapshot and not since: refcount 2
    q.set_refcount((entry & OFFSET) // q.cs, 1)
    assert qemu_check(path) == counts(path) == (2, 0)


def test_a_dirty_image_is_named(tmp_path: Path) -> None:
    path = make_qcow2(tmp_path / "a.qcow2")
    q = Qcow2File(path)
    q.put(72, struct.pack(">Q", 1))  # incompatible feature bit 0: dirty
    assert any("dirty" in n for n in ours(path).notes)


# ---- VHDX and VHD ----------------------------------------------------------------------------


def test_vhdx_from_qemu_and_from_us(tmp_path: Path) -> None:
    theirs = tmp_path / "q.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(theirs), "64M")
    qemu_io(theirs, "write -P 0x11 0 3M")
    mine = tmp_path / "m.vhdx"
    with create_vhdx(str(mine), 64 * MIB, block_size=MIB) as w:
        w.write(5 * MIB, b"x" * MIB)
    for path in (theirs, mine):
        found = ours(path)
        assert found.problems == [] and found.tables >= 2
        subprocess.run([require_tool("qemu-img"), "check", str(path)], check=True, capture_output=True)


def test_vhd_blocks_that_overlap_read_fine_but_are_damage(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    with create_vhd(str(path), 16 * MIB, block_size=2 * MIB) as w:
        w.write(0, b"a" * 4096)
        w.write(2 * MIB, b"b" * 4096)
    assert ours(path).problems == []
    with open_vhd(str(path)) as img:
        assert img.header is not None
        table = img.header.table_offset
    raw = bytearray(path.read_bytes())
    raw[table + 4 : table + 8] = raw[table : table + 4]  # block 1 now shares block 0's sectors
    path.write_bytes(bytes(raw))
    with open_image(str(path)) as img:
        img.read(0, img.size)  # a full read notices nothing
    found = ours(path)
    assert len(found.problems) == 1 and "overlaps" in found.problems[0].message


def test_raw_has_nothing_to_check(tmp_path: Path) -> None:
    path = tmp_path / "r.raw"
    path.write_bytes(b"\0" * 4096)
    found = ours(path)
    assert found.problems == [] and found.tables == 0 and "no metadata" in found.notes[0]


def test_hostile_tables_end_in_problems_not_exceptions(tmp_path: Path) -> None:
    """Garbage in the L1 table: many problems, no traceback, no hang."""
    path = make_qcow2(tmp_path / "a.qcow2")
    q = Qcow2File(path)
    q.put(q.u64(q.l1) & OFFSET, os.urandom(q.cs))  # the L2 table replaced by noise
    theirs = qemu_check(path)
    mine = counts(path)
    assert theirs[0] > 0 and mine[0] > 0

"""Every parser against mutated real files: VHDX, VHD and qcow2, single files and chains.

Seeds are files made by qemu-img, by vmvault's own writers, and (when ``shared/`` is there)
the Windows-made VHDs of ``shared/testdata/vhd``. Hypothesis mutates their headers, tables and
BATs (byte flips, boundary values written into fields, truncation), optionally repairing the
checksums so the mutation gets past them. Opening and reading a mutant may succeed or raise
``FormatError``; anything else fails, and so does an example that uses more than a few
seconds of CPU, allocates more than a bounded amount of memory, or
changes a file.

The deterministic tests at the end build the nastiest cases by hand: cyclic and
self-referencing parent chains, blocks past the end of the file, forbidden sector sizes and
size fields claiming terabytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import SHARED, ShortRepr, cpu_time_limit
from vmvault.disk import ParentRule, create_image, detect_format, disk_format, open_image
from vmvault.disk import _vhd_layout as V
from vmvault.disk import _vhdx_layout as L
from vmvault.disk.chain import checkpoint
from vmvault.disk.qcow2 import FORMAT as qcow2_format
from vmvault.disk.qcow2 import create_qcow2, open_qcow2_for_write
from vmvault.disk.vhd import FORMAT as vhd_format
from vmvault.disk.vhdx import create_vhdx, open_vhdx, open_vhdx_for_write, read_locator, set_locator
from vmvault.errors import FormatError, ParentError

MIB = 1024 * 1024
#: CPU seconds that opening and reading one mutant may take (~40 ms is typical)
CPU_LIMIT = 10.0
#: Python allocations one open+read may make (the reads below ask for ~0.5 MiB)
MEMORY_LIMIT = 96 * MIB


# ---------------------------------------------------------------------------------------- seeds


def _data(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7) & 0xFF or 1 for i in range(n))


def _qemu(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


class Seeds(ShortRepr):
    """name -> the files of one seed (name -> bytes)."""


def build_seeds(folder: Path) -> Seeds:
    """name -> the files of one seed (the first is the one mutated; the others are its chain)."""
    seeds = Seeds()

    def files(*names: str) -> dict[str, bytes]:
        return {n: (folder / n).read_bytes() for n in names}

    # vmvault's writers: VHDX base + differencing child (sector bitmaps present), VHD, qcow2
    with create_vhdx(str(folder / "base.vhdx"), 6 * MIB, block_size=MIB) as w:
        w.write(0, _data(300_000, 1))
        w.write(4 * MIB, _data(8192, 2))
    child = checkpoint(str(folder / "base.vhdx"), name="child")
    with open_vhdx_for_write(child) as w:
        w.write(512 * 3, _data(5000, 3))
        w.write(2 * MIB, _data(MIB, 4))
    seeds["vhdx"] = files("base.vhdx")
    seeds["avhdx"] = files("child.avhdx", "base.vhdx")
    with create_image(str(folder / "base.vhd"), "vhd", 6 * MIB) as dw:
        dw.write(0, _data(70_000, 5))
    with create_image(str(folder / "child.avhd"), "vhd", 6 * MIB, parent=str(folder / "base.vhd")) as dw:
        dw.write(1536, _data(3000, 6))
    seeds["vhd"] = files("base.vhd")
    seeds["avhd"] = files("child.avhd", "base.vhd")
    with create_qcow2(str(folder / "base.qcow2"), 6 * MIB, cluster_size=4096) as qw:
        qw.write(0, _data(100_000, 7))
    overlay = checkpoint(str(folder / "base.qcow2"), name="over")
    with open_qcow2_for_write(overlay) as qw:
        qw.write(8192, _data(10_000, 8))
    seeds["qcow2"] = files("base.qcow2")
    seeds["qcow2-overlay"] = files("over.qcow2", "base.qcow2")
    # qemu-img's files
    raw = folder / "src.raw"
    raw.write_bytes(_data(3 * MIB, 9) + bytes(MIB))
    if shutil.which("qemu-img"):
        _qemu("convert", "-O", "vhdx", "-o", "block_size=1M", str(raw), str(folder / "q.vhdx"))
        _qemu("convert", "-O", "vpc", str(raw), str(folder / "q.vhd"))
        _qemu("convert", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(folder / "q.qcow2"))
        _qemu("convert", "-c", "-O", "qcow2", str(raw), str(folder / "qc.qcow2"))
        seeds["qemu-vhdx"] = files("q.vhdx")
        seeds["qemu-vhd"] = files("q.vhd")
        seeds["qemu-qcow2"] = files("q.qcow2")
        seeds["qemu-qcow2-compressed"] = files("qc.qcow2")
    shared = SHARED / "testdata" / "vhd"
    if shared.is_dir():
        for name in ("image.vhd", "ext2.vhd", "fat-differential.vhd"):
            if (shared / name).is_file():
                seeds[f"windows-{name}"] = {name: (shared / name).read_bytes()}
        if (shared / "image-differential.vhd").is_file() and (shared / "image.vhd").is_file():
            seeds["windows-image-differential.vhd"] = {
                "image-differential.vhd": (shared / "image-differential.vhd").read_bytes(),
                "image.vhd": (shared / "image.vhd").read_bytes(),
            }
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return build_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def hot_spots(name: str, data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the structures worth mutating in one file."""
    size = len(data)
    if data[:8] == b"vhdxfile":
        spots = [(0x10000, 256), (0x20000, 256), (0x30000, 128), (0x40000, 128), (MIB, 8192)]
        try:
            table = L.RegionTable.unpack(data[0x30000 : 0x30000 + L.REGION_TABLE_SIZE])
            for e in table.entries:
                spots.append((e.file_offset, 512 if e.guid == L.BAT_REGION_GUID else 64))
                if e.guid == L.METADATA_REGION_GUID:
                    spots.append((e.file_offset + L.METADATA_TABLE_SIZE, 1024))
        except ValueError:
            pass
        return spots
    if data[:4] == b"QFI\xfb":
        l1 = int.from_bytes(data[40:48], "big")
        rt = int.from_bytes(data[48:56], "big")
        spots = [(0, 256), (l1, 64), (rt, 64)]
        if l1 + 8 <= size:
            l2 = int.from_bytes(data[l1 : l1 + 8], "big") & 0x00FFFFFFFFFFFE00
            spots.append((l2, 256))
        if rt + 8 <= size:
            spots.append((int.from_bytes(data[rt : rt + 8], "big"), 64))
        return [(o, n) for o, n in spots if 0 <= o < size]
    # VHD: footer (and its copy), dynamic header, BAT
    spots = [(size - 512, 512), (0, 512), (512, 1024)]
    dyn = int.from_bytes(data[size - 512 + 16 : size - 512 + 24], "big")
    if 0 < dyn < size - 1024 and data[dyn : dyn + 8] == V.HEADER_COOKIE:
        bat_at = int.from_bytes(data[dyn + 16 : dyn + 24], "big")
        if 0 < bat_at < size:
            spots.append((bat_at, 64))
            first = int.from_bytes(data[bat_at : bat_at + 4], "big")
            if first != 0xFFFFFFFF and first * 512 < size:
                spots.append((first * 512, 512))  # the first block's sector bitmap
    return spots


def repair_checksums(buf: bytearray) -> None:
    """Recompute the checksums a mutation broke, so the damage reaches the checks behind them."""
    if buf[:8] == b"vhdxfile":
        for off, length in ((0x10000, L.HEADER_SIZE), (0x20000, L.HEADER_SIZE)):
            if len(buf) >= off + length:
                struct.pack_into("<I", buf, off + 4, 0)
                struct.pack_into("<I", buf, off + 4, L.crc32c(bytes(buf[off : off + length])))
        for off in L.REGION_TABLE_OFFSETS:
            if len(buf) >= off + L.REGION_TABLE_SIZE:
                struct.pack_into("<I", buf, off + 4, 0)
                struct.pack_into("<I", buf, off + 4, L.crc32c(bytes(buf[off : off + L.REGION_TABLE_SIZE])))
    elif buf[:4] != b"QFI\xfb" and len(buf) >= 512:
        for off in {0, len(buf) - 512}:
            if buf[off : off + 8] == V.FOOTER_COOKIE:
                struct.pack_into(">I", buf, off + 64, V.vhd_checksum(bytes(buf[off : off + 512]), 64))
        dyn = int.from_bytes(buf[len(buf) - 512 + 16 : len(buf) - 512 + 24], "big")
        if 0 < dyn <= len(buf) - 1024 and buf[dyn : dyn + 8] == V.HEADER_COOKIE:
            struct.pack_into(">I", buf, dyn + 36, V.vhd_checksum(bytes(buf[dyn : dyn + 1024]), 36))


# ---------------------------------------------------------------------------------------- the harness


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
    }


def exercise(path: Path) -> None:
    """Open and read the way the engine and ``vmvault disk`` do, bounded in work."""
    # a merge reads the parent reference of a grandchild without opening its chain
    with contextlib.suppress(FormatError):  # the open below reaches its own verdict
        disk_format(detect_format(str(path))).read_parent(str(path))
    with open_image(str(path)) as img:
        img.info()
        size = img.size
        img.read(0, 65536)
        img.read(max(0, size - 512), 512)
        for count, ext in enumerate(img.merged_extents()):
            if count >= 64:
                break
            if ext.kind.value == "data" and count < 8:
                img.read(ext.offset, min(ext.length, 65536))
        for count, _ext in enumerate(img.extents()):
            if count >= 64:
                break
        for layer in img.chain():
            layer.info()


def open_mutant(folder: Path, target: str, seed: str) -> None:
    """Only FormatError may escape; within time and memory; files unchanged."""
    before = digest(folder)
    tracemalloc.start()
    try:
        with cpu_time_limit(CPU_LIMIT):
            exercise(folder / target)
        event(f"{seed}: opened and read")
    except FormatError as exc:
        event(f"{seed}: {type(exc).__name__} in {exc.structure or '?'}")
    finally:
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"opening the mutant allocated {peak} bytes"
    assert digest(folder) == before, "a reader changed a file"


mutation = st.tuples(
    st.sampled_from(["byte", "u16le", "u32le", "u64le", "u32be", "u64be"]),
    st.booleans(),  # inside a hot spot (else anywhere in the file)
    st.integers(0, 2**32),  # where (reduced modulo the range)
    st.one_of(
        st.integers(0, 255),
        st.sampled_from([0, 1, 0x1FF, 0x200, 0x1000, 0x100000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 63) - 1]),
        st.sampled_from([(1 << 64) - 1, 1 << 32, 0xFFFFFFFFFFFF0000, 3 << 20, 64 << 40]),
    ),
)


#: examples per run; raise it for a longer campaign (VMVAULT_FUZZ_EXAMPLES=5000)
FUZZ_EXAMPLES = int(os.environ.get("VMVAULT_FUZZ_EXAMPLES", "300"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, 1000),
    parent_too=st.integers(0, 3),
    edits=st.lists(mutation, min_size=1, max_size=4),
    fix=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, 2**24)),
)
def test_mutants_raise_only_format_errors(
    seeds: Seeds,
    which: int,
    parent_too: int,
    edits: list[tuple[str, bool, int, int]],
    fix: bool,
    cut: int | None,
) -> None:
    name = sorted(seeds)[which % len(seeds)]
    files = seeds[name]
    target = next(iter(files))
    # now and then damage the parent of a chain instead: the child is still what is opened
    victim = list(files)[1] if parent_too == 0 and len(files) > 1 else target
    buf = bytearray(files[victim])
    spots = hot_spots(victim, bytes(buf))
    for kind, hot, where, value in edits:
        width = {"byte": 1, "u16le": 2, "u32le": 4, "u32be": 4, "u64le": 8, "u64be": 8}[kind]
        if hot and spots:
            off, length = spots[where % len(spots)]
            pos = off + (where >> 8) % max(1, length)
        else:
            pos = where % len(buf)
        pos = min(pos, len(buf) - width)
        order: Literal["big", "little"] = "big" if kind.endswith("be") else "little"
        buf[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, order)
    if fix:
        repair_checksums(buf)
    if cut is not None and cut % 4 == 0:
        del buf[cut % len(buf) :]  # a truncated file, now and then
    with tempfile.TemporaryDirectory(prefix="vmvault-fuzz-") as d:
        folder = Path(d)
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
        (folder / victim).write_bytes(buf)
        open_mutant(folder, target, name if victim == target else f"{name} (parent damaged)")


def test_every_seed_opens_cleanly(seeds: Seeds, tmp_path: Path) -> None:
    """The unmutated seeds are valid: the fuzzer starts from files that work."""
    assert {"vhdx", "avhdx", "vhd", "avhd", "qcow2", "qcow2-overlay"} <= set(seeds)
    for name, files in seeds.items():
        folder = tmp_path / name
        folder.mkdir()
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
        target = next(iter(files))
        if name == "windows-fat-differential.vhd":
            with pytest.raises(ParentError, match=r"fat-parent\.vhd"):
                exercise(folder / target)  # its parent is not in the test data
            continue
        exercise(folder / target)


# ---------------------------------------------------------------------------------------- by hand


def expect_format_error(path: Path, match: str, cls: type[FormatError] = FormatError) -> None:
    before = digest(path.parent)
    with cpu_time_limit(CPU_LIMIT), pytest.raises(cls, match=match):
        exercise(path)
    assert digest(path.parent) == before


def test_vhdx_cycles(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(str(base), 4 * MIB, block_size=MIB):
        pass
    a = Path(checkpoint(str(base), name="a"))
    b = Path(checkpoint(str(a), name="b"))
    # a -> itself
    me = Path(checkpoint(str(base), name="me"))
    with open_vhdx(str(me)) as img:
        guid = img.data_write_guid
    set_locator(str(me), (("parent_linkage", "{" + str(guid) + "}"), ("relative_path", ".\\me.avhdx")))
    expect_format_error(me, "own ancestor|cycl", ParentError)
    # a -> b -> a
    with open_vhdx(str(b)) as img:
        guid_b = img.data_write_guid
    entries = tuple((k, v) for k, v in read_locator(str(a)).entries if k not in ("relative_path", "parent_linkage"))
    set_locator(str(a), (*entries, ("parent_linkage", "{" + str(guid_b) + "}"), ("relative_path", ".\\b.avhdx")))
    expect_format_error(b, "own ancestor|cycl", ParentError)


def test_vhdx_parent_name_holding_a_nul(tmp_path: Path) -> None:
    """A locator's name with a NUL names no file: a ParentError saying so (the search for the
    name in any case listed a folder named with the NUL and raised ValueError)."""
    base = tmp_path / "base.vhdx"
    with create_vhdx(str(base), 4 * MIB, block_size=MIB):
        pass
    for i, name in enumerate((".\\ba\0se.vhdx", ".\\b\0\\base.vhdx")):
        child = Path(checkpoint(str(base), name=f"child{i}"))
        kept = tuple((k, v) for k, v in read_locator(str(child)).entries if k == "parent_linkage")
        set_locator(str(child), (*kept, ("relative_path", name)))
        expect_format_error(child, "NUL", ParentError)


def test_qcow2_cycles(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    with create_qcow2(str(base), 4 * MIB):
        pass
    a = Path(checkpoint(str(base), name="a"))
    b = Path(checkpoint(str(a), name="b"))
    me = Path(checkpoint(str(base), name="me"))
    qcow2_format.set_parent(str(me), str(me), ParentRule())
    expect_format_error(me, "cyclic", ParentError)
    qcow2_format.set_parent(str(a), str(b), ParentRule())
    expect_format_error(b, "cyclic", ParentError)


def test_vhd_cycles(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    with create_image(str(base), "vhd", 4 * MIB):
        pass
    me = tmp_path / "me.avhd"
    with create_image(str(me), "vhd", 4 * MIB, parent=str(base)):
        pass
    vhd_format.set_parent(str(me), str(me), ParentRule())
    expect_format_error(me, "cyclic|not usable", ParentError)


def patched(src: Path, dest: Path, edits: list[tuple[int, bytes]], *, fix: bool = True) -> Path:
    buf = bytearray(src.read_bytes())
    for off, data in edits:
        buf[off : off + len(data)] = data
    if fix:
        repair_checksums(buf)
    dest.write_bytes(buf)
    return dest


def test_vhdx_hand_made_damage(seeds: Seeds, tmp_path: Path) -> None:
    src = tmp_path / "src.vhdx"
    src.write_bytes(seeds["vhdx"]["base.vhdx"])
    meta = L.RegionTable.unpack(src.read_bytes()[0x30000 : 0x30000 + L.REGION_TABLE_SIZE])
    bat = next(e for e in meta.entries if e.guid == L.BAT_REGION_GUID).file_offset
    mreg = next(e for e in meta.entries if e.guid == L.METADATA_REGION_GUID).file_offset
    table = L.MetadataTable.unpack(src.read_bytes()[mreg : mreg + L.METADATA_TABLE_SIZE])

    def item(guid: object) -> int:
        e = next(e for e in table.entries if e.item_id == guid)
        return mreg + e.offset

    far = L.pack_bat_entry(L.PayloadState.FULLY_PRESENT, 64 * 1024 * MIB)
    expect_format_error(patched(src, tmp_path / "past.vhdx", [(bat, struct.pack("<Q", far))]), "past the end")
    # a metadata region at 2^64 - 1 MiB, past any offset a read can be given (the parent
    # reference of a merge read it and raised OverflowError)
    slot = next(i for i, e in enumerate(meta.entries) if e.guid == L.METADATA_REGION_GUID)
    at = 0x30000 + 16 + 32 * slot + 16
    expect_format_error(
        patched(src, tmp_path / "meta.vhdx", [(at, struct.pack("<Q", (1 << 64) - MIB))]), "past the end"
    )
    expect_format_error(
        patched(src, tmp_path / "lss.vhdx", [(item(L.LOGICAL_SECTOR_SIZE_GUID), struct.pack("<I", 1024))]),
        "logical sector size 1024",
    )
    expect_format_error(
        patched(src, tmp_path / "pss.vhdx", [(item(L.PHYSICAL_SECTOR_SIZE_GUID), struct.pack("<I", 0))]),
        "physical sector size",
    )
    # 2^62 bytes claimed: refused before a BAT of that size is read or allocated
    expect_format_error(
        patched(src, tmp_path / "huge.vhdx", [(item(L.VIRTUAL_DISK_SIZE_GUID), struct.pack("<Q", 1 << 62))]),
        "virtual size",
    )
    # 64 TiB (the largest allowed) with a 1 MiB BAT region: refused, not allocated
    expect_format_error(
        patched(src, tmp_path / "big.vhdx", [(item(L.VIRTUAL_DISK_SIZE_GUID), struct.pack("<Q", 64 << 40))]),
        "cannot hold",
    )


def test_vhd_hand_made_damage(seeds: Seeds, tmp_path: Path) -> None:
    src = tmp_path / "src.vhd"
    data = seeds["vhd"]["base.vhd"]
    src.write_bytes(data)
    foot = len(data) - 512
    dyn = int.from_bytes(data[foot + 16 : foot + 24], "big")
    table = int.from_bytes(data[dyn + 16 : dyn + 24], "big")
    expect_format_error(
        patched(src, tmp_path / "past.vhd", [(table, struct.pack(">I", 0x7FFFFFF0))]), "past|outside|beyond|end"
    )
    # CurrentSize of a petabyte in the footer (and its copy)
    huge = struct.pack(">Q", 1 << 50)
    expect_format_error(patched(src, tmp_path / "huge.vhd", [(foot + 48, huge), (48, huge)]), "CurrentSize|size")
    # MaxTableEntries of 2^31: never allocated
    entries = struct.pack(">I", 1 << 31)
    expect_format_error(patched(src, tmp_path / "bat.vhd", [(dyn + 28, entries)]), "MaxTableEntries|entries|BAT")


def test_qcow2_hand_made_damage(seeds: Seeds, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    data = seeds["qcow2"]["base.qcow2"]
    src.write_bytes(data)
    l1 = int.from_bytes(data[40:48], "big")
    # an L1 entry pointing 1 TiB past the end of the file
    expect_format_error(
        patched(src, tmp_path / "l1.qcow2", [(l1, struct.pack(">Q", (1 << 63) | (1 << 40)))], fix=False),
        "past|outside|beyond|end",
    )
    # a size of 2^61 with an l1_size that would need 2^31 entries
    expect_format_error(
        patched(
            src,
            tmp_path / "huge.qcow2",
            [(24, struct.pack(">Q", 1 << 61)), (36, struct.pack(">I", 1 << 31))],
            fix=False,
        ),
        "L1|l1|size",
    )
    expect_format_error(patched(src, tmp_path / "cb.qcow2", [(20, struct.pack(">I", 40))], fix=False), "cluster_bits")

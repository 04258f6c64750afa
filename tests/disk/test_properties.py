"""Random checkpoint trees against an in-memory model, checked by qemu-img and libvhdi.

A run is a random sequence of guest writes, checkpoints, applies and merges (of the leaf or of
a middle layer) on a real VHDX or qcow2 chain. The model is a stack of byte arrays: what each
layer showed when the next checkpoint froze it, and the current disk on top. After every step
every layer of the chain must read as its model entry; at the end every file must pass
``qemu-img check`` (VHDX base files; qemu refuses differencing VHDX) and every VHDX chain must
read the same through libvhdi, and every qcow2 chain the same through ``qemu-img convert``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import require_tool
from vmvault.disk import DiskWriter, ExtentKind, detect_format, open_image
from vmvault.disk import _vhdx_layout as L
from vmvault.disk.chain import apply, checkpoint, merge
from vmvault.disk.qcow2 import create_qcow2, open_qcow2_for_write
from vmvault.disk.vhdx import create_vhdx, open_vhdx_for_write


def _pyvhdi() -> Any:
    """libvhdi's module; only a test that reads through it is skipped without it."""
    return pytest.importorskip("pyvhdi", reason="libvhdi-python (PyPI) is the independent VHDX chain reader")


pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SIZE = 4 * MIB
SECTOR = 512


# ---------------------------------------------------------------------------------------- operations

_write = st.tuples(
    st.just("write"),
    st.integers(0, SIZE // SECTOR - 1),  # first sector
    st.integers(1, 2 * MIB // SECTOR),  # sectors
    st.integers(0, 255),  # fill byte (0 writes zeros on purpose)
    st.integers(0, SECTOR - 1),  # unaligned head, to exercise read-modify-write
)
_op = st.one_of(
    _write,
    _write,
    # a checkpoint, and the guest's first write after it (one sector somewhere)
    st.tuples(st.just("checkpoint"), st.integers(0, SIZE // SECTOR - 1)),
    st.tuples(st.just("checkpoint"), st.integers(0, SIZE // SECTOR - 1)),
    st.just(("apply",)),
    st.tuples(st.just("merge"), st.integers(0, 8)),  # which layer above the base to fold
)


@dataclass
class World:
    folder: Path
    fmt: str
    paths: list[str] = field(default_factory=list)  # base first
    views: list[bytearray] = field(default_factory=list)

    def writer(self) -> DiskWriter:
        leaf = self.paths[-1]
        return open_vhdx_for_write(leaf) if self.fmt == "vhdx" else open_qcow2_for_write(leaf)

    def do(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind == "write":
            _, sector, count, fill, head = op
            assert isinstance(sector, int) and isinstance(count, int) and isinstance(fill, int)
            assert isinstance(head, int)
            off = min(sector * SECTOR + head, SIZE - 1)
            n = min(count * SECTOR, SIZE - off)
            data = bytes([fill]) * n if fill % 3 else os.urandom(n)
            with self.writer() as w:
                w.write(off, data)
            self.views[-1][off : off + n] = data
        elif kind == "checkpoint":
            if len(self.paths) >= 6:
                return
            self.paths.append(checkpoint(self.paths[-1]))
            self.views.append(bytearray(self.views[-1]))
            sector = op[1]
            assert isinstance(sector, int)
            with self.writer() as w:
                w.write(sector * SECTOR, b"\xc5" * SECTOR)
            self.views[-1][sector * SECTOR : (sector + 1) * SECTOR] = b"\xc5" * SECTOR
        elif kind == "apply":
            if len(self.paths) < 2:
                return
            assert apply(self.paths[-1]) == self.paths[-2]
            self.paths.pop()
            self.views.pop()
        else:
            if len(self.paths) < 2:
                return
            pick = op[1]
            assert isinstance(pick, int)
            i = 1 + pick % (len(self.paths) - 1)  # the layer folded into paths[i - 1]
            assert merge(self.paths[i]) == os.path.abspath(self.paths[i - 1])
            event("merge of the leaf" if i == len(self.paths) - 1 else "merge of a middle layer")
            assert not os.path.exists(self.paths[i])
            self.views[i - 1] = self.views[i]
            del self.paths[i], self.views[i]

    def check_views(self, step: int) -> None:
        for i, (path, view) in enumerate(zip(self.paths, self.views, strict=True)):
            with open_image(path) as img:
                assert len(img.chain()) == i + 1, f"step {step}: {path} has the wrong chain"
                assert img.read(0, SIZE) == view, f"step {step}: layer {i} ({path}) reads wrong"
        left = sorted(os.listdir(self.folder))
        assert left == sorted(os.path.basename(p) for p in self.paths), f"step {step}: stray files {left}"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Examples run in their own folder, on tmpfs when there is one (fsync is slow on disk)."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="vmvault-prop-", dir=shm))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh(scratch: Path, name: str) -> Path:
    folder = scratch / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------------------------- oracles


def qemu_check(path: str) -> None:
    proc = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"qemu-img check {path}: {proc.stdout}{proc.stderr}"


def libvhdi_read(paths_leaf_first: list[str]) -> bytes:
    files = []
    for p in paths_leaf_first:
        f = _pyvhdi().file()
        f.open(p)
        files.append(f)
    try:
        for child, parent in itertools.pairwise(files):
            child.set_parent(parent)
        return bytes(files[0].read_buffer_at_offset(SIZE, 0))
    finally:
        for f in files:
            f.close()


def has_zero_state_in_differencing(path: str) -> bool:
    """libvhdi reads ZERO-state blocks of a differencing file from the parent: keep them out."""
    with open_image(path) as img:
        return img.parent is not None and any(e.kind is ExtentKind.ZERO for e in img.extents())


def sector_bitmaps_absent(path: str) -> bool:
    """Does a differencing VHDX lack any sector bitmap block? libvhdi (20260901) then takes
    bits from the start of the file as the bitmap: a file naming itself "vmvault" in its creator
    field reads one wrong sector at 64 KiB (bit 128 = the 'a' of "vmvault"). Such chains are
    compared with libvhdi only after a write has given every chunk its bitmap block."""
    with open_image(path) as img:
        if img.parent is None:
            return False
        info = img.info()
        lss, bs = int(str(info["logical_sector_size"])), int(str(info["block_size"]))
    geom = L.BatGeometry(SIZE, bs, lss, True)
    with open(path, "rb") as f:
        f.seek(0x30000)
        table = L.RegionTable.unpack(f.read(L.REGION_TABLE_SIZE))
        bat = next(e for e in table.entries if e.guid == L.BAT_REGION_GUID)
        for chunk in range(geom.sector_bitmap_blocks):
            f.seek(bat.file_offset + 8 * geom.bitmap_index(chunk))
            if int.from_bytes(f.read(8), "little") & 7 != L.SectorBitmapState.PRESENT:
                return True
    return False


def oracle_checks(world: World) -> None:
    if world.fmt == "vhdx":
        qemu_check(world.paths[0])  # the base: fixed or dynamic
        for i in range(len(world.paths)):
            chain = world.paths[: i + 1][::-1]
            if any(has_zero_state_in_differencing(p) or sector_bitmaps_absent(p) for p in chain):
                continue
            assert libvhdi_read(chain) == world.views[i], f"libvhdi reads layer {i} differently"
            event(f"libvhdi compared a chain of {len(chain)}")
    else:
        for i, path in enumerate(world.paths):
            qemu_check(path)
            out = str(world.folder / "qemu.raw")
            subprocess.run(["qemu-img", "convert", "-O", "raw", path, out], check=True, timeout=60)
            with open(out, "rb") as f:
                assert f.read() == world.views[i], f"qemu reads layer {i} ({path}) differently"
            os.unlink(out)
    for p in world.paths:
        assert detect_format(p) == world.fmt


# ---------------------------------------------------------------------------------------- the properties

_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(ops=st.lists(_op, min_size=4, max_size=16), fixed=st.booleans(), block_mib=st.sampled_from([1, 2]))
def test_vhdx_chain_matches_model(scratch: Path, ops: list[tuple[object, ...]], fixed: bool, block_mib: int) -> None:
    require_tool("qemu-img")
    folder = fresh(scratch, "vhdx")
    base = str(folder / "disk.vhdx")
    with create_vhdx(base, SIZE, block_size=block_mib * MIB, fixed=fixed) as w:
        w.write(0, b"MBR!" * 128)
    view = bytearray(SIZE)
    view[0:512] = b"MBR!" * 128
    world = World(folder, "vhdx", [base], [view])
    for step, op in enumerate(ops):
        world.do(op)
        world.check_views(step)
    oracle_checks(world)


@_SETTINGS
@given(ops=st.lists(_op, min_size=4, max_size=16), cluster_kib=st.sampled_from([4, 64]))
def test_qcow2_chain_matches_model(scratch: Path, ops: list[tuple[object, ...]], cluster_kib: int) -> None:
    require_tool("qemu-img")
    folder = fresh(scratch, "qcow2")
    base = str(folder / "disk.qcow2")
    with create_qcow2(base, SIZE, cluster_size=cluster_kib * 1024) as w:
        w.write(0, b"MBR!" * 128)
    view = bytearray(SIZE)
    view[0:512] = b"MBR!" * 128
    world = World(folder, "qcow2", [base], [view])
    for step, op in enumerate(ops):
        world.do(op)
        world.check_views(step)
    oracle_checks(world)


def test_libvhdi_quirk_without_sector_bitmap(scratch: Path) -> None:
    """The deviation the oracle works around (docs/design/disk-formats.md): an empty differencing
    file over a parent reads one wrong sector through libvhdi; vmvault and the spec say parent."""
    base = str(scratch / "disk.vhdx")
    with create_vhdx(base, SIZE, block_size=MIB):
        pass
    child = checkpoint(base)
    assert sector_bitmaps_absent(child)
    with open_image(child) as img:
        ours = img.read(0, SIZE)
    assert ours == bytes(SIZE)
    theirs = libvhdi_read([child, base])
    wrong = [off for off in range(0, SIZE, SECTOR) if theirs[off : off + SECTOR] != ours[off : off + SECTOR]]
    assert wrong == [64 * 1024], "libvhdi changed: revisit sector_bitmaps_absent()"
    with open(child, "rb") as f:
        f.seek(64 * 1024)
        assert theirs[64 * 1024 : 64 * 1024 + SECTOR] == f.read(SECTOR)  # the child's own header bytes


def test_libvhdi_ignores_parent_linkage2(scratch: Path) -> None:
    """A merge caught between the swap and deleting the checkpoint leaves a child that accepts its
    parent through parent_linkage2 only ([MS-VHDX] 2.6.2.6). vmvault reads it; libvhdi refuses
    ("mismatch in identifier"), so crash states are checked against the model, not libvhdi."""
    import uuid

    from vmvault.disk.vhdx import read_locator, set_locator

    base = str(scratch / "disk.vhdx")
    with create_vhdx(base, SIZE, block_size=MIB) as w:
        w.write(0, b"A" * SECTOR)
    child = checkpoint(base)
    with open_vhdx_for_write(child) as cw:
        cw.write(SECTOR, b"B" * SECTOR)
    with open_image(base) as img:
        guid = str(img.info()["data_write_guid"])
    keep = [(k, v) for k, v in read_locator(child).entries if k not in ("parent_linkage", "parent_linkage2")]
    set_locator(
        child, (("parent_linkage", "{" + str(uuid.uuid4()) + "}"), ("parent_linkage2", "{" + guid + "}"), *keep)
    )
    with open_image(child) as img:
        assert img.read(0, 2 * SECTOR) == b"A" * SECTOR + b"B" * SECTOR
    with pytest.raises(OSError, match="mismatch in identifier"):
        libvhdi_read([child, base])

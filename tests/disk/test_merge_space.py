"""The free space a merge needs (``chain.merge_space``): an upper bound for the merged parent
it writes, for every format and for parents with and without a parent of their own; a merge
the file system has no room for is refused before anything is written."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest

from vmvault.disk import chain, create_image, open_image
from vmvault.disk.base import DiskWriter
from vmvault.disk.qcow2 import create_qcow2
from vmvault.disk.vhd import create_vhd
from vmvault.disk.vhdx import create_vhdx
from vmvault.errors import ConfigError, SourceError

MIB = 1024 * 1024
SIZE = 64 * MIB


def scribble(w: DiskWriter, rng: random.Random, n: int = 20) -> None:
    for _ in range(n):
        off = rng.randrange(0, SIZE - 70_000) // 512 * 512
        w.write(off, rng.randbytes(rng.randrange(1, 65_536)))


def base_image(path: Path, fmt: str, kw: dict[str, Any]) -> DiskWriter:
    if fmt == "vhdx":
        return create_vhdx(str(path), SIZE, **kw)
    if fmt == "vhd":
        return create_vhd(str(path), SIZE, **kw)
    if fmt == "qcow2":
        return create_qcow2(str(path), SIZE, **kw)
    return create_image(str(path), "raw", SIZE)


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("vhdx", {}),
        ("vhdx", {"fixed": True}),
        ("vhdx", {"block_size": MIB}),
        ("qcow2", {}),
        ("qcow2", {"cluster_size": 4096}),
        ("raw", {}),
        ("vhd", {}),
        ("vhd", {"fixed": True}),
    ],
)
@pytest.mark.parametrize("depth", [1, 2])
def test_the_estimate_bounds_the_merged_file(tmp_path: Path, fmt: str, kw: dict[str, Any], depth: int) -> None:
    rng = random.Random(f"{fmt}{kw}{depth}")
    base = tmp_path / f"base.{fmt}"
    with base_image(base, fmt, kw) as w:
        scribble(w, rng)
    top = str(base)
    for _ in range(depth):
        top = chain.checkpoint(top)
        if not top.endswith(".avhd"):  # VHD has no in-place writer: an empty checkpoint
            with chain.open_for_write(top) as w:
                scribble(w, rng)
    need = chain.merge_space(top)
    with open_image(top) as img:
        assert img.parent is not None
        parent = img.parent.path
    chain.merge(top)
    st = os.stat(parent)
    assert need >= st.st_blocks * 512
    assert need >= 1 * MIB and need <= SIZE * 1.2 + 8 * MIB  # not absurdly loose either


def test_a_merge_without_room_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base.vhdx"
    with create_vhdx(str(base), SIZE, block_size=MIB) as w:
        w.write(0, b"a" * 3 * MIB)
    child = chain.checkpoint(str(base))
    with chain.open_for_write(child) as w:
        w.write(MIB, b"b" * MIB)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    need = chain.merge_space(child)
    real = os.statvfs

    class Tight:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize = st.f_frsize
            self.f_bavail = (need - 1) // st.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: Tight(real(p)))
    with pytest.raises(SourceError, match=rf"needs up to {need:,} bytes free in {tmp_path}, which has"):
        chain.merge(child)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert after == before  # no journal, no scratch file, nothing rewritten
    monkeypatch.setattr(os, "statvfs", real)
    assert chain.merge(child) == str(base) and not os.path.exists(child)


def test_a_base_image_has_nothing_to_merge(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_qcow2(str(base), SIZE).close()
    with pytest.raises(ConfigError, match="not a differencing image"):
        chain.merge_space(str(base))

"""bench/restore_limits.py's disk steps: every byte of the packs read, whole pieces written and
the scratch file gone, on file systems with and without ``O_DIRECT``."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("restore_limits")
    monkeypatch.setattr(module, "drop_caches", lambda: None)
    return module


@pytest.mark.parametrize("folder", ["tmp_path", "/dev/shm"])
def test_reads_and_writes_cover_every_byte(limits: ModuleType, tmp_path: Path, folder: str) -> None:
    where = tmp_path if folder == "tmp_path" else Path(folder)
    if not where.is_dir():
        pytest.skip(f"{folder} is not a folder here")
    work = where / f"restore-limits-{os.getpid()}"
    work.mkdir()
    try:
        sizes = [limits.PIECE * 2 + 4096, 4096, limits.PIECE]
        packs = []
        for n, size in enumerate(sizes):
            pack = work / f"pack{n}"
            pack.write_bytes(os.urandom(size))
            packs.append(pack)
        assert limits.read_files(packs) == sum(sizes)
        # whole pieces, as the restore's direct writes are; the file is gone afterwards
        assert limits.write_file(work / "w.tmp", limits.PIECE + 1) == 2 * limits.PIECE
        assert not (work / "w.tmp").exists()
        seconds = limits.timed_io(packs, work, limits.PIECE, reads=True, writes=True)
        assert 0 < seconds < 60 and sorted(p.name for p in work.iterdir()) == ["pack0", "pack1", "pack2"]
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()

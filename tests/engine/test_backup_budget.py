"""The backup pipeline's byte budget: what it holds (read batches, sealed chunks waiting for their
turn, packs being filled and written) stays within one budget whatever the timing."""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from tests.engine.helpers import MemoryDisk, ScriptedSource
from vmvault.backends.local import LocalBackend
from vmvault.engine import backup as backup_module
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.repo.budget import MemoryBudget
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 64 * 1024
PACK = 256 * 1024


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


class SlowPacks(LocalBackend):
    """Packs take a while to store: the writer is the pipeline's slowest stage, so read and
    sealed batches would pile up behind it without a budget."""

    def put_parts(self, name: str, parts: Sequence[bytes]) -> None:  # (put too: it calls this)
        if name.startswith("data/"):
            time.sleep(0.02)
        super().put_parts(name, parts)


class Recorded(MemoryBudget):
    made: ClassVar[list[MemoryBudget]] = []

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        Recorded.made.append(self)


def _disk(size: int) -> bytearray:
    rng = random.Random(5)
    data = bytearray(rng.randbytes(size))  # incompressible: sealed chunks as large as the data
    # the same chunk four times in a row: sealed twice in one batch, placed once
    data[CS : 5 * CS] = data[:CS] * 4
    return data


def test_pipeline_bytes_never_exceed_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = 1024 * 1024
    monkeypatch.setattr(backup_module, "BATCH_BYTES", 4 * CS)
    monkeypatch.setattr(backup_module, "BATCHES_BUDGET", batches)
    monkeypatch.setattr(backup_module, "MemoryBudget", Recorded)
    Recorded.made.clear()
    repo = Repository.init(SlowPacks(str(tmp_path / "repo")), b"passphrase", chunk_size=CS, pack_size=PACK)
    disk = MemoryDisk(_disk(12 * 1024 * 1024))
    limit = backup_module.pipeline_budget(PACK)
    assert limit == batches + 3 * PACK

    # the peak of what Python holds up to the snapshot's writing, when the pipeline is done (the
    # host's record of the repository is read after it with a 16 MiB read buffer, never filled)
    peaks: list[int] = []
    save_snapshot = Repository.save_snapshot

    def saving(self: Repository, snap: Snapshot) -> str:
        peaks.append(tracemalloc.get_traced_memory()[1])
        return save_snapshot(self, snap)

    monkeypatch.setattr(Repository, "save_snapshot", saving)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        snap = backup(repo, ScriptedSource(disk), workers=4).snapshot
    finally:
        tracemalloc.stop()
    peak = peaks[0] - base

    (budget,) = Recorded.made
    assert budget.limit == limit
    # what the budget counted: never over it, and everything given back
    assert 2 * PACK < budget.peak <= limit
    assert budget.used == 0
    # what Python really held (every thread's allocations, the disk's own copy excepted): the
    # budget, plus a pack that passes its size by a chunk and the repository's own bookkeeping;
    # without the budget (batches bounded by count only) this held 4.1 MiB
    assert peak <= limit + PACK + 512 * 1024, f"{peak / 2**20:.2f} MiB held, budget {limit / 2**20:.2f} MiB"

    restore(repo, snap, str(tmp_path / "out"))
    assert (tmp_path / "out" / "vda.raw").read_bytes() == bytes(disk.data)


def test_a_budget_smaller_than_one_batch_still_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # every take overruns the budget: it goes ahead once nothing is in flight or being written
    monkeypatch.setattr(backup_module, "BATCHES_BUDGET", 1)
    monkeypatch.setattr(backup_module, "MemoryBudget", Recorded)
    Recorded.made.clear()
    repo = Repository.init(SlowPacks(str(tmp_path / "repo")), b"passphrase", chunk_size=CS, pack_size=PACK)
    disk = MemoryDisk(_disk(2 * 1024 * 1024))
    snap = backup(repo, ScriptedSource(disk), workers=2).snapshot
    assert Recorded.made[0].used == 0
    restore(repo, snap, str(tmp_path / "out"))
    assert (tmp_path / "out" / "vda.raw").read_bytes() == bytes(disk.data)

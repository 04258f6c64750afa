"""An incremental backup reads the parent's index blocks it changes ahead of the block it
builds, several at once (one after another, each cost a round trip to the repository)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.engine.helpers import Far, ScriptedSource, SparseDisk
from vmvault.backends.memory import MemoryBackend
from vmvault.engine import backup as backup_module
from vmvault.engine.backup import _blocks_touched, backup
from vmvault.hypervisors.base import BackupOptions
from vmvault.repo.index_block import INDEX_SPAN
from vmvault.repo.repository import Repository

CS = 4096
#: the bytes one index block spans
BLOCK = INDEX_SPAN * CS


def test_the_parent_blocks_an_incremental_changes_are_read_several_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """24 index blocks, each changed a little, each parent block read from a repository 20 ms
    away: the reads overlap (one at a time before, 24 round trips in a row), and the
    incremental names the same blocks as a full backup of the same disk."""
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    blocks = 24
    rnd = random.Random(3)
    disk = SparseDisk(blocks * BLOCK, {b * BLOCK: rnd.randbytes(2 * CS) for b in range(blocks)})
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    source = ScriptedSource(disk)  # type: ignore[arg-type]
    backup(repo, source)
    for b in range(blocks):
        disk.pieces[b * BLOCK] = disk.pieces[b * BLOCK][:CS] + os.urandom(CS)
    source.changed = [(b * BLOCK + CS, CS) for b in range(blocks)]
    # the check of the parent's blocks before the session reads them several at once already:
    # left out, every read below is one the incremental makes to change a block
    monkeypatch.setattr(backup_module, "_broken_blocks", lambda *args, **kwargs: set())
    far = Far(repo.read_index_block)
    monkeypatch.setattr(repo, "read_index_block", far)
    second = backup(repo, source, workers=4).snapshot  # (4 reads at once whatever the cores)
    assert second.disks[0].stats["incremental"] == 1
    assert far.calls == blocks
    assert far.most >= 3, far.most
    monkeypatch.undo()
    full = backup(repo, source, BackupOptions(full=True)).snapshot
    assert second.disks[0].index == full.disks[0].index


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=12),
    st.integers(1, 16),
)
def test_blocks_touched_are_the_blocks_the_runs_fall_into(pairs: list[tuple[int, int]], span: int) -> None:
    runs, pos = [], 0
    for gap, length in pairs:  # ordered, disjoint runs, as an incremental plans them
        runs.append((pos + gap, pos + gap + length, "data"))
        pos += gap + length
    expected = sorted({c // span for first, end, _ in runs for c in range(first, end)})
    assert list(_blocks_touched(runs, span)) == expected

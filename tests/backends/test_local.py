"""The local backend's own behaviour beyond the contract (tests/backends/contract.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pagecache import cached_pages, page_cache_droppable
from vmvault.backends.local import LocalBackend


def test_a_written_object_leaves_the_page_cache_once_it_is_on_disk(tmp_path: Path) -> None:
    """A pack is written once and seldom read back: its pages go back to the kernel after the
    fsync instead of pushing the host's working set out of the cache."""
    if why := page_cache_droppable(tmp_path):
        pytest.skip(why)
    backend = LocalBackend(str(tmp_path / "repo"))
    data = os.urandom(8 << 20)
    backend.put("data/ab/" + "ab" * 32, data)
    (path,) = (p for p in (tmp_path / "repo").rglob("*") if p.is_file() and p.stat().st_size == len(data))
    assert cached_pages(path) == 0
    assert backend.get("data/ab/" + "ab" * 32) == data

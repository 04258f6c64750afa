"""Walks of folders someone else writes (vmvault.hypervisors.walk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmvault.errors import SourceError
from vmvault.hypervisors.walk import HINT_DISKS, regular_files


def test_regular_files_in_order_each_once_links_passed_over(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    for rel in ("z.txt", "a/1", "b/2", "b/deep/3"):
        (tmp_path / rel).write_bytes(rel.encode())
    os.link(tmp_path / "b" / "2", tmp_path / "b" / "2-again")
    os.symlink(tmp_path / "z.txt", tmp_path / "a" / "link")
    os.symlink(tmp_path / "b", tmp_path / "folder-link")
    os.mkfifo(tmp_path / "fifo")
    warnings: list[str] = []
    found = [os.path.relpath(p, tmp_path) for p, _ in regular_files([str(tmp_path), str(tmp_path / "b")], warnings)]
    assert found == ["z.txt", "a/1", "b/2", "b/deep/3"]  # files, then folders; hard link and second root once
    assert warnings == []


def test_a_walk_is_bounded_and_its_first_folder_must_list(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for i in range(3):
        (tmp_path / "sub" / f"f{i}").write_bytes(b"")
    assert len(list(regular_files([str(tmp_path)], [], limit=4))) == 3
    # the error names the folder whose listing went past the bound, and what it should hold
    with pytest.raises(SourceError, match=rf"^{tmp_path / 'sub'}: more than 3 files and folders; a VM folder holds"):
        list(regular_files([str(tmp_path)], [], limit=3))
    with pytest.raises(SourceError, match=r"more than 3 files and folders; a disk folder holds a few files per disk"):
        list(regular_files([str(tmp_path / "sub"), str(tmp_path)], [], limit=3, hint=HINT_DISKS))
    with pytest.raises(SourceError, match=r"missing: cannot list: No such file"):
        list(regular_files([str(tmp_path / "missing")], []))
    warnings: list[str] = []
    assert list(regular_files([str(tmp_path / "sub"), str(tmp_path / "missing")], warnings, limit=10))
    assert warnings == [f"{tmp_path / 'missing'}: cannot list: No such file or directory"]

"""File-level restore through the restore target: resuming after a failure, what is refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from tests.fsimages import GuestImages
from vmvault.backends.memory import MemoryBackend
from vmvault.engine import file_restore
from vmvault.engine.backup import backup
from vmvault.engine.file_restore import restore_files
from vmvault.engine.files import Location, SnapshotFiles
from vmvault.errors import ConfigError, GuestError, VmvaultError
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

pytest.importorskip("pytsk3", reason="pytsk3 is a dependency of vmvault (pyproject.toml)")


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


@pytest.fixture(scope="module")
def snapshot(guest_images: GuestImages) -> tuple[Repository, Snapshot]:
    repo = Repository.init(MemoryBackend(), b"passphrase")
    return repo, backup(repo, FilesSource(str(guest_images.container("mbr", "raw")))).snapshot


def test_a_failed_restore_keeps_completed_files_and_a_rerun_finishes_it(
    snapshot: tuple[Repository, Snapshot], guest_images: GuestImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, snap = snapshot
    _, tree = guest_images.filesystem("ext4")
    real = file_restore._restore_file
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise GuestError("the storage went away (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(file_restore, "_restore_file", failing)
    target = tmp_path / "out"
    locations = [Location("mbr.raw", 1, "/links"), Location("mbr.raw", 1, "/docs")]
    with SnapshotFiles(repo, snap) as files, pytest.raises(GuestError, match="simulated"):
        restore_files(files, locations, str(target))
    placed = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() and not p.is_symlink())
    assert len([p for p in placed if not p.startswith(".vmvault-restore-")]) == 2
    assert sorted(os.listdir(target / "links")) == ["abs", "escape", "rel"]
    monkeypatch.setattr(file_restore, "_restore_file", real)
    with SnapshotFiles(repo, snap) as files:
        result = restore_files(files, locations, str(target))
    assert len(result.kept) == 2 and result.files == 3 and result.links == 3
    assert os.readlink(target / "links" / "escape") == "../../../../outside"
    for guest in ("/docs/report.txt", "/docs/empty.txt", "/docs/Deep/nested/file.bin"):
        data = (target / guest.lstrip("/")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == tree[guest].sha256
    assert not [p for p in os.listdir(target) if p.startswith(".vmvault-restore-")]


def test_two_locations_with_one_name_are_refused_before_anything_is_made(
    snapshot: tuple[Repository, Snapshot], tmp_path: Path
) -> None:
    repo, snap = snapshot
    with SnapshotFiles(repo, snap) as files, pytest.raises(ConfigError, match="would both be restored as 'docs'"):
        restore_files(files, [Location("mbr.raw", 1, "/docs"), Location("mbr.raw", 5, "/DOCS")], str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_a_link_in_the_target_where_a_folder_goes_is_refused_before_writing(
    snapshot: tuple[Repository, Snapshot], tmp_path: Path
) -> None:
    repo, snap = snapshot
    target, elsewhere = tmp_path / "t", tmp_path / "elsewhere"
    (target / "docs").mkdir(parents=True)
    elsewhere.mkdir()
    (target / "docs" / "Deep").symlink_to(elsewhere)
    locations = [Location("mbr.raw", 1, "/hello.txt"), Location("mbr.raw", 1, "/docs")]
    with SnapshotFiles(repo, snap) as files, pytest.raises(VmvaultError, match="link"):
        restore_files(files, locations, str(target))
    assert os.listdir(elsewhere) == []
    assert sorted(os.listdir(target)) == ["docs"], "nothing was written before the refusal"
    assert sorted(os.listdir(target / "docs")) == ["Deep"]


def test_a_link_where_an_empty_folder_goes_is_refused_before_writing(
    snapshot: tuple[Repository, Snapshot], tmp_path: Path
) -> None:
    repo, snap = snapshot
    target, elsewhere = tmp_path / "t", tmp_path / "elsewhere"
    target.mkdir()
    elsewhere.mkdir()
    (target / "emptydir").symlink_to(elsewhere)
    locations = [Location("mbr.raw", 1, "/hello.txt"), Location("mbr.raw", 1, "/emptydir")]
    with SnapshotFiles(repo, snap) as files, pytest.raises(VmvaultError, match="link"):
        restore_files(files, locations, str(target))
    assert sorted(os.listdir(target)) == ["emptydir"], "nothing was written before the refusal"

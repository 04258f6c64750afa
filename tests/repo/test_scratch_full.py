"""A full cache folder while check, prune, stats, ``repair snapshots`` and copy fill their
scratch database: a one-line RepositoryError saying what to do (before, SQLite's error came
out as a traceback), the scratch files gone, and with space again every command succeeds and
every snapshot reads back. A real tmpfs, filled to its last few KiB."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import small_tmpfs
from tests.repo.builders import PASS, Content, backup, disk_image, make_repo, read_disk, reopen
from vmvault.backends.local import LocalBackend
from vmvault.engine.copy import copy_snapshots
from vmvault.errors import RepositoryError
from vmvault.repo.check import check
from vmvault.repo.index_cache import IndexCache
from vmvault.repo.prune import forget_ids, prune
from vmvault.repo.repair import repair_snapshots
from vmvault.repo.repository import Repository
from vmvault.repo.usage import usage

ROOT = Path(__file__).resolve().parents[2]


def _fill(folder: Path, leave: int) -> Path:
    """A file taking all but ``leave`` bytes of ``folder``'s file system."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    with filler.open("wb") as f:
        f.write(bytes(max(0, stat.f_bavail * stat.f_frsize - leave)))
    return filler


def _scratch_files(cache: Path) -> list[str]:
    return [p.name for p in cache.rglob("*") if ".scratch-" in p.name]


@pytest.mark.integration
def test_a_full_cache_folder_is_a_clear_error_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(LocalBackend(str(tmp_path / "repo")), pack_size=1 << 20)
    disks = [disk_image(seed, 6_000) for seed in (1, 2)]
    first = backup(repo, Content(disks={"sda": disks[0]}))
    backup(repo, Content(disks={"sda": disks[1]}), span=64)
    with small_tmpfs(tmp_path / "cache", "16m") as cache:
        monkeypatch.setenv("VMVAULT_CACHE_DIR", str(cache))
        repo = reopen(repo)
        repo.load_index()  # this host's cache, built while there is room
        target = make_repo(LocalBackend(str(tmp_path / "target")), pack_size=1 << 20)
        target.load_index()
        filler = _fill(cache, leave=256 * 1024)
        commands: dict[str, Callable[[], object]] = {
            "check": lambda: check(repo),
            "stats": lambda: usage(repo, repo.list_snapshots(summaries=True)),
            "repair snapshots": lambda: repair_snapshots(repo, dry_run=True),
            "prune": lambda: prune(repo, max_unused=0.0),
            "copy": lambda: copy_snapshots(repo, target),
        }
        for name, run in commands.items():
            with pytest.raises(RepositoryError, match=r"scratch database in .*VMVAULT_CACHE_DIR") as err:
                run()
            assert "\n" not in str(err.value), name
            assert _scratch_files(cache) == [], name

        # the command line: one line, exit 1, no traceback
        env = {**os.environ, "VMVAULT_PASSWORD": PASS.decode(), "PYTHONPATH": str(ROOT / "src")}
        cli = subprocess.run(
            [sys.executable, "-m", "vmvault", "-r", str(tmp_path / "repo"), "check"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 1, cli.stderr
        assert "Traceback" not in cli.stderr and cli.stderr.count("\n") == 1, cli.stderr
        assert "scratch database" in cli.stderr

        # room again: nothing was lost, and every command works
        filler.unlink()
        assert forget_ids(repo, [first.id]) == [first.id]
        pruned = prune(repo, max_unused=0.0)
        assert pruned.blobs_removed > 0 and pruned.packs_deleted > 0
        assert check(reopen(repo)).ok
        copied = copy_snapshots(repo, target)
        assert len(copied.copied) == 1
    kept = reopen(repo)
    (snap,) = kept.list_snapshots()
    assert read_disk(kept, snap.disks[0]) == disks[1]
    target = Repository.open(target.backend, PASS)
    (copy,) = target.list_snapshots()
    assert read_disk(target, copy.disks[0]) == disks[1]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (sqlite3.OperationalError("database or disk is full"), r"scratch database in .*full\. .*VMVAULT_CACHE_DIR"),
        (sqlite3.OperationalError("database is locked"), r"scratch database in .*: database is locked$"),
        (sqlite3.DatabaseError("database disk image is malformed"), r"is damaged .*remove that file"),
        (sqlite3.ProgrammingError("Incorrect number of bindings supplied"), None),
        (sqlite3.IntegrityError("NOT NULL constraint failed: pairs.v"), None),
    ],
)
def test_what_an_sqlite_error_in_a_scratch_database_becomes(
    tmp_path: Path, error: sqlite3.Error, expected: str | None
) -> None:
    """A full folder, a lock and damage are the user's to act on (one line saying what to do);
    a misuse of SQLite (a bug) keeps its own exception and traceback. The scratch file goes."""
    cache = IndexCache("ab" * 16, "file:///somewhere", root=str(tmp_path))
    raised = pytest.raises(RepositoryError, match=expected) if expected else pytest.raises(type(error))
    with raised as caught, cache.scratch():
        raise error
    assert caught.value is not None and "\n" not in str(caught.value)
    assert _scratch_files(tmp_path) == []

"""This host's caches listed and removed (repo/host_cache.py, ``vmvault cache``): an entry
holds its index cache, snapshots' and blocks' copies; one in use by an open repository is
never removed; a process opening a cache while it is removed waits and then builds a new one;
nothing but the names of entries is removed and no link is followed; listing changes no time;
temporary caches killed commands left are found and removed unless held."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from tests.engine.helpers import ScriptedSource, SparseDisk
from tests.repo.builders import PASS
from tests.repo.test_fetch import Watched
from vmvault import platform
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.repo import host_cache
from vmvault.repo.index_block import INDEX_SPAN
from vmvault.repo.index_cache import USE_SUFFIX, IndexCache, hold_in_use, lock_unused
from vmvault.repo.repository import Repository

CS = 4096


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _backed_up(root: Path) -> tuple[Watched, Repository, ScriptedSource]:
    """A disk of two index blocks backed up into a repository whose host caches are ``root``;
    the repository is left open."""
    rnd = random.Random(3)
    block = INDEX_SPAN * CS
    disk = SparseDisk(2 * block, {b * block: rnd.randbytes(2 * CS) for b in range(2)})
    backend = Watched()
    repo = Repository.init(backend, PASS, chunk_size=CS, cache_root=str(root))
    source = ScriptedSource(disk)  # type: ignore[arg-type]
    backup(repo, source)
    return backend, repo, source


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_an_entry_lists_its_three_kinds_and_is_removed_only_when_unused(tmp_path: Path) -> None:
    root = tmp_path / "host"
    backend, repo, source = _backed_up(root)
    (found,) = host_cache.entries(str(root))
    assert found.repository == repo.config.id and found.location == backend.url
    assert set(found.sizes) == {"index", "snapshots", "blocks"} and all(found.sizes.values())
    assert found.in_use is True and time.time() - found.last_used < 60
    before = _files(root)

    assert host_cache.remove_entry(found.name, str(root)) is False  # the open repository holds it
    assert _files(root) == before

    repo.close()
    (found,) = host_cache.entries(str(root))
    assert found.in_use is False
    assert host_cache.remove_entry(found.name, str(root)) is True
    assert host_cache.entries(str(root)) == []
    assert [f for f in _files(root) if f.count(os.sep) > 0] == []  # only the empty kind folders stay

    # the next command builds what it needs again, and reads the storage for it
    again = Repository.open(backend, PASS, cache_root=str(root))
    backend.reads.clear()
    restore(again, again.list_snapshots()[0], str(tmp_path / "out"))
    disk = source.disk
    assert isinstance(disk, SparseDisk)
    assert (tmp_path / "out" / "vda.raw").read_bytes() == disk.read(0, disk.size)
    assert backend.reads
    again.close()
    (rebuilt,) = host_cache.entries(str(root))
    assert set(rebuilt.sizes) >= {"index", "blocks"}


def test_a_process_opening_the_cache_during_a_removal_waits_then_builds_a_new_one(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    cache = IndexCache("ab" * 16, "memory://x", root=str(tmp_path))
    db = cache.path
    cache.discard()
    held = lock_unused(db)
    assert held is not None
    got: list[int | None] = []
    opener = threading.Thread(target=lambda: got.append(hold_in_use(db)))
    opener.start()
    time.sleep(0.3)
    assert opener.is_alive()  # waiting for the removal
    for name in os.listdir(folder):
        os.unlink(folder / name)
    os.close(held)
    opener.join(10)
    assert not opener.is_alive() and got[0] is not None
    assert platform.same_file(os.fstat(got[0]), os.lstat(db + USE_SUFFIX))  # the new file, not the removed one
    assert lock_unused(db) is None  # and it holds it
    os.close(got[0])


def test_a_removal_holds_the_cache_until_its_use_file_goes_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file is removed while the exclusive lock is held (an opener waits), the ``.use``
    file last: an opener never finds half a cache."""
    root = tmp_path / "host"
    _backend, repo, _source = _backed_up(root)
    repo.close()
    (found,) = host_cache.entries(str(root))
    db = str(root / "index" / f"{found.name}.sqlite")
    (root / "index" / f"{found.name}.sqlite.scratch-999999999-abcd").write_bytes(b"left by a killed prune")
    removed: list[tuple[str, bool | None]] = []
    real_unlink = os.unlink

    def watched_unlink(path: str, *args: object, **kwargs: object) -> None:
        removed.append((os.path.basename(path), host_cache._in_use(db)))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(host_cache.os, "unlink", watched_unlink)
    assert host_cache.remove_entry(found.name, str(root)) is True
    monkeypatch.undo()
    names = [name for name, _held in removed]
    assert names[-1] == f"{found.name}.sqlite.use" and names[0] == f"{found.name}.sqlite"
    assert f"{found.name}.sqlite.scratch-999999999-abcd" in names
    assert all(held for _name, held in removed)  # locked through every removal
    assert os.listdir(root / "index") == []


def test_listing_changes_no_time_and_makes_no_file(tmp_path: Path) -> None:
    root = tmp_path / "host"
    _backend, repo, _source = _backed_up(root)
    repo.close()
    for path in root.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000), follow_symlinks=False)
    before = {str(p): p.lstat().st_mtime for p in root.rglob("*")}
    for _ in range(2):
        (found,) = host_cache.entries(str(root))
        assert found.last_used == 1_000_000_000 and found.location == "watched://"
    assert {str(p): p.lstat().st_mtime for p in root.rglob("*")} == before


def test_only_entries_are_removed_and_no_link_is_followed(tmp_path: Path) -> None:
    root = tmp_path / "host"
    _backend, repo, _source = _backed_up(root)
    repo.close()
    (found,) = host_cache.entries(str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    # the blocks folder replaced by a link to a folder of the user's own
    blocks = root / "blocks" / found.name
    for item in blocks.iterdir():
        item.unlink()
    blocks.rmdir()
    blocks.symlink_to(outside)
    (root / "notes.txt").write_text("mine")
    (root / "index" / "other.sqlite").write_text("not an entry")
    (root / "snapshots" / "backup-of-something").mkdir()

    assert host_cache.remove_entry(found.name, str(root)) is True
    assert (outside / "precious").read_text() == "keep me"
    assert not os.path.lexists(blocks)
    assert (root / "notes.txt").exists() and (root / "index" / "other.sqlite").exists()
    assert (root / "snapshots" / "backup-of-something").is_dir()
    for bad in ("../outside", "notes.txt", f"{found.name}/..", ""):
        with pytest.raises(ValueError):
            host_cache.remove_entry(bad, str(root))


def test_a_cache_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _backend, repo, _source = _backed_up(real)
    repo.close()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OSError, match="not a folder"):
        host_cache.entries(str(link))
    with pytest.raises(OSError, match="not a folder"):
        host_cache.remove_entry(host_cache.entries(str(real))[0].name, str(link))
    assert len(host_cache.entries(str(real))) == 1
    assert host_cache.entries(str(tmp_path / "none")) == []


def test_temporary_caches_left_by_killed_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command whose cache folder cannot be used builds one in the temporary folder; killed,
    it leaves it behind. ``leftovers`` finds those no process holds."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    unusable = tmp_path / "file"
    unusable.write_text("a file where the cache folder should be")
    held = IndexCache("cd" * 16, "memory://held", root=str(unusable))
    left = IndexCache("ef" * 16, "memory://left", root=str(unusable))
    assert held.warnings and left.warnings
    left_folder = os.path.dirname(left.path)
    left._release()  # killed: its folder stays, nobody holds it
    assert host_cache.leftovers() == []  # for ten minutes: a command may be making one
    old = time.time() - 3600
    for folder in (Path(left_folder), Path(held.path).parent):
        for item in [folder, *folder.iterdir()]:
            os.utime(item, (old, old))
    found = host_cache.leftovers()  # the held one, as old, is not among them: its lock says so
    assert [path for path, _size, _newest in found] == [left_folder]
    assert host_cache.remove_leftover(left_folder) is True and not os.path.exists(left_folder)
    assert host_cache.leftovers() == []
    held.discard()
    assert os.listdir(tmp_path / "tmp") == []


def test_a_cache_collected_without_being_closed_is_no_longer_held(tmp_path: Path) -> None:
    """The use lock goes with the object (a long-lived process that drops a repository without
    closing it keeps no descriptor and no lock)."""
    import gc

    cache = IndexCache("12" * 16, "memory://dropped", root=str(tmp_path))
    db = cache.path
    assert lock_unused(db) is None
    del cache
    gc.collect()
    fd = lock_unused(db)
    assert fd is not None
    os.close(fd)


def test_without_locks_the_cache_works_and_is_not_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that takes no locks: the cache is used all the same, at once (not after
    a hundred tries), and holds no descriptor."""
    import errno

    calls: list[int] = []

    def refuse(fd: int, *, wait: bool) -> bool:
        calls.append(fd)
        raise OSError(errno.ENOLCK, "no locks here")

    monkeypatch.setattr(platform, "lock_shared", refuse)
    cache = IndexCache("34" * 16, "memory://nolocks", root=str(tmp_path))
    assert len(calls) == 1 and cache._use is None and not cache.warnings
    assert cache.pack_count() == 0
    cache.discard()

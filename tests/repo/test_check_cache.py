"""check and this host's index cache (repository-format.md, sections 10.7 and 12.6).

Check verifies the repository, and the index files are its truth; the cache is a local copy
of what they said when this host read them. A cache that says something else (damaged in a
way SQLite does not see, or written by someone else) must not make check report the
repository from its view, and an index file damaged in storage after this host read it must
be reported and no longer used by this host. Each test compares check's report with the one
a host that never saw the repository (a fresh cache) gets.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from pathlib import Path

import pytest

from tests.repo.builders import PASS, Content, backup, disk_image, make_repo, restore_all
from vmvault.backends.local import LocalBackend
from vmvault.repo import check
from vmvault.repo.check import CheckReport
from vmvault.repo.crypto import seal_envelope
from vmvault.repo.index import IndexFile
from vmvault.repo.repository import Repository

T0 = dt.datetime(2025, 5, 1, tzinfo=dt.UTC)


def _two_vms(tmp_path: Path, chunks: int = 30) -> tuple[Repository, list[str], list[Content]]:
    """Two VMs backed up one after the other (each into index files of its own)."""
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    contents = [Content(disks={"d": disk_image(seed, chunks, zero_every=0)}) for seed in (1, 2)]
    snaps = [backup(repo, c, location=f"vm{n}", time=T0 + dt.timedelta(hours=n)) for n, c in enumerate(contents)]
    repo.load_index()
    return repo, [s.id for s in snaps], contents


def _open(tmp_path: Path, cache: str | None = None) -> Repository:
    root = None if cache is None else str(tmp_path / cache)
    return Repository.open(LocalBackend(str(tmp_path / "repo")), PASS, cache_root=root)


def _edit_cache(repo: Repository, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Change this host's cache behind vmvault's back (the repository object closed first)."""
    path = repo.index.cache.path
    repo.close()
    db = sqlite3.connect(path)
    for sql, args in statements:
        db.execute(sql, args)
    db.commit()
    db.close()


def _errors(report: CheckReport) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """What a report says is damaged, and what that affects, comparable between hosts."""
    return sorted((p.kind, p.object, sorted((a.snapshot, a.name) for a in p.affects)) for p in report.errors)


def _rebuilt(report: CheckReport) -> list[str]:
    return [p.message for p in report.warnings if p.kind == "index-cache-rebuilt"]


def test_a_cache_row_moved_to_another_pack_does_not_hide_what_a_lost_pack_affects(tmp_path: Path) -> None:
    """A pack is deleted from storage, and this host's cache says its blobs are in another pack
    that is there. Trusted, check reported the missing pack but not the snapshot it damages."""
    repo, snaps, _contents = _two_vms(tmp_path)
    first = repo.load_snapshot(snaps[0])
    block = first.disks[0].index[0]
    assert block is not None
    lost = repo.index.lookup(bytes.fromhex(block))
    assert lost is not None
    other = next(p for p in repo.index.packs() if p != lost.pack_id)
    numbers = {bytes(i): n for n, i in sqlite3.connect(repo.index.cache.path).execute("SELECT no, id FROM packs")}
    (tmp_path / "repo" / "data" / lost.pack_id.hex()[:2] / lost.pack_id.hex()).unlink()
    _edit_cache(repo, ("UPDATE blobs SET pack = ? WHERE pack = ?", (numbers[other], numbers[lost.pack_id])))

    report = check(_open(tmp_path))
    fresh = check(_open(tmp_path, "fresh"))
    assert _errors(report) == _errors(fresh)
    (missing,) = [p for p in report.errors if p.kind == "pack-missing"]
    assert missing.object_id == lost.pack_id.hex()
    assert snaps[0] in {a.snapshot for a in missing.affects}
    assert snaps[0] in report.damaged_snapshots
    (why,) = _rebuilt(report)
    assert "the rows of index/" in why
    assert not _rebuilt(fresh)


def test_a_cache_row_with_a_wrong_offset_is_a_cache_problem_not_damage(tmp_path: Path) -> None:
    """One row says a blob starts elsewhere in its pack: the repository is whole, the cache is
    not. Check says so (a warning naming the index file whose rows differ), rebuilds the cache,
    and the next check finds nothing."""
    repo, snaps, contents = _two_vms(tmp_path)
    blob_id, row = next(repo.index.cache.iter_live())
    file_id = repo.index.cache.file_id(row.file)
    assert file_id is not None
    _edit_cache(repo, ("UPDATE blobs SET offset = offset + 1 WHERE id = ?", (blob_id,)))

    again = _open(tmp_path)
    report = check(again)
    assert report.ok, _errors(report)
    (why,) = _rebuilt(report)
    assert f"the rows of index/{file_id.hex()}" in why
    assert not _rebuilt(check(again))
    for snap_id, content in zip(snaps, contents, strict=True):
        assert restore_all(again, again.load_snapshot(snap_id)) == content


def test_cache_rows_for_a_pack_no_index_file_names_do_not_hide_missing_blobs(tmp_path: Path) -> None:
    """The index files stop naming a pack (the storage put back an index that lacks it), while
    this host's cache still lists the pack's blobs under a live file. Trusted, check found
    every chunk "indexed" and called the repository healthy; another host cannot find them."""
    repo, snaps, _contents = _two_vms(tmp_path)
    packs = repo.index.packs()
    dropped = next(iter(packs))
    old_files = list(repo.index_file_ids())
    rewritten = IndexFile(version=2, supersedes=old_files)
    for file_id in old_files:
        found = repo.read_index_file(file_id)
        for pack_id, entries in found.packs.items():
            if pack_id != dropped:
                rewritten.packs[pack_id] = entries
                rewritten.lengths[pack_id] = found.lengths.get(pack_id, 0)
    new_id = repo.write_index_file(rewritten)
    for file_id in old_files:
        repo.backend.delete(f"index/{file_id.hex()}")
    repo.load_index()
    cache = sqlite3.connect(repo.index.cache.path)
    new_no = cache.execute("SELECT no FROM files WHERE id = ?", (new_id,)).fetchone()[0]
    pack_no = cache.execute("SELECT no FROM packs WHERE id = ?", (dropped,)).fetchone()[0]
    cache.close()
    plant = [
        (
            "INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?)",
            (e.id, new_no, pack_no, int(e.type), e.offset, e.length, e.raw_length),
        )
        for e in packs[dropped]
    ]
    _edit_cache(repo, *plant)

    report = check(_open(tmp_path))
    fresh = check(_open(tmp_path, "fresh"))
    assert not fresh.ok
    assert _errors(report) == _errors(fresh)
    assert any(p.kind == "blob-missing" and p.affects for p in report.errors)
    assert report.damaged_snapshots and set(report.damaged_snapshots) <= set(snaps)
    assert any(p.kind == "orphan-pack" and p.object_id == dropped.hex() for p in report.warnings)
    (why,) = _rebuilt(report)
    assert f"index/{new_id.hex()}" in why


def _damage_index_file(tmp_path: Path, repo: Repository, how: str) -> bytes:
    """Damage one index file in storage, its size kept: garbage, or the bytes of another valid
    index file of that size put under its name (one listing the same packs with other recorded
    lengths, sealed under its own name). Returns the damaged file's id."""
    victim = sorted((tmp_path / "repo" / "index").iterdir())[0]
    size = victim.stat().st_size
    if how == "garbage":
        victim.write_bytes(os.urandom(size))
        return bytes.fromhex(victim.name)
    original = repo.read_index_file(bytes.fromhex(victim.name))
    for extra in range(1, 1000):
        lengths = {pack_id: length + extra for pack_id, length in original.lengths.items()}
        donor = IndexFile(version=original.version, packs=original.packs, lengths=lengths)
        sealed = seal_envelope(repo.key, donor.encode(), f"index/{donor.file_id().hex()}".encode())
        if len(sealed) == size:
            victim.write_bytes(sealed)
            return bytes.fromhex(victim.name)
    raise AssertionError("no other index file of the same size")


@pytest.mark.parametrize("found_by", ["check", "sync"])
@pytest.mark.parametrize("how", ["garbage", "renamed"])
def test_an_index_file_damaged_with_its_size_kept_is_reported_and_no_longer_used(
    tmp_path: Path, how: str, found_by: str
) -> None:
    """An index file this host has read is replaced in storage, its size kept: by garbage, or
    by another valid index file's bytes. Check reports it (as a host with a fresh cache does)
    and makes this host's cache forget it (damage the listing does not show); the next sync
    notices a file written again by the listing's stamp (a local folder's times and inode)
    and reads it again. Either way the
    file is reported by name, and a backup on this host stores again what only it listed.
    Another file written again with the same bytes is read again and kept."""
    repo, snaps, contents = _two_vms(tmp_path, 12)
    victim = _damage_index_file(tmp_path, repo, how)
    rewritten = sorted((tmp_path / "repo" / "index").iterdir())[1]
    rewritten.write_bytes(rewritten.read_bytes())
    only_there = [e.id for entries in repo.index.packs().values() for e in entries]
    if found_by == "check":
        # damage that leaves the listing as it was (bit rot, a storage that stamps nothing, or
        # times put back over SFTP): the sync cannot see it
        listing = [(o.stamp, bytes.fromhex(o.name[6:])) for o in repo.backend.list("index/")]
        _edit_cache(repo, *(("UPDATE files SET stamp = ? WHERE id = ?", row) for row in listing))
    repo.close()

    again = _open(tmp_path)
    if found_by == "check":
        report = check(again)
        fresh = check(_open(tmp_path, "fresh"))
        assert _errors(report) == _errors(fresh)
        (damaged,) = [p for p in report.errors if p.kind == "index-file-damaged"]
        assert damaged.object == f"index/{victim.hex()}"
        assert any(p.kind == "blob-missing" and p.affects for p in report.errors)
        assert report.damaged_snapshots
        (forgot,) = [p for p in report.warnings if p.kind == "index-cache-forgot"]
        assert f"index/{victim.hex()}" in forgot.message
    # this host no longer uses what the damaged file listed: its next sync reports the file
    # (and only it), and a backup stores again what only that file listed
    (problem,) = again.load_index()
    assert f"index/{victim.hex()}" in problem
    lost = [b for b in only_there if b not in again.index]
    assert lost
    for n, content in enumerate(contents):
        backup(again, content, location=f"vm{n}", time=T0 + dt.timedelta(days=1, hours=n))
    assert all(b in again.index for b in lost)
    again.close()
    elsewhere = _open(tmp_path, "elsewhere")
    for snap in elsewhere.list_snapshots():
        if snap.id not in snaps:
            n = int(snap.source["location"][2:])
            assert restore_all(elsewhere, snap) == contents[n]

"""forget + prune: what remains restores identically, what is gone is gone, dry runs change nothing."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.repo.builders import (
    Content,
    KeepsOtherBytes,
    WatchedPacks,
    WholeSnapshots,
    backup,
    disk_image,
    make_repo,
    reopen,
    restore_all,
    storage_bytes,
)
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import IntegrityError, LockedError, SnapshotNotFoundError
from vmvault.repo import RetentionPolicy, check, forget, forget_ids, prune, repair_index, repair_snapshots
from vmvault.repo.crypto import seal_envelope
from vmvault.repo.index import IndexFile
from vmvault.repo.repository import Repository
from vmvault.repo.rewrite import IndexFileWriter

T0 = dt.datetime(2025, 3, 1, 12, tzinfo=dt.UTC)


def state(repo: Repository) -> dict[str, bytes]:
    """Every object but locks, with its bytes."""
    return {o.name: repo.backend.get(o.name) for o in repo.backend.list("") if not o.name.startswith("locks/")}


def history(repo: Repository, n: int = 5) -> list[tuple[str, Content]]:
    """n daily snapshots of one VM; each day changes some chunks and shares the rest."""
    base = disk_image(1, 40)
    out = []
    for day in range(n):
        disk = bytearray(base)
        changed = disk_image(100 + day, 8, zero_every=0)
        disk[day * 8 * 4096 : (day + 1) * 8 * 4096] = changed
        content = Content(disks={"sda": bytes(disk)}, files={"vm.conf": f"day {day}\n".encode() * 50})
        snap = backup(repo, content, time=T0 + dt.timedelta(days=day))
        out.append((snap.id, content))
    return out


def test_forget_prune_keeps_remaining_identical_and_shrinks(local_repo: Repository) -> None:
    repo = local_repo
    hist = history(repo)
    other = backup(repo, Content(disks={"hda": disk_image(7, 12)}), location="vm2", time=T0)
    before = storage_bytes(repo.backend, "data/")

    fr = forget(repo, RetentionPolicy(last=2))
    assert set(fr.removed) == {sid for sid, _c in hist[:3]}
    assert set(fr.kept) == {hist[3][0], hist[4][0], other.id}

    report = prune(repo, max_unused=0.0)
    assert report.blobs_removed > 0 and report.packs_deleted > 0
    after = storage_bytes(repo.backend, "data/")
    assert after < before and report.bytes_after == after

    fresh = reopen(repo)
    for sid, content in hist[3:]:
        assert restore_all(fresh, fresh.load_snapshot(sid)) == content
    assert restore_all(fresh, fresh.load_snapshot(other.id)).disks == {"hda": disk_image(7, 12)}
    # every blob left is one the remaining snapshots use (max_unused=0 repacks everything partial)
    from vmvault.repo.prune import referenced_blobs

    used = referenced_blobs(fresh, fresh.list_snapshots())
    assert {b for b, _loc in fresh.index.items()} == used
    result = check(fresh, read_data=True)
    assert result.ok and not result.warnings, result.to_dict()
    # a second prune has nothing to do
    again = prune(fresh)
    assert again.packs_deleted == 0 and again.index_files_written == 0


def test_dry_run_changes_nothing(local_repo: Repository) -> None:
    repo = local_repo
    history(repo, 3)
    listing = state(repo)
    fr = forget(repo, RetentionPolicy(last=1), dry_run=True)
    assert len(fr.to_dict()["removed"]) == 2 and not fr.removed
    pr = prune(repo, dry_run=True)
    assert pr.dry_run and pr.packs_deleted == 0  # nothing is unused before forget
    assert state(repo) == listing
    forget(repo, RetentionPolicy(last=1))
    listing = state(repo)
    pr = prune(repo, dry_run=True, max_unused=0.0)
    assert pr.packs_deleted > 0 and pr.blobs_removed > 0
    assert state(repo) == listing


def test_packs_decided_page_by_page_as_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prune reads its per-pack figures a page at a time (memory bounded by a page, not the
    number of packs): with pages of two packs it decides as with pages of 10,000."""
    prune_module = importlib.import_module("vmvault.repo.prune")  # the package exports the function
    repo = make_repo(MemoryBackend())
    history(repo, 4)
    forget(repo, RetentionPolicy(last=1))
    whole = prune(repo, dry_run=True, max_unused=0.0).to_dict()
    assert whole["packs_before"] > 6 and whole["packs_deleted"] > 2
    monkeypatch.setattr(prune_module, "_BATCH", 2)
    paged = prune(repo, dry_run=True, max_unused=0.0).to_dict()
    assert paged == whole
    report = prune(repo, max_unused=0.0)
    assert report.packs_deleted == whole["packs_deleted"] and check(reopen(repo), read_data=True).ok


def test_forget_everything_then_prune_empties_data() -> None:
    repo = make_repo(MemoryBackend())
    history(repo, 2)
    forget(repo, RetentionPolicy(last=1, group_by=("location", "host")))
    for s in repo.list_snapshots():
        repo.delete_snapshot(s.id)
    report = prune(repo)
    assert report.packs_after == 0 and report.bytes_after == 0
    assert list(repo.backend.list("data/")) == []
    assert len(list(repo.backend.list("index/"))) == 1
    assert check(repo).ok


def copies(repo: Repository) -> int:
    """How many copies of blobs the index lists (a blob in two packs: two)."""
    return sum(len(repo.index.locations(blob_id)) for blob_id, _loc in repo.index.items())


def test_orphan_packs_and_duplicates_are_removed() -> None:
    repo = make_repo(MemoryBackend())
    hist = history(repo, 2)
    # a killed backup: a pack uploaded, its index never written
    writer = repo.writer(index_every=1 << 20)
    from vmvault.repo.format import BlobType

    payload = b"orphan" * 1000
    writer.add(BlobType.DATA, repo.key.chunk_id(payload), payload)
    with writer._lock:  # upload the pack but skip the index file
        builder = writer._builder
    pack_id, data = builder.finish(repo.key)
    from vmvault.repo.pack import pack_name

    repo.backend.put(pack_name(pack_id), data)
    writer.close(flush=False)
    # a concurrent backup stored the same chunks again (dedup raced): duplicate packs
    backup(repo, hist[1][1], time=T0 + dt.timedelta(days=9), dedup=False)
    res = check(reopen(repo))
    assert res.ok and [p.kind for p in res.warnings] == ["orphan-pack"]
    assert copies(reopen(repo)) > len(list(repo.index.items()))
    report = prune(repo, max_unused=0.0)  # every pack holding a dropped copy is repacked
    assert report.orphan_packs == 1
    res = check(reopen(repo), read_data=True)
    assert res.ok and not res.warnings
    fresh = reopen(repo)
    assert copies(fresh) == len(list(fresh.index.items()))  # one copy of each blob stays
    for sid, content in hist:
        assert restore_all(fresh, fresh.load_snapshot(sid)) == content


def test_a_pack_listed_by_two_live_index_files_counts_each_blob_once() -> None:
    """A killed prune or repair leaves packs listed twice: the second listing changes no
    figure of prune's accounting, and prune still keeps every snapshot whole."""
    repo = make_repo(MemoryBackend())
    hist = history(repo, 4)
    forget(repo, RetentionPolicy(last=2))
    figures = ("blobs_used", "blobs_removed", "bytes_removed", "packs_deleted", "packs_repacked", "blobs_repacked")
    once = prune(repo, dry_run=True, max_unused=0.0)
    assert once.blobs_removed and once.packs_repacked
    again = IndexFile(version=repo.index_version)
    for file_id in repo.index.cache.live_files():
        listed = repo.read_index_file(file_id)
        again.packs.update(listed.packs)
        again.lengths.update(listed.lengths)
    repo.write_index_file(again)
    twice = prune(reopen(repo), dry_run=True, max_unused=0.0)
    assert twice.index_files_before == once.index_files_before + 1
    assert [getattr(twice, f) for f in figures] == [getattr(once, f) for f in figures]
    done = prune(reopen(repo), max_unused=0.0)
    assert [getattr(done, f) for f in figures] == [getattr(once, f) for f in figures]
    fresh = reopen(repo)
    assert check(fresh, read_data=True).ok
    for sid, content in hist[2:]:
        assert restore_all(fresh, fresh.load_snapshot(sid)) == content


def test_prune_refuses_when_an_index_file_is_damaged() -> None:
    repo = make_repo(MemoryBackend())
    history(repo, 2)
    forget(repo, RetentionPolicy(last=1))
    name = next(iter(repo.backend.list("index/"))).name
    raw = bytearray(repo.backend.get(name))
    raw[20] ^= 1
    repo.backend.put(name, bytes(raw))
    listing = sorted(o.name for o in repo.backend.list("data/"))
    with pytest.raises(IntegrityError, match="prune stopped"):
        prune(repo)
    assert sorted(o.name for o in repo.backend.list("data/")) == listing


def test_prune_refuses_while_another_process_holds_a_lock() -> None:
    repo = make_repo(MemoryBackend())
    history(repo, 1)
    with repo.lock(exclusive=False, operation="backup"), pytest.raises(LockedError):
        prune(repo)


def test_damaged_index_file_repair_then_prune(tmp_path: Path) -> None:
    repo = make_repo(LocalBackend(str(tmp_path)))
    hist = history(repo, 4)
    for name in [o.name for o in repo.backend.list("index/")][:2]:
        raw = bytearray(repo.backend.get(name))
        raw[-3] ^= 0x10
        repo.backend.put(name, bytes(raw))
    repo = reopen(repo)
    assert not check(repo).ok
    with pytest.raises(IntegrityError, match="prune stopped"):
        prune(repo)
    dry = repair_index(repo, dry_run=True)
    assert len(dry.index_files_damaged) == 2 and dry.packs_recovered > 0 and dry.index_files_written == 0
    report = repair_index(repo)
    assert report.packs_recovered == dry.packs_recovered and not report.packs_unreadable
    assert len(list(repo.backend.list("index/"))) == 1
    result = check(reopen(repo), read_data=True)
    assert result.ok and not result.warnings, result.to_dict()
    forget(repo, RetentionPolicy(last=2))
    prune(repo, max_unused=0.0)
    fresh = reopen(repo)
    for sid, content in hist[2:]:
        assert restore_all(fresh, fresh.load_snapshot(sid)) == content
    assert check(fresh, read_data=True).ok


def test_repair_drops_missing_packs_so_nothing_dedups_against_them() -> None:
    repo = make_repo(MemoryBackend())
    hist = history(repo, 2)
    victim = next(iter(repo.backend.list("data/"))).name
    repo.backend.delete(victim)
    repo = reopen(repo)
    pack_hex = victim.rsplit("/", 1)[1]
    report = repair_index(repo)
    assert report.packs_dropped == [pack_hex]
    assert all(loc.pack_id.hex() != pack_hex for _b, loc in repo.index.items())
    result = check(repo)
    assert not result.ok and result.damaged_snapshots  # the data is gone, and check says where
    assert {p.kind for p in result.errors} == {"blob-missing"}
    # the damaged snapshots can be forgotten, then prune runs again
    forget_ids(repo, [s[:12] for s in result.damaged_snapshots])
    prune(repo)
    fresh = reopen(repo)
    assert check(fresh, read_data=True).ok
    for sid, content in hist:
        if sid not in result.damaged_snapshots:
            assert restore_all(fresh, fresh.load_snapshot(sid)) == content


def test_forget_ids_removes_an_unreadable_snapshot_so_prune_can_run() -> None:
    repo = make_repo(MemoryBackend())
    hist = history(repo, 2)
    name = f"snapshots/{hist[0][0]}"
    raw = bytearray(repo.backend.get(name))
    raw[30] ^= 1
    repo.backend.put(name, bytes(raw))
    with pytest.raises(IntegrityError, match="unreadable snapshots"):
        prune(repo)
    with pytest.raises(SnapshotNotFoundError):
        forget_ids(repo, [""])
    assert forget_ids(repo, [hist[0][0][:10]], dry_run=True) == [hist[0][0]]
    assert repo.backend.exists(name)
    forget_ids(repo, [hist[0][0][:10]])
    prune(repo)
    assert check(reopen(repo), read_data=True).ok


def foreign_lock(repo: Repository, *, exclusive: bool = False) -> str:
    """A live lock of a process on another host (recently refreshed)."""
    name = "locks/" + "ab" * 16
    doc = {"hostname": "other-host", "pid": 4242, "time": time.time(), "exclusive": exclusive, "operation": "backup"}
    repo.backend.put(name, seal_envelope(repo.key, json.dumps(doc).encode(), b"lock " + name.encode()))
    return name


def test_prune_stops_when_another_lock_appears_midway() -> None:
    """As after a suspension longer than the stale time: a backup started meanwhile."""
    repo = make_repo(MemoryBackend())
    hist = history(repo, 4)
    forget(repo, RetentionPolicy(last=1))
    before = state(repo)
    appeared: list[str] = []

    def sneak_in(phase: str, done: int, total: int) -> None:
        if phase == "repack" and not appeared:
            appeared.append(foreign_lock(repo))

    with pytest.raises(LockedError, match="another process took a lock"):
        prune(repo, max_unused=0.0, progress=sneak_in)
    after = state(repo)
    # nothing was deleted or superseded: only new (duplicate) packs and their index file were added
    assert set(before) <= set(after)
    assert all(after[n] == before[n] for n in before if not n.startswith("locks/"))
    repo.backend.delete(appeared[0])
    fresh = reopen(repo)
    assert check(fresh, read_data=True).ok
    assert restore_all(fresh, fresh.load_snapshot(hist[-1][0])) == hist[-1][1]
    prune(fresh, max_unused=0.0)
    result = check(reopen(repo), read_data=True)
    assert result.ok and not result.warnings


def test_prune_stops_when_its_own_lock_was_removed() -> None:
    repo = make_repo(MemoryBackend())
    history(repo, 3)
    forget(repo, RetentionPolicy(last=1))

    def drop_mine(phase: str, done: int, total: int) -> None:
        for o in list(repo.backend.list("locks/")):
            repo.backend.delete(o.name)

    with pytest.raises(LockedError, match="went stale or was removed"):
        prune(repo, max_unused=0.0, progress=drop_mine)
    assert check(reopen(repo), read_data=True).ok


def test_objects_that_are_not_ours_are_left_alone() -> None:
    repo = make_repo(MemoryBackend())
    hist = history(repo, 2)
    repo.backend.put("data/README", b"not a pack")
    repo.backend.put("data/zz/nothex", b"x")
    repo.backend.put("index/notes.txt", b"x")
    forget(repo, RetentionPolicy(last=1))
    prune(repo, max_unused=0.0)
    assert repo.backend.exists("data/README") and repo.backend.exists("index/notes.txt")
    result = check(reopen(repo), read_data=True)
    assert result.ok
    assert sorted(p.object for p in result.warnings) == ["data/README", "data/zz/nothex", "index/notes.txt"]
    fresh = reopen(repo)
    assert restore_all(fresh, fresh.load_snapshot(hist[-1][0])) == hist[-1][1]


def test_prune_and_repair_hold_one_snapshot_whole_at_a_time(
    local_repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prune and ``repair snapshots`` list the snapshots as summaries and read each again whole
    while they walk it (repository-format.md 12.10); the result is what it was."""
    repo = local_repo
    hist = history(repo, 6)
    forget_ids(repo, [hist[0][0]])
    watched = WholeSnapshots(monkeypatch)
    report = prune(reopen(repo), max_unused=0.0)
    assert report.packs_deleted > 0 and watched.most <= 2
    fresh = reopen(repo)
    for sid, content in hist[1:]:
        assert restore_all(fresh, fresh.load_snapshot(sid)) == content
    watched.most = 0
    fixed = repair_snapshots(reopen(repo))
    assert fixed.intact == 5 and not fixed.repaired and watched.most <= 2


def test_repack_reads_packs_at_once_and_the_result_is_the_same(tmp_path: Path) -> None:
    """Prune's repack once read the packs to repack one after another (a round trip each from
    remote storage, and one core opening them); they are now read and opened as many at once
    as the storage serves best, their blobs written in the same order."""
    results = {}
    for reads in (1, 4):
        backend = WatchedPacks(str(tmp_path / f"repo{reads}"))
        backend.reads_at_once = reads
        repo = make_repo(backend)
        hist = history(repo, 6)
        forget(repo, RetentionPolicy(last=2))
        backend.asked.clear()
        report = prune(repo, max_unused=0.0)
        assert report.packs_repacked >= 4
        assert backend.most_running == reads
        fresh = reopen(repo)
        for sid, content in hist[-2:]:
            assert restore_all(fresh, fresh.load_snapshot(sid)) == content
        assert check(fresh, read_data=True).ok
        results[reads] = (report.packs_repacked, report.blobs_repacked, report.packs_written)
    assert results[1] == results[4]


@pytest.mark.parametrize("prefix", ["data/", "index/", "the superseding index file"])
def test_prune_deletes_nothing_when_what_it_wrote_does_not_read_back(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prune copies the blobs still used out of packs it deletes, and writes one index file
    superseding the others. Had the storage kept other bytes of those new packs, the old packs
    went and the data with them; a new index file that does not read back would have replaced
    the index files still good. What prune wrote is read back before anything is deleted."""
    backend = KeepsOtherBytes()
    repo = make_repo(backend)
    hist = history(repo)
    forget(repo, RetentionPolicy(last=2))
    if prefix == "the superseding index file":  # the repacked packs and their index files read back
        finish = IndexFileWriter.finish

        def garbled_finish(self: IndexFileWriter, *args: Any, **kwargs: Any) -> list[bytes]:
            backend.garble, backend.prefix = True, "index/"
            return finish(self, *args, **kwargs)

        monkeypatch.setattr(IndexFileWriter, "finish", garbled_finish)
    else:
        backend.garble, backend.prefix = True, prefix
    before = state(repo)
    with pytest.raises(IntegrityError, match=r"prune stopped before deleting anything: .* removed again"):
        prune(repo, max_unused=0.0)
    assert state(repo) == before  # as it was: what prune wrote was removed again
    backend.garble = False
    monkeypatch.undo()
    fresh = reopen(repo)
    for sid, content in hist[3:]:
        assert restore_all(fresh, fresh.load_snapshot(sid)) == content
    report = prune(fresh, max_unused=0.0)
    assert report.packs_deleted > 0
    assert check(reopen(fresh), read_data=True).ok


def test_repair_index_deletes_nothing_when_its_new_index_does_not_read_back() -> None:
    """`repair index` writes one index file superseding the others, then deletes them: a new
    file the storage kept other bytes of would have left no index. It is read back first."""
    backend = KeepsOtherBytes()
    repo = make_repo(backend)
    hist = history(repo, 3)
    backend.garble, backend.prefix = True, "index/"
    before = state(repo)
    with pytest.raises(IntegrityError, match=r"repair index stopped before deleting anything: .* removed again"):
        repair_index(repo, from_scratch=True)
    assert state(repo) == before
    backend.garble = False
    fresh = reopen(repo)
    for sid, content in hist:
        assert restore_all(fresh, fresh.load_snapshot(sid)) == content

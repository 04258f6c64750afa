"""The per-host index cache (repo/index_cache.py, repository-format.md section 12.3).

Every test compares what the cache answers with a model computed from the index files
alone (the rule of section 4: a file is live when present and superseded by no present
file; a blob's copies are the entries of live files). The cache is driven through random
histories, killed before every commit it makes, damaged in several ways, and shared by
several processes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmvault.errors import IntegrityError
from vmvault.repo import index_cache
from vmvault.repo.format import BlobType
from vmvault.repo.index import IndexFile, parse_index
from vmvault.repo.index_cache import CacheDamaged, IndexCache
from vmvault.repo.pack import BlobEntry
from vmvault.repo.repo_index import RepoIndex

REPO_ID = "ab" * 16
LOCATION = "file:///somewhere"
Row = tuple[bytes, int, int, int, int]


class Store:
    """Index files as a repository holds them: id -> payload, plus a fetch counter."""

    def __init__(self, seed: int = 0) -> None:
        self.files: dict[bytes, bytes] = {}
        self.rnd = random.Random(seed)
        #: a pool of blob ids, so files share blobs (several copies, like real repositories)
        self.ids = [self.rnd.randbytes(32) for _ in range(200)]
        self.fetched = 0

    def add(self, *, packs: int = 2, blobs: int = 5, supersedes: list[bytes] | None = None, version: int = 2) -> bytes:
        f = IndexFile(version=version, supersedes=list(supersedes or []))
        for _ in range(packs):
            pack_id = self.rnd.randbytes(32)
            entries, off = [], 0
            for bid in self.rnd.sample(self.ids, blobs):
                n = self.rnd.randrange(40, 4000)
                entries.append(BlobEntry(self.rnd.choice([BlobType.DATA, BlobType.INDEX]), bid, off, n, n + 10))
                off += n
            f.packs[pack_id] = entries
            if version == 2 and self.rnd.random() < 0.7:
                f.lengths[pack_id] = off + 200
        payload = f.encode()
        file_id = hashlib.sha256(payload).digest()
        self.files[file_id] = payload
        return file_id

    def listing(self) -> list[tuple[bytes, int]]:
        return [(i, len(p)) for i, p in self.files.items()]

    def fetch(self, file_id: bytes, _size: int) -> bytes | None:
        self.fetched += 1
        return self.files.get(file_id)

    def model(self) -> dict[bytes, set[Row]]:
        """blob id -> every (pack, type, offset, length, raw_length) of the live files."""
        decoded = {i: IndexFile.decode(p, name="x") for i, p in self.files.items()}
        superseded = {old for i, f in decoded.items() for old in f.supersedes if old != i}
        out: dict[bytes, set[Row]] = {}
        for i, f in decoded.items():
            if i in superseded:
                continue
            for pack_id, entries in f.packs.items():
                for e in entries:
                    out.setdefault(e.id, set()).add((pack_id, int(e.type), e.offset, e.length, e.raw_length))
        return out


def answers(cache: IndexCache, ids: list[bytes]) -> dict[bytes, set[Row]]:
    out: dict[bytes, set[Row]] = {}
    for bid in ids:
        rows = {(r.pack_id, r.type, r.offset, r.length, r.raw_length) for r in cache.rows(bid)}
        if rows:
            out[bid] = rows
    return out


def assert_agrees(cache: IndexCache, store: Store) -> None:
    assert answers(cache, store.ids) == store.model()
    for bid in store.ids:
        assert cache.contains(bid) == (bid in store.model())
    # the batched lookup says the same, row for row and in the same order, for ids known or
    # not, repeated, and more of them than one query takes
    unknown = [bytes([n]) * 32 for n in range(3)]
    asked = [*store.ids, *unknown, *store.ids[:5]]
    many = cache.rows_many(asked)
    assert many == {bid: cache.rows(bid) for bid in asked if cache.rows(bid)}


def new_cache(root: Path, repo_id: str = REPO_ID) -> IndexCache:
    return IndexCache(repo_id, LOCATION, root=str(root))


# ---- histories -----------------------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["add", "add", "supersede", "remove", "sync"]), st.integers(0, 2**16)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS, compact=st.booleans())
def test_random_histories_agree_with_the_index_files(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, ops: list[tuple[str, int]], compact: bool
) -> None:
    monkeypatch.setattr(index_cache, "_LOOKUP_MANY_IDS", 7)  # batched lookups of several queries
    if compact:  # rows of removed files are deleted at every sync
        monkeypatch.setattr(index_cache, "_COMPACT_MIN", 1)
    root = tmp_path_factory.mktemp("cache")
    store = Store(seed=len(ops))
    cache = new_cache(root)
    try:
        for op, n in ops:
            ids = sorted(store.files)
            if op == "add":
                store.add(version=1 + n % 2)
            elif op == "supersede" and ids:
                # prune's shape: new files, then one that supersedes the old ones
                old = [i for k, i in enumerate(ids) if (n >> k) & 1] or ids[:1]
                store.add()
                store.add(packs=0, supersedes=old)
            elif op == "remove" and ids:
                del store.files[ids[n % len(ids)]]
            cache.sync(store.listing(), store.fetch)
            assert_agrees(cache, store)
        # and a fresh cache built from scratch says the same
        other = new_cache(tmp_path_factory.mktemp("cache"))
        other.sync(store.listing(), store.fetch)
        assert answers(other, store.ids) == answers(cache, store.ids)
        other.close()
    finally:
        cache.close()


def test_a_sync_reads_only_files_it_has_not_seen(tmp_path: Path) -> None:
    store = Store()
    for _ in range(5):
        store.add()
    cache = new_cache(tmp_path)
    cache.sync(store.listing(), store.fetch)
    assert store.fetched == 5
    cache.sync(store.listing(), store.fetch)
    assert store.fetched == 5
    store.add()
    cache.sync(store.listing(), store.fetch)
    assert store.fetched == 6
    assert_agrees(cache, store)
    # a file removed and put back (its rows were compacted away or not) reads right again
    gone = sorted(store.files)[0]
    payload = store.files.pop(gone)
    cache.sync(store.listing(), store.fetch)
    assert_agrees(cache, store)
    store.files[gone] = payload
    cache.sync(store.listing(), store.fetch)
    assert_agrees(cache, store)
    cache.close()


def test_a_sync_reads_new_files_several_at_once_and_ingests_them_as_one_at_a_time_does(tmp_path: Path) -> None:
    """A host's first sync reads every index file: one after another that was a round trip
    each from remote storage (thousands on a large repository). They are read as many at once
    as the storage serves best (``reads``, asked only when there are files to read), parsed
    and ingested one at a time in the same order, a damaged one reported as before."""
    store = Store(3)
    for _ in range(30):
        store.add()
    bad = sorted(store.files)[7]
    running = most = 0
    lock = threading.Lock()

    def fetch(file_id: bytes, size: int) -> bytes | None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            threading.Event().wait(0.01)
            if file_id == bad:
                raise IntegrityError(f"index/{file_id.hex()}: damaged")
            return store.fetch(file_id, size)
        finally:
            with lock:
                running -= 1

    asked: list[int] = []
    one = new_cache(tmp_path / "one")
    problems_one = one.sync(store.listing(), fetch)
    assert most == 1
    many = new_cache(tmp_path / "many")
    problems_many = many.sync(store.listing(), fetch, reads=lambda: asked.append(4) or 4)
    assert most == 4 and asked == [4]
    assert problems_one == problems_many == [f"index/{bad.hex()}: damaged"]
    assert one.live_files() == many.live_files()
    store.files.pop(bad)
    assert_agrees(many, store)
    many.sync(store.listing(), fetch, reads=lambda: asked.append(4) or 4)
    assert asked == [4], "nothing new to read: the storage is not asked how many reads it serves"
    one.close()
    many.close()


def _rows_held(cache: IndexCache) -> int:
    with sqlite3.connect(cache.path) as conn:
        return int(conn.execute("SELECT count(*) FROM blobs").fetchone()[0])


def _rewrite(store: Store, files: int) -> list[bytes]:
    """Prune's and repair's shape: ``files`` new files, the last superseding every old one."""
    old = sorted(store.files)
    new = [store.add(packs=3) for _ in range(files - 1)]
    return [*new, store.add(packs=1, supersedes=old)]


@pytest.mark.parametrize("everything", [True, False])
def test_a_batch_goes_into_the_cache_whole_when_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, everything: bool
) -> None:
    """Files staged one after another are in no lookup until the batch commits, then all of
    them are, in one commit; the rows of the files they supersede are gone from the table
    (emptied whole when no other live file has rows). A batch closed uncommitted (a process
    killed) leaves the cache as it was, and the next sync reads the files from storage."""
    monkeypatch.setattr(index_cache, "_COMPACT_MIN", 1)
    store = Store(seed=3)
    for _ in range(6):
        store.add()
    cache = new_cache(tmp_path)
    cache.sync(store.listing(), store.fetch)
    before = store.model()
    kept = sorted(store.files)[0]
    if not everything:  # one old file stays live (prune's shape): its rows stay
        payload = store.files.pop(kept)
    written = _rewrite(store, 4)
    if not everything:
        store.files[kept] = payload
    commits: list[str] = []
    cache.before_commit = commits.append

    dropped = cache.batch()
    for file_id in written[:2]:
        dropped.add(file_id, parse_index(store.files[file_id], name="x"))
    dropped.close()  # killed before its commit
    assert answers(cache, store.ids) == before and commits == []

    with cache.batch() as batch:
        for file_id in written:
            batch.add(file_id, parse_index(store.files[file_id], name="x"), len(store.files[file_id]))
            batch.add(file_id, parse_index(store.files[file_id], name="x"))  # staged once
            assert answers(cache, store.ids) == before
        assert batch.rows == sum(parse_index(store.files[f], name="x").blob_count() for f in written)
        batch.commit()
        first = {r.pack_id for r in parse_index(store.files[written[0]], name="x").records}
        assert batch.staged_packs([b"\0" * 32, *first]) == first
    assert commits == ["files"]
    assert_agrees(cache, store)
    live = [kept] if not everything else []
    assert _rows_held(cache) == sum(parse_index(store.files[f], name="x").blob_count() for f in [*written, *live])
    fetched = store.fetched
    cache.sync(store.listing(), store.fetch)
    assert store.fetched == fetched  # nothing left to download
    assert_agrees(cache, store)
    cache.close()

    # uncommitted, the files are the next sync's to read
    other = Store(seed=4)
    for _ in range(3):
        other.add()
    cache = new_cache(tmp_path / "other")
    cache.sync(other.listing(), other.fetch)
    written = _rewrite(other, 3)
    with cache.batch() as batch:
        for file_id in written:
            batch.add(file_id, parse_index(other.files[file_id], name="x"))
    fetched = other.fetched
    cache.sync(other.listing(), other.fetch)
    assert other.fetched == fetched + 3
    assert_agrees(cache, other)
    cache.close()


def test_unreadable_files_are_problems_tried_again_next_time(tmp_path: Path) -> None:
    store = Store()
    good, bad = store.add(), store.add()
    broken = {bad}

    def fetch(file_id: bytes, size: int) -> bytes | None:
        if file_id in broken:
            raise IntegrityError(f"index/{file_id.hex()}: damaged")
        return store.fetch(file_id, size)

    cache = new_cache(tmp_path)
    problems = cache.sync(store.listing(), fetch)
    assert problems == [f"index/{bad.hex()}: damaged"]
    assert cache.live_files() == [good]
    broken.clear()
    assert cache.sync(store.listing(), fetch) == []
    assert_agrees(cache, store)
    cache.close()


def test_a_file_written_again_is_read_again_and_forgotten_if_it_no_longer_reads(tmp_path: Path) -> None:
    """The storage's listing stamps each object (``ObjectInfo.stamp``), and the stamp changes
    when the object is written again. A file written again with its size kept is read again:
    one that still reads is the same content (its name is its hash) and keeps its rows; one
    that does not is reported, its rows are no longer served, and every sync reports it until
    it reads again. Files ingested before stamps (or by this process) take the next listing's
    stamp without being read."""
    store = Store(seed=5)
    kept, damaged = store.add(), store.add()
    stamps = dict.fromkeys(store.files, "v1")
    broken: set[bytes] = set()

    def listing() -> list[tuple[bytes, int, str]]:
        return [(i, len(p), stamps[i]) for i, p in store.files.items()]

    def fetch(file_id: bytes, size: int) -> bytes | None:
        if file_id in broken:
            raise IntegrityError(f"index/{file_id.hex()}: damaged", name="x")
        return store.fetch(file_id, size)

    cache = new_cache(tmp_path)
    try:
        assert not cache.sync(store.listing(), fetch)  # a listing without stamps
        assert not cache.sync(listing(), fetch)  # the stamps are taken, nothing is read
        assert store.fetched == 2
        stamps[kept] = "v2"  # written again with the same bytes
        stamps[damaged] = "v2"  # damaged, its size kept
        broken.add(damaged)
        (problem,) = cache.sync(listing(), fetch)
        assert damaged.hex() in problem and "changed in storage" in problem
        assert store.fetched == 3
        assert_agrees(cache, _without(store, damaged))  # the damaged file's rows are gone, the other's kept
        assert cache.sync(listing(), fetch)  # reported while it does not read
        assert_agrees(cache, _without(store, damaged))
        broken.clear()  # put back whole
        assert not cache.sync(listing(), fetch)
        assert_agrees(cache, store)
        fetched = store.fetched
        assert not cache.sync(listing(), fetch)
        assert store.fetched == fetched
    finally:
        cache.close()


def _without(store: Store, file_id: bytes) -> Store:
    other = Store()
    other.ids = store.ids
    other.files = {i: p for i, p in store.files.items() if i != file_id}
    return other


def _synced_and_closed(root: Path, store: Store) -> str:
    """A cache in ``root`` synced with ``store`` and closed; its database's path."""
    cache = new_cache(root)
    cache.sync(store.listing(), store.fetch)
    cache.close()
    return cache.path


def test_a_cache_from_before_stamps_is_kept(tmp_path: Path) -> None:
    store = Store(seed=6)
    store.add()
    db = sqlite3.connect(_synced_and_closed(tmp_path, store))
    db.execute("ALTER TABLE files DROP COLUMN stamp")
    db.commit()
    db.close()
    again = new_cache(tmp_path)
    try:
        assert not again.warnings
        assert not again.sync([(i, len(p), "v1") for i, p in store.files.items()], store.fetch)
        assert store.fetched == 1
        assert_agrees(again, store)
    finally:
        again.close()


def test_locks_seen_are_kept_per_version_and_go_when_they_end(tmp_path: Path) -> None:
    """The record of COMPLIANCE locks (section 12.3): a version (stamp and time) another than
    the one seen is not known; a record of a lock that ended goes; a cache from before the
    record gets its table when opened."""
    cache = new_cache(tmp_path)
    try:
        cache.remember_locks([("data/aa/p1", '"e1"', 100.0, 5000.0), ("index/i1", '"e2"', 200.0, 900.0)])
        asked = [("data/aa/p1", '"e1"', 100.0), ("index/i1", '"e2"', 200.0), ("data/aa/p1", '"e1"', 101.0)]
        assert cache.known_locks(asked) == {"data/aa/p1": 5000.0, "index/i1": 900.0}
        assert cache.known_locks([("data/aa/p1", '"other"', 100.0), ("data/aa/p1", '"e1"', 101.0)]) == {}
        cache.remember_locks([], expired_before=1000.0)
        assert cache.known_locks(asked) == {"data/aa/p1": 5000.0}
        path = cache.path
    finally:
        cache.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE locks")
    db.commit()
    db.close()
    again = new_cache(tmp_path)
    try:
        assert not again.warnings and again.known_locks([("data/aa/p1", '"e1"', 100.0)]) == {}
    finally:
        again.close()


def test_a_file_that_vanishes_between_listing_and_read_is_skipped(tmp_path: Path) -> None:
    store = Store()
    keep, vanish = store.add(), store.add()
    listing = store.listing()
    del store.files[vanish]
    cache = new_cache(tmp_path)
    assert cache.sync(listing, store.fetch) == []
    assert cache.live_files() == [keep]
    cache.close()


# ---- crashes ---------------------------------------------------------------------------------


def _run_killed_at(root: Path, store: Store, k: int) -> bool:
    """Sync in a child process killed (os._exit) just before its k-th commit; whether it was."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            cache = new_cache(root)
            seen = [0]

            def die(_what: str) -> None:
                seen[0] += 1
                if seen[0] == k:
                    os._exit(9)

            cache.before_commit = die
            cache.sync(store.listing(), store.fetch)
            cache.ingest(*_extra(store))
            # then prune's or repair's shape: new files staged, committed together
            with cache.batch() as batch:
                for file_id in _rewrite(store, 3):
                    batch.add(file_id, parse_index(store.files[file_id], name="x"))
                batch.commit()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), f"the child failed ({code})"
    return code == 9


def _extra(store: Store) -> tuple[bytes, bytes]:
    """An index file 'this process' writes and ingests (in the store, as if uploaded)."""
    ids = sorted(store.files)
    f = IndexFile(version=2, supersedes=ids[:1])
    f.packs[b"\x07" * 32] = [BlobEntry(BlobType.DATA, store.ids[0], 0, 100, 90)]
    payload = f.encode()
    file_id = hashlib.sha256(payload).digest()
    store.files[file_id] = payload
    return file_id, payload


@pytest.mark.parametrize("compact", [False, True])
def test_killed_before_every_commit_the_next_sync_is_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    if compact:  # every commit drops the rows of files no longer live (the batch's: all of them)
        monkeypatch.setattr(index_cache, "_COMPACT_MIN", 1)
    for k in range(1, 100):
        store = Store(seed=k)
        for n in range(6):
            store.add(supersedes=sorted(store.files)[:1] if n == 4 else None)
        root = tmp_path / f"k{k}"
        # a cache that already holds part of the repository, as a host's usually does
        first = new_cache(root)
        first.sync(store.listing()[:2], store.fetch)
        first.close()
        store.add()
        killed = _run_killed_at(root, store, k)
        _extra(store)  # the same files the child wrote and ingested (if it got that far)
        _rewrite(store, 3)
        cache = new_cache(root)
        assert not cache.warnings  # a kill never damages it
        cache.sync(store.listing(), store.fetch)
        assert_agrees(cache, store)
        cache.close()
        if not killed:
            assert k > 3  # there were commits to kill the sync at
            return
    raise AssertionError("the sync never finished")


# ---- damage ------------------------------------------------------------------------------------


def _damage_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _damage_truncated(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _damage_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    rnd = random.Random(1)
    for page in range(1, len(data) // 4096):  # page 0 (the header) kept: damage SQLite finds late
        start = page * 4096 + 100
        data[start : start + 64] = rnd.randbytes(64)
    path.write_bytes(bytes(data))


def _damage_foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'repository'", ("cd" * 16,))
    conn.commit()
    conn.close()


def _damage_not_a_cache(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other(x)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("many", [False, True], ids=["one-at-a-time", "batched"])
@pytest.mark.parametrize(
    "damage", [_damage_garbage, _damage_truncated, _damage_pages, _damage_foreign, _damage_not_a_cache]
)
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path: Path, damage: Callable[[Path], None], many: bool) -> None:
    store = Store()
    for _ in range(30):
        store.add(packs=4, blobs=20)
    cache = new_cache(tmp_path)
    cache.sync(store.listing(), store.fetch)
    path = Path(cache.path)
    cache.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    damage(path)
    # through RepoIndex, as commands use it: damage found at opening, syncing or looking up
    index = RepoIndex(
        backend=None,  # type: ignore[arg-type]  # no pack is confirmed here
        open_cache=lambda: new_cache(tmp_path),
        listing=store.listing,
        fetch=store.fetch,
    )
    try:
        model = store.model()
        found = index.locations_many(store.ids) if many else {bid: index.locations(bid) for bid in store.ids}
        assert list(found) == list(dict.fromkeys(store.ids))
        for bid, locs in found.items():
            want = model.get(bid, set())
            assert {
                (loc.pack_id, int(loc.entry.type), loc.entry.offset, loc.entry.length, loc.entry.raw_length)
                for loc in locs
            } == want
        assert any("index cache" in w and ("again" in w) for w in index.warnings), index.warnings
    finally:
        index.close()


def test_rows_that_disagree_with_their_index_file_reset_the_cache(tmp_path: Path) -> None:
    store = Store()
    for _ in range(3):
        store.add()
    index = RepoIndex(
        backend=None,  # type: ignore[arg-type]
        open_cache=lambda: new_cache(tmp_path),
        listing=store.listing,
        fetch=store.fetch,
    )
    try:
        bid = next(iter(store.model()))
        assert index.verify(bid)
        # a valid database that says something no index file says
        conn = sqlite3.connect(index.cache.path)
        conn.execute("UPDATE blobs SET offset = offset + 1 WHERE id = ?", (bid,))
        conn.commit()
        conn.close()
        assert not index.verify(bid)
        assert any("damaged" in w for w in index.warnings)
        locs = index.locations(bid)
        assert {
            (loc.pack_id, int(loc.entry.type), loc.entry.offset, loc.entry.length, loc.entry.raw_length) for loc in locs
        } == store.model()[bid]
    finally:
        index.close()


def test_an_unusable_cache_folder_falls_back_to_a_temporary_cache(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    store = Store()
    store.add()
    cache = IndexCache(REPO_ID, LOCATION, root=str(blocked))
    try:
        assert cache.warnings and "cannot be used" in cache.warnings[0]
        cache.sync(store.listing(), store.fetch)
        assert_agrees(cache, store)
        tmp = os.path.dirname(cache.path)
    finally:
        cache.discard()
    assert not os.path.exists(tmp)


def test_cache_files_are_private(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    cache.sync([], lambda _i, _s: None)
    assert os.stat(tmp_path / "index").st_mode & 0o777 == 0o700
    assert os.stat(cache.path).st_mode & 0o777 == 0o600
    cache.close()


def test_one_cache_per_repository_and_location(tmp_path: Path) -> None:
    a = IndexCache(REPO_ID, "file:///a", root=str(tmp_path))
    b = IndexCache(REPO_ID, "file:///b", root=str(tmp_path))
    c = IndexCache("cd" * 16, "file:///a", root=str(tmp_path))
    assert len({a.path, b.path, c.path}) == 3
    for x in (a, b, c):
        x.close()


def test_a_damaged_database_during_a_lookup_is_cache_damaged(tmp_path: Path) -> None:
    store = Store()
    for _ in range(30):
        store.add(packs=4, blobs=20)
    path = _synced_and_closed(tmp_path, store)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    _damage_pages(Path(path))
    cache = new_cache(tmp_path)
    with pytest.raises(CacheDamaged):
        for bid in store.ids:
            cache.rows(bid)
        cache.totals()
    cache.close()
    cache = new_cache(tmp_path)
    with pytest.raises(CacheDamaged):
        cache.rows_many(store.ids)
        cache.totals()
    cache.close()


# ---- several processes ---------------------------------------------------------------------------


def test_processes_syncing_at_once_agree(tmp_path: Path) -> None:
    store = Store(seed=3)
    for n in range(40):
        store.add(packs=3, blobs=10, supersedes=sorted(store.files)[:2] if n % 10 == 9 else None)
    pids = []
    for k in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the children
            code = 0
            try:
                cache = new_cache(tmp_path)
                mine = Store(seed=100 + k)
                for _ in range(5):
                    fid = mine.add()
                    cache.ingest(fid, mine.files[fid])
                cache.sync(store.listing(), store.fetch)
                assert answers(cache, store.ids) == store.model()
                cache.close()
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    cache = new_cache(tmp_path)
    assert not cache.warnings
    # what the children ingested on their own is dropped by a sync (not in this listing)
    cache.sync(store.listing(), store.fetch)
    assert_agrees(cache, store)
    cache.close()


def test_a_reader_sees_a_consistent_cache_while_another_process_syncs(tmp_path: Path) -> None:
    store = Store(seed=5)
    for _ in range(10):
        store.add()
    cache = new_cache(tmp_path)
    cache.sync(store.listing(), store.fetch)
    before = answers(cache, store.ids)
    grown = Store(seed=5)
    grown.rnd = random.Random(99)
    grown.files = dict(store.files)
    for _ in range(30):
        grown.add(packs=5, blobs=30)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        writer = new_cache(tmp_path)

        def signal(_what: str) -> None:
            os.write(w, b".")

        writer.before_commit = signal
        writer.sync(grown.listing(), grown.fetch)
        os._exit(0)
    os.close(w)
    # while the child writes, every answer is either before or after a whole file
    while os.read(r, 1):
        now = answers(cache, store.ids)
        for bid, rows in before.items():
            assert rows <= now.get(bid, set())
    os.waitpid(pid, 0)
    assert answers(cache, grown.ids) == grown.model()
    cache.close()


# ---- several threads ------------------------------------------------------------------------------


def _sqlite_memory() -> Callable[[], int]:
    """SQLite's own count of the bytes it has allocated, in this process (its page caches)."""
    import _sqlite3

    try:
        used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (OSError, AttributeError):
        pytest.skip("sqlite3_memory_used is not reachable from Python here")
    used.restype = ctypes.c_int64
    return lambda: int(used())


def test_threads_looking_up_at_once_share_one_page_cache(tmp_path: Path) -> None:
    """A backup's workers look blobs up at once: each gets every row, and their lookups share
    one page cache, whatever the number of threads (a connection per thread filled a page
    cache each once the cache was larger than one)."""
    memory = _sqlite_memory()
    rnd = random.Random(7)
    store = Store()
    ids: list[bytes] = []
    for _ in range(4):  # 160,000 rows: a table of about 10 MiB, more than a page cache
        f = IndexFile(version=2)
        for _ in range(625):
            entries = [BlobEntry(BlobType.DATA, rnd.randbytes(32), k * 100, 100, 200) for k in range(64)]
            f.packs[rnd.randbytes(32)] = entries
            ids.extend(e.id for e in entries)
        payload = f.encode()
        store.files[hashlib.sha256(payload).digest()] = payload
    cache = new_cache(tmp_path)
    cache.sync(store.listing(), store.fetch)
    cache.close()
    before = memory()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def look_up(k: int) -> None:
        try:
            mine = random.Random(k).sample(ids, 3000)
            start.wait()
            for bid in mine:
                rows = cache.rows(bid)
                assert [(r.offset, r.length, r.raw_length) for r in rows] == [(r.offset, 100, 200) for r in rows]
                assert len(rows) == 1 and cache.contains(bid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=look_up, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grown = memory() - before
    cache.close()
    assert not errors, errors[0]
    # one page cache (4 MiB) and its connection; eight would be 32 MiB
    assert grown < 6 << 20, f"SQLite holds {grown >> 20} MiB more after lookups from 8 threads"


_SORT_IN_SCRATCH = """
import os, sys, threading, time
from vmvault.repo.index_cache import IndexCache
seen = set()
done = threading.Event()
def watch():
    while not done.is_set():
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if "etilqs" in target:
                seen.add(os.path.dirname(target))
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
cache = IndexCache("ab" * 16, "file:///somewhere", root=sys.argv[1])
with cache.scratch() as db:
    db.execute("PRAGMA cache_size=-512")
    db.execute("CREATE TABLE s.t(x BLOB)")
    db.execute("BEGIN")
    db.executemany("INSERT INTO s.t VALUES (?)", ((os.urandom(32),) for _ in range(200_000)))
    db.execute("COMMIT")
    db.execute("SELECT count(*) FROM (SELECT x FROM s.t ORDER BY x)").fetchone()
    time.sleep(0.05)
done.set()
cache.close()
print(sorted(seen))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="open files are listed in /proc")
def test_sqlite_temporary_files_of_a_scratch_are_in_the_cache_folder(tmp_path: Path) -> None:
    """A sort larger than the page cache spills to SQLite's temporary files: they are made in
    the cache folder, not in /var/tmp or /tmp (a process of its own: the folder is chosen once
    per process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SQLITE_TMPDIR", "TMPDIR")}
    out = subprocess.run(
        [sys.executable, "-c", _SORT_IN_SCRATCH, str(tmp_path)], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == repr([str(tmp_path / "index")])


@given(
    entries=st.lists(
        st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from([bytes(32), b"\xff" * 32])), max_size=300
    )
)
@settings(max_examples=60, deadline=None)
def test_packed_ids_are_split_as_the_entries_they_are(entries: list[bytes]) -> None:
    """``ScratchRows.add_packed`` (SQLite splitting an index block) stores exactly the ids a
    per-id loop would, as blobs, leaving out the entries named."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("ATTACH ':memory:' AS s")
    rows = index_cache.ScratchRows(db, "s.ids")
    rows.add_packed(b"".join(entries), 32, (bytes(32), b"\xff" * 32))
    got = [(bytes(r[0]), r[1]) for r in db.execute("SELECT id, typeof(id) FROM s.ids")]
    assert sorted(got) == sorted((e, "blob") for e in entries if e not in (bytes(32), b"\xff" * 32))
    rows.add_packed(b"".join(entries), 32)
    assert db.execute("SELECT count(*) FROM s.ids").fetchone()[0] == len(got) + len(entries)


@given(
    steps=st.lists(
        st.lists(st.tuples(st.binary(min_size=1, max_size=3), st.binary(min_size=0, max_size=33)), max_size=700),
        max_size=6,
    )
)
@settings(max_examples=60, deadline=None)
def test_a_scratch_map_answers_as_a_dict(steps: list[list[tuple[bytes, bytes]]]) -> None:
    """``ScratchMap`` (copy's pairings on disk) against a dict: later puts replace earlier
    ones, ``get_many`` of more keys than one question asks (500) answers each once."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("ATTACH ':memory:' AS s")
    pairs = index_cache.ScratchMap(db, "s.pairs")
    model: dict[bytes, bytes] = {}
    for step in steps:
        pairs.put(iter(step))
        model.update(step)
        asked = [k for k, _ in step] + [b"\x00never", *model]
        assert pairs.get_many(asked) == {k: model[k] for k in asked if k in model}
        for key in list(model)[:5]:
            assert pairs.get(key) == model[key]
        assert pairs.get(b"\x00never") is None

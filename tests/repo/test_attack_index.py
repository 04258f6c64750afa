"""Attacks on the index at scale (repository-format.md, section 10.7): the per-host index
cache as a local file, a configuration rolled back below a migration, and a storage server
that answers ranged reads with more than it was asked for."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.repo.builders import PASS, Content, backup, disk_image, make_repo, restore_all
from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend
from vmvault.errors import IntegrityError, TamperingError
from vmvault.repo import check
from vmvault.repo.format import BlobType
from vmvault.repo.index import IndexFile
from vmvault.repo.index_cache import IndexCache
from vmvault.repo.pack import BlobEntry
from vmvault.repo.repository import Repository

OTHER_UID = 65534

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@root_only
def test_a_cache_folder_another_user_owns_is_not_trusted_for_deduplication(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache folder (VMVAULT_CACHE_DIR in a shared place, or one another user made first)
    belongs to someone else, who plants a row saying that a chunk the next backup holds is
    stored in a pack that does not hold it. Trusted, the backup skips the chunk and its
    snapshot cannot be restored. (The chunk id stands for one the other user read from the
    cache earlier: ids of chunks a prune removed come back when the data does.)"""
    cache = tmp_path / "shared-cache"
    (cache / "index").mkdir(parents=True)
    os.chown(cache / "index", OTHER_UID, OTHER_UID)
    os.chmod(cache / "index", 0o777)
    monkeypatch.setenv("VMVAULT_CACHE_DIR", str(cache))
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    backup(repo, Content(disks={"d": disk_image(1, 12, zero_every=0)}))
    pack_id, entries = next(iter(repo.index.packs().items()))
    index_file = next(iter(repo.index_file_ids()))
    new = Content(disks={"d": disk_image(2, 12, zero_every=0)})
    victim_chunk = repo.key.chunk_id(new.disks["d"][:4096])
    # the other user's row: under the id of a real index file (so a sync keeps it), the new
    # chunk in a pack that is there and long enough
    planted = IndexFile(version=2)
    e = entries[0]
    planted.packs[pack_id] = [BlobEntry(BlobType.DATA, victim_chunk, e.offset, e.length, e.raw_length)]
    for name in os.listdir(cache / "index"):  # the folder's owner may replace anything in it
        os.unlink(cache / "index" / name)
    owner_cache = IndexCache(repo.config.id, repo.backend.url, root=str(cache))
    try:
        owner_cache.ingest(index_file, planted.encode())
    finally:
        owner_cache.discard()
    repo.close()  # (a temporary cache, once the fix is in: removed)

    again = Repository.open(LocalBackend(str(tmp_path / "repo")), PASS)
    try:
        snap = backup(again, new)
        warnings = again.index.warnings + again.warnings
    finally:
        again.close()
    monkeypatch.setenv("VMVAULT_CACHE_DIR", str(tmp_path / "fresh-cache"))
    elsewhere = Repository.open(LocalBackend(str(tmp_path / "repo")), PASS)
    assert check(elsewhere).ok
    assert restore_all(elsewhere, elsewhere.load_snapshot(snap.id)) == new
    assert any("belongs to another user" in w for w in warnings)


def test_cache_folders_and_files_are_private_whatever_the_umask_and_their_mode(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        root = tmp_path / "made-by-vmvault"
        cache = IndexCache("ab" * 16, "file:///r", root=str(root))
        cache.sync([], lambda _i, _s: None)
        cache.close()
        assert (_mode(root), _mode(root / "index"), _mode(cache.path)) == (0o700, 0o700, 0o600)
        # a folder and files left wider (an older vmvault, a copy, a hand-made folder): narrowed
        os.chmod(root / "index", 0o777)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(cache.path + suffix):
                os.chmod(cache.path + suffix, 0o666)
        cache = IndexCache("ab" * 16, "file:///r", root=str(root))
        cache.sync([], lambda _i, _s: None)
        assert not cache.warnings
        assert _mode(root / "index") == 0o700
        for name in os.listdir(root / "index"):
            assert _mode(root / "index" / name) == 0o600, name
        cache.close()
    finally:
        os.umask(old)


def test_links_in_the_cache_are_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.sqlite"
    victim.write_bytes(b"a file of the user's that is not a cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a link in place of the cache folder: not used (a temporary cache instead)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index").symlink_to(elsewhere)
    cache = IndexCache("ab" * 16, "file:///r", root=str(tmp_path / "a"))
    try:
        assert cache.warnings and "not a folder" in cache.warnings[0]
        assert not str(cache.path).startswith(str(tmp_path))
    finally:
        cache.discard()
    assert not os.listdir(elsewhere)
    # a link in place of the database or one of SQLite's files: removed, the cache rebuilt
    for suffix in ("", "-wal", "-shm"):
        root = tmp_path / f"b{suffix}"
        first = IndexCache("ab" * 16, "file:///r", root=str(root))
        path = first.path
        first.close()
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
        os.symlink(victim, path + suffix)
        cache = IndexCache("ab" * 16, "file:///r", root=str(root))
        cache.sync([], lambda _i, _s: None)
        assert any("not a regular file" in w for w in cache.warnings), suffix
        assert not os.path.islink(path + suffix)
        cache.close()
    assert victim.read_bytes() == b"a file of the user's that is not a cache"


@root_only
def test_cache_files_of_another_user_are_replaced(tmp_path: Path) -> None:
    """A folder that was shared before it was narrowed may hold files someone else put there."""
    first = IndexCache("ab" * 16, "file:///r", root=str(tmp_path))
    first.sync([], lambda _i, _s: None)
    first.close()
    os.chown(first.path, OTHER_UID, OTHER_UID)
    cache = IndexCache("ab" * 16, "file:///r", root=str(tmp_path))
    try:
        assert any("belongs to another user" in w for w in cache.warnings)
        assert os.lstat(cache.path).st_uid == os.geteuid()
    finally:
        cache.close()


def test_a_config_put_back_below_a_migration_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After `migrate`, the storage serves the version-1 config again (authentic: its MAC was
    valid before). Accepted, this host would write version-1 index files again, without pack
    lengths, and an earlier vmvault would take the repository back."""
    from tests.repo.test_migrate import index_versions, old_repo

    path = tmp_path / "repo"
    repo = old_repo(path, monkeypatch)
    backup(repo, Content(disks={"d": disk_image(1, 12)}))
    old_config = (path / "config").read_bytes()
    assert repo.migrate()
    backup(repo, Content(disks={"d": disk_image(2, 12)}))
    written = index_versions(repo)
    (path / "config").write_bytes(old_config)
    with pytest.raises(TamperingError, match="an older config was put back"):
        again = Repository.open(LocalBackend(str(path)), PASS)
        backup(again, Content(disks={"d": disk_image(3, 12)}))
    assert index_versions(repo) == written
    # a host that never saw the migration cannot tell (section 10.7)
    monkeypatch.setenv("VMVAULT_STATE_DIR", str(tmp_path / "another-host"))
    assert Repository.open(LocalBackend(str(path)), PASS).config.version == 1


def test_a_host_that_migrated_records_the_version_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record follows the migration at once (this host's next opening accepts version 2,
    and refuses 1); a repository opened at version 2 is recorded so on its first opening."""
    from tests.repo.test_migrate import old_repo

    path = tmp_path / "repo"
    old_repo(path, monkeypatch)
    old_config = (path / "config").read_bytes()
    Repository.open(LocalBackend(str(path)), PASS)  # opened at version 1: recorded as 1
    assert Repository.open(LocalBackend(str(path)), PASS).migrate()
    assert Repository.open(LocalBackend(str(path)), PASS).config.version == 2
    (path / "config").write_bytes(old_config)
    with pytest.raises(TamperingError):
        Repository.open(LocalBackend(str(path)), PASS)


def _chunks(
    backend: Backend, secret: bytes | None, n: int, *, seed: int
) -> tuple[Repository, list[bytes], list[bytes]]:
    """A repository with ``n`` random chunks in one pack, in order: (repository, ids, data)."""
    import random

    from tests.repo.test_fetch import CS

    repo = Repository.init(backend, secret, chunk_size=CS)
    rng = random.Random(seed)
    datas = [rng.randbytes(CS) for _ in range(n)]
    ids = [repo.key.chunk_id(d) for d in datas]
    writer = repo.writer(upload_threads=1)
    for chunk_id, data in zip(ids, datas, strict=True):
        writer.add(BlobType.DATA, chunk_id, data)
    writer.flush()
    return repo, ids, datas


def test_hostile_index_entries_cost_the_fetcher_no_memory_and_give_no_wrong_data() -> None:
    """In an unencrypted repository whoever writes the storage can forge index files (section
    10): entries that overlap another blob, point past the pack's end, claim a 4 GiB blob or
    no plaintext at all. The coalesced reader reads nothing beyond its bounds, delivers every
    honest blob and reports each hostile one, as a read of it alone does."""
    import hashlib
    import tracemalloc

    from tests.repo.test_fetch import CS, Watched
    from vmvault.repo._limits import ENVELOPE_OVERHEAD, largest_blob
    from vmvault.repo.crypto import seal_envelope
    from vmvault.repo.fetch import BlobFetcher

    backend = Watched()
    repo, ids, datas = _chunks(backend, None, 24, seed=5)
    (pack_id, entries), *_ = repo.index.packs().items()
    big = largest_blob(CS) + ENVELOPE_OVERHEAD
    hostile = {
        0: lambda e: BlobEntry(e.type, e.id, entries[1].offset, e.length, e.raw_length),  # another blob's bytes
        2: lambda e: BlobEntry(e.type, e.id, (1 << 32) - 64, e.length, e.raw_length),  # past the end
        4: lambda e: BlobEntry(e.type, e.id, e.offset, big, 0),  # no plaintext, the largest length
        6: lambda e: BlobEntry(e.type, e.id, e.offset, (1 << 32) - 1, (1 << 32) - 1),  # 4 GiB
        8: lambda e: BlobEntry(e.type, e.id, e.offset + 7, e.length, e.raw_length),  # overlapping its neighbours
    }
    by_id = {ids[i]: make for i, make in hostile.items()}
    forged = IndexFile(version=2)
    forged.packs[pack_id] = [by_id[e.id](e) if e.id in by_id else e for e in entries]
    payload = forged.encode()
    for obj in list(backend.list("index/")):
        backend.delete(obj.name)
    name = f"index/{hashlib.sha256(payload).hexdigest()}"
    backend.put(name, seal_envelope(repo.key, payload, name.encode()))
    repo.load_index()
    backend.reads.clear()
    tracemalloc.start()
    try:
        with BlobFetcher(repo, max_requests=2, max_range=256 << 10, max_bytes=1 << 20) as fetcher:
            got = dict(fetcher.fetch(enumerate(ids)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for i, data in enumerate(datas):
        if i in hostile:
            assert isinstance(got[i], IntegrityError), i
        else:
            assert got[i] == data, i
    assert all(length is not None and length <= 256 << 10 for _n, _o, length in backend.data_reads())
    assert peak < 16 << 20, f"{peak >> 20} MiB"


@pytest.mark.parametrize("answer", ["more", "fewer"])
def test_a_storage_that_answers_more_or_fewer_bytes_than_asked(answer: str) -> None:
    """Each ranged read answered with 1 MiB more than asked, or one byte short: the fetcher
    takes only the bytes of each blob (more), or reports the blob cut short (fewer), never
    wrong data."""

    from tests.repo.test_fetch import CS, Watched
    from vmvault.repo.fetch import BlobFetcher

    class Lying(Watched):
        lie = False

        def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            data = super().get(name, offset, length)
            if not self.lie or not name.startswith("data/"):
                return data
            return data + bytes(1 << 20) if answer == "more" else data[:-1]

    backend = Lying()
    repo, ids, datas = _chunks(backend, b"passphrase", 12, seed=7)
    backend.lie = True
    with BlobFetcher(repo, max_range=4 * CS) as fetcher:
        got = [r for _k, r in fetcher.fetch(enumerate(ids))]
    if answer == "more":
        assert got == datas
    else:
        for result, data in zip(got, datas, strict=True):
            assert result == data or isinstance(result, IntegrityError)
        assert any(isinstance(r, IntegrityError) for r in got)


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("moment", ["before", "after"])
def test_migrate_killed_around_its_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool, moment: str
) -> None:
    """`migrate` killed (SIGKILL: no cleanup runs) just before or just after it writes the
    config: this host opens the repository afterwards in either state, and a second
    `migrate` finishes (or finds nothing to do)."""
    import multiprocessing

    from tests.repo.test_migrate import old_repo

    path = tmp_path / "repo"
    repo = old_repo(path, monkeypatch, encrypted=encrypted)
    content = Content(disks={"d": disk_image(1, 12)})
    snap = backup(repo, content)
    secret = PASS if encrypted else None

    def child() -> None:
        real_put = LocalBackend.put

        def put(self: LocalBackend, name: str, data: bytes) -> None:
            if name == "config" and moment == "before":
                os._exit(9)
            real_put(self, name, data)
            if name == "config":
                os._exit(9)

        LocalBackend.put = put  # type: ignore[method-assign]
        Repository.open(LocalBackend(str(path)), secret).migrate()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    again = Repository.open(LocalBackend(str(path)), secret)
    assert again.config.version == (1 if moment == "before" else 2)
    assert again.migrate() == (moment == "before")
    reopened = Repository.open(LocalBackend(str(path)), secret)
    assert reopened.config.version == 2
    assert restore_all(reopened, reopened.load_snapshot(snap.id)) == content


def test_two_clones_of_one_repository_behind_one_location_share_a_cache_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository copied (same id, same key) and the copies then written apart, served in
    turn at one location (a storage restored from a copy, a clone swapped in): one cache
    serves both. Its rows are those of index files named by their content, and only files
    listed now are live, so each backup deduplicates against what its own storage holds."""
    import shutil

    path, a, b = tmp_path / "repo", tmp_path / "clone-a", tmp_path / "clone-b"
    repo = make_repo(LocalBackend(str(path)))
    shared = disk_image(1, 16)
    backup(repo, Content(disks={"d": shared}))
    shutil.copytree(path, b)
    path.rename(a)
    written: dict[Path, list[tuple[str, Content]]] = {a: [], b: []}
    for n, clone in enumerate([a, b, a, b, a]):
        clone.rename(path)  # this clone is at the location now
        content = Content(disks={"d": shared[: 8 * 4096] + disk_image(10 + n, 8)})
        opened = Repository.open(LocalBackend(str(path)), PASS)
        written[clone].append((backup(opened, content).id, content))
        path.rename(clone)
    monkeypatch.setenv("VMVAULT_CACHE_DIR", str(tmp_path / "fresh-cache"))
    for clone, snaps in written.items():
        fresh = Repository.open(LocalBackend(str(clone)), PASS)
        assert check(fresh, read_data=True).ok, clone
        for snap_id, content in snaps:
            assert restore_all(fresh, fresh.load_snapshot(snap_id)) == content


def test_an_index_rolled_back_behind_the_cache_is_not_deduplicated_against(tmp_path: Path) -> None:
    """After a prune deleted packs, the storage deletes the index files that prune wrote and
    puts back the ones it superseded, while this host's cache holds the newer state. The
    replayed files name the deleted packs; a backup of the same data confirms each pack it
    would rely on, finds them gone and stores the data again."""
    import shutil

    from vmvault.repo import forget, prune
    from vmvault.repo.retention import RetentionPolicy

    path = tmp_path / "repo"
    repo = make_repo(LocalBackend(str(path)))
    first = Content(disks={"d": disk_image(1, 16, zero_every=0)})
    backup(repo, first)
    backup(repo, Content(disks={"d": disk_image(2, 16, zero_every=0)}))
    shutil.copytree(path / "index", tmp_path / "old-index")
    forget(repo, RetentionPolicy(last=1))
    assert prune(repo).packs_deleted
    repo.load_index()  # the cache now holds the pruned state
    shutil.rmtree(path / "index")
    shutil.copytree(tmp_path / "old-index", path / "index")

    again = Repository.open(LocalBackend(str(path)), PASS)
    snap = backup(again, first)
    assert again.index.lost.missing
    fresh = Repository.open(LocalBackend(str(path)), PASS, cache_root=str(tmp_path / "fresh-cache"))
    assert restore_all(fresh, fresh.load_snapshot(snap.id)) == first


@pytest.mark.parametrize("lie", ["rows moved to another pack", "a live file marked superseded"])
def test_prune_does_not_delete_what_a_lying_cache_leaves_unused(tmp_path: Path, lie: str) -> None:
    """Prune decides from the cache's rows which packs nothing uses. A cache that says
    something else than the index files (damaged in a way SQLite does not see, or written
    by someone else) would make it delete packs a snapshot needs; prune compares the cache
    with the files it reads anyway, rebuilds it, and deletes only what the files allow."""
    import sqlite3

    from vmvault.repo import prune

    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    contents = [Content(disks={"d": disk_image(seed, 30, zero_every=0)}) for seed in (1, 2)]
    snaps = [backup(repo, c) for c in contents]
    repo.load_index()
    packs = list(repo.index.packs())
    path = repo.index.cache.path
    repo.index.close()
    db = sqlite3.connect(path)
    if lie == "rows moved to another pack":
        numbers = {bytes(i): n for n, i in db.execute("SELECT no, id FROM packs")}
        db.execute("UPDATE blobs SET pack = ? WHERE pack = ?", (numbers[packs[1]], numbers[packs[0]]))
    else:
        newest = db.execute("SELECT max(no) FROM files").fetchone()[0]
        for (file_id,) in db.execute("SELECT id FROM files WHERE no != ?", (newest,)).fetchall():
            db.execute("INSERT INTO supersedes VALUES (?, ?)", (newest, file_id))
        db.execute("UPDATE files SET live = (no = ?)", (newest,))
    db.commit()
    db.close()

    again = Repository.open(LocalBackend(str(tmp_path / "repo")), PASS)
    report = prune(again)
    assert report.packs_deleted == 0
    assert any("disagrees with the index files" in w for w in again.warnings + again.index.warnings)
    fresh = Repository.open(LocalBackend(str(tmp_path / "repo")), PASS, cache_root=str(tmp_path / "fresh"))
    assert check(fresh).ok
    for snap, content in zip(snaps, contents, strict=True):
        assert restore_all(fresh, fresh.load_snapshot(snap.id)) == content


def test_prune_does_not_delete_a_used_pack_the_cache_numbers_as_an_unused_one(tmp_path: Path) -> None:
    """The cache's rows name packs by number; the digests prune compares with the index files
    name them by the same numbers. A cache whose ``packs`` table gives a used pack's number to
    an unused pack's id (and the other way round) would make prune delete the used one: the
    digests disagree, the cache is rebuilt, and only the unused pack goes."""
    import sqlite3

    from vmvault.repo import RetentionPolicy, forget, prune

    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    old, kept = (Content(disks={"d": disk_image(seed, 30, zero_every=0)}) for seed in (1, 2))
    backup(repo, old)
    repo.load_index()
    old_packs = set(repo.index.packs())
    snap = backup(repo, kept)
    forget(repo, RetentionPolicy(last=1))
    repo.load_index()
    unused = sorted(old_packs)[0]
    used = sorted(set(repo.index.packs()) - old_packs)[0]
    path = repo.index.cache.path
    repo.index.close()
    db = sqlite3.connect(path)
    numbers = {bytes(i): n for n, i in db.execute("SELECT no, id FROM packs")}
    db.execute("UPDATE packs SET id = x'00' WHERE no = ?", (numbers[used],))
    db.execute("UPDATE packs SET id = ? WHERE no = ?", (used, numbers[unused]))
    db.execute("UPDATE packs SET id = ? WHERE no = ?", (unused, numbers[used]))
    db.commit()
    db.close()

    again = Repository.open(LocalBackend(str(tmp_path / "repo")), PASS)
    report = prune(again)
    assert report.packs_deleted == len(old_packs)
    assert any("disagrees with the index files" in w for w in again.warnings + again.index.warnings)
    fresh = Repository.open(LocalBackend(str(tmp_path / "repo")), PASS, cache_root=str(tmp_path / "fresh"))
    assert check(fresh).ok
    assert restore_all(fresh, fresh.load_snapshot(snap.id)) == kept


def test_an_index_file_changed_in_storage_leaves_no_rows_behind(tmp_path: Path) -> None:
    """An index file whose listed size changed (truncated or extended in storage) is read
    again; its rows must go with it. Left behind, they were counted as rows of whichever
    file the cache numbered next (the number was reused): blobs "listed" by a file that
    does not list them."""
    from tests.repo.test_index_cache import Store, assert_agrees, new_cache

    store = Store(seed=3)
    store.add()
    damaged = store.add()
    cache = new_cache(tmp_path)
    try:
        cache.sync(store.listing(), store.fetch)
        assert_agrees(cache, store)
        # extended by a byte in storage: now unreadable (reported), its rows no longer served
        grown = store.files.pop(damaged) + b"x"

        def fetch(file_id: bytes, size: int) -> bytes | None:
            if file_id == damaged:
                raise IntegrityError(f"index/{damaged.hex()}: damaged", name="x")
            return store.fetch(file_id, size)

        listing = [*store.listing(), (damaged, len(grown))]
        assert cache.sync(listing, fetch)
        assert_agrees(cache, store)
        # the storage loses it; a new file comes: it lists only its own blobs
        store.add()
        cache.sync(store.listing(), store.fetch)
        assert_agrees(cache, store)
    finally:
        cache.close()


def test_an_index_file_larger_than_its_listing_is_not_read_whole(tmp_path: Path) -> None:
    """Index files are read several at once, each weighed by its listed size; one the storage
    serves larger than it listed (index files are never rewritten) is refused after that many
    bytes and a byte, so the storage cannot make the reads ahead hold more than they weighed."""
    repo = make_repo(LocalBackend(str(tmp_path / "repo")))
    backup(repo, Content(disks={"sda": disk_image(1, 8)}))
    (obj,) = list(repo.backend.list("index/"))
    file_id = bytes.fromhex(obj.name.split("/")[1])
    assert repo.read_index_payload(file_id, obj.size)
    with open(tmp_path / "repo" / obj.name, "ab") as f:
        f.write(os.urandom(64 << 10))
    with pytest.raises(IntegrityError, match=f"larger than the {obj.size} bytes its listing says"):
        repo.read_index_payload(file_id, obj.size)
    ((_id, payload),) = list(repo.index_payloads([(file_id, obj.size)]))
    assert isinstance(payload, IntegrityError)

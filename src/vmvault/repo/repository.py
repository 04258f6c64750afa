"""The repository: configuration, keys, blobs in packs, index files, snapshots.

Layout (see docs/design/repository-format.md)::

    config              plaintext JSON: format, version, id, chunk size, encryption, chunk ids, MAC
    keys/<id>           master key wrapped by a passphrase or key file
    data/<xx>/<id>      packs of sealed blobs (chunks and index blocks)
    index/<id>          which pack holds which blob
    snapshots/<id>      snapshot manifests, written last
    locks/<id>          shared (backup) and exclusive (prune) locks

Writes follow one rule that makes every crash safe: an object is written only after
everything it refers to is durable (packs, then index files, then the snapshot).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from vmvault import __version__, shape
from vmvault.backends.base import Backend
from vmvault.errors import (
    BackendError,
    IntegrityError,
    NoConfigError,
    ObjectNotFoundError,
    RepositoryError,
    RepositoryExistsError,
    SnapshotNotFoundError,
    TamperingError,
    UnsafeStorageError,
    VmvaultError,
)
from vmvault.repo import keys
from vmvault.repo._layout import CHUNK_ID_VERSION, ID_SIZE, INDEX_V2_VERSION, PACK_TRAILER, BlobType
from vmvault.repo._limits import (
    ENVELOPE_OVERHEAD,
    MAX_INDEX_FILE,
    MAX_SNAPSHOT,
    MAX_SNAPSHOT_PAYLOAD,
    confirm_stored,
    largest_blob,
    pack_limit,
    put_confirmed,
    read_bounded,
)
from vmvault.repo.ahead import PACKS_AHEAD, ahead, index_file_weight
from vmvault.repo.budget import MemoryBudget
from vmvault.repo.config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    RepoConfig,
    StoredConfig,
    check_settings,
    encode_config,
    read_config,
)
from vmvault.repo.crypto import (
    BLAKE3,
    HMAC_SHA256,
    MasterKey,
    open_envelope,
    require_id_function,
    seal_envelope,
    seal_envelope_parts,
)
from vmvault.repo.hostrecord import HostRecords, RepoRecord, now
from vmvault.repo.index import MAX_V2_PAYLOAD, BlobLocation, IndexFile
from vmvault.repo.index_block import IndexBlock
from vmvault.repo.index_cache import IndexCache, IngestBatch, write_many
from vmvault.repo.kept import KeptBlocks, KeptCopies, blocks_limit
from vmvault.repo.locks import RepositoryLock
from vmvault.repo.names import index_id, snapshot_id
from vmvault.repo.names import pack_id as parse_pack_id
from vmvault.repo.pack import BlobEntry, PackBuilder, blob_aad, open_blob, pack_name
from vmvault.repo.progress import PhaseCallback
from vmvault.repo.repo_index import RepoIndex
from vmvault.repo.snapshot import Snapshot
from vmvault.repo.snapshot_cache import SnapshotCache

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PACK_SIZE",
    "ONE_LISTING",
    "BlobWriter",
    "LostData",
    "RepoConfig",
    "Repository",
]

#: a kind of this host's copies (repo/kept.py)
K = TypeVar("K", bound=KeptCopies)

#: a repository with fewer packs (1 TiB of chunks in 16 MiB packs) is listed with one listing of
#: ``data/``; a larger one folder by folder, so that no listing in memory holds more than this
#: many names (about 10 MiB) or 1/256 of the packs (bench/scale.py measured a one-go listing
#: of 625,000 packs at +93 MiB of peak RSS)
ONE_LISTING = 1 << 16
#: rows inserted into a scratch database per statement
_SCRATCH_BATCH = 10_000
#: what one index block or chunk id of a snapshot takes in memory, about (a str of 64 hex
#: digits, and its place in a list), for ``Repository.whole``'s bound
_ID_BYTES = 128


def _record_unusable(records: HostRecords, exc: BaseException) -> str:
    return (
        f"this host's record of repositories ({records.root}) cannot be used: {exc}; the repository is not "
        "checked against what this host saw of it before (docs/design/repository-format.md, section 10.1)"
    )


def _no_config_where_one_was(backend: Backend, records: HostRecords, exc: NoConfigError) -> NoConfigError:
    """``exc`` (no config at ``backend``), saying so when this host used a repository there
    before: its disk is likely not mounted, and the advice to ``init`` would put the next
    backups on the mount point's disk instead."""
    try:
        seen_id = records.location(backend.url)
        record = records.load(seen_id) if seen_id is not None else None
    except (OSError, ValueError):
        return exc
    if seen_id is None:
        return exc
    when = f" (last on {record.last_seen[:10]})" if record is not None and record.last_seen else ""
    return NoConfigError(
        f"{backend.url} holds no vmvault repository (no config), but this host used repository {seen_id[:8]} "
        f"there{when}. Is the disk or share that holds it mounted, and the path right? If the repository "
        "moved, give its new location; only if it is gone for good, make a new one there with `vmvault init`."
    )


def _refuse_unauthenticated(
    backend: Backend, stored: StoredConfig, *, given: bool, record: RepoRecord | None, records: HostRecords
) -> None:
    """A config without a MAC is accepted only when nothing says the repository is encrypted:
    not the config, not a key object, not a secret the user gave, not this host's record."""
    url, cfg = backend.url, stored.config
    refuse = "Refusing to use it; nothing was written."
    if cfg.encrypted:
        raise TamperingError(f"{url}: the config says the repository is encrypted but carries no MAC. {refuse}")
    if stored.authenticated:
        raise TamperingError(f"{url}: the config says the repository is not encrypted but carries a MAC. {refuse}")
    if next(iter(backend.list("keys/")), None) is not None:
        raise TamperingError(
            f"{url}: the config says the repository is not encrypted, but it holds key objects: the config was "
            f"rewritten to switch encryption off. {refuse}"
        )
    if given:
        raise TamperingError(
            f"{url}: the config says the repository is not encrypted, but a passphrase or key file was given: "
            "vmvault stores nothing unencrypted for a user who expects encryption. " + refuse + " (If the "
            "repository is meant to be unencrypted, give no passphrase or key file.)"
        )
    if record is not None and record.encrypted:
        raise TamperingError(
            f"{url}: this host saw repository {cfg.id[:8]} encrypted, and its config now says it is not (its keys "
            f"deleted, its config rewritten). {refuse}"
        )
    known = (record.config_sha256, record.config_pending) if record is not None else ()
    if record is not None and record.config_sha256 and stored.sha256 not in known:
        raise TamperingError(
            f"{url}: the config of unencrypted repository {cfg.id[:8]} changed since this host last read it (a "
            f"config is never rewritten). {refuse} If you changed it yourself, remove {records.record_path(cfg.id)}."
        )
    stored.check_unknown(authenticated=False)


class Repository:
    """An open repository. Thread-safe for reads; writes go through ``BlobWriter``."""

    def __init__(
        self, backend: Backend, config: RepoConfig, key: MasterKey, key_id: str, *, cache_root: str | None = None
    ) -> None:
        self.backend = backend
        #: this host's cache folder (repo/index_cache.py; None: the default, ``cache_root()``)
        self.cache_root = cache_root
        blocks_limit()  # a VMVAULT_CACHE_BLOCKS that is no size is said now, not halfway through a backup
        self.config = config
        #: the master key, computing chunk ids with the function the config names
        self.key = key.with_id_function(config.chunk_id)
        self.key_id = key_id
        #: the opening key's role: "full" or "backup-only" (see repo/immutability.py)
        self.role = keys.FULL
        #: True when the storage itself refuses to delete retained objects (S3 Object Lock)
        self.retention_enforced = False
        #: locks taken through this object; save_snapshot verifies the held ones
        self._locks: list[RepositoryLock] = []
        #: where each blob is (repo/repo_index.py): the per-host index cache, opened and synced
        #: at first use (opening the repository reads no index file)
        self.index = RepoIndex(backend, self._open_cache, self._list_index_files, self._fetch_index_payload)
        #: index files written through this object
        self._index_files: set[bytes] = set()
        #: what the caller should tell the user: skipped key objects, vanished snapshots ...
        self.warnings: list[str] = []
        #: this host's record of repositories (repo/hostrecord.py); None once unusable
        self._records: HostRecords | None = None
        #: this host's copies of the snapshots (repo/snapshot_cache.py) and of the index blocks
        #: (repo/kept.py, section 12.11), each made at first use
        self._kept_copies: dict[type[KeptCopies], KeptCopies] = {}
        self._kept_lock = threading.Lock()
        #: the snapshot listing that opening took (``_check_history``) and when: the next
        #: ``snapshot_ids`` within ``LISTING_REUSE`` seconds takes it instead of listing again
        self._opening_listing: tuple[float, list[str]] | None = None

    # ---- opening -----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        backend: Backend,
        secret: bytes | None,
        *,
        key_kind: str = "passphrase",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pack_size: int = DEFAULT_PACK_SIZE,
        immutable_days: int | None = None,
        chunk_id: str = BLAKE3,
        records: HostRecords | None = None,
        cache_root: str | None = None,
    ) -> Repository:
        """Create a repository; ``secret=None`` makes an unencrypted one. ``immutable_days``:
        keep every data, index and snapshot object at least that long (docs/storage.md).
        ``chunk_id``: the chunk id function (crypto.CHUNK_ID_FUNCTIONS).
        ``records``: this host's record of repositories (default: in the state folder)."""
        if backend.exists("config"):
            raise RepositoryExistsError(f"{backend.url} already holds a repository")
        check_settings(chunk_size=chunk_size, pack_size=pack_size, immutable_days=immutable_days)
        try:
            require_id_function(chunk_id)  # before anything is written
        except ValueError as exc:
            raise RepositoryError(str(exc)) from None
        config = RepoConfig(
            id=os.urandom(16).hex(),
            # the lowest version that says it all, so that an earlier vmvault reads a repository
            # it would read right, and refuses one whose ids it would get wrong (section 11)
            version=INDEX_V2_VERSION if chunk_id == HMAC_SHA256 else CHUNK_ID_VERSION,
            chunk_size=chunk_size,
            pack_size=pack_size,
            encrypted=secret is not None,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            immutable_days=immutable_days,
            chunk_id=chunk_id,
        )
        key = MasterKey.generate() if secret is not None else MasterKey.unencrypted()
        key_id = ""
        if secret is not None:
            key_id = keys.add_key(backend, key, secret, kind=key_kind)
        raw = encode_config(config, key)
        # config last: a repository without config is not a repository yet; read back, for a
        # storage that keeps other bytes would leave a location no command could open
        try:
            put_confirmed(backend, "config", raw)
        except IntegrityError as exc:
            _remove_quietly(backend, ["config", *([f"keys/{key_id}"] if key_id else [])])
            raise IntegrityError(f"{exc}; no repository was made", name="config") from exc
        repo = cls(backend, config, key, key_id, cache_root=cache_root)
        repo._records = HostRecords() if records is None else records
        # a new repository at this location, by this host's own hand
        repo._remember(hashlib.sha256(raw).hexdigest())
        repo._apply_retention()
        return repo

    @classmethod
    def open(
        cls,
        backend: Backend,
        secret: Callable[[], bytes] | bytes | None,
        *,
        records: HostRecords | None = None,
        load_index: bool = False,
        cache_root: str | None = None,
    ) -> Repository:
        """Open a repository. No index file is read: the index (this host's cache of it) is
        brought up to date at its first use, or by ``load_index()`` (``load_index=True``: now).

        ``secret``: bytes when a passphrase or key file was *given*: the repository must then
        be encrypted, whatever its config says. A callable is asked only if the repository
        needs a secret (a prompt). None: no secret is available.
        ``records``: this host's record of repositories (default: in the state folder).
        ``cache_root``: this host's cache folder (default: ``index_cache.cache_root()``).

        Refuses (TamperingError) an unauthenticated config when key objects exist, when a
        secret was given, when this host saw the repository encrypted or its config
        different, a repository other than the one this host saw at the location, and a
        config of a lower format version than this host saw (an old config put back after a
        migration) (docs/design/repository-format.md, sections 10.1 and 10.7)."""
        records = HostRecords() if records is None else records
        try:
            stored = read_config(backend)
        except NoConfigError as exc:
            raise _no_config_where_one_was(backend, records, exc) from None
        config = stored.config
        warnings: list[str] = []
        record: RepoRecord | None = None
        seen_id: str | None = None
        records_usable = True
        try:
            with records.locked():
                seen_id = records.location(backend.url)
                record = records.load(config.id)
        except (OSError, ValueError) as exc:
            warnings.append(_record_unusable(records, exc))
            records_usable = False
        if seen_id is not None and seen_id != config.id:
            raise TamperingError(
                f"{backend.url} holds repository {config.id[:8]}, but this host last saw repository {seen_id[:8]} "
                "there: the storage was replaced. Refusing to use it. If you replaced it yourself, remove "
                f"{records.location_path(backend.url)} and run the command again."
            )
        if record is not None and config.version < record.version:
            raise TamperingError(
                f"{backend.url}: the config of repository {config.id[:8]} says format version {config.version}, but "
                f"this host saw version {record.version}: an older config was put back (a migration is never "
                "undone). Refusing to use it; nothing was written. If you restored the repository from an older "
                f"copy yourself, remove {records.record_path(config.id)}."
            )
        if config.encrypted and stored.authenticated:
            if callable(secret):
                secret = secret()
            if secret is None:
                raise RepositoryError("the repository is encrypted: give a passphrase or key file")
            unlocked = keys.unlock(backend, secret, prefer=record.key_id if record else None)
            stored.verify(unlocked.master)
            key, key_id, role = unlocked.master, unlocked.key_id, unlocked.role
            warnings += [f"key object {w} skipped" for w in unlocked.warnings]
        else:
            _refuse_unauthenticated(backend, stored, given=isinstance(secret, bytes), record=record, records=records)
            key, key_id, role = MasterKey.unencrypted(), "", keys.FULL
        repo = cls(backend, config, key, key_id, cache_root=cache_root)
        repo.warnings = warnings
        repo.role = role
        if records_usable:
            repo._records = records
            repo._remember(stored.sha256)
        repo._apply_retention()
        if load_index:
            repo.load_index()
        repo._check_history()
        return repo

    # ---- this host's record (repo/hostrecord.py) ---------------------------------------

    def _edit_record(self, change: Callable[[RepoRecord], None], *, first: Callable[[], None] | None = None) -> None:
        """Apply ``change`` to this host's record of the repository under the records' lock.
        ``first`` (a storage change the record describes) runs inside the same lock, so that
        a concurrent check never sees the storage changed and the record not yet; its errors
        are raised, while a record that cannot be used is only a warning."""
        with contextlib.ExitStack() as stack:
            records = self._records
            if records is not None:
                try:
                    stack.enter_context(records.locked())
                except (OSError, ValueError) as exc:
                    self._record_failed(records, exc)
                    records = None
            if first is not None:
                first()
            if records is None:
                return
            try:
                rec = records.load(self.config.id) or RepoRecord(
                    self.config.id, self.config.encrypted, "", first_seen=now()
                )
                change(rec)
                records.save(rec)
            except (OSError, ValueError) as exc:
                self._record_failed(records, exc)

    def _record_failed(self, records: HostRecords, exc: BaseException) -> None:
        self.warnings.append(_record_unusable(records, exc))
        self._records = None

    def _remember(self, config_sha256: str) -> None:
        def change(rec: RepoRecord) -> None:
            rec.encrypted = self.config.encrypted
            rec.config_sha256 = config_sha256
            rec.config_pending = ""
            rec.version = max(rec.version, self.config.version)
            if self.key_id:
                rec.key_id = self.key_id
            rec.last_seen = now()
            if self._records is not None and not self.backend.url.startswith("memory:"):
                # (a memory backend lives and dies with its process: no location to remember)
                self._records.set_location(self.backend.url, self.config.id)

        self._edit_record(change)

    def _check_history(self) -> None:
        """Warn when snapshots this host wrote are gone without a forget from this host, or
        snapshots it forgot are back. Entries recorded after the listing began are left out:
        another process of this host may be writing or forgetting right now."""
        if self._records is None:
            return
        listed_at = time.time()
        ids = self.snapshot_ids()
        self._opening_listing = (time.monotonic(), ids)
        present = set(ids)
        gone: list[tuple[float, str]] = []
        back: list[str] = []

        def change(rec: RepoRecord) -> None:
            for snap_id, when in list(rec.written.items()):
                if when < listed_at and snap_id not in present:
                    gone.append((when, snap_id))
                    del rec.written[snap_id]  # reported once
            back.extend(s for s, when in rec.forgotten.items() if when < listed_at and s in present)

        self._edit_record(change)
        if gone:
            when, newest = max(gone)
            at = dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds")
            self.warnings.append(
                f"{len(gone)} snapshots this host wrote are gone from {self.backend.url} though this host did not "
                f"forget them (the newest, {newest[:8]}, written {at}): forgotten from another host, or withheld, "
                "deleted or rolled back by the storage. (Reported once.)"
            )
        if back:
            self.warnings.append(
                f"{len(back)} snapshots this host forgot are back in {self.backend.url} "
                f"({', '.join(s[:8] for s in back[:5])}): replayed by the storage; their data may have been "
                "pruned (`vmvault check` tells). Forget them again."
            )

    def _apply_retention(self) -> None:
        """Ask the storage to enforce ``immutable_days`` where it can (S3 Object Lock)."""
        days = self.config.immutable_days
        if days is not None:
            self.retention_enforced = self.backend.use_retention(days)
        else:
            # the location may lock objects on its own (s3://...?immutable-days=N)
            self.retention_enforced = self.backend.enforces_immutability

    def close(self) -> None:
        self.index.close()
        self.backend.close()

    # ---- index -------------------------------------------------------------------------

    def _open_cache(self) -> IndexCache:
        return IndexCache(self.config.id, self.backend.url, root=self.cache_root)

    def _list_index_files(self) -> list[tuple[bytes, int, str]]:
        out = []
        for obj in self.backend.list("index/"):
            file_id = index_id(obj.name)
            if file_id is not None:  # not an index file: check warns about it, nothing else reads it
                out.append((file_id, obj.size, obj.stamp))
        return out

    def _fetch_index_payload(self, file_id: bytes, size: int) -> bytes | None:
        try:
            return self.read_index_payload(file_id, size)
        except ObjectNotFoundError:
            return None  # removed by a concurrent prune after the listing

    def load_index(self, *, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Bring this host's index cache up to date with the index files in storage (one listing
        of ``index/``, and the files not seen before); returns problems found (unreadable files
        are left out, and tried again next time)."""
        problems = self.index.sync(progress=progress)
        self.warnings.extend(w for w in self.index.warnings if w not in self.warnings)
        self.index.warnings.clear()
        return problems

    @property
    def index_version(self) -> int:
        """The index file version this repository is written with (section 12.2)."""
        return 2 if self.config.version >= INDEX_V2_VERSION else 1

    def read_index_payload(self, file_id: bytes, size: int = 0) -> bytes:
        """An index file's payload, verified (envelope, id) but not decoded. ``size``: its size
        in a listing, when known (a file is never rewritten: one larger than listed is not read,
        and one listed larger than any index file vmvault writes not at all: check reports it,
        repair supersedes it)."""
        name = f"index/{file_id.hex()}"
        if size > MAX_INDEX_FILE:
            raise IntegrityError(
                f"{name} is {size} bytes, more than any index file vmvault writes (damaged or planted); not read",
                name=name,
            )
        if 0 < size < MAX_INDEX_FILE:
            sealed = self.backend.get(name, 0, size + 1)
            if len(sealed) > size:
                raise IntegrityError(f"{name} is larger than the {size} bytes its listing says: not read", name=name)
        else:
            sealed = read_bounded(self.backend, name, MAX_INDEX_FILE, what=name)
        payload = open_envelope(self.key, sealed, name.encode(), what=name, max_size=MAX_INDEX_FILE)
        if hashlib.sha256(payload).digest() != file_id:
            raise IntegrityError(f"{name}: content does not match its name", name=name)
        return payload

    def index_payloads(self, files: Iterable[tuple[bytes, int]]) -> Iterator[tuple[bytes, bytes | VmvaultError]]:
        """``(id, payload, or why it does not read)`` of each of ``files`` (id, listed size or 0),
        in their order: read as many at once as the storage serves best, ahead of the caller (a
        round trip each from remote storage), at most ``PACKS_AHEAD`` bytes of them (a file of
        unknown size alone), so that the caller parses them one at a time."""

        def read(item: tuple[bytes, int]) -> bytes | VmvaultError:
            try:
                return self.read_index_payload(*item)
            except (IntegrityError, ObjectNotFoundError) as exc:
                return exc

        weighed = ((item, index_file_weight(item[1])) for item in files)
        for (file_id, _size), payload in ahead(
            weighed, read, workers=self.backend.prepare_reads(), max_weight=PACKS_AHEAD
        ):
            yield file_id, payload

    def read_index_file(self, file_id: bytes) -> IndexFile:
        name = f"index/{file_id.hex()}"
        return IndexFile.decode(self.read_index_payload(file_id), name=name)

    def write_index_file(self, index_file: IndexFile) -> bytes:
        return self.write_index_payload(index_file.encode())

    def write_index_payload(self, payload: bytes, *, batch: IngestBatch | None = None) -> bytes:
        """Store an encoded index file (``encode_index``); returns its id. It goes into this
        host's cache at once, or with the other files of ``batch`` (``RepoIndex.batch``)."""
        file_id = hashlib.sha256(payload).digest()
        name = f"index/{file_id.hex()}"
        sealed = seal_envelope(self.key, payload, name.encode())
        self.backend.put(name, sealed)
        self._index_files.add(file_id)
        self.index.ingested(file_id, payload, len(sealed), batch=batch)
        return file_id

    def confirm_written(
        self,
        packs: Mapping[bytes, int],
        index_files: Iterable[bytes],
        *,
        operation: str,
        earlier: tuple[Mapping[bytes, int], Iterable[bytes]] = ({}, ()),
    ) -> None:
        """Read back the packs (id -> length) and index files ``operation`` (prune, repair) just
        wrote, before it deletes anything they replace: a pack whole, its SHA-256 against its
        name, an index file through its envelope and name. A storage keeping other bytes than
        it was given (a full disk a server does not report, a faulty gateway) would otherwise
        have the last good copy deleted. As many are read at once as the storage serves best,
        at most ``PACKS_AHEAD`` bytes.

        When one does not read back, every object the operation wrote (these and ``earlier``)
        is deleted again as far as the storage allows (under its exclusive lock nothing else
        uses them: the repository is left as it was), and ``IntegrityError`` names it."""

        def confirm(item: tuple[str, bytes, int]) -> None:
            kind, object_id, size = item
            name = pack_name(object_id) if kind == "pack" else f"index/{object_id.hex()}"
            try:
                if kind == "index":
                    self.read_index_payload(object_id)
                    return
                data = self.backend.get(name, 0, size + 1)
            except (IntegrityError, ObjectNotFoundError) as exc:
                raise IntegrityError(f"{name}, just written, does not read back: {exc}", name=name) from exc
            if len(data) != size or hashlib.sha256(data).digest() != object_id:
                raise IntegrityError(
                    f"{name}, just written ({size} bytes), reads back as {len(data)} other bytes", name=name
                )

        index_files = list(index_files)
        items = [(("pack", pack_id, size), size) for pack_id, size in packs.items()]
        items += [(("index", file_id, 0), index_file_weight(0)) for file_id in index_files]
        try:
            for _item, _done in ahead(
                iter(items), confirm, workers=self.backend.prepare_reads(), max_weight=PACKS_AHEAD
            ):
                pass
        except IntegrityError as exc:
            names = [f"index/{f.hex()}" for f in [*index_files, *earlier[1]]]
            names += [pack_name(p) for p in [*packs, *earlier[0]]]
            removed = _remove_quietly(self.backend, names)
            raise IntegrityError(
                f"{operation} stopped before deleting anything: {exc}: the storage does not keep what it is given. "
                f"Of the {len(names)} objects {operation} wrote, {removed} were removed again; check the storage "
                f"(free space, the server's log), then run {operation} again",
                name=exc.name,
            ) from exc

    def new_index_files(self, packs: dict[bytes, list[BlobEntry]], lengths: dict[bytes, int]) -> list[IndexFile]:
        """Index files listing ``packs`` in this repository's index version, each below the
        version's size bound (section 12.2)."""
        version = self.index_version
        out: list[IndexFile] = []
        current = IndexFile(version=version)
        size = 16
        for pack_id, entries in packs.items():
            record = 40 + 45 * len(entries)
            if current.packs and version == 2 and size + record > MAX_V2_PAYLOAD:
                out.append(current)
                current, size = IndexFile(version=version), 16
            current.packs[pack_id] = entries
            if version == 2 and lengths.get(pack_id):
                current.lengths[pack_id] = lengths[pack_id]
            size += record
        if current.packs:
            out.append(current)
        return out

    def index_file_ids(self) -> set[bytes]:
        return set(self._index_files)

    # ---- blobs -------------------------------------------------------------------------

    def has_blob(self, blob_id: bytes) -> bool:
        return blob_id in self.index

    @property
    def pack_limit(self) -> int:
        """No pack this repository's writers produce is larger (repo/_limits.py)."""
        return pack_limit(self.config.pack_size, self.config.chunk_size)

    def pack_listings(self) -> list[str]:
        """The listings that name every pack: ``data/`` in one go for a repository of fewer than
        ``ONE_LISTING`` packs (by this host's index cache), else one ``data/xx/`` folder each, so
        that no listing holds more than 1/256 of its packs."""
        if self.index.cache.pack_count() < ONE_LISTING:
            return ["data/"]
        return [f"data/{n:02x}/" for n in range(256)]

    def iter_stored_packs(self) -> Iterator[tuple[bytes, int]]:
        """Every pack in storage with its size, listed as ``pack_listings`` says. Other names are
        skipped."""
        for prefix in self.pack_listings():
            for obj in self.backend.list(prefix):
                found = parse_pack_id(obj.name)
                if found is not None:
                    yield found, obj.size

    def list_stored_into(self, db: sqlite3.Connection, progress: PhaseCallback | None = None) -> tuple[int, int]:
        """Every pack in storage into the table ``s.stored`` (id, size) of ``db``, a connection
        from ``IndexCache.scratch``, a ``data/xx/`` folder at a time (``iter_stored_packs``);
        returns (packs, bytes). Memory holds one batch of rows, not the listing."""
        db.execute("CREATE TABLE s.stored(id BLOB PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID")
        batch: list[tuple[bytes, int]] = []
        for n, item in enumerate(self.iter_stored_packs()):
            batch.append(item)
            if len(batch) >= _SCRATCH_BATCH:
                write_many(db, "INSERT OR IGNORE INTO s.stored VALUES (?, ?)", batch)
                batch = []
                if progress is not None:
                    progress("list packs", n, 0)
        write_many(db, "INSERT OR IGNORE INTO s.stored VALUES (?, ?)", batch)
        count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM s.stored").fetchone()
        return int(count), int(size)

    def forget_lost_packs(self, progress: PhaseCallback | None = None) -> LostData:
        """Leave out of this object's index every blob copy whose pack is missing from storage,
        or too short to hold it, so nothing deduplicates against (or reads) data that is gone.

        Call it after the index was synced: a pack is uploaded before any index file names it,
        so a pack a concurrent backup indexed meanwhile is in the listing taken here. Index
        files and the cache are not changed (``repair_index`` does that). The listing and the
        comparison are in a scratch database (one pass over the cache's live rows); memory
        holds the packs found missing or short and the blobs of theirs with no other copy, the
        damage, not the repository. For maintenance; a backup confirms only the packs it uses
        (section 12.4).
        """
        cache = self.index.synced_cache()
        with cache.scratch() as db:
            self.list_stored_into(db, progress)
            missing, short = cache.lost_packs(db, tail=PACK_TRAILER.size)
            lost: set[bytes] = set()
            if missing or short:
                self.index.exclude(missing, short)
                for blob_id in cache.live_blobs_in(db, [*missing, *short]):
                    if not self.index.locations(blob_id):
                        lost.add(blob_id)
        return LostData(missing_packs=missing, short_packs=sorted(short), blobs=lost)

    def get_blob(self, blob_type: BlobType, blob_id: bytes, *, kept: bool = False) -> bytes:
        """A blob's plaintext, verified against its id. Raises IntegrityError naming it.

        Each indexed copy is tried in turn: a copy in a missing or damaged pack does not hide
        a good one elsewhere. When none serves, the index cache is brought up to date (a prune
        elsewhere may have moved the blob) and checked against the index files, and the copies
        tried again, once.

        ``kept`` (index blocks): this host's copy of the block (section 12.11), checked as the
        storage's is, stands in for the read while the index lists the block in a pack
        confirmed present; a block read from the storage is kept. ``check``, ``prune`` and
        ``repair`` read the storage.
        """
        keep = self._blocks_kept() if kept and blob_type is BlobType.INDEX else None
        if keep is not None:
            found = self._read_kept(keep, blob_type, blob_id)
            if found is not None:
                return found
        first_error: IntegrityError | None = None
        for attempt in range(2):
            locations = self.index.locations(blob_id)
            for loc in locations:
                try:
                    return self._read_blob(blob_type, blob_id, loc, keep)
                except IntegrityError as exc:
                    first_error = first_error or exc
            if attempt or not self._may_refresh(blob_id, bool(locations)):
                break
        if first_error is None:
            raise IntegrityError(
                f"{'chunk' if blob_type is BlobType.DATA else 'index block'} {blob_id.hex()} is missing "
                "from the repository index",
                object_id=blob_id.hex(),
            )
        raise first_error

    def _may_refresh(self, blob_id: bytes, had_copies: bool) -> bool:
        """After a blob could not be read: whether anything changed that makes a second try
        worth it (the cache held a wrong row, or a sync found new index files)."""
        if had_copies and not self.index.verify(blob_id):
            return True
        if time.monotonic() - self.index.synced_at < 30:
            return False  # synced a moment ago: a loss, not a stale cache
        self.load_index()
        return True

    def _read_kept(self, keep: KeptBlocks, blob_type: BlobType, blob_id: bytes) -> bytes | None:
        """The plaintext of this host's copy of ``blob_id`` when it is kept, the index lists the
        blob in a pack confirmed present, and the copy opens as the stored one must (a copy
        that does not is deleted); None otherwise."""
        sealed = keep.get(blob_id.hex())
        if sealed is None or not self.index.has_present(blob_id):
            return None
        locations = self.index.locations(blob_id)
        if locations:
            raw_length = locations[0].entry.raw_length
            with contextlib.suppress(IntegrityError):
                self.check_location(blob_id, locations[0])  # the lengths a writer of this repository makes
                data = open_blob(self.key, blob_type, blob_id, sealed, max_size=raw_length)
                if len(data) == raw_length:
                    return data
        keep.discard(blob_id.hex())
        return None

    def _blocks_kept(self) -> KeptBlocks:
        return self._kept(KeptBlocks)

    def _kept(self, kind: type[K]) -> K:
        """This host's copies of this repository's objects of ``kind`` (repo/kept.py)."""
        with self._kept_lock:
            found = self._kept_copies.get(kind)
            if found is None:
                # (a memory backend lives and dies with its process: nothing to keep)
                enabled = not self.backend.url.startswith("memory:")
                found = self._kept_copies[kind] = kind(
                    self.config.id, self.backend.url, root=self.cache_root, enabled=enabled
                )
            assert isinstance(found, kind)
            return found

    def keep_block(self, blob_id: bytes, sealed: Sequence[bytes]) -> None:
        """Keep the envelope (its parts) of the index block ``blob_id`` this process has just
        sealed (section 12.11)."""
        self._blocks_kept().put(blob_id.hex(), sealed)

    def read_index_block(
        self, block_id: bytes | str, *, count: int | None = None, what: str | None = None, kept: bool = False
    ) -> IndexBlock:
        """The index block ``block_id`` (bytes, or hex as a snapshot lists it), verified like
        every blob and decoded; with ``count`` it must hold exactly that many entries.
        IntegrityError (naming ``what``, by default the block) for anything else. ``kept``:
        this host's copy may stand in (``get_blob``)."""
        if isinstance(block_id, str):
            try:
                raw_id = bytes.fromhex(block_id)
            except ValueError:
                raw_id = b""
            if len(raw_id) != ID_SIZE:
                raise IntegrityError(f"index block id {block_id!r:.80} is not an id", object_id=str(block_id)[:64])
            block_id = raw_id
        raw = self.get_blob(BlobType.INDEX, block_id, kept=kept)
        try:
            return IndexBlock.decode(raw, count=count, what=what or f"index block {block_id.hex()}")
        except IntegrityError as exc:
            raise IntegrityError(str(exc), object_id=block_id.hex()) from None

    def index_block_ref(self, block: IndexBlock) -> str | None:
        """What a snapshot lists for ``block``: the hex id of its INDEX blob (keyed like every
        blob id), or None for a block of ZERO_ID entries only, which is never stored
        (repository-format.md, section 4)."""
        return None if block.empty else self.key.chunk_id(block.encode()).hex()

    def _read_blob(
        self, blob_type: BlobType, blob_id: bytes, loc: BlobLocation, keep: KeptBlocks | None = None
    ) -> bytes:
        name = self.check_location(blob_id, loc)
        try:
            sealed = self.backend.get(name, loc.entry.offset, loc.entry.length)
        except ObjectNotFoundError:
            raise IntegrityError(
                f"pack {loc.pack_id.hex()} holding blob {blob_id.hex()} is missing", object_id=blob_id.hex(), name=name
            ) from None
        except UnsafeStorageError as exc:  # a link planted where the pack belongs: as good as missing
            raise IntegrityError(
                f"pack {loc.pack_id.hex()} holding blob {blob_id.hex()} cannot be read: {exc}",
                object_id=blob_id.hex(),
                name=name,
            ) from exc
        data = self.open_located(blob_type, blob_id, loc, sealed)
        if keep is not None:
            keep.put(blob_id.hex(), sealed)
        return data

    def check_location(self, blob_id: bytes, loc: BlobLocation) -> str:
        """The name of the pack ``loc`` points into, once its entry's lengths are within what a
        writer of this repository makes (the index is read from storage: never allocate or
        fetch what it claims beyond that); IntegrityError otherwise."""
        name = pack_name(loc.pack_id)
        largest = largest_blob(self.config.chunk_size)
        if loc.entry.raw_length > largest or loc.entry.length > largest + ENVELOPE_OVERHEAD:
            raise IntegrityError(
                f"index entry of blob {blob_id.hex()} in pack {loc.pack_id.hex()} claims {loc.entry.length} bytes, "
                f"more than any blob of this repository ({largest + ENVELOPE_OVERHEAD})",
                object_id=blob_id.hex(),
                name=name,
            )
        return name

    def open_located(self, blob_type: BlobType, blob_id: bytes, loc: BlobLocation, sealed: bytes | memoryview) -> bytes:
        """The plaintext of the blob whose sealed bytes, read at ``loc``, are ``sealed``:
        decrypted and verified against its id and the index entry's lengths (IntegrityError
        naming the blob and the pack otherwise). ``check_location`` first."""
        name = pack_name(loc.pack_id)
        if len(sealed) != loc.entry.length:
            raise IntegrityError(
                f"pack {loc.pack_id.hex()} is truncated: blob {blob_id.hex()} cut short",
                object_id=blob_id.hex(),
                name=name,
            )
        try:
            data = open_blob(self.key, blob_type, blob_id, sealed, max_size=loc.entry.raw_length)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc} (in pack {loc.pack_id.hex()})", object_id=blob_id.hex(), name=name) from exc
        if len(data) != loc.entry.raw_length:
            raise IntegrityError(f"blob {blob_id.hex()} has the wrong length", object_id=blob_id.hex(), name=name)
        return data

    def writer(
        self, *, upload_threads: int = 3, index_every: int = 8, dedup: bool = True, budget: MemoryBudget | None = None
    ) -> BlobWriter:
        """A writer of new blobs. ``dedup=False`` stores every blob given once per writer,
        whatever the index holds (prune and repair copy blobs out of packs they delete).
        ``budget``: see ``BlobWriter``."""
        return BlobWriter(self, upload_threads=upload_threads, index_every=index_every, dedup=dedup, budget=budget)

    # ---- snapshots ---------------------------------------------------------------------

    def save_snapshot(self, snap: Snapshot) -> str:
        # the snapshot makes its data live: only if no prune can have run since the lock was
        # taken (repository-format.md, section 8: a backup resumed after a suspension)
        for lock in self._locks:
            lock.verify("writing the snapshot")
        if not snap.program:
            snap.program = f"vmvault {__version__}"
        payload = json.dumps(snap.to_dict(), sort_keys=True).encode()
        snap_id = hashlib.sha256(payload).hexdigest()
        name = f"snapshots/{snap_id}"
        sealed = seal_envelope(self.key, payload, b"snapshot")
        self._opening_listing = None
        # read back: this host keeps its own copy and reads it in place of the storage's, so
        # a snapshot the storage kept other bytes of would fail only on another host (the one
        # a restore after losing this one runs on)
        self.backend.put(name, sealed)
        try:
            confirm_stored(self.backend, name, sealed)
        except IntegrityError as exc:
            _remove_quietly(self.backend, [name])
            raise IntegrityError(f"{exc}; the snapshot was not saved", name=name) from exc
        except BackendError as exc:  # the storage took it; only reading it back failed
            self.warnings.append(
                f"snapshot {snap_id[:8]} is stored, but reading it back to confirm it failed ({exc}); "
                "`vmvault check` reads it again"
            )
        self._snapshots_kept().put(snap_id, sealed)
        snap.id = snap_id
        self._edit_record(lambda rec: rec.wrote(snap_id))
        return snap_id

    def _snapshots_kept(self) -> SnapshotCache:
        return self._kept(SnapshotCache)

    def load_snapshot(self, snap_id: str, *, listed: bool = False) -> Snapshot:
        """The snapshot ``snap_id``, read from the storage and checked (its envelope
        authenticated, its content hashed to its name).

        ``listed``: the caller has just seen ``snap_id`` in a listing of the storage, so this
        host's copy of it (repo/snapshot_cache.py), checked the same way, may stand in for the
        read. ``check``, ``prune`` and ``repair`` read the storage itself."""
        kept = self._snapshots_kept() if listed else None
        copy = kept.get(snap_id) if kept is not None else None
        if kept is not None and copy is not None:
            try:
                return self._open_snapshot(snap_id, copy)
            except IntegrityError:
                kept.discard(snap_id)  # damaged here: read it from the storage
        try:
            sealed = read_bounded(self.backend, f"snapshots/{snap_id}", MAX_SNAPSHOT, what=f"snapshot {snap_id[:8]}")
        except ObjectNotFoundError:
            raise SnapshotNotFoundError(f"no snapshot {snap_id}") from None
        snap = self._open_snapshot(snap_id, sealed)
        if kept is not None:
            kept.put(snap_id, sealed)
        return snap

    def _open_snapshot(self, snap_id: str, sealed: bytes) -> Snapshot:
        payload = open_envelope(
            self.key, sealed, b"snapshot", what=f"snapshot {snap_id[:8]}", max_size=MAX_SNAPSHOT_PAYLOAD
        )
        if hashlib.sha256(payload).hexdigest() != snap_id:
            raise IntegrityError(f"snapshot {snap_id[:8]}: content does not match its name", object_id=snap_id)
        try:
            doc = shape.loads(payload)
        except ValueError as exc:
            raise IntegrityError(f"snapshot {snap_id[:8]}: {exc}", object_id=snap_id) from exc
        return Snapshot.from_dict(doc, snapshot_id=snap_id)

    #: snapshots ``list_snapshots`` reads at once
    SNAPSHOT_READS = 8
    #: the ids of the snapshots ``whole`` reads ahead of its caller, at most (bytes in memory)
    SNAPSHOTS_AHEAD = 64 << 20

    #: how long the listing opening took serves the command that opened (``list_snapshots``)
    LISTING_REUSE = 5.0

    def snapshot_ids(self) -> list[str]:
        """The ids of ``snapshots/<id>`` objects; other names there are not snapshots (check reports them)."""
        found = (snapshot_id(o.name) for o in self.backend.list("snapshots/"))
        return [snap_id for snap_id in found if snap_id is not None]

    def _listed_ids(self) -> list[str]:
        """``snapshot_ids``, or once within ``LISTING_REUSE`` seconds of opening the listing
        opening took: ``restore latest`` would list again at once (a round trip to a remote
        store, two over SFTP). Never after a lock was taken or a snapshot written or deleted
        through this object (``prune`` and ``check`` list afresh, under their locks)."""
        opening, self._opening_listing = self._opening_listing, None
        if opening is not None and time.monotonic() - opening[0] < self.LISTING_REUSE:
            return list(opening[1])
        return self.snapshot_ids()

    def list_snapshots(
        self, *, on_error: Callable[[str, Exception], None] | None = None, kept: bool = True, summaries: bool = False
    ) -> list[Snapshot]:
        """Every readable snapshot, oldest first. Damaged ones are reported to ``on_error`` (in
        the listing's order, from the calling thread).

        With ``summaries``, each is a ``Snapshot.summary()``, without its index block and chunk
        ids (about 120 bytes per GiB of disk): what listing, selecting and retention need, so
        memory grows by a few KiB per snapshot, not with their disks' sizes. Load the one a
        command goes on with whole (``load_snapshot``).

        With ``kept`` (the default), this host's copies of the listed snapshots stand in for
        reading them (repo/snapshot_cache.py: each is checked as a read from the storage is),
        and copies of snapshots no longer listed are deleted; ``kept=False`` reads every
        snapshot from the storage (``prune``, ``repair snapshots``: it is the storage's copy
        that other hosts read). Up to ``SNAPSHOT_READS`` are read at once: each is a round trip to
        the storage (5 ms a snapshot measured on S3 over loopback; one after another, 2,000
        snapshots on a store 30 ms away would keep ``restore latest`` waiting a minute before
        its first chunk)."""
        ids = self._listed_ids() if kept else self.snapshot_ids()
        if kept:
            self._snapshots_kept().keep_only(set(ids))

        def load(snap_id: str) -> Snapshot | IntegrityError | SnapshotNotFoundError:
            try:
                snap = self.load_snapshot(snap_id, listed=kept)
            except (IntegrityError, SnapshotNotFoundError) as exc:
                return exc
            return snap.summary() if summaries else snap

        if len(ids) < 2:
            results = [load(snap_id) for snap_id in ids]
        else:
            pool = ThreadPoolExecutor(min(self.SNAPSHOT_READS, len(ids)), thread_name_prefix="vmvault-snapshots")
            try:
                results = list(pool.map(load, ids))
            finally:
                # a storage error ends the listing: the reads not yet started are not sent
                pool.shutdown(wait=True, cancel_futures=True)
        out = []
        for snap_id, result in zip(ids, results, strict=True):
            if isinstance(result, Snapshot):
                out.append(result)
            elif on_error is not None:
                on_error(snap_id, result)
        out.sort(key=lambda s: (s.time, s.id))
        return out

    def whole(
        self,
        snaps: Iterable[Snapshot],
        *,
        listed: bool = False,
        on_error: Callable[[Snapshot, IntegrityError | SnapshotNotFoundError], None] | None = None,
    ) -> Iterator[Snapshot]:
        """``snaps`` (summaries, or whole) read again whole from the storage (``listed``: as
        ``load_snapshot`` says), given one at a time in their order: a command that walks every
        snapshot holds a few snapshots' ids at once, not every snapshot's (repository-format.md
        12.10). They are read as many at once as the storage serves best, ahead of the caller (a
        round trip each from remote storage), their ids at most ``SNAPSHOTS_AHEAD`` bytes (a
        summary knows how many ids its snapshot has; its id is the hash of its content, so the
        whole one has as many). One that no longer reads raises, or with ``on_error`` is passed
        to it and skipped."""

        def load(snap: Snapshot) -> Snapshot | IntegrityError | SnapshotNotFoundError:
            try:
                return self.load_snapshot(snap.id, listed=listed)
            except (IntegrityError, SnapshotNotFoundError) as exc:
                return exc

        weighed = ((snap, _ID_BYTES * snap.id_count()) for snap in snaps)
        reads = self.backend.prepare_reads()
        for snap, whole in ahead(weighed, load, workers=reads, max_weight=self.SNAPSHOTS_AHEAD):
            if not isinstance(whole, Snapshot):
                if on_error is None:
                    raise whole
                on_error(snap, whole)
                continue
            yield whole

    def find_snapshot(self, ref: str, *, source: str | None = None) -> Snapshot:
        """``latest``, a full id, or a unique id prefix."""
        if ref == "latest":
            snaps = self.list_snapshots(summaries=True)
            if source is not None:
                snaps = [s for s in snaps if s.source.get("location") == source]
            if not snaps:
                raise SnapshotNotFoundError("the repository has no snapshots" + (f" of {source}" if source else ""))
            return self.load_snapshot(snaps[-1].id, listed=True)
        matches = [s for s in self.snapshot_ids() if s.startswith(ref)]
        if not matches:
            raise SnapshotNotFoundError(f"no snapshot matches {ref!r}")
        if len(matches) > 1:
            raise SnapshotNotFoundError(f"{ref!r} matches {len(matches)} snapshots; give more characters")
        return self.load_snapshot(matches[0], listed=True)

    def delete_snapshot(self, snap_id: str) -> None:
        if snapshot_id(f"snapshots/{snap_id}") is None:  # only a name vmvault writes is ever deleted
            raise ValueError(f"not a snapshot id: {snap_id!r}")
        self._opening_listing = None
        self._edit_record(lambda rec: rec.forgot(snap_id), first=lambda: self.backend.delete(f"snapshots/{snap_id}"))
        self._snapshots_kept().discard(snap_id)

    # ---- format version ----------------------------------------------------------------

    def migrate(self) -> bool:
        """Bring a version-1 repository to version 2, index files with pack lengths (section
        12.7): the config is rewritten with the new version, under the exclusive lock; nothing
        else changes. False when it is at that version or later already. Needs full access.

        The chunk id function is never changed (it would change the id of every chunk): a
        repository with HMAC-SHA-256 ids stays at version 2, readable by earlier vmvault."""
        from vmvault.repo.immutability import require_full_access

        require_full_access(self, "migrate")
        with self.lock(exclusive=True, operation="migrate"):
            stored = read_config(self.backend)
            if stored.config.id != self.config.id:
                raise TamperingError(
                    f"{self.backend.url}: the config changed to another repository while it was open; nothing migrated"
                )
            if stored.config.chunk_id != self.config.chunk_id:
                raise TamperingError(
                    f"{self.backend.url}: the config changed its chunk id function while it was open; nothing migrated"
                )
            if self.config.encrypted and stored.authenticated:
                stored.verify(self.key)
            elif self.config.encrypted:
                raise TamperingError(f"{self.backend.url}: the config lost its MAC while it was open; nothing migrated")
            if stored.config.version >= INDEX_V2_VERSION:
                self.config = stored.config
                return False
            new = dataclasses.replace(stored.config, version=INDEX_V2_VERSION)
            raw = encode_config(new, self.key)
            # recorded first: this host must not refuse the config it is about to write, nor,
            # killed before writing it, the one still there
            pending = hashlib.sha256(raw).hexdigest()
            self._edit_record(lambda rec: setattr(rec, "config_pending", pending))
            try:
                put_confirmed(self.backend, "config", raw)
            except IntegrityError as exc:
                # the config read when migrate began goes back: the repository stays as it was
                try:
                    put_confirmed(self.backend, "config", stored.raw)
                except VmvaultError as again:
                    raise IntegrityError(
                        f"{exc}; putting the earlier config back failed too ({again}): the repository cannot be "
                        f"opened until its config is restored; its {len(stored.raw)} bytes, in base64: "
                        f"{base64.b64encode(stored.raw).decode()}",
                        name="config",
                    ) from exc
                raise IntegrityError(f"{exc}; the earlier config is back, nothing migrated", name="config") from exc
            self.config = new
            self._remember(pending)  # and its version: never lower again
            return True

    # ---- locks -------------------------------------------------------------------------

    def lock(self, *, exclusive: bool, operation: str) -> RepositoryLock:
        self._opening_listing = None  # what runs under the lock lists afresh
        lock = RepositoryLock(self.backend, self.key, exclusive=exclusive, operation=operation)
        # forget released ones: only held locks are verified, and a long-lived Repository
        # (the scheduler daemon) takes one per job
        self._locks = [held for held in self._locks if held.held] + [lock]
        return lock


def _remove_quietly(backend: Backend, names: Iterable[str]) -> int:
    """Delete objects this process wrote and found not to read back (``put_confirmed``,
    ``Repository.confirm_written``), as far as the storage allows (retention may hold them);
    returns how many went. The error that follows says what matters."""
    removed = 0
    for name in names:
        with contextlib.suppress(VmvaultError):
            backend.delete(name)
            removed += 1
    return removed


@dataclass
class LostData:
    """What ``forget_lost_packs`` dropped from the in-memory index."""

    missing_packs: list[bytes] = field(default_factory=list)
    #: present, but shorter than the index says (blobs past the end are gone)
    short_packs: list[bytes] = field(default_factory=list)
    #: blobs with no copy left
    blobs: set[bytes] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.missing_packs or self.short_packs)

    def describe(self) -> str:
        parts = []
        if self.missing_packs:
            parts.append(f"{len(self.missing_packs)} packs named by the index are missing from storage")
        if self.short_packs:
            parts.append(f"{len(self.short_packs)} packs are shorter than the index says")
        return f"{' and '.join(parts)} ({len(self.blobs)} chunks and index blocks with no other copy)"


def snapshot_metadata() -> dict[str, str]:
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        "hostname": socket.gethostname(),
        "username": getpass.getuser(),
    }


@dataclass(frozen=True, slots=True)
class SealedBlob:
    """A blob compressed and encrypted by ``BlobWriter.seal``, not yet in a pack."""

    type: BlobType
    id: bytes
    #: the envelope's parts (``seal_envelope_parts``): a pack joins them, nothing copies them before
    parts: tuple[bytes, ...]
    raw_length: int

    @property
    def size(self) -> int:
        """The envelope's length."""
        return sum(len(part) for part in self.parts)


class BlobWriter:
    """Adds blobs to a repository, packing them and uploading packs in the background.

    ``add`` may be called from many threads. Memory is bounded: at most
    ``upload_threads + 1`` packs are held at once; ``add`` blocks while uploads catch up.
    Every ``index_every`` packs an index file is written, so an interrupted backup leaves
    reusable packs. ``flush`` uploads what remains and writes the final index file.

    With a ``budget`` (shared with the stages that feed the writer), the sealed bytes of the
    pack being filled are held in it (charged as they are placed, or handed over already held:
    ``place(charged=True)``), and a full pack takes its size once more for the copy it is
    joined into while written; both are given back when its upload ends. A full pack waits for
    the budget while other packs are being written.
    """

    def __init__(
        self,
        repo: Repository,
        *,
        upload_threads: int,
        index_every: int,
        dedup: bool = True,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.repo = repo
        self.budget = budget
        self._dedup = dedup
        self._lock = threading.Lock()
        self._builder = PackBuilder()
        self._pending: set[bytes] = set()
        self._slots = threading.BoundedSemaphore(upload_threads + 1)
        self._pool = ThreadPoolExecutor(max_workers=upload_threads, thread_name_prefix="vmvault-upload")
        self._futures: list[Future[None]] = []
        self._unindexed: dict[bytes, list[BlobEntry]] = {}
        self._lengths: dict[bytes, int] = {}
        #: index files this writer wrote
        self.index_files: list[bytes] = []
        #: packs a writer without dedup uploaded: id -> entries (prune and repair account for
        #: them; a backup's writer keeps none, its memory must not grow with the backup)
        self.uploaded: dict[bytes, list[BlobEntry]] = {}
        #: their lengths, for reading them back (``Repository.confirm_written``)
        self.uploaded_lengths: dict[bytes, int] = {}
        self._index_every = index_every
        self._last_index = time.monotonic()
        self._error: BaseException | None = None
        self.new_blobs = 0
        self.new_bytes = 0  # sealed bytes added
        self.new_raw_bytes = 0
        self.packs_written = 0
        self.index_blocks_added = 0

    def known(self, blob_id: bytes) -> bool:
        """Whether ``blob_id`` is stored in a pack this writer uploaded or confirmed present
        (section 7, backup rule 4), or is on its way into one."""
        return bool(self.known_of([blob_id]))

    def known_of(self, blob_ids: Iterable[bytes]) -> set[bytes]:
        """Those of ``blob_ids`` that ``known`` holds true of, asking the index about all of them
        at once (``RepoIndex.present_of``)."""
        wanted = list(dict.fromkeys(blob_ids))
        found = {blob_id for blob_id in wanted if blob_id in self._pending}
        rest = [blob_id for blob_id in wanted if blob_id not in found]
        if self._dedup and rest:
            found |= self.repo.index.present_of(rest)
        return found

    def add(self, blob_type: BlobType, blob_id: bytes, data: bytes | memoryview) -> bool:
        """Store ``data`` unless a blob with this id exists; returns True when it was new."""
        sealed = self.seal(blob_type, blob_id, data)
        return sealed is not None and self.place(sealed)

    def seal(self, blob_type: BlobType, blob_id: bytes, data: bytes | memoryview) -> SealedBlob | None:
        """Compress and encrypt ``data`` for ``place``, or None when the blob is known already.

        Thread-safe and lock-free: workers seal in parallel, and the caller places what they
        sealed in the order it chooses (the backup places a disk's chunks in disk order, so a
        pack holds neighbouring chunks side by side and a restore reads them in long runs).
        """
        sealed = self.seal_new(blob_type, [(blob_id, data)])
        return sealed[0] if sealed else None

    def seal_new(self, blob_type: BlobType, blobs: Iterable[tuple[bytes, bytes | memoryview]]) -> list[SealedBlob]:
        """``seal`` each ``(blob id, data)`` of ``blobs`` that is not known, in their order, asking
        the index about all of them at once (``RepoIndex.present_of``); an id met twice is sealed
        once. Thread-safe and lock-free, as ``seal``."""
        if self._error is not None:
            raise self._error
        todo = list(blobs)
        known = self.known_of(blob_id for blob_id, _ in todo)
        out: list[SealedBlob] = []
        for blob_id, data in todo:
            if blob_id in known:
                continue
            known.add(blob_id)
            # seal_blob's envelope, taking a view of the batch (the engine's chunks are not copied)
            sealed = seal_envelope_parts(self.repo.key, data, blob_aad(blob_type, blob_id))
            out.append(SealedBlob(blob_type, blob_id, sealed, len(data)))
        return out

    def place(self, blob: SealedBlob, *, charged: bool = False) -> bool:
        """Put a sealed blob into the current pack unless a blob with its id was placed or
        stored meanwhile; returns True when it was new. Uploads the pack when it is full.
        ``charged``: the blob's sealed bytes are held in the writer's budget already (handed
        over by the caller; given back here when the blob is not new)."""
        if self._error is not None:
            raise self._error
        full: PackBuilder | None = None
        budget = self.budget
        size = blob.size
        with self._lock:
            if blob.id in self._pending or (self._dedup and self.repo.index.uploaded(blob.id)):
                if budget is not None and charged:
                    budget.give(size)
                return False
            if budget is not None and not charged:
                budget.charge(size)
            self._pending.add(blob.id)
            self._builder.add(blob.type, blob.id, blob.parts, blob.raw_length)
            self.new_blobs += 1
            self.new_bytes += size
            self.new_raw_bytes += blob.raw_length
            if self._builder.size >= self.repo.config.pack_size:
                full, self._builder = self._builder, PackBuilder()
        if full is not None:
            self._submit(full)
        return True

    def add_index_block(self, block: IndexBlock) -> str | None:
        """Store ``block`` unless a blob with its id exists; returns what a snapshot lists for
        it (``Repository.index_block_ref``): its id in hex, or None for a block of ZERO_ID
        entries only, which is not stored. ``index_blocks_added`` counts the new ones."""
        ref = self.repo.index_block_ref(block)
        if ref is None:
            return None
        sealed = self.seal(BlobType.INDEX, bytes.fromhex(ref), block.encode())
        if sealed is not None and self.place(sealed):
            with self._lock:
                self.index_blocks_added += 1
            self.repo.keep_block(sealed.id, sealed.parts)
        return ref

    def _submit(self, builder: PackBuilder) -> None:
        budget = self.budget
        if budget is not None:
            budget.take(builder.size)  # the copy the pack is joined into
            budget.begin_release()
        self._slots.acquire()
        try:
            self._futures.append(self._pool.submit(self._upload, builder))
        except BaseException:
            self._slots.release()
            if budget is not None:
                budget.end_release(2 * builder.size)
            raise
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]

    def _upload(self, builder: PackBuilder) -> None:
        try:
            self._store_pack(builder)
        finally:
            self._slots.release()
            # the pack's bytes and its joined copy are gone with _store_pack's frame
            if self.budget is not None:
                self.budget.end_release(2 * builder.size)

    def _store_pack(self, builder: PackBuilder) -> None:
        try:
            pack_id, parts = builder.finish_parts(self.repo.key)
            self.repo.backend.put_parts(pack_name(pack_id), parts)
            length = sum(len(part) for part in parts)
            del parts  # not held while the index file is written
            write_index: dict[bytes, list[BlobEntry]] | None = None
            with self._lock:
                self.repo.index.add_pack(pack_id, builder.entries)
                for e in builder.entries:
                    self._pending.discard(e.id)
                self._unindexed[pack_id] = builder.entries
                self._lengths[pack_id] = length
                if not self._dedup:
                    self.uploaded[pack_id] = builder.entries
                    self.uploaded_lengths[pack_id] = length
                self.packs_written += 1
                if len(self._unindexed) >= self._index_every or time.monotonic() - self._last_index > 30:
                    self._last_index = time.monotonic()
                    write_index, self._unindexed = self._unindexed, {}
            if write_index is not None:
                self._write_index(write_index)
        except BaseException as exc:
            self._error = exc
            raise

    def flush(self) -> None:
        """Upload the current pack, wait for every upload, write the remaining index entries."""
        with self._lock:
            builder, self._builder = self._builder, PackBuilder()
        if len(builder):
            self._submit(builder)
        for f in list(self._futures):
            f.result()
        self._futures = []
        if self._error is not None:
            raise self._error
        with self._lock:
            write_index, self._unindexed = self._unindexed, {}
        if write_index:
            self._write_index(write_index)

    def _write_index(self, packs: dict[bytes, list[BlobEntry]]) -> None:
        with self._lock:
            lengths = {p: self._lengths.pop(p) for p in packs if p in self._lengths}
        for index_file in self.repo.new_index_files(packs, lengths):
            file_id = self.repo.write_index_file(index_file)
            with self._lock:
                self.index_files.append(file_id)

    def close(self, *, flush: bool = True) -> None:
        """Finish; without ``flush`` (a failed backup) still index every pack already uploaded,
        so the next run reuses them instead of uploading them again."""
        try:
            if flush and self._error is None:
                self.flush()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=not flush)
            with self._lock:
                leftover, self._unindexed = self._unindexed, {}
            if leftover:
                with contextlib.suppress(Exception):  # best effort: the storage may be what failed
                    self._write_index(leftover)

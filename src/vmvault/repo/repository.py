"""The repository: configuration, keys, blobs in packs, index files, snapshots.

Layout (see docs/design/repository-format.md)::

    config              plaintext JSON: format, version, id, chunk size, encryption, MAC
    keys/<id>           master key wrapped by a passphrase or key file
    data/<xx>/<id>      packs of sealed blobs (chunks and index blocks)
    index/<id>          which pack holds which blob
    snapshots/<id>      snapshot manifests, written last
    locks/<id>          shared (backup) and exclusive (prune) locks

Writes follow one rule that makes every crash safe: an object is written only after
everything it refers to is durable (packs, then index files, then the snapshot).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import hashlib
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vmvault import __version__
from vmvault.backends.base import Backend
from vmvault.errors import (
    IntegrityError,
    NotARepositoryError,
    ObjectNotFoundError,
    RepositoryError,
    RepositoryExistsError,
    SnapshotNotFoundError,
    UnsupportedVersionError,
)
from vmvault.repo import keys
from vmvault.repo._layout import FORMAT_VERSION, BlobType
from vmvault.repo.crypto import MasterKey, open_envelope, seal_envelope
from vmvault.repo.index import IndexFile, MasterIndex
from vmvault.repo.locks import RepositoryLock
from vmvault.repo.pack import BlobEntry, PackBuilder, blob_aad, open_blob, pack_name
from vmvault.repo.snapshot import Snapshot

__all__ = ["DEFAULT_CHUNK_SIZE", "BlobWriter", "RepoConfig", "Repository"]

#: chosen by measurement: docs/benchmarks.md, "chunk size"
DEFAULT_CHUNK_SIZE = 256 * 1024
#: target pack size: few objects for object stores, small enough to upload in parallel
DEFAULT_PACK_SIZE = 16 * 1024 * 1024
#: index blocks cover this many chunks (ID_SIZE bytes each: 128 KiB per index block)
INDEX_SPAN = 4096
_FORMAT_NAME = "vmvault-repository"


@dataclass(frozen=True)
class RepoConfig:
    id: str
    version: int
    chunk_size: int
    pack_size: int
    encrypted: bool
    created: str
    #: data, index and snapshot objects are kept at least this many days (None: no retention)
    immutable_days: int | None = None

    def body(self) -> dict[str, Any]:
        # immutable_days only when set, so the MAC of older configs stays what it was
        extra: dict[str, Any] = {} if self.immutable_days is None else {"immutable_days": self.immutable_days}
        return extra | {
            "format": _FORMAT_NAME,
            "version": self.version,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "pack_size": self.pack_size,
            "encryption": "aes-256-gcm" if self.encrypted else "none",
            "created": self.created,
        }


def _config_mac(key: MasterKey, body: dict[str, Any]) -> str:
    assert key.id_key is not None
    canonical = json.dumps(body, sort_keys=True).encode()
    return hmac.new(key.id_key, b"config" + canonical, "sha256").hexdigest()


def _read_config(backend: Backend) -> dict[str, Any]:
    try:
        raw = backend.get("config")
    except ObjectNotFoundError:
        raise NotARepositoryError(
            f"{backend.url} is not a vmvault repository (no config); create one with `vmvault init`"
        ) from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT_NAME:
            raise ValueError("not a vmvault config")
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotARepositoryError(f"{backend.url} is not a vmvault repository ({exc})") from exc
    version = doc.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{backend.url} has repository format version {version}; this vmvault ({__version__}) "
            f"reads versions up to {FORMAT_VERSION}. Upgrade vmvault."
        )
    return doc


class Repository:
    """An open repository. Thread-safe for reads; writes go through ``BlobWriter``."""

    def __init__(self, backend: Backend, config: RepoConfig, key: MasterKey, key_id: str) -> None:
        self.backend = backend
        self.config = config
        self.key = key
        self.key_id = key_id
        #: the opening key's role: "full" or "backup-only" (see repo/immutability.py)
        self.role = keys.FULL
        #: True when the storage itself refuses to delete retained objects (S3 Object Lock)
        self.retention_enforced = False
        #: locks taken through this object; save_snapshot verifies the held ones
        self._locks: list[RepositoryLock] = []
        self.index = MasterIndex()
        self._index_files: set[bytes] = set()
        self._pack_cache: dict[str, bytes] = {}
        self._pack_cache_lock = threading.Lock()

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
    ) -> Repository:
        """Create a repository; ``secret=None`` makes an unencrypted one. ``immutable_days``:
        keep every data, index and snapshot object at least that long (docs/storage.md)."""
        if backend.exists("config"):
            raise RepositoryExistsError(f"{backend.url} already holds a repository")
        if chunk_size & (chunk_size - 1) or not 4096 <= chunk_size <= 64 << 20:
            raise RepositoryError(f"chunk size {chunk_size} must be a power of two from 4 KiB to 64 MiB")
        if immutable_days is not None and not 1 <= immutable_days <= 36500:
            raise RepositoryError(f"immutable days must be from 1 to 36500, not {immutable_days}")
        config = RepoConfig(
            id=os.urandom(16).hex(),
            version=FORMAT_VERSION,
            chunk_size=chunk_size,
            pack_size=pack_size,
            encrypted=secret is not None,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            immutable_days=immutable_days,
        )
        key = MasterKey.generate() if secret is not None else MasterKey.unencrypted()
        key_id = ""
        if secret is not None:
            key_id = keys.add_key(backend, key, secret, kind=key_kind)
        body = config.body()
        if key.encrypted:
            body["mac"] = _config_mac(key, config.body())
        # config last: a repository without config is not a repository yet
        backend.put("config", json.dumps(body, indent=1).encode())
        repo = cls(backend, config, key, key_id)
        repo._apply_retention()
        return repo

    @classmethod
    def open(cls, backend: Backend, secret: Callable[[], bytes] | bytes | None) -> Repository:
        """Open and load the index. ``secret`` may be a callable, asked only if needed."""
        doc = _read_config(backend)
        try:
            config = RepoConfig(
                id=str(doc["id"]),
                version=int(doc["version"]),
                chunk_size=int(doc["chunk_size"]),
                pack_size=int(doc.get("pack_size", DEFAULT_PACK_SIZE)),
                encrypted=doc.get("encryption") != "none",
                created=str(doc.get("created", "")),
                immutable_days=int(doc["immutable_days"]) if doc.get("immutable_days") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{backend.url}: damaged config: {exc}", name="config") from exc
        if config.encrypted:
            if callable(secret):
                secret = secret()
            if secret is None:
                raise RepositoryError("the repository is encrypted: give a passphrase or key file")
            key, key_id = keys.unlock(backend, secret)
            if not hmac.compare_digest(str(doc.get("mac", "")), _config_mac(key, config.body())):
                raise IntegrityError(
                    f"{backend.url}: the config does not match its MAC (tampered or damaged)", name="config"
                )
        else:
            key, key_id = MasterKey.unencrypted(), ""
        repo = cls(backend, config, key, key_id)
        if key_id:
            repo.role = keys.key_role(backend, key_id)
        repo._apply_retention()
        repo.load_index()
        return repo

    def _apply_retention(self) -> None:
        """Ask the storage to enforce ``immutable_days`` where it can (S3 Object Lock)."""
        days = self.config.immutable_days
        use = getattr(self.backend, "use_retention", None)
        if days is not None and callable(use):
            self.retention_enforced = bool(use(days))
        else:
            # the location may lock objects on its own (s3://...?immutable-days=N)
            self.retention_enforced = self.backend.enforces_immutability

    def close(self) -> None:
        self.backend.close()

    # ---- index -------------------------------------------------------------------------

    def load_index(self) -> list[str]:
        """(Re)load every index file; returns problems found (damaged files are skipped)."""
        problems: list[str] = []
        self.index = MasterIndex()
        files: dict[bytes, IndexFile] = {}
        for obj in self.backend.list("index/"):
            try:
                file_id = bytes.fromhex(obj.name.removeprefix("index/"))
            except ValueError:
                continue  # not an index file (check warns about it); never fail opening over it
            try:
                files[file_id] = self.read_index_file(file_id)
            except ObjectNotFoundError:
                continue  # removed by a concurrent prune after we listed
            except IntegrityError as exc:
                problems.append(str(exc))
        superseded = {s for f in files.values() for s in f.supersedes}
        for file_id, f in files.items():
            if file_id in superseded:
                continue
            for pack_id, entries in f.packs.items():
                self.index.add_pack(pack_id, entries)
        self._index_files = set(files)
        return problems

    def read_index_file(self, file_id: bytes) -> IndexFile:
        name = f"index/{file_id.hex()}"
        payload = open_envelope(self.key, self.backend.get(name), name.encode(), what=name)
        if hashlib.sha256(payload).digest() != file_id:
            raise IntegrityError(f"{name}: content does not match its name", name=name)
        return IndexFile.decode(payload, name=name)

    def write_index_file(self, index_file: IndexFile) -> bytes:
        payload = index_file.encode()
        file_id = hashlib.sha256(payload).digest()
        name = f"index/{file_id.hex()}"
        self.backend.put(name, seal_envelope(self.key, payload, name.encode()))
        self._index_files.add(file_id)
        return file_id

    def index_file_ids(self) -> set[bytes]:
        return set(self._index_files)

    # ---- blobs -------------------------------------------------------------------------

    def has_blob(self, blob_id: bytes) -> bool:
        return blob_id in self.index

    def get_blob(self, blob_type: BlobType, blob_id: bytes) -> bytes:
        """A blob's plaintext, verified against its id. Raises IntegrityError naming it."""
        loc = self.index.lookup(blob_id)
        if loc is None:
            raise IntegrityError(
                f"{'chunk' if blob_type is BlobType.DATA else 'index block'} {blob_id.hex()} is missing "
                "from the repository index",
                object_id=blob_id.hex(),
            )
        name = pack_name(loc.pack_id)
        try:
            sealed = self.backend.get(name, loc.entry.offset, loc.entry.length)
        except ObjectNotFoundError:
            raise IntegrityError(
                f"pack {loc.pack_id.hex()} holding blob {blob_id.hex()} is missing", object_id=blob_id.hex(), name=name
            ) from None
        if len(sealed) != loc.entry.length:
            raise IntegrityError(
                f"pack {loc.pack_id.hex()} is truncated: blob {blob_id.hex()} cut short",
                object_id=blob_id.hex(),
                name=name,
            )
        try:
            data = open_blob(self.key, blob_type, blob_id, sealed)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc} (in pack {loc.pack_id.hex()})", object_id=blob_id.hex(), name=name) from exc
        if len(data) != loc.entry.raw_length:
            raise IntegrityError(f"blob {blob_id.hex()} has the wrong length", object_id=blob_id.hex(), name=name)
        return data

    def writer(self, *, upload_threads: int = 3, index_every: int = 8) -> BlobWriter:
        return BlobWriter(self, upload_threads=upload_threads, index_every=index_every)

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
        self.backend.put(name, seal_envelope(self.key, payload, b"snapshot"))
        snap.id = snap_id
        return snap_id

    def load_snapshot(self, snap_id: str) -> Snapshot:
        name = f"snapshots/{snap_id}"
        try:
            sealed = self.backend.get(name)
        except ObjectNotFoundError:
            raise SnapshotNotFoundError(f"no snapshot {snap_id}") from None
        payload = open_envelope(self.key, sealed, b"snapshot", what=f"snapshot {snap_id[:8]}")
        if hashlib.sha256(payload).hexdigest() != snap_id:
            raise IntegrityError(f"snapshot {snap_id[:8]}: content does not match its name", object_id=snap_id)
        try:
            doc = json.loads(payload)
        except ValueError as exc:
            raise IntegrityError(f"snapshot {snap_id[:8]}: {exc}", object_id=snap_id) from exc
        return Snapshot.from_dict(doc, snapshot_id=snap_id)

    def snapshot_ids(self) -> list[str]:
        return [o.name.removeprefix("snapshots/") for o in self.backend.list("snapshots/")]

    def list_snapshots(self, *, on_error: Callable[[str, Exception], None] | None = None) -> list[Snapshot]:
        """Every readable snapshot, oldest first. Damaged ones are reported to ``on_error``."""
        out = []
        for snap_id in self.snapshot_ids():
            try:
                out.append(self.load_snapshot(snap_id))
            except (IntegrityError, SnapshotNotFoundError) as exc:
                if on_error is not None:
                    on_error(snap_id, exc)
        out.sort(key=lambda s: (s.time, s.id))
        return out

    def find_snapshot(self, ref: str, *, source: str | None = None) -> Snapshot:
        """``latest``, a full id, or a unique id prefix."""
        if ref == "latest":
            snaps = self.list_snapshots()
            if source is not None:
                snaps = [s for s in snaps if s.source.get("location") == source]
            if not snaps:
                raise SnapshotNotFoundError("the repository has no snapshots" + (f" of {source}" if source else ""))
            return snaps[-1]
        matches = [s for s in self.snapshot_ids() if s.startswith(ref)]
        if not matches:
            raise SnapshotNotFoundError(f"no snapshot matches {ref!r}")
        if len(matches) > 1:
            raise SnapshotNotFoundError(f"{ref!r} matches {len(matches)} snapshots; give more characters")
        return self.load_snapshot(matches[0])

    def delete_snapshot(self, snap_id: str) -> None:
        self.backend.delete(f"snapshots/{snap_id}")

    # ---- locks -------------------------------------------------------------------------

    def lock(self, *, exclusive: bool, operation: str) -> RepositoryLock:
        lock = RepositoryLock(self.backend, self.key, exclusive=exclusive, operation=operation)
        # forget released ones: only held locks are verified, and a long-lived Repository
        # (the scheduler daemon) takes one per job
        self._locks = [held for held in self._locks if held.held] + [lock]
        return lock


def snapshot_metadata() -> dict[str, str]:
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        "hostname": socket.gethostname(),
        "username": getpass.getuser(),
    }


class BlobWriter:
    """Adds blobs to a repository, packing them and uploading packs in the background.

    ``add`` may be called from many threads. Memory is bounded: at most
    ``upload_threads + 1`` packs are held at once; ``add`` blocks while uploads catch up.
    Every ``index_every`` packs an index file is written, so an interrupted backup leaves
    reusable packs. ``flush`` uploads what remains and writes the final index file.
    """

    def __init__(self, repo: Repository, *, upload_threads: int, index_every: int) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        self._builder = PackBuilder()
        self._pending: set[bytes] = set()
        self._slots = threading.BoundedSemaphore(upload_threads + 1)
        self._pool = ThreadPoolExecutor(max_workers=upload_threads, thread_name_prefix="vmvault-upload")
        self._futures: list[Future[None]] = []
        self._unindexed: dict[bytes, list[BlobEntry]] = {}
        self._index_every = index_every
        self._last_index = time.monotonic()
        self._error: BaseException | None = None
        self.new_blobs = 0
        self.new_bytes = 0  # sealed bytes added
        self.new_raw_bytes = 0
        self.packs_written = 0

    def known(self, blob_id: bytes) -> bool:
        return blob_id in self.repo.index or blob_id in self._pending

    def add(self, blob_type: BlobType, blob_id: bytes, data: bytes | memoryview) -> bool:
        """Store ``data`` unless a blob with this id exists; returns True when it was new."""
        if self._error is not None:
            raise self._error
        if self.known(blob_id):
            return False
        # seal_blob's envelope, taking a view of the batch (the engine's chunks are not copied)
        sealed = seal_envelope(self.repo.key, data, blob_aad(blob_type, blob_id))
        full: PackBuilder | None = None
        with self._lock:
            if blob_id in self._pending or blob_id in self.repo.index:
                return False
            self._pending.add(blob_id)
            self._builder.add(blob_type, blob_id, sealed, len(data))
            self.new_blobs += 1
            self.new_bytes += len(sealed)
            self.new_raw_bytes += len(data)
            if self._builder.size >= self.repo.config.pack_size:
                full, self._builder = self._builder, PackBuilder()
        if full is not None:
            self._submit(full)
        return True

    def _submit(self, builder: PackBuilder) -> None:
        self._slots.acquire()
        try:
            self._futures.append(self._pool.submit(self._upload, builder))
        except BaseException:
            self._slots.release()
            raise
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]

    def _upload(self, builder: PackBuilder) -> None:
        try:
            pack_id, data = builder.finish(self.repo.key)
            self.repo.backend.put(pack_name(pack_id), data)
            write_index: dict[bytes, list[BlobEntry]] | None = None
            with self._lock:
                self.repo.index.add_pack(pack_id, builder.entries)
                for e in builder.entries:
                    self._pending.discard(e.id)
                self._unindexed[pack_id] = builder.entries
                self.packs_written += 1
                if len(self._unindexed) >= self._index_every or time.monotonic() - self._last_index > 30:
                    self._last_index = time.monotonic()
                    write_index, self._unindexed = self._unindexed, {}
            if write_index is not None:
                self.repo.write_index_file(IndexFile(packs=write_index))
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._slots.release()

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
            self.repo.write_index_file(IndexFile(packs=write_index))

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
                    self.repo.write_index_file(IndexFile(packs=leftover))


def iter_chunk_ids(index_block: bytes) -> Iterator[bytes]:
    for i in range(0, len(index_block), 32):
        yield index_block[i : i + 32]

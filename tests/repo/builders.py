"""Build small repositories directly with BlobWriter + Snapshot, and read them back.

Independent of the backup engine on purpose: maintenance tests must not depend on it, and
a reader written here from the format rules checks the format, not the engine's view of it.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import mmap
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import BackendConnectionError
from vmvault.repo._layout import ID_SIZE, PARENT_ID, ZERO_ID, BlobType
from vmvault.repo.crypto import seal_envelope
from vmvault.repo.repository import BlobWriter, Repository
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

CHUNK = 4096
PASS = b"correct horse"
#: small index blocks so a small disk has several of them
SPAN = 4


def make_repo(backend: Backend, *, encrypted: bool = True, pack_size: int = 24 * 1024) -> Repository:
    os.environ["VMVAULT_TEST_CHEAP_KDF"] = "1"
    return Repository.init(backend, PASS if encrypted else None, chunk_size=CHUNK, pack_size=pack_size)


def reopen(repo: Repository) -> Repository:
    return Repository.open(repo.backend, PASS if repo.config.encrypted else None)


def disk_image(seed: int, n_chunks: int, *, zero_every: int = 5, shared: bytes | None = None) -> bytes:
    """Random chunks with some all-zero ones; ``shared`` chunks are placed first (for dedup)."""
    rnd = random.Random(seed)
    parts = []
    if shared:
        parts.append(shared)
    for i in range(n_chunks - len(shared or b"") // CHUNK):
        if zero_every and i % zero_every == zero_every - 1:
            parts.append(bytes(CHUNK))
        else:
            parts.append(rnd.randbytes(CHUNK))
    return b"".join(parts)


def store_disk(repo: Repository, writer: BlobWriter, name: str, data: bytes, *, span: int = SPAN) -> DiskRecord:
    cs = repo.config.chunk_size
    entries: list[bytes] = []
    for off in range(0, len(data), cs):
        piece = data[off : off + cs]
        if piece.count(0) == len(piece):
            entries.append(ZERO_ID)
            continue
        cid = repo.key.chunk_id(piece)
        writer.add(BlobType.DATA, cid, piece)
        entries.append(cid)
    index: list[str | None] = []
    for b in range(0, len(entries), span):
        block = entries[b : b + span]
        if all(e == ZERO_ID for e in block):
            index.append(None)
            continue
        raw = b"".join(block)
        bid = repo.key.chunk_id(raw)
        writer.add(BlobType.INDEX, bid, raw)
        index.append(bid.hex())
    return DiskRecord(name=name, format="raw", size=len(data), chunk_size=cs, index_span=span, index=index)


def store_file(repo: Repository, writer: BlobWriter, name: str, data: bytes) -> FileRecord:
    cs = repo.config.chunk_size
    chunks = []
    for off in range(0, len(data), cs):
        piece = data[off : off + cs]
        cid = repo.key.chunk_id(piece)
        writer.add(BlobType.DATA, cid, piece)
        chunks.append(cid.hex())
    return FileRecord(name=name, size=len(data), mode=0o644, mtime_ns=0, chunks=chunks)


@dataclass
class Content:
    disks: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


def backup(
    repo: Repository,
    content: Content,
    *,
    location: str = "vm1",
    time: dt.datetime | None = None,
    tags: list[str] | None = None,
    host: str = "host1",
    dedup: bool = True,
    span: int = SPAN,
    parent: str | None = None,
) -> Snapshot:
    """One snapshot following the write order: packs, index files (flush), snapshot.
    ``dedup=False``: store every blob again, as a backup racing another one does (the same
    blobs then sit in two packs). ``span``: chunks per index block."""
    writer = repo.writer(upload_threads=2, index_every=2, dedup=dedup)
    try:
        disks = [store_disk(repo, writer, n, d, span=span) for n, d in content.disks.items()]
        files = [store_file(repo, writer, n, d) for n, d in content.files.items()]
    finally:
        writer.close()
    when = time or dt.datetime.now(dt.UTC)
    snap = Snapshot(
        time=when.isoformat(timespec="microseconds"),
        hostname=host,
        username="tester",
        source={"kind": "files", "location": location},
        tags=list(tags or []),
        parent=parent,
        disks=disks,
        files=files,
    )
    repo.save_snapshot(snap)
    return snap


def read_disk(repo: Repository, disk: DiskRecord) -> bytes:
    out = bytearray()
    per_block = disk.index_span * disk.chunk_size
    for b, block_id in enumerate(disk.index):
        block_bytes = min(per_block, disk.size - b * per_block)
        if block_id is None:
            out += bytes(block_bytes)
            continue
        raw = repo.get_blob(BlobType.INDEX, bytes.fromhex(block_id))
        for i in range(0, len(raw), ID_SIZE):
            entry = raw[i : i + ID_SIZE]
            n = min(disk.chunk_size, disk.size - len(out))
            if entry == ZERO_ID:
                out += bytes(n)
            elif entry == PARENT_ID:
                raise AssertionError("layers are not built by these tests")
            else:
                out += repo.get_blob(BlobType.DATA, entry)
    return bytes(out)


def read_file(repo: Repository, rec: FileRecord) -> bytes:
    return b"".join(repo.get_blob(BlobType.DATA, bytes.fromhex(c)) for c in rec.chunks)


def restore_all(repo: Repository, snap: Snapshot) -> Content:
    return Content(
        disks={d.name: read_disk(repo, d) for d in snap.disks},
        files={f.name: read_file(repo, f) for f in snap.files},
    )


def storage_bytes(backend: Backend, prefix: str = "") -> int:
    return sum(o.size for o in backend.list(prefix))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_dead_lock(repo: Repository, *, exclusive: bool) -> str:
    """A lock object as a process on this host that died holding it would leave."""
    name = f"locks/{secrets.token_hex(16)}"
    doc = {
        "hostname": socket.gethostname(),
        "pid": dead_pid(),
        "time": time.time(),
        "exclusive": exclusive,
        "operation": "prune" if exclusive else "backup",
    }
    repo.backend.put(name, seal_envelope(repo.key, json.dumps(doc).encode(), b"lock " + name.encode()))
    return name


class WholeSnapshots:
    """Watches ``Repository.load_snapshot`` (patched through ``monkeypatch``): ``most`` is the
    largest number of whole snapshots (not summaries) it returned that were alive at once, as
    seen at each load; a command that walks every snapshot one at a time keeps it at 2 (the one
    being walked and the one just read).

    Counted at the loads of the thread that made the watcher (the walk's): a listing's threads
    each hold the snapshot they load until they have made its summary, a moment in which
    another thread's count would take them for kept. Whole snapshots they leave behind are
    still counted at the walk's next load."""

    def __init__(self, monkeypatch: Any) -> None:
        self.most = 0
        self._loaded: list[weakref.ref[Snapshot]] = []
        walker = threading.get_ident()
        load = Repository.load_snapshot

        def loading(repo: Repository, snap_id: str, **kwargs: Any) -> Snapshot:
            snap = load(repo, snap_id, **kwargs)
            self._loaded.append(weakref.ref(snap))
            if threading.get_ident() != walker:
                return snap
            gc.collect()
            alive = sum(1 for w in self._loaded if (s := w()) is not None and not s.is_summary)
            self.most = max(self.most, alive)
            return snap

        monkeypatch.setattr(Repository, "load_snapshot", loading)


class KeepsOtherBytes(MemoryBackend):
    """Storage that, once ``garble`` is set, keeps the objects under ``prefix`` cut short and
    says nothing of it (a server not reporting a full disk, a faulty gateway)."""

    garble = False
    prefix = "data/"

    def put(self, name: str, data: bytes) -> None:
        super().put(name, bytes(data)[:-10] if self.garble and name.startswith(self.prefix) else data)

    def put_parts(self, name: str, parts: list[bytes]) -> None:
        self.put(name, b"".join(parts))


class WatchedPacks(LocalBackend):
    """Storage whose reads of packs take a while (a round trip): counts how many whole packs
    are read at once (``most_running``) and, apart, how many ranged reads inside packs
    (``most_ranged``); with ``slow_folders`` the reads of index files and snapshots too, by
    folder (``most_in``); ``reads_at_once`` is what it says it serves best."""

    reads_at_once = 4

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.running = self.most_running = 0
        self.ranged = self.most_ranged = 0
        self.fail_pack: str | None = None
        self.asked: list[str] = []
        #: reads of index files and snapshots take a while too, counted by folder
        self.slow_folders = False
        self.in_folder: dict[str, int] = {}
        self.most_in: dict[str, int] = {}
        self._watch = threading.Lock()

    def prepare_reads(self) -> int:
        return self.reads_at_once

    def get_into(self, name: str, offset: int, length: int, buffer: mmap.mmap) -> memoryview:
        return memoryview(self.get(name, offset, length))  # (counted, as every read of a pack)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        folder = name.split("/", 1)[0]
        if folder in ("index", "snapshots") and self.slow_folders:
            with self._watch:
                self.in_folder[folder] = self.in_folder.get(folder, 0) + 1
                self.most_in[folder] = max(self.most_in.get(folder, 0), self.in_folder[folder])
            try:
                time.sleep(0.01)
                return super().get(name, offset, length)
            finally:
                with self._watch:
                    self.in_folder[folder] -= 1
        if folder != "data":
            return super().get(name, offset, length)
        whole = not offset and (length is None or length >= os.path.getsize(os.path.join(self.root, name)))
        with self._watch:
            if whole:
                self.asked.append(name)
                self.running += 1
                self.most_running = max(self.most_running, self.running)
            else:
                self.ranged += 1
                self.most_ranged = max(self.most_ranged, self.ranged)
        try:
            time.sleep(0.02)
            if name == self.fail_pack:
                raise BackendConnectionError(f"gave up on reading {name}: connection reset", name=name)
            return super().get(name, offset, length)
        finally:
            with self._watch:
                if whole:
                    self.running -= 1
                else:
                    self.ranged -= 1

"""Check a repository's structure and, optionally, every byte of its data.

Structure (cheap: lists objects, reads small ones):
config, key files, locks, every index file, every snapshot manifest, every index block
a snapshot needs, that every blob a snapshot needs is in the index, and that every indexed
pack exists with the size its index entries imply. Packs no index names and superseded
index files are warnings: a killed backup or prune leaves them and the next prune removes
them.

``read_data`` downloads each pack (or a deterministic pseudo-random ``subset`` of them),
checks that its SHA-256 is its name, parses its header, compares the header with the index,
and opens every blob (decrypt, decompress, re-hash against its id).

Every problem names the damaged object and everything it affects: each snapshot (id, time,
source) and each disk or file in it, with the byte ranges (chunk index x chunk size) that
can no longer be restored. A damaged object nothing references is still an error: a later
backup would deduplicate against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault.errors import IntegrityError, ObjectNotFoundError, SnapshotNotFoundError, VmvaultError
from vmvault.repo._layout import FORMAT_VERSION, ID_SIZE, PACK_MAGIC, PACK_TRAILER, PARENT_ID, ZERO_ID, BlobType
from vmvault.repo.crypto import MasterKey, seal_envelope
from vmvault.repo.index import IndexFile
from vmvault.repo.locks import list_locks
from vmvault.repo.pack import BlobEntry, open_blob, pack_name, parse_pack_header
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

__all__ = ["Affected", "CheckReport", "Problem", "check"]

Progress = Callable[[str, int, int], None]

ERROR = "error"
WARNING = "warning"


@dataclass
class Affected:
    """One disk or file of one snapshot that a problem makes (partly) unrestorable."""

    snapshot: str
    time: str
    source: dict[str, str]
    kind: str  # "disk", "file" or "snapshot" (the manifest itself)
    name: str
    #: [start, end) byte ranges of the disk or file, merged
    ranges: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "time": self.time,
            "source": dict(self.source),
            "kind": self.kind,
            "name": self.name,
            "ranges": [list(r) for r in self.ranges],
            "bytes": sum(e - s for s, e in self.ranges),
        }


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    kind: str  # e.g. "pack-missing", "blob-damaged", "index-file-damaged", "orphan-pack"
    object: str  # the object's name in storage, or "blob <id>"
    message: str
    object_id: str = ""
    affects: list[Affected] = field(default_factory=list)
    #: the blobs this problem makes unreadable (internal: used to find what is affected)
    blob_ids: set[bytes] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "kind": self.kind,
            "object": self.object,
            "object_id": self.object_id,
            "message": self.message,
            "affects": [a.to_dict() for a in self.affects],
        }


@dataclass
class CheckReport:
    read_data: bool
    subset: float | None
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    #: snapshots with no error affecting them
    intact_snapshots: list[str] = field(default_factory=list)
    damaged_snapshots: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "read_data": self.read_data,
            "subset": self.subset,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "stats": dict(self.stats),
            "intact_snapshots": list(self.intact_snapshots),
            "damaged_snapshots": list(self.damaged_snapshots),
        }


def check(
    repo: Repository,
    *,
    read_data: bool = False,
    subset: float | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    lock: bool = True,
) -> CheckReport:
    """Check ``repo``; see the module docstring. ``subset`` (0..1] of the packs is read when
    ``read_data``; which ones depends only on ``seed`` and the pack ids, so a run can be
    repeated, and successive seeds cover different packs. ``lock=False`` skips taking a
    shared lock (for read-only storage)."""
    if subset is not None and not 0.0 < subset <= 1.0:
        raise ValueError(f"subset must be in (0, 1], not {subset}")
    ctx = repo.lock(exclusive=False, operation="check") if lock else contextlib.nullcontext()
    with ctx as held:
        own = held.name if held is not None else None
        return _Checker(repo, progress, own).run(read_data=read_data, subset=subset, seed=seed)


def select_subset(pack_ids: list[bytes], fraction: float, seed: int) -> list[bytes]:
    """ceil(fraction x n) packs, ranked by SHA-256(seed || pack id): deterministic, well spread."""
    count = math.ceil(fraction * len(pack_ids))
    ranked = sorted(pack_ids, key=lambda p: hashlib.sha256(seed.to_bytes(8, "little") + p).digest())
    return sorted(ranked[:count])


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def _header_envelope_length(entries: list[BlobEntry]) -> int:
    # The header is the entries in offset order, sealed like any payload; its length does
    # not depend on the key (the GCM tag and the plain checksum are both 16 bytes).
    header = b"".join(e.pack() for e in sorted(entries, key=lambda e: e.offset))
    return len(seal_envelope(MasterKey.unencrypted(), header, b""))


class _Checker:
    def __init__(self, repo: Repository, progress: Progress | None, own_lock: str | None) -> None:
        self.repo = repo
        self.backend = repo.backend
        self.progress = progress
        self.own_lock = own_lock
        self.problems: list[Problem] = []
        self.covered: set[bytes] = set()  # blobs some problem already reports
        self.packs: dict[bytes, list[BlobEntry]] = {}
        self.stored: dict[bytes, int] = {}
        self.snapshots: list[Snapshot] = []
        self.stats: dict[str, int] = {}

    def add(
        self,
        severity: str,
        kind: str,
        obj: str,
        message: str,
        *,
        object_id: str = "",
        blobs: set[bytes] | None = None,
    ) -> Problem:
        p = Problem(severity, kind, obj, message, object_id=object_id, blob_ids=set(blobs or ()))
        self.covered |= p.blob_ids
        self.problems.append(p)
        return p

    def tick(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    # ---- the run -------------------------------------------------------------------------

    def run(self, *, read_data: bool, subset: float | None, seed: int) -> CheckReport:
        self.check_config()
        self.check_keys()
        self.check_locks()
        self.check_index_files()
        self.check_pack_sizes()
        self.load_snapshots()
        self.walk_snapshots()
        if read_data:
            self.read_packs(subset, seed)
        self.find_affected()
        report = CheckReport(read_data=read_data, subset=subset, problems=self.problems, stats=self.stats)
        damaged = {a.snapshot for p in self.problems if p.severity == ERROR for a in p.affects}
        report.damaged_snapshots = sorted(damaged)
        report.intact_snapshots = sorted(s.id for s in self.snapshots if s.id not in damaged)
        return report

    def check_config(self) -> None:
        try:
            doc = json.loads(self.backend.get("config"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except ObjectNotFoundError:
            self.add(ERROR, "config-missing", "config", "the config object is missing")
            return
        except (ValueError, UnicodeDecodeError) as exc:
            self.add(ERROR, "config-damaged", "config", f"the config is not readable JSON: {exc}")
            return
        cfg = self.repo.config
        if doc.get("id") != cfg.id or doc.get("chunk_size") != cfg.chunk_size:
            self.add(
                ERROR, "config-changed", "config", "the config differs from the one read when the repository was opened"
            )
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            self.add(ERROR, "config-version", "config", f"unsupported format version {version!r}")

    def check_keys(self) -> None:
        names = [o.name for o in self.backend.list("keys/")]
        self.stats["keys"] = len(names)
        if self.repo.config.encrypted and not names:
            self.add(ERROR, "keys-missing", "keys/", "the repository has no key files")
        for name in names:
            try:
                doc = json.loads(self.backend.get(name))
                if not isinstance(doc, dict) or not all(k in doc for k in ("salt", "data", "kdf_params")):
                    raise ValueError("fields missing")
            except (ValueError, UnicodeDecodeError, ObjectNotFoundError) as exc:
                self.add(ERROR, "key-damaged", name, f"key file is not readable: {exc}")

    def check_locks(self) -> None:
        locks = list_locks(self.backend, self.repo.key)
        self.stats["locks"] = len(locks)
        for lock in locks:
            if lock.name == self.own_lock:
                continue
            if lock.operation == "unreadable":
                self.add(WARNING, "lock-unreadable", lock.name, "unreadable lock; an exclusive locker removes it")
            elif lock.is_stale():
                self.add(WARNING, "lock-stale", lock.name, f"stale {lock.describe()}; ignored and removed by prune")
            else:
                self.add(WARNING, "lock-held", lock.name, f"held: {lock.describe()}")

    def check_index_files(self) -> None:
        files: dict[bytes, IndexFile] = {}
        names = [o.name for o in self.backend.list("index/")]
        for n, name in enumerate(names):
            self.tick("index", n, len(names))
            try:
                file_id = bytes.fromhex(name.removeprefix("index/"))
                if len(file_id) != ID_SIZE:
                    raise ValueError("bad name")
            except ValueError:
                self.add(WARNING, "unexpected-object", name, "not an index file name")
                continue
            try:
                files[file_id] = self.repo.read_index_file(file_id)
            except ObjectNotFoundError:
                continue
            except IntegrityError as exc:
                self.add(
                    ERROR,
                    "index-file-damaged",
                    name,
                    f"{exc}. The packs it lists are unknown to readers; blobs only it listed are reported "
                    "missing below, and prune refuses to run until the index is repaired",
                    object_id=file_id.hex(),
                )
        superseded = {s for f in files.values() for s in f.supersedes}
        for file_id in sorted(superseded & set(files)):
            self.add(
                WARNING,
                "index-file-superseded",
                f"index/{file_id.hex()}",
                "superseded index file (left by an interrupted prune); the next prune deletes it",
                object_id=file_id.hex(),
            )
        for file_id, f in files.items():
            if file_id in superseded:
                continue
            for pack_id, entries in f.packs.items():
                have = self.packs.setdefault(pack_id, [])
                seen = {(e.id, e.offset) for e in have}
                have.extend(e for e in entries if (e.id, e.offset) not in seen)
        self.stats["index_files"] = len(files)
        self.stats["packs_indexed"] = len(self.packs)
        # the repository's in-memory index must reflect the same files
        self.repo.load_index()
        self.stats["blobs_indexed"] = len(self.repo.index)

    def _reads_from(self, pack_id: bytes, entries: list[BlobEntry]) -> set[bytes]:
        """The blobs in ``entries`` that readers fetch from this pack (not another copy)."""
        out = set()
        for e in entries:
            loc = self.repo.index.lookup(e.id)
            if loc is not None and loc.pack_id == pack_id and loc.entry.offset == e.offset:
                out.add(e.id)
        return out

    def check_pack_sizes(self) -> None:
        for obj in self.backend.list("data/"):
            try:
                pack_id = bytes.fromhex(obj.name.rsplit("/", 1)[1])
                if len(pack_id) != ID_SIZE or obj.name != pack_name(pack_id):
                    raise ValueError("bad name")
            except ValueError:
                self.add(WARNING, "unexpected-object", obj.name, "not a pack name")
                continue
            self.stored[pack_id] = obj.size
        self.stats["packs_stored"] = len(self.stored)
        self.stats["bytes_stored"] = sum(self.stored.values())
        for pack_id in sorted(set(self.stored) - set(self.packs)):
            self.add(
                WARNING,
                "orphan-pack",
                pack_name(pack_id),
                "pack named by no index file (left by an interrupted backup or prune); the next prune deletes it",
                object_id=pack_id.hex(),
            )
        for pack_id, entries in sorted(self.packs.items()):
            name = pack_name(pack_id)
            size = self.stored.get(pack_id)
            if size is None:
                self.add(
                    ERROR,
                    "pack-missing",
                    name,
                    f"indexed pack with {len(entries)} blobs is missing from storage",
                    object_id=pack_id.hex(),
                    blobs=self._reads_from(pack_id, entries),
                )
                continue
            blobs_end = max((e.offset + e.length for e in entries), default=0)
            expected = blobs_end + _header_envelope_length(entries) + PACK_TRAILER.size
            if size == expected:
                continue
            # another zstd version may compress the header differently: ask the trailer
            with contextlib.suppress(VmvaultError):
                if size >= blobs_end + PACK_TRAILER.size:
                    hlen, magic = PACK_TRAILER.unpack(
                        self.backend.get(name, size - PACK_TRAILER.size, PACK_TRAILER.size)
                    )
                    if magic == PACK_MAGIC and blobs_end + hlen + PACK_TRAILER.size == size:
                        continue
            if size < expected:
                cut = {e.id for e in entries if e.offset + e.length > size}
                self.add(
                    ERROR,
                    "pack-truncated",
                    name,
                    f"pack is {size} bytes, its index implies {expected}: truncated "
                    f"({len(cut)} of {len(entries)} blobs cut off, and its header)",
                    object_id=pack_id.hex(),
                    blobs=cut & self._reads_from(pack_id, entries),
                )
            else:
                self.add(
                    ERROR,
                    "pack-size",
                    name,
                    f"pack is {size} bytes, its index implies {expected} (its blobs are still readable)",
                    object_id=pack_id.hex(),
                )

    def load_snapshots(self) -> None:
        ids = self.repo.snapshot_ids()
        for snap_id in ids:
            try:
                self.snapshots.append(self.repo.load_snapshot(snap_id))
            except (IntegrityError, SnapshotNotFoundError) as exc:
                p = self.add(ERROR, "snapshot-damaged", f"snapshots/{snap_id}", str(exc), object_id=snap_id)
                p.affects.append(Affected(snap_id, "?", {}, "snapshot", "(manifest)", []))
        self.snapshots.sort(key=lambda s: (s.time, s.id))
        self.stats["snapshots"] = len(ids)

    def walk_snapshots(self) -> None:
        """Every index block must open and fit its disk; every blob a snapshot needs must be indexed."""
        blocks: dict[bytes, tuple[int, bool] | None] = {}  # index block -> (entries, has PARENT_ID); None: unreadable
        needed_data: set[bytes] = set()
        for n, snap in enumerate(self.snapshots):
            self.tick("snapshots", n, len(self.snapshots))
            for disk in snap.disks:
                self._walk_disk(snap, disk, blocks, needed_data)
            for f in snap.files:
                self._walk_file(snap, f, needed_data)
        needed_data.discard(ZERO_ID)
        needed_data.discard(PARENT_ID)
        missing = sorted(b for b in needed_data if b not in self.repo.index and b not in self.covered)
        orphans = len(set(self.stored) - set(self.packs))
        hint = f"; {orphans} packs are in no index, `repair_index` may find it there" if orphans else ""
        for blob_id in missing:
            self.add(
                ERROR,
                "blob-missing",
                f"blob {blob_id.hex()}",
                f"chunk {blob_id.hex()} is in no index{hint}",
                object_id=blob_id.hex(),
                blobs={blob_id},
            )
        self.stats["index_blocks"] = len(blocks)
        self.stats["data_blobs_referenced"] = len(needed_data)

    def _inconsistent(self, snap: Snapshot, kind: str, name: str, start: int, end: int, message: str) -> None:
        p = self.add(ERROR, "snapshot-inconsistent", f"snapshots/{snap.id}", message, object_id=snap.id)
        p.affects.append(Affected(snap.id, snap.time, dict(snap.source), kind, name, [[start, end]]))

    def _read_block(self, block_id: bytes) -> bytes | None:
        try:
            raw = self.repo.get_blob(BlobType.INDEX, block_id)
        except IntegrityError as exc:
            if block_id not in self.covered:
                kind = "blob-missing" if block_id not in self.repo.index else "blob-damaged"
                self.add(ERROR, kind, f"blob {block_id.hex()}", str(exc), object_id=block_id.hex(), blobs={block_id})
            return None
        if len(raw) % ID_SIZE:
            self.add(
                ERROR,
                "index-block-damaged",
                f"blob {block_id.hex()}",
                f"index block of {len(raw)} bytes is not a whole number of entries",
                object_id=block_id.hex(),
                blobs={block_id},
            )
            return None
        return raw

    def _walk_disk(
        self, snap: Snapshot, disk: DiskRecord, blocks: dict[bytes, tuple[int, bool] | None], needed: set[bytes]
    ) -> None:
        cs, span = disk.chunk_size, disk.index_span
        if cs <= 0 or span <= 0 or disk.size < 0:
            self._inconsistent(snap, "disk", disk.name, 0, max(0, disk.size), "impossible chunk or index geometry")
            return
        n_chunks = -(-disk.size // cs)
        if len(disk.index) != -(-n_chunks // span):
            self._inconsistent(
                snap,
                "disk",
                disk.name,
                0,
                disk.size,
                f"disk {disk.name}: {len(disk.index)} index blocks for {n_chunks} chunks of {cs} bytes "
                f"({span} per block)",
            )
        for b, block in enumerate(disk.index):
            if block is None:
                continue
            start, end = b * span * cs, min(disk.size, (b + 1) * span * cs)
            try:
                block_id = bytes.fromhex(block)
            except ValueError:
                self._inconsistent(snap, "disk", disk.name, start, end, f"index block id {block!r} is not hex")
                continue
            if block_id not in blocks:
                # each distinct block is read once: unchanged blocks are shared between snapshots
                raw = self._read_block(block_id)
                if raw is None:
                    blocks[block_id] = None
                else:
                    entries = [raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE)]
                    needed.update(entries)
                    blocks[block_id] = (len(entries), PARENT_ID in entries)
            meta = blocks[block_id]
            if meta is None:
                continue
            count, defers = meta
            if count != min(span, n_chunks - b * span):
                self._inconsistent(
                    snap, "disk", disk.name, start, end, f"disk {disk.name}: index block {b} has {count} entries"
                )
            if defers and not disk.layer:
                self._inconsistent(
                    snap, "disk", disk.name, start, end, f"disk {disk.name} is not a layer but defers to a parent"
                )

    def _walk_file(self, snap: Snapshot, f: FileRecord, needed: set[bytes]) -> None:
        cs = self.repo.config.chunk_size
        if len(f.chunks) != -(-f.size // cs):
            self._inconsistent(
                snap, "file", f.name, 0, f.size, f"file {f.name}: {len(f.chunks)} chunks for {f.size} bytes"
            )
            return
        for k, c in enumerate(f.chunks):
            try:
                blob_id = bytes.fromhex(c)
            except ValueError:
                self._inconsistent(
                    snap, "file", f.name, k * cs, min(f.size, (k + 1) * cs), f"chunk id {c!r} is not hex"
                )
                continue
            needed.add(blob_id)
            loc = self.repo.index.lookup(blob_id)
            want = min(cs, f.size - k * cs)
            if loc is not None and loc.entry.raw_length != want:
                self._inconsistent(
                    snap,
                    "file",
                    f.name,
                    k * cs,
                    k * cs + want,
                    f"file {f.name}: chunk {k} is {loc.entry.raw_length} bytes, the file's size implies {want}",
                )

    def read_packs(self, subset: float | None, seed: int) -> None:
        candidates = sorted(p for p in self.packs if p in self.stored)
        chosen = select_subset(candidates, subset, seed) if subset is not None else candidates
        self.stats["packs_read"] = 0
        self.stats["blobs_read"] = 0
        self.stats["bytes_read"] = 0
        for n, pack_id in enumerate(chosen):
            self.tick("read-data", n, len(chosen))
            self._read_pack(pack_id)
        self.tick("read-data", len(chosen), len(chosen))

    def _read_pack(self, pack_id: bytes) -> None:
        name = pack_name(pack_id)
        entries = self.packs[pack_id]
        try:
            data = self.backend.get(name)
        except ObjectNotFoundError:
            if pack_id.hex() not in {p.object_id for p in self.problems}:
                self.add(
                    ERROR,
                    "pack-missing",
                    name,
                    "pack vanished while checking",
                    object_id=pack_id.hex(),
                    blobs=self._reads_from(pack_id, entries),
                )
            return
        self.stats["packs_read"] += 1
        self.stats["bytes_read"] += len(data)
        if hashlib.sha256(data).digest() != pack_id:
            self.add(
                ERROR, "pack-damaged", name, "pack content does not match its name (SHA-256)", object_id=pack_id.hex()
            )
        try:
            header = parse_pack_header(self.repo.key, data, name=name)
        except IntegrityError as exc:
            self.add(
                ERROR,
                "pack-header-damaged",
                name,
                f"{exc} (blobs are read through the index, so those below that open are intact)",
                object_id=pack_id.hex(),
            )
        else:
            if {e.pack() for e in header} != {e.pack() for e in entries}:
                self.add(
                    ERROR,
                    "pack-index-mismatch",
                    name,
                    f"the pack header lists {len(header)} blobs, the index {len(entries)}, and they differ",
                    object_id=pack_id.hex(),
                )
        reads_here = self._reads_from(pack_id, entries)
        for e in entries:
            sealed = data[e.offset : e.offset + e.length]
            self.stats["blobs_read"] += 1
            try:
                if len(sealed) != e.length:
                    raise IntegrityError(f"blob {e.id.hex()} is cut off by the end of the pack")
                plain = open_blob(self.repo.key, e.type, e.id, sealed)
                if len(plain) != e.raw_length:
                    raise IntegrityError(f"blob {e.id.hex()} is {len(plain)} bytes, the index says {e.raw_length}")
            except IntegrityError as exc:
                if e.id in self.covered and e.id in reads_here:
                    continue
                what = "chunk" if e.type is BlobType.DATA else "index block"
                extra = "" if e.id in reads_here else " (a duplicate copy: readers use another pack)"
                self.add(
                    ERROR,
                    "blob-damaged",
                    f"blob {e.id.hex()}",
                    f"{what} in pack {pack_id.hex()} at offset {e.offset}: {exc}{extra}",
                    object_id=e.id.hex(),
                    blobs={e.id} & reads_here,
                )

    # ---- what is affected ------------------------------------------------------------

    def find_affected(self) -> None:
        bad: set[bytes] = set()
        for p in self.problems:
            bad |= p.blob_ids
        if not bad:
            return
        hits: dict[bytes, dict[tuple[str, str, str], list[list[int]]]] = {b: {} for b in bad}
        snaps = {s.id: s for s in self.snapshots}
        for snap, kind, name, start, end, blob_id in self._references(bad):
            hits[blob_id].setdefault((snap, kind, name), []).append([start, end])
        for p in self.problems:
            merged: dict[tuple[str, str, str], list[list[int]]] = {}
            for b in p.blob_ids:
                for key, ranges in hits[b].items():
                    merged.setdefault(key, []).extend(ranges)
            for (snap_id, kind, name), ranges in sorted(merged.items(), key=lambda kv: (snaps[kv[0][0]].time, kv[0])):
                s = snaps[snap_id]
                p.affects.append(Affected(s.id, s.time, dict(s.source), kind, name, _merge(ranges)))

    def _references(self, bad: set[bytes]) -> Iterator[tuple[str, str, str, int, int, bytes]]:
        """(snapshot, "disk"/"file", name, start, end, blob) for every reference to a bad blob."""
        positions: dict[bytes, list[tuple[int, bytes]]] = {}  # index block -> [(entry no, bad id)]
        for snap in self.snapshots:
            for disk in snap.disks:
                cs, span = disk.chunk_size, disk.index_span
                for b, block in enumerate(disk.index):
                    if block is None:
                        continue
                    block_id = bytes.fromhex(block)
                    first = b * span
                    if block_id in bad:
                        end = min(disk.size, (first + span) * cs)
                        yield snap.id, "disk", disk.name, first * cs, end, block_id
                        continue
                    if block_id not in positions:
                        try:
                            raw = self.repo.get_blob(BlobType.INDEX, block_id)
                        except IntegrityError:
                            raw = b""  # reported already; its chunks cannot be known
                        entries = (raw[i : i + ID_SIZE] for i in range(0, len(raw), ID_SIZE))
                        positions[block_id] = [(i, e) for i, e in enumerate(entries) if e in bad]
                    for i, blob_id in positions[block_id]:
                        k = first + i
                        yield snap.id, "disk", disk.name, k * cs, min(disk.size, (k + 1) * cs), blob_id
            cs = self.repo.config.chunk_size
            for f in snap.files:
                for k, c in enumerate(f.chunks):
                    blob_id = bytes.fromhex(c)
                    if blob_id in bad:
                        yield snap.id, "file", f.name, k * cs, min(f.size, (k + 1) * cs), blob_id

"""The on-disk format stays what repository-format.md (sections 3 and 4) says, byte for byte.

A repository is written through the code paths that build index blocks (backup, an
incremental backup, copy into a second repository, repair snapshots), then

* read back by a reader written in this file from the format's grammar alone (packs, index
  files, envelopes, snapshots, INDEX blobs with ZERO and PARENT entries), with nothing of
  vmvault but what the document names: every object is opened with ``cryptography`` and
  ``zstandard`` directly, every id recomputed, every disk rebuilt from its index blocks;
* compared with golden values recorded from the code before the index-block API existed:
  with fixed keys, the index-block ids and plaintexts of every disk of every snapshot
  (a change in how an index block is laid out or identified changes them).

The same is done for a repository of format version 3, whose chunk and index-block ids are
keyed BLAKE3 (its own golden value, recorded when version 3 was introduced), copied into a
version-1 repository with HMAC-SHA-256 ids.

Sealed objects are not compared byte for byte: nonces are random and zstd may compress a
pack header differently from one library version to the next (section 9, check).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import blake3
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmvault.backends.memory import MemoryBackend
from vmvault.disk.base import DiskImage, Extent, ExtentKind, coalesce
from vmvault.engine.backup import backup
from vmvault.engine.copy import copy_snapshots
from vmvault.hypervisors.base import BackupSession, PreviousBackup, Source, SourceDisk
from vmvault.repo.config import RepoConfig, encode_config
from vmvault.repo.crypto import MasterKey
from vmvault.repo.pack import pack_name
from vmvault.repo.repair import repair_snapshots
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 4096
SPAN = 4096  # the span every writer uses (section 4, index blocks)
BLOCK_BYTES = CS * SPAN
#: two whole index blocks, five chunks and a partial one
SIZE = 2 * BLOCK_BYTES + 5 * CS + 100
KEY_A = bytes(range(64))
KEY_B = bytes(range(64, 128))

#: recorded from the code before repo/index_block.py (commit b7178cd on main)
GOLDEN = "fbd898e1322a606431fab03805c0f31bec22096c26051dc4ede28fb61cb22cf1"
#: a version-3 repository (keyed-BLAKE3 ids) copied into a version-1 one: recorded when
#: format version 3 was introduced
GOLDEN_BLAKE3 = "4b7715651c1e3707f506e1af11d367211a6bac6205ab370499ed37eafe238ff6"
#: section 6: BLAKE3's derive_key context of the keyed-BLAKE3 id key
BLAKE3_CONTEXT = "vmvault 2026-12-03 keyed-BLAKE3 chunk id key"


# ---- a source whose content and change tracking are fixed -------------------------------


def pattern(seed: int, length: int) -> bytes:
    """Incompressible, deterministic bytes."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed.to_bytes(4, "little") + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:length])


class FixedDisk(DiskImage):
    """``data`` with a map of (offset, length, kind) ranges; the rest of the map is ZERO."""

    format = "raw"

    def __init__(self, data: bytearray, ranges: list[tuple[int, int, ExtentKind]]) -> None:
        self.data = data
        self.ranges = ranges

    @property
    def size(self) -> int:
        return len(self.data)

    def extents(self) -> Iterator[Extent]:
        out, pos = [], 0
        for off, length, kind in sorted(self.ranges):
            if off > pos:
                out.append(Extent(pos, off - pos, ExtentKind.ZERO))
            out.append(Extent(off, length, kind))
            pos = off + length
        if pos < self.size:
            out.append(Extent(pos, self.size - pos, ExtentKind.ZERO))
        return coalesce(out)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])


class _Session(BackupSession):
    def __init__(self, disks: list[SourceDisk]) -> None:
        self.vm = {"name": "frozen"}
        self.disks = disks
        self.files = []
        self.consistency = "crash-consistent"
        self.warnings = []
        self.extra = {}

    def complete(self, snapshot_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class ChainSource(Source):
    """A base disk and one checkpoint layer over it; ``changed`` is reported on incrementals."""

    kind = "test"
    location = "test://frozen"

    def __init__(self) -> None:
        base = bytearray(SIZE)
        base[0 : 40 * CS] = pattern(1, 40 * CS)  # block 0: data, then zeros
        base[50 * CS : 52 * CS] = bytes(2 * CS)  # explicit zeros inside data
        base[2 * BLOCK_BYTES : SIZE] = pattern(2, SIZE - 2 * BLOCK_BYTES)  # block 2: the partial tail
        self.base = FixedDisk(
            base, [(0, 60 * CS, ExtentKind.DATA), (2 * BLOCK_BYTES, SIZE - 2 * BLOCK_BYTES, ExtentKind.DATA)]
        )
        merged = bytearray(base)
        merged[8 * CS : 12 * CS] = pattern(3, 4 * CS)  # the layer's own data
        merged[20 * CS : 22 * CS] = bytes(2 * CS)  # the layer's own explicit zeros
        merged[SIZE - 100 : SIZE] = pattern(4, 100)
        layer_ranges = [
            (0, 8 * CS, ExtentKind.PARENT),
            (8 * CS, 4 * CS, ExtentKind.DATA),
            (12 * CS, 8 * CS, ExtentKind.PARENT),
            (20 * CS, 2 * CS, ExtentKind.ZERO),
            (22 * CS, SIZE - 100 - 22 * CS, ExtentKind.PARENT),  # block 1 defers whole
            (SIZE - 100, 100, ExtentKind.DATA),
        ]
        self.layer = FixedDisk(merged, layer_ranges)
        self.changed: list[tuple[int, int]] = []

    def change(self, offset: int, data: bytes) -> None:
        for disk in (self.base, self.layer):
            disk.data[offset : offset + len(data)] = data
        self.changed.append((offset, len(data)))

    def open_session(self, previous: PreviousBackup | None, *_options: Any) -> BackupSession:
        changed = list(self.changed) if previous is not None else None
        cbt = {"kind": "test", "n": len(self.changed)}
        return _Session(
            [
                SourceDisk("base.raw", self.base, "raw", changed=changed, cbt=cbt),
                SourceDisk(
                    "layer.raw", self.layer, "raw", changed=changed, cbt=cbt, layer=True, parent_name="base.raw"
                ),
            ]
        )


def make_repo(url: str, key: bytes, repo_id: str, *, pack_size: int = 4096, version: int = 1) -> Repository:
    # pack_size 4 KiB: every data chunk closes its pack, so each pack holds one chunk
    config = RepoConfig(
        id=repo_id,
        version=version,
        chunk_size=CS,
        pack_size=pack_size,
        encrypted=True,
        created="2026-01-01T00:00:00+00:00",
        chunk_id="blake3" if version >= 3 else "hmac-sha256",
    )
    backend = MemoryBackend(url)
    backend.put("config", encode_config(config, MasterKey.from_bytes(key)))
    return Repository(backend, config, MasterKey.from_bytes(key), "")


# ---- a reader from the grammar of sections 3 and 4 alone ------------------------------------

ENVELOPE = struct.Struct("<BBH12s")
TRAILER = struct.Struct("<I4s")
ENTRY = struct.Struct("<B32sIII")
INDEX_HEADER = struct.Struct("<4sHHII")
INDEX_PACK = struct.Struct("<32sI")
INDEX_PACK_V2 = struct.Struct("<32sII")
ZERO, PARENT = bytes(32), b"\xff" * 32


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    version, flags, reserved, nonce = ENVELOPE.unpack_from(sealed)
    assert (version, reserved) == (1, 0) and flags in (0, 1)
    header = sealed[: ENVELOPE.size]
    body = AESGCM(key[:32]).decrypt(nonce, sealed[ENVELOPE.size :], aad + header)
    return zstandard.ZstdDecompressor().decompress(body) if flags & 1 else body


@dataclass
class Parsed:
    blobs: dict[tuple[int, bytes], bytes]  # (type, id) -> plaintext
    snapshots: dict[str, dict[str, Any]]


def blob_id_of(plain: bytes, id_key: bytes, chunk_id: str) -> bytes:
    """Section 3: HMAC-SHA-256 under the id key, or BLAKE3 keyed with the id key's derivation."""
    if chunk_id == "hmac-sha256":
        return hmac.digest(id_key, plain, "sha256")
    assert chunk_id == "blake3"
    return blake3.blake3(plain, key=blake3.blake3(id_key, derive_key_context=BLAKE3_CONTEXT).digest()).digest()


def parse_repository(backend: MemoryBackend, key: bytes) -> Parsed:
    """Every object of the repository, opened and checked by the rules of sections 2 to 4."""
    id_key = key[32:]
    doc = json.loads(backend.get("config"))
    chunk_id = doc.get("chunk_id", "hmac-sha256")
    assert ("chunk_id" in doc) == (doc["version"] >= 3)
    sizes: dict[bytes, int] = {}
    blobs: dict[tuple[int, bytes], bytes] = {}
    packs: dict[bytes, list[tuple[int, bytes, int, int, int]]] = {}
    for obj in backend.list("data/"):
        data = backend.get(obj.name)
        pack_id = hashlib.sha256(data).digest()
        sizes[pack_id] = len(data)
        assert obj.name == f"data/{pack_id.hex()[:2]}/{pack_id.hex()}"
        hlen, magic = TRAILER.unpack(data[-TRAILER.size :])
        assert magic == b"VVPK"
        start = len(data) - TRAILER.size - hlen
        header = open_sealed(key, data[start : start + hlen], b"pack header")
        assert len(header) % ENTRY.size == 0
        entries = [ENTRY.unpack_from(header, i) for i in range(0, len(header), ENTRY.size)]
        offset = 0
        for blob_type, blob_id, off, length, raw_length in entries:
            assert off == offset and blob_type in (1, 2)  # contiguous from 0, in entry order
            plain = open_sealed(key, data[off : off + length], bytes([blob_type]) + blob_id)
            assert len(plain) == raw_length and blob_id_of(plain, id_key, chunk_id) == blob_id
            blobs[(blob_type, blob_id)] = plain
            offset += length
        assert offset == start
        packs[pack_id] = entries
    indexed: set[bytes] = set()
    for obj in backend.list("index/"):
        name = obj.name
        payload = open_sealed(key, backend.get(name), name.encode())
        assert name == f"index/{hashlib.sha256(payload).hexdigest()}"
        magic, version, reserved, n_sup, n_packs = INDEX_HEADER.unpack_from(payload)
        assert (magic, reserved) == (b"VVIX", 0) and version == (2 if doc["version"] >= 2 else 1)
        pos = INDEX_HEADER.size + 32 * n_sup
        for _ in range(n_packs):
            if version == 1:
                pack_id, count = INDEX_PACK.unpack_from(payload, pos)
                pos += INDEX_PACK.size
            else:
                pack_id, count, length = INDEX_PACK_V2.unpack_from(payload, pos)
                pos += INDEX_PACK_V2.size
                assert length == sizes.get(pack_id, length)
            listed = [ENTRY.unpack_from(payload, pos + i * ENTRY.size) for i in range(count)]
            pos += count * ENTRY.size
            if pack_id in packs:
                assert listed == packs[pack_id], "an index file lists every entry of a pack, in header order"
                indexed.add(pack_id)
        assert pos == len(payload)
    assert indexed == set(packs), "every pack is indexed"
    snapshots = {}
    for obj in backend.list("snapshots/"):
        payload = open_sealed(key, backend.get(obj.name), b"snapshot")
        assert obj.name == f"snapshots/{hashlib.sha256(payload).hexdigest()}"
        snapshots[obj.name.split("/")[1]] = json.loads(payload)
    return Parsed(blobs, snapshots)


def disk_refs(parsed: Parsed, disk: dict[str, Any]) -> list[bytes]:
    """The disk's chunk refs: ``index_span`` 32-byte refs per index block, an empty block all ZERO."""
    cs, span, size = disk["chunk_size"], disk["index_span"], disk["size"]
    n_chunks = -(-size // cs)
    assert len(disk["index"]) == -(-n_chunks // span)
    refs: list[bytes] = []
    for b, block in enumerate(disk["index"]):
        count = min(span, n_chunks - b * span)
        if block is None:
            refs += [ZERO] * count
            continue
        raw = parsed.blobs[(2, bytes.fromhex(block))]
        assert len(raw) == 32 * count
        entries = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        assert any(e != ZERO for e in entries), "an all-ZERO block is never stored"
        refs += entries
    return refs


def rebuild(parsed: Parsed, snap: dict[str, Any], name: str) -> bytes:
    disks = {d["name"]: d for d in snap["disks"]}
    disk = disks[name]
    cs, size = disk["chunk_size"], disk["size"]
    chains = [disk_refs(parsed, disk)]
    node = disk
    while node["layer"]:
        node = disks[node["parent"]]
        chains.append(disk_refs(parsed, node))
    out = bytearray()
    for k in range(len(chains[0])):
        length = min(cs, size - k * cs)
        ref = next((c[k] for c in chains if c[k] != PARENT), ZERO)
        assert not (ref != ZERO and not disk["layer"] and chains[0][k] == PARENT)
        out += bytes(length) if ref == ZERO else parsed.blobs[(1, ref)]
    return bytes(out)


# ---- the test ----------------------------------------------------------------------------------


def index_digest(snaps: list[Snapshot], parsed: Parsed) -> str:
    """SHA-256 over every disk's index refs and every index block's plaintext."""
    h = hashlib.sha256()
    for snap in snaps:
        for disk in snap.disks:
            h.update(f"{disk.name} {disk.size} {disk.chunk_size} {disk.index_span} {disk.layer} {disk.parent}".encode())
            for ref in disk.index:
                h.update(b"-" if ref is None else bytes.fromhex(ref) + parsed.blobs[(2, bytes.fromhex(ref))])
    return h.hexdigest()


@pytest.mark.parametrize(
    ("version", "golden"), [(1, GOLDEN), (3, GOLDEN_BLAKE3)], ids=["v1-hmac-sha256", "v3-blake3-into-v1"]
)
def test_the_stored_format_is_the_documented_one_and_unchanged(version: int, golden: str) -> None:
    src = ChainSource()
    repo = make_repo("memory://a", KEY_A, "a" * 32, version=version)
    first = backup(repo, src).snapshot
    states = {first.id: (bytes(src.base.data), bytes(src.layer.data))}
    src.change(3 * CS + 17, pattern(5, CS))  # block 0 of both disks
    src.change(2 * BLOCK_BYTES + 2 * CS, pattern(6, 10))  # block 2
    second = backup(repo, src).snapshot
    states[second.id] = (bytes(src.base.data), bytes(src.layer.data))
    assert [d.stats["incremental"] for d in second.disks] == [1, 1]
    assert second.disks[0].index[1] is None and second.disks[1].index[1] is not None  # block 1 all PARENT

    other = make_repo("memory://b", KEY_B, "b" * 32)
    copy_snapshots(repo, other)
    copies = sorted(other.list_snapshots(), key=lambda s: s.time)
    assert len(copies) == 2

    parsed_a = parse_repository(repo.backend, KEY_A)
    parsed_b = parse_repository(other.backend, KEY_B)
    for snap_id, (base, layer) in states.items():
        assert rebuild(parsed_a, parsed_a.snapshots[snap_id], "base.raw") == base
        assert rebuild(parsed_a, parsed_a.snapshots[snap_id], "layer.raw") == layer
    for copy in copies:
        base, layer = states[copy.extra["copied_from"]["snapshot"]]
        assert rebuild(parsed_b, parsed_b.snapshots[copy.id], "base.raw") == base
        assert rebuild(parsed_b, parsed_b.snapshots[copy.id], "layer.raw") == layer

    # lose the first chunk of the base disk (both snapshots name it; its pack holds nothing else)
    lost = repo.key.chunk_id(pattern(1, CS))
    holders = [loc.pack_id for loc in repo.index.locations(lost)]
    assert len(holders) == 1
    repo.backend.delete(pack_name(holders[0]))
    report = repair_snapshots(repo)
    assert len(report.repaired) == 2
    repaired = sorted((s for s in repo.list_snapshots() if "repaired" in s.tags), key=lambda s: s.time)
    parsed_r = parse_repository(repo.backend, KEY_A)
    for snap in repaired:
        base, layer = states[snap.extra["repaired_from"]]
        zeroed = bytes(CS) + base[CS:]
        assert rebuild(parsed_r, parsed_r.snapshots[snap.id], "base.raw") == zeroed
        assert rebuild(parsed_r, parsed_r.snapshots[snap.id], "layer.raw") == bytes(CS) + layer[CS:]

    digest = "|".join(
        [
            index_digest([first, second], parsed_a),
            index_digest(copies, parsed_b),
            index_digest(repaired, parsed_r),
        ]
    )
    assert hashlib.sha256(digest.encode()).hexdigest() == golden

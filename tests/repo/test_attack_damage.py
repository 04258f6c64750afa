"""Whoever writes the storage: lost or damaged objects, and sizes the storage claims.

repository-format.md, section 10.2. Each test damages a repository as a failing disk, a
careless administrator or an attacker with write access to the storage would, and checks
that vmvault (a) never reads more than a writer could have written, (b) never treats data
that is gone as present, and (c) leads out of the damage with ``repair index`` and
``repair snapshots`` without deleting anything that can still be read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.repo.builders import (
    CHUNK,
    PASS,
    SPAN,
    Content,
    backup,
    disk_image,
    make_repo,
    read_file,
    reopen,
    restore_all,
)
from vmvault.backends.base import Backend, ObjectInfo
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import IntegrityError
from vmvault.repo import check, forget_ids, prune, repair_index, repair_snapshots
from vmvault.repo._layout import (
    ENVELOPE_HEADER,
    INDEX_HEADER,
    INDEX_MAGIC,
    PARENT_ID,
    ZERO_ID,
    BlobType,
    EnvelopeFlags,
)
from vmvault.repo._limits import MAX_INDEX_FILE, MAX_SMALL_OBJECT, MAX_SNAPSHOT
from vmvault.repo.crypto import MasterKey, open_envelope
from vmvault.repo.index import IndexFile
from vmvault.repo.pack import BlobEntry, pack_name
from vmvault.repo.repair import REPAIRED_TAG
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

T0 = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
BIG = 8 << 30  # a sparse 8 GiB object: reading it whole would exhaust memory


class RecordingBackend(Backend):
    """Passes everything to ``inner`` and records every read: (name, offset, length, bytes returned)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url
        self.reads: list[tuple[str, int, int | None, int]] = []

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        self.reads.append((name, offset, length, len(data)))
        return data

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def modified(self, name: str) -> float | None:
        return self.inner.modified(name)

    def largest_read(self) -> int:
        return max((n for _name, _o, _l, n in self.reads), default=0)

    def unbounded_reads(self, prefix: str) -> list[str]:
        return [name for name, _o, length, _n in self.reads if name.startswith(prefix) and length is None]


def history(repo: Repository, n: int = 3) -> list[tuple[Snapshot, Content]]:
    """n snapshots of one VM sharing most chunks; each has a disk of 40 chunks and a file."""
    base = disk_image(1, 40)
    out = []
    for day in range(n):
        disk = bytearray(base)
        disk[day * 8 * CHUNK : (day + 1) * 8 * CHUNK] = disk_image(100 + day, 8, zero_every=0)
        content = Content(disks={"sda": bytes(disk)}, files={"vm.conf": f"day {day}\n".encode() * 300})
        out.append((backup(repo, content, time=T0 + dt.timedelta(days=day)), content))
    return out


def local(tmp_path: Path) -> Repository:
    return make_repo(LocalBackend(str(tmp_path / "repo")))


def pack_file(repo: Repository, pack_id: bytes) -> Path:
    backend = repo.backend.inner if isinstance(repo.backend, RecordingBackend) else repo.backend
    assert isinstance(backend, LocalBackend)
    return Path(backend.root) / pack_name(pack_id)


def pack_of(repo: Repository, blob_id: bytes) -> bytes:
    loc = repo.index.lookup(blob_id)
    assert loc is not None
    return loc.pack_id


def block_entries(repo: Repository, disk: DiskRecord, block: int) -> list[bytes]:
    block_id = disk.index[block]
    assert block_id is not None
    return list(repo.read_index_block(block_id))


def with_recording(repo: Repository) -> tuple[Repository, RecordingBackend]:
    rec = RecordingBackend(repo.backend)
    return Repository.open(rec, PASS), rec


# ---- lost packs: nothing is taken for present that is gone ------------------------------------


def test_forget_lost_packs_drops_missing_and_short_packs_and_keeps_the_rest(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo)
    packs = sorted(dict(repo.iter_stored_packs()))
    gone, short = packs[0], packs[1]
    repo.backend.delete(pack_name(gone))
    path = pack_file(repo, short)
    path.write_bytes(path.read_bytes()[:100])
    repo = reopen(repo)
    in_gone = {e.id for e in repo.index.packs()[gone]}
    in_short = repo.index.packs()[short]
    lost = repo.forget_lost_packs()
    assert lost.missing_packs == [gone] and lost.short_packs == [short]
    assert not any(b in repo.index for b in in_gone)
    # blobs of the short pack that still fit before the cut stay; the others are gone
    for e in in_short:
        assert (e.id in repo.index) == (e.offset + e.length <= 100 - 8)
    assert lost.blobs == in_gone | {e.id for e in in_short if e.offset + e.length > 92}
    assert "missing" in lost.describe() and "shorter" in lost.describe()
    # nothing else was touched: the snapshots that do not need those packs still read
    for snap, content in hist:
        for f in snap.files:
            if not {bytes.fromhex(c) for c in f.chunks} & lost.blobs:
                assert read_file(repo, f) == content.files[f.name]


def test_a_copy_in_another_pack_serves_when_the_first_is_gone(tmp_path: Path) -> None:
    repo = local(tmp_path)
    content = Content(disks={"sda": disk_image(5, 12)})
    snap = backup(repo, content)
    # store every blob a second time, as a backup after a loss (or a concurrent one) does
    writer = repo.writer(upload_threads=1, index_every=1 << 30, dedup=False)
    for blob_id, loc in list(repo.index.items()):
        writer.add(loc.entry.type, blob_id, repo.get_blob(loc.entry.type, blob_id))
    writer.close()
    repo = reopen(repo)
    first = {loc.pack_id for _b, loc in repo.index.items()}
    assert all(len(repo.index.locations(b)) == 2 for b, _loc in repo.index.items())
    for pack_id in first:
        repo.backend.delete(pack_name(pack_id))
    repo = reopen(repo)
    assert restore_all(repo, snap) == content  # falls back to the other copy, no repair needed
    report = check(repo)
    assert report.damaged_snapshots == [] and {p.kind for p in report.errors} == {"pack-missing"}
    assert all(not p.affects for p in report.errors)
    assert not repo.forget_lost_packs().blobs


# ---- repair index ---------------------------------------------------------------------------


def test_repair_index_reads_only_headers_of_unindexed_packs(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo)
    for o in list(repo.backend.list("index/")):
        repo.backend.delete(o.name)
    repo, rec = with_recording(repo)
    report = repair_index(repo)
    assert report.packs_recovered == len(dict(repo.iter_stored_packs())) and not report.data_lost
    assert rec.unbounded_reads("data/") == []
    header_reads = [r for r in rec.reads if r[0].startswith("data/")]
    assert len(header_reads) == 2 * report.packs_recovered  # the trailer, then the header
    fresh = reopen(repo)
    for snap, content in hist:
        assert restore_all(fresh, snap) == content
    assert check(fresh, read_data=True).ok


def test_repair_index_salvages_a_truncated_pack(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo)
    snap, _content = hist[0]
    victim = pack_of(repo, bytes.fromhex(snap.files[0].chunks[0]))
    entries = sorted(repo.index.packs()[victim], key=lambda e: e.offset)
    cut = entries[1].offset + entries[1].length  # the first two blobs survive
    path = pack_file(repo, victim)
    path.write_bytes(path.read_bytes()[:cut])
    repo = reopen(repo)
    assert not check(repo).ok
    dry = repair_index(repo, dry_run=True)
    assert dry.packs_salvaged == [victim.hex()] and dry.index_files_written == 0 and dry.packs_written == 0
    report = repair_index(repo)
    assert report.packs_salvaged == [victim.hex()]
    assert report.blobs_salvaged == 2
    assert report.packs_written == 1 and report.data_lost == (report.blobs_lost > 0)
    fresh = reopen(repo)
    assert victim not in {loc.pack_id for _b, loc in fresh.index.items()}
    for e in entries[:2]:
        assert fresh.get_blob(e.type, e.id)  # copied into a new pack
    assert path.exists(), "repair deletes no pack: the damaged one is left as an orphan for prune"
    result = check(fresh)
    assert "orphan-pack" in {p.kind for p in result.warnings}


def test_repair_index_read_data_salvages_a_pack_with_a_flipped_byte(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo)
    snap, _content = hist[0]
    target = block_entries(repo, snap.disks[0], 7)[2]  # chunk 30: data all three snapshots share
    loc = repo.index.lookup(target)
    assert loc is not None
    path = pack_file(repo, loc.pack_id)
    raw = bytearray(path.read_bytes())
    raw[loc.entry.offset + loc.entry.length // 2] ^= 1
    path.write_bytes(bytes(raw))
    repo = reopen(repo)
    mates = len(repo.index.packs()[loc.pack_id])
    assert repair_index(repo).packs_salvaged == []  # sizes and header still match: only reading finds it
    report = repair_index(repo, read_data=True)
    assert report.packs_salvaged == [loc.pack_id.hex()] and report.blobs_lost == 1 and report.data_lost
    assert report.blobs_salvaged == mates - 1
    fresh = reopen(repo)
    assert target not in fresh.index
    # the damaged chunk is now absent, so the snapshots that need it are found and cut
    fixed = repair_snapshots(fresh, forget=True)
    assert {r.snapshot for r in fixed.repaired} == {s.id for s, _c in hist}
    for r in fixed.repaired:
        assert [x["ranges"] for x in r.lost] == [[[30 * CHUNK, 31 * CHUNK]]]
    assert fixed.damaged_remaining == 0
    prune(fresh)
    assert check(reopen(fresh), read_data=True).ok


def test_repair_index_reports_packs_without_a_readable_header(tmp_path: Path) -> None:
    repo = local(tmp_path)
    history(repo, 1)
    victim = sorted(dict(repo.iter_stored_packs()))[0]
    for o in list(repo.backend.list("index/")):
        repo.backend.delete(o.name)
    path = pack_file(repo, victim)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the magic
    path.write_bytes(bytes(raw))
    report = repair_index(reopen(repo))
    assert report.packs_unreadable == [victim.hex()] and report.data_lost


def test_repair_index_dry_run_changes_nothing(tmp_path: Path) -> None:
    repo = local(tmp_path)
    history(repo)
    repo.backend.delete(pack_name(sorted(dict(repo.iter_stored_packs()))[0]))
    before = {o.name: repo.backend.get(o.name) for o in repo.backend.list("") if not o.name.startswith("locks/")}
    report = repair_index(reopen(repo), dry_run=True)
    assert report.packs_dropped and report.index_files_written == 0
    after = {o.name: repo.backend.get(o.name) for o in repo.backend.list("") if not o.name.startswith("locks/")}
    assert after == before


# ---- sizes the storage claims: never read more than a writer writes -----------------------------


def test_check_read_data_does_not_read_a_pack_extended_to_8_gib(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo, 1)
    victim = sorted(dict(repo.iter_stored_packs()))[0]
    os.truncate(pack_file(repo, victim), BIG)
    repo, rec = with_recording(repo)
    report = check(repo, read_data=True)
    kinds = {p.kind for p in report.errors}
    assert "pack-oversized" in kinds and "blob-damaged" not in kinds, report.to_dict()
    assert report.damaged_snapshots == []  # every blob in it is still read, one by one, and intact
    assert rec.largest_read() <= repo.pack_limit + 1
    assert restore_all(repo, hist[0][0]) == hist[0][1]
    # repair salvages its blobs into a new pack and leaves it out of the index, unread
    rec.reads.clear()
    report2 = repair_index(repo, read_data=True)
    assert report2.packs_salvaged == [victim.hex()] and not report2.data_lost
    assert rec.largest_read() <= repo.pack_limit + 1
    fresh = reopen(repo)
    assert restore_all(fresh, hist[0][0]) == hist[0][1]
    assert victim not in {loc.pack_id for _b, loc in fresh.index.items()}


def test_an_unindexed_8_gib_pack_is_not_read(tmp_path: Path) -> None:
    repo = local(tmp_path)
    history(repo, 1)
    planted = hashlib.sha256(b"planted").digest()
    path = pack_file(repo, planted)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"")
    os.truncate(path, BIG)
    repo, rec = with_recording(repo)
    report = repair_index(repo)
    assert report.packs_unreadable == [planted.hex()]
    assert rec.largest_read() <= repo.pack_limit + 1
    assert not [r for r in rec.reads if r[0] == pack_name(planted)], "judged by its listed size, not read at all"


def test_prune_does_not_read_an_oversized_pack_it_would_repack(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo)
    forget_ids(repo, [hist[0][0].id, hist[1][0].id])
    repo = reopen(repo)
    doomed_or_repacked = sorted(dict(repo.iter_stored_packs()))
    for pack_id in doomed_or_repacked:
        os.truncate(pack_file(repo, pack_id), BIG)
    repo, rec = with_recording(repo)
    with pytest.raises(IntegrityError):
        prune(repo, max_unused=0.0)
    assert rec.largest_read() <= repo.pack_limit + 1


@pytest.mark.parametrize(
    ("prefix", "limit"),
    [
        ("index/", MAX_INDEX_FILE),
        ("snapshots/", MAX_SNAPSHOT),
        ("keys/", MAX_SMALL_OBJECT),
        ("locks/", MAX_SMALL_OBJECT),
    ],
)
def test_an_oversized_object_of_any_kind_is_rejected_by_its_size(tmp_path: Path, prefix: str, limit: int) -> None:
    repo = local(tmp_path)
    hist = history(repo, 1)
    name = prefix + hashlib.sha256(prefix.encode()).hexdigest()[: 32 if prefix == "locks/" else 64]
    path = Path(tmp_path / "repo" / name)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"{}")
    os.truncate(path, max(BIG, limit + 1))
    repo, rec = with_recording(reopen(repo))  # opening works: the other keys, index files, snapshots
    assert restore_all(repo, hist[0][0]) == hist[0][1]
    report = check(repo, read_data=True)
    assert rec.largest_read() <= max(limit + 1, repo.pack_limit + 1)
    if prefix == "locks/":
        assert "lock-unreadable" in {p.kind for p in report.warnings}
    else:
        assert not report.ok and any(p.object == name for p in report.errors), report.to_dict()
    if prefix == "index/":
        assert repair_index(repo).index_files_damaged == [name]
        assert not path.exists() and check(reopen(repo)).ok
    if prefix == "snapshots/":
        assert repair_snapshots(repo).unreadable[0][0] == name.removeprefix("snapshots/")
        forget_ids(repo, [name.removeprefix("snapshots/")])
        assert check(reopen(repo)).ok


def test_an_oversized_config_is_a_clear_error(tmp_path: Path) -> None:
    repo = local(tmp_path)
    os.truncate(tmp_path / "repo" / "config", BIG)
    with pytest.raises(IntegrityError, match="larger than"):
        Repository.open(repo.backend, PASS)


def test_an_index_entry_claiming_a_huge_blob_is_refused_unread(tmp_path: Path) -> None:
    repo = local(tmp_path)
    history(repo, 1)
    pack_id = sorted(dict(repo.iter_stored_packs()))[0]
    blob_id = hashlib.sha256(b"claims 4 GiB").digest()
    huge = BlobEntry(BlobType.DATA, blob_id, 0, 0xFFFF_FFF0, 0xFFFF_FFF0)
    repo.write_index_file(IndexFile(packs={pack_id: [huge]}))
    repo, rec = with_recording(repo)
    with pytest.raises(IntegrityError, match="claims"):
        repo.get_blob(BlobType.DATA, blob_id)
    report = check(repo, read_data=True)
    assert any(blob_id in p.blob_ids or p.object_id == blob_id.hex() for p in report.errors), report.to_dict()
    assert rec.largest_read() <= repo.pack_limit + 1


def zstd_frame_claiming(size: int) -> bytes:
    """A valid zstd frame header that says the content is ``size`` bytes, with an empty body."""
    magic = b"\x28\xb5\x2f\xfd"
    descriptor = bytes([0b1110_0000])  # 8-byte content size, single segment, no checksum
    last_empty_raw_block = b"\x01\x00\x00"
    return magic + descriptor + struct.pack("<Q", size) + last_empty_raw_block


def test_a_decompression_bomb_is_refused_before_allocating() -> None:
    # in an unencrypted repository whoever writes the storage can forge any envelope
    key = MasterKey.unencrypted()
    header = ENVELOPE_HEADER.pack(1, EnvelopeFlags.ZSTD, 0, bytes(12))
    body = zstd_frame_claiming(1 << 40)
    tag = hashlib.sha256(b"snapshot" + header + body).digest()[:16]
    with pytest.raises(IntegrityError, match="decompresses to"):
        open_envelope(key, header + body + tag, b"snapshot", what="snapshot")
    repo = make_repo(MemoryBackend(), encrypted=False)
    payload = header + body + tag
    snap_id = hashlib.sha256(b"x").hexdigest()
    repo.backend.put(f"snapshots/{snap_id}", payload)
    with pytest.raises(IntegrityError, match="decompresses to"):
        repo.load_snapshot(snap_id)
    assert [p.kind for p in check(repo).errors] == ["snapshot-damaged"]


# ---- repair snapshots ---------------------------------------------------------------------


def test_repair_snapshots_cuts_lost_chunks_out_and_keeps_everything_else(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo)
    snap, _content = hist[1]
    sda = snap.disks[0]
    lost_chunk = block_entries(repo, sda, 2)[1]  # chunk 9 (block 2, entry 1): only this snapshot has it
    victim = pack_of(repo, lost_chunk)
    in_victim = {e.id for e in repo.index.packs()[victim]}
    repo.backend.delete(pack_name(victim))
    repo = reopen(repo)

    dry = repair_snapshots(repo, dry_run=True)
    assert dry.repaired and all(r.action == "would repair" for r in dry.repaired) and dry.damaged_remaining
    assert len(repo.snapshot_ids()) == 3

    report = repair_snapshots(repo)  # repair_index first is not required: missing packs count as gone
    damaged = {r.snapshot for r in report.repaired}
    assert snap.id in damaged
    assert report.damaged_remaining == len(damaged)  # originals kept without --forget
    fresh = reopen(repo)
    for item in report.repaired:
        assert item.action == "repaired" and item.new_snapshot is not None and not item.forgotten
        new = fresh.load_snapshot(item.new_snapshot)
        original = fresh.load_snapshot(item.snapshot)
        assert REPAIRED_TAG in new.tags and new.extra["repaired_from"] == item.snapshot and new.time == original.time
        assert new.extra["lost"] == item.lost and any("repaired from" in w for w in new.warnings)
        want = next(c for s, c in hist if s.id == item.snapshot)
        got = restore_all(fresh, new)
        # every file whose chunks survive is intact; the others are left out
        for name, data in want.files.items():
            lost_file = any(x["kind"] == "file" and x["name"] == name for x in item.lost)
            assert (name not in got.files) if lost_file else got.files[name] == data
        # the disk reads as before except in the lost ranges, which read as zeros
        expected = bytearray(want.disks["sda"])
        for x in item.lost:
            if x["kind"] == "disk":
                for start, end in x["ranges"]:
                    expected[start:end] = bytes(end - start)
        assert got.disks["sda"] == bytes(expected)
    # the lost chunk's range is in the report of the snapshot that had it
    item = next(r for r in report.repaired if r.snapshot == snap.id)
    disk_lost = next(x for x in item.lost if x["kind"] == "disk")
    assert [9 * CHUNK, 10 * CHUNK] in disk_lost["ranges"] or any(
        s <= 9 * CHUNK and e >= 10 * CHUNK for s, e in disk_lost["ranges"]
    )
    assert in_victim  # (the pack held more than that chunk: its other blobs are cut as well)

    # idempotent: a second run finds the same damage and writes nothing new
    before = sorted(fresh.snapshot_ids())
    again = repair_snapshots(fresh)
    assert {r.action for r in again.repaired} == {"already repaired"} and sorted(fresh.snapshot_ids()) == before

    # --forget removes the originals once their copies are stored; then prune and check pass
    final = repair_snapshots(fresh, forget=True)
    assert final.damaged_remaining == 0 and all(r.forgotten for r in final.repaired)
    repair_index(fresh)
    prune(fresh)
    assert check(reopen(fresh), read_data=True).ok


def store_alone(repo: Repository, blob_type: BlobType, blob_id: bytes, payload: bytes) -> None:
    """One blob in a pack of its own (so that it can be lost alone)."""
    writer = repo.writer(upload_threads=1, index_every=1 << 30, dedup=False)
    writer.add(blob_type, blob_id, payload)
    writer.close()


def test_a_lost_index_block_zeroes_its_whole_range(tmp_path: Path) -> None:
    repo = local(tmp_path)
    data = disk_image(9, 4 * SPAN, zero_every=0)
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    ids = [repo.key.chunk_id(c) for c in chunks]
    for cid, c in zip(ids, chunks, strict=True):
        store_alone(repo, BlobType.DATA, cid, c)
    index = []
    for b in range(4):
        raw = b"".join(ids[b * SPAN : (b + 1) * SPAN])
        index.append(repo.key.chunk_id(raw))
        store_alone(repo, BlobType.INDEX, index[-1], raw)
    disk = DiskRecord("sda", "raw", len(data), CHUNK, SPAN, [i.hex() for i in index])
    snap = Snapshot(time=T0.isoformat(), hostname="h", username="u", source={"location": "x"}, disks=[disk])
    repo = reopen(repo)
    repo.save_snapshot(snap)
    repo.backend.delete(pack_name(pack_of(repo, index[1])))
    report = repair_snapshots(reopen(repo), forget=True)
    (item,) = report.repaired
    span = SPAN * CHUNK
    assert item.lost == [{"kind": "disk", "name": "sda", "ranges": [[span, 2 * span]], "bytes": span}]
    assert item.forgotten and item.new_snapshot is not None
    fresh = reopen(repo)
    new = fresh.load_snapshot(item.new_snapshot)
    assert new.disks[0].index == [index[0].hex(), None, index[2].hex(), index[3].hex()]
    got = restore_all(fresh, new).disks["sda"]
    assert got == data[:span] + bytes(span) + data[2 * span :]
    assert fresh.snapshot_ids() == [item.new_snapshot]


def test_repair_of_a_layer_keeps_its_parent_entries(tmp_path: Path) -> None:
    repo = make_repo(MemoryBackend())
    data = [os.urandom(CHUNK) for _ in range(2)]
    ids = [repo.key.chunk_id(d) for d in data]
    block = ids[0] + PARENT_ID + ids[1] + ZERO_ID
    block_id = repo.key.chunk_id(block)
    # each blob in a pack of its own, so the second chunk can be lost alone
    store_alone(repo, BlobType.DATA, ids[0], data[0])
    store_alone(repo, BlobType.DATA, ids[1], data[1])
    store_alone(repo, BlobType.INDEX, block_id, block)
    repo = reopen(repo)
    repo.backend.delete(pack_name(pack_of(repo, ids[1])))
    layer = DiskRecord("child", "vhdx", 4 * CHUNK, CHUNK, SPAN, [block_id.hex()], layer=True, parent="base")
    base = DiskRecord("base", "vhdx", 4 * CHUNK, CHUNK, SPAN, [None])
    snap = Snapshot(time=T0.isoformat(), hostname="h", username="u", source={"location": "x"}, disks=[base, layer])
    repo.save_snapshot(snap)
    report = repair_snapshots(repo)
    (item,) = report.repaired
    assert item.lost == [{"kind": "disk", "name": "child", "ranges": [[2 * CHUNK, 3 * CHUNK]], "bytes": CHUNK}]
    assert item.new_snapshot is not None
    new = reopen(repo).load_snapshot(item.new_snapshot)
    raw = repo.get_blob(BlobType.INDEX, bytes.fromhex(new.disks[1].index[0] or ""))
    assert raw == ids[0] + PARENT_ID + ZERO_ID + ZERO_ID
    assert new.disks[0] == base and new.disks[1].layer and new.disks[1].parent == "base"


def test_repair_snapshots_reports_unreadable_manifests_and_selects_by_id(tmp_path: Path) -> None:
    repo = local(tmp_path)
    hist = history(repo)
    name = f"snapshots/{hist[0][0].id}"
    path = tmp_path / "repo" / name
    raw = bytearray(path.read_bytes())
    raw[20] ^= 1
    path.write_bytes(bytes(raw))
    everything = sorted(dict(repo.iter_stored_packs()))
    for pack_id in everything:
        repo.backend.delete(pack_name(pack_id))
    repo = reopen(repo)
    only = repair_snapshots(repo, [hist[1][0].id[:10]], dry_run=True)
    assert [r.snapshot for r in only.repaired] == [hist[1][0].id] and only.checked == 1
    report = repair_snapshots(repo, forget=True)
    # nothing of the readable ones is left: removed; the unreadable one is only reported
    assert {r.action for r in report.repaired} == {"nothing left"} and all(r.forgotten for r in report.repaired)
    assert [u[0] for u in report.unreadable] == [hist[0][0].id] and report.damaged_remaining == 1
    assert path.exists()
    json.dumps(report.to_dict())


def test_index_file_counts_beyond_its_size_are_refused_at_once() -> None:
    for n_sup, n_packs in ((2**32 - 1, 0), (0, 2**32 - 1)):
        payload = INDEX_HEADER.pack(INDEX_MAGIC, 1, 0, n_sup, n_packs)
        with pytest.raises(IntegrityError, match="counts exceed"):
            IndexFile.decode(payload, name="index/x")

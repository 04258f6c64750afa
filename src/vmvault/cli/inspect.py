"""Looking into snapshots without restoring them: ls, diff, stats, dump."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from vmvault import times
from vmvault.errors import ConfigError, IntegrityError, SnapshotNotFoundError
from vmvault.repo.format import BlobType, ChunkResolver, block_length, is_chunk
from vmvault.repo.repository import Repository
from vmvault.repo.schema import disk_summary, file_summary, snapshot_summary, vm_record
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot
from vmvault.repo.usage import UsageRow, usage

from ._args import snapshot_ref
from ._common import EXIT, Output, add_filter_args, open_repository, pick_snapshot, plural, snapshot_filter, table
from .progress import human_bytes

__all__ = ["register"]


def _mode(mode: int) -> str:
    return f"{mode & 0o7777:04o}"


# ---- ls ---------------------------------------------------------------------------------


def _allocated(repo: Repository, snap: Snapshot, record: DiskRecord) -> int:
    """Bytes this disk record stores itself (for a layer: its own data, not its parents')."""
    resolver = ChunkResolver(repo, snap, record)
    cs = record.chunk_size
    return sum(min(cs, record.size - c * cs) for c, e in resolver.entries(flatten=False) if is_chunk(e))


def cmd_ls(args: argparse.Namespace) -> int:
    """The disks (with their checkpoint layers as a tree) and files of one snapshot."""
    out = Output(args)
    repo = open_repository(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    stored = {d.name: _allocated(repo, snap, d) for d in snap.disks}
    children: dict[str | None, list[DiskRecord]] = {}
    names = {d.name for d in snap.disks}
    for d in snap.disks:
        parent = d.parent if d.layer and d.parent in names else None
        children.setdefault(parent, []).append(d)
    rows: list[list[object]] = []

    def walk(d: DiskRecord, depth: int, seen: set[str]) -> None:
        if d.name in seen:  # a cycle in a damaged manifest: shown once
            return
        seen.add(d.name)
        label = ("  " * depth + "└ " if depth else "") + d.name
        rows.append([label, d.format, human_bytes(d.size), human_bytes(stored[d.name]), "layer" if d.layer else "disk"])
        for child in children.get(d.name, []):
            walk(child, depth + 1, seen)

    seen: set[str] = set()
    for root in children.get(None, []):
        walk(root, 0, seen)
    for d in snap.disks:  # layers whose parent is missing from the manifest
        if d.name not in seen:
            walk(d, 0, seen)
    vm = vm_record(snap)
    lines = [f"snapshot {snap.short_id} of VM {vm['name']}, {times.local(snap.time)}"]
    if rows:
        lines += ["", table(["Disk", "Format", "Size", "Stored data", "Kind"], rows)]
    if snap.files:
        lines += [
            "",
            table(
                ["File", "Size", "Mode", "Modified"],
                [[f.name, human_bytes(f.size), _mode(f.mode), times.local(f.mtime_ns / 1e9)] for f in snap.files],
            ),
        ]
    layers = sum(1 for d in snap.disks if d.layer)
    lines += [
        "",
        f"{plural(len(snap.disks) - layers, 'disk')}, {plural(layers, 'layer')}, {plural(len(snap.files), 'file')}",
    ]
    doc = {
        "snapshot": snapshot_summary(snap),
        "disks": [disk_summary(d) | {"stored_data": stored[d.name]} for d in snap.disks],
        "files": [file_summary(f) for f in snap.files],
    }
    out.result(doc, "\n".join(lines))
    return EXIT["ok"]


# ---- diff -------------------------------------------------------------------------------


@dataclass
class DiskChange:
    name: str
    status: str  # "added", "removed", "changed", "unchanged"
    old_size: int | None = None
    new_size: int | None = None
    chunks_changed: int = 0
    bytes_changed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "old_size": self.old_size,
            "new_size": self.new_size,
            "chunks_changed": self.chunks_changed,
            "bytes_changed": self.bytes_changed,
        }


def _compare_disks(repo: Repository, a: Snapshot, da: DiskRecord, b: Snapshot, db: DiskRecord) -> DiskChange:
    """Chunks whose content differs between the two records (each record's own entries: a
    layer is compared with the same layer). Index blocks with the same id are equal unread."""
    change = DiskChange(da.name, "unchanged", da.size, db.size)
    if da.chunk_size != db.chunk_size:
        raise IntegrityError(
            f"disk {da.name}: chunk sizes differ between the snapshots ({da.chunk_size}, {db.chunk_size})"
        )
    cs = db.chunk_size
    ra, rb = ChunkResolver(repo, a, da), ChunkResolver(repo, b, db)
    for block in range(max(len(da.index), len(db.index))):
        in_a, in_b = block < len(da.index), block < len(db.index)
        first = block * db.index_span
        if (
            in_a
            and in_b
            and da.index[block] == db.index[block]
            and da.index_span == db.index_span
            and block_length(da, block) == block_length(db, block)
        ):
            continue  # the same index block (or both empty): the same chunks, unread
        entries_a = ra.block(da, block) if in_a else []
        entries_b = rb.block(db, block) if in_b else []
        for i in range(max(len(entries_a), len(entries_b))):
            ea = entries_a[i] if i < len(entries_a) else None
            eb = entries_b[i] if i < len(entries_b) else None
            if ea != eb:
                chunk = first + i
                size = db.size if eb is not None else da.size
                change.chunks_changed += 1
                change.bytes_changed += max(0, min(cs, size - chunk * cs))
    if change.chunks_changed or da.size != db.size:
        change.status = "changed"
    return change


def _file_status(fa: FileRecord, fb: FileRecord) -> str | None:
    if fa.chunks != fb.chunks or fa.size != fb.size:
        return "changed"
    if fa.mode != fb.mode or fa.mtime_ns != fb.mtime_ns:
        return "metadata"
    return None


def cmd_diff(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    a = pick_snapshot(repo, args.first, args)
    b = pick_snapshot(repo, args.second, args)
    disks_a, disks_b = {d.name: d for d in a.disks}, {d.name: d for d in b.disks}
    disks: list[DiskChange] = []
    for name in sorted(set(disks_a) | set(disks_b)):
        if name not in disks_b:
            disks.append(DiskChange(name, "removed", disks_a[name].size, None))
        elif name not in disks_a:
            disks.append(DiskChange(name, "added", None, disks_b[name].size))
        else:
            disks.append(_compare_disks(repo, a, disks_a[name], b, disks_b[name]))
    files_a, files_b = {f.name: f for f in a.files}, {f.name: f for f in b.files}
    files: list[dict[str, Any]] = []
    for name in sorted(set(files_a) | set(files_b)):
        if name not in files_b:
            files.append({"name": name, "status": "removed", "old_size": files_a[name].size, "new_size": None})
        elif name not in files_a:
            files.append({"name": name, "status": "added", "old_size": None, "new_size": files_b[name].size})
        else:
            status = _file_status(files_a[name], files_b[name])
            if status is not None:
                files.append(
                    {"name": name, "status": status, "old_size": files_a[name].size, "new_size": files_b[name].size}
                )
    sign = {"added": "+", "removed": "-", "changed": "M", "metadata": "U", "unchanged": "="}
    lines = [f"comparing snapshot {a.short_id} ({times.local(a.time)}) with {b.short_id} ({times.local(b.time)})"]
    rows = []
    for d in disks:
        if d.status == "changed":
            what = f"{plural(d.chunks_changed, 'chunk')} changed ({human_bytes(d.bytes_changed)})"
            if d.old_size != d.new_size:
                what += f", resized {human_bytes(d.old_size or 0)} -> {human_bytes(d.new_size or 0)}"
        elif d.status == "unchanged":
            what = "unchanged"
        else:
            what = human_bytes((d.new_size if d.status == "added" else d.old_size) or 0)
        rows.append([sign[d.status], f"disk {d.name}", what])
    for f in files:
        if f["status"] == "metadata":
            what = "mode or time changed"
        elif f["status"] == "changed":
            what = f"{human_bytes(f['old_size'])} -> {human_bytes(f['new_size'])}"
        else:
            what = human_bytes((f["new_size"] if f["status"] == "added" else f["old_size"]) or 0)
        rows.append([sign[f["status"]], f"file {f['name']}", what])
    if rows:
        lines.append(table(["", "What", "Change"], rows))
    changed = sum(1 for d in disks if d.status != "unchanged")
    lines.append(
        f"{plural(changed, 'disk')} of {len(disks)} differ "
        f"({plural(sum(d.chunks_changed for d in disks), 'chunk')} changed); "
        f"files: {sum(1 for f in files if f['status'] == 'added')} added, "
        f"{sum(1 for f in files if f['status'] == 'removed')} removed, "
        f"{sum(1 for f in files if f['status'] in ('changed', 'metadata'))} changed"
    )
    doc = {"from": a.id, "to": b.id, "disks": [d.to_dict() for d in disks], "files": files}
    out.result(doc, "\n".join(lines))
    return EXIT["ok"]


# ---- stats ------------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def cmd_stats(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    problems: list[str] = []
    snaps = snapshot_filter(args).select(
        repo.list_snapshots(on_error=lambda sid, exc: problems.append(sid[:8]), summaries=True)
    )
    rows, total = usage(repo, snaps)
    storage = sum(o.size for o in repo.backend.list(""))

    def line(r: UsageRow) -> list[object]:
        return [
            r.name,
            r.snapshots,
            human_bytes(r.logical),
            human_bytes(r.unique),
            human_bytes(r.stored),
            _ratio(r.dedup_ratio),
            _ratio(r.compression_ratio),
        ]

    text = table(
        ["VM", "Snapshots", "Logical", "Unique", "Stored", "Dedup", "Compression"], [*map(line, rows), line(total)]
    )
    text += f"\nthe repository's storage holds {human_bytes(storage)} in all (data, indexes, manifests, keys)"
    cfg = repo.config
    text += (
        f"\nthe repository: format version {cfg.version}, {human_bytes(cfg.chunk_size)} chunks, chunk ids "
        f"{cfg.chunk_id_label}, {'encrypted (AES-256-GCM)' if cfg.encrypted else 'NOT encrypted'}"
    )
    text += (
        "\nlogical: each snapshot whole (allocated data, holes not counted); unique: after deduplication; "
        "stored: compressed and encrypted"
    )
    if total.unindexed:
        text += f"\nwarning: {plural(total.unindexed, 'chunk')} the snapshots need are in no index: run `vmvault check`"
    if problems:
        text += f"\nwarning: {plural(len(problems), 'unreadable snapshot')} not counted ({', '.join(problems)})"
    doc = {
        "vms": [r.to_dict() for r in rows],
        "total": total.to_dict(),
        "storage_bytes": storage,
        "repository": {
            "id": cfg.id,
            "version": cfg.version,
            "chunk_size": cfg.chunk_size,
            "chunk_id": cfg.chunk_id,
            "encrypted": cfg.encrypted,
        },
    }
    out.result(doc, text)
    return EXIT["problems"] if problems or total.unindexed else EXIT["ok"]


# ---- dump -------------------------------------------------------------------------------


def cmd_dump(args: argparse.Namespace) -> int:
    """A file of a snapshot, or a disk as a raw image (its current state, layers resolved),
    to stdout; every chunk verified as it is read."""
    repo = open_repository(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    sink = sys.stdout.buffer
    if os.isatty(sink.fileno()) and not args.force:
        raise ConfigError("stdout is a terminal: send it to a file or a pipe (vmvault dump ... > FILE)")
    files = {f.name: f for f in snap.files}
    disks = {d.name: d for d in snap.disks}
    if args.name in files:
        f = files[args.name]
        for hexid in f.chunks:
            try:
                sink.write(repo.get_blob(BlobType.DATA, bytes.fromhex(hexid)))
            except ValueError as exc:
                raise IntegrityError(f"file {f.name} of snapshot {snap.short_id}: a chunk id is not hex") from exc
        sink.flush()
        return EXIT["ok"]
    if args.name in disks:
        record = disks[args.name]
        resolver = ChunkResolver(repo, snap, record)
        cs = record.chunk_size
        n_chunks = -(-record.size // cs)
        zero = bytes(cs)
        for chunk in range(n_chunks):
            length = min(cs, record.size - chunk * cs)
            chunk_id = resolver.chunk_id(chunk)
            data = resolver.fetch(chunk_id) if chunk_id is not None else zero[:length]
            if len(data) != length:
                raise IntegrityError(f"disk {record.name}: chunk {chunk} is {len(data)} bytes, {length} expected")
            sink.write(data)
        sink.flush()
        return EXIT["ok"]
    known = sorted(files) + sorted(disks)
    shown = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
    raise SnapshotNotFoundError(
        f"snapshot {snap.short_id} has no file or disk named {args.name!r} (it has: {shown or 'nothing'})"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ls", parents=[common], help="list a snapshot's disks (with their checkpoint layers) and files")
    p.add_argument("snapshot", type=snapshot_ref, help="snapshot id (prefix of 4+ digits) or 'latest'")
    add_filter_args(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "diff", parents=[common], help="what changed between two snapshots: disks (chunks changed) and files"
    )
    p.add_argument("first", type=snapshot_ref, metavar="SNAPSHOT1", help="the older snapshot (id or 'latest')")
    p.add_argument("second", type=snapshot_ref, metavar="SNAPSHOT2", help="the newer snapshot (id or 'latest')")
    add_filter_args(p, scope="'latest' is the newest snapshot matching every option given.")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "stats", parents=[common], help="sizes per VM and for the repository: logical, unique, stored, ratios"
    )
    add_filter_args(p, scope="Count only the snapshots matching every option given.")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "dump", parents=[common], help="write a file (or a disk, as a raw image) of a snapshot to stdout"
    )
    p.add_argument("snapshot", type=snapshot_ref, help="snapshot id (prefix of 4+ digits) or 'latest'")
    p.add_argument("name", metavar="NAME", help="a file or disk of the snapshot, as `vmvault ls` names it")
    p.add_argument("--force", action="store_true", help="write to stdout even when it is a terminal")
    add_filter_args(p)
    p.set_defaults(func=cmd_dump)

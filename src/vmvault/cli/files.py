"""``vmvault files``: list, find and restore the files inside a snapshot's disks."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

from vmvault.browse import library
from vmvault.engine.files import Location, SnapshotFiles, disk_doc, entry_doc, parse_location

from ._args import snapshot_ref
from ._common import EXIT, Output, add_filter_args, open_repository, pick_snapshot, table, terminal_safe
from .progress import human_bytes

__all__ = ["register"]


def _time(ns: int | None) -> str:
    if ns is None:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


# ---- ls ---------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    library()  # a broken install says so before asking for a passphrase
    out = Output(args)
    repo = open_repository(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    loc = parse_location(snap, args.location)
    with SnapshotFiles(repo, snap) as files:
        if loc.part is None and loc.path is None:
            return _ls_disk(out, files, loc)
        if loc.path is None:
            loc = Location(loc.disk, loc.part, "/")
        entries = files.ls(loc)
        doc = {
            "snapshot": snap.id,
            "disk": loc.disk,
            "partition": loc.part,
            "path": loc.path,
            "entries": [entry_doc(e) for e in entries],
        }
        rows = []
        for e in entries:
            name = e.name if e.type != "symlink" else f"{e.name} -> {e.target}"
            rows.append([e.type, human_bytes(e.size) if e.type == "file" else "", _time(e.mtime_ns), name])
        text = f"{loc} in snapshot {snap.short_id}: {len(entries)} entries\n" + table(
            ["type", "size", "modified", "name"], rows
        )
        out.result(doc, text)
    return EXIT["ok"]


def _ls_disk(out: Output, files: SnapshotFiles, loc: Location) -> int:
    doc = disk_doc(files, loc.disk)
    rows = []
    for volume in doc["volumes"]:
        part = "-" if volume["partition"] is None else str(volume["partition"])
        what = (volume["type_name"] or "") + (f" ({volume['name']})" if volume["name"] else "")
        fs = volume["filesystem"] if volume["status"] == "ok" else (volume["note"] or volume["status"])
        rows.append([part, volume["offset"], human_bytes(volume["size"]), what, fs])
    scheme = {"mbr": "MBR", "gpt": "GPT", "none": "no partition table"}[doc["partition_table"]]
    lines = [f"disk {loc.disk} ({human_bytes(doc['size'])}), {scheme}"]
    lines.append(table(["part", "offset", "size", "type", "filesystem"], rows))
    lines += [f"note: {n}" for n in doc["notes"]]
    out.result(doc, "\n".join(lines))
    return EXIT["ok"]


# ---- find -------------------------------------------------------------------------------


def cmd_find(args: argparse.Namespace) -> int:
    library()
    out = Output(args)
    repo = open_repository(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    notes: list[str] = []
    hits = []
    with SnapshotFiles(repo, snap) as files:
        for hit in files.find(args.pattern, layers=args.layers, notes=notes):
            if out.json:
                hits.append({"location": str(hit.location), **entry_doc(hit.entry)})
            else:
                print(terminal_safe(str(hit.location)), flush=True)
                hits.append({})
    for note in notes:
        print(f"vmvault: {terminal_safe(note)}", file=sys.stderr)
    if out.json:
        out.result({"snapshot": snap.id, "pattern": args.pattern, "matches": hits, "notes": notes})
    elif not hits:
        out.say(f"no match for {args.pattern!r} in snapshot {snap.short_id}")
    return EXIT["ok"] if hits or not notes else EXIT["problems"]


# ---- restore ----------------------------------------------------------------------------


def cmd_restore(args: argparse.Namespace) -> int:
    from vmvault.engine.file_restore import restore_files

    library()
    out = Output(args)
    repo = open_repository(args)
    snap = repo.find_snapshot(args.snapshot)
    locations = [parse_location(snap, spec) for spec in args.locations]
    started = time.monotonic()
    with SnapshotFiles(repo, snap) as files:
        result = restore_files(files, locations, args.target, progress=out.progress())
    doc = result.to_dict()
    lines = [
        f"restored {result.files} files, {result.folders} folders and {result.links} links "
        f"({human_bytes(result.bytes_written)}) from snapshot {snap.short_id} to {result.target} "
        f"in {time.monotonic() - started:.1f} s"
    ]
    if result.kept:
        lines.append(f"kept {len(result.kept)} files an interrupted run of this restore had completed")
    # each name escaped whole: a guest's file name cannot start a line of its own
    lines += [f"skipped {terminal_safe(s)}" for s in result.skipped]
    lines += [f"note: {terminal_safe(n)}" for n in result.notes]
    out.result(doc, "\n".join(lines))
    return EXIT["ok"]


# ---- parser -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "files",
        parents=[common],
        help="list, find and restore files inside a snapshot's disks (no mount, no root)",
        description=(
            "Files inside the disks of a snapshot, read straight from the repository. A location is "
            "DISK[:PART]:/PATH: DISK as `vmvault show` prints it, PART the partition number (left out "
            "for a disk with one filesystem and no partition table)."
        ),
    )
    fs = p.add_subparsers(dest="files_command", metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return EXIT["usage"]

    p.set_defaults(func=usage)

    q = fs.add_parser(
        "ls",
        parents=[common],
        help="a folder's entries (DISK[:PART]:/PATH), or a disk's partitions and filesystems (DISK)",
    )
    q.add_argument("snapshot", type=snapshot_ref, help="snapshot id (or prefix), or latest")
    q.add_argument("location", metavar="DISK[:PART][:/PATH]")
    add_filter_args(q)
    q.set_defaults(func=cmd_ls)

    q = fs.add_parser("find", parents=[common], help="search every disk and partition for names matching PATTERN")
    q.add_argument("snapshot", type=snapshot_ref, help="snapshot id (or prefix), or latest")
    q.add_argument("pattern", help="shell pattern (*, ?, [..]) matched against names, or against paths if it holds a /")
    q.add_argument(
        "--layers", action="store_true", help="search the older checkpoint layers of a chain too, not only its newest"
    )
    add_filter_args(q)
    q.set_defaults(func=cmd_find)

    q = fs.add_parser(
        "restore",
        parents=[common],
        help="restore files and folders into a target folder (existing files are never overwritten)",
    )
    q.add_argument("snapshot", type=snapshot_ref, help="snapshot id (or prefix), or latest")
    q.add_argument("locations", nargs="+", metavar="DISK[:PART]:/PATH")
    q.add_argument("--target", required=True, help="folder to restore into (created if missing)")
    q.set_defaults(func=cmd_restore)

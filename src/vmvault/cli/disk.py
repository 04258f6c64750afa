"""``vmvault disk``: look at, check, compare and convert disk images; take, apply and delete checkpoints.

Every subcommand works on image files directly (no repository). Exit codes: 0 success;
3 ``check`` found damage or ``compare`` found differences; 13 an image could not be opened
or read, or a merge lacks free space (see ``vmvault.cli.EXIT``); 2 bad usage, or ``apply``
not confirmed.

An image may be hostile (``docs/design/disk-formats.md`` section 2): its parents are looked
for only in its own folder, the folder of a ``--parent`` the user names, and the folders given
with ``--allow-parent-dir``; never FIFOs, sockets or devices.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmvault.disk import FORMATS, DiskImage, ExtentKind, ParentRule, coalesce, open_image
from vmvault.disk import chain as chains
from vmvault.disk.metadata_check import check_metadata
from vmvault.errors import ConfigError, FormatError, SourceError

from ._common import EXIT, Output, output_options, terminal_safe
from .progress import human_bytes

__all__ = ["register"]


def _allowed(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "allow_parent_dir", None) or [])


def _open(args: argparse.Namespace, image: str, parent: str | None = None) -> DiskImage:
    """``image`` opened as every ``disk`` command opens it (parents in its folder or allowed ones)."""
    return open_image(image, parent=parent, rule=ParentRule.beside(image, _allowed(args)))


# ---- info -------------------------------------------------------------------------------


def _layer_line(i: int, layer: chains.Layer) -> list[str]:
    info = layer.info
    lines = [
        f"  [{i}] {layer.path}",
        f"      {layer.format} {layer.subtype}, {human_bytes(layer.allocated_bytes)} stored"
        f" in a {human_bytes(layer.file_size)} file",
    ]
    for key in ("block_size", "cluster_size"):
        if info.get(key):
            lines.append(f"      {key.replace('_', ' ')} {human_bytes(int(str(info[key])))}")
    for name, value in layer.guids.items():
        lines.append(f"      {name.replace('_', ' ')} {value}")
    if info.get("log") is not None:
        lines.append(f"      log {info['log']}")
    if info.get("parent_path"):
        checked = info.get("parent_linkage_checked")
        how = " (parent_linkage matches its DataWriteGuid)" if checked else ""
        # the locator is read from the image: escaped whole like every name from it
        lines.append(f"      parent {terminal_safe(str(info['parent_path']))}{how}")
    for w in info.get("warnings") or []:  # type: ignore[attr-defined]
        lines.append(f"      warning: {terminal_safe(str(w))}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    out = Output(args)
    chain = chains.open_chain(args.image, parent=args.parent, allow_dirs=_allowed(args))
    leaf = chain.leaf
    doc: dict[str, Any] = {
        "path": leaf.path,
        "format": leaf.format,
        "subtype": leaf.subtype,
        "virtual_size": leaf.size,
        "block_size": leaf.info.get("block_size") or leaf.info.get("cluster_size"),
        "file_size": leaf.file_size,
        "allocated_bytes": leaf.allocated_bytes,
        "log": leaf.info.get("log"),
        **chain.as_dict(),
    }
    lines = [
        f"{leaf.path}: {leaf.format} ({leaf.subtype}), virtual size {human_bytes(leaf.size)} ({leaf.size} bytes)",
        f"chain of {chain.depth} layer(s), leaf first:",
    ]
    for i, layer in enumerate(chain.layers):
        lines.extend(_layer_line(i, layer))
    out.result(doc, "\n".join(lines))
    return EXIT["ok"]


# ---- map --------------------------------------------------------------------------------


def cmd_map(args: argparse.Namespace) -> int:
    out = Output(args)
    with _open(args, args.image, args.parent) as img:
        extents = list(coalesce(img.extents() if args.layer else img.merged_extents()))
        size = img.size
    rows = [{"offset": e.offset, "length": e.length, "kind": e.kind.value} for e in extents]
    data = sum(e.length for e in extents if e.kind is ExtentKind.DATA)
    doc = {"path": args.image, "virtual_size": size, "allocated_bytes": data, "extents": rows}
    if out.json:
        out.result(doc)
    else:
        # the map is data: JSON is its plain form too, one extent per line
        import json

        print(json.dumps(rows if not args.summary else doc, indent=None if not args.summary else 2))
    return EXIT["ok"]


# ---- check ------------------------------------------------------------------------------


def _problem(exc: FormatError | SourceError) -> dict[str, Any]:
    return {
        "message": str(exc),
        "path": getattr(exc, "path", None),
        "structure": getattr(exc, "structure", None),
        "offset": getattr(exc, "offset", None),
    }


def cmd_check(args: argparse.Namespace) -> int:
    out = Output(args)
    problems: list[dict[str, Any]] = []
    notes: list[str] = []
    layers = read = tables = leaks = leaked_bytes = 0
    try:
        img = _open(args, args.image, args.parent)
    except FormatError as exc:
        problems.append(_problem(exc))
    else:
        with img:
            chain = img.chain()
            layers = len(chain)
            # the metadata of every layer first (qemu-img check's rules; no guest data read)
            for layer in chain:
                found = check_metadata(layer)
                tables += found.tables
                leaks += len(found.leaks)
                leaked_bytes += found.leaked_bytes
                notes += [f"{layer.path}: {n}" for n in found.notes]
                for f in found.problems:
                    where = f" at offset {f.offset} ({f.offset:#x})" if f.offset is not None else ""
                    message = f"{layer.path}: {f.structure}{where}: {f.message}"
                    problems.append(
                        {"message": message, "path": layer.path, "structure": f.structure, "offset": f.offset}
                    )
            if not args.metadata_only:
                read = _read_everything(img, out, problems)
    doc = {
        "path": args.image,
        "mode": "metadata" if args.metadata_only else "full",
        "ok": not problems,
        "layers": layers,
        "tables_checked": tables,
        "bytes_read": read,
        "problems": problems,
        "leaked_clusters": leaks,
        "leaked_bytes": leaked_bytes,
        "notes": notes,
    }
    lines = [f"damaged: {p['message']}" for p in problems]
    if not problems:
        what = f"{_count(layers, 'layer')}, {_count(tables, 'table')} checked"
        if args.metadata_only:
            lines.append(
                f"{args.image}: no problems found in the metadata ({what}; no data read: without "
                "--metadata-only every allocated byte is read too)"
            )
        else:
            lines.append(f"{args.image}: no problems found ({what}, {human_bytes(read)} of data read)")
    if leaks:
        lines.append(
            f"{_count(leaks, 'leaked cluster')} ({human_bytes(leaked_bytes)}): allocated but used by nothing; "
            "wasted space, no harm to the data (qemu-img check -r leaks frees them)"
        )
    lines += [f"note: {n}" for n in notes]
    out.result(doc, "\n".join(lines))
    return EXIT["ok"] if not problems else EXIT["problems"]


def _read_everything(img: DiskImage, out: Output, problems: list[dict[str, Any]]) -> int:
    """Read every allocated byte through the whole chain: blocks past the end of a file, bad
    compressed clusters and unreadable sectors show up only when read. Returns bytes read."""
    total = sum(e.length for e in img.merged_extents() if e.kind is ExtentKind.DATA)
    bar = out.progress()
    bar.start("check", total)
    read = 0
    try:
        for ext in img.merged_extents():
            if ext.kind is not ExtentKind.DATA:
                continue
            for off in range(ext.offset, ext.end, chains.COPY_CHUNK):
                n = min(chains.COPY_CHUNK, ext.end - off)
                img.read(off, n)
                read += n
                bar.advance(n)
    except (FormatError, SourceError) as exc:
        problems.append(_problem(exc))
    bar.finish()
    return read


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---- compare ----------------------------------------------------------------------------


def _span(offset: int, length: int) -> str:
    return f"offset {offset} ({offset:#x}), {length} bytes ({length:#x})"


def cmd_compare(args: argparse.Namespace) -> int:
    out = Output(args)
    with _open(args, args.a) as ia, _open(args, args.b) as ib:
        sizes = (ia.size, ib.size)
    bar = out.progress()
    bar.start("compare", min(sizes))
    diffs = chains.compare(args.a, args.b, progress=bar.advance, allow_dirs=_allowed(args))
    bar.finish()
    differing = sum(n for _, n in diffs)
    common = min(sizes)
    doc = {
        "a": args.a,
        "b": args.b,
        "size_a": sizes[0],
        "size_b": sizes[1],
        "sizes_differ": sizes[0] != sizes[1],
        "identical": not diffs,
        "differing_bytes": differing,
        "differences": [{"offset": o, "length": n} for o, n in diffs],
    }
    lines: list[str] = []
    if sizes[0] != sizes[1]:
        lines.append(
            f"sizes differ: {args.a} is {human_bytes(sizes[0])} ({sizes[0]} bytes), {args.b} is "
            f"{human_bytes(sizes[1])} ({sizes[1]} bytes); the {abs(sizes[0] - sizes[1])} bytes past "
            f"{common} ({common:#x}) exist in one image only"
        )
    inside = [(o, min(n, common - o)) for o, n in diffs if o < common]
    if not diffs:
        lines.append("images are identical")
    elif not inside:
        lines.append(f"the first {human_bytes(common)} ({common} bytes) of both are identical")
    else:
        lines.append(f"contents differ in {_count(len(inside), 'range')}, {sum(n for _, n in inside)} bytes:")
        lines += [f"  {_span(o, n)}" for o, n in inside[:20]]
        if len(inside) > 20:
            lines.append(f"  ... and {len(inside) - 20} more ranges (--json lists them all)")
    out.result(doc, "\n".join(lines))
    return EXIT["ok"] if not diffs else EXIT["problems"]


# ---- checkpoint / apply / merge -------------------------------------------------------------


def cmd_checkpoint(args: argparse.Namespace) -> int:
    out = Output(args)
    child = chains.checkpoint(args.image, name=args.name, allow_dirs=_allowed(args))
    out.result({"parent": args.image, "checkpoint": child}, f"checkpoint created: {child}\nwrite to it from now on")
    return EXIT["ok"]


def _confirm_deletion(args: argparse.Namespace, paths: list[str]) -> bool:
    """``--yes``, or the answer to a question on the terminal; without either, a ConfigError."""
    if args.yes:
        return True
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise ConfigError(
            f"disk apply deletes {_count(len(paths), 'file')} ({', '.join(paths)}): give --yes to confirm "
            "(no terminal to ask on); nothing was deleted"
        )
    print(f"this deletes {_count(len(paths), 'file')}, and their changes with them:", file=sys.stderr)
    for p in paths:
        print(f"  {terminal_safe(p)}", file=sys.stderr)
    print("delete? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_apply(args: argparse.Namespace) -> int:
    out = Output(args)
    deleted: list[str] = []

    def confirm(paths: list[str]) -> bool:
        deleted.extend(paths)
        return _confirm_deletion(args, paths)

    parent = chains.apply(args.child, discard_subtree=args.subtree, allow_dirs=_allowed(args), confirm=confirm)
    out.result(
        {"discarded": args.child, "parent": parent, "deleted": deleted},
        f"discarded {args.child} (deleted {', '.join(deleted)}); the disk is {parent}",
    )
    return EXIT["ok"]


def cmd_merge(args: argparse.Namespace) -> int:
    out = Output(args)
    bar = out.progress()
    with _open(args, args.child) as img:
        total = sum(e.length for e in img.extents() if e.kind is not ExtentKind.PARENT)
        parent = img.parent
        if parent is not None:
            total += sum(e.length for e in parent.extents() if e.kind is not ExtentKind.PARENT)
    need = chains.merge_space(args.child, allow_dirs=_allowed(args)) if parent is not None else None
    bar.start("merge", total)
    result = chains.merge(args.child, progress=bar.advance, allow_dirs=_allowed(args))
    bar.finish()
    out.result({"merged": args.child, "parent": result, "space_needed": need}, f"merged {args.child} into {result}")
    return EXIT["ok"]


# ---- convert ----------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    out = Output(args)
    with _open(args, args.src, args.parent) as img:
        total = sum(e.length for e in img.merged_extents() if e.kind is ExtentKind.DATA)
    bar = out.progress()
    bar.start("convert", total)
    dest = chains.convert(
        args.src, args.dest, args.to, parent=args.parent, progress=bar.advance, allow_dirs=_allowed(args)
    )
    bar.finish()
    with open_image(dest, rule=ParentRule.beside(dest)) as img:
        stored = sum(e.length for e in img.extents() if e.kind is ExtentKind.DATA)
        size = img.size
    doc = {"source": args.src, "dest": dest, "format": args.to, "virtual_size": size, "allocated_bytes": stored}
    out.result(doc, f"wrote {dest}: {args.to}, {human_bytes(size)} virtual, {human_bytes(stored)} allocated")
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    only_output = output_options(common)
    p = sub.add_parser("disk", parents=[only_output], help="inspect, check, convert disk images; checkpoints")
    ds = p.add_subparsers(dest="disk_command", metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return EXIT["usage"]

    p.set_defaults(func=usage)

    def allow_parent_dir(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--allow-parent-dir",
            action="append",
            metavar="DIR",
            help="parents may also be in DIR (repeatable); by default only in the image's own folder",
        )

    q = ds.add_parser("info", parents=[only_output], help="format, sizes, GUIDs and the chain of an image")
    q.add_argument("image")
    q.add_argument("--parent", help="where the direct parent is (overrides the image's locator)")
    allow_parent_dir(q)
    q.set_defaults(func=cmd_info)

    q = ds.add_parser("map", parents=[only_output], help="the allocated extents of an image, as JSON")
    q.add_argument("image")
    q.add_argument("--parent", help="where the direct parent is")
    q.add_argument("--layer", action="store_true", help="this file's own map (data/zero/parent), not the merged one")
    q.add_argument("--summary", action="store_true", help="with size and allocated bytes")
    allow_parent_dir(q)
    q.set_defaults(func=cmd_map)

    q = ds.add_parser(
        "check",
        parents=[only_output],
        help="check structures and read every allocated byte (exit 3: damage)",
        description="Check IMAGE and every layer of its chain: first the metadata of each layer (what "
        "qemu-img check looks at: headers, VHDX BAT and sector bitmaps, VHD BAT, qcow2 L1/L2 tables and "
        "refcounts, bounds and overlaps, leaked clusters), then, unless --metadata-only, every allocated "
        "byte is read (blocks cut off, bad compressed clusters, unreadable sectors). Exit 3 on damage; "
        "leaked clusters are reported but are no damage.",
    )
    q.add_argument("image")
    q.add_argument("--parent", help="where the direct parent is")
    q.add_argument(
        "--metadata-only",
        action="store_true",
        help="check the metadata alone, without reading data (fast, like qemu-img check)",
    )
    allow_parent_dir(q)
    q.set_defaults(func=cmd_check)

    q = ds.add_parser(
        "compare",
        parents=[only_output],
        help="compare two images' contents (exit 3: they differ)",
        description="Compare what a guest sees in A and B, through their chains. Differences are listed "
        "as offsets and lengths in decimal and hex (512-byte sectors); images of different sizes differ, "
        "and the output says so.",
    )
    q.add_argument("a")
    q.add_argument("b")
    allow_parent_dir(q)
    q.set_defaults(func=cmd_compare)

    q = ds.add_parser(
        "checkpoint", parents=[only_output], help="take a checkpoint: new differencing child beside IMAGE"
    )
    q.add_argument("image")
    q.add_argument("--name", help="file name of the child (default <disk>_<GUID>.avhdx/.avhd/.qcow2)")
    allow_parent_dir(q)
    q.set_defaults(func=cmd_checkpoint)

    q = ds.add_parser(
        "apply",
        parents=[only_output],
        help="discard a checkpoint's changes (delete CHILD)",
        description="Go back to the checkpoint CHILD was taken at: delete CHILD (and with --subtree the "
        "checkpoints below it), losing every change written to them. The files to delete are listed and "
        "confirmed on the terminal; without a terminal, --yes is required.",
    )
    q.add_argument("child")
    q.add_argument("--subtree", action="store_true", help="also delete the checkpoints below CHILD")
    q.add_argument("-y", "--yes", action="store_true", help="delete without asking (required without a terminal)")
    allow_parent_dir(q)
    q.set_defaults(func=cmd_apply)

    q = ds.add_parser(
        "merge",
        parents=[only_output],
        help="delete a checkpoint: fold CHILD into its parent (crash-safe)",
        description="Fold CHILD into its parent: afterwards the parent holds CHILD's data and CHILD is gone. "
        "Free space: the merged parent is written as a new file beside the parent and then renamed over "
        "it, so the parent's folder needs room for that file until the old parent and CHILD are removed: "
        "up to the parent's and CHILD's data together, counted in whole blocks (VHDX, VHD) or clusters "
        "(qcow2), plus the format's headers and tables (a fixed-size parent: its full size). The merge "
        "works that out and, when the free space is short, stops before writing anything (exit 13); "
        "--json reports it as space_needed.",
    )
    q.add_argument("child")
    allow_parent_dir(q)
    q.set_defaults(func=cmd_merge)

    q = ds.add_parser("convert", parents=[only_output], help="flatten an image's chain into a new sparse image")
    q.add_argument("src")
    q.add_argument("dest")
    q.add_argument("--to", required=True, choices=FORMATS, help="output format")
    q.add_argument("--parent", help="where the source's direct parent is")
    allow_parent_dir(q)
    q.set_defaults(func=cmd_convert)

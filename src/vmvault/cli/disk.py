"""``vmvault disk``: look at, check, compare and convert disk images; take, apply and delete checkpoints.

Every subcommand works on image files directly (no repository). Exit codes: 0 success;
3 ``check`` found damage or ``compare`` found differences; 13 an image could not be opened
or read (see ``vmvault.cli.EXIT``); 2 bad usage.
"""

from __future__ import annotations

import argparse
from typing import Any

from vmvault.disk import FORMATS, ExtentKind, coalesce, open_image
from vmvault.disk import chain as chains
from vmvault.errors import FormatError, SourceError

from ._common import EXIT, Output
from .progress import human_bytes

__all__ = ["register"]


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
        lines.append(f"      parent {info['parent_path']}{how}")
    for w in info.get("warnings") or []:  # type: ignore[attr-defined]
        lines.append(f"      warning: {w}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    out = Output(args)
    chain = chains.open_chain(args.image, parent=args.parent)
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
    with open_image(args.image, parent=args.parent) as img:
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
    layers = 0
    read = 0
    try:
        img = open_image(args.image, parent=args.parent)
    except FormatError as exc:
        problems.append(_problem(exc))
    else:
        with img:
            layers = len(img.chain())
            total = sum(e.length for e in img.merged_extents() if e.kind is ExtentKind.DATA)
            bar = out.progress()
            bar.start("check", total)
            try:
                # every allocated byte through the whole chain: blocks past the end of a file,
                # bad compressed clusters and unreadable sectors show up only when read
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
    doc = {"path": args.image, "ok": not problems, "layers": layers, "bytes_read": read, "problems": problems}
    if problems:
        text = "\n".join(f"damaged: {p['message']}" for p in problems)
    else:
        text = f"{args.image}: no problems found ({layers} layer(s), {human_bytes(read)} of data read)"
    out.result(doc, text)
    return EXIT["ok"] if not problems else EXIT["problems"]


# ---- compare ----------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    out = Output(args)
    with open_image(args.a) as ia, open_image(args.b) as ib:
        sizes = (ia.size, ib.size)
    bar = out.progress()
    bar.start("compare", min(sizes))
    diffs = chains.compare(args.a, args.b, progress=bar.advance)
    bar.finish()
    differing = sum(n for _, n in diffs)
    doc = {
        "a": args.a,
        "b": args.b,
        "size_a": sizes[0],
        "size_b": sizes[1],
        "identical": not diffs,
        "differing_bytes": differing,
        "differences": [{"offset": o, "length": n} for o, n in diffs],
    }
    if not diffs:
        text = "images are identical"
    else:
        shown = [f"  [{o:#x}, +{n:#x})" for o, n in diffs[:20]]
        more = [f"  ... and {len(diffs) - 20} more ranges"] if len(diffs) > 20 else []
        text = "\n".join([f"images differ in {len(diffs)} range(s), {human_bytes(differing)}:", *shown, *more])
    out.result(doc, text)
    return EXIT["ok"] if not diffs else EXIT["problems"]


# ---- checkpoint / apply / merge -------------------------------------------------------------


def cmd_checkpoint(args: argparse.Namespace) -> int:
    out = Output(args)
    child = chains.checkpoint(args.image, name=args.name)
    out.result({"parent": args.image, "checkpoint": child}, f"checkpoint created: {child}\nwrite to it from now on")
    return EXIT["ok"]


def cmd_apply(args: argparse.Namespace) -> int:
    out = Output(args)
    parent = chains.apply(args.child, discard_subtree=args.subtree)
    out.result({"discarded": args.child, "parent": parent}, f"discarded {args.child}; the disk is {parent}")
    return EXIT["ok"]


def cmd_merge(args: argparse.Namespace) -> int:
    out = Output(args)
    bar = out.progress()
    with open_image(args.child) as img:
        total = sum(e.length for e in img.extents() if e.kind is not ExtentKind.PARENT)
        parent = img.parent
        if parent is not None:
            total += sum(e.length for e in parent.extents() if e.kind is not ExtentKind.PARENT)
    bar.start("merge", total)
    result = chains.merge(args.child, progress=bar.advance)
    bar.finish()
    out.result({"merged": args.child, "parent": result}, f"merged {args.child} into {result}")
    return EXIT["ok"]


# ---- convert ----------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    out = Output(args)
    with open_image(args.src, parent=args.parent) as img:
        total = sum(e.length for e in img.merged_extents() if e.kind is ExtentKind.DATA)
    bar = out.progress()
    bar.start("convert", total)
    dest = chains.convert(args.src, args.dest, args.to, parent=args.parent, progress=bar.advance)
    bar.finish()
    with open_image(dest) as img:
        stored = sum(e.length for e in img.extents() if e.kind is ExtentKind.DATA)
        size = img.size
    doc = {"source": args.src, "dest": dest, "format": args.to, "virtual_size": size, "allocated_bytes": stored}
    out.result(doc, f"wrote {dest}: {args.to}, {human_bytes(size)} virtual, {human_bytes(stored)} allocated")
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("disk", parents=[common], help="inspect, check, convert disk images; checkpoints")
    ds = p.add_subparsers(dest="disk_command", metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help()
        return EXIT["usage"]

    p.set_defaults(func=usage)

    q = ds.add_parser("info", parents=[common], help="format, sizes, GUIDs and the chain of an image")
    q.add_argument("image")
    q.add_argument("--parent", help="where the direct parent is (overrides the image's locator)")
    q.set_defaults(func=cmd_info)

    q = ds.add_parser("map", parents=[common], help="the allocated extents of an image, as JSON")
    q.add_argument("image")
    q.add_argument("--parent", help="where the direct parent is")
    q.add_argument("--layer", action="store_true", help="this file's own map (data/zero/parent), not the merged one")
    q.add_argument("--summary", action="store_true", help="with size and allocated bytes")
    q.set_defaults(func=cmd_map)

    q = ds.add_parser("check", parents=[common], help="check structures and read every allocated byte (exit 3: damage)")
    q.add_argument("image")
    q.add_argument("--parent", help="where the direct parent is")
    q.set_defaults(func=cmd_check)

    q = ds.add_parser("compare", parents=[common], help="compare two images' contents (exit 3: they differ)")
    q.add_argument("a")
    q.add_argument("b")
    q.set_defaults(func=cmd_compare)

    q = ds.add_parser("checkpoint", parents=[common], help="take a checkpoint: new differencing child beside IMAGE")
    q.add_argument("image")
    q.add_argument("--name", help="file name of the child (default <disk>_<GUID>.avhdx/.avhd/.qcow2)")
    q.set_defaults(func=cmd_checkpoint)

    q = ds.add_parser("apply", parents=[common], help="discard a checkpoint's changes (delete CHILD)")
    q.add_argument("child")
    q.add_argument("--subtree", action="store_true", help="also delete the checkpoints below CHILD")
    q.set_defaults(func=cmd_apply)

    q = ds.add_parser("merge", parents=[common], help="delete a checkpoint: fold CHILD into its parent (crash-safe)")
    q.add_argument("child")
    q.set_defaults(func=cmd_merge)

    q = ds.add_parser("convert", parents=[common], help="flatten an image's chain into a new sparse image")
    q.add_argument("src")
    q.add_argument("dest")
    q.add_argument("--to", required=True, choices=FORMATS, help="output format")
    q.add_argument("--parent", help="where the source's direct parent is")
    q.set_defaults(func=cmd_convert)

"""``vmvault cache [list|clean|remove]``: this host's caches of repositories (repo/host_cache.py).

Each repository a host uses leaves an index cache (about 70 bytes a chunk), copies of its
snapshots and of its index blocks (at most 1 GiB) in ``$VMVAULT_CACHE_DIR``. ``list`` shows
them; ``clean`` removes those unused for ``--max-age`` days and temporary caches a killed
command left behind; ``remove`` removes the ones named. A cache in use by a running command is
never removed. Exit 3 when an entry asked for was in use and left.
"""

from __future__ import annotations

import argparse
import time

from vmvault import times
from vmvault.errors import ConfigError
from vmvault.repo.host_cache import (
    CLEAN_AFTER_DAYS,
    KINDS,
    CacheEntry,
    entries,
    leftovers,
    remove_entry,
    remove_leftover,
)
from vmvault.repo.index_cache import cache_root

from ._args import whole_number
from ._common import EXIT, Output, output_options, plural, table
from .progress import human_bytes

__all__ = ["register"]


def _state(entry: CacheEntry) -> str:
    return {True: "in use", None: "unknown"}.get(entry.in_use, "")


def _list(out: Output, root: str) -> int:
    found = _entries(root)
    rows = [
        [
            e.name.split("-")[0],
            e.location or "-",
            *(human_bytes(e.sizes[k]) if k in e.sizes else "-" for k in KINDS),
            times.local(e.last_used, seconds=False),
            _state(e),
        ]
        for e in found
    ]
    total = sum(e.total for e in found)
    text = (
        table(["Repository", "Location", "Index", "Snapshots", "Blocks", "Last used", "State"], rows) + "\n"
        if found
        else ""
    ) + f"{plural(len(found), 'cache')}, {human_bytes(total)}, in {root}"
    out.result({"root": root, "bytes": total, "caches": [e.public() for e in found]}, text)
    return EXIT["ok"]


def _chosen(found: list[CacheEntry], wanted: list[str]) -> list[CacheEntry]:
    """The entries ``wanted`` names: each an entry's name, a repository id or a prefix of one
    (8 hex digits at least) or a location exactly as listed."""
    chosen: dict[str, CacheEntry] = {}
    for want in wanted:
        hits = [
            e
            for e in found
            if want in (e.name, e.location) or (len(want) >= 8 and e.repository.startswith(want.lower()))
        ]
        if not hits:
            raise ConfigError(f"no cache of {want!r} here: `vmvault cache list` shows them")
        chosen.update((e.name, e) for e in hits)
    return list(chosen.values())


def _remove(out: Output, root: str, chosen: list[CacheEntry], dry_run: bool) -> tuple[list[CacheEntry], int]:
    """Remove ``chosen`` (or say what would go): the entries removed, and how many were left."""
    done: list[CacheEntry] = []
    for entry in chosen:
        where = entry.location or "no location recorded"
        if entry.in_use is None:
            out.say(f"left {entry.name} ({where}): this file system takes no locks, so its use cannot be told")
            continue
        try:
            removed = entry.in_use is False and (dry_run or remove_entry(entry.name, root))
        except OSError as exc:
            out.say(f"left {entry.name} ({where}), not all of it removed: {exc}")
            continue
        if not removed:
            out.say(f"left {entry.name} ({where}): a running command uses it")
            continue
        done.append(entry)
        out.say(f"{'would remove' if dry_run else 'removed'} {entry.name} ({where}), {human_bytes(entry.total)}")
    return done, len(chosen) - len(done)


def _entries(root: str) -> list[CacheEntry]:
    try:
        return entries(root)
    except OSError as exc:
        raise ConfigError(f"the cache folder {root} cannot be used: {exc} (VMVAULT_CACHE_DIR names another)") from exc


def cmd_cache(args: argparse.Namespace) -> int:
    out = Output(args)
    root = cache_root()
    command = args.cache_command or "list"
    if command == "list":
        return _list(out, root)
    dry_run = bool(args.dry_run)
    why = "asked"
    if command == "remove":
        found = _entries(root)
        if args.all and args.entries:
            raise ConfigError("give either --all or the caches to remove, not both")
        if not args.all and not args.entries:
            raise ConfigError("name the caches to remove (a repository id, or a location as listed) or give --all")
        chosen = found if args.all else _chosen(found, args.entries)
    else:  # clean
        cutoff = time.time() - args.max_age * 86400
        chosen = [e for e in _entries(root) if e.last_used < cutoff]
        why = f"unused for {args.max_age} days"
    done, left = _remove(out, root, chosen, dry_run)
    temporaries: list[tuple[str, int, float]] = []
    if command == "clean":
        for path, size, newest in leftovers():
            if dry_run or remove_leftover(path):
                temporaries.append((path, size, newest))
                verb = "would remove" if dry_run else "removed"
                out.say(f"{verb} {path}, left by a killed command, {human_bytes(size)}")
    freed = sum(e.total for e in done) + sum(t[1] for t in temporaries)
    count = plural(len(done) + len(temporaries), "cache")
    summary = (
        f"{count} to remove, would free {human_bytes(freed)}"
        if dry_run
        else f"{count} removed, freed {human_bytes(freed)}"
    )
    if left:
        summary += f"; {plural(left, 'cache')} left (above: in use, or not removable)"
    doc = {
        "root": root,
        "dry_run": dry_run,
        "removed": [{**e.public(), "why": why} for e in done],
        "temporary": [{"path": p, "bytes": n, "last_used": t} for p, n, t in temporaries],
        "left": left,
        "bytes": freed,
    }
    out.result(doc, summary)
    return EXIT["problems"] if left else EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    output = output_options(common)
    p = sub.add_parser(
        "cache",
        parents=[output],
        help="list or remove this host's caches of repositories",
        description="This host keeps, per repository and location, an index cache, copies of snapshots and of "
        "index blocks in $VMVAULT_CACHE_DIR (default ~/.cache/vmvault). Each costs only time to build again; "
        "a cache a running command uses is never removed (exit 3 when one asked for was in use).",
    )
    p.set_defaults(func=cmd_cache, cache_command=None)
    cs = p.add_subparsers(dest="cache_command", metavar="COMMAND")
    q = cs.add_parser("list", parents=[output], help="the caches, their sizes and last use (the default)")
    q.set_defaults(func=cmd_cache)
    q = cs.add_parser(
        "clean",
        parents=[output],
        help="remove caches unused for a while, and temporary ones killed commands left",
    )
    q.add_argument(
        "--max-age",
        type=whole_number(0, 36500, what="a number of days"),
        default=CLEAN_AFTER_DAYS,
        metavar="DAYS",
        help=f"remove caches unused for this many days (default: {CLEAN_AFTER_DAYS})",
    )
    q.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    q.set_defaults(func=cmd_cache)
    q = cs.add_parser("remove", parents=[output], help="remove the caches named (or all with --all)")
    q.add_argument(
        "entries", nargs="*", metavar="CACHE", help="a repository id (8 hex digits or more), or a location as listed"
    )
    q.add_argument("--all", action="store_true", help="every cache not in use")
    q.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    q.set_defaults(func=cmd_cache)

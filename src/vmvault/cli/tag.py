"""``vmvault tag``: add, remove or set the tags of snapshots.

Tags live in the snapshot manifest, whose name is its hash: changing them writes a new
manifest (the old one's id kept in ``extra["original"]``, as restic does) and removes the old
one. The new one is written before the old is removed, so at every moment one of them
exists; an exclusive lock keeps prune and other retags out meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from vmvault.errors import ConfigError, ImmutableError
from vmvault.repo.immutability import require_full_access, retained
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

from ._args import hex_prefix, new_tag
from ._common import EXIT, Output, add_filter_args, open_repository, plural, snapshot_filter, table, terminal_safe

__all__ = ["register", "retag"]

#: key in ``Snapshot.extra``: the id of the first manifest of a retagged snapshot
ORIGINAL = "original"


def _new_tags(snap: Snapshot, add: list[str], remove: list[str], set_to: list[str] | None) -> list[str]:
    tags = set(set_to) if set_to is not None else set(snap.tags)
    tags |= set(add)
    tags -= set(remove)
    return sorted(tags)


def retag(repo: Repository, snaps: list[Snapshot], changes: dict[str, list[str]]) -> list[tuple[Snapshot, str]]:
    """Write each snapshot of ``snaps`` (summaries will do: each is read again whole) whose id
    ``changes`` maps to new tags as a new manifest with those tags, then remove the old one.
    Returns ``(old, new id)`` pairs. Under an
    exclusive lock; a snapshot under the repository's retention period is refused before
    anything is written (the old manifest could not be removed)."""
    require_full_access(repo, "tag")
    done: list[tuple[Snapshot, str]] = []
    with repo.lock(exclusive=True, operation="tag"):
        present = set(repo.snapshot_ids())
        todo = [s for s in snaps if s.id in changes]
        gone = [s.short_id for s in todo if s.id not in present]
        if gone:
            raise ConfigError(f"snapshots {', '.join(gone)} were removed meanwhile; nothing was changed")
        held = retained(repo, [f"snapshots/{s.id}" for s in todo])
        if held:
            names = ", ".join(sorted(h.removeprefix("snapshots/")[:8] for h in held))
            raise ImmutableError(
                f"snapshots {names} are under the repository's retention period: their manifests cannot be replaced "
                "yet, so their tags cannot change; nothing was changed"
            )
        for snap in todo:
            extra = dict(snap.extra)
            extra.setdefault(ORIGINAL, snap.id)
            whole = repo.load_snapshot(snap.id, listed=True)
            new = dataclasses.replace(whole, tags=changes[snap.id], extra=extra, id="")
            new_id = repo.save_snapshot(new)
            if new_id != snap.id:
                repo.delete_snapshot(snap.id)
            done.append((snap, new_id))
    return done


def cmd_tag(args: argparse.Namespace) -> int:
    out = Output(args)
    add, remove = list(args.add or ()), list(args.remove or ())
    set_to = list(args.set) if args.set is not None else None
    if not add and not remove and set_to is None:
        raise ConfigError("say what to change: --add TAG, --remove TAG or --set TAG (each repeatable)")
    if set_to is not None and (add or remove):
        raise ConfigError("--set replaces every tag: give it alone, not with --add or --remove")
    flt = snapshot_filter(args)
    if not args.ids and flt.empty():
        raise ConfigError("name the snapshots to tag: their ids, or --vm/--host/--tag/--source")
    repo = open_repository(args)
    snaps = flt.select(repo.list_snapshots(summaries=True))
    if args.ids:
        chosen = []
        for ref in args.ids:
            matches = [s for s in snaps if s.id.startswith(ref)]
            if len(matches) != 1:
                why = "no snapshot" if not matches else f"{len(matches)} snapshots"
                extra = f" matching {flt.describe()}" if not flt.empty() else ""
                raise ConfigError(f"{ref!r} names {why}{extra}; nothing was changed")
            chosen.append(matches[0])
        snaps = chosen
    changes = {s.id: new for s in snaps if (new := _new_tags(s, add, remove, set_to)) != sorted(s.tags)}
    done = retag(repo, snaps, changes) if changes else []
    rows = [
        [old.short_id, new_id[:8], ",".join(old.tags) or "-", ",".join(changes[old.id]) or "-"] for old, new_id in done
    ]
    text = table(["Old ID", "New ID", "Tags before", "Tags now"], rows) if rows else ""
    unchanged = len(snaps) - len(done)
    text += (
        ("\n" if text else "")
        + f"retagged {plural(len(done), 'snapshot')}"
        + (f"; {unchanged} already had those tags" if unchanged else "")
    )
    doc: dict[str, Any] = {
        "changed": [{"old": old.id, "new": new_id, "tags": changes[old.id]} for old, new_id in done],
        "unchanged": [s.id for s in snaps if s.id not in changes],
    }
    out.result(doc, terminal_safe(text, newlines=True))
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "tag",
        parents=[common],
        help="add, remove or set snapshot tags (rewrites each manifest, as restic does)",
        description="Tags live in a snapshot's manifest, whose id is its hash: a changed snapshot gets a new id "
        "(the old one is kept in the manifest as 'original'), and the old manifest is removed.",
    )
    p.add_argument("ids", nargs="*", type=hex_prefix("snapshot id"), metavar="ID", help="snapshots to change")
    p.add_argument("--add", action="append", type=new_tag, metavar="TAG", help="add this tag (repeatable)")
    p.add_argument("--remove", action="append", type=new_tag, metavar="TAG", help="remove this tag (repeatable)")
    p.add_argument("--set", action="append", type=new_tag, metavar="TAG", help="replace all tags by these (repeatable)")
    add_filter_args(p, scope="Change the snapshots matching every option given (and the IDs, if given).")
    p.set_defaults(func=cmd_tag)

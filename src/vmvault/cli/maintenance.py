"""Repository maintenance commands: check, forget, prune, repair."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from vmvault import times
from vmvault.errors import ConfigError
from vmvault.repo.check import DELETED, UNLOCKED, CheckReport, check
from vmvault.repo.filters import SnapshotFilter
from vmvault.repo.immutability import (
    deleted_objects,
    lock_objects,
    require_full_access,
    undelete_objects,
    unlocked_objects,
)
from vmvault.repo.locks import remove_locks
from vmvault.repo.prune import ForgetReport, PruneReport, forget, forget_ids, prune
from vmvault.repo.repair import RepairReport, SnapshotRepairReport, repair_index, repair_snapshots
from vmvault.repo.repository import Repository
from vmvault.repo.retention import GROUP_KEYS, RetentionPolicy

from ._args import hex_prefix, percentage, positive_duration, whole_number
from ._common import EXIT, Output, add_filter_args, open_repository, plural, snapshot_filter, table, terminal_safe
from .progress import PhaseBars, human_bytes

__all__ = ["register"]


def _group_by(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(","))
    wrong = [k for k in keys if k not in GROUP_KEYS]
    if wrong:
        raise argparse.ArgumentTypeError(
            f"cannot group snapshots by {', '.join(repr(k) for k in wrong)}; choose from {', '.join(GROUP_KEYS)}"
        )
    return keys


def _tag_set(text: str) -> str:
    """A --keep-tag value: tags separated by commas, none of them empty (``a,`` is a typo)."""
    if any(not t.strip() for t in text.split(",")):
        raise argparse.ArgumentTypeError(f"an empty tag in {text!r} (give tags separated by commas)")
    return text


def _render_check(report: CheckReport, flt: SnapshotFilter | None = None) -> str:
    lines = []
    st = report.stats
    what = "the structure"
    if report.read_data:
        share = f"{report.subset * 100:g}% of the packs" if report.subset else "every pack"
        scope = ""
        if flt is not None and not flt.empty():
            scope = (
                f" holding data of the {plural(st.get('snapshots_selected', 0), 'snapshot')} matching {flt.describe()}"
            )
        what = f"the structure and {share}{scope} (decrypted and re-hashed)"
    lines.append(f"checked {what}:")
    lines.append(
        f"  {plural(st.get('snapshots', 0), 'snapshot')}, {plural(st.get('keys', 0), 'key')}, "
        f"{plural(st.get('index_files', 0), 'index file')}, "
        f"{plural(st.get('packs_stored', 0), 'pack')} ({human_bytes(st.get('bytes_stored', 0))}), "
        f"{plural(st.get('blobs_indexed', 0), 'chunk and index block', 'chunks and index blocks')} indexed"
    )
    if report.read_data:
        lines.append(
            f"  read {plural(st.get('packs_read', 0), 'pack')} ({human_bytes(st.get('bytes_read', 0))}), "
            f"{plural(st.get('blobs_read', 0), 'blob')} verified"
        )
    others = st.get("locks", 0)
    lines.append(f"  {plural(others, 'lock')} of other processes" if others else "  no other process holds a lock")
    if "objects_lock_checked" in st:
        lines.append(
            f"  Object Lock retention of {plural(st['objects_lock_checked'], 'object')} still inside the "
            "retention period looked up"
        )
    for p in report.problems:
        # names and messages quote the storage: each problem is one line, escaped whole
        lines.append(terminal_safe(f"{p.severity}: {p.kind}: {p.object}: {p.message}"))
        for a in p.affects:
            ranges = ", ".join(f"{s:#x}-{e:#x}" for s, e in a.ranges[:4])
            more = f" (+{len(a.ranges) - 4} more ranges)" if len(a.ranges) > 4 else ""
            lines.append(
                terminal_safe(
                    f"    affects snapshot {a.snapshot[:8]} ({times.local(a.time)}, {a.source.get('location', '')}) "
                    f"{a.kind} {a.name}{': bytes ' + ranges + more if ranges else ''}"
                )
            )
    if report.ok:
        lines.append("no errors found" + (f" ({plural(len(report.warnings), 'warning')})" if report.warnings else ""))
    else:
        lines.append(
            f"{plural(len(report.errors), 'error')}; damaged snapshots: "
            f"{', '.join(s[:8] for s in report.damaged_snapshots) or '-'}; "
            f"intact snapshots: {len(report.intact_snapshots)}"
        )
        unlocked = [p for p in report.errors if p.kind == UNLOCKED]
        deleted = [p for p in report.errors if p.kind == DELETED]
        if deleted:
            lines.append(
                f"{plural(len(deleted), 'object was', 'objects were')} deleted while the storage holds them locked: "
                "first `vmvault repair undelete` brings them back (before any `repair index`, which would drop "
                "their packs from the index), then check again"
            )
        elif len(unlocked) < len(report.errors):
            lines.append(
                "ways out: back up the sources again (lost data is stored again), then `vmvault repair index` and "
                "`vmvault repair snapshots` (repository-format.md, section 9)"
            )
        if unlocked:
            lines.append(
                f"{plural(len(unlocked), 'object is', 'objects are')} not locked by the storage as the repository's "
                "retention asks: `vmvault repair locks` locks them (docs/storage.md, Object Lock)"
            )
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    out = Output(args)
    if args.subset is not None and not args.read_data:
        args.read_data = True
    repo = open_repository(args, transfer=args.read_data)
    flt = snapshot_filter(args)
    if not flt.empty() and not args.read_data:
        raise ConfigError("snapshot filters choose which data --read-data reads: give --read-data (or --subset) too")
    with PhaseBars(out.progress()) as bars:
        report = check(
            repo,
            read_data=args.read_data,
            subset=args.subset,
            progress=bars,
            seed=args.seed,
            select=None if flt.empty() else flt,
        )
    out.result(report.to_dict(), _render_check(report, flt))
    return EXIT["ok"] if report.ok else EXIT["problems"]


_UNITS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_PERIOD = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month", "yearly": "year"}
_WITHIN = ("within", "within_hourly", "within_daily", "within_weekly", "within_monthly", "within_yearly")


def _policy(args: argparse.Namespace) -> RetentionPolicy:
    def count(unit: str) -> int:
        return int(getattr(args, f"keep_{unit}") or 0)

    def window(name: str) -> float:
        return float(getattr(args, f"keep_{name}") or 0.0)

    return RetentionPolicy(
        last=count("last"),
        hourly=count("hourly"),
        daily=count("daily"),
        weekly=count("weekly"),
        monthly=count("monthly"),
        yearly=count("yearly"),
        within=window("within"),
        within_hourly=window("within_hourly"),
        within_daily=window("within_daily"),
        within_weekly=window("within_weekly"),
        within_monthly=window("within_monthly"),
        within_yearly=window("within_yearly"),
        keep_tags=tuple(args.keep_tag or ()),
        group_by=args.group_by,
    )


def _nothing_kept(args: argparse.Namespace) -> ConfigError:
    """Why a policy that keeps nothing is refused, naming what was typed."""
    zeros = [f"--keep-{unit} 0" for unit in _UNITS if getattr(args, f"keep_{unit}") == 0]
    if zeros:
        return ConfigError(
            f"{' and '.join(zeros)} alone keeps nothing, and forget never removes every snapshot: give a count of "
            "1 or more, another --keep-* rule, or the ids of the snapshots to remove (`vmvault forget ID...`)"
        )
    return ConfigError(
        "give at least one --keep-* option (forget never removes everything), or the ids of the snapshots to remove"
    )


def _group_header(key: dict[str, Any]) -> str:
    parts = []
    if "vm" in key:
        parts.append(f"VM {key['vm']}")
    if "location" in key:
        parts.append(f"from {key['location']}" if parts else f"source {key['location']}")
    if "host" in key:
        parts.append(f"host {key['host']}")
    if "tags" in key:
        parts.append(f"tags {','.join(key['tags']) or '(none)'}")
    return terminal_safe(", ".join(parts) or "all snapshots")


def _render_forget(report: ForgetReport, *, dry_run: bool) -> str:
    blocks = []
    removing = 0
    for g in report.result.groups:
        rows = []
        for s in sorted([*g.keep, *g.remove], key=lambda s: (s.time, s.id), reverse=True):
            if s in g.keep:
                rows.append([s.short_id, times.local(s.time), "keep", "; ".join(g.reasons.get(s.id, []))])
            elif s.id in report.retained:
                rows.append([s.short_id, times.local(s.time), "retained", "under the repository's retention period"])
            else:
                removing += 1
                rows.append([s.short_id, times.local(s.time), "would remove" if dry_run else "remove", ""])
        kept, removed = len(g.keep), len(g.remove)
        head = f"{_group_header(g.key)}: keep {kept}, {'would remove' if dry_run else 'remove'} {removed}"
        blocks.append(head + "\n" + table(["ID", "Time", "Action", "Reason"], rows))
    verb = "would remove" if dry_run else "removed"
    total = f"{verb} {plural(removing, 'snapshot')} of {plural(len(report.result.groups), 'group')}"
    if report.unreadable:
        total += f"; {plural(len(report.unreadable), 'unreadable snapshot')} not judged (see `vmvault check`)"
    return "\n\n".join([*blocks, total])


def cmd_forget(args: argparse.Namespace) -> int:
    out = Output(args)
    policy = _policy(args)
    flt = snapshot_filter(args)
    if args.ids:
        if not policy.empty() or not flt.empty():
            raise ConfigError("give snapshot ids, or --keep-* options (and filters); not both")
        return _forget_ids(args, out)
    if policy.empty():
        raise _nothing_kept(args)
    repo = open_repository(args)
    report = forget(repo, policy, dry_run=args.dry_run, select=None if flt.empty() else flt)
    doc: dict[str, Any] = {"forget": report.to_dict() | {"filter": flt.to_dict()}}
    out.result(doc, _then_prune(args, repo, out, doc, _render_forget(report, dry_run=args.dry_run)))
    return 0


def render_prune(r: PruneReport) -> str:
    """What prune removes (or would): the counts a dry run gives are the counts prune then
    does (tests/cli/test_forget_cli.py runs both); the size afterwards is measured after a
    real run and estimated by a dry run (repacked data goes into new packs)."""
    verb = "would remove" if r.dry_run else "removed"
    lines = [
        f"prune: {verb} {plural(r.blobs_removed, 'unused chunk')} ({human_bytes(r.bytes_removed)}); "
        f"{'would delete' if r.dry_run else 'deleted'} {plural(r.packs_deleted, 'pack')}, "
        f"of which {r.packs_repacked} {'would be' if r.dry_run else 'were'} repacked "
        f"({plural(r.blobs_repacked, 'chunk')} in use, {human_bytes(r.bytes_repacked)})"
    ]
    if r.orphan_packs or r.missing_packs:
        lines.append(f"  {plural(r.orphan_packs, 'orphan pack')}, {plural(r.missing_packs, 'missing pack')} dropped")
    if r.dry_run:
        lines.append(
            f"  repository {human_bytes(r.bytes_before)} now, about {human_bytes(r.bytes_after)} after "
            "(dry run: nothing was changed)"
        )
    else:
        lines.append(
            f"  repository {human_bytes(r.bytes_before)} -> {human_bytes(r.bytes_after)}, "
            f"{plural(r.packs_before, 'pack')} -> {r.packs_after}"
        )
    if r.packs_retained or r.index_files_retained:
        lines.append(
            f"  retained (under the repository's retention period, kept): {plural(r.packs_retained, 'pack')}, "
            f"{plural(r.index_files_retained, 'index file')}"
        )
    return "\n".join(lines)


def _prune(args: argparse.Namespace, repo: Repository, out: Output) -> PruneReport:
    """Prune with a bar per phase (index, snapshots, packs, repack, index files, delete)."""
    with PhaseBars(out.progress()) as bars:
        return prune(repo, dry_run=args.dry_run, max_unused=args.max_unused, progress=bars)


def _then_prune(args: argparse.Namespace, repo: Repository, out: Output, doc: dict[str, Any], text: str) -> str:
    """``forget --prune``: prune after forgetting, its report added to ``doc`` and ``text``."""
    if not args.prune:
        return text
    pr = _prune(args, repo, out)
    doc["prune"] = pr.to_dict()
    return text + "\n" + render_prune(pr)


def _forget_ids(args: argparse.Namespace, out: Output) -> int:
    """``forget ID...``: the named snapshots, readable or not (the way out for a damaged manifest)."""
    repo = open_repository(args)
    removed = forget_ids(repo, args.ids, dry_run=args.dry_run)
    doc: dict[str, Any] = {"forget": {"dry_run": args.dry_run, "removed": removed}}
    verb = "would remove" if args.dry_run else "removed"
    text = "\n".join(terminal_safe(f"{verb} snapshot {sid}") for sid in removed)
    out.result(doc, _then_prune(args, repo, out, doc, text))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    report = _prune(args, repo, out)
    out.result(report.to_dict(), render_prune(report))
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    """``vmvault unlock``: stale locks (a process that died, a lock not refreshed for 30 minutes,
    unreadable lock objects); ``--remove-all``: every lock."""
    out = Output(args)
    repo = open_repository(args)
    if args.remove_all:
        require_full_access(repo, "unlock --remove-all")
    removed, kept = remove_locks(repo.backend, repo.key, every=args.remove_all)
    lines = [terminal_safe(f"removed {lock.name}: {lock.describe()}") for lock in removed]
    lines += [terminal_safe(f"kept {lock.name}: {lock.describe()}; live") for lock in kept]
    summary = f"removed {plural(len(removed), 'lock')}"
    if kept:
        summary += (
            f"; {plural(len(kept), 'live lock')} kept (`--remove-all` removes them too, if no vmvault process runs)"
        )
    lines.append(summary)
    out.result(
        {"removed": [lock.to_dict() for lock in removed], "kept": [lock.to_dict() for lock in kept]},
        "\n".join(lines),
    )
    return EXIT["ok"]


def cmd_migrate(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    before = repo.config.version
    changed = repo.migrate()
    doc = {"migrate": {"from_version": before, "version": repo.config.version, "changed": changed}}
    if changed:
        text = (
            f"migrated {repo.backend.url} from format version {before} to {repo.config.version}: new index files "
            "record pack lengths; vmvault versions before this one no longer open it"
        )
    else:
        text = f"{repo.backend.url} is at format version {repo.config.version} already; nothing to do"
    out.result(doc, terminal_safe(text))
    return 0


def _render_repair_index(r: RepairReport) -> str:
    verb = "would" if r.dry_run else "did"
    lines = [
        f"read {r.index_files_before} index files ({len(r.index_files_damaged)} damaged); packs: {r.packs_kept} kept, "
        f"{r.packs_recovered} indexed from their headers, {len(r.packs_dropped)} missing (dropped from the index), "
        f"{len(r.packs_salvaged)} damaged (salvaged: {r.blobs_salvaged} blobs copied into {r.packs_written} new "
        f"packs, {r.blobs_lost} lost), {len(r.packs_unreadable)} unreadable"
    ]
    for name in r.index_files_damaged:
        lines.append(f"  damaged index file {name}: superseded")
    for p in r.packs_dropped:
        lines.append(f"  missing pack {p}: its entries are dropped")
    for p in r.packs_salvaged:
        lines.append(f"  damaged pack {p}: left out of the index (the next prune deletes it)")
    for p in r.packs_unreadable:
        lines.append(f"  pack {p}: no readable header, not indexed (the next prune deletes it)")
    if r.dry_run:
        lines.append("dry run: nothing was changed")
    else:
        lines.append(
            f"wrote {r.index_files_written} index file, removed {r.index_files_removed} superseded ones "
            f"({verb} not delete any pack)"
        )
    if r.data_lost:
        lines.append(
            "data is lost: back up the sources again (a backup stores what it still has), and run "
            "`vmvault repair snapshots` to cut the rest out of the snapshots that need it"
        )
    return "\n".join(terminal_safe(line) for line in lines)


def cmd_repair_index(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    with PhaseBars(out.progress()) as bars:
        report = repair_index(
            repo, dry_run=args.dry_run, from_scratch=args.read_all_packs, read_data=args.read_data, progress=bars
        )
    out.result(report.to_dict(), _render_repair_index(report))
    return EXIT["problems"] if report.data_lost else EXIT["ok"]


@contextlib.contextmanager
def _object_lock_repair(args: argparse.Namespace, operation: str, nothing: str) -> Iterator[Repository]:
    """The repository of ``repair locks`` or ``repair undelete``, under a shared lock (both only
    add protection back), its index loaded; a ConfigError saying ``nothing`` on storage that
    locks nothing."""
    repo = open_repository(args)
    if not repo.backend.enforces_immutability:
        raise ConfigError(
            f"{repo.backend.url}: this storage locks no object (only S3 with Object Lock and immutable-days "
            f"does): {nothing}"
        )
    with repo.lock(exclusive=False, operation=operation):
        repo.load_index()
        yield repo


def cmd_repair_locks(args: argparse.Namespace) -> int:
    out = Output(args)
    nothing = "there is nothing to repair; retention here is kept by vmvault declining deletes"
    with _object_lock_repair(args, "repair locks", nothing) as repo:
        with PhaseBars(out.progress()) as bars:
            review = unlocked_objects(repo, progress=lambda done, total: bars("looking up", done, total))
        found = review.unlocked
        locked = 0 if args.dry_run else lock_objects(repo, found)
    doc = {
        "looked_up": review.looked_up,
        "known_locked": review.known,
        "unlocked": [{"name": o.name, "written": o.written, "due": o.due, "until": o.until} for o in found],
        "locked": locked,
    }
    said = [(o.name, o.describe()) for o in found]
    of = f"of {review.looked_up} looked up" + (f" ({review.known} known locked here)" if review.known else "")
    if args.dry_run:
        return _repaired(out, doc, said, f"{plural(len(found), 'object')} to lock, {of}", True)
    return _repaired(out, doc, said, f"{plural(locked, 'object')} locked, {of}", False)


def _repaired(out: Output, doc: dict[str, Any], said: list[tuple[str, str]], summary: str, dry_run: bool) -> int:
    """The result of ``repair locks`` or ``repair undelete``: one line per object, a summary."""
    lines = [terminal_safe(f"{name}: {text}") for name, text in said]
    lines.append(summary + ("; dry run: nothing was changed" if dry_run else ""))
    out.result({**doc, "dry_run": dry_run}, "\n".join(lines))
    return EXIT["ok"]


def cmd_repair_undelete(args: argparse.Namespace) -> int:
    out = Output(args)
    with _object_lock_repair(args, "repair undelete", "nothing deleted is kept for vmvault to bring back") as repo:
        found = deleted_objects(repo)
        done = 0 if args.dry_run else undelete_objects(repo, found)
    doc = {
        "deleted": [
            {"name": d.hidden.name, "version": d.hidden.version, "written": d.hidden.written, "until": d.until}
            for d in found
        ],
        "brought_back": done,
    }
    said = [(d.hidden.name, d.describe()) for d in found]
    if args.dry_run:
        return _repaired(out, doc, said, f"{plural(len(found), 'object')} to bring back", True)
    summary = f"{plural(done, 'object')} brought back" + ("; `vmvault check` next" if done else "")
    return _repaired(out, doc, said, summary, False)


def _render_repair_snapshots(r: SnapshotRepairReport) -> str:
    lines = []
    for item in r.repaired:
        lines.append(f"snapshot {item.snapshot[:8]} ({times.local(item.time)}, {item.source.get('location', '')}):")
        for lost in item.lost:
            ranges = ", ".join(f"{s:#x}-{e:#x}" for s, e in lost["ranges"][:4])
            more = f" (+{len(lost['ranges']) - 4} more ranges)" if len(lost["ranges"]) > 4 else ""
            if lost["kind"] == "disk":
                lines.append(
                    f"  disk {lost['name']}: {human_bytes(lost['bytes'])} lost, reads as zeros: {ranges}{more}"
                )
            else:
                lines.append(f"  file {lost['name']}: {human_bytes(lost['bytes'])}, lost and left out")
        if item.action == "nothing left":
            lines.append("  nothing readable is left" + ("; removed" if item.forgotten else "; not rewritten"))
            continue
        what = {"would repair": "would be rewritten", "repaired": "rewritten", "already repaired": "already rewritten"}
        new = f" as {item.new_snapshot[:8]}" if item.new_snapshot else ""
        lines.append(
            f"  {what.get(item.action, item.action)}{new} (tagged repaired); original "
            + ("removed" if item.forgotten else "kept (--forget removes it)")
        )
    for sid, err in r.unreadable:
        lines.append(
            f"snapshot {sid[:8]}: the manifest cannot be read ({err}); remove it with `vmvault forget {sid[:12]}`"
        )
    lines.append(
        f"{r.checked} snapshots checked: {r.intact} intact, {len(r.repaired)} needing data that is gone, "
        f"{len(r.unreadable)} unreadable" + ("; dry run: nothing was changed" if r.dry_run else "")
    )
    # names, locations and errors quote the storage: every line is escaped whole
    return "\n".join(terminal_safe(line) for line in lines)


def cmd_repair_snapshots(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    with PhaseBars(out.progress()) as bars:
        report = repair_snapshots(repo, args.ids, forget=args.forget, dry_run=args.dry_run, progress=bars)
    out.result(report.to_dict(), _render_repair_snapshots(report))
    return EXIT["problems"] if report.damaged_remaining else EXIT["ok"]


_KEEP = whole_number(-1, 10**9, what="a number of snapshots (or -1 for all)")


_UNUSED = percentage(zero=True)
_SNAPSHOT_ID = hex_prefix("snapshot id")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], help="check the repository (and with --read-data, every byte)")
    p.add_argument("--read-data", action="store_true", help="download, decrypt and re-hash every chunk")
    p.add_argument(
        "--subset",
        type=percentage(zero=False),
        metavar="N%",
        help="read only this share of the packs (implies --read-data)",
    )
    p.add_argument(
        "--seed",
        type=whole_number(0, 2**64 - 1, what="a seed"),
        default=0,
        help="which subset (vary it to cover everything over time)",
    )
    add_filter_args(p, scope="With --read-data, read only the data of the snapshots matching every option given.")
    p.set_defaults(func=cmd_check)

    def retention_args(q: argparse.ArgumentParser) -> None:
        g = q.add_argument_group("retention rules")
        for unit in _UNITS:
            g.add_argument(
                f"--keep-{unit}",
                type=_KEEP,
                default=None,
                metavar="N",
                help="keep the last N snapshots (-1: all)"
                if unit == "last"
                else f"keep the newest snapshot of each of the last N {_PERIOD[unit]}s (-1: all)",
            )
        g.add_argument(
            "--keep-within",
            type=positive_duration,
            metavar="DURATION",
            help="keep every snapshot taken less than DURATION before the newest of its group (e.g. 7d, 36h)",
        )
        for unit in _WITHIN[1:]:
            period = unit.removeprefix("within_")
            g.add_argument(
                f"--keep-{unit.replace('_', '-')}",
                type=positive_duration,
                metavar="DURATION",
                help=f"keep the newest snapshot of each {_PERIOD[period]} within DURATION of the newest",
            )
        g.add_argument(
            "--keep-tag",
            action="append",
            type=_tag_set,
            metavar="TAG[,TAG]",
            help="keep snapshots with these tags (comma = all of them)",
        )
        g.add_argument(
            "--group-by",
            type=_group_by,
            default=("vm", "location"),
            metavar="KEYS",
            help=f"group snapshots by any of {','.join(GROUP_KEYS)} (default vm,location: each VM on its own)",
        )

    p = sub.add_parser("forget", parents=[common], help="remove snapshots by a retention policy, or by id")
    p.add_argument("ids", nargs="*", type=_SNAPSHOT_ID, metavar="ID", help="snapshots to remove (ids or prefixes)")
    retention_args(p)
    add_filter_args(p, scope="The policy judges only the snapshots matching every option given; others are kept.")
    p.add_argument("--prune", action="store_true", help="then remove data no snapshot needs")
    p.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    p.add_argument("--max-unused", type=_UNUSED, default=0.1, metavar="N%", help="repack packs more than N%% unused")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("prune", parents=[common], help="remove data no snapshot needs")
    p.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    p.add_argument("--max-unused", type=_UNUSED, default=0.1, metavar="N%", help="repack packs more than N%% unused")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("unlock", parents=[common], help="remove stale locks (or, with --remove-all, every lock)")
    p.add_argument(
        "--remove-all",
        action="store_true",
        help="remove live locks too: only when no vmvault process uses the repository (a running backup or prune "
        "would lose its protection)",
    )
    p.set_defaults(func=cmd_unlock)

    p = sub.add_parser(
        "migrate",
        parents=[common],
        help="bring a version-1 repository to format version 2 (index files with pack lengths)",
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "repair",
        parents=[common],
        help="ways out of damage: rebuild the index, cut lost data out; S3 Object Lock: lock, undelete",
    )
    rsub = p.add_subparsers(dest="repair_command", metavar="WHAT", required=True)
    q = rsub.add_parser(
        "index", parents=[common], help="rebuild the index from the packs present (drop missing, salvage damaged)"
    )
    q.add_argument("--read-all-packs", action="store_true", help="read every pack's header, not only unindexed ones")
    q.add_argument("--read-data", action="store_true", help="download every pack and salvage those that are damaged")
    q.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    q.set_defaults(func=cmd_repair_index)
    q = rsub.add_parser("snapshots", parents=[common], help="rewrite snapshots that need lost data, cutting it out")
    q.add_argument("ids", nargs="*", type=_SNAPSHOT_ID, metavar="ID", help="only these snapshots (default: all)")
    q.add_argument("--forget", action="store_true", help="remove each original once its repaired copy is stored")
    q.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    q.set_defaults(func=cmd_repair_snapshots)
    for what, does, shown, func in (
        (
            "locks",
            "give every object S3 Object Lock should still hold the retention it lacks",
            "locked",
            cmd_repair_locks,
        ),
        (
            "undelete",
            "bring back objects a delete hid while S3 Object Lock holds them (remove the delete markers)",
            "brought back",
            cmd_repair_undelete,
        ),
    ):
        q = rsub.add_parser(what, parents=[common], help=does)
        q.add_argument("--dry-run", action="store_true", help=f"show what would be {shown}; change nothing")
        q.set_defaults(func=func)

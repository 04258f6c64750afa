"""Repository maintenance commands: check, forget, prune."""

from __future__ import annotations

import argparse
from typing import Any

from vmvault.errors import ConfigError
from vmvault.repo.check import CheckReport, check
from vmvault.repo.prune import forget, prune
from vmvault.repo.retention import RetentionPolicy

from ._common import EXIT, Output, open_repository, table
from .progress import QuietProgress, TerminalProgress, human_bytes

__all__ = ["register"]


def _percent(text: str) -> float:
    t = text.strip().rstrip("%")
    try:
        value = float(t) / 100
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("the subset must be between 0% (exclusive) and 100%")
    return value


class _CheckBars:
    """Adapts check's ``(label, done, total)`` callbacks to one bar per phase."""

    def __init__(self, bar: TerminalProgress | QuietProgress) -> None:
        self.bar = bar
        self.label: str | None = None
        self.done = 0

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.label != label:
            if self.label is not None:
                self.bar.finish()
            self.bar.start(label, total)
            self.label, self.done = label, 0
        self.bar.advance(done - self.done)
        self.done = done


def _render_check(report: CheckReport) -> str:
    lines = []
    stats = report.stats
    what = "structure and every byte of data" if report.read_data else "structure"
    if report.read_data and report.subset:
        what = f"structure and {report.subset * 100:g}% of the data"
    lines.append(f"checked {what}: {', '.join(f'{k} {v}' for k, v in stats.items())}")
    for p in report.problems:
        lines.append(f"{p.severity}: {p.kind}: {p.object}: {p.message}")
        for a in p.affects:
            ranges = ", ".join(f"{s:#x}-{e:#x}" for s, e in a.ranges[:4])
            more = f" (+{len(a.ranges) - 4} more ranges)" if len(a.ranges) > 4 else ""
            lines.append(
                f"    affects snapshot {a.snapshot[:8]} ({a.time[:19]}, {a.source.get('location', '')}) "
                f"{a.kind} {a.name}{': bytes ' + ranges + more if ranges else ''}"
            )
    if report.ok:
        lines.append("no errors found" + (f" ({len(report.warnings)} warnings)" if report.warnings else ""))
    else:
        lines.append(
            f"{len(report.errors)} errors; damaged snapshots: "
            f"{', '.join(s[:8] for s in report.damaged_snapshots) or '-'}; "
            f"intact snapshots: {len(report.intact_snapshots)}"
        )
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    if args.subset is not None and not args.read_data:
        args.read_data = True
    bars = _CheckBars(out.progress())
    report = check(repo, read_data=args.read_data, subset=args.subset, progress=bars, seed=args.seed)
    bars.bar.finish()
    out.result(report.to_dict(), _render_check(report))
    return EXIT["ok"] if report.ok else EXIT["problems"]


def _policy(args: argparse.Namespace) -> RetentionPolicy:
    return RetentionPolicy(
        last=args.keep_last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
        keep_tags=tuple(args.keep_tag or ()),
        group_by=tuple(args.group_by.split(",")) if args.group_by else ("location",),
    )


def _render_prune(r: Any) -> str:
    d = r.to_dict()
    verb = "would remove" if d["dry_run"] else "removed"
    text = (
        f"prune: {verb} {d['blobs_removed']} unused chunks ({human_bytes(d['bytes_removed'])}) "
        f"from {d['packs_deleted']} packs, repacked {d['packs_repacked']} packs; "
        f"repository {human_bytes(d['bytes_before'])} -> {human_bytes(d['bytes_after'])}"
    )
    if d.get("packs_retained") or d.get("index_files_retained"):
        text += (
            f"\nretained (under the repository's retention period, kept): {d['packs_retained']} packs, "
            f"{d['index_files_retained']} index files"
        )
    return text


def cmd_forget(args: argparse.Namespace) -> int:
    out = Output(args)
    policy = _policy(args)
    if policy.empty():
        raise ConfigError("give at least one --keep-* option (forget never removes everything)")
    repo = open_repository(args)
    report = forget(repo, policy, dry_run=args.dry_run)
    doc: dict[str, Any] = {"forget": report.to_dict()}
    rows = []
    for g in report.result.groups:
        for s in g.keep:
            rows.append([s.short_id, s.time[:19], "keep", "; ".join(g.reasons.get(s.id, []))])
        for s in g.remove:
            if s.id in report.retained:
                rows.append([s.short_id, s.time[:19], "retained", "under the repository's retention period"])
            else:
                rows.append([s.short_id, s.time[:19], "would remove" if args.dry_run else "removed", ""])
    text = table(["ID", "Time", "Action", "Reason"], rows)
    if args.prune:
        pr = prune(repo, dry_run=args.dry_run, max_unused=args.max_unused)
        doc["prune"] = pr.to_dict()
        text += "\n" + _render_prune(pr)
    out.result(doc, text)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    report = prune(repo, dry_run=args.dry_run, max_unused=args.max_unused)
    out.result(report.to_dict(), _render_prune(report))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], help="check the repository (and with --read-data, every byte)")
    p.add_argument("--read-data", action="store_true", help="download, decrypt and re-hash every chunk")
    p.add_argument(
        "--subset", type=_percent, metavar="N%", help="read only this share of the packs (implies --read-data)"
    )
    p.add_argument("--seed", type=int, default=0, help="which subset (vary it to cover everything over time)")
    p.set_defaults(func=cmd_check)

    def retention_args(q: argparse.ArgumentParser) -> None:
        for unit in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            q.add_argument(f"--keep-{unit}", type=int, default=0, metavar="N", help=f"keep the {unit} N snapshots")
        q.add_argument("--keep-tag", action="append", help="keep snapshots with these tags (comma = all of them)")
        q.add_argument(
            "--group-by", default="location", help="group snapshots by location,host,tags (default location)"
        )

    p = sub.add_parser("forget", parents=[common], help="remove snapshots by a retention policy")
    retention_args(p)
    p.add_argument("--prune", action="store_true", help="then remove data no snapshot needs")
    p.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    p.add_argument("--max-unused", type=_percent, default=0.1, metavar="N%", help="repack packs more than N%% unused")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("prune", parents=[common], help="remove data no snapshot needs")
    p.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    p.add_argument("--max-unused", type=_percent, default=0.1, metavar="N%", help="repack packs more than N%% unused")
    p.set_defaults(func=cmd_prune)

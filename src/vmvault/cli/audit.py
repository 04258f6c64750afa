"""``vmvault audit``: the command line of ``vmvault.hypervisors.audit`` (which finds
checkpoints standing in for backups, orphaned disks, leftover recovery checkpoints and, with a
repository, VMs without a recent snapshot). Exit 3 when anything is found, 0 otherwise.

Targets: whatever a connector with an ``audit`` entry in the registry accepts.
"""

from __future__ import annotations

import argparse
import os
import time

from vmvault.automation.config import parse_duration
from vmvault.hypervisors.audit import add_backup_ages, audit, format_age
from vmvault.hypervisors.registry import describe

from ._common import EXIT, Output, open_repository, table, terminal_safe
from .progress import human_bytes

__all__ = ["parse_age", "register"]


#: the longest --max-age that means anything (a century)
_MAX_AGE = 100 * 366 * 86400.0


def parse_age(text: str) -> float:
    """``--max-age``: a duration by the one rule (``parse_duration``: ``26h``, ``3d``,
    ``1d12h``; a unit is required), at most a century."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an age: {exc}") from None
    if seconds > _MAX_AGE:
        raise argparse.ArgumentTypeError(f"an age of at most 100 years is needed, not {text!r}")
    return seconds


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_age(seconds)


def cmd_audit(args: argparse.Namespace) -> int:
    out = Output(args)
    now = time.time()
    reports = audit(args.target, now)
    with_repo = bool(getattr(args, "repo", None) or os.environ.get("VMVAULT_REPO"))
    if with_repo:
        add_backup_ages(reports, open_repository(args).list_snapshots(summaries=True), args.max_age, now)
    problems = sum(len(r.problems) for r in reports)
    rows = [
        [
            r.name,
            r.checkpoints.count,
            _age(r.checkpoints.oldest_age_seconds),
            r.checkpoints.chain_depth,
            human_bytes(r.checkpoints.differencing_bytes),
            _age(r.last_backup_age_seconds) if r.backup_checked else "-",
            len(r.problems),
        ]
        for r in reports
    ]
    lines = [table(["VM", "CHECKPOINTS", "OLDEST", "DEPTH", "AVHDX BYTES", "LAST BACKUP", "PROBLEMS"], rows)]
    for r in reports:
        for p in r.problems:
            # VM and disk names come from the VM folders or the host: escaped whole
            lines.append(f"  {terminal_safe(r.name)}: {terminal_safe(p)}")
    if not reports:
        lines = ["no VMs found"]
    vms = sum(1 for r in reports if not r.host)
    lines.append(f"{_count(vms, 'VM')}, {_count(problems, 'problem')}")
    if reports and not with_repo:
        lines.append("give -r REPOSITORY (or set VMVAULT_REPO) to see last-backup ages")
    out.result({"vms": [r.to_dict() for r in reports], "problems": problems}, "\n".join(lines))
    return EXIT["problems"] if problems else EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "audit",
        parents=[common],
        help="list checkpoints, orphaned disks, leftover recovery checkpoints and VMs without a recent backup",
        description="Audit the VMs of TARGET, one of:\n"
        + describe(audit=True)
        + "\n\nA FOLDER is a VM folder, a Hyper-V host folder (every VM's configuration in one shared "
        "'Virtual Machines' folder, disks in a shared 'Virtual Hard Disks'; docs/hyperv.md) or a folder of "
        "them; HOSTFOLDER#VM audits one VM of a host folder (by name or ID). Without -r, last-backup ages "
        "are not checked.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="what to audit (see above)")
    p.add_argument(
        "--max-age", type=parse_age, default=parse_age("26h"), help="a VM's newest snapshot must be younger (26h)"
    )
    p.set_defaults(func=cmd_audit)

"""Automation commands: copy, daemon, run, jobs, history."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

from vmvault.automation.config import AutomationConfig, load_config
from vmvault.automation.history import History
from vmvault.automation.notify import Notifier, send_all
from vmvault.automation.scheduler import Scheduler, SystemClock, run_and_record, run_summary
from vmvault.automation.status import job_statuses
from vmvault.backends import open_backend
from vmvault.engine.copy import CopyFilter, copy_snapshots
from vmvault.errors import ConfigError, VmvaultError
from vmvault.repo.repository import Repository

from ._common import EXIT, Output, open_repository, table
from .progress import human_bytes

__all__ = ["register"]


# ---- copy ---------------------------------------------------------------------------------


def _from_secret(args: argparse.Namespace) -> bytes:
    """The source repository's secret: --from-key-file, --from-password-file,
    VMVAULT_FROM_PASSWORD_FILE, VMVAULT_FROM_PASSWORD."""
    for path, what, strip in (
        (args.from_key_file or os.environ.get("VMVAULT_FROM_KEY_FILE"), "key file", True),
        (args.from_password_file or os.environ.get("VMVAULT_FROM_PASSWORD_FILE"), "password file", False),
    ):
        if path:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read the source repository's {what} {path}: {exc.strerror}") from exc
            secret = raw.strip() if strip else raw.rstrip(b"\r\n")
            if not secret:
                raise ConfigError(f"{what} {path} is empty")
            return secret
    env = os.environ.get("VMVAULT_FROM_PASSWORD")
    if env:
        return env.encode()
    raise ConfigError(
        "the source repository needs its own passphrase: use --from-password-file / --from-key-file "
        "or set VMVAULT_FROM_PASSWORD(_FILE)"
    )


def cmd_copy(args: argparse.Namespace) -> int:
    out = Output(args)
    if args.to:
        args.repo = args.to
    src_backend = open_backend(args.from_repo)
    src = Repository.open(src_backend, lambda: _from_secret(args))
    dst = open_repository(args)
    filters = CopyFilter(
        snapshots=tuple(args.snapshot or ()),
        sources=tuple(args.source or ()),
        tags=tuple(args.tag or ()),
        latest=args.latest,
    )
    bar = out.progress()
    state = {"label": ""}

    def progress(label: str, done: int, total: int) -> None:
        if state["label"] != label:
            bar.start(f"{label} snapshots", total)
            state["label"] = label
        bar.advance(done - bar_done[0])
        bar_done[0] = done

    bar_done = [0]
    try:
        report = copy_snapshots(src, dst, filters=filters, progress=progress)
    finally:
        bar.finish()
        src.close()
        dst.close()
    lines = [
        f"copied {len(report.copied)} snapshots, {len(report.skipped)} already in the target",
        *(f"  {c.source_id[:8]} -> {c.target_id[:8]}  {c.time[:19]}  {c.location}" for c in report.copied),
        f"read {report.chunks_read} chunks ({human_bytes(report.bytes_read)}) from the source; "
        f"uploaded {report.chunks_added} new chunks ({human_bytes(report.bytes_added)} stored) "
        f"in {report.seconds:.1f} s",
    ]
    out.result(report.to_dict(), "\n".join(lines))
    return EXIT["ok"]


# ---- daemon / run -------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    root = logging.getLogger("vmvault")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _config(args: argparse.Namespace) -> AutomationConfig:
    path = args.config or os.environ.get("VMVAULT_CONFIG")
    if not path:
        raise ConfigError("no configuration given: use --config vmvault.toml or set VMVAULT_CONFIG")
    return load_config(path)


def cmd_daemon(args: argparse.Namespace) -> int:
    config = _config(args)
    _setup_logging(args.verbose)
    log = logging.getLogger("vmvault.automation")
    scheduler = Scheduler(config)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: finishing the running jobs, then stopping", signal.Signals(signum).name)
        scheduler.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGBREAK"):  # Windows service stop / Ctrl-Break
        signal.signal(signal.SIGBREAK, on_signal)
    log.info("vmvault daemon: %d jobs from %s, history %s", len(config.jobs), config.path, config.daemon.history)
    scheduler.run()
    return EXIT["ok"]


def cmd_run(args: argparse.Namespace) -> int:
    from vmvault.cli import _exit_code

    out = Output(args)
    config = _config(args)
    job = config.job(args.job)
    if not args.json:
        _setup_logging(args.verbose)
    history = History(config.daemon.history)
    clock = SystemClock()
    attempt = 1
    while True:
        outcome, start, end = run_and_record(config, job, history, clock, attempt=attempt)
        if outcome.ok or attempt > job.retries or args.no_retry:
            break
        delay = job.retry_delay * 2 ** (attempt - 1)
        logging.getLogger("vmvault.automation").info("job %s: retrying in %.0f s", job.name, delay)
        time.sleep(delay)
        attempt += 1
    summary = run_summary(job, attempt, start, end, outcome)
    from vmvault.automation.status import job_alert

    alert = job_alert(config, job, history, end)
    if alert is not None:
        summary.alerts.append(alert.to_dict())
    failures = send_all([Notifier(n) for n in config.notifiers.values()], summary)
    doc = summary.to_dict()
    doc["notification_failures"] = failures
    text = f"{job.name}: {outcome.status}: {outcome.error or outcome.message}"
    out.result(doc, text)
    if outcome.ok:
        return EXIT["ok"]
    if isinstance(outcome.exception, VmvaultError):
        return _exit_code(outcome.exception)
    return EXIT["error"]


# ---- jobs / history -----------------------------------------------------------------------


def _when(t: dt.datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M") if t else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    out = Output(args)
    config = _config(args)
    history = History(config.daemon.history)
    statuses = job_statuses(config, history, dt.datetime.now(dt.UTC))
    rows: list[list[Any]] = []
    for s in statuses:
        last = s.last
        rows.append(
            [
                s.job.name,
                s.job.type,
                s.job.schedule.text if s.job.schedule else "(manual)",
                _when(s.next_run),
                s.status,
                _when(last.end or last.start) if last else "-",
                ("ALERT: " + s.alert.message) if s.alert else (last.error or "" if last else ""),
            ]
        )
    out.result(
        {"config": config.path, "jobs": [s.to_dict() for s in statuses]},
        table(["Job", "Type", "Schedule", "Next run", "Last status", "Last run", "Note"], rows),
    )
    return EXIT["ok"]


def cmd_history(args: argparse.Namespace) -> int:
    out = Output(args)
    config = _config(args)
    if args.job is not None:
        config.job(args.job)  # a typo is an error, not an empty list
    history = History(config.daemon.history)
    runs = history.runs(job=args.job, limit=args.limit)
    rows = [
        [
            r.id,
            r.job,
            r.attempt,
            _when(r.start),
            f"{r.seconds:.0f}s" if r.seconds is not None else "-",
            r.status,
            (r.snapshot or "")[:8],
            human_bytes(r.bytes) if r.bytes is not None else "",
            r.error or "",
        ]
        for r in runs
    ]
    out.result(
        {"runs": [r.to_dict() for r in runs]},
        table(["Run", "Job", "Try", "Start", "Took", "Status", "Snapshot", "Added", "Error"], rows),
    )
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "copy",
        parents=[common],
        help="copy snapshots from another repository into this one (-r/--to)",
        description="Copy snapshots from --from into --to (or -r/VMVAULT_REPO). The target's passphrase comes "
        "from the usual options; the source's from --from-password-file/--from-key-file or "
        "VMVAULT_FROM_PASSWORD(_FILE). Only chunks the target lacks are uploaded; snapshots "
        "already copied are skipped.",
    )
    p.add_argument("--from", dest="from_repo", required=True, metavar="REPO", help="source repository")
    p.add_argument("--to", metavar="REPO", help="target repository (default: -r/--repo)")
    p.add_argument("--from-password-file", metavar="FILE", help="passphrase of the source repository")
    p.add_argument("--from-key-file", metavar="FILE", help="key file of the source repository")
    p.add_argument("--snapshot", action="append", metavar="ID", help="copy only these snapshots (repeatable)")
    p.add_argument("--source", action="append", metavar="LOCATION", help="only snapshots of this source")
    p.add_argument("--tag", action="append", metavar="TAG", help="only snapshots with this tag (all given)")
    p.add_argument("--latest", type=int, default=0, metavar="N", help="only the N newest snapshots of each source")
    p.set_defaults(func=cmd_copy)

    def config_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", "-c", metavar="FILE", help="the automation configuration (or VMVAULT_CONFIG)")

    p = sub.add_parser("daemon", parents=[common], help="run configured jobs on their schedules (foreground)")
    config_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("run", parents=[common], help="run one configured job now (for cron / Task Scheduler)")
    p.add_argument("job", help="job name")
    config_arg(p)
    p.add_argument("--no-retry", action="store_true", help="do not retry a failed attempt")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("jobs", parents=[common], help="configured jobs: next run, last status, alerts")
    config_arg(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("history", parents=[common], help="past job runs, newest first")
    config_arg(p)
    p.add_argument("--job", help="only this job")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N runs (default 50)")
    p.set_defaults(func=cmd_history)

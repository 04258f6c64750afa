"""Automation commands: copy, daemon, run, jobs, history."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from vmvault import times
from vmvault.automation.config import AutomationConfig, load_config
from vmvault.automation.history import INTERRUPTED, RUNNING, History, Run
from vmvault.automation.notify import Notifier, attempt_record, send_all
from vmvault.automation.publish import StatusPublisher
from vmvault.automation.scheduler import Scheduler, SystemClock, cancelled, conclude_run, run_and_record
from vmvault.automation.status import cancel_job, daemon_state, job_statuses, settle_interrupted
from vmvault.automation.times import duration, local_time, zone_name
from vmvault.backends import open_backend
from vmvault.engine.copy import CopyFilter, copy_snapshots
from vmvault.errors import ConfigError, VmvaultError
from vmvault.repo.repository import Repository
from vmvault.repo.secret import given_secret

from ._args import hex_prefix, positive_duration, whole_number
from ._common import (
    EXIT,
    Output,
    add_filter_args,
    cli_user,
    open_repository,
    output_options,
    plural,
    report_warnings,
    snapshot_filter,
    table,
)
from ._terminal import SafeLogFormatter, StderrHandler, terminal_safe
from .progress import PhaseBars, human_bytes

__all__ = ["register"]


# ---- copy ---------------------------------------------------------------------------------


def _from_secret(args: argparse.Namespace) -> Callable[[], bytes] | bytes:
    """The source repository's secret: --from-key-file, --from-password-file,
    VMVAULT_FROM_KEY_FILE, VMVAULT_FROM_PASSWORD_FILE, VMVAULT_FROM_PASSWORD (bytes: given, so
    the source must be encrypted), or a callable that says none was given."""
    given = given_secret(
        key_file=args.from_key_file or os.environ.get("VMVAULT_FROM_KEY_FILE"),
        password_file=args.from_password_file or os.environ.get("VMVAULT_FROM_PASSWORD_FILE"),
        env="VMVAULT_FROM_PASSWORD",
        label="the source repository's ",
    )
    if given is not None:
        return given.value

    def missing() -> bytes:
        raise ConfigError(
            "the source repository needs its own passphrase: use --from-password-file / --from-key-file "
            "or set VMVAULT_FROM_PASSWORD(_FILE)"
        )

    return missing


def cmd_copy(args: argparse.Namespace) -> int:
    out = Output(args)
    if args.to:
        args.repo = args.to
    src_backend = open_backend(args.from_repo)
    src_backend.warm_up()
    src = Repository.open(src_backend, _from_secret(args))
    report_warnings(src)
    dst = open_repository(args, transfer=True)
    match = snapshot_filter(args)
    filters = CopyFilter(
        snapshots=tuple(args.snapshot or ()),
        latest=args.latest,
        match=None if match.empty() else match,
    )
    try:
        with PhaseBars(out.progress(), suffix=" snapshots") as bars:
            report = copy_snapshots(src, dst, filters=filters, progress=bars)
    finally:
        src.close()
        dst.close()
    lines = [
        f"copied {plural(len(report.copied), 'snapshot')}, {len(report.skipped)} already in the target",
        # locations come from the source repository's snapshots: each line escaped whole
        *(
            terminal_safe(f"  {c.source_id[:8]} -> {c.target_id[:8]}  {times.local(c.time)}  {c.location}")
            for c in report.copied
        ),
        f"read {plural(report.chunks_read, 'chunk')} ({human_bytes(report.bytes_read)}) from the source; "
        f"uploaded {plural(report.chunks_added, 'new chunk')} ({human_bytes(report.bytes_added)} stored) "
        f"in {times.duration(report.seconds)}",
    ]
    out.result(report.to_dict(), "\n".join(lines))
    return EXIT["ok"]


# ---- daemon / run -------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    handler = StderrHandler()
    # job names, errors and locations in log lines are escaped like every other output
    handler.setFormatter(SafeLogFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    root = logging.getLogger("vmvault")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _config(args: argparse.Namespace, *, runs_jobs: str | None = None) -> AutomationConfig:
    """The configuration the command names. ``runs_jobs`` (the command's name): it runs jobs
    from it, so one that others could change is refused, and secrets others could read named."""
    path = args.config or os.environ.get("VMVAULT_CONFIG")
    if not path:
        raise ConfigError("no configuration given: use --config vmvault.toml or set VMVAULT_CONFIG")
    config = load_config(path)
    if runs_jobs is not None:
        from vmvault.automation.service import check_running_config

        for warning in check_running_config(path, config, command=runs_jobs):
            print(f"vmvault: warning: {terminal_safe(warning)}", file=sys.stderr)
    return config


def _stopping(scheduler: Scheduler, log: logging.Logger) -> Callable[[int, FrameType | None], None]:
    """The daemon's SIGTERM/SIGINT handler: the first signal lets the running jobs finish
    (nothing new starts); a second cancels them, as `vmvault cancel` does, so the daemon ends
    within moments with the VMs left as they were, rather than being killed mid-backup."""
    told: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        told.append(name)
        if len(told) == 1:
            log.info("%s received: finishing the running jobs, then stopping (send it again to cancel them)", name)
            scheduler.stop()
        else:
            log.warning("%s received again: cancelling the running jobs, then stopping", name)
            scheduler.stop(cancel_running=f"the daemon was told to stop twice ({', '.join(told[:2])})")

    return on_signal


def cmd_daemon(args: argparse.Namespace) -> int:
    config = _config(args, runs_jobs="daemon")
    _setup_logging(args.verbose)
    log = logging.getLogger("vmvault.automation")
    history = History(config.daemon.history)
    # this host's status record goes into each repository: dashboards elsewhere see it
    publisher = StatusPublisher(config, history, started=dt.datetime.now(dt.UTC))
    board = None
    if config.web is not None:
        from vmvault.web import require_web
        from vmvault.web.jobs import ProgressBoard

        require_web()  # before anything starts: a missing package is a one-line error
        board = ProgressBoard()
    scheduler = Scheduler(
        config, history=history, publisher=publisher, progress=board.progress_for if board is not None else None
    )
    scheduler.lock()  # one daemon per configuration: a second one stops here (exit 11)
    web = None
    if board is not None:
        from .web import serve_in_daemon

        web = serve_in_daemon(config, scheduler, board, history)

    on_signal = _stopping(scheduler, log)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGBREAK"):  # Windows service stop / Ctrl-Break
        signal.signal(signal.SIGBREAK, on_signal)
    log.info("vmvault daemon: %d jobs from %s, history %s", len(config.jobs), config.path, config.daemon.history)
    try:
        scheduler.run()
    finally:
        if web is not None:
            background, stop = web
            stop.set()
            background.stop()
        publisher.close()
    return EXIT["ok"]


def cmd_run(args: argparse.Namespace) -> int:
    from vmvault.cli import _exit_code

    out = Output(args)
    config = _config(args, runs_jobs="run")
    job = config.job(args.job)
    if not args.json:
        _setup_logging(args.verbose)
    history = History(config.daemon.history)
    clock = SystemClock()
    attempt = 1
    tries: list[dict[str, Any]] = []
    while True:
        outcome, start, end = run_and_record(config, job, history, clock, attempt=attempt)
        tries.append(attempt_record(attempt, start, end, outcome.status, outcome.error))
        if outcome.ok or attempt > job.retries or args.no_retry or cancelled(outcome):
            break
        delay = job.retry_delay * 2 ** (attempt - 1)
        logging.getLogger("vmvault.automation").info("job %s: retrying in %s", job.name, duration(delay))
        time.sleep(delay)
        attempt += 1
    summary = conclude_run(config, job, history, tries, outcome)
    failures = send_all([Notifier(n) for n in config.notifiers.values()], summary)
    publisher = StatusPublisher(config, history)
    publisher.publish(job.repositories)  # dashboards see this run, also without a daemon
    publisher.close()
    doc = summary.to_dict()
    doc["notification_failures"] = failures
    text = f"{job.name}: {outcome.status}: {outcome.error or summary.message}"
    if summary.recovered is not None and summary.recovered["failed_attempts"]:
        n = summary.recovered["failed_attempts"]
        text += f" (recovered after {n} failed attempt{'s' if n != 1 else ''})"
    out.result(doc, terminal_safe(text))
    if outcome.ok:
        return EXIT["ok"]
    if isinstance(outcome.exception, VmvaultError):
        return _exit_code(outcome.exception)
    return EXIT["error"]


def cmd_cancel(args: argparse.Namespace) -> int:
    out = Output(args)
    config = _config(args)
    job = config.job(args.job)
    history = History(config.daemon.history)
    asked = cancel_job(
        history, job.name, dt.datetime.now(dt.UTC), cli_user(), reason=args.reason or "",
        command="vmvault cancel",
    )  # fmt: skip
    doc: dict[str, Any] = {"job": job.name, "running": bool(asked), "runs": []}
    if not asked:
        out.result(doc, f"{job.name}: not running; an attempt the daemon has queued (a retry waiting) will not start")
        return EXIT["ok"]
    if args.no_wait:
        doc["runs"] = [r.to_dict() for r in asked]
        out.result(doc, f"{job.name}: asked to stop (run {', '.join(str(r.id) for r in asked)})")
        return EXIT["ok"]
    # the process running it looks every PROGRESS_SECONDS, then stops at its next progress report
    deadline = time.monotonic() + args.timeout
    ids = [r.id for r in asked]
    while True:
        runs = [r for r in (history.run(i) for i in ids) if r is not None]
        if all(r.status != RUNNING for r in runs) or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    doc["runs"] = [r.to_dict() for r in runs]
    still = [r for r in runs if r.status == RUNNING]
    if still:
        # (Output.result makes the text terminal-safe: a disk's name comes from the VM folder)
        out.result(
            doc,
            f"{job.name}: asked to stop, still running after {duration(args.timeout)} "
            f"({still[0].progress.describe() if still[0].progress else 'no progress reported yet'}): it stops "
            "at its next progress report, once a call waiting on the storage or the hypervisor has ended "
            "(`vmvault jobs` shows when)",
        )
        return EXIT["error"]
    lines = [f"{job.name}: run {r.id} {r.status}: {r.error or 'finished before it could stop'}" for r in runs]
    out.result(doc, "\n".join(lines))
    return EXIT["ok"]


# ---- jobs / history -----------------------------------------------------------------------


def _took(run: Run, now: dt.datetime, history: History) -> str:
    """How long a run took, as a person reads it: exact, and honest about runs still going
    (``running 5m 3s, web01.raw 45%``, ``…, stopping: cancelled by cli:ada``) and runs whose
    process died (seen running for at least that long)."""
    if run.status == RUNNING:
        where = run.progress  # (as of its last heartbeat)
        asked = history.cancel_request(run.id)
        return (
            f"running {duration((now - run.start).total_seconds())}"
            + (f", {where.describe()}" if where else "")
            + (f", stopping: cancelled by {asked.user}" if asked else "")
        )
    if run.seconds is None:
        return "-"
    if run.status == INTERRUPTED:
        return f"at least {duration(run.seconds)}"
    return duration(run.seconds)


def cmd_jobs(args: argparse.Namespace) -> int:
    out = Output(args)
    config = _config(args)
    history = History(config.daemon.history)
    now = dt.datetime.now(dt.UTC)
    # a run still "running" whose process is gone (kill -9) is shown as what it is
    settle_interrupted(history, now, command="vmvault jobs")
    daemon = daemon_state(history)
    tz = config.daemon.tz()
    statuses = job_statuses(config, history, now)
    rows: list[list[Any]] = []
    for s in statuses:
        last = s.last
        note = ""
        if s.alert:
            note = "ALERT: " + s.alert.message
        elif last is not None and last.error:
            note = last.error
        rows.append(
            [
                s.job.name,
                s.job.type,
                s.job.schedule.text if s.job.schedule else "(manual)",
                local_time(s.next_run, tz, seconds=False) if s.next_run else "-",
                s.status,
                local_time(last.start, tz, seconds=False) if last else "-",
                _took(last, now, history) if last else "-",
                note,
            ]
        )
    text = "\n".join(
        [
            f"daemon: {daemon.describe(tz)}",
            f"schedules and times: {zone_name(tz)}",
            "",
            table(["Job", "Type", "Schedule", "Next run", "Last status", "Last run", "Took", "Note"], rows),
        ]
    )
    out.result(
        {
            "config": config.path,
            "timezone": config.daemon.timezone,
            "daemon": daemon.to_dict(),
            "jobs": [s.to_dict() for s in statuses],
        },
        text,
    )
    return EXIT["ok"]


def cmd_history(args: argparse.Namespace) -> int:
    out = Output(args)
    config = _config(args)
    if args.job is not None:
        config.job(args.job)  # a typo is an error, not an empty list
    history = History(config.daemon.history)
    now = dt.datetime.now(dt.UTC)
    settle_interrupted(history, now, command="vmvault history")
    tz = config.daemon.tz()
    runs = history.runs(job=args.job, limit=args.limit)
    rows = [
        [
            r.id,
            r.job,
            r.attempt,
            local_time(r.start, tz),
            _took(r, now, history),
            r.status,
            (r.snapshot or "")[:8],
            human_bytes(r.bytes) if r.bytes is not None else "",
            r.error or "",
        ]
        for r in runs
    ]
    out.result(
        {"runs": [r.to_dict() for r in runs]},
        f"times: {zone_name(tz)}\n\n"
        + table(["Run", "Job", "Try", "Start", "Took", "Status", "Snapshot", "Added", "Error"], rows),
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
    p.add_argument(
        "--snapshot",
        action="append",
        type=hex_prefix("snapshot id"),
        metavar="ID",
        help="copy only these snapshots (id or a prefix of 4+ digits; repeatable)",
    )
    add_filter_args(p, scope="Copy only the snapshots matching every option given.")
    p.add_argument(
        "--latest",
        type=whole_number(0, 10**9, what="a number of snapshots"),
        default=0,
        metavar="N",
        help="only the N newest snapshots of each source (0: all)",
    )
    p.set_defaults(func=cmd_copy)

    def config_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", "-c", metavar="FILE", help="the automation configuration (or VMVAULT_CONFIG)")

    p = sub.add_parser(
        "daemon", parents=[output_options(common)], help="run configured jobs on their schedules (foreground)"
    )
    config_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser(
        "run", parents=[output_options(common)], help="run one configured job now (for cron / Task Scheduler)"
    )
    p.add_argument("job", help="job name")
    config_arg(p)
    p.add_argument("--no-retry", action="store_true", help="do not retry a failed attempt")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "cancel",
        parents=[output_options(common)],
        help="stop a running job (in the daemon or a `vmvault run`) and its queued retries",
        description="Ask the running attempt of JOB to stop, whichever process runs it, and wait until it has. "
        "It stops at its next progress report (a backup between two batches of chunks, a check between two "
        "objects) and ends failed, saying who cancelled it; it is not retried. What it had begun is undone "
        "as after any failure: the VM is left as it was, no snapshot is saved, chunks already stored are "
        "reused by the next backup. An attempt of JOB the daemon has queued (a retry waiting, a firing "
        "waiting for its window) does not start; later firings run as scheduled.",
    )
    p.add_argument("job", help="job name")
    config_arg(p)
    p.add_argument("--reason", metavar="TEXT", help="why, for the history and the notification")
    p.add_argument("--no-wait", action="store_true", help="ask and return at once")
    p.add_argument(
        "--timeout",
        type=positive_duration,
        default=120.0,
        metavar="DURATION",
        help="how long to wait for the run to stop (default 2m; exit 1 if it has not)",
    )
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("jobs", parents=[output_options(common)], help="configured jobs: next run, last status, alerts")
    config_arg(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("history", parents=[output_options(common)], help="past job runs, newest first")
    config_arg(p)
    p.add_argument("--job", help="only this job")
    p.add_argument(
        "--limit",
        type=whole_number(1, 10**9, what="a number of runs"),
        default=50,
        metavar="N",
        help="at most N runs (default 50)",
    )
    p.set_defaults(func=cmd_history)

"""Honest status: what each job last did, when it runs next, which sources missed their RPO,
whether the daemon is alive, and which "running" runs are really runs whose process died.

* A job's status is the status of its LAST run (a failure is not hidden by an earlier
  success), with the error text of that run.
* A backup job with ``max_age`` (its RPO) raises an alert when its last successful run
  ended longer ago than ``max_age``. A job that has never succeeded raises one only once
  ``max_age`` has passed since it was first due: since its first scheduled run after the
  daemon began scheduling it (``History.watch``), or since its first recorded attempt when
  that came earlier (``vmvault run``), or since the daemon began scheduling it for a job
  without a schedule. A daemon's first start alerts for nothing. The history is the record
  used (the daemon's own view); ``vmvault snapshots`` shows the repository's.
* A row ``running`` whose job lock nobody holds was left by a process that died (``kill -9``,
  a crash, a power cut): :func:`settle_interrupted` marks it ``interrupted``, ending at its
  last heartbeat, and :func:`daemon_state` says whether a daemon is alive.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from vmvault.automation.config import AutomationConfig, BackupJob, Job, VerifyBootJob
from vmvault.automation.history import FAILED, INTERRUPTED, SUCCESS, WARNING, DaemonRun, History, Run
from vmvault.automation.locks import daemon_lock, describe_holder, job_lock
from vmvault.automation.times import duration, iso_time, local_time
from vmvault.errors import LockedError

__all__ = [
    "Alert",
    "DaemonState",
    "JobStatus",
    "Recovery",
    "cancel_job",
    "daemon_state",
    "from_local",
    "job_alert",
    "job_statuses",
    "max_age_alerts",
    "next_run",
    "recovery",
    "rpo_start",
    "settle_interrupted",
    "to_local",
]

log = logging.getLogger("vmvault.automation")


def to_local(when: dt.datetime, tz: dt.tzinfo | None) -> dt.datetime:
    """An aware time as naive wall-clock time in ``tz`` (None: the host's local time)."""
    return (when.astimezone(tz) if tz is not None else when.astimezone()).replace(tzinfo=None)


def from_local(naive: dt.datetime, tz: dt.tzinfo | None) -> dt.datetime:
    """Naive wall-clock time in ``tz`` as an aware UTC time."""
    if tz is not None:
        return naive.replace(tzinfo=tz).astimezone(dt.UTC)
    return naive.astimezone(dt.UTC)  # naive astimezone() reads it as the host's local time


def next_run(job: Job, after: dt.datetime, tz: dt.tzinfo | None) -> dt.datetime | None:
    """When the schedule next fires after ``after`` (aware), moved to the window's opening
    when it fires outside the window. None for a job without a schedule."""
    if job.schedule is None:
        return None
    local = job.schedule.next_after(to_local(after, tz))
    if job.window is not None:
        local = job.window.next_open(local)
    return from_local(local, tz)


# ---- the RPO ----------------------------------------------------------------------------------


@dataclass
class Alert:
    job: str
    source: str
    message: str
    last_success: dt.datetime | None
    #: since when the RPO is counted for a job that never succeeded (None once one has)
    counted_from: dt.datetime | None = None
    max_age: float = 0.0
    #: the age of the last success (or the time since ``counted_from``) when checked
    age: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "source": self.source,
            "message": self.message,
            "last_success": iso_time(self.last_success) if self.last_success else None,
            "counted_from": iso_time(self.counted_from) if self.counted_from else None,
            "max_age": self.max_age,
            "age": round(self.age, 3),
        }


def rpo_start(history: History, job: Job) -> dt.datetime | None:
    """Since when a job that has never succeeded counts against its RPO: the earlier of its
    first scheduled run (after the daemon began scheduling it; that moment for a job without
    a schedule) and its first recorded attempt. None: neither yet (nothing is overdue)."""
    candidates = []
    watch = history.watched(job.name)
    if watch is not None:
        candidates.append(watch.first_due or watch.since)
    first = history.first_start(job.name)
    if first is not None:
        candidates.append(first)
    return min(candidates, default=None)


def job_alert(config: AutomationConfig, job: Job, history: History, now: dt.datetime) -> Alert | None:
    """The job's RPO alert at ``now``, or None when it has none (or no ``max_age``)."""
    if not isinstance(job, BackupJob | VerifyBootJob) or job.max_age is None:
        return None
    # a backup job's RPO, or how long ago a boot verification job last proved its source boots
    what, done = ("backup", "backed up") if isinstance(job, BackupJob) else ("boot verification", "boot-verified")
    tz = config.daemon.tz()
    source = config.source_location(job.source)
    allowed = f"more than the allowed {duration(job.max_age)} (max_age of job {job.name})"
    ok = history.last_success(job.name)
    if ok is None:
        since = rpo_start(history, job)
        if since is None:
            return None
        waited = (now - since).total_seconds()
        if waited <= job.max_age:
            return None
        return Alert(
            job.name,
            source,
            f"{source} has no successful {what} on record: it was first due {local_time(since, tz)}, "
            f"{duration(waited)} ago, {allowed}",
            None,
            counted_from=since,
            max_age=job.max_age,
            age=waited,
        )
    when = ok.end or ok.start
    age = (now - when).total_seconds()
    if age <= job.max_age:
        return None
    return Alert(
        job.name,
        source,
        f"{source} was last {done} successfully {local_time(when, tz)}, {duration(age)} ago, {allowed}",
        when,
        max_age=job.max_age,
        age=age,
    )


def max_age_alerts(config: AutomationConfig, history: History, now: dt.datetime) -> list[Alert]:
    out = []
    for job in config.jobs.values():
        alert = job_alert(config, job, history, now)
        if alert is not None:
            out.append(alert)
    return out


# ---- a failing job that succeeds again ----------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """A run that succeeded after failed or interrupted runs (or while an alert was open)."""

    #: failed or interrupted attempts since the last success before this run
    failed_attempts: int
    #: when the first of them started (None: only an alert was open)
    failing_since: dt.datetime | None
    #: the RPO alert this success clears (its text), if one was open
    alert_cleared: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "failed_attempts": self.failed_attempts,
            "failing_since": iso_time(self.failing_since) if self.failing_since else None,
            "alert_cleared": self.alert_cleared,
        }


#: how far back a recovery looks for the failures it ends
_STREAK_LIMIT = 1000


def recovery(history: History, job: str, run_start: dt.datetime, alert_cleared: str | None) -> Recovery | None:
    """What a successful run that started at ``run_start`` (its first attempt) recovers
    from: the failed and interrupted attempts since the previous success, or an open alert.
    None when the job was not failing."""
    failed = 0
    since = None
    first = run_start.replace(microsecond=run_start.microsecond // 1000 * 1000)  # the history keeps milliseconds
    for run in history.runs(job=job, limit=_STREAK_LIMIT):
        if run.start >= first:
            continue  # this run's own attempts
        if run.status in (SUCCESS, WARNING):
            break
        if run.status in (FAILED, INTERRUPTED):
            failed += 1
            since = run.start
    if not failed and alert_cleared is None:
        return None
    return Recovery(failed, since, alert_cleared)


# ---- runs whose process died, and the daemon ------------------------------------------------------


def settle_interrupted(history: History, now: dt.datetime, *, command: str = "vmvault jobs") -> int:
    """Mark ``interrupted`` every ``running`` row whose process is gone; returns how many.

    A process running an attempt holds the job's lock (``locks.job_lock``) from before it
    writes the row until after it finishes it, and the kernel releases the lock when the
    process dies, however it dies. So a row still ``running`` while nobody holds its job's
    lock belongs to a dead process: the rows are read while holding the lock, the lock is
    let go at once (the daemon waits that moment out), then those rows, and only those, are
    marked, each ending at its last heartbeat."""
    marked = 0
    for name in history.running_jobs():
        lock = job_lock(history.path, name)
        try:
            lock.acquire(command=f"{command} (looking for runs of dead processes)")
        except LockedError:
            continue  # alive: running in the daemon or a `vmvault run`
        try:
            ids = tuple(r.id for r in history.runs(job=name, statuses=("running",)))
            holder = lock.previous_holder
        finally:
            lock.release()
        who = ""
        if holder.get("command"):
            who = f"`{holder['command']}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
        count = history.mark_interrupted(now, ids=ids, holder=who)
        if count:
            runs = "a run" if count == 1 else f"{count} runs"
            log.warning("job %s: %s left running by %s marked interrupted", name, runs, who or "a process now gone")
        marked += count
    return marked


def cancel_job(
    history: History, job: str, now: dt.datetime, user: str, *, reason: str = "", address: str = "", command: str
) -> list[Run]:
    """Ask the running attempt of ``job`` to stop, whichever process runs it, and a daemon not
    to start what it had queued of it (``History.request_cancel``); record who asked in the
    activity log. Returns the running attempts asked (none: the job was not running). A row
    left ``running`` by a dead process is settled first, not asked."""
    settle_interrupted(history, now, command=command)
    runs = history.request_cancel(job, now, user, reason)
    history.record_action(
        now, user, "cancel", job, "requested", address=address,
        details={"runs": [r.id for r in runs], **({"reason": reason} if reason else {})},
    )  # fmt: skip
    return runs


@dataclass(frozen=True)
class DaemonState:
    """Whether a daemon runs on this history now, and what the history knows of the last one."""

    running: bool
    #: the running daemon's lock record (pid, host, since, command), when one runs
    holder: dict[str, Any] | None
    last: DaemonRun | None

    def describe(self, tz: dt.tzinfo | None) -> str:
        if self.running:
            assert self.holder is not None
            since = self.holder.get("since")
            try:
                started = dt.datetime.fromisoformat(since) if isinstance(since, str) else None
            except ValueError:
                started = None
            if started is None or started.tzinfo is None:
                return f"running ({describe_holder(self.holder)})"
            return (
                f"running (pid {self.holder.get('pid', '?')} on {self.holder.get('host', '?')}, "
                f"since {local_time(started, tz)})"
            )
        if self.last is None:
            return "not running (no daemon has run with this history)"
        if self.last.stop is not None:
            return f"not running (stopped {local_time(self.last.stop, tz)})"
        seen = self.last.heartbeat or self.last.start
        return (
            f"not running: the last daemon (pid {self.last.pid} on {self.last.host}, started "
            f"{local_time(self.last.start, tz)}) did not stop cleanly; last sign of life {local_time(seen, tz)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"running": self.running, "holder": self.holder, "last": self.last.to_dict() if self.last else None}


def daemon_state(history: History) -> DaemonState:
    holder = daemon_lock(history.path).holder()
    return DaemonState(holder is not None, holder, history.last_daemon_run())


# ---- jobs -------------------------------------------------------------------------------------


@dataclass
class JobStatus:
    job: Job
    next_run: dt.datetime | None
    last: Run | None
    last_success: Run | None
    alert: Alert | None

    @property
    def status(self) -> str:
        if self.last is None:
            return "never run"
        return self.last.status

    def to_dict(self) -> dict[str, Any]:
        j = self.job
        return {
            "job": j.name,
            "type": j.type,
            "schedule": j.schedule.text if j.schedule else None,
            "window": j.window.text if j.window else None,
            "time_limit": j.time_limit,
            "next_run": self.next_run.isoformat() if self.next_run else None,
            "status": self.status,
            "last_run": self.last.to_dict() if self.last else None,
            "last_success": (self.last_success.end or self.last_success.start).isoformat()
            if self.last_success
            else None,
            "alert": self.alert.to_dict() if self.alert else None,
        }


def job_statuses(config: AutomationConfig, history: History, now: dt.datetime) -> list[JobStatus]:
    tz = config.daemon.tz()
    out = []
    for job in config.jobs.values():
        # the newest attempt, running or finished: a failure is never hidden by an older success
        last = history.last(job.name)
        out.append(
            JobStatus(
                job=job,
                next_run=next_run(job, now, tz),
                last=last,
                last_success=history.last_success(job.name),
                alert=job_alert(config, job, history, now),
            )
        )
    return out

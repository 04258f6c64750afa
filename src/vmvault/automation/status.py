"""Honest status: what each job last did, when it runs next, and which sources are overdue.

* A job's status is the status of its LAST finished run (a failure is not hidden by an
  earlier success), with the error text of that run.
* A backup job with ``max_age`` raises an alert when its last successful run ended longer
  ago than ``max_age``, or when it has never succeeded at all: no backup is the most
  important thing to be told about. The history is the record used (the daemon's own
  view); ``vmvault snapshots`` shows the repository's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from vmvault.automation.config import AutomationConfig, BackupJob, Job
from vmvault.automation.history import History, Run

__all__ = ["Alert", "JobStatus", "from_local", "job_statuses", "max_age_alerts", "next_run", "to_local"]


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


@dataclass
class Alert:
    job: str
    source: str
    message: str
    last_success: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "source": self.source,
            "message": self.message,
            "last_success": self.last_success.isoformat() if self.last_success else None,
        }


def _age(seconds: float) -> str:
    if seconds >= 86400 * 2:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


def job_alert(config: AutomationConfig, job: Job, history: History, now: dt.datetime) -> Alert | None:
    if not isinstance(job, BackupJob) or job.max_age is None:
        return None
    source = config.source_location(job.source)
    ok = history.last_success(job.name)
    if ok is None:
        return Alert(job.name, source, f"{source} has no successful backup on record (job {job.name})", None)
    when = ok.end or ok.start
    age = (now - when).total_seconds()
    if age > job.max_age:
        return Alert(
            job.name,
            source,
            f"{source} was last backed up successfully {_age(age)} ago, more than the allowed "
            f"{_age(job.max_age)} (job {job.name})",
            when,
        )
    return None


def max_age_alerts(config: AutomationConfig, history: History, now: dt.datetime) -> list[Alert]:
    out = []
    for job in config.jobs.values():
        alert = job_alert(config, job, history, now)
        if alert is not None:
            out.append(alert)
    return out


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

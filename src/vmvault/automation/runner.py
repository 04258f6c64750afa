"""Run one job once: backup (then retention), verify, or copy. Returns an honest outcome.

Honesty rules (docs/automation.md, "Honest status"):

* A job that did not do its work is ``failed`` with the cause, never ``success``.
* A backup that failed never triggers retention: forgetting old snapshots after a failed
  backup would leave fewer restore points exactly when they are needed.
* Retention is scoped to the job's source and never keeps fewer than ``min_good`` of its
  snapshots (``keep_last`` is raised to ``min_good``); unreadable snapshots are not
  counted as good and are never deleted by it.
* Secondary failures (retention, prune) and backup warnings make the run ``warning``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

from vmvault.automation.config import AutomationConfig, BackupJob, CopyJob, Job, Retention, VerifyJob
from vmvault.automation.history import FAILED, SUCCESS, WARNING
from vmvault.backends import open_backend
from vmvault.engine.backup import backup
from vmvault.engine.copy import CopyFilter, copy_snapshots
from vmvault.errors import RepositoryError, VmvaultError
from vmvault.hypervisors import open_source
from vmvault.repo.check import check
from vmvault.repo.prune import prune
from vmvault.repo.repository import Repository
from vmvault.repo.retention import apply_policy

__all__ = ["JobOutcome", "apply_retention", "execute_job", "open_configured_repository"]

log = logging.getLogger("vmvault.automation")


@dataclass
class JobOutcome:
    status: str
    snapshot: str | None = None
    bytes: int | None = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    details: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAILED


def open_configured_repository(config: AutomationConfig, name: str) -> Repository:
    rc = config.repositories[name]
    backend = open_backend(rc.location)
    try:
        return Repository.open(backend, rc.secret())
    except BaseException:
        backend.close()
        raise


def apply_retention(repo: Repository, location: str, retention: Retention) -> dict[str, Any]:
    """Forget the snapshots of ``location`` the policy does not keep, never below ``min_good``."""
    policy = retention.policy
    if policy.last != -1 and policy.last < retention.min_good:
        policy = dataclasses.replace(policy, last=retention.min_good)
    with repo.lock(exclusive=True, operation="forget (scheduled)"):
        unreadable: list[str] = []
        snaps = [
            s
            for s in repo.list_snapshots(on_error=lambda sid, exc: unreadable.append(sid))
            if s.source.get("location") == location
        ]
        result = apply_policy(snaps, policy)
        # keep_last >= min_good already guarantees this; checked again because deleting is final
        if len(result.keep) < min(retention.min_good, len(snaps)):
            raise RepositoryError(
                f"retention would keep {len(result.keep)} snapshots of {location}, fewer than min_good "
                f"{retention.min_good}; nothing was forgotten"
            )
        for s in result.remove:
            repo.delete_snapshot(s.id)
    doc: dict[str, Any] = {
        "policy": policy.to_dict(),
        "min_good": retention.min_good,
        "kept": [s.id for s in result.keep],
        "removed": [s.id for s in result.remove],
        "unreadable_not_counted": unreadable,
    }
    if retention.prune and result.remove:
        doc["prune"] = prune(repo).to_dict()
    return doc


def _backup(config: AutomationConfig, job: BackupJob) -> JobOutcome:
    location = config.source_location(job.source)
    repo = open_configured_repository(config, job.repository)
    try:
        source = open_source(location)
        result = backup(repo, source, tags=job.tags)
        snap = result.snapshot
        out = JobOutcome(
            status=WARNING if result.warnings else SUCCESS,
            snapshot=snap.id,
            bytes=result.bytes_new,
            details={"backup": result.to_dict(), "warnings": list(result.warnings)},
            message=f"backup of {source.location} saved as snapshot {snap.short_id}",
        )
        if job.retention is not None:
            try:
                out.details["retention"] = apply_retention(repo, snap.source.get("location", ""), job.retention)
            except VmvaultError as exc:
                # the backup itself is good; say plainly that retention did not happen
                out.status = WARNING
                out.details["retention"] = {"error": str(exc)}
                out.details["warnings"].append(f"retention failed: {exc}")
        return out
    finally:
        repo.close()


def _verify(config: AutomationConfig, job: VerifyJob, seed: int) -> JobOutcome:
    repo = open_configured_repository(config, job.repository)
    try:
        report = check(repo, read_data=job.read_data, subset=job.subset, seed=seed)
    finally:
        repo.close()
    doc = report.to_dict()
    what = "structure" + (
        f" and {report.subset * 100:g}% of the data" if report.subset else " and all data" if report.read_data else ""
    )
    if not report.ok:
        first = report.errors[0]
        return JobOutcome(
            status=FAILED,
            error=f"check found {len(report.errors)} errors (first: {first.kind}: {first.object}: {first.message}); "
            f"damaged snapshots: {', '.join(s[:8] for s in report.damaged_snapshots) or 'none'}",
            details={"check": doc},
            message=f"verify of {job.repository} found damage",
        )
    warnings = [f"{p.kind}: {p.object}: {p.message}" for p in report.warnings]
    return JobOutcome(
        status=WARNING if warnings else SUCCESS,
        details={"check": doc, "warnings": warnings},
        message=f"verified {job.repository} ({what}): no errors",
    )


def _copy(config: AutomationConfig, job: CopyJob) -> JobOutcome:
    src = open_configured_repository(config, job.source_repository)
    try:
        dst = open_configured_repository(config, job.target_repository)
        try:
            filters = CopyFilter(
                sources=tuple(config.source_location(s) for s in job.sources), tags=job.tags, latest=job.latest
            )
            report = copy_snapshots(src, dst, filters=filters)
        finally:
            dst.close()
    finally:
        src.close()
    return JobOutcome(
        status=SUCCESS,
        snapshot=report.copied[-1].target_id if report.copied else None,
        bytes=report.bytes_added,
        details={"copy": report.to_dict()},
        message=f"copied {len(report.copied)} snapshots from {job.source_repository} to {job.target_repository} "
        f"({len(report.skipped)} already there)",
    )


def execute_job(config: AutomationConfig, job: Job, *, seed: int | None = None) -> JobOutcome:
    """Run ``job`` once. Never raises for a job failure: the outcome says what went wrong."""
    try:
        if isinstance(job, BackupJob):
            return _backup(config, job)
        if isinstance(job, VerifyJob):
            return _verify(config, job, seed if seed is not None else dt.date.today().toordinal())
        if isinstance(job, CopyJob):
            return _copy(config, job)
        raise AssertionError(f"unknown job type {job.type}")  # pragma: no cover - refused at load
    except VmvaultError as exc:
        out = JobOutcome(status=FAILED, error=str(exc), exception=exc, message=f"{job.type} job {job.name} failed")
        if isinstance(job, BackupJob) and job.retention is not None:
            out.details["retention"] = {"skipped": "the backup failed; no snapshot was forgotten"}
        return out
    except Exception as exc:  # a bug is reported as a failed run, it must not kill the daemon
        log.error("job %s: unexpected error\n%s", job.name, traceback.format_exc())
        out = JobOutcome(
            status=FAILED,
            error=f"unexpected {type(exc).__name__}: {exc}",
            exception=exc,
            message=f"{job.type} job {job.name} failed",
        )
        if isinstance(job, BackupJob) and job.retention is not None:
            out.details["retention"] = {"skipped": "the backup failed; no snapshot was forgotten"}
        return out

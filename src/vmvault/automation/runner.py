"""Run one job once: backup (then retention), verify, copy, or verify-boot. Returns an honest outcome.

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
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

from vmvault.automation.config import AutomationConfig, BackupJob, CopyJob, Job, Retention, VerifyBootJob, VerifyJob
from vmvault.automation.history import FAILED, SUCCESS, WARNING
from vmvault.backends import open_backend
from vmvault.engine.backup import backup
from vmvault.engine.copy import CopyFilter, copy_snapshots
from vmvault.engine.progress import ProgressReporter
from vmvault.errors import ConfigError, RepositoryError, VmvaultError
from vmvault.hypervisors import BackupOptions, Source, expand_sources, open_source
from vmvault.repo.check import check
from vmvault.repo.progress import PhaseCallback
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
    backend.warm_up()  # every job moves data: its connections open while the key is derived
    try:
        repo = Repository.open(backend, rc.secret())
    except BaseException:
        backend.close()
        raise
    for warning in repo.warnings:  # skipped key objects, snapshots gone or back (repo/hostrecord.py)
        log.warning("repository %s: %s", name, warning)
    return repo


def apply_retention(repo: Repository, location: str, retention: Retention) -> dict[str, Any]:
    """Forget the snapshots of ``location`` the policy does not keep, never below ``min_good``."""
    policy = retention.policy
    if policy.last != -1 and policy.last < retention.min_good:
        policy = dataclasses.replace(policy, last=retention.min_good)
    with repo.lock(exclusive=True, operation="forget (scheduled)"):
        unreadable: list[str] = []
        snaps = [
            s
            for s in repo.list_snapshots(on_error=lambda sid, exc: unreadable.append(sid), summaries=True)
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


def _backup(config: AutomationConfig, job: BackupJob, progress: ProgressReporter | None) -> JobOutcome:
    location = config.source_location(job.source)
    repo = open_configured_repository(config, job.repository)
    try:
        # this job's own options, in one value: nothing process-wide, so jobs running at the
        # same time in one daemon never see each other's
        options = config.source_options(job)
        # a location may stand for several sources (libvirt:///: every domain), one snapshot each
        sources = [open_source(spec, options) for spec in expand_sources(location)]
        if not sources:
            raise ConfigError(f"{location}: no domain to back up")
        outcomes = [_backup_one(repo, source, options, job, progress) for source in sources]
        if len(outcomes) == 1:
            return outcomes[0]
        warnings = [w for o in outcomes for w in o.details["warnings"]]
        return JobOutcome(
            status=WARNING if any(o.status != SUCCESS for o in outcomes) else SUCCESS,
            snapshot=outcomes[-1].snapshot,
            bytes=sum(o.bytes or 0 for o in outcomes),
            details={"backups": [o.details for o in outcomes], "warnings": warnings},
            message=f"backup of {location}: {len(outcomes)} snapshots ("
            + ", ".join(f"{s.location}: {(o.snapshot or '')[:8]}" for s, o in zip(sources, outcomes, strict=True))
            + ")",
        )
    finally:
        repo.close()


def _backup_one(
    repo: Repository, source: Source, options: BackupOptions, job: BackupJob, progress: ProgressReporter | None
) -> JobOutcome:
    result = backup(repo, source, options, tags=job.tags, progress=progress)
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


def _phases(progress: ProgressReporter | None) -> PhaseCallback | None:
    """check's and copy's ``(phase, done, total)`` reports as ``ProgressReporter`` phases."""
    if progress is None:
        return None
    state: dict[str, Any] = {"phase": None, "done": 0}

    def report(phase: str, done: int, total: int) -> None:
        if phase != state["phase"]:
            if state["phase"] is not None:
                progress.finish()
            progress.start(phase, total)
            state["phase"], state["done"] = phase, 0
        if done > state["done"]:
            progress.advance(done - state["done"])
            state["done"] = done
        else:  # the same place said again (a copy's sign of life within a snapshot): a run may stop here
            progress.advance(0)

    return report


def _verify(config: AutomationConfig, job: VerifyJob, seed: int, progress: ProgressReporter | None) -> JobOutcome:
    repo = open_configured_repository(config, job.repository)
    try:
        report = check(repo, read_data=job.read_data, subset=job.subset, seed=seed, progress=_phases(progress))
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


def _copy(config: AutomationConfig, job: CopyJob, progress: ProgressReporter | None) -> JobOutcome:
    src = open_configured_repository(config, job.source_repository)
    try:
        dst = open_configured_repository(config, job.target_repository)
        try:
            filters = CopyFilter(
                sources=tuple(config.source_location(s) for s in job.sources), tags=job.tags, latest=job.latest
            )
            report = copy_snapshots(src, dst, filters=filters, progress=_phases(progress))
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


def _screenshot(job: VerifyBootJob, snapshot: str, data: bytes) -> str:
    """Keep a verification's screenshot in the job's folder (0700, made if missing) under a new
    name: ``<job>-<snapshot>-<UTC time>.png``."""
    from vmvault.engine.verify_boot import write_screenshot

    os.makedirs(job.screenshots, mode=0o700, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job.name)[:100]
    return write_screenshot(data, os.path.join(job.screenshots, f"{safe}-{snapshot[:8]}-{stamp}.png"))


def _verify_boot(config: AutomationConfig, job: VerifyBootJob) -> JobOutcome:
    # imported when used: it loads the QEMU connector
    from vmvault.engine.verify_boot import VerifyBootOptions, verify_boot

    location = config.source_location(job.source)
    repo = open_configured_repository(config, job.repository)
    try:
        snap = repo.find_snapshot("latest", source=location)
        options = VerifyBootOptions(
            timeout=job.timeout, marker=job.marker, heartbeats=job.heartbeats, network=job.network, accel=job.accel
        )
        result = verify_boot(repo, snap, options)
    finally:
        repo.close()
    details: dict[str, Any] = {"verify_boot": result.to_dict(), "screenshot": None}
    if result.screenshot is not None:
        try:
            result.screenshot_path = details["screenshot"] = _screenshot(job, snap.id, result.screenshot)
            details["verify_boot"]["screenshot"] = result.screenshot_path
        except VmvaultError as exc:  # the verdict stands; say that the picture was not kept
            details.setdefault("warnings", []).append(f"the screenshot was not kept: {exc}")
    if not result.passed:
        return JobOutcome(
            status=FAILED,
            snapshot=snap.id,
            error=f"snapshot {snap.short_id} of {location} did not boot ({result.reason}): {result.message}",
            details=details,
            message=f"boot verification of {location} failed: {result.reason}",
        )
    warnings = details.get("warnings", [])
    return JobOutcome(
        status=WARNING if warnings else SUCCESS,
        snapshot=snap.id,
        details={**details, "warnings": warnings},
        message=f"snapshot {snap.short_id} of {location} boots: {result.message} after {result.seconds:.0f} s",
    )


def execute_job(
    config: AutomationConfig, job: Job, *, seed: int | None = None, progress: ProgressReporter | None = None
) -> JobOutcome:
    """Run ``job`` once. Never raises for a job failure: the outcome says what went wrong.
    ``progress`` hears each phase (a disk, check's steps, the copy), for live displays."""
    try:
        if isinstance(job, BackupJob):
            return _backup(config, job, progress)
        if isinstance(job, VerifyJob):
            return _verify(config, job, seed if seed is not None else dt.date.today().toordinal(), progress)
        if isinstance(job, CopyJob):
            return _copy(config, job, progress)
        if isinstance(job, VerifyBootJob):
            return _verify_boot(config, job)
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

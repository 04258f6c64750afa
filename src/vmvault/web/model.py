"""What the dashboard shows, computed from the configuration, the job history and the
repositories (their snapshots and every host's status record). No web framework here: the
pages and the API both render what this module returns, so they cannot disagree.

JSON shapes: where a command prints the same thing with ``--json``, the same function
makes both (``Run.to_dict`` for ``vmvault history``, ``JobStatus.to_dict`` for ``vmvault
jobs``, ``snapshot_summary`` for ``vmvault snapshots``); what only the dashboard shows
(VM states, repository statistics, the task grid, hosts) is shaped here, in one place.

A VM's state, worst reason first (docs/web.md, "Overview"):

* **red**: no successful backup; the newest is older than its ``max_age`` (RPO); the last
  backup run failed; the last verification of its repository found damage.
* **amber**: the last backup run ended with warnings; the newest backup is only
  crash-consistent; its repository was never verified, or not within ``verify_max_age``;
  its host's status record is stale; (with ``require_immutable``) its repository keeps
  nothing immutable; a repository could not be read.
* **green**: none of those.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vmvault.automation.config import AutomationConfig, RepositoryConfig, VerifyJob, WebSettings
from vmvault.automation.history import FAILED, INTERRUPTED, SUCCESS, WARNING, History, Run, Sample
from vmvault.automation.publish import job_record
from vmvault.automation.status import job_statuses
from vmvault.backends import open_backend
from vmvault.errors import IntegrityError, SnapshotNotFoundError, VmvaultError
from vmvault.hypervisors.audit import add_backup_ages
from vmvault.hypervisors.audit import audit as audit_target
from vmvault.repo.repository import Repository
from vmvault.repo.schema import snapshot_summary
from vmvault.repo.snapshot import Snapshot
from vmvault.repo.status import StatusReport, StatusStore
from vmvault.repo.usage import snapshot_logical

__all__ = ["Dashboard", "RepoStats", "RepoView", "parse_since"]

log = logging.getLogger("vmvault.web")

RED, AMBER, GREEN = "red", "amber", "green"
_RANK = {GREEN: 0, AMBER: 1, RED: 2}
#: a remote host whose newest status record is older than this is stale
STALE_HOST = 2 * 3600.0
#: task grid rows, and which run statuses count as what
TASKS = ("backup", "verify", "copy", "prune")
OUTCOMES = ("ok", "warning", "failed")
_OUTCOME = {SUCCESS: "ok", WARNING: "warning", FAILED: "failed", INTERRUPTED: "failed"}
#: backups that leave the guest's applications consistent (or the VM was off)
_CONSISTENT = ("application-consistent", "offline", "filesystem-consistent")


def _iso(when: dt.datetime | None) -> str | None:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds") if when is not None else None


def _parse(text: Any) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def parse_since(text: str | None, now: dt.datetime) -> dt.datetime | None:
    """``24h``, ``7d``, ``30d`` or ``all`` (None) -> the start of that window."""
    if not text or text == "all":
        return None
    units = {"h": 3600, "d": 86400}
    try:
        n, unit = int(text[:-1]), text[-1]
        if unit not in units or not 0 < n <= 3660:
            raise ValueError
    except ValueError:
        raise ValueError(f"since must be like 24h, 7d or all, not {text!r}") from None
    return now - dt.timedelta(seconds=n * units[unit])


def norm_location(location: str) -> str:
    """How a configured source compares with a snapshot's ``source.location``."""
    return location if "://" in location else os.path.normpath(os.path.abspath(location))


# ---- repositories -------------------------------------------------------------------------


@dataclass
class RepoStats:
    """A repository's size. ``stored``: bytes of every object in the storage; ``unique``:
    plaintext bytes of the distinct chunks the index lists; ``logical``: bytes the snapshots
    hold as a guest would read them (allocated disk data and files, each snapshot counted
    whole). Dedup ratio = logical / unique; compression ratio = unique / stored data."""

    repository: str
    time: dt.datetime
    stored: int
    stored_data: int
    packs: int
    unique: int
    chunks: int
    logical: int
    snapshots: int
    free: int | None

    @property
    def dedup_ratio(self) -> float | None:
        return self.logical / self.unique if self.unique else None

    @property
    def compression_ratio(self) -> float | None:
        return self.unique / self.stored_data if self.stored_data else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
            "stored": self.stored,
            "stored_data": self.stored_data,
            "packs": self.packs,
            "unique": self.unique,
            "chunks": self.chunks,
            "logical": self.logical,
            "snapshots": self.snapshots,
            "free": self.free,
            "dedup_ratio": None if self.dedup_ratio is None else round(self.dedup_ratio, 3),
            "compression_ratio": None if self.compression_ratio is None else round(self.compression_ratio, 3),
        }


class RepoView:
    """One configured repository as the dashboard sees it: opened once (the key derivation is
    the slow part), snapshots and status records cached by id (their content never changes),
    statistics recomputed when asked."""

    def __init__(self, config: RepositoryConfig, *, snapshot_ttl: float = 3.0) -> None:
        self.config = config
        self.name = config.name
        self._repo: Repository | None = None
        self._snaps: dict[str, Snapshot] = {}
        self._unreadable: dict[str, str] = {}
        self._listed = 0.0
        self._ttl = snapshot_ttl
        self._status: StatusStore | None = None
        self._logical: dict[str, int] = {}
        self.error: str | None = None
        self.stats: RepoStats | None = None
        self._lock = threading.RLock()
        self._reader: Repository | None = None
        self._reader_index: set[str] = set()

    def repo(self) -> Repository:
        with self._lock:
            if self._repo is None:
                backend = open_backend(self.config.location)
                try:
                    self._repo = Repository.open(backend, self.config.secret(), load_index=False)
                except BaseException:
                    backend.close()
                    raise
                self._status = StatusStore(self._repo)
            return self._repo

    def _failed(self, exc: Exception) -> None:
        self.error = str(exc)
        with self._lock:
            if self._repo is not None:
                try:
                    self._repo.close()
                except Exception:
                    log.debug("closing repository %s failed", self.name, exc_info=True)
            self._repo, self._status = None, None
            self._listed = 0.0

    def reader(self) -> Repository:
        """A view of the repository with its index, for reading chunks (file browse and
        download). A new view replaces it when the index files change; a reader still using
        the old one keeps it (no index is ever changed under a reader)."""
        with self._lock:
            light = self.repo()
            names = {o.name for o in light.backend.list("index/")}
            if self._reader is None or names != self._reader_index:
                view = Repository(light.backend, light.config, light.key, light.key_id)
                view.load_index()
                self._reader, self._reader_index = view, names
            return self._reader

    def snapshots(self, *, fresh: bool = False) -> list[Snapshot]:
        """Every readable snapshot, oldest first; [] (and ``error`` set) when unreachable."""
        with self._lock:
            if fresh or time.monotonic() - self._listed > self._ttl:
                try:
                    repo = self.repo()
                    ids = set(repo.snapshot_ids())
                    for gone in set(self._snaps) - ids:
                        del self._snaps[gone]
                    for snap_id in ids - set(self._snaps) - set(self._unreadable):
                        try:
                            self._snaps[snap_id] = repo.load_snapshot(snap_id, listed=True)
                        except (IntegrityError, SnapshotNotFoundError) as exc:
                            self._unreadable[snap_id] = str(exc)
                    self._listed = time.monotonic()
                    self.error = None
                except VmvaultError as exc:
                    self._failed(exc)
            return sorted(self._snaps.values(), key=lambda s: (s.time, s.id))

    def stale(self) -> None:
        # no lock: a statistics run may hold it for long, and a job thread calls this
        self._listed = 0.0

    def unreadable(self) -> dict[str, str]:
        with self._lock:
            return dict(self._unreadable)

    def snapshot(self, ref: str) -> Snapshot:
        snaps = self.snapshots()
        matches = [s for s in snaps if s.id.startswith(ref)] if len(ref) >= 4 else []
        if len(matches) != 1:
            raise SnapshotNotFoundError(f"no snapshot {ref!r} in repository {self.name}")
        return matches[0]

    def statuses(self) -> StatusReport:
        with self._lock:
            try:
                self.repo()
                assert self._status is not None
                return self._status.read()
            except VmvaultError as exc:
                self._failed(exc)
                return StatusReport()

    def immutability(self) -> dict[str, Any]:
        with self._lock:
            try:
                repo = self.repo()
            except VmvaultError as exc:
                self._failed(exc)
                return {"days": None, "enforced": False}
            return {"days": repo.config.immutable_days, "enforced": bool(repo.retention_enforced)}

    def compute_stats(self, now: dt.datetime) -> RepoStats:
        """Size, unique data and ratios (reads the index, and each new snapshot's index blocks
        once: a snapshot's logical size is cached by its id)."""
        with self._lock:
            repo = self.repo()
            snaps = self.snapshots(fresh=True)
            objects = list(repo.backend.list(""))
            stored = sum(o.size for o in objects)
            data = [o for o in objects if o.name.startswith("data/")]
            repo.load_index()
            # one pass over this host's index cache (repository-format.md, 12.3): index blocks
            # are not data; memory does not grow with the repository
            totals = repo.index.stats()
            unique, chunks = totals.data_bytes, totals.data_blobs
            logical = 0
            for snap in snaps:
                if snap.id not in self._logical:
                    self._logical[snap.id] = _logical_size(repo, snap)
                logical += self._logical[snap.id]
            stats = RepoStats(
                repository=self.name,
                time=now,
                stored=stored,
                stored_data=sum(o.size for o in data),
                packs=len(data),
                unique=unique,
                chunks=chunks,
                logical=logical,
                snapshots=len(snaps),
                free=repo.backend.free_space(),
            )
            self.stats = stats
            return stats

    def close(self) -> None:
        with self._lock:
            if self._repo is not None:
                self._repo.close()
            self._repo = None


def _logical_size(repo: Repository, snap: Snapshot) -> int:
    """Bytes of a snapshot as a guest reads it (repo/usage.py, as ``vmvault stats`` counts)."""
    return snapshot_logical(repo, snap)


def regression_full(samples: list[Sample], now: dt.datetime) -> dt.datetime | None:
    """When free space reaches zero, by a least-squares line through the free-space samples
    of the last 30 days; None without a falling trend (or without two samples an hour apart)."""
    recent = [s for s in samples if s.free is not None and (now - s.time).total_seconds() <= 30 * 86400]
    if len(recent) < 2 or (recent[-1].time - recent[0].time).total_seconds() < 3600:
        return None
    xs = [s.time.timestamp() for s in recent]
    ys = [float(s.free or 0) for s in recent]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope >= 0:
        return None
    zero_at = mx - my / slope
    if zero_at - now.timestamp() > 100 * 365 * 86400:
        return None
    return dt.datetime.fromtimestamp(max(zero_at, now.timestamp()), dt.UTC)


# ---- the dashboard ------------------------------------------------------------------------


@dataclass
class Reason:
    level: str
    text: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "text": self.text}


@dataclass
class _Vm:
    hostname: str
    location: str
    name: str = ""
    snapshots: list[tuple[str, Snapshot]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # job records (this host or a status record)
    record_time: dt.datetime | None = None  # the status record the jobs came from (None: local)


class Dashboard:
    """Everything the pages and the API show, for one configuration and its history."""

    def __init__(
        self,
        config: AutomationConfig,
        history: History,
        *,
        settings: WebSettings | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.config = config
        self.history = history
        self.settings = settings or config.web or WebSettings()
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.host = socket.gethostname()
        self.repos = {name: RepoView(rc) for name, rc in config.repositories.items()}
        self._stats_lock = threading.Lock()

    def now(self) -> dt.datetime:
        return self.clock()

    def changed(self, *_args: object) -> None:
        """Something ran (a job, a restore, a forget): list snapshots afresh at the next look."""
        for view in self.repos.values():
            view.stale()

    def repo(self, name: str) -> RepoView:
        view = self.repos.get(name)
        if view is None:
            raise SnapshotNotFoundError(f"no repository {name!r} in the configuration")
        return view

    # ---- jobs and history -----------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        """``vmvault jobs --json``'s ``jobs``, each with its source, repositories and max_age."""
        return [job_record(self.config, s) for s in job_statuses(self.config, self.history, self.now())]

    def runs(
        self,
        *,
        job: str | None = None,
        types: tuple[str, ...] = (),
        statuses: tuple[str, ...] = (),
        since: dt.datetime | None = None,
        text: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Run]:
        """History rows, newest first; ``text`` matches job, error or snapshot (case-insensitive)."""
        if not text:
            return self.history.runs(job=job, types=types, statuses=statuses, since=since, limit=limit, offset=offset)
        needle = text.lower()
        found = [
            r
            for r in self.history.runs(job=job, types=types, statuses=statuses, since=since)
            if needle in r.job.lower() or needle in (r.error or "").lower() or needle in (r.snapshot or "")
        ]
        return found[offset : offset + limit]

    def task_grid(self, hours: int) -> dict[str, dict[str, int]]:
        """Runs per task (backup, verify, copy, prune) and outcome (ok, warning, failed) in the
        last ``hours``: this host's history, its dashboard actions, and other hosts' records."""
        since = self.now() - dt.timedelta(hours=hours)
        grid = {task: dict.fromkeys(OUTCOMES, 0) for task in TASKS}
        for run in self.history.runs(since=since):
            self._count(grid, run.type, run.status, run.details)
        for action in self.history.actions(since=since, action="prune"):
            outcome = "ok" if action.result == "done" else "failed" if action.result == "failed" else None
            if outcome is not None:
                grid["prune"][outcome] += 1
        for record, _repos in self._remote_records():
            for run in record.runs:
                start = _parse(run.get("start"))
                if start is not None and start >= since:
                    self._count(grid, str(run.get("type")), str(run.get("status")), run.get("details") or {})
        return grid

    @staticmethod
    def _count(grid: dict[str, dict[str, int]], task: str, status: str, details: Any) -> None:
        outcome = _OUTCOME.get(status)
        if task in grid and outcome is not None:
            grid[task][outcome] += 1
        retention = details.get("retention") if isinstance(details, dict) else None
        if isinstance(retention, dict):
            if "prune" in retention:
                grid["prune"]["ok"] += 1
            elif "error" in retention:
                grid["prune"]["warning"] += 1

    # ---- status records ---------------------------------------------------------------------

    def statuses(self) -> dict[str, StatusReport]:
        return {name: view.statuses() for name, view in self.repos.items()}

    def _remote_records(self) -> list[tuple[Any, list[str]]]:
        """Other hosts' newest records, one per host (the newest over all repositories), each
        with the names (in this configuration) of the repositories that hold its records: a
        record's own repository names are the other host's, which may differ."""
        newest: dict[str, Any] = {}
        where: dict[str, set[str]] = {}
        for name, report in self.statuses().items():
            for rec in report.records:
                if rec.host == self.host:
                    continue
                where.setdefault(rec.host, set()).add(name)
                old = newest.get(rec.host)
                if old is None or (rec.time, rec.sequence) > (old.time, old.sequence):
                    newest[rec.host] = rec
        return [(newest[h], sorted(where[h])) for h in sorted(newest)]

    def fleet(self) -> list[dict[str, Any]]:
        """Every host seen: this one, each status record's, and each snapshot's hostname."""
        now = self.now()
        hosts: dict[str, dict[str, Any]] = {}

        def host(name: str) -> dict[str, Any]:
            return hosts.setdefault(
                name,
                {
                    "hostname": name, "local": name == self.host, "reported": None, "age_seconds": None,
                    "stale": False, "program": None, "repositories": [], "jobs": [], "alerts": [], "snapshots": 0,
                    "last_snapshot": None,
                },
            )  # fmt: skip

        me = host(self.host)
        me["reported"] = _iso(now)
        me["age_seconds"] = 0
        me["jobs"] = [self._job_brief(j) for j in self.jobs()]
        me["alerts"] = [j["alert"] for j in self.jobs() if j.get("alert")]
        me["repositories"] = sorted(self.repos)
        for name, report in self.statuses().items():
            for rec in report.records:
                if rec.host == self.host:
                    continue
                h = host(rec.host)
                if name not in h["repositories"]:
                    h["repositories"].append(name)
                reported = _parse(h["reported"])
                if reported is None or rec.time > reported:
                    age = (now - rec.time).total_seconds()
                    h.update(
                        reported=_iso(rec.time), age_seconds=round(age), stale=age > STALE_HOST,
                        program=rec.program, jobs=[self._job_brief(j) for j in rec.jobs], alerts=rec.alerts,
                    )  # fmt: skip
        for name, view in self.repos.items():
            for snap in view.snapshots():
                h = host(snap.hostname)
                h["snapshots"] += 1
                if name not in h["repositories"]:
                    h["repositories"].append(name)
                if h["last_snapshot"] is None or snap.time > h["last_snapshot"]:
                    h["last_snapshot"] = snap.time
        return sorted(hosts.values(), key=lambda h: (not h["local"], h["hostname"]))

    @staticmethod
    def _job_brief(j: dict[str, Any]) -> dict[str, Any]:
        last = j.get("last_run") or {}
        return {
            "job": j.get("job"), "type": j.get("type"), "status": j.get("status"), "next_run": j.get("next_run"),
            "last_run": last.get("end") or last.get("start"), "error": last.get("error"),
        }  # fmt: skip

    # ---- VMs -----------------------------------------------------------------------------------

    def _vms(self) -> dict[tuple[str, str], _Vm]:
        vms: dict[tuple[str, str], _Vm] = {}
        for name, view in self.repos.items():
            for snap in view.snapshots():
                loc = str(snap.source.get("location", ""))
                vm = vms.setdefault((snap.hostname, loc), _Vm(snap.hostname, loc))
                vm.snapshots.append((name, snap))
                vm.name = str(snap.vm.get("name") or vm.name)
        for j in self.jobs():
            if j.get("type") != "backup" or not j.get("source"):
                continue
            loc = norm_location(str(j["source"]))
            vm = vms.setdefault((self.host, loc), _Vm(self.host, loc))
            vm.jobs.append(j)
        for rec, repos in self._remote_records():
            for j in rec.jobs:
                if j.get("type") != "backup" or not isinstance(j.get("source"), str):
                    continue
                loc = norm_location(j["source"])
                vm = vms.setdefault((rec.host, loc), _Vm(rec.host, loc))
                vm.jobs.append(j | {"repositories": repos})
                vm.record_time = rec.time
        for vm in vms.values():
            vm.snapshots.sort(key=lambda p: (p[1].time, p[1].id))
            if not vm.name:
                vm.name = os.path.basename(vm.location.rstrip("/")) or vm.location
        return vms

    def verifications(self) -> dict[str, dict[str, Any]]:
        """Per repository: its newest finished verification (this host's history or any other
        host's record) and its newest successful one."""
        out: dict[str, dict[str, Any]] = {}

        def consider(repo: str, status: str, when: dt.datetime | None, job: str, host: str, error: Any) -> None:
            if when is None or status not in (SUCCESS, WARNING, FAILED):
                return
            entry = out.setdefault(repo, {"last": None, "last_ok": None})
            doc = {"status": status, "time": _iso(when), "job": job, "hostname": host, "error": error}
            if entry["last"] is None or when > _parse(entry["last"]["time"]):  # type: ignore[operator]
                entry["last"] = doc
            if status != FAILED and (entry["last_ok"] is None or when > _parse(entry["last_ok"]["time"])):  # type: ignore[operator]
                entry["last_ok"] = doc

        for job in self.config.jobs.values():
            if isinstance(job, VerifyJob):
                for run in self.history.runs(job=job.name, statuses=(SUCCESS, WARNING, FAILED), limit=20):
                    consider(job.repository, run.status, run.end or run.start, job.name, self.host, run.error)
        for name, report in self.statuses().items():
            for rec in report.records:
                if rec.host == self.host:
                    continue
                for remote in rec.runs:
                    if remote.get("type") == "verify":
                        when = _parse(remote.get("end")) or _parse(remote.get("start"))
                        consider(
                            name, str(remote.get("status")), when, str(remote.get("job")), rec.host, remote.get("error")
                        )
        # web-started snapshot verifications count as verifying that repository
        for action in self.history.actions(action="verify", limit=50):
            repo = action.details.get("repository") if isinstance(action.details, dict) else None
            if isinstance(repo, str) and action.result in ("done", "failed"):
                consider(repo, SUCCESS if action.result == "done" else FAILED, action.time, "dashboard", self.host,
                         action.details.get("error"))  # fmt: skip
        return out

    def vms(self) -> list[dict[str, Any]]:
        now = self.now()
        verifications = self.verifications()
        immutability = {name: view.immutability() for name, view in self.repos.items()}
        broken = {name: view.error for name, view in self.repos.items() if view.error}
        out = []
        for vm in self._vms().values():
            out.append(self._vm_state(vm, now, verifications, immutability, broken))
        return sorted(out, key=lambda v: (-_RANK[v["state"]], v["name"].lower(), v["hostname"]))

    def _vm_state(
        self,
        vm: _Vm,
        now: dt.datetime,
        verifications: dict[str, dict[str, Any]],
        immutability: dict[str, dict[str, Any]],
        broken: dict[str, str],
    ) -> dict[str, Any]:
        s = self.settings
        reasons: list[Reason] = []
        max_ages = [float(j["max_age"]) for j in vm.jobs if isinstance(j.get("max_age"), int | float)]
        max_age = min(max_ages) if max_ages else s.max_age
        repos = sorted({name for name, _ in vm.snapshots} | {r for j in vm.jobs for r in j.get("repositories", [])})
        last_good = vm.snapshots[-1] if vm.snapshots else None
        last_good_doc = None
        if last_good is None:
            reasons.append(Reason(RED, "no successful backup on record"))
        else:
            repo_name, snap = last_good
            when = _parse(snap.time) or now
            age = (now - when).total_seconds()
            last_good_doc = {
                "snapshot": snap.id, "time": snap.time, "repository": repo_name, "consistency": snap.consistency,
                "age_seconds": round(age),
            }  # fmt: skip
            if age > max_age:
                reasons.append(
                    Reason(RED, f"last good backup {human_age(age)} ago, more than the allowed {human_age(max_age)}")
                )
            else:
                reasons.append(Reason(GREEN, f"last good backup {human_age(age)} ago (RPO {human_age(max_age)})"))
            if snap.consistency in _CONSISTENT:
                what = "taken with the VM off" if snap.consistency == "offline" else snap.consistency
                reasons.append(Reason(GREEN, f"newest backup {what}"))
            else:
                reasons.append(Reason(AMBER, f"newest backup is only {snap.consistency}"))
        last_run = None
        for j in vm.jobs:
            job_run = j.get("last_run")
            if (
                isinstance(job_run, dict)
                and job_run.get("status") not in (None, "running")
                and (last_run is None or str(job_run.get("start")) > str(last_run.get("start")))
            ):
                last_run = job_run | {"job": j.get("job")}
        if last_run is not None:
            status = last_run.get("status")
            if status in (FAILED, INTERRUPTED):
                reasons.append(
                    Reason(
                        RED, f"last backup run ({last_run['job']}) {status}: {last_run.get('error') or ''}".rstrip(": ")
                    )
                )
            elif status == WARNING:
                warnings = (last_run.get("details") or {}).get("warnings") or []
                reasons.append(
                    Reason(
                        AMBER,
                        f"last backup run ({last_run['job']}) ended with warnings"
                        + (f": {warnings[0]}" if warnings else ""),
                    )
                )
        verified = None
        for repo in repos:
            v = verifications.get(repo)
            if repo in broken:
                reasons.append(Reason(AMBER, f"repository {repo} cannot be read: {broken[repo]}"))
            if v is None or v["last"] is None:
                reasons.append(Reason(AMBER, f"repository {repo} was never verified"))
                continue
            last = v["last"]
            verified = verified or last | {"repository": repo}
            when = _parse(last["time"]) or now
            age = (now - when).total_seconds()
            if last["status"] == FAILED:
                reasons.append(Reason(RED, f"last verification of {repo} ({human_age(age)} ago) found damage"))
            elif age > s.verify_max_age:
                reasons.append(Reason(AMBER, f"repository {repo} last verified {human_age(age)} ago"))
            else:
                reasons.append(Reason(GREEN, f"repository {repo} verified {human_age(age)} ago"))
        immutable = []
        for repo in repos:
            imm = immutability.get(repo) or {"days": None, "enforced": False}
            immutable.append({"repository": repo, **imm})
            if imm["days"]:
                how = "enforced by the storage" if imm["enforced"] else "advisory"
                reasons.append(Reason(GREEN, f"repository {repo} keeps objects {imm['days']} days ({how})"))
            elif s.require_immutable:
                reasons.append(Reason(AMBER, f"repository {repo} keeps nothing immutable"))
        if vm.record_time is not None:
            age = (now - vm.record_time).total_seconds()
            if age > STALE_HOST:
                reasons.append(Reason(AMBER, f"host {vm.hostname} has not reported for {human_age(age)}"))
        state = max((r.level for r in reasons), key=lambda lvl: _RANK[lvl], default=GREEN)
        reasons.sort(key=lambda r: -_RANK[r.level])
        return {
            "name": vm.name,
            "hostname": vm.hostname,
            "location": vm.location,
            "state": state,
            "reasons": [r.to_dict() for r in reasons],
            "last_good_backup": last_good_doc,
            "max_age": max_age,
            "jobs": [j.get("job") for j in vm.jobs],
            "last_run": last_run,
            "verification": verified,
            "immutable": immutable,
            "repositories": repos,
            "snapshots": len(vm.snapshots),
        }

    # ---- snapshots ---------------------------------------------------------------------------

    def snapshots(
        self, *, vm: str | None = None, hostname: str | None = None, repository: str | None = None
    ) -> list[dict[str, Any]]:
        """``vmvault snapshots --json``'s entries, each with its repository, newest first."""
        out = []
        for name, view in self.repos.items():
            if repository is not None and name != repository:
                continue
            for snap in view.snapshots():
                if vm is not None and vm not in (snap.vm.get("name"), snap.source.get("location")):
                    continue
                if hostname is not None and snap.hostname != hostname:
                    continue
                out.append(snapshot_summary(snap) | {"repository": name})
        return sorted(out, key=lambda s: (s["time"], s["id"]), reverse=True)

    # ---- repositories ----------------------------------------------------------------------

    def repositories(self) -> list[dict[str, Any]]:
        now = self.now()
        out = []
        for name, view in self.repos.items():
            snaps = view.snapshots()
            samples = self.history.samples(name)
            full = regression_full(samples, now)
            out.append(
                {
                    "name": name,
                    "location": view.config.location,
                    "error": view.error,
                    "snapshots": len(snaps),
                    "unreadable_snapshots": len(view.unreadable()),
                    "immutable": view.immutability(),
                    "stats": view.stats.to_dict() if view.stats else None,
                    "estimated_full": _iso(full),
                    "samples": [s.to_dict() for s in samples[-500:]],
                    "growth": _growth(snaps),
                }
            )
        return out

    def refresh_stats(self, names: Iterable[str] | None = None, *, min_sample_gap: float = 3600.0) -> None:
        """Recompute repository statistics and record a sample (at most one per
        ``min_sample_gap`` seconds per repository)."""
        with self._stats_lock:
            for name in list(names) if names is not None else list(self.repos):
                view = self.repos[name]
                try:
                    stats = view.compute_stats(self.now())
                except VmvaultError as exc:
                    view._failed(exc)
                    log.warning("repository %s: statistics not computed: %s", name, exc)
                    continue
                last = self.history.samples(name)[-1:]
                if not last or (stats.time - last[0].time).total_seconds() >= min_sample_gap:
                    self.history.add_sample(
                        Sample(name, stats.time, stats.stored, stats.unique, stats.snapshots, stats.free)
                    )

    # ---- audit -------------------------------------------------------------------------------

    def audit(self) -> list[dict[str, Any]]:
        """``vmvault audit``'s report (``hypervisors.audit``) for each configured ``[web]
        audit`` target, with each VM's last backup from every configured repository."""
        now = time.time()
        snaps = [snap for view in self.repos.values() for snap in view.snapshots()]
        out = []
        for target in self.settings.audit:
            try:
                reports = audit_target(target, now)
                add_backup_ages(reports, snaps, self.settings.max_age, now)
                error = None
            except VmvaultError as exc:
                reports, error = [], str(exc)
            except OSError as exc:
                reports, error = [], f"{target}: {exc.strerror or exc}"
            out.append({"target": target, "error": error, "vms": [r.to_dict() for r in reports]})
        return out


def _growth(snaps: list[Snapshot]) -> list[dict[str, Any]]:
    """Bytes added to the repository by each snapshot, accumulated over time (before any
    prune): the growth the backups caused, available before any sample was taken."""
    total = 0
    out = []
    for snap in snaps:
        total += int(snap.stats.get("bytes_added") or 0) if isinstance(snap.stats, dict) else 0
        out.append({"time": snap.time, "added": total})
    return out

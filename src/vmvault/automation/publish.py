"""The daemon's status records: what this host reports into each repository its jobs use.

A dashboard pointed at a repository shows every host that backs up into it, not only the
daemon beside it, by reading these records (``repo/status.py``; repository-format.md,
section 4). The daemon publishes at start, after each finished run, and every
``[daemon] status_interval``; ``vmvault run`` publishes after its run.

Publishing never stops a job or the daemon: a repository that cannot be reached or
written is logged, and the next publication tries again. Repositories are opened without
their index (only the key is needed) and kept open between publications, so a record
costs one listing and one small write, not a key derivation.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from vmvault.automation.config import AutomationConfig, BackupJob
from vmvault.automation.history import History
from vmvault.automation.status import job_statuses
from vmvault.backends import open_backend
from vmvault.errors import VmvaultError
from vmvault.repo.repository import Repository
from vmvault.repo.status import StatusRecord, StatusStore, trimmed_runs

__all__ = ["StatusPublisher", "job_record"]

log = logging.getLogger("vmvault.automation")


def job_record(config: AutomationConfig, status: Any) -> dict[str, Any]:
    """One job as a status record carries it: ``vmvault jobs --json``'s shape, plus the
    job's source, repositories and ``max_age`` (seconds), for dashboards on other hosts."""
    doc: dict[str, Any] = status.to_dict()
    job = status.job
    doc["repositories"] = list(job.repositories)
    if isinstance(job, BackupJob):
        doc["source"] = config.source_location(job.source)
        doc["max_age"] = job.max_age
        doc["tags"] = list(job.tags)
    return doc


class StatusPublisher:
    def __init__(self, config: AutomationConfig, history: History, *, started: dt.datetime | None = None) -> None:
        self.config = config
        self.history = history
        self.started = started
        self.host = socket.gethostname()
        self._stores: dict[str, StatusStore] = {}
        self._lock = threading.Lock()

    def _store(self, name: str) -> StatusStore:
        store = self._stores.get(name)
        if store is None:
            rc = self.config.repositories[name]
            backend = open_backend(rc.location)
            try:
                repo = Repository.open(backend, rc.secret(), load_index=False)
            except BaseException:
                backend.close()
                raise
            store = self._stores[name] = StatusStore(repo)
        return store

    def record(self, repository: str, now: dt.datetime) -> StatusRecord:
        """This host's record for ``repository``: the jobs that use it, their alerts and runs."""
        statuses = [s for s in job_statuses(self.config, self.history, now) if repository in s.job.repositories]
        names = [s.job.name for s in statuses]
        runs: list[dict[str, Any]] = []
        for name in names:
            runs.extend(r.to_dict() for r in self.history.runs(job=name, limit=5))
        runs.sort(key=lambda r: (r["start"], r["id"]), reverse=True)
        return StatusRecord(
            host=self.host,
            time=now,
            # microseconds: orders this host's records, also between the daemon and `vmvault run`
            sequence=time.time_ns() // 1000,
            started=self.started,
            jobs=[job_record(self.config, s) for s in statuses],
            alerts=[s.alert.to_dict() for s in statuses if s.alert is not None],
            runs=trimmed_runs(runs),
        )

    def publish(self, repositories: Iterable[str] | None = None, *, now: dt.datetime | None = None) -> dict[str, str]:
        """Write this host's record into ``repositories`` (default: every repository a job
        uses); returns repository name -> record id for those written. Failures are logged."""
        wanted = list(repositories) if repositories is not None else self.repositories()
        written: dict[str, str] = {}
        with self._lock:  # one publication at a time: records of one host stay ordered
            for name in wanted:
                if name not in self.config.repositories:
                    continue
                try:
                    store = self._store(name)
                    written[name] = store.write(self.record(name, now or dt.datetime.now(dt.UTC)))
                except VmvaultError as exc:
                    log.warning("status record for repository %s not written: %s", name, exc)
                    self._drop(name)
                except Exception:  # a bug here must not stop a job or the daemon
                    log.exception("status record for repository %s not written", name)
                    self._drop(name)
        return written

    def repositories(self) -> list[str]:
        seen: dict[str, None] = {}
        for job in self.config.jobs.values():
            for name in job.repositories:
                seen.setdefault(name, None)
        return list(seen)

    def _drop(self, name: str) -> None:
        store = self._stores.pop(name, None)
        if store is not None:
            try:
                store.repo.close()
            except Exception:  # closing a broken connection: nothing more to do
                log.debug("closing repository %s failed", name, exc_info=True)

    def close(self) -> None:
        with self._lock:
            for name in list(self._stores):
                self._drop(name)

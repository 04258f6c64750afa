"""Running jobs from the dashboard, and their live progress.

Jobs never run on the server's event loop: ``vmvault web`` runs each in a thread of its
own (holding the job's lock, like ``vmvault run``), and ``vmvault daemon`` hands them to its
scheduler, whose job threads report progress here. The board keeps, per job, the phase
being worked on (a disk, a step of a check, a copy) and how far it is; the Jobs page
follows it through server-sent events.

Jobs another process runs (the daemon while ``vmvault web`` serves apart from it, or a
``vmvault run``) are followed through the job history: the process running an attempt
writes its progress into the attempt's row every ``scheduler.PROGRESS_SECONDS`` while it
moves, and the board takes it from there (``Elsewhere``), each second at most.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import RUNNING, History, Run
from vmvault.automation.locks import job_lock
from vmvault.automation.publish import StatusPublisher
from vmvault.automation.scheduler import HEARTBEAT_SECONDS, Scheduler, SystemClock, run_and_record
from vmvault.engine.progress import ProgressReporter
from vmvault.errors import LockedError, VmvaultError

__all__ = ["DaemonControl", "Elsewhere", "JobControl", "ProgressBoard", "StandaloneControl"]

log = logging.getLogger("vmvault.web")


@dataclass
class JobState:
    job: str
    state: str  # queued | running | finished
    phase: str = ""
    phases: int = 0
    done: int = 0
    total: int = 0
    status: str | None = None  # the run's result once finished
    started: str | None = None
    updated: float = 0.0
    by: str = ""

    @property
    def percent(self) -> float | None:
        if self.state == "finished":
            return 100.0 if self.status in ("success", "warning") else None
        if self.total > 0:
            return min(100.0, 100.0 * self.done / self.total)
        return None

    def to_dict(self) -> dict[str, Any]:
        pct = self.percent
        return {
            "job": self.job,
            "state": self.state,
            "phase": self.phase,
            "phases": self.phases,
            "done": self.done,
            "total": self.total,
            "percent": None if pct is None else round(pct, 1),
            "status": self.status,
            "started": self.started,
            "by": self.by,
        }


class _Reporter:
    """The ``ProgressReporter`` a job's engine calls reports to the board."""

    def __init__(self, board: ProgressBoard, job: str) -> None:
        self.board = board
        self.job = job

    def start(self, label: str, total: int) -> None:
        def change(s: JobState) -> None:
            s.state, s.phase, s.total, s.done = "running", label, max(0, total), 0
            s.phases += 1

        self.board.update(self.job, change)

    def advance(self, n: int) -> None:
        def change(s: JobState) -> None:
            s.done += n

        self.board.update(self.job, change, notify_every=0.2)

    def finish(self) -> None:
        def change(s: JobState) -> None:
            s.done = max(s.done, s.total)

        self.board.update(self.job, change)

    def warn(self, text: str) -> None:
        log.warning("job %s: %s", self.job, text)


class ProgressBoard:
    """Per-job progress, shared between job threads and the web server's requests."""

    def __init__(self) -> None:
        self._states: dict[str, JobState] = {}
        self._lock = threading.Lock()
        self.version = 0
        self._notified = 0.0
        #: called with (job, status) when a job or task finishes (the dashboard drops its caches)
        self.on_finished: list[Callable[[str, str], None]] = []

    def update(self, job: str, change: Any, *, notify_every: float = 0.0) -> None:
        with self._lock:
            s = self._states.get(job)
            if s is None:
                s = self._states[job] = JobState(job, "running", started=_now())
            change(s)
            s.updated = time.monotonic()
            # advance() comes per batch: count a change for the event stream a few times a second
            if not notify_every or s.updated - self._notified >= notify_every:
                self.version += 1
                self._notified = s.updated

    def progress_for(self, job: Job) -> ProgressReporter:
        def change(s: JobState) -> None:
            s.state, s.phase, s.phases, s.done, s.total, s.status = "running", "starting", 0, 0, 0, None
            s.started = _now()

        self.update(job.name, change)
        return _Reporter(self, job.name)

    def queued(self, job: str, by: str) -> None:
        def change(s: JobState) -> None:
            s.state, s.phase, s.phases, s.done, s.total, s.status, s.by = "queued", "", 0, 0, 0, None, by
            s.started = None

        self.update(job, change)

    def finished(self, job: str, status: str) -> None:
        def change(s: JobState) -> None:
            s.state, s.status = "finished", status
            s.done = max(s.done, s.total)

        for listener in list(self.on_finished):
            listener(job, status)  # before the board says so: whoever reads on sees the new state
        self.update(job, change)

    def states(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.to_dict() for s in sorted(self._states.values(), key=lambda s: s.job)]

    def state(self, job: str) -> JobState | None:
        with self._lock:
            return self._states.get(job)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


#: how often the history is read for runs of other processes (the event stream asks 4 times a second)
FOLLOW_SECONDS = 1.0
#: a running row without a heartbeat for this long may be a process that died: it is shown as
#: running only while its job's lock is held (``vmvault jobs`` and the next run mark a dead
#: process's row interrupted)
_SILENT_SECONDS = 3 * HEARTBEAT_SECONDS


class Elsewhere:
    """The board's view of attempts another process runs: each ``running`` row of the
    history whose job this process does not run, with the progress its heartbeats record;
    finished on the board when its row ends."""

    def __init__(self, board: ProgressBoard, history: History) -> None:
        self.board = board
        self.history = history
        self.jobs: set[str] = set()
        self._next = 0.0
        self._dead: set[int] = set()  # ids of running rows whose process is gone

    def follow(self, own: set[str]) -> None:
        """Bring the board up to date (``own``: the jobs this process runs or queued)."""
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + FOLLOW_SECONDS
        now = dt.datetime.now(dt.UTC)
        try:
            rows = self.history.runs(statuses=(RUNNING,))
            ended = {job: self.history.last(job) for job in self.jobs - {r.job for r in rows} - own}
        except sqlite3.Error as exc:  # (the board stays as it was: the next call tries again)
            log.warning("the job history %s could not be read: %s", self.history.path, exc)
            return
        running = {}
        for run in reversed(rows):  # the newest row of each job last
            seen = run.heartbeat or run.start
            if run.job not in own and ((now - seen).total_seconds() < _SILENT_SECONDS or self._alive(run)):
                running[run.job] = run
        for job, run in running.items():
            where = run.progress

            def change(s: JobState, run: Any = run, where: Any = where) -> None:
                s.state, s.status, s.by = "running", None, "another process"
                s.started = run.start.isoformat(timespec="seconds")
                s.phase, s.done, s.total, s.phases = (
                    (where.phase, where.done, where.total, where.phases) if where else ("running", 0, 0, 0)
                )

            self.board.update(job, change)
            self.jobs.add(job)
        for job in sorted(self.jobs - running.keys()):
            self.jobs.discard(job)
            if job in own:
                continue  # (this process runs it now: its own reports take over)
            last = ended.get(job)  # (None also for a row still running, silent, its lock free: a process that died)
            self.board.finished(job, last.status if last is not None and last.status != RUNNING else "interrupted")

    def _alive(self, run: Run) -> bool:
        """Whether a process holds the lock of ``run``'s job: a row without heartbeats for a
        while may be a process slow to write its history (a busy disk, a paused machine), not
        gone. A row found without one stays dead (its process is gone; a later run has a row of
        its own), so its lock is looked at once, not at every call."""
        if run.id in self._dead:
            return False
        try:
            alive = job_lock(self.history.path, run.job).holder() is not None
        except (OSError, VmvaultError) as exc:  # (not known dead: looked at again next time)
            log.debug("the lock of job %s could not be looked at: %s", run.job, exc)
            return False
        if not alive:
            self._dead.add(run.id)
        return alive


class JobControl(Protocol):
    board: ProgressBoard

    def run_now(self, job: Job, user: str) -> None:
        """Start ``job`` (or queue it); ``LockedError`` when it is queued or running already."""

    def sync(self) -> None:
        """Mark jobs that ended since the last call as finished on the board."""

    def cancelled(self, job: Job) -> None:
        """``job`` was just cancelled (``status.cancel_job``): let go of what was queued of it."""


class StandaloneControl:
    """``vmvault web`` without a daemon: each run in a thread of its own, holding the job's
    lock (a job the daemon or a ``vmvault run`` is running is refused), at most
    ``[daemon] concurrency`` at once."""

    def __init__(self, config: AutomationConfig, history: History, publisher: StatusPublisher | None = None) -> None:
        self.config = config
        self.history = history
        self.publisher = publisher
        self.board = ProgressBoard()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._elsewhere = Elsewhere(self.board, history)

    def run_now(self, job: Job, user: str) -> None:
        with self._lock:
            self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
            if job.name in self._threads:
                raise LockedError(f"job {job.name} is running already")
            if len(self._threads) >= self.config.daemon.concurrency:
                raise LockedError(
                    f"{len(self._threads)} jobs are running, the configured concurrency; try again when one ends"
                )
            # a daemon or `vmvault run` holding the job: refuse now, with its holder named
            with job_lock(self.history.path, job.name).acquire(command="vmvault web (checking)"):
                pass
            self.board.queued(job.name, user)
            t = threading.Thread(target=self._run, args=(job,), name=f"vmvault-web-job-{job.name}", daemon=True)
            self._threads[job.name] = t
            t.start()

    def _run(self, job: Job) -> None:
        status = "failed"
        try:
            outcome, _start, _end = run_and_record(
                self.config, job, self.history, SystemClock(), command="vmvault web",
                progress=self.board.progress_for(job),
            )  # fmt: skip
            status = outcome.status
        except LockedError as exc:
            log.warning("job %s: not started: %s", job.name, exc)
            status = "refused"
        except Exception:
            log.exception("job %s: could not run", job.name)
        finally:
            self.board.finished(job.name, status)
            if self.publisher is not None:
                self.publisher.publish(job.repositories)

    def sync(self) -> None:
        with self._lock:
            own = {name for name, t in self._threads.items() if t.is_alive()}
        self._elsewhere.follow(own)

    def cancelled(self, job: Job) -> None:
        pass  # (nothing is queued here: a run starts at once or is refused)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the running jobs (tests, and stopping)."""
        with self._lock:
            threads = list(self._threads.values())
        for t in threads:
            t.join(timeout)


class DaemonControl:
    """``vmvault daemon`` with a ``[web]`` section: "run now" queues the job in the scheduler,
    whose job threads report to the board (``Scheduler(progress=board.progress_for)``)."""

    def __init__(self, scheduler: Scheduler, board: ProgressBoard) -> None:
        self.scheduler = scheduler
        self.board = board
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._elsewhere = Elsewhere(board, scheduler.history)

    def _busy(self) -> set[str]:
        return self.scheduler.busy_jobs()

    def run_now(self, job: Job, user: str) -> None:
        if job.name in self._busy():
            raise LockedError(f"job {job.name} is queued or running already")
        if self.scheduler.stopping:
            raise LockedError("the daemon is stopping; it starts no new job")
        self.board.queued(job.name, user)
        with self._lock:
            self._active.add(job.name)
        self.scheduler.enqueue_now(job)
        self.scheduler.wake.set()

    def cancelled(self, job: Job) -> None:
        self.scheduler.wake.set()  # its next look drops what it queued of the job

    def sync(self) -> None:
        busy = self._busy()
        self._elsewhere.follow(busy)
        with self._lock:
            shown = {s["job"] for s in self.board.states() if s["state"] != "finished"} - self._elsewhere.jobs
            for name in list(self._active | shown):
                if name in busy:
                    self._active.add(name)
                    continue
                self._active.discard(name)
                state = self.board.state(name)
                if state is None or state.state == "finished":
                    continue
                last = self.scheduler.history.last(name)
                self.board.finished(name, last.status if last is not None else "failed")

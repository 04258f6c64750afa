"""The daemon's scheduler: fires jobs on their cron schedules, within their windows, with a
concurrency limit, retries with exponential backoff, history, notifications and alerts.

Time comes from an injectable ``Clock`` so tests drive it (``FakeClock``) instead of
sleeping through real minutes. The loop::

    tick():  for each job whose next fire time has come: queue it (once: a job that is
             still queued or running skips this firing, logged), compute its next time;
             start queued attempts whose time has come, inside their window, while fewer
             than ``concurrency`` jobs (and each repository's ``max_jobs``) are running;
             every ``alert_interval``: check backup ages and notify new alerts.
    run():   tick, then sleep until the next thing is due (at most a minute) or a job ends;
             after ``stop()`` (SIGTERM), start nothing new, wait for running jobs, return.

Semantics:

* A firing outside the job's window waits for the window to open (it is not lost).
* A failed attempt is retried ``retries`` times, after ``retry_delay``, then 2x, 4x ...
  A retry that would start outside the window is abandoned: the run stays failed.
* A running attempt stops when somebody cancels it (``History.request_cancel``: ``vmvault
  cancel``, the dashboard), when it has run for its job's ``time_limit``, or when its window
  closes (``stop_at_window_end``, attempts the daemon started): the process
  running it looks every ``PROGRESS_SECONDS`` and the attempt raises ``JobCancelled`` at its
  next progress report. It ends ``failed`` with who stopped it, and is not retried.
* Each attempt is a history row, with a heartbeat every ``HEARTBEAT_SECONDS`` while it runs;
  ONE notification is sent per run, after its last attempt, listing every attempt. A run
  that succeeds after failed runs (or while an alert was open) says it recovered.
* Catch-up: at start, a backup job (or any job with ``catch_up = true``) whose latest
  firing came while no daemon ran, after the daemon first scheduled it and at most
  ``catch_up_within`` ago, and that no attempt has covered, runs once (not once per missed
  firing). A daemon's first start catches nothing up and alerts for nothing.
* Runs a dead process left ``running`` are marked ``interrupted`` at start, ending at
  their last heartbeat (``status.settle_interrupted``).
* One daemon per history file: ``start()`` takes the daemon lock (``locks.py``) and a second
  daemon stops with ``LockedError``. Each attempt holds its job's lock, shared with
  ``vmvault run``: a firing whose job is being run by ``vmvault run`` is skipped (logged),
  as an overlapping firing is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import (
    FAILED,
    INTERRUPTED,
    RUNNING,
    SUCCESS,
    WARNING,
    CancelRequest,
    History,
    Progress,
    Watch,
)
from vmvault.automation.locks import StateLock, daemon_lock, job_lock
from vmvault.automation.notify import Notifier, Summary, attempt_record, send_all
from vmvault.automation.publish import StatusPublisher
from vmvault.automation.runner import JobOutcome, execute_job
from vmvault.automation.status import (
    cancel_job,
    from_local,
    job_alert,
    max_age_alerts,
    next_run,
    recovery,
    settle_interrupted,
    to_local,
)
from vmvault.automation.times import duration, local_time
from vmvault.engine.progress import ProgressReporter
from vmvault.errors import JobCancelled, LockedError, VmvaultError

__all__ = ["Clock", "FakeClock", "Scheduler", "Stop", "SystemClock", "cancelled", "conclude_run", "run_and_record"]

log = logging.getLogger("vmvault.automation")

#: a running attempt records a sign of life this often: a run whose process dies is known
#: to have run until its last one (not "0s", not "until somebody looked")
HEARTBEAT_SECONDS = 5.0
#: how often a running attempt's progress is written to its history row when it moved (what
#: ``vmvault jobs`` and a dashboard in another process show)
PROGRESS_SECONDS = 2.0
#: the daemon's own sign of life, for ``vmvault jobs`` to say when a dead daemon was last seen
DAEMON_HEARTBEAT_SECONDS = 30.0
#: how far back the catch-up looks for the latest firing (beyond ``catch_up_within``, to name
#: one that is too old in the log)
_CATCH_UP_SEARCH_DAYS = 400
#: a lock another process may hold for a moment (``vmvault jobs`` looking for dead runs) is
#: waited for this long before a firing counts as taken
LOCK_WAIT_SECONDS = 2.0

Executor = Callable[[AutomationConfig, Job], JobOutcome]


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware."""
        ...

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        """Wait ``seconds`` or until ``wake`` is set."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        wake.wait(max(0.0, seconds))


class FakeClock:
    """A clock tests move by hand; ``sleep`` advances it at once (no real waiting).

    ``busy`` (when set) says jobs are running: ``sleep`` then first waits, in real time, for
    them to finish, as if they took no time; so a test of the loop is deterministic."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []
        self.busy: Callable[[], bool] | None = None

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float = 0.0, *, to: dt.datetime | None = None) -> dt.datetime:
        with self._lock:
            self._now = to if to is not None else self._now + dt.timedelta(seconds=seconds)
            return self._now

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        self.sleeps.append(seconds)
        while self.busy is not None and self.busy() and not wake.is_set():
            wake.wait(0.01)
        if not wake.is_set():
            self.advance(seconds)


@dataclass
class _Attempt:
    job: Job
    due: dt.datetime
    attempt: int
    #: the window this run started in closes here; retries must start before it
    window_closes: dt.datetime | None = None
    #: the run's earlier attempts (``notify.attempt_record``)
    tries: list[dict[str, Any]] = field(default_factory=list)
    #: the firing this run catches up (missed while no daemon ran)
    missed: dt.datetime | None = None
    #: when it was queued: a request to cancel the job made since means it does not start
    queued: dt.datetime | None = None
    #: a retry's: how the attempt before it ended
    last: JobOutcome | None = None


def conclude_run(
    config: AutomationConfig,
    job: Job,
    history: History,
    tries: list[dict[str, Any]],
    outcome: JobOutcome,
) -> Summary:
    """The one summary of a run after its last attempt (``tries``: every attempt, first to
    last), with the job's RPO alert settled in the history: opened (and counted as sent,
    since it goes out with this summary) or cleared. A run that did its work after failed
    or interrupted runs, or while an alert was open, carries its ``recovered`` record."""
    start = dt.datetime.fromisoformat(tries[0]["start"])
    end = dt.datetime.fromisoformat(tries[-1]["end"])
    after = "" if len(tries) == 1 else f" (after {len(tries)} attempts)"
    summary = Summary(
        kind="run",
        job=job.name,
        job_type=job.type,
        status=outcome.status,
        message=(outcome.message or f"{job.type} job {job.name}: {outcome.status}") + after,
        start=tries[0]["start"],
        end=tries[-1]["end"],
        attempts=len(tries),
        snapshot=outcome.snapshot,
        bytes=outcome.bytes,
        error=outcome.error,
        details=outcome.details,
        runs=list(tries),
        tz=config.daemon.tz(),
    )
    alert = job_alert(config, job, history, end)
    cleared = None
    if alert is None:
        cleared = history.close_alert(job.name)
    else:
        history.open_alert(job.name, end, alert.message)
        history.mark_alert_notified(job.name, end)
        summary.alerts.append(alert.to_dict())
    if outcome.ok and outcome.status in (SUCCESS, WARNING):
        recovered = recovery(history, job.name, start, cleared)
        if recovered is not None:
            summary.recovered = recovered.to_dict()
            log.info("job %s: recovered (%d failed attempts before)", job.name, recovered.failed_attempts)
    return summary


def cancelled(outcome: JobOutcome) -> bool:
    """Whether the attempt was stopped (cancelled, or at its time limit): such an attempt is
    not retried."""
    return "cancelled" in outcome.details


class _Followed:
    """The ProgressReporter an attempt reports to: passes everything on to ``inner`` (a live
    display, or nothing) and keeps where the attempt is, for its heartbeats to record. A
    backup's every batch of chunks comes through ``advance``: it only adds under a lock.

    Once ``stop`` was called, the next ``start`` or ``advance`` made by the thread that runs
    the attempt raises ``JobCancelled``: there the engine is between two pieces of work and
    undoes what it began as after any failure. Reports from other threads (a pool's) pass:
    an exception there could be taken for damage where it is caught. So does an ``advance``
    that completes its phase: that work is done (a copy's last snapshot saved, a check's last
    pack read), and stopping there would call a finished run cancelled. ``advance(0)`` is a
    sign of life: a place to stop, nothing done."""

    def __init__(self, inner: ProgressReporter | None) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._phase, self._done, self._total, self._phases = "starting", 0, 0, 0
        self._changes = 0
        self._runner = threading.get_ident()
        #: why the attempt is to stop, once it is
        self.stopped: Stop | None = None

    def stop(self, why: Stop) -> None:
        with self._lock:
            if self.stopped is None:
                self.stopped = why

    def _heed(self) -> None:
        why = self.stopped
        if why is not None and threading.get_ident() == self._runner:
            raise JobCancelled(why.message)

    def start(self, label: str, total: int) -> None:
        self._heed()
        with self._lock:
            self._phase, self._done, self._total = label, 0, max(0, total)
            self._phases += 1
            self._changes += 1
        if self.inner is not None:
            self.inner.start(label, total)

    def advance(self, n: int) -> None:
        with self._lock:
            if not (self._total > 0 and self._done + n >= self._total):
                self._heed()  # (a report that completes its phase says its work is done: the next may stop)
            if not n:
                return  # (a sign of life, nothing done)
            self._done += n
            self._changes += 1
        if self.inner is not None:
            self.inner.advance(n)

    def finish(self) -> None:
        with self._lock:
            self._done = max(self._done, self._total)
            self._changes += 1
        if self.inner is not None:
            self.inner.finish()

    def warn(self, text: str) -> None:
        if self.inner is not None:
            self.inner.warn(text)

    def where(self) -> tuple[int, Progress]:
        """(how many changes so far, where the attempt is)."""
        with self._lock:
            return self._changes, Progress(self._phase, self._done, self._total, self._phases)


@dataclass(frozen=True)
class Stop:
    """Why a running attempt is to stop: a person's request, or its job's time limit."""

    message: str
    by: str  # the user who asked, or "time_limit"
    time: dt.datetime
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by, "time": self.time.isoformat(timespec="seconds"), "reason": self.reason}


def _stop_due(
    history: History,
    run_id: int,
    job: Job,
    clock: Clock,
    started: float,
    tz: dt.tzinfo | None,
    window_closes: dt.datetime | None,
) -> Stop | None:
    """Whether attempt ``run_id`` (started at ``time.monotonic()`` ``started``) is to stop now."""
    if job.time_limit is not None and time.monotonic() - started >= job.time_limit:
        limit = duration(job.time_limit)
        return Stop(f"stopped: the job's time limit of {limit} was reached", "time_limit", clock.now(), limit)
    if window_closes is not None and clock.now() >= window_closes:
        text = job.window.text if job.window is not None else ""
        closed = local_time(window_closes, tz, seconds=False)
        return Stop(f"stopped: its window {text} closed at {closed}", "window", clock.now(), text)
    try:
        asked = history.cancel_request(run_id)
    except Exception as exc:  # looked for again at the next beat
        log.warning("run %d: could not look for a request to cancel it: %s", run_id, exc)
        return None
    return None if asked is None else _stop_asked(asked, tz)


def _stop_asked(asked: CancelRequest, tz: dt.tzinfo | None) -> Stop:
    why = f": {asked.reason}" if asked.reason else ""
    return Stop(f"cancelled by {asked.user} at {local_time(asked.time, tz)}{why}", asked.user, asked.time, asked.reason)


def _heartbeat(
    history: History,
    run_id: int,
    clock: Clock,
    stop: threading.Event,
    followed: _Followed,
    job: Job,
    tz: dt.tzinfo | None,
    window_closes: dt.datetime | None,
) -> None:
    """Every ``PROGRESS_SECONDS`` the attempt's progress when it moved, and a heartbeat at
    least every ``HEARTBEAT_SECONDS``; and whether it is to stop (``_stop_due``)."""
    written, last = 0, time.monotonic()
    started = last
    while True:
        due = last + HEARTBEAT_SECONDS
        wait = min(PROGRESS_SECONDS, due - time.monotonic())
        if job.time_limit is not None and followed.stopped is None:
            wait = min(wait, started + job.time_limit - time.monotonic())
        if stop.wait(max(0.0, wait)):
            return
        if followed.stopped is None:
            why = _stop_due(history, run_id, job, clock, started, tz, window_closes)
            if why is not None:
                log.warning("job %s: run %d is to stop: %s", job.name, run_id, why.message)
                followed.stop(why)
        changes, where = followed.where()
        if changes == written and time.monotonic() < due:
            continue
        last = time.monotonic()  # (also after a failed write: tried again in an interval, not at once)
        try:
            history.heartbeat(run_id, clock.now(), where if changes != written else None)
            written = changes
        except Exception as exc:  # a missed heartbeat only makes an interrupted run look shorter
            log.warning("run %d: could not record its heartbeat: %s", run_id, exc)


def run_and_record(
    config: AutomationConfig,
    job: Job,
    history: History,
    clock: Clock,
    *,
    attempt: int = 1,
    execute: Executor | None = None,
    command: str = "vmvault run",
    progress: ProgressReporter | None = None,
    note: dict[str, Any] | None = None,
    window_closes: dt.datetime | None = None,
) -> tuple[JobOutcome, dt.datetime, dt.datetime]:
    """One attempt of ``job``, recorded in the history; returns (outcome, start, end).

    Holds the job's lock throughout: raises ``LockedError`` (and records nothing) when the
    job is running in another process, the daemon or another ``vmvault run``. ``progress``
    hears the job's phases (``execute_job`` only; a test's ``execute`` reports its own). The
    row gets a heartbeat every ``HEARTBEAT_SECONDS`` while the job runs; ``note`` is added to
    the run's details (a catch-up says which firing it makes up for). The attempt is stopped
    at ``window_closes`` (a job with ``stop_at_window_end``), at its ``time_limit``, or on
    request (``History.request_cancel``)."""
    lock = job_lock(history.path, job.name).acquire(wait=LOCK_WAIT_SECONDS, command=command, config=config.path)
    try:
        start = clock.now()
        # rows of this job still "running" were left by a process that died: nobody else
        # can be running the job while its lock is ours
        holder = lock.previous_holder
        who = f"`{holder['command']}` (pid {holder.get('pid', '?')})" if holder.get("command") else ""
        if history.mark_interrupted(start, job=job.name, holder=who):
            log.warning("job %s: a run left unfinished by a stopped process is marked interrupted", job.name)
        run_id = history.start(job.name, job.type, start, attempt=attempt)
        log.info("job %s: attempt %d started", job.name, attempt)
        stop_beat = threading.Event()
        followed = _Followed(progress)
        beat = threading.Thread(
            target=_heartbeat,
            args=(history, run_id, clock, stop_beat, followed, job, config.daemon.tz(), window_closes),
            name=f"vmvault-heartbeat-{run_id}",
            daemon=True,
        )
        beat.start()
        try:
            outcome = execute(config, job) if execute is not None else execute_job(config, job, progress=followed)
        except Exception as exc:  # an executor that raises is still a failed run
            error = str(exc) if isinstance(exc, VmvaultError) else f"{type(exc).__name__}: {exc}"
            outcome = JobOutcome(status=FAILED, error=error, exception=exc)
        except KeyboardInterrupt:
            # `vmvault run` stopped by Ctrl-C or a signal (the engine has undone what it began):
            # said now, not left for the next look to take for a dead process
            stop_beat.set()
            beat.join()
            with contextlib.suppress(Exception):
                history.finish(
                    run_id, clock.now(), INTERRUPTED,
                    error=f"interrupted: `{command}` was stopped (Ctrl-C or a signal) before the run finished",
                    details={"interrupted": {"holder": command, "by": "signal"}, **(note or {})},
                )  # fmt: skip
            raise
        finally:
            stop_beat.set()
            beat.join()
        if followed.stopped is not None:
            if isinstance(outcome.exception, JobCancelled):
                outcome.details["cancelled"] = followed.stopped.to_dict()
            else:  # it finished (or failed) before it came to a point where it could stop
                outcome.details["cancel_unheeded"] = followed.stopped.to_dict()
        if note:
            outcome.details.update(note)
        end = clock.now()
        history.finish(
            run_id, end, outcome.status, snapshot=outcome.snapshot, bytes_=outcome.bytes, error=outcome.error,
            details=outcome.details,
        )  # fmt: skip
    finally:
        lock.release()
    if outcome.ok:
        log.info("job %s: %s %s", job.name, outcome.status, outcome.message)
    else:
        log.error("job %s: attempt %d failed: %s", job.name, attempt, outcome.error)
    return outcome, start, end


class Scheduler:
    def __init__(
        self,
        config: AutomationConfig,
        *,
        clock: Clock | None = None,
        history: History | None = None,
        notifiers: list[Notifier] | None = None,
        execute: Executor | None = None,
        progress: Callable[[Job], ProgressReporter] | None = None,
        publisher: StatusPublisher | None = None,
    ) -> None:
        """``progress`` gives each attempt a ``ProgressReporter`` to report to (a live display);
        ``publisher`` writes this host's status record into the repositories (at start, after
        each run and every ``status_interval``)."""
        self.config = config
        self.progress = progress
        self.publisher = publisher
        self._next_publish: dt.datetime | None = None
        self._publishing: threading.Thread | None = None
        self.clock: Clock = clock or SystemClock()
        self.history = history or History(config.daemon.history)
        self.notifiers = notifiers if notifiers is not None else [Notifier(n) for n in config.notifiers.values()]
        self.execute = execute
        self.tz = config.daemon.tz()
        self.next_due: dict[str, dt.datetime] = {}
        self.queue: list[_Attempt] = []
        self.running: dict[str, threading.Thread] = {}
        #: why the running jobs are to be cancelled as the daemon stops (``stop``)
        self._cancel_running: str | None = None
        #: threads telling alerts (``check_alerts``)
        self._alerting: list[threading.Thread] = []
        self.skipped_firings: list[tuple[str, dt.datetime]] = []
        #: (job, missed firing) caught up at start
        self.caught_up: list[tuple[str, dt.datetime]] = []
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self._next_alert_check: dt.datetime | None = None
        self._started = False
        self._daemon_lock: StateLock | None = None
        self._daemon_run: int | None = None
        self._next_heartbeat: dt.datetime | None = None

    # ---- control ------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the daemon lock of the history file: ``LockedError`` when another daemon
        (of this configuration or another naming the same history) runs."""
        if self._daemon_lock is None:
            self._daemon_lock = daemon_lock(self.history.path).acquire(
                wait=LOCK_WAIT_SECONDS, command="vmvault daemon", config=self.config.path
            )

    def close(self) -> None:
        """Record the daemon's clean stop and release the daemon lock (``run`` does when it
        returns)."""
        if self._daemon_run is not None:
            try:
                self.history.daemon_stopped(self._daemon_run, self.clock.now())
            except Exception as exc:  # the lock must be released whatever the history says
                log.warning("could not record the daemon's stop: %s", exc)
            self._daemon_run = None
        if self._daemon_lock is not None:
            self._daemon_lock.release()
            self._daemon_lock = None

    def start(self) -> None:
        """Take the daemon lock; mark runs a dead process left ``running``; record this
        daemon's start; compute first fire times from now; queue the firings missed while no
        daemon ran (catch-up)."""
        self.lock()
        now = self.clock.now()
        settle_interrupted(self.history, now, command="vmvault daemon (starting)")  # logs each job's
        self._daemon_run = self.history.daemon_started(now, os.getpid(), socket.gethostname())
        self._next_heartbeat = now + dt.timedelta(seconds=DAEMON_HEARTBEAT_SECONDS)
        for job in self.config.jobs.values():
            due = next_run(job, now, self.tz)
            watch = self.history.watched(job.name)
            if watch is None:
                # from now on this daemon owes the job its schedule (and its RPO counts)
                self.history.watch(job.name, now, due)
            else:
                missed = self._missed_firing(job, watch, now)
                if missed is not None:
                    fired, missed_due = missed
                    self.caught_up.append((job.name, fired))
                    log.warning(
                        "job %s: the firing of %s was missed while no daemon ran; caught up %s",
                        job.name, local_time(fired, self.tz, seconds=False),
                        "now" if missed_due <= now else f"at {local_time(missed_due, self.tz, seconds=False)}",
                    )  # fmt: skip
                    with self._lock:
                        self.queue.append(_Attempt(job, missed_due, 1, missed=fired, queued=now))
            if due is not None:
                self.next_due[job.name] = due
                log.info("job %s: next run %s", job.name, local_time(due, self.tz, seconds=False))
        self._next_alert_check = now
        self._started = True
        if self.publisher is not None:
            self._next_publish = now

    def _missed_firing(self, job: Job, watch: Watch, now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
        """The latest firing of ``job`` at or before ``now`` that no attempt covered, after
        the daemon began scheduling the job and due at most ``catch_up_within`` ago, as
        (firing, due time: the firing moved into the window); None when there is none."""
        if job.schedule is None or not job.catch_up:
            return None
        # far enough back to find (and name) the latest firing of a yearly schedule; a day
        # costs a few steps
        floor = max(watch.since, now - dt.timedelta(days=_CATCH_UP_SEARCH_DAYS))
        local = job.schedule.last_at_or_before(to_local(now, self.tz), to_local(floor, self.tz))
        if local is None:
            return None
        fired = from_local(local, self.tz)
        if fired <= watch.since:
            return None  # before the daemon scheduled the job: nothing was owed
        due = from_local(job.window.next_open(local), self.tz) if job.window is not None else fired
        # an interrupted attempt did not do the firing's work; a failed one did (its retries ran)
        if self.history.started_since(job.name, fired, (SUCCESS, WARNING, FAILED, RUNNING)):
            return None
        late = (now - due).total_seconds()
        if late > job.catch_up_within:
            log.warning(
                "job %s: the firing of %s was missed while no daemon ran, %s ago: more than its catch_up_within "
                "(%s); not caught up",
                job.name, local_time(fired, self.tz, seconds=False), duration(late), duration(job.catch_up_within),
            )  # fmt: skip
            return None
        return fired, due

    def stop(self, *, cancel_running: str | None = None) -> None:
        """Start nothing new; ``run`` returns once running jobs have finished. With
        ``cancel_running`` (the reason), the running jobs are also cancelled, as by ``vmvault
        cancel``: each stops at its next progress report, undoing what it began."""
        if cancel_running is not None:
            self._cancel_running = cancel_running
        self._stopping.set()
        self.wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        try:
            if not self._started:
                self.start()
            while not self._stopping.is_set():
                self.tick()
                wait = self.seconds_until_next()
                self.clock.sleep(wait, self.wake)
                self.wake.clear()
            self._wind_down()
        finally:
            self.close()
        log.info("stopped")

    def _wind_down(self) -> None:
        """Wait for the running jobs; once ``stop(cancel_running=…)`` was called, ask them to
        stop (once), through the history as ``vmvault cancel`` does."""
        asked = False
        while True:
            reason = self._cancel_running
            if reason is not None and not asked:
                asked = True
                with self._lock:
                    names = sorted(self.running)
                for name in names:
                    try:
                        cancel_job(
                            self.history,
                            name,
                            self.clock.now(),
                            "vmvault daemon",
                            reason=reason,
                            command="vmvault daemon",
                        )
                        log.warning("job %s: cancelled: %s", name, reason)
                    except Exception as exc:  # it then finishes, as without the request
                        log.error("job %s: could not be cancelled: %s", name, exc)
            with self._lock:
                if not self.running:
                    break
            self.wake.wait(0.5)
            self.wake.clear()
        self.wait_idle()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for the running jobs and the alerts being told (tests, and stopping)."""
        while True:
            with self._lock:
                threads = [*self.running.values(), *(a for a in self._alerting if a.is_alive())]
            if not threads:
                return
            for t in threads:
                t.join(timeout)
                if timeout is not None and t.is_alive():
                    return

    # ---- the loop -----------------------------------------------------------------------

    def seconds_until_next(self) -> float:
        now = self.clock.now()
        times = list(self.next_due.values())
        with self._lock:
            times += [a.due for a in self.queue]
        if self._next_alert_check is not None:
            times.append(self._next_alert_check)
        if self._next_publish is not None:
            times.append(self._next_publish)
        if self._next_heartbeat is not None:
            times.append(self._next_heartbeat)
        wait = min(((t - now).total_seconds() for t in times), default=60.0)
        return min(60.0, max(0.0, wait))

    def tick(self) -> None:
        if not self._started:
            self.start()
        now = self.clock.now()
        if self._daemon_run is not None and self._next_heartbeat is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + dt.timedelta(seconds=DAEMON_HEARTBEAT_SECONDS)
            try:
                self.history.daemon_heartbeat(self._daemon_run, now)
            except Exception as exc:  # a missed sign of life is no reason to stop scheduling
                log.warning("could not record the daemon's heartbeat: %s", exc)
        for name, due in list(self.next_due.items()):
            if now < due:
                continue
            job = self.config.jobs[name]
            self.next_due[name] = next_run(job, now, self.tz) or due
            self._enqueue(job, due)
        if not self._stopping.is_set():
            self._dispatch(now)
        if self._next_alert_check is not None and now >= self._next_alert_check:
            self._next_alert_check = now + dt.timedelta(seconds=self.config.daemon.alert_interval)
            self.check_alerts(now)
        if self._next_publish is not None and now >= self._next_publish:
            interval = self.config.daemon.status_interval
            self._next_publish = now + dt.timedelta(seconds=interval) if interval else None
            self.publish_in_background()

    def publish_in_background(self, repositories: tuple[str, ...] | None = None) -> None:
        """Write the status records in a thread of their own (slow storage never holds up
        the loop); a publication still going on is not doubled."""
        publisher = self.publisher
        if publisher is None:
            return
        with self._lock:
            if repositories is None and self._publishing is not None and self._publishing.is_alive():
                return
            t = threading.Thread(
                target=publisher.publish,
                args=(repositories,),
                kwargs={"now": self.clock.now()},
                name="vmvault-status",
                daemon=True,
            )
            if repositories is None:
                self._publishing = t
        t.start()

    def busy_jobs(self) -> set[str]:
        """Jobs queued or running in this daemon."""
        with self._lock:
            return set(self.running) | {a.job.name for a in self.queue}

    def enqueue_now(self, job: Job) -> None:
        self._enqueue(job, self.clock.now())

    def _enqueue(self, job: Job, due: dt.datetime) -> None:
        with self._lock:
            busy = job.name in self.running or any(a.job.name == job.name for a in self.queue)
            if not busy:
                self.queue.append(_Attempt(job, due, 1, queued=self.clock.now()))
                return
        self.skipped_firings.append((job.name, due))
        log.warning("job %s: still queued or running; the firing due %s is skipped", job.name, local_time(due, self.tz))

    def _repo_busy(self, job: Job) -> bool:
        for repo in job.repositories:
            limit = self.config.repositories[repo].max_jobs
            if limit and sum(repo in self.config.jobs[n].repositories for n in self.running) >= limit:
                return True
        return False

    def _dispatch(self, now: dt.datetime) -> None:
        dropped: list[tuple[_Attempt, Stop]] = []
        with self._lock:
            self.queue.sort(key=lambda a: (a.due, a.job.name))
            for a in list(self.queue):
                why = self._cancelled_while_queued(a)
                if why is not None:
                    self.queue.remove(a)
                    dropped.append((a, why))
                    continue
                if a.due > now:
                    continue
                window = a.job.window
                if window is not None:
                    local = to_local(now, self.tz)
                    if not window.contains(local):
                        self.queue.remove(a)
                        if a.attempt > 1:
                            log.error(
                                "job %s: retry %d not started: outside the window %s; the run stays failed",
                                a.job.name, a.attempt - 1, window.text,
                            )  # fmt: skip
                            continue
                        a.due = from_local(window.next_open(local), self.tz)
                        self.queue.append(a)
                        log.info(
                            "job %s: outside its window %s; waits until %s",
                            a.job.name, window.text, local_time(a.due, self.tz, seconds=False),
                        )  # fmt: skip
                        continue
                    if a.window_closes is None:
                        a.window_closes = from_local(window.closes_after(local), self.tz)
                if len(self.running) >= self.config.daemon.concurrency:
                    break
                if self._repo_busy(a.job):
                    continue
                self.queue.remove(a)
                t = threading.Thread(target=self._run_attempt, args=(a,), name=f"vmvault-job-{a.job.name}", daemon=True)
                self.running[a.job.name] = t
                t.start()
        for a, why in dropped:
            self._conclude_dropped(a, why)

    def _cancelled_while_queued(self, a: _Attempt) -> Stop | None:
        """Why ``a`` is not to start: the job was cancelled after it was queued."""
        if a.queued is None:
            return None
        try:
            asked = self.history.cancelled_since(a.job.name, a.queued)
        except Exception as exc:  # looked for again at its next dispatch
            log.warning("job %s: could not look for a request to cancel it: %s", a.job.name, exc)
            return None
        return None if asked is None else _stop_asked(asked, self.tz)

    def _conclude_dropped(self, a: _Attempt, why: Stop) -> None:
        """A queued attempt the job's cancel keeps from starting. A retry's run ends with the
        attempt before it (one summary, as after the last retry); a first attempt never ran."""
        what = f"retry {a.attempt - 1}" if a.attempt > 1 else "queued run"
        log.warning("job %s: %s not started: %s", a.job.name, what, why.message)
        if a.last is None or not a.tries:
            return
        a.last.details["retries_cancelled"] = why.to_dict()
        a.last.error = f"{a.last.error}; no further retry: {why.message}"
        try:
            summary = conclude_run(self.config, a.job, self.history, a.tries, a.last)
            send_all(self._notifiers_for(a.job), summary)
        except Exception:  # the daemon outlives any one job's bookkeeping failure
            log.exception("job %s: could not record or notify", a.job.name)

    def _run_attempt(self, a: _Attempt) -> None:
        try:
            note = {"catch_up": {"missed_firing": a.missed.isoformat(timespec="seconds")}} if a.missed else None
            try:
                outcome, start, end = run_and_record(
                    self.config, a.job, self.history, self.clock, attempt=a.attempt, execute=self.execute,
                    command="vmvault daemon", progress=self.progress(a.job) if self.progress else None, note=note,
                    window_closes=a.window_closes if a.job.stop_at_window_end else None,
                )  # fmt: skip
            except LockedError as exc:
                # `vmvault run` has it: this firing (or retry) is skipped, as an overlapping one is
                self.skipped_firings.append((a.job.name, a.due))
                log.warning("job %s: not started: %s", a.job.name, exc)
                return
            tries = [*a.tries, attempt_record(a.attempt, start, end, outcome.status, outcome.error)]
            retry_at = None
            if not outcome.ok and a.attempt <= a.job.retries and not self._stopping.is_set() and not cancelled(outcome):
                delay = a.job.retry_delay * 2 ** (a.attempt - 1)
                retry_at = end + dt.timedelta(seconds=delay)
                if a.window_closes is not None and retry_at >= a.window_closes:
                    log.error(
                        "job %s: no retry: the next one (%s) would start after the window closes",
                        a.job.name, local_time(retry_at, self.tz),
                    )  # fmt: skip
                    outcome.details.setdefault("warnings", []).append("no further retry: the window closes first")
                    retry_at = None
            if retry_at is not None:
                log.info("job %s: retry %d at %s", a.job.name, a.attempt, local_time(retry_at, self.tz))
                with self._lock:
                    self.queue.append(
                        _Attempt(a.job, retry_at, a.attempt + 1, a.window_closes, tries, a.missed, end, outcome)
                    )
            else:
                summary = conclude_run(self.config, a.job, self.history, tries, outcome)
                send_all(self._notifiers_for(a.job), summary)
                if self.publisher is not None:
                    self.publisher.publish(a.job.repositories, now=self.clock.now())
        except Exception:  # the daemon outlives any one job's bookkeeping failure
            log.exception("job %s: could not record or notify", a.job.name)
        finally:
            with self._lock:
                self.running.pop(a.job.name, None)
            self.wake.set()

    def _notifiers_for(self, job: Job) -> list[Notifier]:
        if not job.notify:
            return self.notifiers
        return [n for n in self.notifiers if n.config.name in job.notify]

    # ---- alerts -------------------------------------------------------------------------

    def check_alerts(self, now: dt.datetime) -> None:
        """Notify each alert once when it starts; clear alerts that no longer hold."""
        with self._lock:
            # a job running or about to run settles its alert itself when it ends
            busy = set(self.running) | {a.job.name for a in self.queue if a.due <= now}
        alerts = {a.job: a for a in max_age_alerts(self.config, self.history, now) if a.job not in busy}
        for job in self.config.jobs.values():
            if job.name not in alerts and job.name not in busy:
                self.history.close_alert(job.name)
        told: list[tuple[str, Summary]] = []
        for name, alert in alerts.items():
            if self.history.open_alert(name, now, alert.message):
                log.error("ALERT: %s", alert.message)
                summary = Summary(
                    kind="alert", job=name, job_type=self.config.jobs[name].type, status="alert", message=alert.message,
                    alerts=[alert.to_dict()], tz=self.tz,
                )  # fmt: skip
                told.append((name, summary))
        if told:
            # in a thread of its own: a mail server or webhook that answers slowly never holds
            # up the loop that starts the jobs
            t = threading.Thread(target=self._tell_alerts, args=(told, now), name="vmvault-alerts", daemon=True)
            t.start()  # before it is listed: ``wait_idle`` waits for the listed ones alive
            with self._lock:
                self._alerting = [a for a in self._alerting if a.is_alive()] + [t]

    def _tell_alerts(self, told: list[tuple[str, Summary]], now: dt.datetime) -> None:
        for name, summary in told:
            try:
                send_all(self._notifiers_for(self.config.jobs[name]), summary)
                self.history.mark_alert_notified(name, now)
            except Exception:  # the daemon outlives a failure to record
                log.exception("job %s: could not record the alert's notification", name)

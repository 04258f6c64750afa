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
* Each attempt is a history row; ONE notification is sent per run, after its last attempt.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import FAILED, History
from vmvault.automation.notify import Notifier, Summary, send_all
from vmvault.automation.runner import JobOutcome, execute_job
from vmvault.automation.status import job_alert, max_age_alerts, next_run, to_local

__all__ = ["Clock", "FakeClock", "Scheduler", "SystemClock", "run_and_record", "run_summary"]

log = logging.getLogger("vmvault.automation")

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


def run_summary(job: Job, attempt: int, start: dt.datetime, end: dt.datetime, outcome: JobOutcome) -> Summary:
    return Summary(
        kind="run",
        job=job.name,
        job_type=job.type,
        status=outcome.status,
        message=outcome.message or f"{job.type} job {job.name}: {outcome.status}",
        start=start.isoformat(timespec="seconds"),
        end=end.isoformat(timespec="seconds"),
        attempts=attempt,
        snapshot=outcome.snapshot,
        bytes=outcome.bytes,
        error=outcome.error,
        details=outcome.details,
    )


def run_and_record(
    config: AutomationConfig,
    job: Job,
    history: History,
    clock: Clock,
    *,
    attempt: int = 1,
    execute: Executor | None = None,
) -> tuple[JobOutcome, dt.datetime, dt.datetime]:
    """One attempt of ``job``, recorded in the history; returns (outcome, start, end)."""
    start = clock.now()
    run_id = history.start(job.name, job.type, start, attempt=attempt)
    log.info("job %s: attempt %d started", job.name, attempt)
    try:
        outcome = (execute or execute_job)(config, job)
    except Exception as exc:  # an executor that raises is still a failed run
        outcome = JobOutcome(status=FAILED, error=f"{type(exc).__name__}: {exc}", exception=exc)
    end = clock.now()
    history.finish(
        run_id, end, outcome.status, snapshot=outcome.snapshot, bytes_=outcome.bytes, error=outcome.error,
        details=outcome.details,
    )  # fmt: skip
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
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.history = history or History(config.daemon.history)
        self.notifiers = notifiers if notifiers is not None else [Notifier(n) for n in config.notifiers.values()]
        self.execute = execute
        self.tz = config.daemon.tz()
        self.next_due: dict[str, dt.datetime] = {}
        self.queue: list[_Attempt] = []
        self.running: dict[str, threading.Thread] = {}
        self.skipped_firings: list[tuple[str, dt.datetime]] = []
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self._next_alert_check: dt.datetime | None = None
        self._started = False

    # ---- control ------------------------------------------------------------------------

    def start(self) -> None:
        """Compute first fire times from now; mark runs a dead daemon left ``running``."""
        now = self.clock.now()
        stale = self.history.mark_interrupted(now)
        if stale:
            log.warning("%d job runs were left running by a previous daemon; marked interrupted", stale)
        for job in self.config.jobs.values():
            due = next_run(job, now, self.tz)
            if due is not None:
                self.next_due[job.name] = due
                log.info("job %s: next run %s", job.name, due.isoformat(timespec="minutes"))
        self._next_alert_check = now
        self._started = True

    def stop(self) -> None:
        """Start nothing new; ``run`` returns once running jobs have finished."""
        self._stopping.set()
        self.wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        if not self._started:
            self.start()
        while not self._stopping.is_set():
            self.tick()
            wait = self.seconds_until_next()
            self.clock.sleep(wait, self.wake)
            self.wake.clear()
        self.wait_idle()
        log.info("stopped")

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for the running jobs (tests, and stopping)."""
        while True:
            with self._lock:
                threads = list(self.running.values())
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
        wait = min(((t - now).total_seconds() for t in times), default=60.0)
        return min(60.0, max(0.0, wait))

    def tick(self) -> None:
        if not self._started:
            self.start()
        now = self.clock.now()
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

    def enqueue_now(self, job: Job) -> None:
        self._enqueue(job, self.clock.now())

    def _enqueue(self, job: Job, due: dt.datetime) -> None:
        with self._lock:
            busy = job.name in self.running or any(a.job.name == job.name for a in self.queue)
            if not busy:
                self.queue.append(_Attempt(job, due, 1))
                return
        self.skipped_firings.append((job.name, due))
        log.warning("job %s: still queued or running; the firing due %s is skipped", job.name, due.isoformat())

    def _repo_busy(self, job: Job) -> bool:
        for repo in job.repositories:
            limit = self.config.repositories[repo].max_jobs
            if limit and sum(repo in self.config.jobs[n].repositories for n in self.running) >= limit:
                return True
        return False

    def _dispatch(self, now: dt.datetime) -> None:
        with self._lock:
            self.queue.sort(key=lambda a: (a.due, a.job.name))
            for a in list(self.queue):
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
                        a.due = self._from_local(window.next_open(local))
                        self.queue.append(a)
                        log.info("job %s: outside its window %s; waits until %s", a.job.name, window.text, a.due)
                        continue
                    if a.window_closes is None:
                        a.window_closes = self._from_local(window.closes_after(local))
                if len(self.running) >= self.config.daemon.concurrency:
                    break
                if self._repo_busy(a.job):
                    continue
                self.queue.remove(a)
                t = threading.Thread(target=self._run_attempt, args=(a,), name=f"vmvault-job-{a.job.name}", daemon=True)
                self.running[a.job.name] = t
                t.start()

    def _from_local(self, naive: dt.datetime) -> dt.datetime:
        from vmvault.automation.status import from_local

        return from_local(naive, self.tz)

    def _run_attempt(self, a: _Attempt) -> None:
        try:
            outcome, start, end = run_and_record(
                self.config, a.job, self.history, self.clock, attempt=a.attempt, execute=self.execute
            )
            retry_at = None
            if not outcome.ok and a.attempt <= a.job.retries and not self._stopping.is_set():
                delay = a.job.retry_delay * 2 ** (a.attempt - 1)
                retry_at = end + dt.timedelta(seconds=delay)
                if a.window_closes is not None and retry_at >= a.window_closes:
                    log.error(
                        "job %s: no retry: the next one (%s) would start after the window closes", a.job.name, retry_at
                    )
                    outcome.details.setdefault("warnings", []).append("no further retry: the window closes first")
                    retry_at = None
            if retry_at is not None:
                log.info("job %s: retry %d at %s", a.job.name, a.attempt, retry_at.isoformat(timespec="seconds"))
                with self._lock:
                    self.queue.append(_Attempt(a.job, retry_at, a.attempt + 1, a.window_closes))
            else:
                summary = run_summary(a.job, a.attempt, start, end, outcome)
                alert = self._update_alert(a.job, end)
                if alert is not None:
                    summary.alerts.append(alert)
                send_all(self._notifiers_for(a.job), summary)
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

    def _update_alert(self, job: Job, now: dt.datetime) -> dict[str, object] | None:
        alert = job_alert(self.config, job, self.history, now)
        if alert is None:
            self.history.close_alert(job.name)
            return None
        self.history.open_alert(job.name, now, alert.message)
        self.history.mark_alert_notified(job.name, now)  # it goes out with this run's summary
        return alert.to_dict()

    def check_alerts(self, now: dt.datetime) -> None:
        """Notify each alert once when it starts; clear alerts that no longer hold."""
        with self._lock:
            # a job running or about to run settles its alert itself when it ends
            busy = set(self.running) | {a.job.name for a in self.queue if a.due <= now}
        alerts = {a.job: a for a in max_age_alerts(self.config, self.history, now) if a.job not in busy}
        for job in self.config.jobs.values():
            if job.name not in alerts and job.name not in busy:
                self.history.close_alert(job.name)
        for name, alert in alerts.items():
            if self.history.open_alert(name, now, alert.message):
                log.error("ALERT: %s", alert.message)
                summary = Summary(
                    kind="alert", job=name, job_type="backup", status="alert", message=alert.message,
                    alerts=[alert.to_dict()],
                )  # fmt: skip
                send_all(self._notifiers_for(self.config.jobs[name]), summary)
                self.history.mark_alert_notified(name, now)

"""The scheduler under a fake clock: fire times, concurrency, retries with backoff, windows."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.automation.conftest import T0, RecordingNotifier, make_config
from vmvault.automation import scheduler
from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import FAILED, SUCCESS, History, Progress
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import FakeClock, Scheduler, run_and_record
from vmvault.engine.progress import NullReporter, ProgressReporter


def at(hh: int, mm: int, ss: int = 0, day: int = 25) -> dt.datetime:
    return dt.datetime(2026, 11, day, hh, mm, ss, tzinfo=dt.UTC)


def verify_job(name: str, schedule: str, extra: str = "") -> str:
    return f'\n[jobs.{name}]\ntype = "verify"\nrepository = "r"\nschedule = "{schedule}"\n{extra}\n'


def make(
    tmp_path: Path, body: str, execute: object, *, concurrency: int = 1, max_jobs: int = 0, start: dt.datetime = T0
) -> tuple[Scheduler, FakeClock, RecordingNotifier]:
    config = make_config(tmp_path, body, concurrency=concurrency, max_jobs=max_jobs)
    clock = FakeClock(start)
    rec = RecordingNotifier()
    sched = Scheduler(
        config,
        clock=clock,
        history=History(config.daemon.history),
        notifiers=[rec],
        execute=execute,  # type: ignore[arg-type]
    )
    clock.busy = lambda: bool(sched.running)
    return sched, clock, rec


def test_jobs_fire_at_their_times_in_the_daemon_loop(tmp_path: Path) -> None:
    fired: list[tuple[str, dt.datetime]] = []
    box: dict[str, Scheduler] = {}

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        fired.append((job.name, box["s"].clock.now()))
        if len([f for f in fired if f[0] == "every10"]) == 3:
            box["s"].stop()
        return JobOutcome(SUCCESS, message="ok")

    body = verify_job("every10", "*/10 * * * *") + verify_job("once", "15 10 * * *")
    sched, clock, rec = make(tmp_path, body, execute, concurrency=2)
    box["s"] = sched
    sched.run()  # returns after stop(); the fake clock never sleeps in real time
    assert fired == [
        ("every10", at(10, 10)),
        ("once", at(10, 15)),
        ("every10", at(10, 20)),
        ("every10", at(10, 30)),
    ]
    assert all(0 <= s <= 60 for s in clock.sleeps)
    assert [s.job for s in rec.sent] == ["every10", "once", "every10", "every10"]
    runs = sched.history.runs()
    assert len(runs) == 4 and {r.status for r in runs} == {SUCCESS}


def test_concurrency_limit_and_per_repository_limit(tmp_path: Path) -> None:
    release = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        with lock:
            started.append(job.name)
        release.wait(10)
        return JobOutcome(SUCCESS)

    body = verify_job("a", "10 10 * * *") + verify_job("b", "10 10 * * *") + verify_job("c", "10 10 * * *")
    sched, clock, _rec = make(tmp_path, body, execute, concurrency=2)
    sched.start()
    clock.advance(to=at(10, 10))
    sched.tick()
    assert len(sched.running) == 2 and len(sched.queue) == 1
    sched.tick()  # nothing changes while both slots are taken
    assert len(sched.running) == 2
    release.set()
    sched.wait_idle(10)
    sched.tick()
    sched.wait_idle(10)
    assert sorted(started) == ["a", "b", "c"]
    assert started[2] == sched.history.runs()[0].job  # the third started last

    # per-repository limit: both jobs use repository r, which allows one at a time
    release.clear()
    started.clear()
    limited = tmp_path / "limited"
    limited.mkdir()
    body = verify_job("a", "10 10 * * *") + verify_job("b", "10 10 * * *")
    sched, clock, _rec = make(limited, body, execute, concurrency=4, max_jobs=1)
    sched.start()
    clock.advance(to=at(10, 10))
    sched.tick()
    assert len(sched.running) == 1 and len(sched.queue) == 1
    release.set()
    sched.wait_idle(10)
    sched.tick()
    sched.wait_idle(10)
    assert sorted(started) == ["a", "b"]


def test_retries_back_off_exponentially_and_notify_once(tmp_path: Path) -> None:
    calls: list[dt.datetime] = []
    box: dict[str, Scheduler] = {}

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        calls.append(box["s"].clock.now())
        if len(calls) < 3:
            return JobOutcome(FAILED, error=f"storage unreachable (try {len(calls)})")
        return JobOutcome(SUCCESS, message="done")

    body = verify_job("j", "10 10 * * *", 'retries = 3\nretry_delay = "1m"')
    sched, clock, rec = make(tmp_path, body, execute)
    box["s"] = sched
    sched.start()
    for minute_second in [(10, 0), (10, 30), (11, 0), (11, 59), (13, 0), (20, 0)]:
        clock.advance(to=at(10, *minute_second))
        sched.tick()
        sched.wait_idle(10)
    # first try 10:10, retry after 1 min (10:11), then after 2 min (10:13); then success
    assert calls == [at(10, 10), at(10, 11), at(10, 13)]
    runs = sched.history.runs(job="j")
    assert [(r.attempt, r.status) for r in reversed(runs)] == [(1, FAILED), (2, FAILED), (3, SUCCESS)]
    assert runs[-1].error == "storage unreachable (try 1)"
    assert len(rec.sent) == 1 and rec.sent[0].status == SUCCESS and rec.sent[0].attempts == 3


def test_exhausted_retries_leave_the_run_failed_with_its_cause(tmp_path: Path) -> None:
    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        return JobOutcome(FAILED, error="source vanished")

    body = verify_job("j", "10 10 * * *", 'retries = 1\nretry_delay = "30s"')
    sched, clock, rec = make(tmp_path, body, execute)
    sched.start()
    for t in [at(10, 10), at(10, 10, 30), at(10, 11), at(10, 30)]:
        clock.advance(to=t)
        sched.tick()
        sched.wait_idle(10)
    assert [r.status for r in sched.history.runs(job="j")] == [FAILED, FAILED]
    assert len(rec.sent) == 1
    assert rec.sent[0].status == FAILED and rec.sent[0].error == "source vanished" and rec.sent[0].attempts == 2


def test_a_firing_outside_the_window_waits_for_it(tmp_path: Path) -> None:
    calls: list[dt.datetime] = []
    box: dict[str, Scheduler] = {}

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        calls.append(box["s"].clock.now())
        return JobOutcome(SUCCESS)

    body = verify_job("nightly", "0 12 * * *", 'window = "22:00-06:00"')
    sched, clock, _rec = make(tmp_path, body, execute)
    box["s"] = sched
    sched.start()
    # the schedule fires at noon, outside the window: the status already says 22:00
    assert sched.next_due["nightly"] == at(22, 0)
    for t in [at(12, 0), at(21, 59), at(22, 0), at(23, 0)]:
        clock.advance(to=t)
        sched.tick()
        sched.wait_idle(10)
    assert calls == [at(22, 0)]


def test_a_retry_that_would_start_after_the_window_closes_is_not_made(tmp_path: Path) -> None:
    calls: list[dt.datetime] = []
    box: dict[str, Scheduler] = {}

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        calls.append(box["s"].clock.now())
        return JobOutcome(FAILED, error="busy host")

    body = verify_job("j", "0 22 * * *", 'window = "22:00-23:00"\nretries = 5\nretry_delay = "30m"')
    sched, clock, rec = make(tmp_path, body, execute)
    box["s"] = sched
    sched.start()
    for t in [at(22, 0), at(22, 30), at(23, 30), at(23, 59)]:
        clock.advance(to=t)
        sched.tick()
        sched.wait_idle(10)
    # 22:00 fails, retry at 22:30 fails, the next (23:30) would be after 23:00: none
    assert calls == [at(22, 0), at(22, 30)]
    assert len(rec.sent) == 1 and rec.sent[0].status == FAILED and rec.sent[0].attempts == 2
    assert "window closes" in " ".join(rec.sent[0].details["warnings"])


def test_a_job_still_running_skips_its_next_firing(tmp_path: Path) -> None:
    release = threading.Event()

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        release.wait(10)
        return JobOutcome(SUCCESS)

    sched, clock, _rec = make(tmp_path, verify_job("j", "* * * * *"), execute)
    sched.start()
    clock.advance(to=at(10, 4))
    sched.tick()
    clock.advance(to=at(10, 5))
    sched.tick()
    assert sched.skipped_firings == [("j", at(10, 5))]
    release.set()
    sched.wait_idle(10)
    assert len(sched.history.runs()) == 1


def test_stop_waits_for_the_running_job(tmp_path: Path) -> None:
    entered = threading.Event()
    release = threading.Event()
    finished: list[str] = []

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        entered.set()
        release.wait(10)
        finished.append(job.name)
        return JobOutcome(SUCCESS)

    sched, _clock, _rec = make(tmp_path, verify_job("j", "4 10 * * *"), execute)
    loop = threading.Thread(target=sched.run)
    loop.start()
    assert entered.wait(10)
    sched.stop()
    loop.join(0.3)
    assert loop.is_alive()  # still waiting for the job
    release.set()
    loop.join(10)
    assert not loop.is_alive() and finished == ["j"]
    assert sched.history.runs()[0].status == SUCCESS


def test_an_executor_that_raises_is_a_failed_run_and_the_daemon_survives(tmp_path: Path) -> None:
    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        raise RuntimeError("bug")

    sched, clock, rec = make(tmp_path, verify_job("j", "* * * * *"), execute)
    sched.start()
    for m in (4, 5):
        clock.advance(to=at(10, m))
        sched.tick()
        sched.wait_idle(10)
    runs = sched.history.runs()
    assert [r.status for r in runs] == [FAILED, FAILED] and runs[0].error == "RuntimeError: bug"
    assert len(rec.sent) == 2


def test_runs_left_running_by_a_dead_daemon_are_marked_interrupted(tmp_path: Path) -> None:
    """Each ends at its last heartbeat: "took 0s" (or "until the next start") was wrong."""
    config = make_config(tmp_path, verify_job("j", "0 1 * * *") + verify_job("k", "0 1 * * *"))
    history = History(config.daemon.history)
    beating = history.start("j", "verify", T0 - dt.timedelta(hours=1))
    history.heartbeat(beating, T0 - dt.timedelta(minutes=47, seconds=30))
    history.start("k", "verify", T0 - dt.timedelta(hours=1))  # died before its first heartbeat
    sched = Scheduler(config, clock=FakeClock(T0), history=history, notifiers=[])
    sched.start()
    j, k = history.last("j"), history.last("k")
    assert j is not None and k is not None
    assert j.status == k.status == "interrupted"
    assert j.end == T0 - dt.timedelta(minutes=47, seconds=30) and j.seconds == 750
    assert j.error is not None and "seen running for 12m 30s, until its last heartbeat" in j.error
    assert k.end == k.start and k.error is not None and "before its first heartbeat" in k.error
    assert j.details["interrupted"]["noticed"] == T0.isoformat()
    sched.close()


def test_an_attempt_writes_its_progress_into_its_row_while_it_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What another process (``vmvault jobs``, a dashboard serving apart) reads, while the job
    runs: through the reporter the job gets, forwarded to the live display as before."""
    monkeypatch.setattr(scheduler, "PROGRESS_SECONDS", 0.02)
    config = make_config(tmp_path, verify_job("v", "0 1 * * *"))
    history = History(config.daemon.history)
    display = RecordingReporter()
    seen: list[object] = []

    def row_progress() -> object:
        run = history.last("v")
        return run.progress if run is not None else None

    def execute_job(config: AutomationConfig, job: Job, progress: ProgressReporter) -> JobOutcome:
        progress.start("web01.raw", 100)
        progress.advance(40)
        seen.append(wait_until(lambda: row_progress() == Progress("web01.raw", 40, 100, 1)))
        progress.finish()
        progress.start("check", 0)
        seen.append(wait_until(lambda: row_progress() == Progress("check", 0, 0, 2)))
        return JobOutcome(SUCCESS, message="ok")

    monkeypatch.setattr(scheduler, "execute_job", execute_job)
    outcome, _start, _end = run_and_record(config, config.jobs["v"], history, FakeClock(T0), progress=display)
    assert outcome.status == SUCCESS and seen == [True, True]
    assert display.calls == [("start", "web01.raw", 100), ("advance", 40), ("finish",), ("start", "check", 0)]
    run = history.last("v")
    assert run is not None and run.status == SUCCESS and "progress" not in run.details  # its details replace it


class RecordingReporter(NullReporter):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, ...]] = []

    def start(self, label: str, total: int) -> None:
        self.calls.append(("start", label, total))

    def advance(self, n: int) -> None:
        self.calls.append(("advance", n))

    def finish(self) -> None:
        self.calls.append(("finish",))


def wait_until(ready: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.01)
    return False

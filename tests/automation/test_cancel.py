"""Stopping a running job: a person's request (``vmvault cancel``, the dashboard) or the job's
``time_limit``. The attempt stops at its next progress report, ends failed saying who stopped
it, is not retried, and leaves the repository and the VM as a failed attempt leaves them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.automation.conftest import RecordingNotifier, make_config
from tests.hypervisors.qemu_vm import DiskSpec, MiB, QemuVM, assert_nothing_left, make_vm
from vmvault.automation import scheduler as scheduler_module
from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import FAILED, RUNNING, SUCCESS, WARNING, History
from vmvault.automation.notify import Summary
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import FakeClock, Scheduler, SystemClock, run_and_record
from vmvault.automation.status import cancel_job
from vmvault.backends.local import LocalBackend
from vmvault.cli import automation as cli_automation
from vmvault.engine import backup as backup_module
from vmvault.engine import copy as copy_module
from vmvault.engine.progress import ProgressReporter
from vmvault.engine.reader import DiskReader
from vmvault.errors import ConfigError, JobCancelled
from vmvault.repo.check import check
from vmvault.repo.repository import Repository

__all__ = ["make_vm"]

CS = 64 * 1024
NOW = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _quick_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "PROGRESS_SECONDS", 0.02)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Repository]:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    r = Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass", chunk_size=CS)
    yield r
    r.close()


def reopen(tmp_path: Path) -> Repository:
    return Repository.open(LocalBackend(str(tmp_path / "repo")), b"repo pass")


@pytest.fixture
def vm(tmp_path: Path) -> Path:
    """A VM folder with 32 MiB of data: eight of the backup's 4 MiB batches."""
    folder = tmp_path / "vms" / "web01"
    folder.mkdir(parents=True)
    (folder / "disk.raw").write_bytes(random.Random(1).randbytes(32 * MiB))
    return folder


def disk_bytes(repo: Repository, snapshot: str) -> bytes:
    """The first disk of ``snapshot`` as the repository restores it."""
    snap = repo.load_snapshot(snapshot)
    reader = DiskReader(repo, snap, snap.disks[0].name)
    try:
        return reader.read(0, reader.size)
    finally:
        reader.close()


def config_for(tmp_path: Path, location: str, extra: str = "") -> AutomationConfig:
    return make_config(
        tmp_path,
        f"""
        [sources.web01]
        location = "{location}"

        [jobs.web01]
        type = "backup"
        source = "web01"
        repository = "r"
        retries = 2
        retry_delay = "1s"
        {extra}

        [jobs.check]
        type = "verify"
        repository = "r"
        read_data = true
        """,
    )


class Stopped:
    """Knows when an attempt was told to stop (``_Followed.stop``), so a test waits for that
    moment instead of sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.told = threading.Event()
        real = scheduler_module._Followed.stop

        def stop(followed: Any, why: Any) -> None:
            real(followed, why)
            self.told.set()

        monkeypatch.setattr(scheduler_module._Followed, "stop", stop)


class CancelAtFirstBatch:
    """A live display that, at the first batch the job reports, asks for the run to be
    cancelled (as `vmvault cancel` in another process would) and holds the job until the
    request was seen. Counts what it was told."""

    def __init__(self, history: History, job: str, stopped: Stopped, *, user: str = "alice", clock: Any = None) -> None:
        self.history, self.job, self.stopped, self.user = history, job, stopped, user
        self.clock = clock or SystemClock()
        self.batches = 0

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.batches += 1
        if self.batches == 1:
            asked = cancel_job(
                self.history, self.job, self.clock.now(), self.user, reason="maintenance", command="test"
            )
            assert len(asked) == 1
            assert self.stopped.told.wait(20), "the running attempt did not see the request"

    def finish(self) -> None:
        pass

    def warn(self, text: str) -> None:
        pass


@pytest.mark.integration
def test_a_cancelled_backup_fails_says_who_is_not_retried_and_loses_nothing(
    tmp_path: Path, repo: Repository, vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_for(tmp_path, str(vm))
    stopped = Stopped(monkeypatch)
    history = History(config.daemon.history)
    clock = FakeClock(NOW)  # (the daemon's time and the request's: one clock, as on a host)
    display = CancelAtFirstBatch(history, "web01", stopped, clock=clock)
    sched = Scheduler(config, clock=clock, history=history, notifiers=[], progress=lambda job: display)
    clock.busy = lambda: bool(sched.running)
    sched.enqueue_now(config.jobs["web01"])
    sched.tick()
    sched.wait_idle(60)
    clock.advance(60)  # past any retry's delay: none may be queued
    sched.tick()
    sched.wait_idle(60)

    (run,) = history.runs()
    assert run.status == FAILED and run.snapshot is None
    assert run.error is not None and run.error.startswith("cancelled by alice at ") and "maintenance" in run.error
    assert run.details["cancelled"]["by"] == "alice" and run.details["cancelled"]["reason"] == "maintenance"
    # it stopped at the batch after the request, not at the end of the disk
    assert display.batches == 1
    assert not sched.queue and not sched.running
    (action,) = history.actions(action="cancel")
    assert (action.user, action.target, action.result) == ("alice", "web01", "requested")

    # no snapshot, a sound repository, the job's lock given back: the next run completes and
    # reuses what the cancelled one had stored
    r = reopen(tmp_path)
    try:
        assert r.snapshot_ids() == [] and check(r).ok
    finally:
        r.close()
    display.batches = 2  # no more requests
    clock.advance(1)  # a run queued after the request is not touched by it
    sched.enqueue_now(config.jobs["web01"])
    sched.tick()
    sched.wait_idle(60)
    latest = history.runs()[0]
    assert latest.status == SUCCESS, latest.error
    assert "cancelled" not in latest.details
    r = reopen(tmp_path)
    try:
        assert disk_bytes(r, r.snapshot_ids()[0]) == (vm / "disk.raw").read_bytes()
    finally:
        r.close()


class Slow:
    """A live display that makes each batch take ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches = 0

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.batches += 1
        time.sleep(self.seconds)

    def finish(self) -> None:
        pass

    def warn(self, text: str) -> None:
        pass


def test_a_cancel_keeps_the_daemon_from_starting_a_queued_retry(tmp_path: Path) -> None:
    """A job failing with retries left: `vmvault cancel` while its retry waits means the retry
    does not start; the run ends with one summary saying so, and later firings run."""
    config = config_for(tmp_path, str(tmp_path / "vms" / "missing"))
    clock = FakeClock(NOW)
    notifier = RecordingNotifier()
    sched = Scheduler(config, clock=clock, notifiers=[notifier])
    clock.busy = lambda: bool(sched.running)
    sched.enqueue_now(config.jobs["web01"])
    sched.tick()
    sched.wait_idle(60)
    assert [a.attempt for a in sched.queue] == [2] and not notifier.sent  # the retry waits 1 s
    cancel_job(sched.history, "web01", NOW + dt.timedelta(seconds=0.5), "gina", reason="VM retired", command="test")
    sched.tick()  # (before the retry is due: it is dropped at the daemon's next look)
    sched.wait_idle(60)
    assert not sched.queue and not sched.running
    assert [r.attempt for r in sched.history.runs()] == [1]
    (summary,) = notifier.sent
    assert summary.status == FAILED and summary.attempts == 1
    assert summary.error is not None and summary.error.endswith(
        "; no further retry: cancelled by gina at 2026-11-25 10:00:00 UTC: VM retired"
    )
    assert summary.details["retries_cancelled"]["by"] == "gina"
    assert summary.subject().startswith("[vmvault] CANCELLED: web01 on ")
    # a run asked for after the request is not touched by it
    clock.advance(5)
    sched.enqueue_now(config.jobs["web01"])
    sched.tick()
    sched.wait_idle(60)
    assert [r.attempt for r in sched.history.runs()] == [1, 1]


@pytest.mark.integration
def test_a_backup_past_its_time_limit_is_stopped(tmp_path: Path, repo: Repository, vm: Path) -> None:
    config = config_for(tmp_path, str(vm))
    job = dataclasses.replace(config.jobs["web01"], time_limit=0.3)
    history = History(config.daemon.history)
    slow = Slow(0.1)
    started = time.monotonic()
    outcome, _start, _end = run_and_record(config, job, history, SystemClock(), progress=slow)
    took = time.monotonic() - started
    assert outcome.status == FAILED and isinstance(outcome.exception, JobCancelled)
    assert outcome.error == "stopped: the job's time limit of 0.3s was reached"
    assert outcome.details["cancelled"]["by"] == "time_limit"
    assert 2 <= slow.batches < 8 and took < 5
    assert history.runs()[0].status == FAILED
    r = reopen(tmp_path)
    try:
        assert r.snapshot_ids() == [] and check(r).ok
    finally:
        r.close()


@pytest.mark.integration
def test_a_verify_job_stops_between_packs(
    tmp_path: Path, repo: Repository, vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_for(tmp_path, str(vm))
    history = History(config.daemon.history)
    first, _s, _e = run_and_record(config, config.jobs["web01"], history, SystemClock())
    assert first.status == SUCCESS, first.error
    stopped = Stopped(monkeypatch)
    display = CancelAtFirstBatch(history, "check", stopped, user="bob")
    outcome, _s, _e = run_and_record(config, config.jobs["check"], history, SystemClock(), progress=display)
    assert outcome.status == FAILED and outcome.error is not None
    assert outcome.error.startswith("cancelled by bob"), outcome.error
    assert outcome.details["cancelled"]["by"] == "bob"


@pytest.mark.integration
def test_a_copy_job_stops_inside_a_snapshot(
    tmp_path: Path, repo: Repository, vm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One snapshot of 32 MiB in index blocks of 1 MiB: the copy stops at the block after the
    request, not after the whole snapshot, and the target keeps no snapshot."""
    monkeypatch.setattr(backup_module, "INDEX_SPAN", 16)
    Repository.init(LocalBackend(str(tmp_path / "offsite")), b"repo pass", chunk_size=CS).close()
    config = config_for(
        tmp_path,
        str(vm),
        f"""
        [repositories.offsite]
        location = "{tmp_path / "offsite"}"
        password_env = "VMVAULT_TEST_REPO_PW"

        [jobs.offsite]
        type = "copy"
        from = "r"
        to = "offsite"
        """,
    )
    history = History(config.daemon.history)
    first, _s, _e = run_and_record(config, config.jobs["web01"], history, SystemClock())
    assert first.status == SUCCESS, first.error
    stopped = Stopped(monkeypatch)
    real = copy_module._Translator._finish
    blocks: list[int] = []

    def finish(translator: Any, *args: Any) -> Any:
        blocks.append(1)
        if len(blocks) == 1:  # the copy's first index block: asked to stop, and held until seen
            cancel_job(history, "offsite", dt.datetime.now(dt.UTC), "hank", command="test")
            assert stopped.told.wait(20)
        return real(translator, *args)

    monkeypatch.setattr(copy_module._Translator, "_finish", finish)
    outcome, _s, _e = run_and_record(config, config.jobs["offsite"], history, SystemClock(), progress=Slow(0))
    assert outcome.status == FAILED and isinstance(outcome.exception, JobCancelled), outcome.error
    assert len(blocks) == 1  # of 32
    monkeypatch.setattr(copy_module._Translator, "_finish", real)
    target = Repository.open(LocalBackend(str(tmp_path / "offsite")), b"repo pass")
    try:
        assert target.snapshot_ids() == [] and check(target).ok
    finally:
        target.close()
    again, _s, _e = run_and_record(config, config.jobs["offsite"], history, SystemClock())
    assert again.status == SUCCESS and again.details["copy"]["copied"], again.error


def test_a_run_that_finishes_before_it_can_stop_keeps_its_result_and_says_so(tmp_path: Path) -> None:
    """A job with no progress report left (here: one that reports none) ends as it ends; the
    run says it was asked to stop and did not come to a point where it could."""
    config = config_for(tmp_path, str(tmp_path / "nowhere"))
    history = History(config.daemon.history)
    release = threading.Event()

    def execute(config: AutomationConfig, job: Job) -> JobOutcome:
        release.wait(30)
        return JobOutcome(SUCCESS, message="done")

    done: list[JobOutcome] = []
    job = config.jobs["web01"]
    t = threading.Thread(
        target=lambda: done.append(run_and_record(config, job, history, SystemClock(), execute=execute)[0])
    )
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not history.running_jobs() and time.monotonic() < deadline:
            time.sleep(0.01)
        (asked,) = cancel_job(history, "web01", dt.datetime.now(dt.UTC), "carol", command="test")
        while history.cancel_request(asked.id) is None:
            time.sleep(0.01)
        time.sleep(0.2)  # several looks of the running attempt
    finally:
        release.set()
        t.join(30)
    (outcome,) = done
    assert outcome.status == SUCCESS
    assert "cancelled" not in outcome.details and outcome.details["cancel_unheeded"]["by"] == "carol"


def test_only_the_thread_running_the_attempt_is_stopped() -> None:
    """A report from another thread (a pool's) passes: an exception there could be caught and
    taken for damage; the thread that runs the attempt stops at its next report."""
    followed = scheduler_module._Followed(None)
    followed.advance(1)
    followed.stop(scheduler_module.Stop("cancelled by dave", "dave", NOW))
    raised: list[BaseException] = []

    def elsewhere() -> None:
        try:
            followed.advance(1)
            followed.start("phase", 10)
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert raised == []
    with pytest.raises(JobCancelled, match="cancelled by dave"):
        followed.advance(1)
    with pytest.raises(JobCancelled):
        followed.start("next", 1)
    followed.finish()  # (a finally may still close a phase)


def test_a_report_that_completes_its_phase_does_not_stop_the_run() -> None:
    """The last report of a phase says its work is done (a copy's last snapshot saved, a
    check's last pack read): a run stopped there would be called cancelled although finished.
    The next phase stops; a sign of life (``advance(0)``) inside a phase is a place to stop."""
    followed = scheduler_module._Followed(None)
    followed.start("copy", 3)
    followed.advance(0)
    followed.stop(scheduler_module.Stop("cancelled by ivy", "ivy", NOW))
    with pytest.raises(JobCancelled):
        followed.advance(0)
    followed.advance(3)
    assert followed.where()[1].done == 3
    with pytest.raises(JobCancelled):
        followed.start("next", 1)


def test_cancel_requests_reach_running_attempts_only_and_the_first_stands(tmp_path: Path) -> None:
    history = History(str(tmp_path / "h.sqlite"))
    done = history.start("web01", "backup", NOW)
    history.finish(done, NOW + dt.timedelta(seconds=5), SUCCESS)
    assert history.request_cancel("web01", NOW, "erin") == []
    assert history.cancel_request(done) is None
    running = history.start("web01", "backup", NOW + dt.timedelta(minutes=1), attempt=1)
    other = history.start("db01", "backup", NOW + dt.timedelta(minutes=1))
    (asked,) = history.request_cancel("web01", NOW + dt.timedelta(minutes=2), "erin", "disk swap")
    assert asked.id == running and asked.status == RUNNING
    history.request_cancel("web01", NOW + dt.timedelta(minutes=3), "frank")
    req = history.cancel_request(running)
    assert req is not None and (req.user, req.reason, req.time) == ("erin", "disk swap", NOW + dt.timedelta(minutes=2))
    assert history.cancel_request(other) is None
    # what a daemon queued of the job before the newest request does not start; after it, it does
    since = history.cancelled_since("web01", NOW + dt.timedelta(minutes=2))
    assert since is not None and since.user == "frank"
    assert history.cancelled_since("web01", NOW + dt.timedelta(minutes=3, seconds=1)) is None
    assert history.cancelled_since("db01", NOW) is None
    got = history.run(running)
    assert got is not None and got.id == running and history.run(10**6) is None


def test_time_limit_is_a_duration_of_at_least_a_minute(tmp_path: Path) -> None:
    config = config_for(tmp_path, "/srv/vms/web01", 'time_limit = "4h"')
    assert config.jobs["web01"].time_limit == 4 * 3600 and config.jobs["check"].time_limit is None
    with pytest.raises(ConfigError, match="time_limit must be from 60 s"):
        config_for(tmp_path, "/srv/vms/web01", 'time_limit = "30s"')
    with pytest.raises(ConfigError, match="no unit"):
        config_for(tmp_path, "/srv/vms/web01", 'time_limit = "4"')


# -- a live QEMU guest -------------------------------------------------------------------------


@pytest.mark.integration
def test_a_cancelled_live_backup_leaves_the_vm_as_it_was(
    make_vm: Callable[..., QemuVM], tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live incremental of a running QEMU guest cancelled mid-read: no overlay, export, job or
    scratch file is left, the previous backup's bitmaps still track, and the next backup is an
    incremental that restores the disk as it is."""
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    vm.write("vda", 0, 12 * MiB, 0x41)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    config = config_for(tmp_path, f"{vm.location}?scratch={scratch}")
    history = History(config.daemon.history)
    job = config.jobs["web01"]
    first, _s, _e = run_and_record(config, job, history, SystemClock())
    assert first.status in (SUCCESS, WARNING), first.error
    baseline = vm.node_names()
    bitmaps = vm.vmvault_bitmaps("disk0")
    assert len(bitmaps) == 1

    vm.write("vda", 0, 12 * MiB, 0x42)  # every batch of the next backup has changed
    stopped = Stopped(monkeypatch)
    outcome, _s, _e = run_and_record(
        config, job, history, SystemClock(), progress=CancelAtFirstBatch(history, "web01", stopped)
    )
    assert outcome.status == FAILED and isinstance(outcome.exception, JobCancelled), outcome.error
    assert_nothing_left(vm, baseline, scratch)
    assert vm.vmvault_bitmaps("disk0") == bitmaps

    vm.write("vda", 14 * MiB, MiB, 0x43)
    last, _s, _e = run_and_record(config, job, history, SystemClock())
    assert last.status in (SUCCESS, WARNING), last.error
    assert last.details["backup"]["disks"][0]["incremental"] == 1
    r = reopen(tmp_path)
    try:
        assert disk_bytes(r, last.snapshot or "") == vm.snapshot_model()["vda"]
    finally:
        r.close()


def slow_jobs(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every job a minute of progress reports, 20 ms apart; the event is set at the first."""
    reports = threading.Event()

    def execute_job(config: AutomationConfig, job: Job, progress: ProgressReporter) -> JobOutcome:
        progress.start("web01.raw", 3000)
        for _ in range(3000):
            progress.advance(1)
            reports.set()
            time.sleep(0.02)
        return JobOutcome(SUCCESS, message="ran to its end")

    monkeypatch.setattr(scheduler_module, "execute_job", execute_job)
    return reports


def test_a_second_stop_signal_cancels_the_running_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM lets the running job finish; a second SIGTERM or SIGINT cancels it, and the
    daemon ends within moments instead of being killed mid-backup."""
    config = config_for(tmp_path, "/srv/vms/web01")
    reports = slow_jobs(monkeypatch)
    sched = Scheduler(config, notifiers=[])
    on_signal = cli_automation._stopping(sched, logging.getLogger("test"))
    sched.enqueue_now(config.jobs["web01"])
    daemon = threading.Thread(target=sched.run)
    daemon.start()
    try:
        assert reports.wait(20)
        on_signal(signal.SIGTERM, None)
        time.sleep(0.3)
        assert daemon.is_alive() and sched.running  # the first: the job goes on
        asked = time.monotonic()
        on_signal(signal.SIGINT, None)
        daemon.join(20)
        assert not daemon.is_alive() and time.monotonic() - asked < 5
    finally:
        sched.stop(cancel_running="the test ends")
        daemon.join(60)
    (run,) = sched.history.runs()
    assert run.status == FAILED and run.error is not None
    assert re.fullmatch(
        r"cancelled by vmvault daemon at .*: the daemon was told to stop twice \(SIGTERM, SIGINT\)", run.error
    ), run.error


def test_a_notification_says_cancelled_when_a_person_stopped_the_run() -> None:
    """Still a failed run (it did not do its work), but a person's stop is named as such in the
    subject; a time limit reached is a failure like any other."""
    by_person = Summary(kind="run", job="j", status=FAILED, message="", details={"cancelled": {"by": "ada"}})
    by_limit = Summary(kind="run", job="j", status=FAILED, message="", details={"cancelled": {"by": "time_limit"}})
    assert by_person.subject().startswith("[vmvault] CANCELLED: j on ") and by_person.is_failure
    assert by_limit.subject().startswith("[vmvault] FAILED: j on ")


def test_a_run_still_going_when_its_window_closes_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`stop_at_window_end`: an attempt the daemon started inside the job's window is stopped
    when the window closes (a failure, not a person's cancel: FAILED, not retried)."""
    config = config_for(tmp_path, "/srv/vms/web01", 'window = "22:00-23:00"\nstop_at_window_end = true')
    reports = slow_jobs(monkeypatch)
    clock = FakeClock(dt.datetime(2026, 11, 25, 22, 30, tzinfo=dt.UTC))
    notifier = RecordingNotifier()
    sched = Scheduler(config, clock=clock, notifiers=[notifier])
    sched.enqueue_now(config.jobs["web01"])
    sched.tick()
    assert reports.wait(20)
    clock.advance(to=dt.datetime(2026, 11, 25, 23, 0, 1, tzinfo=dt.UTC))
    sched.wait_idle(30)
    assert not sched.running and not sched.queue  # (retries = 2: none for a stopped run)
    (run,) = sched.history.runs()
    assert run.status == FAILED
    assert run.error == "stopped: its window 22:00-23:00 closed at 2026-11-25 23:00 UTC"
    assert run.details["cancelled"]["by"] == "window"
    (summary,) = notifier.sent
    assert summary.subject().startswith("[vmvault] FAILED: web01")


def test_stop_at_window_end_needs_a_window(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stop_at_window_end needs a window"):
        config_for(tmp_path, "/srv/vms/web01", "stop_at_window_end = true")

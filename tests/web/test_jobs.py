"""Jobs another process runs (the daemon while `vmvault web` serves apart, a `vmvault run`):
their progress reaches the dashboard through the job history, and they end there."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import Site, close_site, make_site
from vmvault.automation import scheduler as scheduler_module
from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import FAILED, SUCCESS, History, Progress
from vmvault.automation.locks import job_lock
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import FakeClock, Scheduler, SystemClock, run_and_record
from vmvault.engine.progress import ProgressReporter
from vmvault.web import jobs as jobs_module
from vmvault.web.jobs import DaemonControl, ProgressBoard

from .test_api import _auth


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.setattr(jobs_module, "FOLLOW_SECONDS", 0.0)
    monkeypatch.setattr(scheduler_module, "PROGRESS_SECONDS", 0.02)
    s = make_site(tmp_path / "site")
    yield s
    close_site(s)


def wait_for(what: str, ready: Callable[[], Any], seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {seconds} s")


def state_of(site: Site, job: str) -> dict[str, Any] | None:
    r = site.client.get("/api/v1/progress", headers=_auth(site, "vera"))
    assert r.status_code == 200
    return next((p for p in r.json()["progress"] if p["job"] == job), None)


def test_a_job_run_elsewhere_shows_its_progress_and_its_end(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def execute_job(config: AutomationConfig, job: Job, progress: ProgressReporter) -> JobOutcome:
        progress.start("web01.raw", 200)
        progress.advance(80)
        release.wait(30)
        progress.finish()
        return JobOutcome(SUCCESS, message="ok")

    monkeypatch.setattr(scheduler_module, "execute_job", execute_job)
    job = site.config.jobs["web01-nightly"]
    # the other process: its own History on the same file, its own job lock (vmvault run)
    other = threading.Thread(
        target=run_and_record,
        args=(site.config, job, History(site.config.daemon.history), SystemClock()),
        kwargs={"command": "vmvault run"},
    )
    other.start()
    try:

        def running() -> dict[str, Any] | None:
            p = state_of(site, "web01-nightly")
            return p if p and p["state"] == "running" and p["phase"] == "web01.raw" else None

        p = wait_for("the run's progress on the board", running)
        assert p["percent"] == 40.0 and p["done"] == 80 and p["total"] == 200
        page = site.login("vera").get("/jobs").text
        assert "running 40 %" in page and "web01.raw" in page
        token = _auth(site, "otto")
        assert site.client.post("/api/v1/jobs/web01-nightly/run", headers=token).status_code == 409
    finally:
        release.set()
        other.join(30)

    def finished() -> dict[str, Any] | None:
        p = state_of(site, "web01-nightly")
        return p if p and p["state"] == "finished" else None

    assert wait_for("the run's end on the board", finished)["status"] == SUCCESS


def test_a_run_without_a_heartbeat_for_long_is_not_shown_running(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that died leaves its row ``running`` until someone marks it: the board does
    not show it as going on, and looks at its job's lock once, not at every refresh."""
    looked: list[str] = []

    def counted(history: str, job: str) -> Any:
        looked.append(job)
        return job_lock(history, job)

    monkeypatch.setattr(jobs_module, "job_lock", counted)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    run_id = site.history.start("web01-nightly", "backup", long_ago)
    site.history.heartbeat(run_id, long_ago + dt.timedelta(seconds=4), Progress("web01.raw", 1, 2, 1))
    for _ in range(3):
        assert state_of(site, "web01-nightly") is None
    assert looked == ["web01-nightly"]


def test_a_run_followed_that_falls_silent_ends_as_interrupted(site: Site) -> None:
    now = dt.datetime.now(dt.UTC)
    run_id = site.history.start("web01-nightly", "backup", now)
    site.history.heartbeat(run_id, now, Progress("web01.raw", 1, 4, 1))
    p = state_of(site, "web01-nightly")
    assert p is not None and (p["state"], p["percent"]) == ("running", 25.0)
    site.history.heartbeat(run_id, now - dt.timedelta(minutes=1))  # its process stopped beating
    p = state_of(site, "web01-nightly")
    assert p is not None and (p["state"], p["status"]) == ("finished", "interrupted")


def test_a_silent_run_whose_process_holds_its_lock_stays_running(site: Site) -> None:
    """A process slow to write its heartbeats (a busy disk, a paused machine) still holds its
    job's lock: the board keeps it running rather than showing it interrupted, then running
    again. Once the lock is free (the process is gone) the run ends as interrupted."""
    now = dt.datetime.now(dt.UTC)
    run_id = site.history.start("web01-nightly", "backup", now)
    site.history.heartbeat(run_id, now, Progress("web01.raw", 1, 4, 1))
    lock = job_lock(site.history.path, "web01-nightly").acquire(command="vmvault run")
    try:
        p = state_of(site, "web01-nightly")
        assert p is not None and (p["state"], p["percent"]) == ("running", 25.0)
        site.history.heartbeat(run_id, now - dt.timedelta(minutes=1))
        p = state_of(site, "web01-nightly")
        assert p is not None and (p["state"], p["percent"]) == ("running", 25.0)
    finally:
        lock.release()
    p = state_of(site, "web01-nightly")
    assert p is not None and (p["state"], p["status"]) == ("finished", "interrupted")


def test_the_daemons_board_follows_runs_of_other_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's own sync must not end them (its scheduler does not run them) before they end."""
    monkeypatch.setattr(jobs_module, "FOLLOW_SECONDS", 0.0)
    s = make_site(tmp_path / "site")
    try:
        sched = Scheduler(s.config, clock=FakeClock(dt.datetime.now(dt.UTC)), history=s.history, notifiers=[])
        board = ProgressBoard()
        control = DaemonControl(sched, board)
        now = dt.datetime.now(dt.UTC)
        run_id = s.history.start("web01-nightly", "backup", now)
        s.history.heartbeat(run_id, now, Progress("web01.raw", 3, 4, 1))
        for _ in range(2):
            control.sync()
            state = board.state("web01-nightly")
            assert state is not None and (state.state, state.phase, state.percent) == ("running", "web01.raw", 75.0)
        s.history.finish(run_id, now + dt.timedelta(seconds=1), SUCCESS)
        control.sync()
        state = board.state("web01-nightly")
        assert state is not None and (state.state, state.status) == ("finished", SUCCESS)
        sched.close()
    finally:
        close_site(s)


def test_a_job_run_elsewhere_is_stopped_from_the_dashboard(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Stop button (and its API) reach a run in another process through the job history:
    the run stops at its next progress report and says who stopped it."""
    reports = threading.Event()

    def execute_job(config: AutomationConfig, job: Job, progress: ProgressReporter) -> JobOutcome:
        progress.start("web01.raw", 1000)
        for _ in range(1000):  # at most 20 s
            progress.advance(1)
            reports.set()
            time.sleep(0.02)
        return JobOutcome(SUCCESS, message="ran to its end")

    monkeypatch.setattr(scheduler_module, "execute_job", execute_job)
    job = site.config.jobs["web01-nightly"]
    done: list[JobOutcome] = []
    elsewhere = History(site.config.daemon.history)  # the other process's
    other = threading.Thread(
        target=lambda: done.append(run_and_record(site.config, job, elsewhere, SystemClock(), command="vmvault run")[0])
    )
    other.start()
    try:
        assert reports.wait(20)
        wait_for("the run on the board", lambda: (state_of(site, "web01-nightly") or {}).get("state") == "running")
        vera, otto = site.login("vera"), site.login("otto")
        assert 'data-stop-of="web01-nightly">' not in vera.get("/jobs").text  # a viewer has no Stop
        page = otto.get("/jobs").text
        assert re.search(r'action="/jobs/web01-nightly/cancel" data-stop-of="web01-nightly">', page)  # shown
        assert re.search(r'action="/jobs/verify-local/cancel" data-stop-of="verify-local" hidden>', page)
        assert vera.post("/jobs/web01-nightly/cancel", data={"csrf_token": site.csrf(vera)}).status_code == 403
        r = otto.post("/jobs/web01-nightly/cancel", data={"csrf_token": site.csrf(otto)}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/jobs?notice=cancelling&job=web01-nightly"
        other.join(20)
        assert not other.is_alive()
    finally:
        other.join(30)
    (outcome,) = done
    assert outcome.status == FAILED and outcome.error is not None and outcome.error.startswith("cancelled by otto")
    (action,) = site.history.actions(action="cancel")
    assert (action.user, action.target, action.result) == ("otto", "web01-nightly", "requested")
    assert action.details["runs"] == [site.history.runs(job="web01-nightly")[0].id]
    # nothing runs now: the API says so
    r = site.client.post("/api/v1/jobs/web01-nightly/cancel", headers=_auth(site, "otto"))
    assert r.status_code == 202 and r.json() == {"job": "web01-nightly", "state": "not running", "runs": []}
    assert site.client.post("/api/v1/jobs/nosuch/cancel", headers=_auth(site, "otto")).status_code == 404
    assert "Not running; an attempt waiting" in site.login("otto").get("/jobs?notice=not-running").text

"""Catch-up: a firing missed while no daemon ran is run once when a daemon starts again
(backups by default; within ``catch_up_within``; never for a daemon's first start)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from tests.automation.conftest import RecordingNotifier, make_config
from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import FAILED, INTERRUPTED, SUCCESS, History
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import FakeClock, Scheduler
from vmvault.cli import EXIT, main


def at(day: int, hh: int, mm: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hh, mm, tzinfo=dt.UTC)


def backup_job(name: str, schedule: str, extra: str = "") -> str:
    return (
        f'\n[jobs.{name}]\ntype = "backup"\nsource = "/srv/vms/{name}"\nrepository = "r"\n'
        f'schedule = "{schedule}"\n{extra}\n'
    )


class Daemon:
    """Starts and stops schedulers on one history, as `vmvault daemon` restarted would."""

    def __init__(self, config: AutomationConfig) -> None:
        self.config = config
        self.executed: list[tuple[str, dt.datetime]] = []
        self.rec = RecordingNotifier()
        self.outcome = JobOutcome(SUCCESS, message="done")
        self.sched: Scheduler | None = None
        self.clock = FakeClock(at(25, 10))

    def execute(self, _config: AutomationConfig, job: Job) -> JobOutcome:
        self.executed.append((job.name, self.clock.now()))
        return JobOutcome(self.outcome.status, error=self.outcome.error, message=self.outcome.message)

    def start(self, when: dt.datetime) -> Scheduler:
        self.clock.advance(to=when)
        self.sched = Scheduler(
            self.config, clock=self.clock, history=History(self.config.daemon.history), notifiers=[self.rec],
            execute=self.execute,
        )  # fmt: skip
        self.sched.start()
        return self.sched

    def tick(self, when: dt.datetime | None = None) -> None:
        assert self.sched is not None
        if when is not None:
            self.clock.advance(to=when)
        self.sched.tick()
        self.sched.wait_idle(30)

    def stop(self) -> None:
        assert self.sched is not None
        self.sched.close()


def test_a_missed_nightly_backup_runs_once_when_the_daemon_starts_again(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        backup_job("web01", "30 1 * * *")
        + backup_job("db01", "30 1 * * *", "catch_up = false")
        + '\n[jobs.verify]\ntype = "verify"\nrepository = "r"\nschedule = "30 1 * * *"\n',
    )
    d = Daemon(config)
    sched = d.start(at(25, 10))
    assert sched.caught_up == []  # a first start owes nothing
    d.tick()
    assert d.executed == []
    d.stop()

    # down from 26 Nov 00:00 to 27 Nov 05:00: the firings of 26 and 27 Nov 01:30 were missed
    sched = d.start(at(27, 5))
    assert sched.caught_up == [("web01", at(27, 1, 30))]  # the latest only; db01 and verify wait
    d.tick()
    assert d.executed == [("web01", at(27, 5))]
    (run,) = sched.history.runs(job="web01")
    assert run.status == SUCCESS and run.details["catch_up"] == {"missed_firing": "2026-11-27T01:30:00+00:00"}
    (summary,) = d.rec.sent
    assert "caught up:   the firing due 2026-11-27 01:30:00 UTC, missed while no daemon ran" in summary.text()
    assert sched.next_due["web01"] == at(28, 1, 30)
    d.stop()

    # started again the same morning: the caught-up run covers that firing
    sched = d.start(at(27, 6))
    assert sched.caught_up == []
    d.stop()


def test_a_firing_older_than_catch_up_within_is_not_caught_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(
        tmp_path,
        backup_job("weekly", "0 3 * * sun")  # Sunday 29 Nov 03:00
        + backup_job("weekly-4d", "0 3 * * sun", 'catch_up_within = "4d"'),
    )
    d = Daemon(config)
    d.start(at(25, 10))
    d.stop()
    with caplog.at_level(logging.WARNING, "vmvault.automation"):
        sched = d.start(dt.datetime(2026, 12, 2, 9, 0, tzinfo=dt.UTC))  # Wednesday: 3 days 6 hours late
    assert sched.caught_up == [("weekly-4d", dt.datetime(2026, 11, 29, 3, 0, tzinfo=dt.UTC))]
    assert (
        "job weekly: the firing of 2026-11-29 03:00 UTC was missed while no daemon ran, 3d 6h ago: "
        "more than its catch_up_within (1d); not caught up"
    ) in caplog.text
    d.tick()
    assert [name for name, _ in d.executed] == ["weekly-4d"]
    d.stop()


def test_an_interrupted_run_is_caught_up_a_failed_one_is_not(tmp_path: Path) -> None:
    config = make_config(tmp_path, backup_job("a", "30 1 * * *") + backup_job("b", "30 1 * * *"))
    d = Daemon(config)
    d.start(at(25, 10))
    d.stop()
    history = History(config.daemon.history)
    # the 26 Nov firing: a's run died with its daemon (left running), b's failed
    history.start("a", "backup", at(26, 1, 30))
    failed = history.start("b", "backup", at(26, 1, 30))
    history.finish(failed, at(26, 1, 31), FAILED, error="VM not found")
    sched = d.start(at(26, 7))
    assert [r.status for r in history.runs(job="a")] == [INTERRUPTED]
    assert sched.caught_up == [("a", at(26, 1, 30))]
    d.tick()
    assert [name for name, _ in d.executed] == ["a"]
    d.stop()


def test_a_caught_up_firing_still_waits_for_its_window(tmp_path: Path) -> None:
    config = make_config(tmp_path, backup_job("nightly", "0 23 * * *", 'window = "22:00-06:00"'))
    d = Daemon(config)
    d.start(at(25, 10))
    d.stop()
    sched = d.start(at(26, 8))  # the 25 Nov 23:00 firing was missed; the window is shut until 22:00
    assert sched.caught_up == [("nightly", at(25, 23))]
    d.tick()
    assert d.executed == []
    d.tick(at(26, 22))
    assert d.executed == [("nightly", at(26, 22))]
    d.tick(at(26, 23))  # the 26 Nov firing is its own run
    assert d.executed == [("nightly", at(26, 22)), ("nightly", at(26, 23))]
    d.stop()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('catch_up = false\ncatch_up_within = "2d"', "catch_up_within is given but catch_up is false"),
        ('catch_up_within = "10s"', "catch_up_within must be from 60 s"),
        ('catch_up = "yes"', "catch_up must be true or false"),
    ],
)
def test_catch_up_mistakes_are_configuration_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: str, message: str
) -> None:
    make_config(tmp_path, backup_job("web01", "30 1 * * *"))
    path = tmp_path / "vmvault.toml"
    path.write_text(path.read_text() + lines + "\n")
    assert main(["jobs", "--config", str(path)]) == EXIT["usage"]
    err = capsys.readouterr().err
    assert message in err and f"{path}:" in err


def test_catch_up_needs_a_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_config(tmp_path, '[jobs.manual]\ntype = "verify"\nrepository = "r"\n')
    path = tmp_path / "vmvault.toml"
    path.write_text(path.read_text() + "catch_up = true\n")
    assert main(["jobs", "--config", str(path)]) == EXIT["usage"]
    assert "jobs.manual.catch_up needs a schedule" in capsys.readouterr().err

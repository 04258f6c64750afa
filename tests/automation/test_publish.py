"""Status records: the daemon writes its host's record into each repository its jobs use (at
start, after each run, every status_interval), ``vmvault run`` after its run; a repository that
cannot be written never stops a job."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest

from tests.automation.conftest import T0, RecordingNotifier, make_config
from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import History
from vmvault.automation.publish import StatusPublisher
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import FakeClock, Scheduler
from vmvault.backends.local import LocalBackend
from vmvault.repo.repository import Repository
from vmvault.repo.status import read_statuses

PW = "publish-pass"

BODY = """
[jobs.web01]
type = "backup"
source = "/srv/vms/web01"
repository = "r"
schedule = "30 1 * * *"
max_age = "26h"
tags = ["nightly"]

[jobs.check-r]
type = "verify"
repository = "r"
schedule = "0 3 * * *"
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AutomationConfig:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", PW)
    Repository.init(LocalBackend(str(tmp_path / "repo")), PW.encode())
    return make_config(tmp_path, BODY)


def _records(tmp_path: Path) -> list[object]:
    repo = Repository.open(LocalBackend(str(tmp_path / "repo")), PW.encode(), load_index=False)
    try:
        return list(read_statuses(repo).records)
    finally:
        repo.close()


def test_the_daemon_publishes_at_start_and_after_each_run(config: AutomationConfig, tmp_path: Path) -> None:
    history = History(config.daemon.history)
    publisher = StatusPublisher(config, history)
    clock = FakeClock(T0)

    def execute(cfg: AutomationConfig, job: Job) -> JobOutcome:
        return JobOutcome(status="success", snapshot="ab" * 32, bytes=42)

    scheduler = Scheduler(
        config, clock=clock, history=history, notifiers=[RecordingNotifier()], execute=execute, publisher=publisher
    )
    scheduler.tick()
    assert scheduler._publishing is not None
    scheduler._publishing.join(30)
    (first,) = _records(tmp_path)
    assert first.host == socket.gethostname()  # type: ignore[attr-defined]
    jobs = {j["job"]: j for j in first.jobs}  # type: ignore[attr-defined]
    assert set(jobs) == {"web01", "check-r"}
    assert jobs["web01"]["source"] == "/srv/vms/web01" and jobs["web01"]["max_age"] == 26 * 3600
    assert jobs["web01"]["repositories"] == ["r"] and jobs["web01"]["tags"] == ["nightly"]
    # a daemon's first start alerts for nothing: the job has not been due yet
    assert jobs["web01"]["status"] == "never run" and first.alerts == []  # type: ignore[attr-defined]
    # a run: its record follows at once, and the older record is gone
    scheduler.enqueue_now(config.jobs["web01"])
    scheduler.tick()
    scheduler.wait_idle(30)
    (after,) = _records(tmp_path)
    jobs = {j["job"]: j for j in after.jobs}  # type: ignore[attr-defined]
    assert jobs["web01"]["status"] == "success" and jobs["web01"]["last_run"]["snapshot"] == "ab" * 32
    assert after.runs[0]["job"] == "web01" and after.runs[0]["bytes"] == 42  # type: ignore[attr-defined]
    assert after.alerts == []  # type: ignore[attr-defined]
    assert len(list((tmp_path / "repo" / "status").iterdir())) == 1
    # and again after status_interval (600 s by default)
    seq = after.sequence  # type: ignore[attr-defined]
    clock.advance(601)
    scheduler.tick()
    assert scheduler._publishing is not None
    scheduler._publishing.join(30)
    (later,) = _records(tmp_path)
    assert later.sequence > seq  # type: ignore[attr-defined]
    publisher.close()


def test_an_unreachable_repository_never_stops_a_job(
    config: AutomationConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "the wrong passphrase")
    history = History(config.daemon.history)
    publisher = StatusPublisher(config, history)
    with caplog.at_level(logging.WARNING, "vmvault.automation"):
        assert publisher.publish() == {}
    assert "status record for repository r not written" in caplog.text
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", PW)
    assert set(publisher.publish()) == {"r"}  # it tries again, and then it works
    publisher.close()


def test_vmvault_run_publishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vmvault.cli import main
    from vmvault.sample_vm import make_sample_vm

    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", PW)
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    Repository.init(LocalBackend(str(tmp_path / "repo")), PW.encode())
    vm = tmp_path / "vms" / "web01"
    make_sample_vm(str(vm), name="web01", disk_sizes=(1 << 20,), formats=("raw",))
    config = make_config(
        tmp_path, f'[jobs.web01]\ntype = "backup"\nsource = "{vm}"\nrepository = "r"\nmax_age = "1d"\n'
    )
    assert main(["run", "web01", "--config", config.path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "success"
    (record,) = _records(tmp_path)
    assert record.jobs[0]["job"] == "web01" and record.jobs[0]["status"] == "success"  # type: ignore[attr-defined]
    assert os.listdir(tmp_path / "repo" / "status")

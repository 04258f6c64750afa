"""``kill -9`` of a real ``vmvault daemon`` in the middle of a real backup: ``jobs`` and
``history`` say the daemon is gone and the run was interrupted after the time it was seen
running (it used to read "running", then "took 0s"); the next daemon catches the firing up.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.automation.conftest import make_config
from vmvault.automation.history import INTERRUPTED, RUNNING, SUCCESS, WARNING, History, Run
from vmvault.backends.local import LocalBackend
from vmvault.cli import main
from vmvault.repo.repository import Repository
from vmvault.testing.hyperv_lab import LabHost

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def wait_for(what: str, check: object, proc: subprocess.Popen[str], seconds: float = 90) -> Run:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()  # type: ignore[operator]
        if found is not None:
            return found  # type: ignore[no-any-return]
        assert proc.poll() is None, f"the daemon ended while waiting for {what}: {proc.communicate()}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def daemon_proc() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def start_daemon(config: str, procs: list[subprocess.Popen[str]], **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmvault", "daemon", "--config", config],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src"), **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


@pytest.mark.integration
def test_kill_9_of_the_daemon_mid_backup(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    daemon_proc: list[subprocess.Popen[str]],
) -> None:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass", chunk_size=256 * 1024)
    lab = LabHost(str(tmp_path / "host"))
    lab.create_vm("web", (8 * MIB,))
    config = make_config(
        tmp_path,
        f"""
        [jobs.web]
        type = "backup"
        source = "hyperv-lab://{lab.root}/web"
        repository = "r"
        schedule = "0 0 * * *"
        max_age = "26h"
        """,
    )
    # as a daemon that scheduled the job from two days ago until yesterday left the history:
    # today's 00:00 firing was missed, so the next daemon catches it up at once
    history = History(config.daemon.history)
    now = dt.datetime.now(dt.UTC)
    history.watch("web", now - dt.timedelta(days=2), None)
    earlier = history.daemon_started(now - dt.timedelta(days=2), 1, socket.gethostname())
    history.daemon_stopped(earlier, now - dt.timedelta(days=1))
    ok = history.start("web", "backup", now - dt.timedelta(days=1, hours=1))
    history.finish(ok, now - dt.timedelta(days=1, hours=1) + dt.timedelta(seconds=3), SUCCESS)

    # the backup stops inside Hyper-V's checkpoint step for an hour: the daemon is killed there
    proc = start_daemon(config.path, daemon_proc, VMVAULT_LAB_FAULTS="hang-after-checkpoint")

    def beating() -> Run | None:
        run = history.last("web")
        if run is None or run.status != RUNNING or run.heartbeat is None:
            return None
        return run if (run.heartbeat - run.start).total_seconds() >= 4 else None

    running = wait_for("a heartbeat of the caught-up run", beating, proc)
    assert running.details == {}  # not finished: its details come with the end
    assert main(["jobs", "--config", config.path]) == 0
    alive = capsys.readouterr().out
    assert f"daemon: running (pid {proc.pid} on " in alive and "running " in alive
    proc.send_signal(signal.SIGKILL)
    proc.communicate()

    # `jobs` sees no daemon and no live holder of the job: the run was interrupted
    assert main(["jobs", "--config", config.path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["daemon"]["running"] is False and doc["daemon"]["holder"] is None
    assert doc["daemon"]["last"]["pid"] == proc.pid and doc["daemon"]["last"]["stop"] is None
    (job,) = doc["jobs"]
    last = job["last_run"]
    assert job["status"] == INTERRUPTED and last["status"] == INTERRUPTED
    assert last["end"] == last["heartbeat"] and last["seconds"] >= 4  # not "0s"
    assert last["error"].startswith(f"interrupted: `vmvault daemon` (pid {proc.pid} on ")
    assert "stopped before the run finished (seen running for " in last["error"]
    assert "until its last heartbeat" in last["error"]
    assert last["details"]["interrupted"]["last_heartbeat"] == last["heartbeat"]

    assert main(["jobs", "--config", config.path]) == 0
    text = capsys.readouterr().out
    assert "daemon: not running: the last daemon (pid" in text and "did not stop cleanly" in text
    assert "schedules and times: UTC" in text
    assert "interrupted" in text and "at least " in text and " UTC" in text
    assert main(["history", "--config", config.path]) == 0
    text = capsys.readouterr().out
    assert "interrupted" in text and "at least " in text

    # the next daemon catches the firing up (an interrupted run did not do its work); the lab
    # host's leftover checkpoint is cleaned up by that backup, which says so
    proc = start_daemon(config.path, daemon_proc)

    def finished() -> Run | None:
        run = history.last("web")
        return run if run is not None and run.status in (SUCCESS, WARNING) else None

    done = wait_for("the caught-up backup", finished, proc)
    assert done.snapshot is not None and done.details["catch_up"]["missed_firing"].endswith("T00:00:00+00:00")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "missed while no daemon ran; caught up now" in err
    assert main(["jobs", "--config", config.path]) == 0
    assert "daemon: not running (stopped " in capsys.readouterr().out
    assert [r.status for r in history.runs(job="web")] == [done.status, INTERRUPTED, SUCCESS]

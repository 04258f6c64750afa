"""The automation commands: run, jobs, history (--json), copy, and the daemon under SIGTERM."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.automation.conftest import host_zone, make_config
from vmvault.automation.config import load_config
from vmvault.automation.history import History, Progress
from vmvault.automation.locks import job_lock
from vmvault.backends.local import LocalBackend
from vmvault.cli import main
from vmvault.repo.repository import Repository

CS = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass", chunk_size=CS)
    vm = tmp_path / "vms" / "web01"
    vm.mkdir(parents=True)
    (vm / "disk.raw").write_bytes(random.Random(3).randbytes(3 * CS))
    make_config(
        tmp_path,
        f"""
        [sources.web01]
        location = "{vm}"

        [jobs.web01]
        type = "backup"
        source = "web01"
        repository = "r"
        schedule = "30 1 * * *"
        max_age = "26h"

        [jobs.verify]
        type = "verify"
        repository = "r"
        schedule = "0 3 * * sun"
        subset = "50%"
        """,
    )
    return tmp_path / "vmvault.toml", vm


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_run_jobs_and_history(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, vm = setup
    code, doc = run_json(capsys, "run", "web01", "--config", str(config))
    assert code == 0
    assert isinstance(doc, dict) and doc["status"] == "success" and len(doc["snapshot"]) == 64

    vm.rename(vm.with_name("gone"))
    code, doc = run_json(capsys, "run", "web01", "--config", str(config))
    assert code == 13  # a source error, as for `vmvault backup`
    assert isinstance(doc, dict) and doc["status"] == "failed" and "no such file or folder" in doc["error"]

    code, doc = run_json(capsys, "jobs", "--config", str(config))
    assert code == 0 and isinstance(doc, dict)
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert jobs["web01"]["status"] == "failed"  # the last run, not the last success
    assert "no such file or folder" in jobs["web01"]["last_run"]["error"]
    assert jobs["web01"]["last_success"] is not None
    assert jobs["web01"]["schedule"] == "30 1 * * *" and jobs["web01"]["next_run"].endswith(":30:00+00:00")
    assert jobs["verify"]["status"] == "never run" and jobs["verify"]["last_run"] is None

    code, doc = run_json(capsys, "history", "--config", str(config), "--job", "web01")
    assert code == 0 and isinstance(doc, dict)
    assert [r["status"] for r in doc["runs"]] == ["failed", "success"]
    assert doc["runs"][1]["bytes"] > 0 and doc["runs"][1]["end"] is not None
    code, doc = run_json(capsys, "history", "--config", str(config), "--limit", "1")
    assert isinstance(doc, dict) and len(doc["runs"]) == 1

    # the human table names the failure too
    assert main(["jobs", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "web01" in text and "failed" in text and "never run" in text


def test_unknown_job_and_bad_config_are_usage_errors(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config, _vm = setup
    assert main(["history", "--config", str(config), "--job", "nope"]) == 2
    assert "no job 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[jobs.x]\ntype = "backup"\nsource = "/vm"\nrepository = "missing"\n')
    assert main(["jobs", "--config", str(bad)]) == 2
    assert f"{bad}:4: " in capsys.readouterr().err


def test_copy_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    src = Repository.init(LocalBackend(str(tmp_path / "a")), b"pass a", chunk_size=CS)
    Repository.init(LocalBackend(str(tmp_path / "b")), b"pass b", chunk_size=CS)
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "disk.raw").write_bytes(random.Random(4).randbytes(2 * CS))
    from vmvault.engine.backup import backup
    from vmvault.hypervisors.files import FilesSource

    snap = backup(src, FilesSource(str(vm)), tags=["x"]).snapshot
    pw_a = tmp_path / "a.pass"
    pw_a.write_text("pass a\n")
    monkeypatch.setenv("VMVAULT_PASSWORD", "pass b")
    argv = ["copy", "--from", str(tmp_path / "a"), "--to", str(tmp_path / "b"), "--from-password-file", str(pw_a)]
    code, doc = run_json(capsys, *argv, "--tag", "x")
    assert code == 0 and isinstance(doc, dict)
    assert [c["source"] for c in doc["copied"]] == [snap.id] and doc["chunks_added"] == 2
    code, doc = run_json(capsys, *argv)
    assert code == 0 and isinstance(doc, dict) and doc["skipped"] == [snap.id] and doc["blobs_added"] == 0
    # the source's passphrase is required and never taken from the target's
    assert main(["copy", "--from", str(tmp_path / "a"), "--to", str(tmp_path / "b")]) == 2
    assert "source repository needs its own passphrase" in capsys.readouterr().err


@pytest.mark.integration
def test_daemon_stops_cleanly_on_sigterm(setup: tuple[Path, Path]) -> None:
    config, _vm = setup
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmvault", "daemon", "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "next run" in line and "verify" in line:
                break
        assert any("vmvault daemon: 2 jobs" in x for x in lines), lines
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "SIGTERM received" in rest and "stopped" in rest
    # a first start alerts for nothing: no job has been due yet (max_age 26h, never backed up)
    assert "ALERT" not in "".join(lines) + rest
    assert any("job web01: next run " in x and x.rstrip().endswith(":30 UTC") for x in lines), lines


@pytest.fixture
def host_in_new_york() -> Iterator[None]:
    with host_zone("America/New_York"):
        yield


def test_jobs_and_history_read_one_clock_with_its_name(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str], host_in_new_york: None
) -> None:
    """`jobs` printed the schedule in the configured zone beside "next run" in host time."""
    config, _vm = setup
    config.write_text(config.read_text().replace('timezone = "UTC"', 'timezone = "Europe/Berlin"'))
    history = History(str(config.parent / "history.sqlite"))
    start = dt.datetime(2026, 11, 25, 0, 30, tzinfo=dt.UTC)
    quick = history.start("web01", "backup", start)
    history.finish(quick, start + dt.timedelta(seconds=0.23), "success", snapshot="ab" * 32, bytes_=4096)
    slow = history.start("verify", "verify", start + dt.timedelta(hours=2))
    history.finish(slow, start + dt.timedelta(hours=2, seconds=93784), "warning")
    assert main(["jobs", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "daemon: not running (no daemon has run with this history)"
    assert lines[1] == "schedules and times: Europe/Berlin"
    web01 = next(line for line in lines if line.startswith("web01 "))
    # 01:30 in Berlin is the schedule "30 1 * * *": the same clock, named
    assert " 01:30 CET " in web01 and "2026-11-25 01:30 CET" in web01 and " 0.23s " in web01
    assert "EST" not in text and "EDT" not in text
    assert main(["history", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("times: Europe/Berlin\n")
    assert "2026-11-25 01:30:00 CET  0.23s" in text and "2026-11-25 03:30:00 CET  1d 2h 3m 4s" in text
    assert "EST" not in text
    code, doc = run_json(capsys, "history", "--config", str(config))
    assert code == 0 and isinstance(doc, dict) and doc["runs"][1]["seconds"] == 0.23
    assert doc["runs"][1]["start"] == "2026-11-25T00:30:00+00:00"
    code, doc = run_json(capsys, "jobs", "--config", str(config))
    assert code == 0 and isinstance(doc, dict) and doc["timezone"] == "Europe/Berlin"
    assert doc["daemon"]["running"] is False
    web = next(j for j in doc["jobs"] if j["job"] == "web01")
    assert web["next_run"].endswith(":30:00+00:00")  # JSON: ISO 8601 with offset


def test_a_run_going_on_elsewhere_shows_where_it_is(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``vmvault jobs`` and ``history`` while another process runs a job: how far it got at
    its last heartbeat."""
    config, _vm = setup
    history = History(load_config(str(config)).daemon.history)
    lock = job_lock(history.path, "web01").acquire(command="vmvault run")  # the other process's
    try:
        now = dt.datetime.now(dt.UTC)
        run_id = history.start("web01", "backup", now - dt.timedelta(minutes=5))
        history.heartbeat(run_id, now, Progress("disk.raw", 2, 5, 1))
        assert main(["history", "--config", str(config)]) == 0
        assert re.search(r"running 5m( \d+s)?, disk\.raw 40%", capsys.readouterr().out)
        assert main(["jobs", "--config", str(config)]) == 0
        assert "disk.raw 40%" in capsys.readouterr().out
        _code, doc = run_json(capsys, "history", "--config", str(config))
        assert isinstance(doc, dict) and doc["runs"][0]["details"]["progress"]["done"] == 2
    finally:
        lock.release()


#: `vmvault run` in a process of its own, each batch of its backup slowed by a quarter second
#: (as a slow disk would), so another process can cancel it midway
_SLOW_RUN = """
import sys, time
from vmvault.automation import scheduler

real = scheduler.execute_job


class Slow:
    def __init__(self, inner):
        self.inner = inner

    def start(self, label, total):
        self.inner.start(label, total)

    def advance(self, n):
        time.sleep(0.25)
        self.inner.advance(n)

    def finish(self):
        self.inner.finish()

    def warn(self, text):
        self.inner.warn(text)


def execute_job(config, job, progress=None, **kw):
    return real(config, job, progress=Slow(progress), **kw)


scheduler.execute_job = execute_job
from vmvault.cli import main

sys.exit(main(sys.argv[1:]))
"""


def start_slow_run(config: Path, vm: Path, history: History, *args: str) -> subprocess.Popen[str]:
    """`vmvault run web01` in a process of its own (``_SLOW_RUN``) on 64 MiB of new data (16
    batches: 4 s), returned once its attempt is running."""
    (vm / "disk.raw").write_bytes(random.Random(4).randbytes(64 * 1024 * 1024))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, "run", "web01", "--config", str(config), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not history.running_jobs() and proc.poll() is None:
        time.sleep(0.05)
    if history.running_jobs() != ["web01"]:
        proc.kill()
        raise AssertionError(f"the run did not start: {proc.communicate()}")
    return proc


def test_cancel_stops_a_run_in_another_process_and_waits_for_its_end(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, vm = setup
    history = History(load_config(str(config)).daemon.history)
    proc = start_slow_run(config, vm, history, "--json")
    try:
        started = time.monotonic()
        code = main(["cancel", "web01", "--config", str(config), "--reason", "host maintenance"])
        took = time.monotonic() - started
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = capsys.readouterr().out
    assert code == 0, text
    assert re.match(r"web01: run \d+ failed: cancelled by cli:\S+ at .*: host maintenance", text), text
    assert took < 3.5  # it stopped at the next batch, not at the end of the disk
    # the run itself: failed, said who stopped it, exit 130 as after Ctrl-C, not retried
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["status"] == "failed" and doc["attempts"] == 1 and doc["error"].startswith("cancelled by cli:")
    (run,) = history.runs(job="web01")
    assert run.details["cancelled"]["reason"] == "host maintenance"
    (action,) = history.actions(action="cancel")
    assert action.user.startswith("cli:") and action.result == "requested"


def test_cancel_of_a_job_that_is_not_running(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, _vm = setup
    assert main(["cancel", "web01", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == (
        "web01: not running; an attempt the daemon has queued (a retry waiting) will not start"
    )
    code, doc = run_json(capsys, "cancel", "verify", "--config", str(config))
    assert code == 0 and doc == {"job": "verify", "running": False, "runs": []}
    assert main(["cancel", "nope", "--config", str(config)]) == 2
    assert "no job 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["cancel", "web01", "--config", str(config), "--timeout", "0s"])
    assert exc.value.code == 2 and "above zero" in capsys.readouterr().err


def test_cancel_says_when_a_run_has_not_stopped_within_its_wait(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose process never looks (here: a row and a lock held by the test) is reported
    still running after the wait, with where it is, and the exit status says so."""
    config, _vm = setup
    history = History(load_config(str(config)).daemon.history)
    lock = job_lock(history.path, "web01").acquire(command="vmvault run")
    try:
        run_id = history.start("web01", "backup", dt.datetime.now(dt.UTC))
        # (a disk's name comes from the VM folder: it reaches the terminal made safe)
        history.heartbeat(run_id, dt.datetime.now(dt.UTC), Progress("disk\x1b[2J.raw", 1, 4, 1))
        assert main(["cancel", "web01", "--config", str(config), "--timeout", "0.3s"]) == 1
        text = capsys.readouterr().out
        assert "asked to stop, still running after 0.3s (disk" in text and ".raw 25%)" in text
        assert "\x1b" not in text
        assert history.cancel_request(run_id) is not None
        assert main(["cancel", "web01", "--config", str(config), "--no-wait", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["running"] is True and doc["runs"][0]["id"] == run_id
        # what `vmvault jobs` and `history` say of it meanwhile
        assert main(["jobs", "--config", str(config)]) == 0
        assert re.search(r"running [^\n]*25%, stopping: cancelled by cli:", capsys.readouterr().out)
    finally:
        lock.release()


def test_a_run_stopped_by_sigterm_is_recorded_as_interrupted(setup: tuple[Path, Path]) -> None:
    """`vmvault run` under `kill` or `systemctl stop`: the backup undoes what it began, the run
    is recorded interrupted at once (not left running for the next look), exit 130."""
    config, vm = setup
    history = History(load_config(str(config)).daemon.history)
    proc = start_slow_run(config, vm, history)
    try:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (run,) = history.runs(job="web01")
    assert run.status == "interrupted" and run.end is not None
    assert run.error == "interrupted: `vmvault run` was stopped (Ctrl-C or a signal) before the run finished"
    assert not history.running_jobs()


def test_cancel_says_how_each_run_asked_ended_one_line_each(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _vm = setup
    history = History(load_config(str(config)).daemon.history)
    lock = job_lock(history.path, "web01").acquire(command="vmvault run")
    try:
        now = dt.datetime.now(dt.UTC)
        ids = [history.start("web01", "backup", now), history.start("web01", "backup", now)]

        def end_them() -> None:  # as the process running them would, once it saw the request
            while history.cancel_request(ids[-1]) is None:
                time.sleep(0.02)
            for n, run_id in enumerate(ids):
                history.finish(run_id, dt.datetime.now(dt.UTC), "failed", error=f"cancelled by cli:test ({n})")

        ender = threading.Thread(target=end_them)
        ender.start()
        assert main(["cancel", "web01", "--config", str(config)]) == 0
        ender.join(10)
    finally:
        lock.release()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"web01: run {ids[0]} failed: cancelled by cli:test (0)",
        f"web01: run {ids[1]} failed: cancelled by cli:test (1)",
    ]

"""A careless administrator and the daemon: a second daemon on the same configuration, a
``vmvault run`` of a job the daemon is running, and a job history others can read.

Two daemons used to run every job twice (one's retention forgot the other's snapshot);
``history.sqlite`` was 0644 under the default umask.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.automation.conftest import T0, RecordingNotifier, make_config
from vmvault.automation.config import AutomationConfig, Job
from vmvault.automation.history import INTERRUPTED, RUNNING, SUCCESS, History
from vmvault.automation.locks import daemon_lock, job_lock, locks_folder
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import FakeClock, Scheduler
from vmvault.cli import EXIT, main
from vmvault.errors import ConfigError, LockedError

ROOT = Path(__file__).resolve().parents[2]

JOBS = """
[jobs.nightly]
type = "verify"
repository = "r"
schedule = "30 1 * * *"

[jobs.weekly]
type = "verify"
repository = "r"
schedule = "0 3 * * sun"
"""


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


# ---- two daemons -------------------------------------------------------------------------------


def start_daemon(config: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """A real ``vmvault daemon``, returned once it has taken its lock and scheduled its jobs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmvault", "daemon", "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "next run" in line and "weekly" in line:
            return proc, lines
    proc.kill()
    raise AssertionError(f"the daemon did not start: {lines} {proc.communicate()}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    return err


def second_daemon(config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "vmvault", "daemon", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.integration
def test_a_second_daemon_on_the_same_configuration_exits_11(tmp_path: Path) -> None:
    make_config(tmp_path, JOBS)
    config = tmp_path / "vmvault.toml"
    first, _lines = start_daemon(config)
    try:
        again = second_daemon(config)
        assert again.returncode == EXIT["locked"], again.stderr
        err = again.stderr.strip()
        assert err.startswith("vmvault: error: a vmvault daemon for the job history") and err.count("\n") == 0
        assert f"pid {first.pid} " in err and "only one daemon per configuration" in err
        # a copy of the configuration elsewhere names the same history: the same daemon
        copy = tmp_path / "elsewhere" / "copy.toml"
        copy.parent.mkdir()
        shutil.copy(config, copy)
        assert second_daemon(copy).returncode == EXIT["locked"]
        # the first daemon's runs were not touched by the second's start
        assert first.poll() is None
    finally:
        err = stop(first)
    assert first.returncode == 0 and "stopped" in err
    # the lock went with the daemon: a new one starts
    third, _lines = start_daemon(config)
    stop(third, signal.SIGKILL)  # killed: the kernel releases its lock, nothing goes stale
    fourth, _lines = start_daemon(config)
    stop(fourth)
    assert fourth.returncode == 0


def test_in_process_second_scheduler_is_refused_and_leaves_the_first_alone(tmp_path: Path) -> None:
    config = make_config(tmp_path, JOBS)
    history = History(config.daemon.history)
    history.start("nightly", "verify", T0 - dt.timedelta(minutes=5))  # as if the first daemon runs it
    first = Scheduler(config, clock=FakeClock(T0), history=history, notifiers=[])
    first.lock()
    second = Scheduler(config, clock=FakeClock(T0), history=History(config.daemon.history), notifiers=[])
    with pytest.raises(LockedError, match="only one daemon per configuration"):
        second.start()
    assert history.runs()[0].status == RUNNING  # the refused daemon marked nothing
    first.close()
    second.start()
    assert history.runs()[0].status == INTERRUPTED
    second.close()


# ---- the daemon and `vmvault run` ------------------------------------------------------------------


def test_run_of_a_job_the_daemon_is_running_exits_11(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, JOBS)
    started, release = threading.Event(), threading.Event()

    def execute(_config: AutomationConfig, job: Job) -> JobOutcome:
        started.set()
        assert release.wait(30)
        return JobOutcome(SUCCESS, message=f"{job.name} done")

    sched = Scheduler(config, clock=FakeClock(T0), notifiers=[RecordingNotifier()], execute=execute)
    try:
        sched.tick()
        sched.enqueue_now(config.jobs["nightly"])
        sched.tick()
        assert started.wait(30)
        capsys.readouterr()
        code = main(["run", "nightly", "--config", config.path, "--json"])
        assert code == EXIT["locked"]
        out, err = capsys.readouterr()
        assert out == "" and "job 'nightly' is already running" in err and "vmvault daemon" in err
        # the other job is free to run by hand meanwhile (it fails: there is no repository)
        assert main(["run", "weekly", "--config", config.path, "--no-retry", "-q"]) != EXIT["locked"]
    finally:
        release.set()
        sched.wait_idle(30)
        sched.close()
    runs = History(config.daemon.history).runs(job="nightly")
    assert [r.status for r in runs] == [SUCCESS]  # one run, not two


HOLD = textwrap.dedent(
    """
    import sys
    from vmvault.automation.locks import job_lock
    lock = job_lock(sys.argv[1], sys.argv[2]).acquire(command="vmvault run")
    print("held", flush=True)
    sys.stdin.read()
    """
)


@contextlib.contextmanager
def held_elsewhere(history: str, job: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding a job's lock, as a `vmvault run` of it does."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, history, job], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


@pytest.mark.integration
def test_daemon_skips_a_firing_of_a_job_vmvault_run_is_running(tmp_path: Path) -> None:
    config = make_config(tmp_path, JOBS, concurrency=2)
    executed: list[str] = []

    def execute(_config: AutomationConfig, job: Job) -> JobOutcome:
        executed.append(job.name)
        return JobOutcome(SUCCESS, message="ok")

    history = History(config.daemon.history)
    history.start("nightly", "verify", T0)  # the row of the `vmvault run` in progress
    rec = RecordingNotifier()
    sched = Scheduler(config, clock=FakeClock(T0), history=history, notifiers=[rec], execute=execute)
    with held_elsewhere(config.daemon.history, "nightly"):
        sched.start()
        assert history.runs(job="nightly")[0].status == RUNNING  # not marked: it is running
        sched.enqueue_now(config.jobs["nightly"])
        sched.enqueue_now(config.jobs["weekly"])
        sched.tick()
        sched.wait_idle(30)
        assert executed == ["weekly"]
        assert [name for name, _due in sched.skipped_firings] == ["nightly"]
        assert [s.job for s in rec.sent] == ["weekly"]  # a skipped firing notifies nothing
        assert len(history.runs(job="nightly")) == 1
    # once `vmvault run` is gone, the next firing runs (and a row it left running is closed)
    sched.enqueue_now(config.jobs["nightly"])
    sched.tick()
    sched.wait_idle(30)
    sched.close()
    assert executed == ["weekly", "nightly"]
    assert [r.status for r in history.runs(job="nightly")] == [SUCCESS, INTERRUPTED]


@pytest.mark.integration
def test_two_runs_of_one_job_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, JOBS)
    with held_elsewhere(config.daemon.history, "weekly"):
        assert main(["run", "weekly", "--config", config.path]) == EXIT["locked"]
        assert "by `vmvault run`" in capsys.readouterr().err
    assert History(config.daemon.history).runs() == []


# ---- file modes and links ------------------------------------------------------------------------


def test_history_and_locks_are_private_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "state" / "vmvault"
    with umask(0):
        history = History(str(state / "history.sqlite"))
        # keep a connection open so SQLite's -wal and -shm files exist to be looked at
        db = sqlite3.connect(history.path)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            history.start("j", "verify", T0)
            assert mode(history.path) == 0o600
            for suffix in ("-wal", "-shm"):
                assert mode(history.path + suffix) == 0o600, suffix
        finally:
            db.close()
        assert mode(state) == 0o700
        with daemon_lock(history.path).acquire(), job_lock(history.path, "j").acquire():
            folder = locks_folder(history.path)
            assert mode(folder) == 0o700
            assert {mode(os.path.join(folder, n)) for n in os.listdir(folder)} == {0o600}


def test_existing_wide_files_are_tightened(tmp_path: Path) -> None:
    """As an older vmvault (or a umask of 022) left them."""
    path = tmp_path / "history.sqlite"
    History(str(path)).start("j", "verify", T0)
    for suffix in ("", "-wal", "-shm", "-journal"):
        f = Path(str(path) + suffix)
        f.touch()
        f.chmod(0o644)
    folder = Path(locks_folder(str(path)))
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    # an open reader keeps SQLite from removing the -wal and -shm files when History closes
    reader = sqlite3.connect(path)
    try:
        reader.execute("SELECT count(*) FROM runs").fetchone()
        History(str(path))
        for suffix in ("", "-wal", "-shm", "-journal"):
            assert mode(str(path) + suffix) == 0o600, suffix
    finally:
        reader.close()
    with daemon_lock(str(path)).acquire():
        assert mode(folder) == 0o700


def test_an_existing_state_folder_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "etc-vmvault"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    History(str(shared / "history.sqlite"))
    assert mode(shared) == 0o755  # the administrator's folder (e.g. beside the config) is theirs
    assert mode(shared / "history.sqlite") == 0o600


@pytest.mark.parametrize("which", ["", "-wal", "-shm", "-journal"])
def test_links_in_place_of_the_history_files_are_refused(
    tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("do not touch\n")
    victim.chmod(0o644)
    config = make_config(tmp_path, JOBS)
    if which:
        History(config.daemon.history)  # the database itself exists, its side file is a link
    os.symlink(victim, config.daemon.history + which)
    with pytest.raises(ConfigError, match="link"):
        History(config.daemon.history)
    assert main(["jobs", "--config", config.path]) == EXIT["usage"]
    assert "is a link" in capsys.readouterr().err
    assert victim.read_text() == "do not touch\n" and mode(victim) == 0o644


def test_a_link_in_place_of_the_lock_folder_or_a_lock_is_refused(tmp_path: Path) -> None:
    history = str(tmp_path / "history.sqlite")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    os.symlink(elsewhere, locks_folder(history))
    with pytest.raises(ConfigError, match="not a link"):
        daemon_lock(history).acquire()
    assert os.listdir(elsewhere) == [] and mode(elsewhere) == 0o755
    os.unlink(locks_folder(history))
    os.mkdir(locks_folder(history), 0o700)
    victim = tmp_path / "victim"
    victim.write_text("x")
    os.symlink(victim, os.path.join(locks_folder(history), "daemon"))
    with pytest.raises(ConfigError, match=r"the lock file .* is a link"):
        daemon_lock(history).acquire()
    assert victim.read_text() == "x"


# ---- the configuration: empty values and absurd numbers ---------------------------------------------

CONFIG = """\
[daemon]
history = "{history}"
alert_interval = "1h"

[repositories.r]
location = "/srv/repo"
password_env = "PW"

[sources.web]
location = "/vms/web"

[notifications.hook]
type = "webhook"
url = "http://127.0.0.1:9/"

[jobs.nightly]
type = "backup"
source = "web"
repository = "r"
schedule = "30 1 * * *"
retry_delay = "5m"
tags = ["nightly"]

[jobs.nightly.retention]
keep_daily = 7
keep_tags = ["monthly"]
"""

CONFIG_MISTAKES = [
    ('location = "/vms/web"', 'location = ""', "sources.web.location is empty"),
    ('location = "/srv/repo"', 'location = "  "', "repositories.r.location is empty"),
    ('password_env = "PW"', 'password_env = ""', "password_env is empty"),
    ('source = "web"', 'source = ""', "source is empty"),
    ('tags = ["nightly"]', 'tags = ["nightly", ""]', "holds an empty string"),
    ('keep_tags = ["monthly"]', 'keep_tags = ["monthly,"]', "empty tag"),
    ('keep_tags = ["monthly"]', 'keep_tags = [""]', "holds an empty string"),
    ('alert_interval = "1h"', "alert_interval = 0", "from 60 s"),
    ('retry_delay = "5m"', "retry_delay = -5", "from 0 s"),
    ('retry_delay = "5m"', 'retry_delay = "1000000w"', "to 100 years"),
    ('retry_delay = "5m"', "retry_delay = 10000000000000000000", "to 100 years"),
    ('retry_delay = "5m"', 'retry_delay = "5m"\nretries = 1000', "at most 100"),
    ('url = "http://127.0.0.1:9/"', 'url = "http://127.0.0.1:9/"\ntimeout = 0', "from 1 s"),
    ('history = "{history}"', 'history = "{history}"\nconcurrency = 100000', "at most 256"),
    ("keep_daily = 7", "keep_daily = 10000000000", "at most 1000000000"),
]


@pytest.mark.parametrize(("old", "new", "message"), CONFIG_MISTAKES, ids=[m[1] for m in CONFIG_MISTAKES])
def test_configuration_mistakes_are_errors_with_their_line(
    tmp_path: Path, old: str, new: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    good = CONFIG.replace("{history}", str(tmp_path / "h.sqlite"))
    path = tmp_path / "vmvault.toml"
    path.write_text(good)
    assert main(["jobs", "--config", str(path), "-q"]) == 0
    path.write_text(
        good.replace(
            old.replace("{history}", str(tmp_path / "h.sqlite")),
            new.replace("{history}", str(tmp_path / "h.sqlite")),
            1,
        )
    )
    capsys.readouterr()
    assert main(["jobs", "--config", str(path)]) == EXIT["usage"]  # as `daemon` and `run` load it
    err = capsys.readouterr().err
    assert message in err and f"{path}:" in err and err.count("\n") == 1, err

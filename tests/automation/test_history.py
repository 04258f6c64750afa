"""The job history's schema version (PRAGMA user_version) and its migrations."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from vmvault.automation import history as history_module
from vmvault.automation.history import SCHEMA_VERSION, SUCCESS, History, Progress
from vmvault.errors import ConfigError

T0 = dt.datetime(2026, 11, 20, 3, 0, tzinfo=dt.UTC)

#: the tables exactly as vmvault wrote them before it recorded a schema version
_UNVERSIONED = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    type TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    start TEXT NOT NULL,
    end TEXT,
    status TEXT NOT NULL,
    snapshot TEXT,
    bytes INTEGER,
    error TEXT,
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX runs_job_start ON runs (job, start);
CREATE TABLE alerts (job TEXT PRIMARY KEY, since TEXT NOT NULL, message TEXT NOT NULL, notified TEXT);
INSERT INTO runs (job, type, attempt, start, end, status, snapshot, bytes, error, details)
VALUES ('web01', 'backup', 1, '2026-11-19T03:00:00+00:00', '2026-11-19T03:05:00+00:00', 'success',
        '1a2b3c4d', 1048576, NULL, '{"files": 3}');
INSERT INTO alerts (job, since, message, notified)
VALUES ('db', '2026-11-18T00:00:00+00:00', 'late', '2026-11-18T00:01:00+00:00');
"""


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_a_new_history_records_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    History(str(path))
    assert SCHEMA_VERSION >= 1
    assert user_version(path) == SCHEMA_VERSION


def test_a_history_written_before_versions_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_UNVERSIONED)
    db.close()
    assert user_version(path) == 0

    history = History(str(path))
    assert user_version(path) == SCHEMA_VERSION
    (run,) = history.runs(job="web01")
    assert (run.status, run.snapshot, run.bytes, run.details) == (SUCCESS, "1a2b3c4d", 1048576, {"files": 3})
    assert run.seconds == 300
    assert history.open_alert("db", T0, "late") is False  # the old alert is kept, already notified
    new = history.start("web01", "backup", T0)
    history.finish(new, T0 + dt.timedelta(minutes=1), SUCCESS, snapshot="5e6f7a8b")
    assert [r.snapshot for r in history.runs(job="web01")] == ["5e6f7a8b", "1a2b3c4d"]
    History(str(path))  # opening again changes nothing
    assert len(history.runs()) == 2


def test_a_history_from_a_newer_vmvault_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    History(str(path))
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=r"schema version \d+, written by a newer vmvault"):
        History(str(path))
    assert user_version(path) == SCHEMA_VERSION + 1


def test_a_later_migration_runs_once_and_a_failed_one_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.sqlite"
    history = History(str(path))
    run = history.start("web01", "backup", T0)
    history.finish(run, T0, SUCCESS)

    broken = (*history_module._MIGRATIONS, ("ALTER TABLE runs ADD COLUMN host TEXT", "NOT SQL AT ALL"))
    monkeypatch.setattr(history_module, "_MIGRATIONS", broken)
    monkeypatch.setattr(history_module, "SCHEMA_VERSION", len(broken))
    with pytest.raises(ConfigError, match="cannot open the job history"):
        History(str(path))
    assert user_version(path) == SCHEMA_VERSION
    db = sqlite3.connect(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
    db.close()
    assert "host" not in columns  # the whole step was rolled back

    working = (*history_module._MIGRATIONS[:-1], ("ALTER TABLE runs ADD COLUMN host TEXT",))
    monkeypatch.setattr(history_module, "_MIGRATIONS", working)
    History(str(path))
    History(str(path))  # a second open must not add the column again
    assert user_version(path) == len(working)
    db = sqlite3.connect(path)
    assert "host" in [row[1] for row in db.execute("PRAGMA table_info(runs)")]
    db.close()
    assert len(history.runs()) == 1


def test_a_heartbeat_records_where_the_run_is_and_an_interrupted_run_says_it(tmp_path: Path) -> None:
    history = History(str(tmp_path / "h.db"))
    run_id = history.start("web01", "backup", T0)
    history.heartbeat(run_id, T0 + dt.timedelta(seconds=4))  # a sign of life alone
    history.heartbeat(run_id, T0 + dt.timedelta(seconds=8), Progress("web01.raw", 40, 100, 1))
    history.heartbeat(run_id, T0 + dt.timedelta(seconds=12))
    run = history.last("web01")
    assert run is not None and run.heartbeat == T0 + dt.timedelta(seconds=12)
    assert run.progress == Progress("web01.raw", 40, 100, 1) and run.progress.describe() == "web01.raw 40%"
    assert run.to_dict()["details"]["progress"] == {"phase": "web01.raw", "done": 40, "total": 100, "phases": 1}
    assert history.mark_interrupted(T0 + dt.timedelta(minutes=5), job="web01") == 1
    run = history.last("web01")
    assert run is not None and run.error is not None
    assert "until its last heartbeat, in web01.raw 40%)" in run.error


def test_a_finished_run_takes_no_more_heartbeats(tmp_path: Path) -> None:
    history = History(str(tmp_path / "h.db"))
    run_id = history.start("web01", "backup", T0)
    history.finish(run_id, T0 + dt.timedelta(seconds=3), SUCCESS, details={"files": 1})
    history.heartbeat(run_id, T0 + dt.timedelta(seconds=4), Progress("web01.raw", 1, 2, 1))
    run = history.last("web01")
    assert run is not None and run.details == {"files": 1} and run.heartbeat is None


@pytest.mark.parametrize(
    "doc",
    [
        None,
        "web01.raw 40%",
        {"phase": "x", "done": 1, "total": 2},
        {"phase": 7, "done": 1, "total": 2, "phases": 1},
        {"phase": "x", "done": -1, "total": 2, "phases": 1},
        {"phase": "x", "done": "1", "total": 2, "phases": 1},
        {"phase": "x", "done": True, "total": 2, "phases": 1},
    ],
)
def test_a_progress_that_is_not_one_is_none(doc: object) -> None:
    assert Progress.from_dict(doc) is None


def test_a_progress_of_unknown_size_and_a_long_phase_name() -> None:
    p = Progress.from_dict({"phase": "d" * 1000, "done": 5, "total": 0, "phases": 2})
    assert p is not None and p.percent is None and p.describe() == "d" * 200
    assert Progress("x", 7, 5, 1).percent == 100.0

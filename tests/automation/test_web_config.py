"""The ``[web]`` section and ``status_interval``: defaults, paths, and every mistake an error
with its line; the history's activity log and repository samples."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from tests.automation.conftest import T0, make_config
from vmvault.automation.config import DEFAULT_LISTEN, load_config, parse_listen, web_settings
from vmvault.automation.history import SCHEMA_VERSION, History, Sample
from vmvault.errors import ConfigError

JOB = """
[jobs.j]
type = "verify"
repository = "r"
"""


def test_defaults_without_a_web_section(tmp_path: Path) -> None:
    config = make_config(tmp_path, JOB)
    assert config.web is None and config.daemon.status_interval == 600
    settings = web_settings(config)
    assert settings.listen == DEFAULT_LISTEN == "127.0.0.1:8620" and not settings.tls
    assert settings.users == str(tmp_path / "vmvault-users.json")


def test_a_full_web_section(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        JOB
        + """
[web]
listen = "0.0.0.0:8443"
tls_cert = "tls/web.crt"
tls_key = "/etc/vmvault/web.key"
users = "users.json"
session_idle = "15m"
session_max = "8h"
login_attempts = 3
lockout = "30m"
audit = ["/srv/hyperv"]
verify_max_age = "2d"
max_age = "30h"
require_immutable = true
max_connections = 64
max_connections_per_address = 8
client_timeout = "10s"

[web.restore_targets]
scratch = "/srv/restore/"
lab = "/mnt/lab"
""",
    )
    web = config.web
    assert web is not None and web.tls
    assert web.tls_cert == str(tmp_path / "tls" / "web.crt") and web.tls_key == "/etc/vmvault/web.key"
    assert web.users == str(tmp_path / "users.json")
    assert (web.session_idle, web.session_max, web.login_attempts, web.lockout) == (900, 28800, 3, 1800)
    assert web.restore_targets == (("scratch", "/srv/restore"), ("lab", "/mnt/lab"))
    assert web.audit == ("/srv/hyperv",) and web.verify_max_age == 172800 and web.max_age == 108000
    assert web.require_immutable
    assert (web.max_connections, web.max_connections_per_address, web.client_timeout) == (64, 8, 10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[web]\nlisten = "8620"', "web.listen"),
        ('[web]\nlisten = "host:70000"', "out of range"),
        ('[web]\ntls_cert = "a.crt"', "give both tls_cert and tls_key"),
        ('[web]\nlisten = ""', "empty"),
        ('[web]\nsession_idle = "5s"', "from 60 s"),
        ("[web]\nlogin_attempts = 0", "at least 1"),
        ("[web]\nmax_connections = 2", "at least 4"),
        ("[web]\nmax_connections_per_address = 0", "at least 1"),
        ('[web]\nclient_timeout = "0s"', "from 1 s"),
        ('[web]\nmax_age = "soon"', "not a duration"),
        ('[web]\ncolour = "blue"', "unknown key 'colour'"),
        ('[web.restore_targets]\nscratch = "relative/folder"', "absolute folder"),
        ('[web.restore_targets]\nscratch = ""', "empty"),
        ('[daemon]\nstatus_interval = "30s"', r"0 \(off\) or at least 60 s"),
    ],
)
def test_mistakes_name_their_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "vmvault.toml"
    body = f'[repositories.r]\nlocation = "/srv/r"\n{JOB}\n{text}\n'
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    line = next(n for n, t in enumerate(body.splitlines(), 1) if t.strip() == text.splitlines()[-1].strip())
    assert f"vmvault.toml:{line}:" in str(info.value) or f"vmvault.toml:{line - 1}:" in str(info.value)


def test_a_dashboard_needs_no_jobs(tmp_path: Path) -> None:
    path = tmp_path / "vmvault.toml"
    path.write_text('[repositories.r]\nlocation = "/srv/r"\n[web]\n')
    assert load_config(path).jobs == {}
    path.write_text('[repositories.r]\nlocation = "/srv/r"\n')
    with pytest.raises(ConfigError, match="no jobs"):
        load_config(path)


def test_parse_listen() -> None:
    assert parse_listen("[::1]:8620") == ("::1", 8620)
    assert parse_listen("backup.example:443") == ("backup.example", 443)
    for bad in ("", ":80", "[::1]", "a:0", "a:b"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_actions_and_samples(tmp_path: Path) -> None:
    history = History(str(tmp_path / "h.sqlite"))
    history.record_action(T0, "ada", "restore", "/srv/restore/x", "started", address="127.0.0.1",
                          details={"snapshot": "ab"})  # fmt: skip
    history.record_action(T0 + dt.timedelta(minutes=1), "ada", "restore", "/srv/restore/x", "done")
    history.record_action(T0 + dt.timedelta(minutes=2), "vera", "denied", "POST /x", "refused")
    actions = history.actions()
    assert [(a.user, a.result) for a in actions] == [("vera", "refused"), ("ada", "done"), ("ada", "started")]
    assert actions[-1].to_dict() == {
        "id": 1, "time": "2026-11-25T10:03:00+00:00", "user": "ada", "action": "restore",
        "target": "/srv/restore/x", "result": "started", "address": "127.0.0.1", "details": {"snapshot": "ab"},
    }  # fmt: skip
    assert [a.user for a in history.actions(user="vera")] == ["vera"]
    assert len(history.actions(since=T0 + dt.timedelta(seconds=30))) == 2
    history.add_sample(Sample("r", T0, 100, 80, 1, 1000))
    history.add_sample(Sample("r", T0 + dt.timedelta(hours=1), 150, 120, 2, 900))
    history.add_sample(Sample("other", T0, 1, 1, 1, None))
    assert [s.stored for s in history.samples("r")] == [100, 150]
    assert history.samples("r", since=T0 + dt.timedelta(minutes=1))[0].free == 900


def test_a_version_1_history_gains_the_new_tables_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, type TEXT NOT NULL,
           attempt INTEGER NOT NULL DEFAULT 1, start TEXT NOT NULL, end TEXT, status TEXT NOT NULL, snapshot TEXT,
           bytes INTEGER, error TEXT, details TEXT NOT NULL DEFAULT '{}');
           CREATE TABLE alerts (job TEXT PRIMARY KEY, since TEXT NOT NULL, message TEXT NOT NULL, notified TEXT);
           INSERT INTO runs (job, type, start, status) VALUES ('j', 'verify', '2026-11-25T10:00:00+00:00', 'success');
           PRAGMA user_version = 1;"""
    )
    db.close()
    history = History(str(path))
    assert [r.job for r in history.runs()] == ["j"]
    history.record_action(T0, "ada", "login", "ada", "done")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2

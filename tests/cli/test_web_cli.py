"""``vmvault user``, ``vmvault web`` and ``vmvault daemon`` with a ``[web]`` section, as a user
types them: output, exit codes, files written, and real servers that answer and stop."""

from __future__ import annotations

import getpass
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import environment_without_settings
from vmvault.automation.history import History
from vmvault.cli import EXIT, main

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, web: str = "") -> Path:
    path = tmp_path / "vmvault.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            history = "{tmp_path / "history.sqlite"}"

            [repositories.r]
            location = "{tmp_path / "repo"}"

            [jobs.check]
            type = "verify"
            repository = "r"
            schedule = "0 3 * * *"
            """
        )
        + textwrap.dedent(web)
    )
    return path


def test_user_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path))
    pw = tmp_path / "pw"
    pw.write_text("a-good-password\n")
    assert main(["user", "add", "ada", "--role", "admin", "--new-password-file", str(pw), "--config", config]) == 0
    assert "added ada (admin)" in capsys.readouterr().out
    users_file = tmp_path / "vmvault-users.json"
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600 and "a-good-password" not in users_file.read_text()
    assert main(["user", "add", "vera", "--role", "viewer", "--new-password-file", str(pw), "--config", config]) == 0
    capsys.readouterr()
    assert main(["user", "token", "vera", "--label", "nagios", "--config", config, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["token"].startswith(f"vvt_{made['id']}_") and made["token"] not in users_file.read_text()
    assert main(["user", "list", "--config", config, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [u["name"] for u in listed["users"]] == ["ada", "vera"]
    assert [(t["id"], t["label"]) for t in listed["users"][1]["tokens"]] == [(made["id"], "nagios")]
    assert "sha256" not in json.dumps(listed) and "hash" not in json.dumps(listed)
    assert main(["user", "role", "vera", "operator", "--config", config]) == 0
    assert main(["user", "revoke", "vera", made["id"], "--config", config]) == 0
    assert main(["user", "passwd", "vera", "--new-password-file", str(pw), "--config", config]) == 0
    assert main(["user", "remove", "vera", "--config", config]) == 0
    capsys.readouterr()
    # every change is in the activity log, made by this login, with no secret
    actions = History(str(tmp_path / "history.sqlite")).actions()
    me = f"cli:{getpass.getuser()}"
    assert [a.action for a in reversed(actions)] == [
        "user add", "user add", "user token", "user role", "user revoke", "user passwd", "user remove",
    ]  # fmt: skip
    assert {a.user for a in actions} == {me}
    assert made["token"] not in json.dumps([a.to_dict() for a in actions])


def test_user_mistakes_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path))
    # no terminal and no password file
    assert main(["user", "add", "ada", "--role", "admin", "--config", config]) == EXIT["usage"]
    assert "--new-password-file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main(["user", "add", "ada", "--role", "admin", "--new-password-file", str(empty), "--config", config]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["user", "remove", "nobody", "--config", config]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["user", "add", "ada", "--role", "root", "--config", config])
    assert info.value.code == 2


def test_web_refuses_what_it_cannot_serve_safely(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path, "[web]\n"))
    assert main(["web", "--config", config]) == EXIT["usage"]
    assert "no dashboard users" in capsys.readouterr().err
    pw = tmp_path / "pw"
    pw.write_text("a-good-password\n")
    assert main(["user", "add", "ada", "--role", "admin", "--new-password-file", str(pw), "--config", config]) == 0
    assert main(["web", "--config", config, "--listen", "0.0.0.0:8620"]) == EXIT["usage"]
    err = capsys.readouterr().err
    assert "only over TLS" in err and "vmvault web cert" in err and len(err.strip().splitlines()) == 1
    assert main(["web", "--config", config, "--tls-cert", "x.crt"]) == EXIT["usage"]
    assert "give both --tls-cert and --tls-key" in capsys.readouterr().err
    assert main(["web", "--config", config, "--name", "backup example"]) == EXIT["usage"]
    assert "--name: 'backup example' is not a host name" in capsys.readouterr().err


def test_web_cert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    assert main(["web", "cert", "--cert", str(cert), "--key", str(key), "--name", "backup.example", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert re.fullmatch(r"([0-9a-f]{2}:){31}[0-9a-f]{2}", doc["sha256"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and b"BEGIN CERTIFICATE" in cert.read_bytes()
    assert main(["web", "cert", "--cert", str(cert), "--key", str(tmp_path / "k2")]) == EXIT["usage"]
    assert "does not overwrite" in capsys.readouterr().err
    assert main(["web", "cert"]) == EXIT["usage"]
    # the names can come from the configuration's [web]
    (tmp_path / "c").mkdir()
    config = _config(tmp_path / "c", '[web]\ntls_cert = "a.crt"\ntls_key = "a.key"\n')
    assert main(["web", "cert", "--config", str(config)]) == 0
    assert (config.parent / "a.crt").exists() and (config.parent / "a.key").exists()


def _env() -> dict[str, str]:
    env = environment_without_settings()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env["VMVAULT_TEST_CHEAP_KDF"] = "1"
    return env


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(log.read_text())


@pytest.mark.integration
@pytest.mark.parametrize("command", ["web", "daemon"])
def test_the_dashboard_serves_and_stops(tmp_path: Path, command: str) -> None:
    port = _port()
    config = _config(tmp_path, f'[web]\nlisten = "127.0.0.1:{port}"\n')
    pw = tmp_path / "pw"
    pw.write_text("a-good-password\n")
    env = _env()
    subprocess.run(
        [sys.executable, "-m", "vmvault", "init", "-r", str(tmp_path / "repo"), "--insecure-no-encryption"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "vmvault", "user", "add", "ada", "--role", "admin", "--new-password-file", str(pw),
         "--config", str(config)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    token = json.loads(
        subprocess.run(
            [sys.executable, "-m", "vmvault", "user", "token", "ada", "--config", str(config), "--json"],
            env=env,
            check=True,
            capture_output=True,
        ).stdout
    )["token"]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vmvault", command, "--config", str(config)], env=env,
                                stdout=out, stderr=out)  # fmt: skip
    try:
        _wait_for(f"http://127.0.0.1:{port}/login", proc, log)
        rebound = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        rebound.request("GET", "/login", headers={"Host": f"rebound.example:{port}"})
        assert rebound.getresponse().status == 421  # a name that is not the dashboard's (DNS rebinding)
        rebound.close()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/jobs/check/run",
            method="POST",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 202
        history = History(str(tmp_path / "history.sqlite"))
        deadline = time.monotonic() + 60
        while (last := history.last("check")) is None or last.status == "running":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert last.status == "success"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()
    text = log.read_text()
    assert "dashboard on http://127.0.0.1" in text and token not in text and "a-good-password" not in text
    assert "Traceback" not in text
    assert "refused requests for the name 'rebound.example:" in text

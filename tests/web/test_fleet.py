"""Two hosts back up into one repository; one dashboard shows both.

Each host is a separate process tree in a UTS namespace of its own (``unshare --uts``, so
each really has its own host name), with its own configuration, job history and daemon.
Host B's daemon knows nothing of host A; host A's dashboard learns about B only from the
repository: B's snapshots and the status record B's daemon writes there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import environment_without_settings
from vmvault.backends.local import LocalBackend
from vmvault.repo.repository import Repository
from vmvault.sample_vm import make_sample_vm

pytestmark = [pytest.mark.integration, pytest.mark.slow]

pytest.importorskip("starlette", reason="the web extra is not installed: pip install 'vmvault[web]'")

SRC = Path(__file__).resolve().parents[2] / "src"
PASS = "fleet passphrase"


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("hostname") is None:
        return False
    proc = subprocess.run(["unshare", "--uts", "hostname", "probe"], capture_output=True)
    return proc.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = environment_without_settings()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env["VMVAULT_TEST_CHEAP_KDF"] = "1"
    return env


def _as_host(host: str, args: list[str]) -> list[str]:
    """``args`` (a vmvault command) run in a UTS namespace whose host name is ``host``."""
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "vmvault", *args])
    return ["unshare", "--uts", "sh", "-c", f"hostname {host} && exec {command}"]


def _config(root: Path, host: str, repo_name: str, job: str, vm: Path, port: int | None) -> Path:
    web = ""
    if port is not None:
        web = f"""
        [web]
        listen = "127.0.0.1:{port}"
        users = "{root / host / "users.json"}"
        """
    path = root / host / "vmvault.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            history = "{root / host / "history.sqlite"}"
            timezone = "UTC"

            [repositories.{repo_name}]
            location = "{root / "repo"}"
            password_file = "{root / "repo.pass"}"

            [jobs.{job}]
            type = "backup"
            source = "{vm}"
            repository = "{repo_name}"
            schedule = "0 3 * * *"
            max_age = "26h"
            """
        )
        + textwrap.dedent(web)
    )
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    if not _can_unshare():
        pytest.skip("unshare --uts is not permitted here (the fleet test needs root or CAP_SYS_ADMIN)")
    root = tmp_path
    (root / "repo.pass").write_text(PASS + "\n")
    os.environ["VMVAULT_TEST_CHEAP_KDF"] = "1"
    Repository.init(LocalBackend(str(root / "repo")), PASS.encode())
    procs: list[subprocess.Popen[bytes]] = []
    port = _free_port()
    hosts = {}
    for host, repo_name, job, web_port in (
        ("hv-a", "shared", "a-nightly", port),
        ("hv-b", "central", "b-nightly", None),
    ):
        (root / host).mkdir()
        vm = root / host / "vms" / f"vm-{host}"
        make_sample_vm(str(vm), name=f"vm-{host}", disk_sizes=(1 << 20,), formats=("raw",))
        hosts[host] = _config(root, host, repo_name, job, vm, web_port)
    try:
        yield {"root": root, "port": port, "configs": hosts, "procs": procs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _get(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_two_hosts_one_repository_one_dashboard(fleet: dict[str, Any]) -> None:
    root, port, configs, procs = fleet["root"], fleet["port"], fleet["configs"], fleet["procs"]
    env = _env()
    # a dashboard user on host A (the users file is host A's)
    pw = root / "admin.pass"
    pw.write_text("fleet-admin-1\n")
    for args in (
        ["user", "add", "ada", "--role", "admin", "--new-password-file", str(pw), "--config", str(configs["hv-a"])],
    ):
        proc = subprocess.run([sys.executable, "-m", "vmvault", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "user", "token", "ada", "--config", str(configs["hv-a"]), "--json"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    token = json.loads(proc.stdout)["token"]

    # each host backs up its VM, in its own namespace, with its own configuration and history
    for host, job in (("hv-a", "a-nightly"), ("hv-b", "b-nightly")):
        proc = subprocess.run(
            _as_host(host, ["run", job, "--config", str(configs[host])]), env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
    assert (root / "hv-a" / "history.sqlite").exists() and (root / "hv-b" / "history.sqlite").exists()

    # both daemons run; only A serves a dashboard
    for host in ("hv-b", "hv-a"):
        log = open(root / host / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                _as_host(host, ["daemon", "--config", str(configs[host])]), env=env, stdout=log, stderr=log
            )
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            hosts = {h["hostname"]: h for h in _get(base + "/api/v1/hosts", token)["hosts"]}
            if "hv-b" in hosts and hosts["hv-b"]["jobs"]:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, (root / "hv-a" / "daemon.log").read_text()
        time.sleep(0.3)

    assert hosts["hv-a"]["local"] is True and hosts["hv-b"]["local"] is False
    b = hosts["hv-b"]
    assert [j["job"] for j in b["jobs"]] == ["b-nightly"]
    assert b["jobs"][0]["status"] == "success"
    assert b["snapshots"] == 1 and b["reported"] is not None and b["stale"] is False
    assert "shared" in b["repositories"]  # A calls the repository "shared"; B calls it "central"

    vms = {v["name"]: v for v in _get(base + "/api/v1/vms", token)["vms"]}
    assert vms["vm-hv-a"]["hostname"] == "hv-a" and vms["vm-hv-b"]["hostname"] == "hv-b"
    assert vms["vm-hv-b"]["jobs"] == ["b-nightly"]  # from B's status record
    assert vms["vm-hv-b"]["last_run"]["status"] == "success"
    assert vms["vm-hv-b"]["max_age"] == 26 * 3600
    assert all(v["last_good_backup"] is not None for v in vms.values())
    snaps = _get(base + "/api/v1/snapshots", token)["snapshots"]
    assert sorted(s["hostname"] for s in snaps) == ["hv-a", "hv-b"]

    # the status records are in the repository, one per host, sealed
    records = sorted((root / "repo" / "status").iterdir())
    assert len(records) == 2
    assert all(b"hv-b" not in r.read_bytes() and b"b-nightly" not in r.read_bytes() for r in records)

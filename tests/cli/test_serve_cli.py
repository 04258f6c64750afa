"""``vmvault serve`` as a user meets it: a running export read by qemu-img, stopped by SIGTERM; usage errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.test_nbd import make_disk
from vmvault.cli import EXIT, main
from vmvault.engine.nbd import nbd_uri


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    assert main(["init", "-q"]) == 0
    return tmp_path


def compare(a: str, b: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b], capture_output=True)


def _vmvault(*argv: str) -> subprocess.Popen[str]:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.Popen(
        [sys.executable, "-m", "vmvault", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (qemu-utils)")
def test_serve_exports_the_disk_until_sigterm(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = env / "disk.raw"
    make_disk(disk)
    assert main(["backup", str(disk), "-q"]) == 0
    sock = str(env / "serve.sock")
    proc = _vmvault("serve", "latest", "--socket", sock, "--json")
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or lines[-1] != "}\n":  # one indented JSON document, then serving
            lines.append(proc.stdout.readline())
        doc = json.loads("".join(lines))
        assert doc["uri"] == nbd_uri(sock) and doc["disk"] == "disk.raw"
        r = compare(str(disk), doc["uri"])
        assert r.returncode == 0, r.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == EXIT["ok"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(sock)


def test_serve_refuses_unauthenticated_nbd_beyond_loopback(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = env / "disk.raw"
    make_disk(disk)
    assert main(["backup", str(disk), "-q"]) == 0
    capsys.readouterr()
    assert main(["serve", "latest", "--listen", "0.0.0.0:10809"]) == EXIT["usage"]
    err = capsys.readouterr().err
    assert "needs --tls-cert, --tls-key and --tls-client-ca" in err and err.count("\n") <= 2
    # TLS with a server certificate alone encrypts the disk for anyone who connects: refused too
    tls = ["--tls-cert", str(env / "c.pem"), "--tls-key", str(env / "k.pem")]
    assert main(["serve", "latest", "--listen", "0.0.0.0:10809", *tls]) == EXIT["usage"]
    assert "--tls-client-ca" in capsys.readouterr().err
    assert main(["serve", "latest", "--socket", str(env / "s"), "--tls-client-ca", "ca.pem"]) == EXIT["usage"]
    assert main(["serve", "latest", "--listen", "nonsense"]) == EXIT["usage"]
    assert main(["serve", "latest"]) == EXIT["usage"]
    assert main(["serve", "latest", "--socket", str(env / "s"), "--tls-cert", "x"]) == EXIT["usage"]
    assert main(["serve", "latest", "--socket", str(env / "s"), "--disk", "nope"]) == EXIT["usage"]
    (env / "taken").write_text("x")
    assert main(["serve", "latest", "--socket", str(env / "taken")]) == EXIT["usage"]
    assert (env / "taken").read_text() == "x"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (qemu-utils)")
def test_serve_on_loopback_tcp(env: Path) -> None:
    disk = env / "disk.raw"
    make_disk(disk)
    assert main(["backup", str(disk), "-q"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _vmvault("serve", "latest", "--listen", f"127.0.0.1:{port}")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"nbd://127.0.0.1:{port}/" in line, line
        r = compare(str(disk), f"nbd://127.0.0.1:{port}/")
        assert r.returncode == 0, r.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == EXIT["ok"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

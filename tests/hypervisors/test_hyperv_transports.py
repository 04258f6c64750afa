"""How steps reach a host: local PowerShell (against a strict stand-in ``powershell.exe``
that answers with the lab host) and WinRM (against a stand-in pypsrp pipeline)."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import ConfigError, HypervisorError
from vmvault.hypervisors.hyperv import (
    STEPS,
    HyperVSource,
    LocalPowerShell,
    WinRmOptions,
    WinRmTransport,
    script,
    transports,
)
from vmvault.hypervisors.hyperv.session import winrm_or_local
from vmvault.hypervisors.hyperv.transports import MAX_COMMAND_LINE, encoded_command
from vmvault.repo.repository import Repository
from vmvault.testing.hyperv_lab import LabHost

MIB = 1024 * 1024
FAKE = Path(__file__).parent / "fake_powershell.py"


@pytest.fixture
def fake_ps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "powershell.exe"
    exe.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
    exe.chmod(0o755)
    monkeypatch.setenv("VMVAULT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    monkeypatch.setenv("FAKE_PS_MODE", "lab")
    return exe


def sample_params(step: str) -> dict[str, Any]:
    values = {str: "C:\\Hyper-V\\wéb ‚quoted‛ 'name'; Remove-Item C:\\ -Recurse; \"$(x)\"", int: 7, bool: True}
    out: dict[str, Any] = {name: values[kind] for name, kind in STEPS[step].items()}
    for name in ("VmId", "CheckpointId"):
        if name in out:
            out[name] = "5E0A3C1B-8F1D-4F0E-9C57-2B7A1D0C9E11"
    return out


def decoded(step: str, params: dict[str, Any]) -> str:
    return base64.b64decode(encoded_command(step, params)).decode("utf-16-le")


@pytest.mark.parametrize("step", sorted(STEPS))
def test_values_never_enter_the_script_text(step: str) -> None:
    params = sample_params(step)
    text = decoded(step, params)
    for value in params.values():
        if isinstance(value, str):
            assert value not in text
    # they travel as a base64 JSON literal, which cannot leave its single quotes
    literal = text.split("FromBase64String('", 1)[1].split("')", 1)[0]
    assert set(literal) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    assert json.loads(base64.b64decode(literal)) == params
    assert text.endswith("& {\n" + script(step) + "\n} @vmvaultArgs\n")


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_script_fits_windows_command_line(step: str) -> None:
    params = sample_params(step)
    params.update({k: "C:\\" + "very long folder name\\" * 12 for k, t in STEPS[step].items() if t is str})
    argv = LocalPowerShell("powershell.exe").command(step, params)
    assert sum(len(a) + 3 for a in argv) < MAX_COMMAND_LINE - 2000  # room left for longer paths


@pytest.mark.integration
def test_a_lab_backup_through_local_powershell(fake_ps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of a backup and an incremental crosses the -EncodedCommand boundary and
    comes back as UTF-8 JSON, non-ASCII VM name and paths included."""
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    lab = LabHost(str(tmp_path / "lab Ünï"))
    os.makedirs(lab.root)
    lab.create_vm("wéb", (8 * MIB,))
    lab.write("wéb", "scsi0:0", 0, b"\x01" * (3 * MIB))
    monkeypatch.setenv("FAKE_PS_LAB", lab.root)
    repo = Repository.init(MemoryBackend(), b"pw", chunk_size=64 * 1024)
    ps = LocalPowerShell(str(fake_ps))
    first = backup(repo, HyperVSource("hyperv:///wéb", transport=ps))
    assert first.snapshot.vm["name"] == "wéb" and first.snapshot.consistency == "offline"
    lab.write("wéb", "scsi0:0", 5 * MIB, b"\x02" * 4096)
    second = backup(repo, HyperVSource("hyperv:///wéb", transport=ps))
    (disk,) = second.snapshot.disks
    assert disk.stats["incremental"] == 1 and disk.stats["bytes_read"] == 64 * 1024
    out = restore(repo, second.snapshot, str(tmp_path / "r"))
    from vmvault.disk import open_image

    with open_image(out.disks[0]["path"]) as img:
        assert img.read(0, img.size) == lab.read_disk("wéb", "scsi0:0")
    assert not [c for c in lab.model("wéb").checkpoints if c.is_recovery]


@pytest.mark.integration
def test_local_powershell_failures(fake_ps: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ps = LocalPowerShell(str(fake_ps))
    params = sample_params("host_of")
    monkeypatch.setenv("FAKE_PS_MODE", "sleep")
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="within 1 s"):
        ps.run("host_of", params, 1)
    assert time.monotonic() - started < 20
    monkeypatch.setenv("FAKE_PS_MODE", "fail")
    with pytest.raises(HypervisorError, match=r"exited 1: powershell: Access is denied"):
        ps.run("host_of", params, 30)
    monkeypatch.setenv("FAKE_PS_MODE", "latin1")
    with pytest.raises(HypervisorError, match="not UTF-8"):
        ps.run("host_of", params, 30)
    with pytest.raises(HypervisorError, match="needs Windows"):
        LocalPowerShell(str(tmp_path / "nope.exe")).run("host_of", params, 5)


@pytest.mark.integration
def test_the_stand_in_is_as_strict_as_powershell(fake_ps: Path) -> None:
    """What would have caught a script piped to ``-Command -`` or a broken encoding."""
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(fake_ps), *args], capture_output=True, text=True, check=False, timeout=60)

    assert "only -EncodedCommand" in run("-NoProfile", "-NonInteractive", "-Command", "-").stderr
    bad = run("-NoProfile", "-NonInteractive", "-EncodedCommand", "not base64!")
    assert bad.returncode == 1 and "not properly encoded" in bad.stderr
    utf8 = base64.b64encode(script("host_of").encode("utf-8")).decode()  # UTF-8, not UTF-16LE
    assert run("-NoProfile", "-NonInteractive", "-EncodedCommand", utf8).returncode == 1
    broken = base64.b64encode("function f { if ($x { 1 }".encode("utf-16-le")).decode()
    assert "syntax error" in run("-NoProfile", "-NonInteractive", "-EncodedCommand", broken).stderr


# ---- WinRM ---------------------------------------------------------------------------------


class FakePipeline:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.script = ""
        self.params: dict[str, Any] = {}
        self.polls = 0
        self.stopped = False
        self.output: list[Any] = []
        self.had_errors = False
        self.errors: list[str] = []

    def add_script(self, text: str) -> None:
        self.script = text

    def add_parameter(self, name: str, value: Any) -> None:
        self.params[name] = value

    def begin_invoke(self) -> None:
        self.pool.pipelines.append(self)

    @property
    def running(self) -> bool:
        return not self.stopped and self.polls < self.pool.polls_needed

    def poll_invoke(self, timeout: int) -> None:
        assert 1 <= timeout <= 10
        self.polls += 1
        if self.pool.poll_delay:
            time.sleep(self.pool.poll_delay)
        if not self.running:
            self.output = [self.pool.reply]

    def stop(self) -> None:
        self.stopped = True


class FakePool:
    def __init__(self, reply: str, polls_needed: int = 2, poll_delay: float = 0.0) -> None:
        self.reply = reply
        self.polls_needed = polls_needed
        self.poll_delay = poll_delay
        self.kwargs: dict[str, Any] = {}
        self.pipelines: list[FakePipeline] = []

    def __call__(self, kwargs: dict[str, Any]) -> FakePool:
        self.kwargs = kwargs
        return self

    def __enter__(self) -> FakePool:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def powershell(self) -> FakePipeline:
        return FakePipeline(self)


def test_winrm_binds_real_parameters_and_polls() -> None:
    pool = FakePool('{"ok":true,"result":{"host":"HV01","status":"Operating normally","state":"Running"}}')
    t = WinRmTransport("hv01.example", WinRmOptions(scheme="http", auth="kerberos"), pool_factory=pool)
    params = sample_params("host_of")
    assert t.run("host_of", params, 60)["host"] == "HV01"
    (pipe,) = pool.pipelines
    assert pipe.script == script("host_of") and pipe.params == params and pipe.polls == 2
    assert pool.kwargs["port"] == 5985 and pool.kwargs["ssl"] is False and pool.kwargs["auth"] == "kerberos"


def test_winrm_stops_a_step_that_does_not_finish() -> None:
    pool = FakePool("", polls_needed=10**9, poll_delay=0.05)
    t = WinRmTransport("hv01", WinRmOptions(), pool_factory=pool)
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="no answer from hv01 within 1 s; stopped"):
        t.run("host_of", sample_params("host_of"), 1)
    assert pool.pipelines[0].stopped and time.monotonic() - started < 5


def test_winrm_stops_a_host_answering_without_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host taken over sends output without end: it is weighed at every poll and the step
    is stopped past MAX_REPLY (lowered here to 8 MiB), not gathered until the step's time is up."""
    monkeypatch.setattr(transports, "MAX_REPLY", 8 << 20)

    class Endless(FakePipeline):
        def poll_invoke(self, timeout: int) -> None:
            super().poll_invoke(timeout)
            self.output.append("x" * (1 << 20))

    class EndlessPool(FakePool):
        def powershell(self) -> FakePipeline:
            return Endless(self)

    pool = EndlessPool("", polls_needed=10**9)
    t = WinRmTransport("hv01", WinRmOptions(), pool_factory=pool)
    with pytest.raises(HypervisorError, match="hv01 answered more than 8 MiB; stopped"):
        t.run("host_of", sample_params("host_of"), 600)
    assert pool.pipelines[0].stopped and pool.pipelines[0].polls == 9


def test_winrm_errors_are_one_line() -> None:
    class Broken(FakePool):
        def __enter__(self) -> FakePool:
            raise ConnectionRefusedError("[Errno 111] Connection refused")

    t = WinRmTransport("hv01", WinRmOptions(), pool_factory=Broken(""))
    with pytest.raises(HypervisorError, match="host_of on hv01: ConnectionRefusedError"):
        t.run("host_of", sample_params("host_of"), 5)


def test_winrm_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert WinRmOptions().connection_kwargs("h", 30)["port"] == 5986
    assert WinRmOptions().cert_validation is True
    assert WinRmOptions(cert="ignore").cert_validation is False
    assert WinRmOptions(cert="/etc/ca.pem").cert_validation == "/etc/ca.pem"
    with pytest.raises(ConfigError, match="credssp needs https"):
        WinRmOptions(scheme="http", auth="credssp")
    with pytest.raises(ConfigError, match="auth must be one of"):
        WinRmOptions(auth="basic")
    with pytest.raises(ConfigError, match="scheme"):
        WinRmOptions(scheme="ftp")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("VMVAULT_HYPERV_USER", "DOMAIN\\backup")
    t = winrm_or_local("hv01", {"port": "15986", "cert": str(ca), "auth": "NTLM"})
    assert isinstance(t, WinRmTransport)
    kwargs = t.options.connection_kwargs("hv01", 30)
    assert (kwargs["port"], kwargs["cert_validation"], kwargs["auth"], kwargs["username"]) == (
        15986,
        str(ca),
        "ntlm",
        "DOMAIN\\backup",
    )
    with pytest.raises(ConfigError, match="not a CA file"):
        winrm_or_local("hv01", {"cert": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="not a number"):
        winrm_or_local("hv01", {"port": "http"})
    assert isinstance(winrm_or_local("", {}), LocalPowerShell)

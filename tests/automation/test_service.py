"""``vmvault service``: the systemd unit (checked by ``systemd-analyze verify`` where it is
installed) and the Windows task, driven through scripted replies of ``systemctl`` and
``schtasks`` (the Windows side has never run on Windows; the replies follow
https://learn.microsoft.com/en-us/windows/win32/taskschd/schtasks: exit 0, or 1 and an
``ERROR:`` line)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.automation.test_config import BASE as CONFIG
from vmvault.automation import service as svc
from vmvault.automation.service import ServiceSpec, SystemdService, TaskService, daemon_command, systemd_unit, task_xml
from vmvault.cli import main
from vmvault.errors import ConfigError, ServiceError

ROOT = Path(__file__).resolve().parents[2]
NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


class Script:
    """A stand-in for systemctl / schtasks: records every call, answers from a list."""

    def __init__(self, *replies: tuple[int, str, str]) -> None:
        self.replies = list(replies)
        self.calls: list[list[str]] = []
        self.files: dict[str, bytes] = {}

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if "/XML" in argv:  # keep what schtasks would have read
            path = argv[list(argv).index("/XML") + 1]
            self.files[path] = Path(path).read_bytes()
        code, out, err = self.replies.pop(0) if self.replies else (0, "", "")
        return subprocess.CompletedProcess(list(argv), code, out, err)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "etc dir" / "vmvault.toml"
    p.parent.mkdir()
    p.write_text(CONFIG)
    return p


def _directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------------------------- systemd


def test_the_unit_is_the_contrib_unit_with_this_command() -> None:
    spec = ServiceSpec("vmvault", ("/usr/local/bin/vmvault", "daemon", "--config", "/etc/vmvault/vmvault.toml"))
    contrib = (ROOT / "contrib" / "systemd" / "vmvault.service").read_text()
    assert _directives(systemd_unit(spec)) == _directives(contrib)


def _exec_start_argv(unit: str) -> list[str]:
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line.removeprefix("ExecStart="))]


def test_awkward_paths_survive_the_unit_quoting() -> None:
    command = ("/opt/my tools/vmvault", "daemon", "--config", '/etc/a "b" \\c 100% $HOME;x.toml')
    unit = systemd_unit(ServiceSpec("vmvault", command))
    assert _exec_start_argv(unit) == list(command)
    assert "100%%" in unit and "$$HOME" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path, config: Path) -> None:
    unit = tmp_path / "vmvault-ci.service"
    unit.write_text(systemd_unit(ServiceSpec("vmvault-ci", daemon_command(str(config)))))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    broken = tmp_path / "vmvault-broken.service"  # the check can fail: a relative program is refused
    broken.write_text(unit.read_text().replace("ExecStart=/", "ExecStart=x/"))
    done = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Neither a valid executable name nor an absolute path" in done.stderr


def test_the_command_is_checked_and_absolute(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(config.parent)
    command = daemon_command("vmvault.toml", "/usr/bin/vmvault")
    assert command == ("/usr/bin/vmvault", "daemon", "--config", str(config))
    monkeypatch.setattr(sys, "argv", ["/nonexistent/pytest"])
    assert daemon_command(str(config))[:3] == (os.path.abspath(sys.executable), "-m", "vmvault")
    fake = tmp_path / "bin" / "vmvault"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "argv", [str(fake), "service", "install"])
    assert daemon_command(str(config))[0] == str(fake)
    (tmp_path / "bad.toml").write_text("[jobs.x]\n")
    with pytest.raises(ConfigError):
        daemon_command(str(tmp_path / "bad.toml"))
    with pytest.raises(ConfigError, match="PATH"):
        daemon_command(str(config), "no-such-vmvault-program")


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 65, "..", "a\\b"])
def test_names_are_checked(name: str) -> None:
    with pytest.raises(ConfigError, match="service name"):
        ServiceSpec(name, ("/bin/vmvault",))


def test_control_characters_are_refused() -> None:
    with pytest.raises(ConfigError, match="control character"):
        ServiceSpec("vmvault", ("/bin/vmvault", "daemon", "--config", "/etc/x\n[Service]\nExecStartPre=/bin/sh"))


def test_systemd_install_status_uninstall(tmp_path: Path) -> None:
    spec = ServiceSpec("vmvault", ("/usr/bin/vmvault", "daemon", "--config", "/etc/vmvault/vmvault.toml"))
    script = Script()
    service = SystemdService("vmvault", script, str(tmp_path))
    assert service.install(spec, start=True, force=False) == [
        f"wrote {tmp_path}/vmvault.service",
        "enabled vmvault.service and started it",
    ]
    assert script.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "vmvault.service"]]
    unit = tmp_path / "vmvault.service"
    assert unit.read_text() == systemd_unit(spec) and (unit.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["vmvault.service"]  # no temporary file left

    service.install(spec, start=False, force=False)  # the same unit again: fine
    assert script.calls[-1] == ["systemctl", "enable", "vmvault.service"]
    other = ServiceSpec("vmvault", ("/usr/bin/vmvault", "daemon", "--config", "/etc/other.toml"))
    with pytest.raises(ServiceError, match="exists and differs; use --force"):
        service.install(other, start=True, force=False)
    assert unit.read_text() == systemd_unit(spec)
    service.install(other, start=True, force=True)
    assert unit.read_text() == systemd_unit(other)

    script.replies = [(0, "LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\n", "")]
    state = service.status()
    assert state["installed"] == "yes" and state["ActiveState"] == "active" and state["SubState"] == "running"

    calls = len(script.calls)
    assert service.uninstall() == ["stopped and disabled vmvault.service", f"removed {unit}"]
    assert script.calls[calls:] == [
        ["systemctl", "disable", "--now", "vmvault.service"],
        ["systemctl", "daemon-reload"],
    ]
    assert not unit.exists()
    with pytest.raises(ServiceError, match="nothing to uninstall"):
        service.uninstall()


def test_systemd_refusals_are_one_line_errors(tmp_path: Path) -> None:
    spec = ServiceSpec("vmvault", ("/usr/bin/vmvault", "daemon"))
    (tmp_path / "vmvault.service").write_text("[Service]\nExecStart=/usr/bin/someone-elses\n")
    with pytest.raises(ServiceError, match="not written by `vmvault service install`; left alone"):
        SystemdService("vmvault", Script(), str(tmp_path)).uninstall()
    script = Script((1, "", "Failed to connect to bus: No such file or directory\n"))
    with pytest.raises(ServiceError, match="cannot reload systemd's units: systemctl says: Failed to connect to bus"):
        SystemdService("fresh", script, str(tmp_path)).install(spec, start=True, force=False)
    with pytest.raises(ServiceError, match=r"cannot write .*missing/vmvault\.service"):
        SystemdService("vmvault", Script(), str(tmp_path / "missing")).install(spec, start=True, force=False)


# ---------------------------------------------------------------------------------- Windows

WIN_COMMAND = (
    "C:\\Program Files\\Python311\\Scripts\\vmvault.exe",
    "daemon",
    "--config",
    "C:\\ProgramData\\vmvault & co\\vm vault.toml",
)


def test_the_task_definition() -> None:
    doc = ET.fromstring(task_xml(ServiceSpec("vmvault", WIN_COMMAND)).encode("utf-16"))
    assert doc.tag == f"{{{NS['t']}}}Task" and doc.get("version") == "1.2"
    assert doc.findtext("t:RegistrationInfo/t:URI", namespaces=NS) == "\\vmvault\\vmvault"
    assert doc.find("t:Triggers/t:BootTrigger", NS) is not None
    assert doc.findtext("t:Principals/t:Principal/t:UserId", namespaces=NS) == "S-1-5-18"
    settings = {el.tag.split("}")[1]: (el.text or "").strip() for el in doc.find("t:Settings", NS) or []}
    assert settings["ExecutionTimeLimit"] == "PT0S" and settings["MultipleInstancesPolicy"] == "IgnoreNew"
    assert settings["DisallowStartIfOnBatteries"] == "false" and settings["StartWhenAvailable"] == "true"
    interval = doc.findtext("t:Settings/t:RestartOnFailure/t:Interval", namespaces=NS)
    count = doc.findtext("t:Settings/t:RestartOnFailure/t:Count", namespaces=NS)
    assert interval == "PT1M" and count is not None and 1 <= int(count) <= 255  # schema: >= PT1M, unsignedByte
    assert doc.findtext("t:Actions/t:Exec/t:Command", namespaces=NS) == WIN_COMMAND[0]
    args = doc.findtext("t:Actions/t:Exec/t:Arguments", namespaces=NS)
    assert args == 'daemon --config "C:\\ProgramData\\vmvault & co\\vm vault.toml"'
    assert doc.findtext("t:Actions/t:Exec/t:WorkingDirectory", namespaces=NS) == "C:\\ProgramData\\vmvault & co"


def test_a_task_for_an_account() -> None:
    doc = ET.fromstring(task_xml(ServiceSpec("vmvault", WIN_COMMAND, user="HV\\backup<svc>")).encode("utf-16"))
    assert doc.findtext("t:Principals/t:Principal/t:UserId", namespaces=NS) == "HV\\backup<svc>"
    assert doc.findtext("t:Principals/t:Principal/t:LogonType", namespaces=NS) == "Password"


def test_percent_signs_are_refused_in_a_task() -> None:
    with pytest.raises(ConfigError, match="Windows expands it"):
        task_xml(ServiceSpec("vmvault", (*WIN_COMMAND[:3], "C:\\%TEMP%\\x.toml")))


def test_task_install_status_uninstall() -> None:
    spec = ServiceSpec("vmvault", WIN_COMMAND)
    script = Script((0, 'SUCCESS: The scheduled task "\\vmvault\\vmvault" has successfully been created.\n', ""))
    task = TaskService("vmvault", script)
    assert task.install(spec, start=True, force=False) == [
        "created the task \\vmvault\\vmvault (runs at boot as SYSTEM)",
        "started \\vmvault\\vmvault",
    ]
    create, run = script.calls
    xml_path = create[create.index("/XML") + 1]
    assert create == ["schtasks", "/Create", "/TN", "\\vmvault\\vmvault", "/XML", xml_path, "/RU", "SYSTEM"]
    assert run == ["schtasks", "/Run", "/TN", "\\vmvault\\vmvault"]
    raw = script.files[xml_path]
    assert raw.startswith(b"\xff\xfe") and raw.decode("utf-16") == task_xml(spec)  # UTF-16 with its BOM
    assert not os.path.exists(xml_path)  # the temporary definition is gone

    script = Script()
    TaskService("vmvault", script).install(ServiceSpec("vmvault", WIN_COMMAND, "HV\\backup"), start=False, force=True)
    assert script.calls[0][-5:] == ["/RU", "HV\\backup", "/RP", "*", "/F"] and len(script.calls) == 1

    csv_line = (
        '"HV01","\\vmvault\\vmvault","N/A","Running","Interactive/Background","02.12.2026 01:30:00","267009",'
        '"SYSTEM","C:\\Program Files\\Python311\\Scripts\\vmvault.exe daemon --config ..."\n'
    )
    script = Script((0, csv_line, ""), (0, csv_line, ""), (0, "SUCCESS\n", ""), (0, "SUCCESS\n", ""))
    task = TaskService("vmvault", script)
    assert task.status() == {
        "installed": "yes",
        "task": "\\vmvault\\vmvault",
        "status": "Running",
        "next_run": "N/A",
        "last_run": "02.12.2026 01:30:00",
        "last_result": "267009",
    }
    assert script.calls[0] == ["schtasks", "/Query", "/TN", "\\vmvault\\vmvault", "/FO", "CSV", "/V", "/NH"]
    assert task.uninstall() == ["ended \\vmvault\\vmvault", "deleted the task \\vmvault\\vmvault"]
    assert script.calls[2:] == [
        ["schtasks", "/End", "/TN", "\\vmvault\\vmvault"],
        ["schtasks", "/Delete", "/TN", "\\vmvault\\vmvault", "/F"],
    ]


def test_task_refusals_are_one_line_errors() -> None:
    missing = (1, "", "ERROR: The system cannot find the file specified.\n")
    script = Script(missing, missing)
    task = TaskService("vmvault", script)
    assert task.status() == {
        "installed": "no",
        "task": "\\vmvault\\vmvault",
        "schtasks": "ERROR: The system cannot find the file specified.",
    }
    with pytest.raises(ServiceError, match=r"no task .*nothing to uninstall"):
        task.uninstall()
    exists = (1, "", "ERROR: Cannot create a file when that file already exists.\n")
    with pytest.raises(ServiceError, match=r"cannot create the task .*schtasks says: ERROR: Cannot create a file"):
        TaskService("vmvault", Script(exists)).install(ServiceSpec("vmvault", WIN_COMMAND), start=True, force=False)
    with pytest.raises(ServiceError, match="cannot read what schtasks says"):
        TaskService("vmvault", Script((0, "garbage\n", ""))).status()


def test_a_missing_tool_is_a_service_error() -> None:
    with pytest.raises(ServiceError, match="cannot run no-such-tool-vmvault"):
        svc.run_tool(["no-such-tool-vmvault", "x"])


# -------------------------------------------------------------------------------------- CLI


def test_cli_print_install_status(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    units.mkdir()
    script = Script()
    monkeypatch.setattr(svc, "run_tool", script)
    base = ["service", "install", "--kind", "systemd", "--unit-dir", str(units), "--config", str(config)]
    assert main([*base, "--executable", "/usr/bin/vmvault", "--print"]) == 0
    printed = capsys.readouterr().out
    assert f'ExecStart=/usr/bin/vmvault daemon --config "{config}"' in printed and not list(units.iterdir())
    assert main([*base, "--executable", "/usr/bin/vmvault", "--no-start"]) == 0
    assert (units / "vmvault.service").exists() and script.calls[-1] == ["systemctl", "enable", "vmvault.service"]
    capsys.readouterr()
    script.replies = [(0, "LoadState=not-found\nActiveState=inactive\n", "")]
    assert main(["service", "status", "--kind", "systemd", "--name", "other", "--unit-dir", str(units)]) == 3
    assert "installed: no" in capsys.readouterr().out
    assert main(["service", "install", "--kind", "task", "--config", str(config), "--print"]) == 0
    assert "<BootTrigger>" in capsys.readouterr().out


def test_cli_errors_are_one_line(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VMVAULT_CONFIG", raising=False)
    assert main(["service", "install", "--kind", "systemd"]) == 2
    assert "no configuration given" in capsys.readouterr().err
    assert main(["service", "install", "--config", str(config), "--name", "a/b", "--print"]) == 2
    assert "service name" in capsys.readouterr().err
    monkeypatch.setattr(svc, "run_tool", Script((1, "", "Access is denied.\n")))
    code = main(["service", "install", "--kind", "task", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 1 and "Access is denied." in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ what the service runs


def test_install_refuses_what_other_users_can_change(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A root service runs the program and reads the configuration at every boot: whoever can
    change them (or replace them through a folder above) gets root; whoever can read a secret
    file the configuration names gets the repository."""
    units = tmp_path / "units"
    units.mkdir()
    script = Script()
    monkeypatch.setattr(svc, "run_tool", script)
    base = ["service", "install", "--kind", "systemd", "--unit-dir", str(units), "--no-start"]

    def install(cfg: Path, *extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main([*base, "--config", str(cfg), "--executable", "/usr/bin/vmvault", *extra])
        return code, capsys.readouterr().err

    open_folder = tmp_path / "shared"
    open_folder.mkdir()
    open_folder.chmod(0o777)  # not sticky: anyone may rename the configuration away and put theirs
    cfg = open_folder / "vmvault.toml"
    cfg.write_text(CONFIG)
    code, err = install(cfg)
    assert code == 2 and f"{open_folder} is writable by other users (mode 0777)" in err
    assert len(err.strip().splitlines()) == 1 and not list(units.iterdir())
    cfg.chmod(0o666)
    open_folder.chmod(0o755)
    code, err = install(cfg)
    assert code == 2 and f"{cfg} is writable by other users (mode 0666)" in err
    cfg.chmod(0o644)

    program = open_folder / "vmvault"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o777)
    capsys.readouterr()
    assert main([*base, "--config", str(cfg), "--executable", str(program)]) == 2
    assert "is writable by other users (mode 0777)" in capsys.readouterr().err
    program.chmod(0o755)

    secret = tmp_path / "local.pass"
    secret.write_text("correct horse\n")
    secret.chmod(0o644)
    with_secret = open_folder / "secret.toml"
    with_secret.write_text(CONFIG.replace('password_env = "PW"', f'password_file = "{secret}"'))
    assert 'password_env = "PW"' in CONFIG
    code, err = install(with_secret)
    assert code == 2 and f"{secret} (named by {with_secret}): is open to other users (mode 0644): chmod 600" in err
    secret.chmod(0o600)
    os.chown(secret, 4242, 4242)
    code, err = install(with_secret)
    assert code == 2 and "belongs to user id 4242" in err
    os.chown(secret, 0, 0)
    assert not list(units.iterdir()) and script.calls == []

    # a sticky shared folder (/tmp) above is fine: nobody else can rename what root owns in it
    open_folder.chmod(0o1777)
    assert install(with_secret)[0] == 0 and (units / "vmvault.service").exists()
    assert main([*base, "--config", str(cfg), "--executable", str(program), "--print", "--name", "x"]) == 0
    # files of the account the service runs as are its own
    nobody = svc.platform.user_id("nobody")
    assert nobody is not None and svc.platform.user_id("no-such-user-vmvault") is None
    os.chown(secret, nobody, nobody)
    code, err = install(with_secret, "--name", "as-nobody")
    assert code == 2 and f"belongs to user id {nobody}" in err
    assert install(with_secret, "--name", "as-nobody", "--user", "nobody")[0] == 0
    code, err = install(with_secret, "--name", "as-nobody", "--user", "no such user")
    assert code == 2 and "no such account" in err


def test_commands_that_run_jobs_refuse_a_configuration_others_can_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The installer's checks held only for a service it installs: `vmvault daemon` or `run`
    started by hand or from cron, as root, ran whatever a configuration in a folder others may
    write said (its repository, its sources, its secrets). Now they refuse it, and name the
    secrets others could read; commands that only read it (`jobs`) do not."""
    if os.geteuid() != 0:
        pytest.skip("the checks compare owners with root's and this user's ids")
    open_folder = tmp_path / "shared"
    open_folder.mkdir()
    open_folder.chmod(0o777)  # not sticky: anyone may rename the configuration away and put theirs
    cfg = open_folder / "vmvault.toml"
    cfg.write_text(CONFIG)

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main([*argv, "--config", str(cfg)])
        return code, capsys.readouterr().err

    for command in (["run", "nightly"], ["daemon"]):
        code, err = run(*command)
        assert code == 2 and f"{open_folder} is writable by other users (mode 0777); whoever can change it" in err
        assert f"decides what `vmvault {command[0]}` backs up" in err and len(err.strip().splitlines()) == 1
    assert run("jobs")[0] == 0
    open_folder.chmod(0o755)
    secret = tmp_path / "local.pass"
    secret.write_text("correct horse\n")
    secret.chmod(0o644)
    cfg.write_text(CONFIG.replace('password_env = "PW"', f'password_file = "{secret}"'))
    code, err = run("run", "nightly", "--no-retry")
    assert f"vmvault: warning: {secret} (named by {cfg}): is open to other users (mode 0644)" in err
    assert code != 2  # it ran (the job fails: there is no /vms/web01 here)

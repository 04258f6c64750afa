"""``vmvault service``: run ``vmvault daemon`` at boot, as a systemd unit (Linux) or a Task
Scheduler task (Windows) (docs/automation.md, "Running as a service").

Why a scheduled task on Windows and not ``sc.exe create``: a Windows service program must
call ``StartServiceCtrlDispatcher`` and answer the service control manager within 30 seconds,
or the start fails (error 1053). ``vmvault`` is a console program; made a service by
``sc.exe create`` it would need a wrapper (WinSW, NSSM, pywin32) that vmvault does not ship.
A task with a boot trigger runs a console program as ``SYSTEM`` (or a named account) with no
wrapper; the task's settings give what a service would: restart after a failure
(``RestartOnFailure``), no time limit (``ExecutionTimeLimit`` ``PT0S``) and never two
instances (``MultipleInstancesPolicy`` ``IgnoreNew``).

The tools are driven through their documented command lines; a runner stands in for them in
the tests (scripted replies), since the Windows side has never run on Windows:

* ``schtasks /Create /TN NAME /XML FILE /RU SYSTEM [/F]``, ``/Run``, ``/End``, ``/Delete /F``,
  ``/Query /FO CSV /V /NH``: https://learn.microsoft.com/en-us/windows/win32/taskschd/schtasks
  (exit status 0 on success, 1 with an ``ERROR:`` line on stderr otherwise)
* the task XML: https://learn.microsoft.com/en-us/windows/win32/taskschd/task-scheduler-schema
  (``settingsType`` is an ``xs:all``; ``RestartOnFailure`` needs both ``Interval``, at least
  ``PT1M``, and ``Count``, an unsigned byte)
* ``systemctl daemon-reload``, ``enable [--now]``, ``disable [--now]``, ``show -p``: systemctl(1)
"""

from __future__ import annotations

import csv
import io
import ntpath
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from vmvault import platform
from vmvault.automation.config import AutomationConfig, load_config
from vmvault.errors import ConfigError, ServiceError

__all__ = [
    "KINDS",
    "Runner",
    "Service",
    "ServiceSpec",
    "SystemdService",
    "TaskService",
    "check_running_config",
    "check_service_files",
    "daemon_command",
    "default_kind",
    "open_service",
    "run_tool",
    "systemd_unit",
    "task_xml",
]

#: ``systemd``: a unit in /etc/systemd/system; ``task``: a Windows Task Scheduler task
KINDS = ("systemd", "task")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
#: what vmvault writes at the top of a unit, so that uninstall removes only its own
_UNIT_MARK = "# written by `vmvault service install`"
#: the folder of vmvault's tasks in the Task Scheduler library
_TASK_FOLDER = "\\vmvault\\"
#: the well-known SID of LocalSystem
_SYSTEM_SID = "S-1-5-18"

#: runs a tool: its argv in, its completed process (text output) out
Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_tool(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and capture its output; a tool that is not there is a ServiceError."""
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, errors="replace", check=False)
    except OSError as exc:
        raise ServiceError(f"cannot run {argv[0]}: {exc.strerror}") from exc


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    """What a tool said last (its error line), from stderr, else stdout."""
    said = (done.stderr or done.stdout or "").strip().splitlines()
    return said[-1] if said else ""


def default_kind() -> str:
    return "task" if platform.WINDOWS else "systemd"


@dataclass(frozen=True)
class ServiceSpec:
    """One daemon to run at boot: its name and its command line (program first)."""

    name: str
    command: tuple[str, ...]
    user: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"service name {self.name!r}: use letters, digits and _ . @ - (at most 64, starting with "
                "a letter or digit)"
            )
        for arg in (*self.command, self.user or ""):
            if any(ord(c) < 32 or c == "\x7f" for c in arg):
                raise ConfigError(f"{arg!r}: a control character cannot be part of a service's command line")


def daemon_command(config: str, executable: str | None = None) -> tuple[str, ...]:
    """``vmvault daemon --config CONFIG`` with absolute paths: the configuration must load
    (it is checked now, not at the next boot), and the program is ``executable``, else the
    ``vmvault`` being run now, else this Python running ``-m vmvault``."""
    config = os.path.abspath(config)
    load_config(config)
    if executable is None:
        argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        stem = os.path.splitext(os.path.basename(argv0))[0]
        if stem == "vmvault" and os.path.isfile(argv0):
            return (argv0, "daemon", "--config", config)
        return (os.path.abspath(sys.executable), "-m", "vmvault", "daemon", "--config", config)
    if not os.path.isabs(executable):
        found = shutil.which(executable)
        if found is None:
            raise ConfigError(f"--executable {executable}: no such program on PATH; give its absolute path")
        executable = os.path.abspath(found)
    return (executable, "daemon", "--config", config)


# ------------------------------------------------------------------------- what it runs


def _owners(user: str | None) -> set[int]:
    """The accounts that may own what a service running as ``user`` (root by default) runs."""
    uid = platform.user_id(user) if user else None
    return {0} if uid is None else {0, uid}


def check_service_files(command: Sequence[str], config_path: str, user: str | None) -> None:
    """Refuse a service that would run, as root (or ``user``), what another local account can
    change: the program, the Python and vmvault it runs, the configuration; and one whose
    configuration names a secret (password or key file, TLS key) that others can read."""
    if platform.WINDOWS:
        return  # NTFS ACLs are not mode bits; the Task Scheduler runs files under Program Files
    if user and platform.user_id(user) is None:
        raise ConfigError(f"--user {user}: no such account on this host (nothing was installed)")
    owners = _owners(user)
    config = load_config(config_path)
    paths = [command[0], config_path]
    if command[1:3] == ("-m", "vmvault") or os.path.realpath(command[0]) == os.path.realpath(sys.argv[0] or "."):
        import vmvault

        paths.append(os.path.dirname(os.path.abspath(vmvault.__file__)))
    for path in paths:
        why = platform.others_can_change(path, owners)
        if why is not None:
            raise ConfigError(
                f"{path}: {why}; the service would run what they write as {user or 'root'}: "
                "fix the permissions first (nothing was installed)"
            )
    for secret, why in secret_problems(config, owners):
        raise ConfigError(f"{secret} (named by {config_path}): {why}; nothing was installed")


def secret_problems(config: AutomationConfig, owners: set[int]) -> list[tuple[str, str]]:
    """(file, why) for each secret the configuration names (password or key file, TLS key)
    that an account other than ``owners`` could read or change."""
    secrets = [r.password_file for r in config.repositories.values()] + [
        r.key_file for r in config.repositories.values()
    ]
    secrets += [n.password_file for n in config.notifiers.values()]
    secrets += [config.web.tls_key] if config.web is not None else []
    found: list[tuple[str, str]] = []
    for secret in secrets:
        if not secret or platform.WINDOWS:
            continue
        try:
            st = os.stat(secret)
        except OSError:
            continue  # the daemon names a missing file when it needs it
        mode = stat.S_IMODE(st.st_mode)
        why = f"is open to other users (mode {mode:04o}): chmod 600 it" if mode & 0o077 else None
        why = why or platform.others_can_change(secret, owners)
        if why is not None:
            found.append((secret, why))
    return found


def check_running_config(config_path: str, config: AutomationConfig, *, command: str) -> list[str]:
    """Before ``command`` (the daemon, ``run``, the dashboard) runs jobs from the configuration
    at ``config_path``: refuse one that another local account could change (whoever writes it
    decides what is backed up where, and with which secrets, run as this user, often root);
    return warnings for the secrets it names that others could read or change."""
    uid = platform.current_uid()
    if uid is None:
        return []  # Windows: ACLs, not mode bits
    owners = {0, uid}
    why = platform.others_can_change(config_path)
    if why is not None:
        raise ConfigError(
            f"{config_path}: {why}; whoever can change it decides what `vmvault {command}` backs up, where to, "
            "and with which secrets: fix the permissions first (nothing was run)"
        )
    return [f"{secret} (named by {config_path}): {why}" for secret, why in secret_problems(config, owners)]


# ------------------------------------------------------------------------------- systemd


def _systemd_word(arg: str) -> str:
    """One ExecStart word (systemd.service(5), "Command lines"; systemd.unit(5), specifiers):
    ``%`` and ``$`` doubled, quoted with C escapes when it has a space, quote or backslash."""
    word = arg.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(spec: ServiceSpec) -> str:
    """The unit file: the directives of contrib/systemd/vmvault.service, with this command."""
    command = " ".join(_systemd_word(a) for a in spec.command)
    return f"""{_UNIT_MARK}
# vmvault scheduler daemon. Logs: journalctl -u {spec.name}.service
# See docs/automation.md ("Running under systemd").
[Unit]
Description=vmvault backup scheduler
Documentation=file:///usr/share/doc/vmvault/automation.md
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={command}
# SIGTERM: start nothing new, let the running job finish, exit 0
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=6h
Restart=on-failure
RestartSec=30s
StateDirectory=vmvault
User={_systemd_word(spec.user or "root")}
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
# should the host run out of memory, the kernel ends this before any VM
OOMScoreAdjust=500
ProtectSystem=full
PrivateTmp=true
NoNewPrivileges=true

[Install]
WantedBy=multi-user.target
"""


# -------------------------------------------------------------------------------- Windows


def _windows_command_line(args: Sequence[str]) -> str:
    """Arguments as the Microsoft C runtime splits them again (``CommandLineToArgvW`` rules)."""
    for arg in args:
        if "%" in arg:  # the Task Scheduler expands %VARIABLE% in a task's command line
            raise ConfigError(f"{arg!r}: a '%' cannot be part of a task's command line (Windows expands it)")
    return subprocess.list2cmdline(list(args))


def task_xml(spec: ServiceSpec) -> str:
    """The Task Scheduler definition: at boot, as SYSTEM (or ``spec.user``), restarted every
    minute after a failure (up to 255 times), no time limit, one instance, below-normal
    priority (7), started when a boot was missed."""
    program, args = spec.command[0], spec.command[1:]
    _windows_command_line([program])
    if spec.user is None:
        principal = f"<UserId>{_SYSTEM_SID}</UserId>\n      <RunLevel>HighestAvailable</RunLevel>"
    else:
        principal = (
            f"<UserId>{escape(spec.user)}</UserId>\n      <LogonType>Password</LogonType>\n"
            "      <RunLevel>HighestAvailable</RunLevel>"
        )
    workdir = ntpath.dirname(spec.command[-1]) if spec.command[-2:-1] == ("--config",) else ""
    return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>vmvault backup scheduler (vmvault daemon); written by `vmvault service install`</Description>
    <URI>{escape(_TASK_FOLDER + spec.name)}</URI>
  </RegistrationInfo>
  <Triggers>
    <BootTrigger>
      <Enabled>true</Enabled>
    </BootTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      {principal}
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>true</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings>
      <StopOnIdleEnd>false</StopOnIdleEnd>
      <RestartOnIdle>false</RestartOnIdle>
    </IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>false</Hidden>
    <RunOnlyIfIdle>false</RunOnlyIfIdle>
    <WakeToRun>false</WakeToRun>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>7</Priority>
    <RestartOnFailure>
      <Interval>PT1M</Interval>
      <Count>255</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(program)}</Command>
      <Arguments>{escape(_windows_command_line(args))}</Arguments>
      <WorkingDirectory>{escape(workdir)}</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


# ------------------------------------------------------------------------------ installers


class Service(ABC):
    """One installed (or not yet installed) daemon service."""

    def __init__(self, name: str, runner: Runner | None = None) -> None:
        self.name = name
        self._run: Runner = runner or run_tool

    def _tool(self, argv: Sequence[str], doing: str) -> subprocess.CompletedProcess[str]:
        done = self._run(argv)
        if done.returncode != 0:
            detail = _last_line(done) or f"exit status {done.returncode}"
            raise ServiceError(f"cannot {doing}: {argv[0]} says: {detail}")
        return done

    @abstractmethod
    def definition(self, spec: ServiceSpec) -> str:
        """The file that :meth:`install` registers."""

    @abstractmethod
    def install(self, spec: ServiceSpec, *, start: bool, force: bool) -> list[str]:
        """Register ``spec`` (and start it when ``start``); what was done, one line each."""

    @abstractmethod
    def uninstall(self) -> list[str]:
        """Stop and remove the service; what was done."""

    @abstractmethod
    def status(self) -> dict[str, str]:
        """What the system says of the service (``installed``: ``yes``/``no``, and more)."""


class SystemdService(Service):
    def __init__(self, name: str, runner: Runner | None = None, unit_dir: str = "/etc/systemd/system") -> None:
        super().__init__(name, runner)
        self.unit_dir = unit_dir

    @property
    def unit(self) -> str:
        return f"{self.name}.service"

    @property
    def path(self) -> str:
        return os.path.join(self.unit_dir, self.unit)

    def definition(self, spec: ServiceSpec) -> str:
        return systemd_unit(spec)

    def _existing(self) -> str | None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ServiceError(f"cannot read {self.path}: {exc.strerror}") from exc

    def install(self, spec: ServiceSpec, *, start: bool, force: bool) -> list[str]:
        text = self.definition(spec)
        old = self._existing()
        if old is not None and old != text and not force:
            raise ServiceError(f"{self.path} exists and differs; use --force to replace it")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.unit}.", dir=self.unit_dir)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                platform.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            raise ServiceError(f"cannot write {self.path}: {exc.strerror} (run as root)") from exc
        done = [f"wrote {self.path}"]
        self._tool(["systemctl", "daemon-reload"], "reload systemd's units")
        self._tool(["systemctl", "enable", *(["--now"] if start else []), self.unit], f"enable {self.unit}")
        done.append(f"enabled {self.unit}" + (" and started it" if start else " (starts at the next boot)"))
        return done

    def uninstall(self) -> list[str]:
        old = self._existing()
        if old is None:
            raise ServiceError(f"{self.path} does not exist: nothing to uninstall")
        if not old.startswith(_UNIT_MARK):
            raise ServiceError(f"{self.path} was not written by `vmvault service install`; left alone")
        self._tool(["systemctl", "disable", "--now", self.unit], f"stop and disable {self.unit}")
        try:
            os.unlink(self.path)
        except OSError as exc:
            raise ServiceError(f"cannot remove {self.path}: {exc.strerror}") from exc
        self._tool(["systemctl", "daemon-reload"], "reload systemd's units")
        return [f"stopped and disabled {self.unit}", f"removed {self.path}"]

    def status(self) -> dict[str, str]:
        props = "LoadState,ActiveState,SubState,UnitFileState,MainPID"
        out = self._tool(["systemctl", "show", self.unit, f"--property={props}"], f"ask systemd about {self.unit}")
        state = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        installed = state.get("LoadState") == "loaded" and os.path.exists(self.path)
        return {"installed": "yes" if installed else "no", "unit": self.path, **state}


class TaskService(Service):
    @property
    def task(self) -> str:
        return _TASK_FOLDER + self.name

    def definition(self, spec: ServiceSpec) -> str:
        return task_xml(spec)

    def install(self, spec: ServiceSpec, *, start: bool, force: bool) -> list[str]:
        text = self.definition(spec)
        fd, path = tempfile.mkstemp(prefix="vmvault-task-", suffix=".xml")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-16"))  # with its BOM, as the declaration says
            argv = ["schtasks", "/Create", "/TN", self.task, "/XML", path]
            argv += ["/RU", "SYSTEM"] if spec.user is None else ["/RU", spec.user, "/RP", "*"]
            if force:
                argv.append("/F")
            self._tool(argv, f"create the task {self.task}")
        finally:
            os.unlink(path)
        done = [f"created the task {self.task} (runs at boot as {spec.user or 'SYSTEM'})"]
        if start:
            self._tool(["schtasks", "/Run", "/TN", self.task], f"start the task {self.task}")
            done.append(f"started {self.task}")
        return done

    def uninstall(self) -> list[str]:
        if self.status()["installed"] != "yes":
            raise ServiceError(f"there is no task {self.task}: nothing to uninstall")
        done = []
        ended = self._run(["schtasks", "/End", "/TN", self.task])
        if ended.returncode == 0:
            done.append(f"ended {self.task}")
        self._tool(["schtasks", "/Delete", "/TN", self.task, "/F"], f"delete the task {self.task}")
        return [*done, f"deleted the task {self.task}"]

    def status(self) -> dict[str, str]:
        done = self._run(["schtasks", "/Query", "/TN", self.task, "/FO", "CSV", "/V", "/NH"])
        if done.returncode != 0:
            return {"installed": "no", "task": self.task, "schtasks": _last_line(done)}
        rows = [r for r in csv.reader(io.StringIO(done.stdout)) if r]
        if not rows or len(rows[0]) < 7:
            raise ServiceError(f"cannot read what schtasks says of {self.task}: {done.stdout.strip()[:200]!r}")
        # the columns of /V /FO CSV, by position (their headings are localised):
        # HostName, TaskName, Next Run Time, Status, Logon Mode, Last Run Time, Last Result, ...
        row = rows[0]
        return {
            "installed": "yes",
            "task": self.task,
            "status": row[3],
            "next_run": row[2],
            "last_run": row[5],
            "last_result": row[6],
        }


def open_service(kind: str, name: str, *, runner: Runner | None = None, unit_dir: str | None = None) -> Service:
    if kind == "systemd":
        return SystemdService(name, runner, unit_dir or "/etc/systemd/system")
    if kind == "task":
        return TaskService(name, runner)
    raise ConfigError(f"unknown service kind {kind!r}; choose one of {', '.join(KINDS)}")

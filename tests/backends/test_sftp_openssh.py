"""The SFTP backend's OpenSSH transport (``ssh -s sftp`` children) against a real sshd on
loopback: nothing from the location or the user's ssh configuration reaches ssh as an option,
children never outlive their connection, and paramiko takes over where ssh cannot serve."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import environment_without_settings
from tests.servers import SshServer
from vmvault.backends._openssh import command, unsafe_reason
from vmvault.backends._retry import RetryPolicy
from vmvault.backends.sftp import SftpBackend, open_sftp
from vmvault.errors import BackendError, BackendPermissionError, ConfigError

pytestmark = pytest.mark.integration

SSH = shutil.which("ssh") or "ssh"


def backend(server: SshServer, path: str, **options: object) -> SftpBackend:
    b = server.open_backend(path, **options)
    assert isinstance(b, SftpBackend)
    return b


def ssh_children() -> dict[int, str]:
    """This process's child processes named ssh, with their state (Z: ended, not reaped)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                head, tail = fh.read().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        if head.split("(", 1)[1] == "ssh" and int(fields[1]) == os.getpid():
            found[int(entry)] = fields[0]
    return found


def wait_for_children(count: int) -> dict[int, str]:
    deadline = time.monotonic() + 5
    while len(children := ssh_children()) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return children


# --- what reaches ssh ------------------------------------------------------------------------


def test_command_line_holds_only_vmvault_options(tmp_path: Path) -> None:
    known = tmp_path / "with space" / "known_hosts"
    argv = command(
        SSH, "backup.example", 2222, "vault", [str(tmp_path / "key")], str(known), use_agent=False, timeout=7
    )
    assert argv[:3] == [SSH, "-F", "none"]
    # the host comes after "--", so it can never be read as an option; the subsystem last
    assert argv[-3:] == ["--", "backup.example", "sftp"]
    options = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv[:-3]) if arg == "-o")
    assert options["UserKnownHostsFile"] == f'"{known}"'  # quoted: ssh splits at spaces
    assert options["IdentityFile"] == f'"{tmp_path / "key"}"'
    assert options["StrictHostKeyChecking"] == "yes" and options["BatchMode"] == "yes"
    assert options["IdentitiesOnly"] == "yes" and options["IdentityAgent"] == "none"
    assert options["ProxyCommand"] == "none" and options["PermitLocalCommand"] == "no"
    assert options["GlobalKnownHostsFile"] == "none" and options["ConnectTimeout"] == "7"
    with_agent = command(SSH, "h", 22, "u", [], str(known), use_agent=True, timeout=1)
    assert "IdentityAgent=SSH_AUTH_SOCK" in with_agent and "IdentitiesOnly=no" in with_agent
    # no key file: "none", or ssh would add its default ~/.ssh/id_* on its own
    assert "IdentityFile=none" in with_agent


HOSTILE = [
    ("host", "-oProxyCommand=touch {marker}"),
    ("host", "-F/tmp/config"),
    ("user", "%d"),
    ("user", "-oLocalCommand=touch {marker}"),
    ("known_hosts", "{tmp}/known-%h"),
    ("known_hosts", "{tmp}/${{HOME}}/known"),
    ("known_hosts", '{tmp}/quo"te'),
    ("key_filename", "{tmp}/key\nProxyCommand touch {marker}"),
]


@pytest.mark.parametrize(("field", "value"), HOSTILE)
def test_names_ssh_would_interpret_never_reach_it(tmp_path: Path, field: str, value: str) -> None:
    marker = tmp_path / "marker"
    value = value.format(marker=marker, tmp=tmp_path)
    settings: dict[str, object] = {"known_hosts": str(tmp_path / "known_hosts"), "retry": RetryPolicy(attempts=1)}
    if field == "key_filename":
        Path(value).parent.mkdir(parents=True, exist_ok=True)
        Path(value).write_text("not a key")
    host = value if field == "host" else "127.0.0.1"
    if field != "host":
        settings[field] = value
    reason = unsafe_reason(host, str(settings.get("user", "vault")), [str(settings["known_hosts"]), value])
    assert reason is not None
    user = value if field == "user" else "u"
    with pytest.raises(ValueError):
        command(SSH, host, 22, user, [], "/k" if field == "host" else value, use_agent=False, timeout=1)
    # asked for, ssh is refused in one line that names the way out
    with pytest.raises(ConfigError, match="transport=paramiko"):
        SftpBackend(host, "/repo", transport="openssh", **settings)  # type: ignore[arg-type]
    # by default paramiko carries it, where these are plain names, and nothing runs
    b = SftpBackend(host, "/repo", port=1, **settings)  # type: ignore[arg-type]
    assert b.transport == "paramiko"
    with pytest.raises(BackendError):
        b.exists("config")
    assert not marker.exists()


def test_user_ssh_configuration_is_not_read(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ~/.ssh/config that runs commands and trusts any host changes nothing."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    marker = tmp_path / "marker"
    (home / ".ssh" / "config").write_text(
        "Host *\n"
        f"  ProxyCommand sh -c 'touch {marker}; exec nc %h %p'\n"
        "  PermitLocalCommand yes\n"
        f"  LocalCommand touch {marker}\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
    )
    monkeypatch.setenv("HOME", str(home))
    # known_hosts in a folder with a space: quoted for ssh, which would split it
    spaced = tmp_path / "with space"
    spaced.mkdir()
    shutil.copy(sshd_server.known_hosts, spaced / "known_hosts")
    with backend(sshd_server, "no-config", known_hosts=str(spaced / "known_hosts"), transport="openssh") as b:
        b.put("config", b"ok")
        assert b.get("config") == b"ok"
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    b = backend(sshd_server, "no-config", known_hosts=str(empty), transport="openssh")
    with pytest.raises(BackendPermissionError, match="not in"):
        b.exists("config")
    assert not marker.exists()
    assert empty.read_text() == ""


def test_a_key_others_can_read_is_named(sshd_server: SshServer, tmp_path: Path) -> None:
    """ssh ignores a private key that others can read (paramiko would use it): the refusal
    says so, with the command that fixes it."""
    key = tmp_path / "id_open"
    shutil.copy(sshd_server.client_key, key)
    key.chmod(0o644)
    b = backend(sshd_server, "open-key", key_filename=str(key), transport="openssh")
    with pytest.raises(BackendPermissionError, match=f"chmod 600 {key}"):
        b.exists("config")


# --- children and failures -------------------------------------------------------------------


def test_children_are_reaped_after_drops_hangs_and_close(sshd_server: SshServer) -> None:
    assert ssh_children() == {}
    b = backend(sshd_server, "children", connections=3, timeout=1.5, transport="openssh")
    b.retry = RetryPolicy(attempts=6, initial_delay=0.05, max_delay=0.2)
    b.put("data/00/x", b"payload")
    with b._pool.connection(), b._pool.connection(), b._pool.connection():
        pass
    children = wait_for_children(3)
    assert len(children) == 3 and set(children.values()) <= {"S", "R"}
    # a killed child: the next operations reconnect, the dead one is reaped
    killed = next(iter(children))
    os.kill(killed, signal.SIGKILL)
    for _ in range(4):
        assert b.get("data/00/x") == b"payload"
    assert killed not in ssh_children()
    # a hung child (stopped), the one the pool hands out next: the operation times out and is
    # retried on another connection; the stopped process is killed and reaped
    following = b._pool._idle[-1].child
    assert following is not None
    hung = following.process.pid
    os.kill(hung, signal.SIGSTOP)
    started = time.monotonic()
    assert b.get("data/00/x") == b"payload"
    assert time.monotonic() - started < 30
    assert hung not in ssh_children()
    b.close()
    assert wait_for_children(0) == {}, "close() left ssh processes behind"


_HOLDER = """
import sys, time
from vmvault.backends.sftp import open_sftp
b = open_sftp(sys.argv[1], key_filename=sys.argv[2], known_hosts=sys.argv[3], use_agent=False, look_for_keys=False,
              transport="openssh", connections=2)
b.put("data/00/x", b"x")
with b._pool.connection() as one, b._pool.connection() as two:
    print(one.child.process.pid, two.child.process.pid, flush=True)
time.sleep(600)
"""


def test_ssh_children_end_when_vmvault_is_killed(sshd_server: SshServer) -> None:
    """kill -9 of vmvault: each ssh reads the end of its input and exits (nothing is left
    connected to the server)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _HOLDER,
            sshd_server.url("killed"),
            str(sshd_server.client_key),
            str(sshd_server.known_hosts),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 2
        for pid in pids:
            assert _state(pid) in ("S", "R")
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while any(_state(pid) not in (None, "Z") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_state(pid) in (None, "Z") for pid in pids), "ssh outlived the killed vmvault"


def _state(pid: int) -> str | None:
    """A process's state letter (Z: ended, not yet reaped), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_without_ssh_paramiko_carries_the_connections(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh here
    with backend(sshd_server, "no-ssh") as b:
        assert b.transport == "paramiko"
        b.put("config", b"ok")
        assert b.get("config") == b"ok"
    with pytest.raises(ConfigError, match="no ssh client"):
        backend(sshd_server, "no-ssh", transport="openssh")


def test_an_ssh_without_vmvaults_options_is_not_used(
    sshd_server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenSSH too old for an option vmvault sets (``ssh -G`` refuses it): paramiko instead."""
    fake = tmp_path / "ssh"
    fake.write_text(
        "#!/bin/sh\necho 'command-line line 0: Bad configuration option: knownhostscommand' >&2\nexit 255\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with backend(sshd_server, "old-ssh") as b:
        assert b.transport == "paramiko"
        b.put("config", b"ok")
    with pytest.raises(ConfigError, match="Bad configuration option: knownhostscommand"):
        backend(sshd_server, "old-ssh", transport="openssh")


@pytest.mark.parametrize(
    ("query", "known", "code", "words"),
    [
        ("?transport=openssh", "empty", 1, "is not in"),  # an unknown host: an error, not retried
        ("?transport=openssh", "good", 0, ""),
        ("?transport=ssh", "good", 2, "transport must be one of"),
    ],
)
def test_the_command_line_gives_one_line_and_the_documented_code(
    sshd_server: SshServer, tmp_path: Path, query: str, known: str, code: int, words: str
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("" if known == "empty" else sshd_server.known_hosts.read_text())
    env = environment_without_settings()
    env.update(
        VMVAULT_PASSWORD="openssh transport test",
        VMVAULT_TEST_CHEAP_KDF="1",
        VMVAULT_SFTP_KEY=str(sshd_server.client_key),
    )
    env["VMVAULT_SFTP_KNOWN_HOSTS"] = str(known_hosts)
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "-r", sshd_server.url(f"cli-{known}") + query, "-q", "init"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr
    if words:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_transport_in_the_location(tmp_path: Path) -> None:
    assert open_sftp("sftp://nas.example/srv/repo?transport=paramiko").transport == "paramiko"
    assert open_sftp("sftp://nas.example/srv/repo").transport == "openssh"
    with pytest.raises(ConfigError, match="transport must be one of"):
        open_sftp("sftp://nas.example/srv/repo?transport=telnet")

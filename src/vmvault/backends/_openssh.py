"""SSH for ``sftp://`` carried by OpenSSH's ``ssh`` client in a child process.

Why: paramiko encrypts and decrypts the SSH transport in Python, holding the GIL, so a restore
from SFTP spent twice the CPU of a local one in the restoring process. An ``ssh -s sftp``
child does that work in C, in a process of its own, on any core; vmvault's SFTP client
(``_sftp_wire``) speaks SFTP over a socket pair whose other end is the child's stdin and stdout.

Security: the server is untrusted, and so is anything that could reach ssh's command line.
ssh reads no configuration file (``-F none``), asks nothing (``BatchMode``), trusts only the
repository's known_hosts file (``StrictHostKeyChecking``, no global file, no DNS, no host key
updates), offers only the keys vmvault names, and every option that runs a command, forwards
anything or shares a connection is off. The host, user and file names vmvault passes are
checked first (:func:`unsafe_reason`): ssh reads ``-`` at the start of an argument as an
option and expands ``%`` tokens, ``${VAR}`` and quotes in file names, so a location that
needs any of those is not given to ssh (the paramiko transport takes it, or it is refused).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

__all__ = ["ChildChannel", "SshFailure", "command", "find_ssh", "refusal", "spawn", "unsafe_reason"]

#: a DNS name or an IPv4/IPv6 literal (urlsplit drops an IPv6 literal's brackets); a zone
#: index (``%eth0``) is left to paramiko
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
#: user names as systems make them (Windows domains included), never an option or a token
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@\\-]*")
#: characters ssh would read in a file name: % tokens, ${VAR}, quotes, escapes, line breaks
_PATH_UNSAFE = re.compile(r"[%$\"'\\\x00-\x1f\x7f]")

#: AES-GCM first: with AES-NI the cheapest of OpenSSH's ciphers per byte ('^' puts these at
#: the head of ssh's own list, which stays for servers without them)
_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"

#: the options vmvault sets, whatever the location says; ssh takes the first value it reads
_FIXED_OPTIONS = {
    "BatchMode": "yes",
    "StrictHostKeyChecking": "yes",
    "GlobalKnownHostsFile": "none",
    "KnownHostsCommand": "none",
    "UpdateHostKeys": "no",
    "VerifyHostKeyDNS": "no",
    "CheckHostIP": "no",
    "CanonicalizeHostname": "no",
    "PubkeyAuthentication": "yes",
    "PasswordAuthentication": "no",
    "KbdInteractiveAuthentication": "no",
    "HostbasedAuthentication": "no",
    "GSSAPIAuthentication": "no",
    "PKCS11Provider": "none",
    "AddKeysToAgent": "no",
    "ProxyCommand": "none",
    "ProxyJump": "none",
    "PermitLocalCommand": "no",
    "ControlMaster": "no",
    "ControlPath": "none",
    "ForwardAgent": "no",
    "ForwardX11": "no",
    "ClearAllForwardings": "yes",
    "Tunnel": "no",
    "RequestTTY": "no",
    "EscapeChar": "none",
    "Compression": "no",
    "Ciphers": _CIPHERS,
    # debug1 is the level that names the key the server offered ("Server host key: TYPE FP"),
    # which the refusal of an unknown host shows; the reader below keeps only what it needs
    "LogLevel": "DEBUG1",
}

#: glibc's malloc gives buffers over its (adaptive) threshold their own mappings and returns
#: them at once; ssh's channel buffers grow and shrink by a packet's size all the time, so each
#: new mapping is paid again in page faults. Kept in the heap, 256 MiB read from loopback as
#: 8 MiB ranges over 4 connections took a third less of ssh's CPU (0.82-0.88 against 1.24-1.31 s).
#: Other C libraries ignore the variable.
_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"

#: lines of ssh's error output kept per connection (the end of it says why it stopped)
_KEPT_LINES = 40


def find_ssh() -> str | None:
    """The ``ssh`` client on PATH, on systems where a socket can be a child's stdin/stdout."""
    if os.name != "posix":
        return None
    return shutil.which("ssh")


@functools.lru_cache(maxsize=8)
def refusal(ssh: str) -> str | None:
    """Why this ssh cannot be used (an older OpenSSH that lacks an option vmvault sets, or no
    OpenSSH at all), or None. ``ssh -G`` checks the options without connecting anywhere."""
    argv = command(ssh, "vmvault.invalid", 22, "vmvault", [], "/dev/null", use_agent=False, timeout=1)
    probe = [*argv[: argv.index("-p")], "-G", "vmvault.invalid"]
    try:
        result = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=10, env={"LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{ssh} could not be run ({exc})"
    if result.returncode != 0:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"{ssh} refuses vmvault's options ({lines[-1] if lines else f'exit status {result.returncode}'})"
    if b"\nbatchmode yes\n" not in result.stdout.lower():
        return f"{ssh} did not show the configuration it would use, as OpenSSH's client does"
    return None


def unsafe_reason(host: str, user: str, paths: Sequence[str]) -> str | None:
    """Why these names cannot be handed to ssh as they are (None: they can)."""
    if not _HOST.fullmatch(host):
        return f"the host name {host!r} is not a plain DNS name or IP address"
    if not _USER.fullmatch(user):
        return f"the user name {user!r} has characters ssh would interpret"
    for path in paths:
        if _PATH_UNSAFE.search(path):
            return f"the file name {path!r} has characters ssh would interpret (%, $, quotes, backslashes)"
    return None


def command(
    ssh: str,
    host: str,
    port: int,
    user: str,
    identities: Sequence[str],
    known_hosts: str,
    *,
    use_agent: bool,
    timeout: float,
) -> list[str]:
    """The ssh command line for one SFTP session. Names must have passed :func:`unsafe_reason`."""
    if unsafe_reason(host, user, [known_hosts, *identities]) is not None:
        raise ValueError("names not checked with unsafe_reason")
    seconds = max(1, math.ceil(timeout))
    options = {
        **_FIXED_OPTIONS,
        # quoted: ssh splits this option's value at spaces into several files
        "UserKnownHostsFile": f'"{os.path.abspath(known_hosts)}"',
        # paramiko's rules: the agent's keys are all tried when it is allowed, else only these
        "IdentitiesOnly": "no" if use_agent else "yes",
        "IdentityAgent": "SSH_AUTH_SOCK" if use_agent else "none",
        "ConnectTimeout": str(seconds),
        # a server that stops answering ends the session within about the timeout
        "ServerAliveInterval": str(max(1, math.ceil(seconds / 2))),
        "ServerAliveCountMax": "2",
    }
    argv = [ssh, "-F", "none"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    # without a file ssh would add its default ones (~/.ssh/id_*): "none" adds nothing
    for identity in [f'"{os.path.abspath(i)}"' for i in identities] or ["none"]:
        argv += ["-o", f"IdentityFile={identity}"]
    return [*argv, "-p", str(port), "-l", user, "-T", "-x", "-a", "-s", "--", host, "sftp"]


class ChildChannel:
    """A byte stream over a socket pair to an ssh child (what the SFTP client uses:
    ``recv_into``, ``sendall``, ``close``); closing it ends the child. Its reads raise
    ``TimeoutError`` after the timeout, so a hung child or server is a connection failure like
    any other."""

    def __init__(self, sock: socket.socket, process: subprocess.Popen[bytes], stderr: _StderrReader) -> None:
        self._sock = sock
        self.process = process
        self._stderr = stderr
        self.closed = False

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        """Straight into the caller's buffer: what the SFTP client reads replies with."""
        return self._sock.recv_into(buffer, nbytes)

    def sendall(self, data: bytes | memoryview, /) -> None:
        self._sock.sendall(data)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def alive(self) -> bool:
        return not self.closed and self.process.poll() is None

    def failure(self, wait: float) -> SshFailure:
        """Why the child stopped: its exit status and error output (waiting up to ``wait``
        seconds for it to end; a child still running after that is ended)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(wait)
        self.close()
        return self._stderr.failure(self.process.returncode)

    def close(self) -> None:
        """End the session: ssh sees the end of its input and exits; one that does not within a
        second (hung, stopped) is killed. Always reaped."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self.process.returncode is None:
            try:
                self.process.wait(1.0)
            except subprocess.TimeoutExpired:
                self.process.kill()  # SIGKILL ends a stopped process too
                self.process.wait()
        self._stderr.join()


@dataclass(frozen=True)
class SshFailure:
    """Why an ssh child ended, from its exit status and error output."""

    kind: str  # "unknown-host", "changed-host", "refused", "unreachable", "other"
    status: int | None
    #: for "unreachable": a short reason ("connection refused", "host name not found", ...)
    reason: str = ""
    #: the key the server offered, as ssh names it: type and SHA256 fingerprint
    offered: tuple[str, str] | None = None
    #: key files ssh ignored because others can read them
    unprotected: tuple[str, ...] = ()
    #: ssh's last error line, for "other"
    last: str = ""


_UNREACHABLE = (
    ("could not resolve hostname", "host name not found"),
    ("connection refused", "connection refused"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("connection timed out", "timed out"),
    ("operation timed out", "timed out"),
)
_OFFERED = re.compile(r"Server host key: (\S+) (SHA256:[A-Za-z0-9+/=]+)")
_UNPROTECTED = re.compile(r"Permissions 0?[0-7]+ for '(.+)' are too open")


class _StderrReader:
    """Reads an ssh child's error output until it ends (so the child never blocks on a full
    pipe), keeping the key the server offered and the last few lines that are not debug
    messages: bounded, whatever the server makes ssh print."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self._stream = stream
        self.offered: tuple[str, str] | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=_KEPT_LINES)
        self._thread = threading.Thread(target=self._run, name="ssh-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = self._stream
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                line = raw[:1000].decode("utf-8", "replace").strip()
                if line.startswith("debug1: "):
                    match = _OFFERED.search(line)
                    if match and self.offered is None:
                        self.offered = (match[1], match[2])
                elif line:
                    self.lines.append(line)
        with contextlib.suppress(OSError):
            stream.close()

    def join(self) -> None:
        self._thread.join(5.0)

    def failure(self, status: int | None) -> SshFailure:
        self.join()
        lines = list(self.lines)
        text = "\n".join(lines).lower()
        unprotected = tuple(m[1] for m in (_UNPROTECTED.search(line) for line in lines) if m)
        last = lines[-1] if lines else f"ssh exited with status {status}"
        if "remote host identification has changed" in text or "has changed and you have requested" in text:
            return SshFailure("changed-host", status, offered=self.offered, last=last)
        if "host key verification failed" in text:
            return SshFailure("unknown-host", status, offered=self.offered, last=last)
        if "permission denied (" in text or "no more authentication methods" in text:
            return SshFailure("refused", status, unprotected=unprotected, last=last)
        for needle, reason in _UNREACHABLE:
            if needle in text:
                return SshFailure("unreachable", status, reason=reason, last=last)
        return SshFailure("other", status, last=last)


def spawn(argv: list[str], *, use_agent: bool) -> ChildChannel:
    """Start ssh with one end of a socket pair as its stdin and stdout."""
    ours, theirs = socket.socketpair()
    env = {"LC_ALL": "C", "HOME": os.path.expanduser("~"), "GLIBC_TUNABLES": _MALLOC_TUNABLES}
    if use_agent and os.environ.get("SSH_AUTH_SOCK"):
        env["SSH_AUTH_SOCK"] = os.environ["SSH_AUTH_SOCK"]
    try:
        process = subprocess.Popen(
            argv,
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
            env=env,
            # its own session: a Ctrl-C meant for vmvault does not cut the connection it
            # still needs to release its lock; when vmvault dies, ssh reads the end of its
            # input and exits
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ChildChannel(ours, process, _StderrReader(process.stderr))

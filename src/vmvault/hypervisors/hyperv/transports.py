"""How a step reaches a Hyper-V host: local PowerShell, or PowerShell Remoting (WinRM).

Local: ``powershell.exe -NoProfile -NonInteractive -EncodedCommand <base64 of UTF-16LE>``.
``-EncodedCommand`` rather than a script on stdin (``-Command -`` reads stdin statement by
statement like a prompt and cuts multi-line blocks) or a temporary ``.ps1`` with ``-File``
(a file to create, protect and delete on the host, and subject to the execution policy).
The command line holds the whole script (at most 32,767 characters on Windows; every
script is far below, and a test keeps it so). The parameters travel inside it as a base64
JSON literal decoded into a hashtable and splatted onto the script block, so no value is
ever part of the script text. stdout is UTF-8 (the scripts set ``[Console]::OutputEncoding``).

WinRM: pypsrp's ``PowerShell`` pipeline with ``add_script`` + ``add_parameter`` (real script
parameters), started with ``begin_invoke`` and polled, so a hung step is stopped after the
timeout on the client side; the scripts also give up on a WMI job before that. Options
(``WinRmOptions``): port, http/https, certificate validation (on, off or a CA file) and
authentication (negotiate, kerberos, ntlm, credssp).
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from vmvault import shape
from vmvault.errors import ConfigError, HypervisorError, require
from vmvault.hypervisors.hyperv.scripts import script
from vmvault.hypervisors.hyperv.steps import ParamValue

__all__ = [
    "MAX_COMMAND_LINE",
    "LocalPowerShell",
    "WinRmOptions",
    "WinRmTransport",
    "decode_reply",
    "encoded_command",
]

#: Windows' limit on a command line (CreateProcess), in characters
MAX_COMMAND_LINE = 32767
#: the most a step's reply may hold, in characters: the largest, GetVirtualDiskChanges over
#: 1 TiB in 1 MiB blocks every other one changed, is ~15 MiB of JSON
MAX_REPLY = 256 << 20
AUTH_METHODS = ("negotiate", "kerberos", "ntlm", "credssp")


def decode_reply(step: str, text: str) -> Any:
    """The wrapper's one JSON line: the result, or HypervisorError carrying PowerShell's error."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise HypervisorError(f"{step}: PowerShell printed nothing")
    try:
        doc = shape.loads(lines[-1])
    except ValueError as exc:
        raise HypervisorError(f"{step}: PowerShell output is not JSON: {lines[-1][:200]!r}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise HypervisorError(f"{step}: unexpected reply {lines[-1][:200]!r}")
    if not doc["ok"]:
        err_doc = doc.get("error")
        err: dict[str, Any] = err_doc if isinstance(err_doc, dict) else {}
        message = " ".join(str(err.get("message") or "failed").split())
        raise HypervisorError(f"{step}: {message} [{err.get('type', '?')}]")
    return doc.get("result")


def encoded_command(step: str, params: Mapping[str, ParamValue]) -> str:
    """The ``-EncodedCommand`` argument: the step's script as a script block, splatted with
    ``params`` decoded from a base64 JSON literal."""
    payload = base64.b64encode(json.dumps(dict(params)).encode("utf-8")).decode("ascii")
    text = (
        "$vmvaultJson = [System.Text.Encoding]::UTF8.GetString([System.Convert]::FromBase64String('" + payload + "'))\n"
        "$vmvaultArgs = @{}\n"
        "(ConvertFrom-Json $vmvaultJson).PSObject.Properties | ForEach-Object { $vmvaultArgs[$_.Name] = $_.Value }\n"
        "& {\n" + script(step) + "\n} @vmvaultArgs\n"
    )
    return base64.b64encode(text.encode("utf-16-le")).decode("ascii")


class LocalPowerShell:
    """Steps run by ``powershell.exe`` on this (Windows) machine."""

    def __init__(self, executable: str = "powershell.exe") -> None:
        self.executable = executable
        self.host = socket.gethostname()

    def command(self, step: str, params: Mapping[str, ParamValue]) -> list[str]:
        argv = [self.executable, "-NoProfile", "-NonInteractive", "-EncodedCommand", encoded_command(step, params)]
        if sum(len(a) + 3 for a in argv) > MAX_COMMAND_LINE:
            raise HypervisorError(f"{step}: the encoded script exceeds Windows' command line limit")
        return argv

    def run(self, step: str, params: Mapping[str, ParamValue], timeout: float) -> Any:
        try:
            proc = subprocess.run(
                self.command(step, params),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise HypervisorError(f"{self.executable} not found: hyperv:// without a host needs Windows") from exc
        except subprocess.TimeoutExpired as exc:
            raise HypervisorError(f"{step}: no answer from PowerShell within {timeout:.0f} s") from exc
        try:
            out = proc.stdout.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HypervisorError(f"{step}: PowerShell output is not UTF-8") from exc
        if proc.returncode != 0 and not out.strip():
            err = proc.stderr.decode("utf-8", "replace").strip().replace("\n", " ")
            raise HypervisorError(f"{step}: powershell exited {proc.returncode}: {err[:300]}")
        return decode_reply(step, out)


@dataclass(frozen=True)
class WinRmOptions:
    """How to reach WinRM. ``cert`` is ``"validate"`` (default), ``"ignore"`` or a CA file."""

    port: int | None = None
    scheme: str = "https"
    cert: str = "validate"
    auth: str = "negotiate"
    user: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ConfigError(f"winrm scheme must be http or https, not {self.scheme!r}")
        if self.auth not in AUTH_METHODS:
            raise ConfigError(f"winrm auth must be one of {', '.join(AUTH_METHODS)}, not {self.auth!r}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"winrm port {self.port} is out of range")
        if self.scheme == "http" and self.auth in ("credssp",):
            # CredSSP hands the user's credentials to the host: never over plain HTTP
            raise ConfigError("winrm auth credssp needs https")

    @property
    def cert_validation(self) -> bool | str:
        if self.cert == "validate":
            return True
        if self.cert == "ignore":
            return False
        return self.cert  # a CA bundle file

    def connection_kwargs(self, host: str, read_timeout: int) -> dict[str, Any]:
        return {
            "server": host,
            "port": self.port if self.port is not None else (5986 if self.scheme == "https" else 5985),
            "ssl": self.scheme == "https",
            "cert_validation": self.cert_validation,
            "auth": self.auth,
            "username": self.user,
            "password": self.password,
            "operation_timeout": POLL_SECONDS,
            "read_timeout": read_timeout,
            "connection_timeout": 30,
        }


#: each WinRM receive waits at most this long, so the client can stop a step on time
POLL_SECONDS = 10


class WinRmTransport:
    """Steps run over PowerShell Remoting through pypsrp."""

    def __init__(self, host: str, options: WinRmOptions, *, pool_factory: Callable[..., Any] | None = None) -> None:
        self.host = host
        self.options = options
        if pool_factory is None:
            _require_pypsrp("pypsrp.powershell")  # at once, not at the first step
            pool_factory = _pypsrp_pool
        self._pool_factory = pool_factory

    def run(self, step: str, params: Mapping[str, ParamValue], timeout: float) -> Any:
        try:
            return self._run(step, params, timeout)
        except HypervisorError:
            raise
        except Exception as exc:  # pypsrp raises many kinds: connection, auth, WinRM faults
            raise HypervisorError(f"{step} on {self.host}: {type(exc).__name__}: {exc}") from exc

    def _run(self, step: str, params: Mapping[str, ParamValue], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._pool_factory(self.options.connection_kwargs(self.host, POLL_SECONDS + 20)) as pool:
            ps = pool.powershell()
            ps.add_script(script(step))
            for name, value in params.items():
                ps.add_parameter(name, value)
            ps.begin_invoke()
            counted, size = 0, 0
            while True:
                # a host taken over could answer without end: what it sent is weighed at every poll
                got = ps.output
                size += sum(len(str(o)) for o in got[counted:])
                counted = len(got)
                if size > MAX_REPLY:
                    ps.stop()
                    raise HypervisorError(f"{step}: {self.host} answered more than {MAX_REPLY >> 20} MiB; stopped")
                if not ps.running:
                    break
                if time.monotonic() > deadline:
                    ps.stop()
                    raise HypervisorError(f"{step}: no answer from {self.host} within {timeout:.0f} s; stopped")
                ps.poll_invoke(timeout=max(1, min(POLL_SECONDS, int(deadline - time.monotonic()) + 1)))
            output = "\n".join(str(o) for o in got)
            if ps.had_errors and not output.strip():
                raise HypervisorError(f"{step} on {self.host}: {'; '.join(ps.errors)[:300]}")
        return decode_reply(step, output)


class _PsrpPipeline:
    """pypsrp's PowerShell object behind the few calls the transport makes."""

    def __init__(self, ps: Any) -> None:
        self._ps = ps

    def add_script(self, text: str) -> None:
        self._ps.add_script(text)

    def add_parameter(self, name: str, value: ParamValue) -> None:
        self._ps.add_parameter(name, value)

    def begin_invoke(self) -> None:
        self._ps.begin_invoke()

    @property
    def running(self) -> bool:
        from pypsrp.complex_objects import PSInvocationState

        return bool(self._ps.state == PSInvocationState.RUNNING)

    def poll_invoke(self, timeout: int) -> None:
        self._ps.poll_invoke(timeout=timeout)

    def stop(self) -> None:
        self._ps.stop()

    @property
    def output(self) -> list[Any]:
        return list(self._ps.output)

    @property
    def had_errors(self) -> bool:
        return bool(self._ps.had_errors)

    @property
    def errors(self) -> list[str]:
        return [str(e) for e in self._ps.streams.error]


class _PsrpPool:
    def __init__(self, kwargs: dict[str, Any]) -> None:
        powershell = _require_pypsrp("pypsrp.powershell")
        wsman = _require_pypsrp("pypsrp.wsman")
        self._pool = powershell.RunspacePool(wsman.WSMan(**kwargs))

    def __enter__(self) -> _PsrpPool:
        self._pool.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.close()

    def powershell(self) -> _PsrpPipeline:
        from pypsrp.powershell import PowerShell

        return _PsrpPipeline(PowerShell(self._pool))


def _require_pypsrp(module: str) -> ModuleType:
    return require(module, purpose="hyperv://HOST (PowerShell Remoting)", package="pypsrp", extra="hyperv")


def _pypsrp_pool(kwargs: dict[str, Any]) -> _PsrpPool:
    return _PsrpPool(kwargs)

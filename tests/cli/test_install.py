"""What an install gives: every capability of the README's install, a one-line error (exit 2)
naming the install command for every optional package that is missing, and a fast, clear
failure when the storage's server cannot be reached at all.

Missing packages are simulated in a child process: a ``sitecustomize`` module put first on
its ``PYTHONPATH`` installs a meta-path finder that raises ``ModuleNotFoundError`` for the
modules named in ``VMVAULT_TEST_HIDE`` (as an uninstalled package would).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import environment_without_settings
from tests.servers import S3Server, SshServer, free_port, s3_server, sshd_server
from vmvault.cli import EXIT

__all__ = ["s3_server", "sshd_server"]

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "vmvault"

_HIDER = '''
import os
import sys

_HIDDEN = tuple(name for name in os.environ.get("VMVAULT_TEST_HIDE", "").split(",") if name)


class _HideModules:
    """Behave as if the named modules (and their submodules) were not installed."""

    def find_spec(self, name, path=None, target=None):
        if any(name == hidden or name.startswith(hidden + ".") for hidden in _HIDDEN):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _HideModules())
'''

#: module to hide -> (a command that needs it, the package the error names, the install command)
OPTIONAL: dict[str, tuple[list[str], str, str]] = {
    # core dependencies: a broken install still gets one line, not a traceback
    # (only the paramiko transport needs it: the default one runs OpenSSH's ssh)
    "paramiko": (
        ["init", "-r", "sftp://127.0.0.1:1/srv/repo?transport=paramiko"],
        "paramiko",
        "python3 -m pip install 'paramiko",
    ),
    "boto3": (["init", "-r", "s3://127.0.0.1:1/bucket/repo"], "boto3", "python3 -m pip install 'boto3"),
    # boto3 present but its own dependency missing
    "botocore": (["init", "-r", "s3://127.0.0.1:1/bucket/repo"], "boto3", "python3 -m pip install 'boto3"),
    "pytsk3": (["files", "ls", "latest", "disk.vhdx"], "pytsk3", "python3 -m pip install 'pytsk3"),
    # the chunk ids of new repositories (the default of `init`)
    "blake3": (["init", "-r", "repo"], "blake3", "python3 -m pip install 'blake3"),
    # optional: Hyper-V remoting from a Linux proxy
    "pypsrp": (["audit", "hyperv://hv01.example.invalid"], "pypsrp", "'vmvault[hyperv]'"),
    # optional: the web dashboard
    "starlette": (["web", "--config", "vmvault.toml"], "starlette", "'vmvault[web]'"),
    "uvicorn": (["web", "--config", "vmvault.toml"], "uvicorn", "'vmvault[web]'"),
    "jinja2": (["web", "--config", "vmvault.toml"], "jinja2", "'vmvault[web]'"),
    "python_multipart": (["web", "--config", "vmvault.toml"], "python-multipart", "'vmvault[web]'"),
    # optional: vmvault mount (ctypes over libfuse 3)
    "mfusepy": (["mount", "."], "mfusepy", "'vmvault[mount]'"),
}


@pytest.fixture(scope="module")
def hider(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hide-modules")
    (folder / "sitecustomize.py").write_text(_HIDER)
    return folder


def run_cli(
    args: list[str], *, hide: tuple[str, ...] = (), hider: Path | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = environment_without_settings()
    env.update(S3Server.client_env())  # dummy credentials: nothing reaches a real S3
    env["VMVAULT_TEST_CHEAP_KDF"] = "1"
    env["VMVAULT_PASSWORD"] = "install-test"
    env["VMVAULT_HYPERV_USER"] = "administrator"
    env["VMVAULT_HYPERV_PASSWORD"] = "not-used"
    if hider is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hider), env.get("PYTHONPATH", "")) if p)
        env["VMVAULT_TEST_HIDE"] = ",".join(hide)
    return subprocess.run(
        [sys.executable, "-m", "vmvault", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_the_hider_hides(hider: Path) -> None:
    """The simulation itself works: a hidden module cannot be imported in the child."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hider), os.environ.get("PYTHONPATH", "")])}
    env["VMVAULT_TEST_HIDE"] = "json"
    proc = subprocess.run([sys.executable, "-c", "import json"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "No module named 'json'" in proc.stderr


def test_every_required_module_is_tested() -> None:
    """A new ``require(...)`` in the package needs a row in OPTIONAL."""
    required: set[str] = set()
    for path in SRC.rglob("*.py"):
        required.update(re.findall(r"""\brequire\(\s*["']([\w.]+)["']""", path.read_text()))
    assert {name.split(".")[0] for name in required} <= set(OPTIONAL)


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_missing_module_is_one_line_with_the_install_command(module: str, hider: Path, tmp_path: Path) -> None:
    args, package, install = OPTIONAL[module]
    proc = run_cli(args, hide=(module,), hider=hider, cwd=tmp_path)
    assert proc.returncode == EXIT["usage"] == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("vmvault: error: ")
    assert f"Python package {package} (module {module} is not installed)" in lines[0]
    assert install in lines[0]


def test_init_without_blake3_writes_nothing(hider: Path, tmp_path: Path) -> None:
    """Refused before a key, a key file or a config is written: the location stays free."""
    key_file = tmp_path / "new.key"
    proc = run_cli(["init", "-r", str(tmp_path / "repo"), "--key-file", str(key_file)], hide=("blake3",), hider=hider)
    assert proc.returncode == 2 and "blake3" in proc.stderr, proc.stderr
    assert not key_file.exists()
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*"))


def test_local_repository_needs_no_remote_package(hider: Path, tmp_path: Path) -> None:
    """With every package behind ``require`` missing, local repositories with HMAC-SHA-256 ids
    (those made before BLAKE3 ids) still work."""
    hidden = tuple(sorted(OPTIONAL))
    proc = run_cli(["init", "-r", str(tmp_path / "repo"), "--chunk-id", "hmac-sha256"], hide=hidden, hider=hider)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(["snapshots", "-r", str(tmp_path / "repo")], hide=hidden, hider=hider)
    assert proc.returncode == 0, proc.stderr


# ---- unreachable storage: one line, at once ---------------------------------------------------


def _refused_port() -> int:
    return free_port()  # bound and closed again: nothing listens there


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("sftp://127.0.0.1:{port}/srv/repo", "connection refused"),
        ("sftp://nosuchhost.invalid/srv/repo", "host name not found"),
        ("s3://127.0.0.1:{port}/bucket/repo", "connection refused"),
        ("s3://nosuchhost.invalid:9000/bucket/repo", "host name not found"),
    ],
)
def test_init_against_an_unreachable_server_fails_fast(location: str, reason: str) -> None:
    location = location.format(port=_refused_port())
    started = time.monotonic()
    proc = run_cli(["init", "-r", location])
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT["error"], proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot connect to" in lines[0] and f"({reason})" in lines[0]
    assert "retrying" not in proc.stderr and "look up" not in proc.stderr
    # the old behaviour retried for ~31 s; allow for a slow, shared machine
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_a_server_that_answered_once_is_retried(sshd_server: SshServer, tmp_path: Path) -> None:
    """Fail-fast is for the first connection only: a dropped server mid-operation is retried."""
    from vmvault.backends._retry import RetryPolicy
    from vmvault.errors import BackendConnectionError, BackendUnreachableError

    backend: object = sshd_server.open_backend(
        f"retry-{uuid.uuid4().hex}", retry=RetryPolicy(attempts=3, initial_delay=0.05, max_delay=0.1)
    )
    from vmvault.backends.sftp import SftpBackend

    assert isinstance(backend, SftpBackend)
    try:
        backend.put("config", b"x")
        sshd_server.kill()
        backend._pool.close()  # the next call must open a new connection to the dead server
        with pytest.raises(BackendConnectionError) as info:
            backend.get("config")
        assert not isinstance(info.value, BackendUnreachableError)
        assert "after 3 attempts" in str(info.value)
    finally:
        sshd_server.start()
        backend.close()


# ---- a fresh virtual environment with the README's install -------------------------------------


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``python3 -m venv`` + ``pip install <the project>`` without extras, from a copy of the
    project (pip would otherwise write build files into the work tree)."""
    base = tmp_path_factory.mktemp("fresh-venv")
    project = base / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(project)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip install of the project failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    yield venv


def _venv_vmvault(venv: Path, args: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = environment_without_settings(drop=("PYTHONPATH",))
    env.update(extra_env)
    env["VMVAULT_PASSWORD"] = "fresh-venv"
    env["VMVAULT_TEST_CHEAP_KDF"] = "1"
    return subprocess.run(
        [str(venv / "bin" / "vmvault"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=venv,
    )


@pytest.mark.slow
@pytest.mark.integration
def test_fresh_install_reaches_sftp(fresh_venv: Path, sshd_server: SshServer) -> None:
    location = sshd_server.url(f"fresh-{uuid.uuid4().hex}")
    proc = _venv_vmvault(fresh_venv, ["init", "-r", location], sshd_server.env)
    assert proc.returncode == 0, proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr and "No module named" not in proc.stderr
    proc = _venv_vmvault(fresh_venv, ["snapshots", "-r", location, "--json"], sshd_server.env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_fresh_install_reaches_s3(fresh_venv: Path, s3_server: S3Server) -> None:
    bucket = f"fresh-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    location = s3_server.url(bucket, "repo")
    proc = _venv_vmvault(fresh_venv, ["init", "-r", location], S3Server.client_env())
    assert proc.returncode == 0, proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr and "No module named" not in proc.stderr
    proc = _venv_vmvault(fresh_venv, ["snapshots", "-r", location, "--json"], S3Server.client_env())
    assert proc.returncode == 0, proc.stderr

"""The backup engine end to end through the CLI while the storage fails under it.

SFTP runs against a loopback OpenSSH server that is killed (with every session) and
restarted on the same port, or whose authorized_keys is emptied. S3 runs against moto
behind the test proxy (tests/servers.py): moto keeps objects in memory and forgets them
when killed, which no real store does, so "the S3 server goes away" is the proxy being
stopped and brought back on the same port while moto keeps its state. Revoked
credentials and a full quota are answers the proxy gives in moto's place (moto neither
revokes a key mid-session nor has quotas); they carry the codes AWS, MinIO and Ceph RGW
send.

Each fault is applied once the backup has written its first index file, with the backup
process held still (SIGSTOP) meanwhile, so it surely lands in the middle of the backup.
Whatever happens, a backup either completes or exits with a clear message, never leaves
a snapshot that refers to missing data, and the next run reuses what was uploaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import FaultyHttpProxy, S3Server, SshServer, running_s3, running_sshd, s3_client_environment
from vmvault.backends import open_backend
from vmvault.backends.base import Backend
from vmvault.engine.restore import restore
from vmvault.repo.repository import Repository

pytestmark = pytest.mark.integration

PASSWORD = "network-faults-passphrase"
IMAGE_SIZE = 48 << 20
PACK_SIZE = 1 << 20  # many small packs, so that "mid-backup" is a wide window
EXIT_OK, EXIT_ERROR, EXIT_STORAGE_FULL = 0, 1, 14


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vm") / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return path


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_client_environment(), running_s3(tmp_path_factory.mktemp("moto"), buckets=("faults",)) as server:
        yield server


def _init(backend: Backend) -> None:
    # through the API: the CLI has no pack-size option, and small packs widen the window
    Repository.init(backend, PASSWORD.encode(), pack_size=PACK_SIZE).close()


def _start_backup(url: str, image: Path, extra_env: dict[str, str]) -> subprocess.Popen[str]:
    env = {**os.environ, **extra_env, "VMVAULT_PASSWORD": PASSWORD, "VMVAULT_TEST_CHEAP_KDF": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vmvault", "-r", url, "--json", "backup", str(image)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


@contextlib.contextmanager
def _paused_when(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> Iterator[None]:
    """Wait until ``condition`` holds, then hold the backup still (SIGSTOP) while the caller
    breaks the storage, so that the fault surely lands in the middle of the backup."""
    deadline = time.monotonic() + 150
    while not condition():
        assert proc.poll() is None, f"the backup ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)
    try:
        assert proc.poll() is None, f"the backup ended right after {what}: {proc.communicate()}"
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def _verify(backend: Backend, image: Path, tmp_path: Path, snapshots: int) -> None:
    """The repository checks clean and its snapshots restore to the image."""
    repo = Repository.open(backend, PASSWORD.encode())
    try:
        from vmvault.repo.check import check

        report = check(repo, read_data=True)
        assert report.ok, [p.to_dict() for p in report.errors]
        snaps = repo.list_snapshots()
        assert len(snaps) == snapshots
        want = hashlib.sha256(image.read_bytes()).hexdigest()
        for snap in snaps:
            target = tmp_path / f"restore-{snap.id[:8]}"
            restore(repo, snap, str(target))
            assert hashlib.sha256((target / image.name).read_bytes()).hexdigest() == want
    finally:
        repo.close()


def _no_snapshot(backend: Backend) -> None:
    assert list(backend.list("snapshots/")) == [], "a failed backup left a snapshot"


def _rerun_reuses(url: str, image: Path, env: dict[str, str]) -> dict[str, Any]:
    code, out, err = _finish(_start_backup(url, image, env))
    assert code == EXIT_OK, err
    doc: dict[str, Any] = json.loads(out)
    # the packs indexed before the failure are reused: at least one index file's worth
    assert doc["bytes_added"] < IMAGE_SIZE - 4 * PACK_SIZE, doc
    return doc


# ---- SFTP -------------------------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    with running_sshd(tmp_path / "sshd") as server:
        yield server


def _sftp_indexed(server: SshServer, name: str) -> Callable[[], bool]:
    index = server.root / name / "index"
    return lambda: index.is_dir() and any(not p.name.startswith(".") and ".tmp" not in p.name for p in index.iterdir())


@pytest.mark.timeout(240)
def test_sftp_server_killed_mid_backup_is_retried(sshd: SshServer, image: Path, tmp_path: Path) -> None:
    backend: Any = sshd.open_backend("killed")
    _init(backend)
    proc = _start_backup(sshd.url("killed"), image, sshd.env)
    with _paused_when(_sftp_indexed(sshd, "killed"), proc, "the first index file"):
        sshd.kill()  # every session dies with it, as in a crash of the server
    time.sleep(1.5)
    sshd.start()
    code, out, err = _finish(proc)
    assert code == EXIT_OK, err
    assert json.loads(out)["bytes_read"] == IMAGE_SIZE
    _verify(sshd.open_backend("killed"), image, tmp_path, snapshots=1)  # type: ignore[arg-type]


@pytest.mark.timeout(240)
def test_sftp_credentials_revoked_mid_backup(sshd: SshServer, image: Path, tmp_path: Path) -> None:
    backend: Any = sshd.open_backend("revoked")
    _init(backend)
    keys = sshd.authorized_keys.read_text()
    proc = _start_backup(sshd.url("revoked"), image, sshd.env)
    with _paused_when(_sftp_indexed(sshd, "revoked"), proc, "the first index file"):
        sshd.authorized_keys.write_text("")
        sshd.restart()  # drop the sessions: the client must log in again, and is refused
    code, _out, err = _finish(proc)
    assert code == EXIT_ERROR, err
    assert "refused key authentication" in err, err
    assert "Traceback" not in err
    sshd.authorized_keys.write_text(keys)
    backend = sshd.open_backend("revoked")
    _no_snapshot(backend)
    _rerun_reuses(sshd.url("revoked"), image, sshd.env)
    _verify(backend, image, tmp_path, snapshots=1)


# ---- S3 ---------------------------------------------------------------------------------


@pytest.fixture
def proxy(moto: S3Server) -> Iterator[FaultyHttpProxy]:
    p = FaultyHttpProxy(moto.port)
    p.start()
    yield p
    p.stop()  # harmless when a test stopped it already


def _s3_indexed(moto: S3Server, prefix: str) -> Callable[[], bool]:
    client: Any = moto.client()
    return lambda: bool(client.list_objects_v2(Bucket="faults", Prefix=f"{prefix}/index/").get("KeyCount"))


def _s3_setup(moto: S3Server, proxy: FaultyHttpProxy, prefix: str) -> tuple[str, Backend]:
    backend = open_backend(moto.url("faults", prefix))
    _init(backend)
    return proxy.url("faults", prefix), backend


@pytest.mark.timeout(240)
def test_s3_endpoint_down_briefly_is_retried(
    moto: S3Server, proxy: FaultyHttpProxy, image: Path, tmp_path: Path
) -> None:
    url, backend = _s3_setup(moto, proxy, "brief")
    proc = _start_backup(url, image, S3Server.client_env())
    with _paused_when(_s3_indexed(moto, "brief"), proc, "the first index file"):
        # every request fails (as a load balancer answers for a server that is down), and
        # new connections are refused
        proxy.fail_next(10**9, 503, "ServiceUnavailable")
        proxy.stop()
    time.sleep(1.0)
    # back: connections already open are served again (a stopped http.server keeps serving
    # keep-alive connections it had accepted), new ones reach the proxy on the same port
    proxy.fail_next(0)
    back = FaultyHttpProxy(moto.port, port=proxy.port)
    back.start()
    try:
        code, _out, err = _finish(proc)
    finally:
        back.stop()
    assert code == EXIT_OK, err
    _verify(backend, image, tmp_path, snapshots=1)


@pytest.mark.timeout(240)
def test_s3_endpoint_down_for_good_fails_clearly(
    moto: S3Server, proxy: FaultyHttpProxy, image: Path, tmp_path: Path
) -> None:
    url, backend = _s3_setup(moto, proxy, "down")
    proc = _start_backup(url, image, S3Server.client_env())
    with _paused_when(_s3_indexed(moto, "down"), proc, "the first index file"):
        proxy.fail_next(10**9, 503, "ServiceUnavailable")  # every request from now on
    code, _out, err = _finish(proc)
    assert code == EXIT_ERROR, err
    assert "kept failing" in err and "uploaded data is reused" in err, err
    assert "Traceback" not in err
    _no_snapshot(backend)
    proxy.fail_next(0)
    _rerun_reuses(url, image, S3Server.client_env())
    _verify(backend, image, tmp_path, snapshots=1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("status", "code", "exit_code", "text"),
    [
        (403, "InvalidAccessKeyId", EXIT_ERROR, "access denied"),  # key deleted or disabled (AWS, MinIO)
        (403, "QuotaExceeded", EXIT_STORAGE_FULL, "full or over quota"),  # Ceph RGW bucket/user quota
        (507, "XMinioStorageFull", EXIT_STORAGE_FULL, "full or over quota"),  # MinIO out of disk
    ],
)
def test_s3_refusals_mid_backup(
    moto: S3Server,
    proxy: FaultyHttpProxy,
    image: Path,
    tmp_path: Path,
    status: int,
    code: str,
    exit_code: int,
    text: str,
) -> None:
    prefix = f"refused-{code.lower()}"
    url, backend = _s3_setup(moto, proxy, prefix)
    proc = _start_backup(url, image, S3Server.client_env())
    with _paused_when(_s3_indexed(moto, prefix), proc, "the first index file"):
        proxy.fail_next(10**9, status, code)
    started = time.monotonic()
    rc, _out, err = _finish(proc)
    assert rc == exit_code, err
    assert text in err, err
    assert "Traceback" not in err
    # a refusal is not retried for long: it is not a dropped connection
    assert time.monotonic() - started < 30
    _no_snapshot(backend)
    proxy.fail_next(0)
    _rerun_reuses(url, image, S3Server.client_env())
    _verify(backend, image, tmp_path, snapshots=1)

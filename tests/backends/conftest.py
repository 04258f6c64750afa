"""Fixtures: every backend behind one ``store`` fixture, real servers for the remote ones.

``store`` is parametrised over memory, local, sftp (a real OpenSSH server on loopback, reached
through an ``ssh`` child process), sftp-paramiko (the same server through paramiko's SSH), s3
(moto's S3 server on loopback) and s3-rgw (Ceph's RADOS Gateway on a single-node cluster on
loopback, ``tests/ceph.py``); the contract suite in ``contract.py`` runs against each.
Every test gets its own empty directory / prefix on the session's servers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.ceph import CephCluster
from tests.servers import S3Server, SshServer, s3_server, sshd_server
from vmvault.backends.base import FAR_ROUND_TRIP, Backend
from vmvault.backends.local import LocalBackend
from vmvault.backends.memory import MemoryBackend

__all__ = ["StoreUnderTest", "s3_server", "sshd_server", "upload_in_progress"]

MiB = 1 << 20
CONTRACT_BUCKET = "vmvault-contract"
#: small multipart settings so that the contract's 20+ MiB objects take the multipart path
S3_MULTIPART = {"multipart_threshold": 8 * MiB, "part_size": 5 * MiB}


@dataclass
class StoreUnderTest:
    """A backend plus what the contract needs to look behind it."""

    kind: str
    backend: Backend
    #: a second, independent client on the same storage (None for memory: no shared storage)
    open_again: Callable[[], Backend] | None = None
    #: a location another process can open with ``open_backend`` (None for memory)
    location: str | None = None
    #: environment that process needs (key files, credentials)
    env: dict[str, str] = field(default_factory=dict)
    #: whether an upload is under way, as the storage itself shows it (temporary file, open
    #: multipart upload): lets a test kill a writer provably mid-put
    upload_in_progress: Callable[[], bool] | None = None
    #: closed at teardown
    extra: list[Backend] = field(default_factory=list)


def upload_in_progress(directory: Path) -> bool:
    """A temporary file with data in it exists somewhere under ``directory``."""
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            if ".tmp-" in name:
                try:
                    if os.path.getsize(os.path.join(dirpath, name)) > 0:
                        return True
                except FileNotFoundError:
                    continue
    return False


def read_until_near(backend: Backend, name: str, length: int, tries: int = 300) -> float:
    """Read the first ``length`` bytes of ``name`` until an answer comes quicker than
    ``FAR_ROUND_TRIP`` (at most ``tries`` times): the distance a backend judges is its quickest
    answer so far, and a busy machine keeps a server on loopback waiting for a core now and then
    (CI saw three answers in a row, once the quickest of 32, slower than 5 ms, and once the
    quickest of 300 took 5.3 ms). Returns the quickest answer, in seconds."""
    for _ in range(tries):
        assert len(backend.get(name, 0, length)) == length
        if backend._quickest_reply < FAR_ROUND_TRIP:  # type: ignore[attr-defined]
            break
    return float(backend._quickest_reply)  # type: ignore[attr-defined]


def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> StoreUnderTest:
    return StoreUnderTest("memory", MemoryBackend())


def _local(tmp_path: Path, request: pytest.FixtureRequest) -> StoreUnderTest:
    root = tmp_path / "repo"
    return StoreUnderTest(
        "local",
        LocalBackend(str(root)),
        open_again=lambda: LocalBackend(str(root)),
        location=str(root),
        upload_in_progress=lambda: upload_in_progress(root),
    )


def _sftp_store(kind: str, transport: str, request: pytest.FixtureRequest) -> StoreUnderTest:
    server: SshServer = request.getfixturevalue("sshd_server")
    sub = f"contract-{uuid.uuid4().hex[:12]}"
    directory = server.root / sub

    def make() -> Backend:
        backend = server.open_backend(sub, transport=transport)
        assert isinstance(backend, Backend)
        return backend

    return StoreUnderTest(
        kind,
        make(),
        open_again=make,
        location=f"{server.url(sub)}?transport={transport}",
        env=server.env,
        upload_in_progress=lambda: upload_in_progress(directory),
    )


def _sftp(tmp_path: Path, request: pytest.FixtureRequest) -> StoreUnderTest:
    return _sftp_store("sftp", "openssh", request)


def _sftp_paramiko(tmp_path: Path, request: pytest.FixtureRequest) -> StoreUnderTest:
    return _sftp_store("sftp-paramiko", "paramiko", request)


def _s3_store(kind: str, client: Any, url: Callable[[str, str], str], env: dict[str, str]) -> StoreUnderTest:
    """A fresh prefix in the contract bucket of an S3 server (``url(bucket, prefix)``)."""
    from vmvault.backends.s3 import open_s3

    if CONTRACT_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=CONTRACT_BUCKET)
    prefix = f"contract-{uuid.uuid4().hex[:12]}"

    def make() -> Backend:
        return open_s3(url(CONTRACT_BUCKET, prefix), **S3_MULTIPART)

    def in_progress() -> bool:
        answer = client.list_multipart_uploads(Bucket=CONTRACT_BUCKET, Prefix=prefix + "/")
        return any(
            client.list_parts(Bucket=CONTRACT_BUCKET, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
            for u in answer.get("Uploads", [])
        )

    return StoreUnderTest(
        kind,
        make(),
        open_again=make,
        location=url(CONTRACT_BUCKET, prefix)
        + f"?multipart-threshold={S3_MULTIPART['multipart_threshold']}&part-size={S3_MULTIPART['part_size']}",
        env=env,
        upload_in_progress=in_progress,
    )


def _s3(tmp_path: Path, request: pytest.FixtureRequest) -> StoreUnderTest:
    server: S3Server = request.getfixturevalue("s3_server")
    return _s3_store("s3", server.client(), server.url, S3Server.client_env())


def _s3_rgw(tmp_path: Path, request: pytest.FixtureRequest) -> StoreUnderTest:
    # "rgw" puts the gateway's endpoint (https), certificate and credentials in the
    # environment for this test, over moto's dummy credentials
    cluster: CephCluster = request.getfixturevalue("rgw")
    return _s3_store("s3-rgw", cluster.client(), cluster.url, cluster.client_env())


_FACTORIES: dict[str, Callable[[Path, pytest.FixtureRequest], StoreUnderTest]] = {
    "memory": _memory,
    "local": _local,
    "sftp": _sftp,
    "sftp-paramiko": _sftp_paramiko,
    "s3": _s3,
    "s3-rgw": _s3_rgw,
}


@pytest.fixture(
    params=[
        "memory",
        "local",
        pytest.param("sftp", marks=pytest.mark.integration),
        pytest.param("sftp-paramiko", marks=pytest.mark.integration),
        pytest.param("s3", marks=pytest.mark.integration),
        pytest.param("s3-rgw", marks=pytest.mark.integration),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    under_test = _FACTORIES[request.param](tmp_path, request)
    try:
        yield under_test
    finally:
        under_test.backend.close()
        for other in under_test.extra:
            other.close()

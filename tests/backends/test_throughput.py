"""Loopback throughput: 1 GiB as 16 MiB objects from 4 threads into local, sftp and s3.

A measurement, not a timed assertion: it prints MiB/s (run with ``-s``) and checks only that
every object arrived whole. It moves 3 GiB, so it runs only when ``VMVAULT_BENCH=1``::

    VMVAULT_BENCH=1 python -m pytest tests/backends/test_throughput.py -s -q

``VMVAULT_BENCH_MIB`` changes the total (default 1024).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.servers import S3Server, SshServer
from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend
from vmvault.backends.s3 import open_s3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("VMVAULT_BENCH") != "1", reason="moves 3 GiB; set VMVAULT_BENCH=1 to measure"),
]

MiB = 1 << 20
OBJECT = 16 * MiB
THREADS = 4


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    if kind == "local":
        return LocalBackend(str(tmp_path / "bench"))
    if kind == "sftp":
        sshd: SshServer = request.getfixturevalue("sshd_server")
        backend = sshd.open_backend(f"bench-{uuid.uuid4().hex[:8]}", connections=THREADS)
        assert isinstance(backend, Backend)
        return backend
    s3: S3Server = request.getfixturevalue("s3_server")
    client: Any = s3.client()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return open_s3(s3.url(bucket, "repo"))


@pytest.mark.parametrize("kind", ["local", "sftp", "s3"])
def test_put_throughput(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    total = int(os.environ.get("VMVAULT_BENCH_MIB", "1024")) * MiB
    count = total // OBJECT
    # distinct incompressible objects: a prefix makes each unique, the body is shared so that
    # generating 1 GiB of random data does not dominate the measurement
    body = os.urandom(OBJECT - 16)
    objects = {f"data/{i:02x}/{i:04d}": i.to_bytes(16, "big") + body for i in range(count)}
    with _open(kind, tmp_path, request) as backend:
        started = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda item: backend.put(*item), objects.items()))
        elapsed = time.perf_counter() - started
        listed = {o.name: o.size for o in backend.list("data/")}
        assert listed == {name: OBJECT for name in objects}
        sample = next(iter(objects))
        assert hashlib.sha256(backend.get(sample)).digest() == hashlib.sha256(objects[sample]).digest()
    rate = total / MiB / elapsed
    print(f"\n{kind}: {count} x 16 MiB with {THREADS} threads: {elapsed:.2f} s, {rate:.1f} MiB/s")

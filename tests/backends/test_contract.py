"""The backend contract, run against memory, local, sftp (OpenSSH), s3 (moto) and s3-rgw (Ceph)."""

from __future__ import annotations

from tests.backends.contract import BackendContract


class TestBackendContract(BackendContract):
    pass

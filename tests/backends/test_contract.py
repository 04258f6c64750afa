"""The backend contract, run against memory, local, sftp (OpenSSH) and s3 (moto)."""

from __future__ import annotations

from tests.backends.contract import BackendContract


class TestBackendContract(BackendContract):
    pass

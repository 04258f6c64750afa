"""Fixtures for repository tests: cheap key derivation, small repositories on local disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.repo.builders import make_repo
from vmvault.backends.local import LocalBackend
from vmvault.repo.repository import Repository


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    # Argon2id at full cost takes ~0.5 s per key; tests open repositories hundreds of times
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


@pytest.fixture
def local_repo(tmp_path: Path) -> Repository:
    return make_repo(LocalBackend(str(tmp_path / "repo")))

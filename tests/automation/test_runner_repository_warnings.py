"""Scheduled jobs hear what opening the repository found (repo/hostrecord.py, key objects)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.automation.conftest import make_config
from vmvault.automation.runner import open_configured_repository
from vmvault.backends.local import LocalBackend
from vmvault.errors import TamperingError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_vanished_snapshots_are_logged_and_a_downgrade_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo passphrase")
    config = make_config(
        tmp_path,
        f"""
        [sources.vm]
        location = "{tmp_path}"

        [jobs.vm]
        type = "backup"
        source = "vm"
        repository = "r"
        schedule = "0 1 * * *"
        """,
    )
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo passphrase", chunk_size=4096)
    snap = Snapshot(time="2026-11-25T10:00:00+00:00", hostname="h", username="u", source={"location": "x"})
    repo.save_snapshot(snap)
    repo.backend.delete(f"snapshots/{snap.id}")  # the storage withholds it
    # a handler of its own: the daemon's CLI stops "vmvault" loggers from propagating
    kept = _Keep()
    logger = logging.getLogger("vmvault.automation")
    logger.addHandler(kept)
    try:
        open_configured_repository(config, "r").close()
    finally:
        logger.removeHandler(kept)
    assert any("snapshots this host wrote are gone" in m for m in kept.messages)
    # a config switched to unencrypted is refused for a configured passphrase
    raw = (tmp_path / "repo" / "config").read_text()
    (tmp_path / "repo" / "config").write_text(raw.replace('"aes-256-gcm"', '"none"'))
    with pytest.raises(TamperingError):
        open_configured_repository(config, "r")

"""Fixtures for automation tests: configs written to disk, a recording notifier, a fake clock."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest

from vmvault.automation.config import AutomationConfig, NotifierConfig, load_config
from vmvault.automation.notify import Notifier, Summary

T0 = dt.datetime(2026, 11, 25, 10, 3, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def make_config(tmp_path: Path, body: str, *, concurrency: int = 1) -> AutomationConfig:
    """A config with a UTC daemon section and one repository ``r`` (plus what ``body`` adds)."""
    text = textwrap.dedent(
        f"""\
            [daemon]
            concurrency = {concurrency}
            history = "{tmp_path / "history.sqlite"}"
            timezone = "UTC"

            [repositories.r]
            location = "{tmp_path / "repo"}"
            password_env = "VMVAULT_TEST_REPO_PW"
            """
    ) + textwrap.dedent(body)
    path = tmp_path / "vmvault.toml"
    path.write_text(text)
    return load_config(path)


class RecordingNotifier(Notifier):
    """Keeps what it would send (the scheduler's logic under test, not delivery)."""

    def __init__(self) -> None:
        super().__init__(NotifierConfig(name="rec", type="webhook", on="always", url="http://unused.invalid/"))
        self.sent: list[Summary] = []

    def send(self, summary: Summary) -> None:
        self.sent.append(summary)

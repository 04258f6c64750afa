"""How backup and restore report progress: a ``ProgressReporter`` gets phases, bytes done
and warnings. The CLI's reporters (``vmvault.cli.progress``: terminal, quiet, JSON) render
it; ``NullReporter`` keeps only the warnings (tests, the daemon). One name per concept:
repository work (check, prune, repair, copy) reports through the simpler
``vmvault.repo.progress.PhaseCallback``, and disk merges through a bytes-done callable."""

from __future__ import annotations

from typing import Protocol

__all__ = ["NullReporter", "ProgressReporter"]


class ProgressReporter(Protocol):
    def start(self, label: str, total: int) -> None:
        """A new phase of ``total`` bytes (0 = unknown) begins."""

    def advance(self, n: int) -> None:
        """``n`` more bytes of the current phase are done (thread-safe callers only from one thread)."""

    def finish(self) -> None:
        """The current phase is over."""

    def warn(self, text: str) -> None:
        """Something the user must hear about, shown even when quiet."""


class NullReporter:
    """Shows nothing; collects warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def warn(self, text: str) -> None:
        self.warnings.append(text)

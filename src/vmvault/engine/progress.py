"""How long-running engine work reports progress. The CLI renders it; tests count it."""

from __future__ import annotations

from typing import Protocol

__all__ = ["NullProgress", "Progress"]


class Progress(Protocol):
    def start(self, label: str, total: int) -> None:
        """A new phase of ``total`` bytes (0 = unknown) begins."""

    def advance(self, n: int) -> None:
        """``n`` more bytes of the current phase are done (thread-safe callers only from one thread)."""

    def finish(self) -> None:
        """The current phase is over."""

    def warn(self, text: str) -> None:
        """Something the user must hear about, shown even when quiet."""


class NullProgress:
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

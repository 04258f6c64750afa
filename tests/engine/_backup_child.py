"""Run one backup in a child process that SIGKILLs itself before its Nth storage write.

Usage: python -m tests.engine._backup_child REPO_DIR IMAGE KILL_AT
``KILL_AT`` = 0 runs to the end and prints how many writes (put/delete) it made.
The kill point lives in the test's backend wrapper, not in the code under test.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from vmvault.backends.base import Backend
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository


class KillingBackend(LocalBackend):
    def __init__(self, root: str, kill_at: int) -> None:
        super().__init__(root)
        self.kill_at = kill_at
        self.writes = 0

    def _count(self) -> None:
        self.writes += 1
        if self.writes == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def put_parts(self, name: str, parts: Sequence[bytes]) -> None:  # (put too: it calls this)
        self._count()
        super().put_parts(name, parts)

    def delete(self, name: str) -> None:
        self._count()
        super().delete(name)


def main() -> None:
    root, image, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backend: Backend = KillingBackend(root, kill_at)
    repo = Repository.open(backend, b"pw")
    backup(repo, FilesSource(image))
    assert isinstance(backend, KillingBackend)
    print(backend.writes)


if __name__ == "__main__":
    main()

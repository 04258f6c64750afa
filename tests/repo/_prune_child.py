"""Run forget + prune in a child process that SIGKILLs itself before its Nth storage write.

Usage: python -m tests.repo._prune_child REPO_DIR KILL_AT [prune|repair|salvage]
``KILL_AT`` = 0 runs to the end and prints how many writes (put/delete) it made and
how long forget + prune took.
The kill point is in the test's backend wrapper, not in the code under test.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

from tests.repo.builders import PASS
from vmvault.backends.base import Backend, ObjectInfo
from vmvault.backends.local import LocalBackend
from vmvault.repo import Repository, RetentionPolicy, forget, prune, repair_index


class KillingBackend(Backend):
    def __init__(self, inner: Backend, kill_at: int) -> None:
        self.inner = inner
        self.url = inner.url
        self.kill_at = kill_at
        self.writes = 0

    def _tick(self) -> None:
        self.writes += 1
        if self.writes == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def put(self, name: str, data: bytes) -> None:
        self._tick()
        self.inner.put(name, data)

    def delete(self, name: str) -> None:
        self._tick()
        self.inner.delete(name)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, offset, length)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)


def main() -> None:
    root, kill_at = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "prune"
    backend = KillingBackend(LocalBackend(root), kill_at)
    repo = Repository.open(backend, PASS)
    print("start", flush=True)  # the parent times its kill from here
    began = time.monotonic()
    if mode == "repair":
        repair_index(repo, from_scratch=True)
    elif mode == "salvage":
        repair_index(repo, read_data=True)
    else:
        forget(repo, RetentionPolicy(last=2))
        prune(repo, max_unused=0.0)
    print(backend.writes, time.monotonic() - began)


if __name__ == "__main__":
    main()

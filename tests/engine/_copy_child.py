"""Run one copy in a child process that SIGKILLs itself at its Nth write to the target.

Usage: python -m tests.engine._copy_child SRC_DIR DST_DIR KILL_AT
The kill point lives in the test's backend wrapper, not in the code under test.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from vmvault.backends.local import LocalBackend
from vmvault.engine.copy import copy_snapshots
from vmvault.repo.repository import Repository


class KillingBackend(LocalBackend):
    def __init__(self, root: str, kill_at: int) -> None:
        super().__init__(root)
        self.kill_at = kill_at
        self.writes = 0

    def put_parts(self, name: str, parts: Sequence[bytes]) -> None:  # (put too: it calls this)
        self.writes += 1
        if self.writes == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        super().put_parts(name, parts)


def main() -> None:
    src_dir, dst_dir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    src = Repository.open(LocalBackend(src_dir), b"source pass")
    dst = Repository.open(KillingBackend(dst_dir, kill_at), b"target pass")
    # one worker and an index file after every pack: the kill point decides what is durable
    copy_snapshots(src, dst, workers=1, index_every=1)


if __name__ == "__main__":
    main()

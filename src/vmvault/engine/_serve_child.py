"""The NBD export process started by :class:`vmvault.engine.export.ServeProcess`.

Reads one JSON line from stdin (repository location, secret, snapshot id, disk -> socket,
lease file, cache size), opens the repository, serves each disk on its socket through one
shared chunk cache, writes ``ready`` on stdout, and serves until SIGTERM or until the lease
file is gone. Errors go to stderr (the parent's log file) and, before ``ready``, to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from contextlib import ExitStack
from typing import Any

from vmvault.backends import open_backend
from vmvault.engine.export import export_label
from vmvault.engine.nbd import NbdServer
from vmvault.engine.reader import ChunkCache, DiskReader, cache_bytes_for
from vmvault.errors import VmvaultError
from vmvault.repo.repository import Repository

#: seconds between looks at the lease
LEASE_POLL = 1.0


def _serve(spec: dict[str, Any], stop: threading.Event) -> None:
    secret = bytes.fromhex(spec["secret"]) if spec.get("secret") else None
    repo = Repository.open(open_backend(str(spec["location"])), secret)
    snap = repo.load_snapshot(str(spec["snapshot"]))
    wanted = spec.get("cache_bytes")
    cache = ChunkCache(max_bytes=cache_bytes_for(repo, None if wanted is None else int(wanted)))
    lease = str(spec["lease"])
    with ExitStack() as stack:
        stack.callback(cache.close)
        for disk, path in dict(spec["sockets"]).items():
            reader = stack.enter_context(DiskReader(repo, snap, str(disk), cache=cache))
            server = NbdServer(reader, label=export_label(snap, str(disk))).listen_unix(str(path))
            stack.callback(server.close)
            server.start()
        print("ready", flush=True)
        sys.stdout.close()
        logging.getLogger(__name__).info("serving %d disks of snapshot %s", len(spec["sockets"]), snap.short_id)
        while not stop.wait(LEASE_POLL):
            if not os.path.exists(lease):
                logging.getLogger(__name__).info("the lease %s is gone; stopping", lease)
                break


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vmvault-serve[%(process)d]: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the lease or SIGTERM end it
    try:
        spec = json.loads(sys.stdin.readline())
        _serve(spec, stop)
    except (VmvaultError, OSError, ValueError, KeyError, TypeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"vmvault-serve: {message}", file=sys.stderr, flush=True)
        if not sys.stdout.closed:
            print(message, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving a snapshot's disks over NBD: in this process, or in a supervised process of its own.

:func:`serve_disk` serves one disk on a unix socket in this process while a ``with`` block
runs (``vmvault serve``, tests, boot verification). :class:`ServeProcess` runs the export in
a child process (``python -m vmvault.engine._serve_child``) that outlives the command that
started it: instant recovery starts a VM whose disks read from the export, and a Ctrl-C or a
``kill -9`` of ``vmvault instant-restore`` must not take the VM's disks away. The child

* gets the repository location and secret on a pipe (never on its command line or in its
  environment), opens the repository itself, and reports ``ready`` once every socket listens;
* runs in a session of its own (a terminal's Ctrl-C does not reach it), logs to a file;
* stops on SIGTERM, or by itself when its *lease* file disappears (whoever ends the
  operation removes the lease, so a lost PID cannot leave an export running forever);
* is identified by PID *and* start time (``/proc/PID/stat``), so a later command never signals
  an unrelated process that reused the PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from vmvault import platform
from vmvault.engine.nbd import NbdServer
from vmvault.engine.reader import ChunkCache, DiskReader, find_disk
from vmvault.errors import ConfigError, VmvaultError
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

__all__ = ["ServeProcess", "export_label", "process_start_time", "running_disks", "serve_disk"]

#: how long a child may take to open the repository and listen
READY_TIMEOUT = 120.0


def running_disks(snap: Snapshot) -> list[DiskRecord]:
    """The disks a VM runs on: every disk but the older layers of a checkpoint chain (a layer
    named as another layer's parent)."""
    parents = {d.parent for d in snap.disks if d.layer and d.parent}
    return [d for d in snap.disks if d.name not in parents]


def export_label(snap: Snapshot, disk: str) -> str:
    return f"snapshot {snap.short_id} disk {disk}"


@contextmanager
def serve_disk(
    repo: Repository,
    snap: Snapshot,
    disk: str,
    socket_path: str,
    *,
    cache: ChunkCache | None = None,
    cache_bytes: int | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[NbdServer]:
    """Serve ``disk`` of ``snap`` read-only on a new unix socket while the block runs;
    ``nbd_uri(socket_path)`` is what QEMU opens."""
    find_disk(snap, disk)
    with DiskReader(repo, snap, disk, cache=cache, cache_bytes=cache_bytes) as reader:
        server = NbdServer(reader, label=export_label(snap, disk), tls=tls).listen_unix(socket_path)
        server.start()
        try:
            yield server
        finally:
            server.close()


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold anything; fields after it are plain
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


@dataclass
class ServeProcess:
    """A running export child: its PID and start time, the sockets it serves, its lease.

    ``with ServeProcess.start(...) as export:`` stops it when the block ends; without ``with`` it
    runs until :meth:`stop`, a SIGTERM, or its lease file being removed."""

    pid: int
    start_time: int
    sockets: dict[str, str]
    lease: str
    log: str

    @classmethod
    def start(
        cls,
        location: str,
        secret: bytes | None,
        snapshot_id: str,
        sockets: Mapping[str, str],
        *,
        lease: str,
        log: str,
        cache_bytes: int | None = None,
    ) -> ServeProcess:
        """Start a child serving each disk named in ``sockets`` on its socket; returns once it
        listens. ``lease`` is created here; the child ends when it disappears."""
        # never through a link: the lease is removed later by whoever ends the export
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lease)
        fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.write(fd, f"{snapshot_id}\n".encode())
        os.close(fd)
        spec = {
            "location": location,
            "secret": None if secret is None else secret.hex(),
            "snapshot": snapshot_id,
            "sockets": dict(sockets),
            "lease": lease,
            "cache_bytes": cache_bytes,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMVAULT_PASSWORD")}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
        # this user's alone (in an instant restore's DIR, QEMU's group may look names up), no link followed
        log_fd = platform.open_nofollow(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | platform.O_CLOEXEC, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.fchmod(log_fd, 0o600)  # one an earlier version made was open to everyone
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmvault.engine._serve_child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(log_fd)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(spec).encode() + b"\n")
            proc.stdin.close()
        except OSError:
            pass
        line = b""
        deadline = time.monotonic() + READY_TIMEOUT
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not platform.wait_readable(proc.stdout.fileno(), left):
                break
            part = os.read(proc.stdout.fileno(), 4096)
            if not part:
                break
            line += part
        proc.stdout.close()
        if line.strip() != b"ready":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            why = line.decode("utf-8", "replace").strip() or _last_line(log) or "it did not start"
            raise VmvaultError(f"the NBD export process failed: {why}")
        start_time = process_start_time(proc.pid)
        if start_time is None:
            raise VmvaultError("the NBD export process ended as soon as it started")
        return cls(proc.pid, start_time, dict(sockets), lease, log)

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.start_time

    def stop(self, *, timeout: float = 10.0) -> None:
        """Remove the lease and end the child (SIGTERM, then SIGKILL after ``timeout``)."""
        with suppress(FileNotFoundError):
            os.unlink(self.lease)
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            _reap(self.pid)
            time.sleep(0.05)
        if self.alive():
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        _reap(self.pid)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def to_doc(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "sockets": self.sockets,
            "lease": self.lease,
            "log": self.log,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, object]) -> ServeProcess:
        try:
            pid, start, sockets = doc["pid"], doc["start_time"], doc["sockets"]
            lease, log = doc["lease"], doc["log"]
            if not (isinstance(pid, int) and isinstance(start, int) and isinstance(sockets, dict)):
                raise TypeError
            if not (isinstance(lease, str) and isinstance(log, str)):
                raise TypeError
            return cls(pid, start, {str(k): str(v) for k, v in sockets.items()}, lease, log)
        except (KeyError, TypeError) as exc:
            raise ConfigError("the export process's record is malformed") from exc


def _reap(pid: int) -> None:
    """Collect the child's exit status when it is ours (a started export whose starter still runs)."""
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _last_line(path: str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""

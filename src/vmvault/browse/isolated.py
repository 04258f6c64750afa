"""The filesystem library in a separate, confined process.

The Sleuth Kit parses what a guest wrote, and a crafted filesystem may crash it, hang it, or
worse. So vmvault runs it in a worker process (:mod:`vmvault.browse._worker`) that holds nothing
worth taking: no repository, no key, no descriptors but two pipes, an environment of three
variables, no right to create files (``RLIMIT_FSIZE`` 0), a bounded address space, no network
and none of the host's System V IPC (network and IPC namespaces of its own, where the system
allows), a removed empty folder as its root (no host path exists for it, not even to ``stat``),
a seccomp filter that allows only the calls computing needs (no file opened, no file system
changed, no program, no socket, no shared memory, no other process reached)
(:mod:`vmvault.browse._seccomp`), and, when vmvault runs as root, not root's user: once it has
loaded what it runs it gives itself transient ids of its own
(:func:`vmvault.platform.transient_ids`), with no group or capability. The worker asks this
process for every byte of the disk it reads; what it answers (names, sizes, paths, file
contents) is checked here before use. A worker that dies, answers garbage, stays silent for
:data:`TIMEOUT` seconds (or stops inside a message) or asks for more than :data:`READ_BUDGET`
bytes of the disk for one request (a loop that keeps reading is never silent) is killed, and the
operation fails with a ``GuestError`` naming the volume; nothing is retried with the same input.

:class:`IsolatedDisk` is one worker for one disk; its volumes are :class:`RemoteFilesystem`
objects with the methods of :class:`~vmvault.browse.filesystems.Filesystem`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from vmvault import platform
from vmvault.errors import GuestError, GuestPathError

from . import _wire
from ._worker import entry_doc
from .filesystems import MAX_DEPTH, MAX_ENTRIES, Entry, Probe, describe
from .partitions import ReadAt

__all__ = ["READ_BUDGET", "TIMEOUT", "WORKER", "IsolatedDisk", "RemoteFilesystem"]

#: seconds the worker may take for one step (a read request or an answer), whole
TIMEOUT = 120.0
#: bytes of the disk the worker may read for one request: far more than listing a folder of a
#: million entries or reading 64 MiB of a file takes
READ_BUDGET = 16 << 30
#: how the worker is started: no user site-packages, no script folder on the path
WORKER = (sys.executable, "-s", "-P", "-m", "vmvault.browse._worker")

_TYPES = ("file", "dir", "symlink", "other")
_MAX_PATH = 64 * 1024

_log = logging.getLogger("vmvault.browse")
#: the limits a worker of this process was found without, each said once per process
_said: set[str] = set()


def missing_limits(pid: int) -> list[str]:
    """What the kernel shows that worker ``pid`` lacks of its limits once it serves requests:
    its seccomp filter (``/proc/PID/status``), a network namespace of its own and a root of its
    own. Read from the kernel, not asked of the worker, which may be lying; nothing where
    ``/proc`` cannot tell (another system, or a worker this process may not look into)."""
    missing: list[str] = []
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            status = f.read()
    except OSError:
        return missing
    mode = re.search(r"^Seccomp:\s*(\d+)", status, re.MULTILINE)
    if mode is not None and mode.group(1) != "2":
        missing.append(
            "its seccomp filter (none is in place on this system: code a hostile filesystem ran in "
            "it could make every system call its user may, such as opening files and sockets)"
        )
    with contextlib.suppress(OSError):
        if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            missing.append(
                "a network namespace of its own (this system allows it none: only its filter keeps it off the network)"
            )
    with contextlib.suppress(OSError):
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/proc/self/root")
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            missing.append(
                "an empty root of its own (this system allows it none: code a hostile filesystem ran in it "
                "could learn which host paths exist, and their sizes and times)"
            )
    return missing


class IsolatedDisk:
    """One worker process reading one disk through ``read``."""

    def __init__(self, read: ReadAt, size: int, *, name: str, command: Sequence[str] = WORKER) -> None:
        self._read = read
        self.size = size
        self.name = name
        self._error: BaseException | None = None
        self._next_volume = 0
        self._next_walk = 0
        # the worker runs this very vmvault (not another copy on the path) and nothing else
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": src, "LC_ALL": "C.UTF-8"}
        #: the user and group ids the worker gives itself once it has loaded what it runs (vmvault
        #: running as root); None: it keeps vmvault's
        self.ids = platform.transient_ids() if platform.current_uid() == 0 else None
        argv = list(command) + ([f"--ids={self.ids[0]}:{self.ids[1]}"] if self.ids is not None else [])
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            cwd="/",
            env=env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._tx: IO[bytes] = self._proc.stdin
        # read unbuffered, so that what select() sees ready is all there is to read
        self._rx: IO[bytes] = open(self._proc.stdout.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
        #: bytes the worker asked for
        self.bytes_read = 0
        self._call_read = 0
        #: what the worker was found without (:func:`missing_limits`), once it first answered
        self.missing: list[str] | None = None

    # ------------------------------------------------------------------------------- protocol

    def _died(self, what: str) -> GuestError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=1)  # a worker that closed its pipe is ending: its own status
        self.close()
        code = self._proc.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"stopped ({code})"
        return GuestError(f"the filesystem library {how} while it {what}: the filesystem is damaged or hostile")

    def _recv(self, what: str) -> tuple[dict[str, Any], bytes]:
        """One message of the worker, whole within :data:`TIMEOUT` seconds."""
        deadline = time.monotonic() + TIMEOUT

        def exact(stream: IO[bytes], n: int) -> bytes:
            out = bytearray()
            while len(out) < n:
                left = deadline - time.monotonic()
                if not platform.wait_readable(stream.fileno(), left):
                    raise TimeoutError
                part = stream.read(min(n - len(out), 1 << 20))
                if not part:
                    raise _wire.WireError("the pipe closed")
                out += part
            return bytes(out)

        try:
            return _wire.recv(self._rx, exact)
        except TimeoutError:
            self.close()
            raise GuestError(f"the filesystem library did not answer within {TIMEOUT:.0f} s while it {what}") from None
        except _wire.WireError as exc:
            raise self._died(what) from exc

    def call(self, request: dict[str, Any], what: str) -> tuple[Any, bytes, dict[str, Any]]:
        """Send ``request``; serve the worker's reads until it answers; the result, data, header."""
        if self._proc.poll() is not None:
            raise self._died(what)
        self._error = None
        self._call_read = 0
        try:
            _wire.send(self._tx, request)
        except OSError as exc:
            raise self._died(what) from exc
        while True:
            header, data = self._recv(what)
            if "read" in header:
                self._serve_read(header["read"], what)
                continue
            if self.missing is None:
                self._check_limits()
            err, self._error = self._error, None
            if err is not None:
                # the disk itself could not be read (a damaged chunk): say that, whatever the
                # library made of the failed read (an error, or a "damaged" filesystem)
                raise err
            if "error" in header:
                raise _rebuild(header["error"])
            return header.get("result"), data, header

    def _check_limits(self) -> None:
        """Once the worker answers it has limited itself (it does so before it reads a request):
        a limit the kernel shows missing is said once per process, as a warning."""
        self.missing = missing_limits(self._proc.pid)
        for limit in self.missing:
            if limit not in _said:
                _said.add(limit)
                _log.warning("the filesystem worker runs without %s", limit)

    def _serve_read(self, request: Any, what: str) -> None:
        if (
            not isinstance(request, list)
            or len(request) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in request)
        ):
            self.close()
            raise GuestError(f"the filesystem library sent a malformed read request while it {what}")
        offset, length = request
        if offset < 0 or length < 0 or length > _wire.MAX_DATA:
            self.close()
            raise GuestError(f"the filesystem library asked to read {length} bytes at {offset} while it {what}")
        self._call_read += length
        if self._call_read > READ_BUDGET:
            self.close()
            raise GuestError(
                f"the filesystem library asked for more than {READ_BUDGET >> 20} MiB of the disk while it {what}: "
                "the filesystem is damaged or hostile"
            )
        try:
            data = self._read(offset, length) if offset < self.size else b""
        except Exception as exc:
            if self._error is None:
                self._error = exc
            reply: dict[str, Any] = {"error": "read failed"}
            data = b""
        else:
            reply = {}
            self.bytes_read += len(data)
        try:
            _wire.send(self._tx, reply, data)
        except OSError as exc:
            raise self._died(what) from exc

    # ------------------------------------------------------------------------------- volumes

    def probe(self, offset: int, size: int) -> tuple[Probe, RemoteFilesystem | None]:
        volume = self._next_volume
        self._next_volume += 1
        doc, _, _ = self.call(
            {"op": "probe", "volume": volume, "offset": offset, "size": size}, f"read the volume at {offset}"
        )
        if not isinstance(doc, dict):
            raise GuestError("the filesystem library answered a probe with garbage")
        found = Probe(_text(doc.get("kind"), 32), _text(doc.get("status"), 16), _text(doc.get("note"), 4096))
        if found.status not in ("ok", "unsupported", "none", "damaged"):
            raise GuestError("the filesystem library answered a probe with garbage")
        fs_doc = doc.get("fs")
        if found.status != "ok" or not isinstance(fs_doc, dict):
            return found, None
        return found, RemoteFilesystem(self, volume, fs_doc)

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._tx.close()
        with contextlib.suppress(OSError):
            self._rx.close()
        if self._proc.stdout is not None:
            with contextlib.suppress(OSError):
                self._proc.stdout.close()
        self._proc.wait()


def _text(value: Any, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise GuestError("the filesystem library answered with garbage")
    return value


def _rebuild(error: Any) -> GuestError:
    if not isinstance(error, dict):
        return GuestError("the filesystem library failed")
    message = error.get("message")
    message = message if isinstance(message, str) and len(message) < 4096 else "the filesystem library failed"
    if error.get("type") == "path":
        path = error.get("path")
        path = path if isinstance(path, str) and len(path) < _MAX_PATH else None
        exc = GuestPathError("", path=path)
        exc.args = (message,)  # the worker's message already names the path
        return exc
    if error.get("type") == "read":
        return GuestError("the disk could not be read")
    return GuestError(message)


_BAD_NAME = re.compile(r"[/\x00]")


def _entry(doc: Any, parent: str | None = None) -> Entry:
    """An entry the worker sent, checked: a hostile worker cannot make a name that climbs out
    of its folder, a path that is not below its parent, or absurd numbers."""
    if not isinstance(doc, dict):
        raise GuestError("the filesystem library sent a malformed entry")
    try:
        name, path, kind = _text(doc["name"], 4096), _text(doc["path"], _MAX_PATH), _text(doc["type"], 16)
        size, mode, inode = doc["size"], doc["mode"], doc["inode"]
        mtime, target = doc["mtime_ns"], doc["target"]
    except KeyError as exc:
        raise GuestError("the filesystem library sent a malformed entry") from exc
    ints = (size, mode, inode) + ((mtime,) if mtime is not None else ())
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in ints):
        raise GuestError(f"the filesystem library sent an entry with bad numbers: {path!r}")
    if kind not in _TYPES or (target is not None and not isinstance(target, str)):
        raise GuestError(f"the filesystem library sent a malformed entry: {path!r}")
    if path != "/" and (name in ("", ".", "..") or _BAD_NAME.search(name)):
        raise GuestError(f"the filesystem library sent an entry named {name!r}")
    parts = path.split("/")
    if path != "/" and (parts[0] != "" or parts[-1] != name or any(p in ("", ".", "..") for p in parts[1:])):
        raise GuestError(f"the filesystem library sent an entry at {path!r}")
    if "\0" in path:
        raise GuestError(f"the filesystem library sent an entry at {path!r}")
    if parent is not None and path != parent.rstrip("/") + "/" + name:
        raise GuestError(f"the filesystem library sent {path!r} as an entry of {parent!r}")
    return Entry(name, path, kind, size, mtime, mode, inode, target)


class RemoteFilesystem:
    """A filesystem in the worker, with the methods of :class:`Filesystem`."""

    def __init__(self, disk: IsolatedDisk, volume: int, doc: dict[str, Any]) -> None:
        self._disk = disk
        self._volume = volume
        self.kind = _text(doc.get("kind"), 32)
        self.case_insensitive = bool(doc.get("case_insensitive"))
        self.root = _entry(doc.get("root"))

    @property
    def bytes_read(self) -> int:
        return self._disk.bytes_read

    def _call(self, request: dict[str, Any], what: str) -> tuple[Any, bytes]:
        result, data, _ = self._disk.call({**request, "volume": self._volume}, what)
        return result, data

    def lookup(self, path: str) -> Entry:
        doc, _ = self._call({"op": "lookup", "path": path}, f"looked up {path}")
        entry = _entry(doc)
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if len(entry.path.split("/")) - 1 != len(parts) and entry.path != "/":
            raise GuestError(f"the filesystem library answered {entry.path!r} for {path!r}")
        return entry

    def _pages(self, first: dict[str, Any], what: str) -> Iterator[Any]:
        """The entry documents of a listing or walk, sent in pieces: ``first`` asks for the first
        piece (or for none), "walk_next" for each next one."""
        walk = self._disk._next_walk
        self._disk._next_walk += 1
        request = {**first, "volume": self._volume, "walk": walk}
        while True:
            result, _, header = self._disk.call(request, what)
            if result is not None:
                if not isinstance(result, list):
                    raise GuestError("the filesystem library sent a malformed listing")
                yield from result
                if header.get("end", True):
                    return
            request = {"op": "walk_next", "volume": self._volume, "walk": walk}

    def listdir(self, entry: Entry) -> list[Entry]:
        docs = self._pages({"op": "listdir", "entry": entry_doc(entry)}, f"listed {entry.path}")
        out = []
        for doc in docs:
            out.append(_entry(doc, entry.path))
            if len(out) > MAX_ENTRIES:
                raise GuestError(f"the filesystem library sent more than {MAX_ENTRIES} entries of {entry.path}")
        return out

    def walk(self, entry: Entry) -> Iterator[Entry]:
        base = entry.path.rstrip("/") + "/"
        for doc in self._pages({"op": "walk", "entry": entry_doc(entry)}, f"walked {entry.path}"):
            child = _entry(doc)
            if not child.path.startswith(base) or child.path.count("/") - base.count("/") >= MAX_DEPTH:
                raise GuestError(f"the filesystem library sent {child.path!r} below {entry.path!r}")
            yield child

    def holes(self, entry: Entry) -> list[tuple[int, int]]:
        doc, _ = self._call({"op": "holes", "entry": entry_doc(entry)}, f"read the layout of {entry.path}")
        if not isinstance(doc, list):
            raise GuestError("the filesystem library sent a malformed layout")
        out = []
        end = 0
        for pair in doc:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
                raise GuestError("the filesystem library sent a malformed layout")
            offset, length = pair
            if offset < end or length <= 0 or offset + length > entry.size:
                raise GuestError(f"the filesystem library sent a bad layout for {entry.path}")
            out.append((offset, length))
            end = offset + length
        return out

    def reader(self, entry: Entry) -> Callable[[int, int], bytes]:
        if entry.type != "file":
            raise GuestPathError(f"{entry.path} is a {describe(entry)}, not a file", path=entry.path)
        doc = entry_doc(entry)

        def read(offset: int, length: int) -> bytes:
            length = min(length, entry.size - offset, _wire.MAX_DATA)
            if length <= 0:
                return b""
            _, data = self._call({"op": "read", "entry": doc, "offset": offset, "length": length}, f"read {entry.path}")
            if len(data) != length:
                raise GuestError(f"{entry.path}: the filesystem returned {len(data)} of {length} bytes at {offset}")
            return data

        return read

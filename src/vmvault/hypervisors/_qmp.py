"""A small synchronous client for QEMU's JSON line protocols: QMP and the guest agent.

Why our own and not qemu.qmp: qemu.qmp is asyncio-only (the engine runs in threads and
would need an event loop per session), does not speak the guest agent's ``guest-sync``
handshake, and is still a 0.0.x release whose API may change; this client is ~250 lines,
synchronous, reports the peer's PID (SO_PEERCRED) and turns every failure into a
``HypervisorError``. qemu.qmp is its test oracle: ``tests/hypervisors/test_qemu_qmp.py``
sends the same commands through both to a real QEMU and compares replies and errors.

Both speak one JSON object per line over a unix socket (QEMU docs/interop/qmp-spec.rst).
QMP opens with a greeting and needs ``qmp_capabilities`` before anything else; replies
carry the ``id`` we sent, and asynchronous events (``{"event": ...}``) may arrive between
them. Events are queued so that a caller can wait for one (``BLOCK_JOB_CANCELLED``, ...)
after the command that triggers it returned. The guest agent has no greeting and no
events; ``guest-sync`` flushes stale replies from an earlier client (qemu-ga docs).

Every failure becomes a ``HypervisorError``; a QMP error reply keeps its class and
description on ``QmpError``.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

from vmvault import shape
from vmvault.errors import HypervisorError

__all__ = ["GuestAgentClient", "NoAnswer", "QmpClient", "QmpError"]

#: struct ucred from <sys/socket.h>: pid, uid, gid (native int layout on Linux)
_UCRED = struct.Struct("=iII")
assert _UCRED.size == 12


class QmpError(HypervisorError):
    """QEMU answered a command with an error reply."""

    def __init__(self, command: str, error_class: str, desc: str, *, socket_path: str | None = None) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        self.socket_path = socket_path
        where = f"{socket_path}: " if socket_path else ""
        super().__init__(f"{where}{command} failed: {error_class}: {desc}")


class NoAnswer(HypervisorError):
    """The peer holds the connection open but sent nothing in time: it is there (stopped,
    stuck or busy), not gone, so whatever was asked of it may still take effect."""


# -- the replies vmvault reads, as QEMU's QAPI schema documents them ----------------------------
# (qapi/block-core.json, block-export.json, misc.json, machine.json, qom.json; only the fields
# vmvault reads, which must then have their documented type; other fields are left alone)

_BITMAP = shape.record(
    {
        "name": shape.optional(shape.text),
        "granularity": shape.positive,
        "persistent": shape.flag,
        "recording": shape.flag,
        "busy": shape.flag,
        "inconsistent": shape.flag,
    }
)
_IMAGE = shape.record(
    {
        "filename": shape.text,
        "format": shape.text,
        "virtual-size": shape.count,
        "format-specific": shape.record({"data": shape.obj}),
    }
)
_INSERTED = shape.record(
    {
        "node-name": shape.text,
        "file": shape.text,
        "drv": shape.text,
        "ro": shape.flag,
        "image": _IMAGE,
    },
    required=("node-name", "image"),
)
_NAMED = shape.optional(shape.text)
#: a successful reply's "return", per command; commands not listed are not read beyond success
REPLIES: dict[str, shape.Check] = {
    "query-name": shape.record({"name": _NAMED}),
    "query-uuid": shape.record({"UUID": shape.text}, required=("UUID",)),
    "query-version": shape.record(
        {
            "qemu": shape.record({"major": shape.count, "minor": shape.count, "micro": shape.count}),
            "package": shape.text,
        },
        required=("qemu",),
    ),
    "query-status": shape.record({"status": shape.text, "running": shape.flag}, required=("status",)),
    "query-memory-size-summary": shape.record({"base-memory": shape.count}, required=("base-memory",)),
    "query-cpus-fast": shape.list_of(shape.obj),
    "query-block": shape.list_of(
        shape.record({"device": shape.text, "qdev": shape.text, "inserted": _INSERTED}, required=("device",))
    ),
    "query-named-block-nodes": shape.list_of(
        shape.record(
            {"node-name": shape.text, "file": shape.text, "dirty-bitmaps": shape.list_of(_BITMAP)},
            required=("node-name",),
        )
    ),
    "query-block-exports": shape.list_of(shape.record({"id": shape.text}, required=("id",))),
    "query-block-jobs": shape.list_of(
        shape.record(
            {
                "device": shape.text,
                "offset": shape.count,
                "len": shape.count,
                "status": shape.text,
                "ready": shape.flag,
            },
            required=("device",),
        )
    ),
    "qom-list": shape.list_of(shape.record({"name": shape.text, "type": shape.text}, required=("name", "type"))),
}


def checked_reply(path: str, command: str, reply: Any) -> Any:
    """``reply`` to ``command`` if it has the documented shape (``REPLIES``); a HypervisorError
    naming the command otherwise: whatever QEMU (or something that took it over) answers is
    read as the schema says, never followed into a KeyError or TypeError."""
    check = REPLIES.get(command)
    if check is not None and not check(reply):
        raise HypervisorError(
            f"{path}: QEMU answered {command} with {shape.describe(reply)}, not the reply its schema documents"
        )
    return reply


def _data(event: dict[str, Any]) -> dict[str, Any]:
    """An event's ``data``: an object, else nothing (what matchers look into is then absent)."""
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def _refusal(command: str, reply: dict[str, Any], path: str) -> QmpError:
    """The ``QmpError`` of an error reply (its class and description, whatever their type)."""
    err = reply["error"] if isinstance(reply["error"], dict) else {}
    return QmpError(command, str(err.get("class", "?")), str(err.get("desc", "?")), socket_path=path)


#: the longest line accepted from QMP or the guest agent (QEMU's largest replies, such as
#: query-named-block-nodes of many disks, stay far below)
MAX_LINE = 16 << 20


class _JsonLineSocket:
    """A unix socket carrying one JSON object per line, read with a deadline."""

    def __init__(self, path: str, *, timeout: float, what: str) -> None:
        self.path = path
        self.timeout = timeout
        self.what = what
        self._sock: socket.socket | None = None
        self._buf = b""
        self._lock = threading.RLock()

    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise HypervisorError(f"{self.path}: cannot connect to {self.what}: {exc.strerror or exc}") from exc
        self._sock = sock
        self._buf = b""

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def peer_pid(self) -> int | None:
        """The PID of the process at the other end (Linux SO_PEERCRED), if known."""
        if self._sock is None or not hasattr(socket, "SO_PEERCRED"):
            return None
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return None
        pid = int(_UCRED.unpack(raw)[0])
        return pid if pid > 0 else None

    def _send(self, obj: Mapping[str, Any]) -> None:
        if self._sock is None:
            raise HypervisorError(f"{self.path}: {self.what} connection is closed")
        try:
            self._sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError as exc:
            self._drop()
            raise HypervisorError(f"{self.path}: {self.what} connection lost while sending: {exc}") from exc

    def _recv(self, deadline: float) -> dict[str, Any]:
        """The next JSON object, waiting at most until ``deadline`` (time.monotonic()). The peer
        may be a guest (the guest agent): a line is at most :data:`MAX_LINE` bytes, and JSON
        nested beyond what the parser takes is an error, not a crash."""
        scanned = 0
        while b"\n" not in self._buf[scanned:]:
            scanned = len(self._buf)
            if scanned > MAX_LINE:
                self._drop()
                raise HypervisorError(f"{self.path}: {self.what} sent a line longer than {MAX_LINE >> 20} MiB")
            if self._sock is None:
                raise HypervisorError(f"{self.path}: {self.what} connection is closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoAnswer(f"{self.path}: no answer from {self.what} within {self.timeout:g} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise NoAnswer(f"{self.path}: no answer from {self.what} within {self.timeout:g} s") from exc
            except OSError as exc:
                self._drop()
                raise HypervisorError(f"{self.path}: {self.what} connection lost: {exc}") from exc
            if not chunk:
                self._drop()
                raise HypervisorError(f"{self.path}: {self.what} closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        if len(line) > MAX_LINE:
            self._drop()
            raise HypervisorError(f"{self.path}: {self.what} sent a line longer than {MAX_LINE >> 20} MiB")
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise HypervisorError(f"{self.path}: {self.what} sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(obj, dict):
            raise HypervisorError(f"{self.path}: {self.what} sent a non-object: {line[:200]!r}")
        return obj

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class QmpClient(_JsonLineSocket):
    """Synchronous QMP: ``execute`` waits for the reply with our id; events are queued."""

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        super().__init__(path, timeout=timeout, what="QMP")
        self.greeting: dict[str, Any] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=10000)
        self._ids = itertools.count(1)

    def connect(self) -> Self:
        with self._lock:
            self._open()
            try:
                try:
                    greeting = self._recv(time.monotonic() + self.timeout)
                except NoAnswer as exc:
                    # QEMU serves one client per QMP socket; others wait in the backlog unanswered.
                    raise NoAnswer(
                        f"{exc} (a QMP socket serves one client at a time: is libvirt, another backup "
                        "or another tool connected to it?)"
                    ) from exc
                if not isinstance(greeting.get("QMP"), dict):
                    raise HypervisorError(f"{self.path}: not a QMP socket (greeting {str(greeting)[:200]})")
                self.greeting = greeting["QMP"]
                self.execute("qmp_capabilities")
            except BaseException:
                self._drop()
                raise
        return self

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run ``command``; its ``return`` value, or ``QmpError`` with QEMU's error class."""
        with self._lock:
            ident = f"vmvault-{next(self._ids)}"
            msg: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                msg["arguments"] = dict(arguments)
            self._send(msg)
            deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
            while True:
                obj = self._recv(deadline)
                if "event" in obj:
                    self.events.append(obj)
                    continue
                if obj.get("id") != ident:
                    continue  # a reply to somebody else's id cannot happen on our own connection; ignore
                if "error" in obj:
                    raise _refusal(command, obj, self.path)
                return checked_reply(self.path, command, obj.get("return"))

    def wait_event(
        self,
        name: str,
        match: Callable[[dict[str, Any]], bool] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Take the first queued or arriving event called ``name`` for which ``match`` holds."""
        with self._lock:
            for ev in list(self.events):
                if ev.get("event") == name and (match is None or match(_data(ev))):
                    self.events.remove(ev)
                    return ev
            deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
            while True:
                obj = self._recv(deadline)
                if "event" not in obj:
                    continue
                if obj.get("event") == name and (match is None or match(_data(obj))):
                    return obj
                self.events.append(obj)


class GuestAgentClient(_JsonLineSocket):
    """The QEMU guest agent (qemu-ga) over its virtio-serial unix socket on the host."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        super().__init__(path, timeout=timeout, what="guest agent")

    def connect(self) -> Self:
        with self._lock:
            self._open()
            try:
                # guest-sync with a fresh id: replies queued for an earlier client are skipped until
                # ours comes back, so the stream is in step (qemu-ga "guest-sync" documentation).
                token = random.randrange(1, 2**31) ^ os.getpid()
                self._send({"execute": "guest-sync", "arguments": {"id": token}})
                deadline = time.monotonic() + self.timeout
                while True:
                    obj = self._recv(deadline)
                    if obj.get("return") == token:
                        break
            except BaseException:
                self._drop()
                raise
        return self

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        with self._lock:
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = dict(arguments)
            self._send(msg)
            obj = self._recv(time.monotonic() + (timeout if timeout is not None else self.timeout))
            if "error" in obj:
                raise _refusal(command, obj, self.path)
            return obj.get("return")

"""The filesystem worker: runs the filesystem library on one disk's bytes, in its own process.

Started by :mod:`vmvault.browse.isolated` as ``python -m vmvault.browse._worker`` with no
repository, no key and no file descriptors but its pipes; before it reads anything it limits
itself (no file may be written, a bounded address space, no core dump, no network, no privileges
gained by exec, a removed empty folder as its root, started as root the transient ids
``--ids=UID:GID`` instead of root's, and a seccomp filter that allows only the calls computing
needs (no file opened, no file system changed, no program, no socket, no other process reached):
:mod:`vmvault.browse._seccomp`). Every byte of the disk it reads is asked of the parent over
stdout and answered on stdin; its answers are checked by the parent like any other untrusted
data. If the library crashes or hangs on a hostile filesystem, only this process dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from vmvault.errors import GuestError, GuestPathError, VmvaultError

from . import _seccomp, _wire
from .filesystems import Entry, Filesystem, library, probe

#: entries sent per answer to "walk_next", at most, and their JSON's size: far below the wire's
#: bound on a message, so that a folder of any number of entries is listed in pieces
BATCH = 2000
BATCH_BYTES = 4 << 20
#: walks (and listings) kept under way at once
WALKS = 8


class _ParentReadFailed(Exception):
    """The parent could not read the disk (it knows why and reports it itself)."""


def entry_doc(e: Entry) -> dict[str, Any]:
    return {
        "name": e.name,
        "path": e.path,
        "type": e.type,
        "size": e.size,
        "mtime_ns": e.mtime_ns,
        "mode": e.mode,
        "inode": e.inode,
        "target": e.target,
    }


def _entry(doc: dict[str, Any]) -> Entry:
    return Entry(
        str(doc["name"]),
        str(doc["path"]),
        str(doc["type"]),
        int(doc["size"]),
        None if doc["mtime_ns"] is None else int(doc["mtime_ns"]),
        int(doc["mode"]),
        int(doc["inode"]),
        None if doc["target"] is None else str(doc["target"]),
    )


class Worker:
    def __init__(self, rx: IO[bytes], tx: IO[bytes]) -> None:
        self.rx, self.tx = rx, tx
        self.volumes: dict[int, Filesystem] = {}
        self.walks: dict[int, Iterator[Entry]] = {}

    def read(self, offset: int, length: int) -> bytes:
        _wire.send(self.tx, {"read": [offset, length]})
        header, data = _wire.recv(self.rx)
        if "error" in header:
            raise _ParentReadFailed(str(header["error"]))
        return data

    def handle(self, msg: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        op = msg.get("op")
        if op == "probe":
            found, fs = probe(self.read, int(msg["offset"]), int(msg["size"]))
            doc: dict[str, Any] = {"kind": found.kind, "status": found.status, "note": found.note}
            if fs is not None:
                self.volumes[int(msg["volume"])] = fs
                doc["fs"] = {"kind": fs.kind, "case_insensitive": fs.case_insensitive, "root": entry_doc(fs.root)}
            return {"result": doc}, b""
        fs = self.volumes[int(msg["volume"])]
        if op == "lookup":
            return {"result": entry_doc(fs.lookup(str(msg["path"])))}, b""
        if op == "listdir":  # the first piece; the rest through "walk_next" with the same id
            self.start_walk(int(msg["walk"]), iter(fs.listdir(_entry(msg["entry"]))))
            return self.next_batch(int(msg["walk"]))
        if op == "walk":
            self.start_walk(int(msg["walk"]), fs.walk(_entry(msg["entry"])))
            return {"result": None}, b""
        if op == "walk_next":
            return self.next_batch(int(msg["walk"]))
        if op == "holes":
            return {"result": fs.holes(_entry(msg["entry"]))}, b""
        if op == "read":
            data = fs.reader(_entry(msg["entry"]))(int(msg["offset"]), int(msg["length"]))
            return {"result": None}, data
        raise ValueError(f"unknown request {op!r}")

    def start_walk(self, walk_id: int, entries: Iterator[Entry]) -> None:
        """Keep ``entries`` for "walk_next"; a few walks may be under way at once (a listing
        asked for while a search goes on), the oldest is dropped beyond :data:`WALKS`."""
        self.walks[walk_id] = entries
        while len(self.walks) > WALKS:
            self.walks.pop(next(iter(self.walks)))

    def next_batch(self, walk_id: int) -> tuple[dict[str, Any], bytes]:
        """The next entries of walk ``walk_id`` (at most :data:`BATCH`, about :data:`BATCH_BYTES`)."""
        walk = self.walks.get(walk_id)
        if walk is None:
            raise GuestError(f"more than {WALKS} listings were under way at once; this one was dropped")
        batch: list[dict[str, Any]] = []
        size = 0
        end = True
        for e in walk:
            batch.append(entry_doc(e))
            size += len(e.name) + len(e.path) + len(e.target or "") + 160
            if len(batch) >= BATCH or size >= BATCH_BYTES:
                end = False
                break
        if end:
            self.walks.pop(walk_id, None)
        return {"result": batch, "end": end}, b""

    def serve(self) -> None:
        while True:
            try:
                msg, _ = _wire.recv(self.rx)
            except _wire.WireError:
                return  # the parent is done
            try:
                reply, data = self.handle(msg)
            except _ParentReadFailed:
                reply, data = {"error": {"type": "read"}}, b""
            except GuestPathError as exc:
                reply, data = {"error": {"type": "path", "message": str(exc), "path": exc.path}}, b""
            except GuestError as exc:
                reply, data = {"error": {"type": "guest", "message": str(exc)}}, b""
            _wire.send(self.tx, reply, data)


#: the worker's address space: the library, one batch of entries and one read, with room
MEMORY = 2 << 30


_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWIPC = 0x08000000
_PR_SET_NO_NEW_PRIVS = 38


def _leave_the_network(libc: ctypes.CDLL, *, user: bool = True) -> bool:
    """Move into a network namespace of its own, which has no interface but a loopback that is
    down: no connection anywhere; with an IPC namespace of its own too, where the system allows
    (no System V IPC object or POSIX message queue of the host's). Inside a new user namespace
    where the system allows one and ``user`` (that also takes away root's capabilities on the
    host), else alone (root may); False if no network namespace could be had."""
    attempts = [_CLONE_NEWNET | _CLONE_NEWIPC, _CLONE_NEWNET]
    if user:
        attempts = [_CLONE_NEWUSER | flags for flags in attempts] + attempts
    return any(libc.unshare(flags) == 0 for flags in attempts)


def _enter_an_empty_folder() -> bool:
    """Make a folder of its own, step into it and remove it: an empty folder nothing can be made
    in, and no path leads to; False (and back at ``/``) where none could be made."""
    try:
        folder = tempfile.mkdtemp(prefix="vmvault-worker-")
    except OSError:
        return False
    try:
        os.chdir(folder)
        os.rmdir(folder)
    except OSError:
        with contextlib.suppress(OSError):
            os.chdir("/")
            os.rmdir(folder)
        return False
    return True


def _take_the_empty_root(libc: ctypes.CDLL, emptied: bool) -> bool:
    """Make the removed folder it stands in (:func:`_enter_an_empty_folder`) its root: no host
    path exists for it any more, so it cannot even learn which do, nor their sizes and times
    (calls the filter cannot refuse: glibc's ``fstat`` of its pipes is ``newfstatat``). Needs
    root's right to (root, or inside a user namespace of its own)."""
    return emptied and libc.chroot(b".") == 0


def confine(ids: tuple[int, int] | None = None) -> None:
    """Limits the worker puts on itself before it parses anything a guest wrote. ``ids``: the
    user and group ids it takes instead of root's (started as root), once everything it runs is
    loaded (a Python installed under /root is not readable by them)."""
    # made first: before any user namespace (where a user without ids on the host may make
    # nothing) and the limit on files (the temporary folder is found by writing a file there)
    emptied = _enter_an_empty_folder()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # it never writes a file
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a system without a C library to ask
        return
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no set-user-ID program can give it more rights
    # everything it will run is loaded now: from here on it reads no file (its root, its ids, then
    # the filter)
    with contextlib.suppress(VmvaultError):
        library()  # (a broken install is reported by the first probe, as before)
    rooted = False
    if ids is not None:
        # as root it may leave the network alone (in a user namespace it could not change its ids)
        _leave_the_network(libc, user=False)
        try:
            os.setgroups([])
            os.setresgid(ids[1], ids[1], ids[1])
            rooted = _take_the_empty_root(libc, emptied)  # while it is root
            os.setresuid(ids[0], ids[0], ids[0])
        except OSError:  # a root without the right to change ids (a container's): as before, root's
            ids = None
    if ids is None:
        _leave_the_network(libc)  # (a user namespace is refused to a process that changed its root)
        if not rooted:
            _take_the_empty_root(libc, emptied)
    _seccomp.install()


def _ids(argv: list[str]) -> tuple[int, int] | None:
    for arg in argv:
        if arg.startswith("--ids="):
            uid, _, gid = arg[len("--ids=") :].partition(":")
            return int(uid), int(gid)
    return None


def main() -> None:
    confine(_ids(sys.argv[1:]))
    rx, tx = _wire.binary_stdio()
    sys.stdout = sys.stderr  # nothing but the wire may reach the parent's pipe
    Worker(rx, tx).serve()


if __name__ == "__main__":
    main()

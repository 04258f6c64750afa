"""Reading a QEMU NBD export as a ``DiskImage``, with block status and dirty bitmaps.

A small NBD client written against the NBD protocol specification (doc/proto.md in the
NetworkBlockDevice/nbd repository): fixed newstyle handshake, ``NBD_OPT_STRUCTURED_REPLY``,
``NBD_OPT_SET_META_CONTEXT`` for ``base:allocation`` and ``qemu:dirty-bitmap:NAME``
(QEMU docs/interop/nbd.txt), ``NBD_OPT_GO``, then ``NBD_CMD_READ`` and
``NBD_CMD_BLOCK_STATUS``. It needs no Python module and no external program, so it works
whatever the Python version; ``backend="libnbd"`` uses the libnbd bindings instead where
they import (see ``import_libnbd``).

The wire layout is in ``nbd_layout`` (shared with vmvault's own server): every field is big-endian.
``NbdImage`` keeps a pool of connections, one per concurrently reading thread, because an
NBD connection carries one request at a time here (requests are not pipelined).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from vmvault.disk.base import DiskImage, Extent, ExtentKind, coalesce
from vmvault.errors import SourceError
from vmvault.hypervisors._debian import import_system_module
from vmvault.hypervisors.nbd_layout import (
    BASE_ALLOCATION,
    BLOCK_DESCRIPTOR,
    CLIENT_FLAGS,
    DIRTY_BITMAP_PREFIX,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBD_ERRNO,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY,
    REP_ERROR_BIT,
    REP_ERRORS,
    REPLY_FLAG_DONE,
    REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SERVER_HELLO,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STATE_DIRTY,
    STATE_ZERO,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Info,
    Opt,
    Rep,
    ReplyType,
)

__all__ = ["NbdConnection", "NbdImage", "import_libnbd"]


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """One structured-reply chunk header."""

    flags: int
    type: int
    cookie: int
    length: int

    @classmethod
    def unpack(cls, raw: bytes) -> ReplyChunk:
        magic, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(raw)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ValueError(f"bad structured reply magic {magic:#x}")
        return cls(flags, rtype, cookie, length)

    def pack(self) -> bytes:
        return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, self.flags, self.type, self.cookie, self.length)

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)


# -- client -----------------------------------------------------------------------------------

#: QEMU's NBD server refuses payloads over 32 MiB (NBD_MAX_BUFFER_SIZE in include/block/nbd.h)
MAX_READ = 32 * 1024 * 1024
#: The server is QEMU, which runs what its guest may have taken over: what it may make vmvault
#: read is bounded. An option reply holds a string of at most 4 KiB (proto.md, "Conventions")
#: and a few fields.
MAX_OPTION_REPLY = 64 * 1024
#: the largest minimum block size the NBD protocol allows (a power of two up to 64 KiB)
MAX_MIN_BLOCK = 64 * 1024
#: replies to one option before the server's last word (ACK or an error)
MAX_OPTION_REPLIES = 1024
#: one reply's bytes besides the data read into the caller's buffer: chunk headers, holes,
#: block status descriptors (8 bytes per extent: 4 M extents), error messages
MAX_REPLY_METADATA = MAX_READ + (1 << 20)
#: block status is asked for in steps well inside the 32-bit length field
STATUS_STEP = 1 << 30
#: an answer to a block status may cover less than was asked (a server choice the protocol
#: allows); one covering less than this is completed with the safe flags, so that a server
#: answering a byte at a time cannot make a backup ask once per byte
MIN_STATUS_STEP = 1 << 20
#: most connections one image keeps open at once (one per reading thread)
MAX_CONNECTIONS = 16


class NbdConnectionLost(SourceError):
    """The connection dropped or the server broke the protocol; a new connection may work."""


class _Connection(Protocol):
    size: int

    def read_into(self, offset: int, view: memoryview) -> None: ...

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int, int]]: ...

    def close(self) -> None: ...


class NbdConnection:
    """One NBD connection to a unix socket, negotiated for ``contexts``. Not thread-safe."""

    def __init__(self, socket_path: str, export: str, contexts: tuple[str, ...] = (), *, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.export = export
        self.url = f"nbd+unix:///{export}?socket={socket_path}"
        self.size = 0
        self.transmission_flags = 0
        self.min_block = 1
        self.max_block = MAX_READ
        self.structured = False
        #: negotiated metadata context name -> the server's id for it
        self.context_ids: dict[str, int] = {}
        self._cookies = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(socket_path)
        except OSError as exc:
            self._sock.close()
            raise SourceError(f"{self.url}: cannot connect to the NBD server: {exc.strerror or exc}") from exc
        try:
            self._handshake(contexts)
        except BaseException:
            self._sock.close()
            raise

    # -- low level ----------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket (straight into the caller's buffer: no copies)."""
        got, n = 0, len(view)
        while got < n:
            try:
                k = self._sock.recv_into(view[got:], n - got)
            except OSError as exc:
                raise NbdConnectionLost(f"{self.url}: NBD connection lost: {exc}") from exc
            if k == 0:
                raise NbdConnectionLost(f"{self.url}: NBD server closed the connection")
            got += k

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise NbdConnectionLost(f"{self.url}: NBD connection lost while sending: {exc}") from exc

    def _send_option(self, opt: Opt, data: bytes = b"") -> None:
        self._send(OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self, opt: Opt) -> tuple[int, bytes]:
        magic, ropt, rtype, length = OPTION_REPLY.unpack(self._recv_exact(OPTION_REPLY.size))
        if magic != REPLY_MAGIC or ropt != opt:
            raise NbdConnectionLost(f"{self.url}: bad option reply (magic {magic:#x}, option {ropt})")
        if length > MAX_OPTION_REPLY:
            raise NbdConnectionLost(f"{self.url}: option reply of {length} bytes (at most {MAX_OPTION_REPLY})")
        return rtype, self._recv_exact(length) if length else b""

    def _option_replies(self, opt: Opt) -> Iterator[tuple[int, bytes]]:
        """The replies to ``opt`` up to and including its ACK or error, at most MAX_OPTION_REPLIES."""
        for _ in range(MAX_OPTION_REPLIES):
            rtype, payload = self._option_reply(opt)
            yield rtype, payload
            if rtype == Rep.ACK or rtype & REP_ERROR_BIT:
                return
        raise NbdConnectionLost(f"{self.url}: more than {MAX_OPTION_REPLIES} replies to {opt.name}")

    def _option_error(self, opt: Opt, rtype: int, payload: bytes) -> SourceError:
        what = REP_ERRORS.get(rtype, f"error {rtype & ~REP_ERROR_BIT}")
        text = payload.decode("utf-8", "replace").strip()
        return SourceError(f"{self.url}: NBD server refused {opt.name}: {what}{': ' + text if text else ''}")

    # -- handshake (proto.md "Fixed newstyle negotiation") -----------------------------------
    def _handshake(self, contexts: tuple[str, ...]) -> None:
        magic, opt_magic, hflags = SERVER_HELLO.unpack(self._recv_exact(SERVER_HELLO.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise SourceError(f"{self.url}: not a newstyle NBD server (magic {magic:#x}/{opt_magic:#x})")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise SourceError(f"{self.url}: NBD server does not speak fixed newstyle negotiation")
        self._send(CLIENT_FLAGS.pack(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))

        self._send_option(Opt.STRUCTURED_REPLY)
        rtype, payload = self._option_reply(Opt.STRUCTURED_REPLY)
        self.structured = rtype == Rep.ACK
        if contexts and not self.structured:
            raise self._option_error(Opt.STRUCTURED_REPLY, rtype, payload)

        name = self.export.encode()
        if contexts:
            queries = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in contexts)
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + queries
            self._send_option(Opt.SET_META_CONTEXT, data)
            for rtype, payload in self._option_replies(Opt.SET_META_CONTEXT):
                if rtype & REP_ERROR_BIT:
                    raise self._option_error(Opt.SET_META_CONTEXT, rtype, payload)
                if rtype == Rep.META_CONTEXT and len(payload) >= 4:
                    (cid,) = struct.unpack_from(">I", payload)
                    self.context_ids[payload[4:].decode("utf-8", "replace")] = cid
            missing = [c for c in contexts if c not in self.context_ids]
            if missing:
                raise SourceError(f"{self.url}: NBD server does not offer metadata context {', '.join(missing)}")

        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        self._send_option(Opt.GO, data)
        have_export = False
        for rtype, payload in self._option_replies(Opt.GO):
            if rtype & REP_ERROR_BIT:
                raise self._option_error(Opt.GO, rtype, payload)
            if rtype != Rep.INFO or len(payload) < 2:
                continue
            (info,) = struct.unpack_from(">H", payload)
            if info == Info.EXPORT and len(payload) >= INFO_EXPORT.size:
                _, self.size, self.transmission_flags = INFO_EXPORT.unpack_from(payload)
                have_export = True
            elif info == Info.BLOCK_SIZE and len(payload) >= INFO_BLOCK_SIZE.size:
                _, minimum, _preferred, maximum = INFO_BLOCK_SIZE.unpack_from(payload)
                if minimum & (minimum - 1) or minimum > MAX_MIN_BLOCK:  # proto.md, "Block size constraints"
                    raise SourceError(f"{self.url}: NBD server gives {minimum} bytes as its minimum block size")
                self.min_block = max(1, minimum)
                self.max_block = max(self.min_block, min(maximum, MAX_READ))
        if not have_export:
            raise SourceError(f"{self.url}: NBD server did not describe the export (no NBD_INFO_EXPORT)")

    # -- transmission (proto.md "Transmission phase", "Structured reply chunk message types") --
    def _request(self, cmd: Cmd, offset: int, length: int) -> int:
        cookie = next(self._cookies)
        self._send(REQUEST.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length))
        return cookie

    def _chunks(self, cookie: int, target: tuple[int, memoryview] | None = None) -> Iterator[tuple[int, bytes, int]]:
        """(reply type, payload, data bytes) of every chunk answering ``cookie``.

        With ``target`` = (request offset, buffer), the data of NBD_REPLY_TYPE_OFFSET_DATA
        chunks goes straight into the buffer and only its length is reported. An error chunk
        raises once the reply is complete, so the stream stays in step.
        """
        error: str | None = None
        budget = MAX_REPLY_METADATA
        while True:
            head = self._recv_exact(4)
            (magic,) = struct.unpack(">I", head)
            if magic == SIMPLE_REPLY_MAGIC:
                _, err, rcookie = SIMPLE_REPLY.unpack(head + self._recv_exact(SIMPLE_REPLY.size - 4))
                if rcookie != cookie:
                    raise NbdConnectionLost(f"{self.url}: reply for unknown request {rcookie}")
                if err:
                    raise SourceError(f"{self.url}: NBD server error {NBD_ERRNO.get(err, err)}")
                yield ReplyType.NONE, b"", 0
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdConnectionLost(f"{self.url}: bad NBD reply magic {magic:#x}")
            chunk = ReplyChunk.unpack(head + self._recv_exact(STRUCTURED_REPLY.size - 4))
            if chunk.cookie != cookie:
                raise NbdConnectionLost(f"{self.url}: reply for unknown request {chunk.cookie}")
            data = chunk.type == ReplyType.OFFSET_DATA and target is not None and chunk.length >= 8
            budget -= STRUCTURED_REPLY.size + (8 if data else chunk.length)
            if budget < 0:
                raise NbdConnectionLost(
                    f"{self.url}: the reply to one request holds more than {MAX_REPLY_METADATA} bytes besides its data"
                )
            if data:
                assert target is not None
                (off,) = struct.unpack(">Q", self._recv_exact(8))
                start, view = target
                rel, n = off - start, chunk.length - 8
                if rel < 0 or rel + n > len(view):
                    raise NbdConnectionLost(f"{self.url}: data chunk at {off:#x} outside the request")
                self._recv_into(view[rel : rel + n])
                yield chunk.type, b"", n
            else:
                payload = self._recv_exact(chunk.length) if chunk.length else b""
                if chunk.type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET) or chunk.type & (1 << 15):
                    err, mlen = struct.unpack_from(">IH", payload) if len(payload) >= 6 else (0, 0)
                    msg = payload[6 : 6 + mlen].decode("utf-8", "replace")
                    error = f"NBD server error {NBD_ERRNO.get(err, err)}{': ' + msg if msg else ''}"
                else:
                    yield chunk.type, payload, 0
            if chunk.done:
                break
        if error is not None:
            raise SourceError(f"{self.url}: {error}")

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; the caller keeps ``length`` within ``max_block``."""
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset`` (holes are written as zeros)."""
        length = len(view)
        if length == 0:
            return
        cookie = self._request(Cmd.READ, offset, length)
        if not self.structured:
            _, err, _rcookie = SIMPLE_REPLY.unpack(self._recv_exact(SIMPLE_REPLY.size))
            if err:
                raise SourceError(f"{self.url}: read at offset {offset:#x} failed: {NBD_ERRNO.get(err, err)}")
            self._recv_into(view)
            return
        covered = 0
        for rtype, payload, n in self._chunks(cookie, (offset, view)):
            if rtype == ReplyType.OFFSET_DATA:
                covered += n
            elif rtype == ReplyType.OFFSET_HOLE:
                if len(payload) != 12:
                    raise NbdConnectionLost(f"{self.url}: hole chunk of {len(payload)} bytes (12 expected)")
                off, hole = struct.unpack_from(">QI", payload)
                if off < offset or off + hole > offset + length:
                    raise NbdConnectionLost(f"{self.url}: hole chunk at {off:#x} outside the request")
                view[off - offset : off - offset + hole] = bytes(hole)
                covered += hole
            if covered > length:  # chunks overlap: a server that could answer without end
                raise NbdConnectionLost(f"{self.url}: read at {offset:#x} answered more than its {length} bytes")
        if covered != length:
            raise NbdConnectionLost(f"{self.url}: read at {offset:#x} answered {covered} of {length} bytes")

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(offset, length, flags) descriptors of ``context`` from ``offset``; may stop short."""
        cid = self.context_ids.get(context)
        if cid is None:
            raise SourceError(f"{self.url}: metadata context {context} was not negotiated")
        cookie = self._request(Cmd.BLOCK_STATUS, offset, length)
        out: list[tuple[int, int, int]] = []
        for rtype, payload, _ in self._chunks(cookie):
            if rtype != ReplyType.BLOCK_STATUS or len(payload) < 4:
                continue
            (rid,) = struct.unpack_from(">I", payload)
            if rid != cid:
                continue
            pos = offset
            for i in range(4, len(payload) - BLOCK_DESCRIPTOR.size + 1, BLOCK_DESCRIPTOR.size):
                n, flags = BLOCK_DESCRIPTOR.unpack_from(payload, i)
                out.append((pos, n, flags))
                pos += n
        if not out or out[0][1] == 0:
            raise NbdConnectionLost(f"{self.url}: empty block status for {context} at {offset:#x}")
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, next(self._cookies), 0, 0))
        self._sock.close()


# -- libnbd (optional) ---------------------------------------------------------------------------


def import_libnbd() -> Any | None:
    """The ``nbd`` module of libnbd's Python bindings, or None when it cannot be loaded.

    Debian's python3-libnbd is built for the system Python only; ``import_system_module``
    loads it for ours when the versions match.
    """
    return import_system_module("nbd", ("libnbdmod",))


class LibnbdConnection:
    """The same operations as ``NbdConnection`` through libnbd (``nbd.NBD``)."""

    def __init__(self, nbd: Any, socket_path: str, export: str, contexts: tuple[str, ...] = ()) -> None:
        self._nbd = nbd
        self.url = f"nbd+unix:///{export}?socket={socket_path}"
        self.min_block = 1
        self.max_block = MAX_READ
        self._h = nbd.NBD()
        try:
            self._h.set_export_name(export)
            for ctx in contexts:
                self._h.add_meta_context(ctx)
            self._h.connect_unix(socket_path)
            missing = [c for c in contexts if not self._h.can_meta_context(c)]
            if missing:
                raise SourceError(f"{self.url}: NBD server does not offer metadata context {', '.join(missing)}")
            self.size = int(self._h.get_size())
        except nbd.Error as exc:
            raise SourceError(f"{self.url}: cannot connect with libnbd: {exc}") from exc

    def read_into(self, offset: int, view: memoryview) -> None:
        try:
            view[:] = self._h.pread(len(view), offset)
        except self._nbd.Error as exc:
            raise NbdConnectionLost(f"{self.url}: read at offset {offset:#x} failed: {exc}") from exc

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []

        def collect(meta: str, off: int, entries: list[int], err: Any) -> int:
            if meta == context:
                pos = off
                for i in range(0, len(entries) - 1, 2):
                    out.append((pos, entries[i], entries[i + 1]))
                    pos += entries[i]
            return 0

        try:
            self._h.block_status(length, offset, collect)
        except self._nbd.Error as exc:
            raise NbdConnectionLost(f"{self.url}: block status at {offset:#x} failed: {exc}") from exc
        if not out:
            raise NbdConnectionLost(f"{self.url}: empty block status for {context} at {offset:#x}")
        return out

    def close(self) -> None:
        # libnbd frees the handle when the object goes; shutdown sends NBD_CMD_DISC first
        with contextlib.suppress(self._nbd.Error):
            self._h.shutdown()


# -- the disk image --------------------------------------------------------------------------------


class NbdImage(DiskImage):
    """A read-only NBD export as a disk: holes from ``base:allocation``, reads split to 32 MiB.

    Thread-safe: each call borrows a connection from a small pool (a new one is opened when
    all are busy), so several threads read in parallel. A call whose connection drops is
    retried once on a fresh connection; the export is a frozen view, so a repeated read
    returns the same bytes.
    """

    format = "nbd"

    def __init__(
        self,
        socket_path: str,
        export: str,
        *,
        bitmap: str | None = None,
        backend: str = "python",
        timeout: float = 60.0,
    ) -> None:
        self.socket_path = socket_path
        self.export = export
        self.bitmap = bitmap
        self.backend = backend
        self._timeout = timeout
        self._contexts: tuple[str, ...] = (BASE_ALLOCATION,) + ((DIRTY_BITMAP_PREFIX + bitmap,) if bitmap else ())
        self._libnbd: Any = None
        if backend == "libnbd":
            self._libnbd = import_libnbd()
            if self._libnbd is None:
                raise SourceError(f"libnbd's Python bindings cannot be loaded for Python {sys.version.split()[0]}")
        elif backend != "python":
            raise ValueError(f"unknown NBD backend {backend!r}")
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._open_count = 0
        self._closed = False
        first = self._connect()
        self._size = first.size
        self._align = max(1, int(getattr(first, "min_block", 1)))
        self._idle.append(first)

    @property
    def size(self) -> int:
        return self._size

    @property
    def path(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket_path}"

    def _connect(self) -> _Connection:
        conn: _Connection
        if self._libnbd is not None:
            conn = LibnbdConnection(self._libnbd, self.socket_path, self.export, self._contexts)
        else:
            conn = NbdConnection(self.socket_path, self.export, self._contexts, timeout=self._timeout)
        with self._lock:
            self._open_count += 1
        return conn

    def _acquire(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise SourceError(f"{self.path}: the disk is closed (the backup session ended)")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_CONNECTIONS:
                self._idle.append(conn)
                return
            self._open_count -= 1
        conn.close()

    def _discard(self, conn: _Connection) -> None:
        with self._lock:
            self._open_count -= 1
        with contextlib.suppress(OSError):
            conn.close()

    def _call(self, op: str, *args: Any) -> Any:
        for attempt in (1, 2):
            conn = self._acquire()
            try:
                result = getattr(conn, op)(*args)
            except NbdConnectionLost:
                self._discard(conn)
                if attempt == 2:
                    raise
                continue
            except BaseException:
                self._discard(conn)
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")

    def _status(self, context: str, safe: int) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) of ``context`` over the whole export, in order. Where an
        answer covers less than ``MIN_STATUS_STEP``, the rest of that step gets the flags
        ``safe`` (data, dirty) rather than another request: at most size / 1 MiB requests
        whatever the server does."""
        pos = 0
        while pos < self._size:
            step = min(STATUS_STEP, self._size - pos)
            got = self._call("block_status", context, pos, step)
            end = pos
            for off, n, flags in got:
                n = min(n, self._size - off)
                if n > 0:
                    yield off, n, flags
                    end = off + n
            least = pos + min(step, MIN_STATUS_STEP)
            if end < least:
                yield end, least - end, safe
                end = least
            pos = end

    def extents(self) -> Iterator[Extent]:
        """DATA where the export stores bytes, ZERO where ``base:allocation`` says reads give zeros."""

        def raw() -> Iterator[Extent]:
            for off, n, flags in self._status(BASE_ALLOCATION, safe=0):
                yield Extent(off, n, ExtentKind.ZERO if flags & STATE_ZERO else ExtentKind.DATA)

        yield from coalesce(raw())

    def dirty_extents(self, bitmap: str | None = None) -> list[tuple[int, int]]:
        """(offset, length) of the ranges marked dirty in ``qemu:dirty-bitmap:<bitmap>``."""
        name = bitmap or self.bitmap
        if name is None:
            raise SourceError(f"{self.path}: no dirty bitmap is exported with this disk")
        context = DIRTY_BITMAP_PREFIX + name
        if context not in self._contexts:
            raise SourceError(f"{self.path}: bitmap {name} was not negotiated on this connection")
        out: list[tuple[int, int]] = []
        for off, n, flags in self._status(context, safe=STATE_DIRTY):
            if not flags & STATE_DIRTY:
                continue
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((off, n))
        return out

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self._size - offset))
        if length == 0:
            return b""
        # An export may announce a minimum block size (NBD_INFO_BLOCK_SIZE): widen the request
        # to it and cut the answer back, so callers may read at any offset.
        align = self._align
        lo = offset - offset % align
        hi = min(self._size, -(-(offset + length) // align) * align)
        buf = bytearray(hi - lo)
        view = memoryview(buf)
        pos = lo
        while pos < hi:  # QEMU serves at most 32 MiB per request
            n = min(MAX_READ, hi - pos)
            try:
                self._call("read_into", pos, view[pos - lo : pos - lo + n])
            except NbdConnectionLost as exc:
                raise SourceError(f"{self.path}: read at offset {pos:#x} failed: {exc}") from exc
            pos += n
        view.release()
        if (lo, hi) != (offset, offset + length):
            return bytes(buf[offset - lo : offset - lo + length])
        return bytes(buf)

    @property
    def connections(self) -> int:
        """How many NBD connections are open now (for tests and diagnostics)."""
        with self._lock:
            return self._open_count

    def info(self) -> dict[str, object]:
        return {**super().info(), "export": self.export, "bitmap": self.bitmap, "backend": self.backend}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open_count -= len(idle)
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.close()

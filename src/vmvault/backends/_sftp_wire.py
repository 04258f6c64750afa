"""An SFTP version 3 client (draft-ietf-secsh-filexfer-02) over a byte stream: the subset the
SFTP backend uses, with the OpenSSH extensions it needs (``_sftp_layout`` has the wire layout).

Why ours and not paramiko's ``SFTPClient`` (which stays the test oracle, tests/backends):

* Bounds. The server is untrusted. paramiko buffers a packet of whatever length the server
  announces (up to 4 GiB) before looking at it; here a packet longer than this client asked for
  (:data:`MAX_PACKET`, or the exact size a READ allows), a reply to a request that is not
  outstanding, a count or a string that runs past its packet, or a reply of the wrong type is a
  :class:`~vmvault.errors.BackendProtocolError` before anything is buffered, and the session is
  closed. A server that stops sending meets the stream's timeout; one that sends a reply a
  byte now and then (each wait within the timeout) meets :data:`MIN_RATE`: a packet must arrive
  whole within the session's :attr:`~Session.patience` plus its length at that rate, and a
  ranged read likewise, and a write (sent and acknowledged), else it is a ``TimeoutError``.
  One that closes mid-reply is an ``EOFError`` (a dropped connection, which the backend
  retries).
* CPU per byte. A ranged read sends its READ requests in one batch (all of them outstanding,
  up to :data:`READ_WINDOW`) and receives each DATA payload straight into its place in one
  buffer (``recv_into``): no per-packet message objects, locks or joins of pieces. Writes keep
  up to a window of WRITE requests in flight, and every status is checked.

Threading: a session is used by one thread at a time (the backend's pool hands it out).
Errors: a status other than OK is a :class:`StatusError` (an ``OSError``; NO_SUCH_FILE is also a
``FileNotFoundError``, PERMISSION_DENIED a ``PermissionError``), and the session stays usable.
"""

from __future__ import annotations

import contextlib
import errno
import math
import re
import time
from collections.abc import Iterator
from typing import Protocol

from vmvault.backends._sftp_layout import (
    ATTR_ACMODTIME,
    ATTR_EXTENDED,
    ATTR_PERMISSIONS,
    ATTR_SIZE,
    ATTR_UIDGID,
    HEADER,
    MAX_HANDLE,
    READ_ARGS,
    STATVFS_FIELDS,
    U32,
    U64,
    VERSION,
    WRITE_ARGS,
    Attrs,
    OpenFlag,
    Packet,
    Status,
    pack_string,
)
from vmvault.backends.base import MAX_LISTING, MIN_RATE
from vmvault.errors import BackendProtocolError

__all__ = [
    "KEEP_BUFFER",
    "MAX_LISTING",
    "MAX_PACKET",
    "READ_WINDOW",
    "RECV_AHEAD",
    "NoSuchFileError",
    "PermissionDeniedError",
    "RecvStream",
    "Session",
    "StatusError",
    "Stream",
    "parse_attrs",
    "parse_name",
]

#: the longest packet accepted from the server, but for DATA answering a READ (bounded by the
#: length that READ asked for). OpenSSH's sftp-server sends at most 256 KiB
#: (SFTP_MAX_MSG_LENGTH); READDIR answers hold up to 100 names of at most 255 bytes each.
MAX_PACKET = 256 * 1024 + 1024
#: READ requests outstanding at once in one ranged read (64 x 128 KiB = 8 MiB in flight)
READ_WINDOW = 64
#: the receive buffer a session keeps between ranged reads (larger reads get one of their own):
#: a fresh buffer per read cost more in page faults than all of the protocol's handling
#: (4 MiB reads: 7 ms each, 1.8 ms per MiB, against about 1 ms per MiB for the rest)
KEEP_BUFFER = 8 << 20
#: the least a :class:`RecvStream` asks its channel for at once: more than paramiko's channel
#: window (2 MiB), so one call takes all the channel holds (at most this much is kept ahead)
RECV_AHEAD = 4 << 20
#: CLOSEs of read handles left unanswered at once (Session.close_later)
_CLOSES_AHEAD = 8
#: what of a server's status message is kept (it goes into error messages)
_MESSAGE_LIMIT = 200
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Stream(Protocol):
    """What a session needs of its transport: a socket's ``recv_into``/``sendall``/``close``."""

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...

    def sendall(self, data: bytes | memoryview, /) -> None: ...

    def close(self) -> None: ...


class _Recv(Protocol):
    def recv(self, size: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> None: ...

    def close(self) -> None: ...


class RecvStream:
    """A :class:`Stream` over something that has only ``recv`` (paramiko's ``Channel``).

    Every ``recv`` asks for at least :data:`RECV_AHEAD` bytes and keeps what the caller did not
    want yet. paramiko's channel buffer hands out a read smaller than what it holds by cutting
    it from the front of one array, which moves everything behind it: the 9-byte header and the
    4-byte length of each DATA reply each moved up to the channel's window (2 MiB). Taking all
    it holds at once empties it without a move, and small reads are served from here (224 MiB
    read as 8 MiB ranges over 4 connections from OpenSSH on loopback: 10,027 reads of the
    channel moved 604 MiB inside its buffer; now 3,901 reads and nothing moved)."""

    def __init__(self, inner: _Recv) -> None:
        self.inner = inner
        self._ahead = memoryview(b"")

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        want = min(nbytes or len(buffer), len(buffer))
        if want <= 0:
            return 0
        if not self._ahead:
            data = self.inner.recv(max(want, RECV_AHEAD))
            if not data:
                return 0
            self._ahead = memoryview(data)
        got = min(want, len(self._ahead))
        buffer[:got] = self._ahead[:got]
        self._ahead = self._ahead[got:]
        return got

    def sendall(self, data: bytes | memoryview, /) -> None:
        self.inner.sendall(data if isinstance(data, bytes) else bytes(data))

    def close(self) -> None:
        self.inner.close()


class StatusError(OSError):
    """The server answered a request with an error status (section 7)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(_ERRNO.get(code), message)

    def __str__(self) -> str:
        return str(self.strerror)


class NoSuchFileError(StatusError, FileNotFoundError):
    pass


class PermissionDeniedError(StatusError, PermissionError):
    pass


_ERRNO: dict[int, int] = {
    Status.NO_SUCH_FILE: errno.ENOENT,
    Status.PERMISSION_DENIED: errno.EACCES,
    Status.OP_UNSUPPORTED: errno.EOPNOTSUPP,
}


def _status_error(code: int, message: bytes) -> StatusError:
    text = _UNPRINTABLE.sub("?", message[:_MESSAGE_LIMIT].decode("utf-8", "replace")).strip()
    try:
        name = Status(code).name.lower().replace("_", " ")
    except ValueError:
        name = f"status {code}"
    shown = f"{name}: {text}" if text and text.lower() != name else name
    if code == Status.NO_SUCH_FILE:
        return NoSuchFileError(code, shown)
    if code == Status.PERMISSION_DENIED:
        return PermissionDeniedError(code, shown)
    return StatusError(code, shown)


class _Cursor:
    """Reads a packet's fields, each bounded by the packet's end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def _take(self, size: int, what: str) -> int:
        start = self.pos
        if size > len(self.data) - start:
            raise BackendProtocolError(f"malformed SFTP reply: {what} runs past the end of its packet")
        self.pos = start + size
        return start

    def u32(self, what: str = "a number") -> int:
        value: int = U32.unpack_from(self.data, self._take(4, what))[0]
        return value

    def u64(self, what: str = "a number") -> int:
        value: int = U64.unpack_from(self.data, self._take(8, what))[0]
        return value

    def string(self, what: str = "a string") -> bytes:
        size = self.u32(what)
        start = self._take(size, what)
        return self.data[start : start + size]

    def left(self) -> int:
        return len(self.data) - self.pos


def parse_attrs(cursor: _Cursor) -> Attrs:
    """ATTRS (section 5) at the cursor."""
    flags = cursor.u32("attribute flags")
    size = cursor.u64("a size") if flags & ATTR_SIZE else None
    uid = gid = None
    if flags & ATTR_UIDGID:
        uid, gid = cursor.u32("a uid"), cursor.u32("a gid")
    mode = cursor.u32("permissions") if flags & ATTR_PERMISSIONS else None
    atime = mtime = None
    if flags & ATTR_ACMODTIME:
        atime, mtime = cursor.u32("a time"), cursor.u32("a time")
    if flags & ATTR_EXTENDED:
        count = cursor.u32("an extended attribute count")
        if count * 8 > cursor.left():  # each pair is at least two empty strings
            raise BackendProtocolError(f"malformed SFTP reply: {count} extended attributes in {cursor.left()} bytes")
        for _ in range(count):
            cursor.string("an extended attribute")
            cursor.string("an extended attribute")
    return Attrs(size, uid, gid, mode, atime, mtime)


def parse_name(cursor: _Cursor) -> list[tuple[bytes, Attrs]]:
    """The entries of a NAME reply's body after the id (section 7): (file name, attributes);
    the ``ls -l`` style long name is read past."""
    count = cursor.u32("a name count")
    if count * 12 > cursor.left():  # each entry has two strings and the attribute flags
        raise BackendProtocolError(f"malformed SFTP reply: {count} names in {cursor.left()} bytes")
    entries = []
    for _ in range(count):
        name = cursor.string("a file name")
        cursor.string("a long name")
        entries.append((name, parse_attrs(cursor)))
    return entries


class Session:
    """One SFTP session on ``stream`` (its timeout set by the owner). Call :meth:`start` first.

    After a :class:`~vmvault.errors.BackendProtocolError`, a timeout or the end of the stream
    the session is :attr:`closed` (its stream too) and every call raises ``EOFError``."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._next_id = 1
        self.closed = False
        #: seconds a packet may take beyond its length at :data:`MIN_RATE` (the owner sets the
        #: stream's timeout here)
        self.patience = 60.0
        #: extensions the server announced in VERSION (section 4): name -> data
        self.extensions: dict[bytes, bytes] = {}
        #: the quickest answer to a single request so far, in seconds (``math.inf`` before the
        #: first): about the round trip to the server
        self.quickest_reply = math.inf
        self._header = bytearray(HEADER.size)
        self._header_view = memoryview(self._header)
        self._buffer = bytearray()
        #: CLOSE requests of read handles sent without waiting (:meth:`close_later`), whose
        #: statuses are taken as they come, before the reply a caller waits for
        self._closing: set[int] = set()

    # --- the stream ------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._stream.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Whatever breaks the exchange (a protocol error, a timeout, a dropped stream) leaves
        replies unread: the session cannot go on and is closed."""
        if self.closed:
            raise EOFError("the SFTP session is closed")
        try:
            yield
        except StatusError:
            raise  # raised once its reply was read whole: the exchange is intact
        except BaseException:
            self.close()
            raise

    def _recv_exact(self, view: memoryview) -> None:
        got = 0
        need = len(view)
        deadline = 0.0
        while got < need:
            n = self._stream.recv_into(view[got:], need - got)
            if n <= 0:
                raise EOFError("the SFTP server closed the connection" + (" in the middle of a reply" if got else ""))
            got += n
            if got < need:  # each wait is bounded by the stream's timeout, the whole packet here
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.patience + need / MIN_RATE
                elif now > deadline:
                    raise TimeoutError(
                        f"the SFTP server sent {got} bytes of a {need}-byte packet in over "
                        f"{self.patience + need / MIN_RATE:.0f} s; given up as too slow"
                    )

    def _send(self, kind: int, *fields: bytes) -> int:
        """Send a request; returns its id."""
        request_id = self._take_id()
        body = b"".join(fields)
        self._stream.sendall(HEADER.pack(len(body) + 5, kind, request_id) + body)
        return request_id

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id = (request_id + 1) & 0xFFFFFFFF
        return request_id

    def _read_header(self) -> tuple[int, int, int]:
        """(length of what follows the id, type, id) of the next packet. The length is checked
        where the rest is read: against :data:`MAX_PACKET` (:meth:`_read_body`), or against
        the READ it answers (:meth:`_read_data_length`). The statuses of CLOSEs sent by
        :meth:`close_later` are read and passed over here."""
        while True:
            self._recv_exact(self._header_view)
            length, kind, request_id = HEADER.unpack(self._header)
            if length < 5:
                raise BackendProtocolError(f"malformed SFTP reply: a packet of {length} bytes")
            if request_id not in self._closing:
                return length - 5, kind, request_id
            self._closing.discard(request_id)
            self._read_body(length - 5)  # a read handle's close loses nothing, whatever it says
            if kind != Packet.STATUS:
                raise BackendProtocolError(f"the SFTP server answered a CLOSE with packet type {kind}")

    def _read_body(self, length: int) -> bytes:
        if length > MAX_PACKET:
            raise BackendProtocolError(
                f"the SFTP server sent a packet of {length} bytes, over the {MAX_PACKET} this client accepts"
            )
        body = bytearray(length)
        self._recv_exact(memoryview(body))
        return bytes(body)

    def _reply(self, request_id: int) -> tuple[int, _Cursor]:
        """The reply to the one request outstanding."""
        length, kind, got = self._read_header()
        if got != request_id:
            raise BackendProtocolError(
                f"the SFTP server answered request {got}, which was not asked (expected {request_id})"
            )
        return kind, _Cursor(self._read_body(length))

    def _call(self, kind: int, *fields: bytes, expect: int = Packet.STATUS) -> _Cursor:
        """One request and its reply, which must be ``expect`` or a status: an error status
        raises :class:`StatusError`, OK answers an ``expect`` of STATUS."""
        with self._guard():
            sent = time.monotonic()
            request_id = self._send(kind, *fields)
            got, cursor = self._reply(request_id)
            self.quickest_reply = min(self.quickest_reply, time.monotonic() - sent)
            return _answer(got, cursor, expect)

    def exchange(self, requests: list[tuple[int, list[bytes], int]]) -> list[_Cursor | StatusError]:
        """Several requests ``(type, fields, expected reply)`` sent at once, and their replies,
        in the order asked, taken as :meth:`_call` takes one: a cursor, or the StatusError an
        error status is (returned, not raised: every reply is read first, so the session stays
        in step). One round trip for them all; the server may answer in any order."""
        with self._guard():
            ids = [self._send(kind, *fields) for kind, fields, _expect in requests]
            replies: dict[int, tuple[int, _Cursor]] = {}
            while len(replies) < len(ids):
                length, kind, request_id = self._read_header()
                if request_id not in ids or request_id in replies:
                    raise BackendProtocolError(f"the SFTP server answered request {request_id}, which was not asked")
                replies[request_id] = (kind, _Cursor(self._read_body(length)))
            out: list[_Cursor | StatusError] = []
            for request_id, (_kind, _fields, expect) in zip(ids, requests, strict=True):
                try:
                    out.append(_answer(*replies[request_id], expect))
                except StatusError as exc:
                    out.append(exc)
            return out

    # --- operations ------------------------------------------------------------------

    def start(self) -> None:
        """INIT and VERSION (section 4)."""
        with self._guard():
            self._stream.sendall(U32.pack(5) + bytes([Packet.INIT]) + U32.pack(VERSION))
            self._recv_exact(self._header_view[:5])
            length, kind = U32.unpack_from(self._header)[0], self._header[4]
            if kind != Packet.VERSION or not 5 <= length <= MAX_PACKET:
                # a login shell that prints text before the subsystem starts makes "length"
                # out of its first four characters
                raise BackendProtocolError(
                    "the server's first answer is not SFTP (does the account's login shell print text, "
                    "or is the sftp subsystem something else?)"
                )
            cursor = _Cursor(self._read_body(length - 1))
            version = cursor.u32("the version")
            if version != VERSION:
                raise BackendProtocolError(f"the SFTP server speaks version {version}, not {VERSION}")
            while cursor.left():
                name = cursor.string("an extension name")
                self.extensions[name] = cursor.string("an extension's data")

    def stat(self, path: str) -> Attrs:
        return parse_attrs(self._call(Packet.STAT, _path(path), expect=Packet.ATTRS))

    def lstat(self, path: str) -> Attrs:
        return parse_attrs(self._call(Packet.LSTAT, _path(path), expect=Packet.ATTRS))

    def lstat_many(self, paths: list[str]) -> list[Attrs | StatusError]:
        """The LSTATs of ``paths`` sent at once (:meth:`exchange`): each path's attributes, or
        the error status its LSTAT got."""
        answers = self.exchange([(Packet.LSTAT, [_path(path)], Packet.ATTRS) for path in paths])
        return [answer if isinstance(answer, StatusError) else parse_attrs(answer) for answer in answers]

    def fstat(self, handle: bytes) -> Attrs:
        return parse_attrs(self._call(Packet.FSTAT, pack_string(handle), expect=Packet.ATTRS))

    def mkdir(self, path: str) -> None:
        self._call(Packet.MKDIR, _path(path), Attrs().pack())

    def remove(self, path: str) -> None:
        self._call(Packet.REMOVE, _path(path))

    def rename(self, old: str, new: str) -> None:
        """RENAME (section 6.5): fails when ``new`` exists."""
        self._call(Packet.RENAME, _path(old), _path(new))

    def posix_rename(self, old: str, new: str) -> None:
        """``posix-rename@openssh.com`` (OpenSSH PROTOCOL section 4.3): rename(2), replacing."""
        self._call(Packet.EXTENDED, pack_string(b"posix-rename@openssh.com"), _path(old), _path(new))

    def statvfs(self, path: str) -> tuple[int, ...]:
        """``statvfs@openssh.com`` (OpenSSH PROTOCOL section 4.4): its 11 fields."""
        cursor = self._call(
            Packet.EXTENDED, pack_string(b"statvfs@openssh.com"), _path(path), expect=Packet.EXTENDED_REPLY
        )
        return tuple(cursor.u64("a statvfs field") for _ in range(STATVFS_FIELDS))

    def limits(self) -> tuple[int, int, int, int] | None:
        """``limits@openssh.com`` (OpenSSH PROTOCOL section 4.8): max packet, read and write
        lengths and open handles (0: no limit); None where the server does not offer it."""
        if self.extensions.get(b"limits@openssh.com") is None:
            return None
        cursor = self._call(Packet.EXTENDED, pack_string(b"limits@openssh.com"), expect=Packet.EXTENDED_REPLY)
        packet, read, write, handles = (cursor.u64("a limit") for _ in range(4))
        return packet, read, write, handles

    def open(self, path: str, flags: OpenFlag) -> bytes:
        """OPEN (section 6.3): the handle."""
        return _handle(self._call(Packet.OPEN, _path(path), U32.pack(flags), Attrs().pack(), expect=Packet.HANDLE))

    def close_handle(self, handle: bytes) -> None:
        self._call(Packet.CLOSE, pack_string(handle))

    def finish_write(
        self, handle: bytes, look_at: str, *, fsync: bool
    ) -> tuple[StatusError | None, StatusError | None, Attrs | StatusError]:
        """The end of an upload in one round trip: ``fsync@openssh.com`` of ``handle`` (when
        ``fsync``; OpenSSH PROTOCOL section 4.6), its CLOSE, and the LSTAT of ``look_at``.
        Returns the fsync's and the close's errors (None: done) and the lstat's attributes or
        error. Nothing is raised for a status: the caller decides, having every answer."""
        requests: list[tuple[int, list[bytes], int]] = []
        if fsync:
            requests.append((Packet.EXTENDED, [pack_string(b"fsync@openssh.com"), pack_string(handle)], Packet.STATUS))
        requests.append((Packet.CLOSE, [pack_string(handle)], Packet.STATUS))
        requests.append((Packet.LSTAT, [_path(look_at)], Packet.ATTRS))
        answers = self.exchange(requests)
        synced = answers.pop(0) if fsync else None
        closed, looked = answers
        return (
            synced if isinstance(synced, StatusError) else None,
            closed if isinstance(closed, StatusError) else None,
            looked if isinstance(looked, StatusError) else parse_attrs(looked),
        )

    def close_quietly(self, handle: bytes) -> None:
        """CLOSE ``handle`` after a failure, raising nothing (the failure is what is reported)."""
        if not self.closed:
            with contextlib.suppress(OSError, BackendProtocolError, EOFError):
                self.close_handle(handle)

    def close_later(self, handle: bytes) -> None:
        """CLOSE a handle opened for reading (a file or a folder) without waiting for the
        answer: the server answers in turn and the next reply read takes it
        (:meth:`_read_header`), so a read or a listing costs one round trip less (30 ms from a
        server 30 ms away). Servers process requests in order (section 6.1: at least those on
        one file), so nothing sent later finds the handle open. At most ``_CLOSES_AHEAD`` are
        unanswered; beyond, this waits as :meth:`close_handle` does."""
        if len(self._closing) >= _CLOSES_AHEAD:
            self.close_handle(handle)
            return
        with self._guard():
            self._closing.add(self._send(Packet.CLOSE, pack_string(handle)))

    @contextlib.contextmanager
    def closing(self, handle: bytes, *, later: bool = False) -> Iterator[bytes]:
        """Close ``handle`` afterwards; the CLOSE's status is checked unless the block failed
        (closing a written file can report a late write error). ``later``: a read handle,
        closed by :meth:`close_later` when the block succeeds."""
        try:
            yield handle
        except BaseException:
            self.close_quietly(handle)
            raise
        if later:
            self.close_later(handle)
        else:
            self.close_handle(handle)

    def listdir(self, path: str) -> list[tuple[bytes, Attrs]]:
        """OPENDIR, READDIR until EOF, CLOSE (section 6.7, not waited for: :meth:`close_later`):
        every entry, "." and ".." too.

        READDIRs go out two at a time: a server answers requests on one handle as if they came
        one after the other (section 6.1), so the second gets the next names or the end, and a
        folder that fits one answer (every folder but ``data/`` and its subfolders, mostly)
        costs two round trips, not three."""
        handle = _handle(self._call(Packet.OPENDIR, _path(path), expect=Packet.HANDLE))
        entries: list[tuple[bytes, Attrs]] = []
        readdir = (Packet.READDIR, [pack_string(handle)], Packet.NAME)
        try:
            ended = False
            while not ended:
                for reply in self.exchange([readdir, readdir]):
                    if isinstance(reply, StatusError):
                        if reply.code != Status.EOF:
                            raise reply
                        # the end: what the second READDIR got after it (EOF again, or an error
                        # from a server that takes a READDIR past the end amiss) is not looked at
                        ended = True
                        break
                    names = parse_name(reply)
                    if not names:
                        # section 6.7: one or more names, or a status; an empty answer repeated
                        # forever would loop forever
                        raise BackendProtocolError("the SFTP server answered READDIR with no names and no end")
                    entries += names
                    if len(entries) > MAX_LISTING:
                        raise BackendProtocolError(
                            f"the SFTP server listed more than {MAX_LISTING} entries in one folder"
                        )
        except BaseException:
            self.close_quietly(handle)
            raise
        self.close_later(handle)
        return entries

    def read(
        self, handle: bytes, offset: int, length: int, step: int, into: memoryview | None = None
    ) -> bytes | memoryview:
        """``length`` bytes from ``offset`` (fewer where the file ends), read with READ
        requests of ``step`` bytes, up to :data:`READ_WINDOW` of them outstanding, each DATA
        reply received in place into one buffer (section 6.4: a server may answer a READ with
        fewer bytes, asked for again; EOF ends the file there). With ``into`` (at least
        ``length`` bytes) the replies are received there and a view of it is returned, not a
        copy."""
        if into is not None:
            if len(into) < length:
                raise ValueError("the buffer is shorter than the range")
            view = into[:length]
        elif length <= KEEP_BUFFER:
            if len(self._buffer) < length:
                self._buffer = bytearray(max(length, min(2 * len(self._buffer), KEEP_BUFFER)))
            view = memoryview(self._buffer)[:length]
        else:
            view = memoryview(bytearray(length))
        with self._guard():
            asked: dict[int, tuple[int, int]] = {}  # request id -> (position in out, bytes)
            again: list[tuple[int, int]] = []  # short answers' remainders, asked again
            next_pos = 0
            end = length  # lowered where the server says EOF
            failure: StatusError | None = None
            # a server answering each READ with a byte, each reply within the stream's timeout
            limit = self.patience + length / MIN_RATE
            started = time.monotonic()
            while True:
                if time.monotonic() - started > limit:
                    raise TimeoutError(
                        f"the SFTP server sent no more than {length} bytes in over {limit:.0f} s; given up as too slow"
                    )
                batch = []
                while len(asked) < READ_WINDOW and failure is None and (again or next_pos < end):
                    if again:
                        pos, size = again.pop()
                    else:
                        pos, size = next_pos, min(step, end - next_pos)
                        next_pos += size
                    if pos >= end:
                        continue
                    request_id = self._take_id()
                    body = pack_string(handle) + READ_ARGS.pack(offset + pos, size)
                    batch.append(HEADER.pack(len(body) + 5, Packet.READ, request_id) + body)
                    asked[request_id] = (pos, size)
                if batch:
                    self._stream.sendall(b"".join(batch))
                if not asked:
                    break
                length_left, kind, request_id = self._read_header()
                place = asked.pop(request_id, None)
                if place is None:
                    raise BackendProtocolError(f"the SFTP server answered request {request_id}, which was not asked")
                pos, size = place
                if kind == Packet.DATA:
                    got = self._read_data_length(length_left, size)
                    self._recv_exact(view[pos : pos + got])
                    if got < size:
                        again.append((pos + got, size - got))
                elif kind == Packet.STATUS:
                    cursor = _Cursor(self._read_body(length_left))
                    code = cursor.u32("a status code")
                    if code == Status.EOF:
                        end = min(end, pos)
                    elif code == Status.OK:
                        raise BackendProtocolError("the SFTP server answered a READ with OK and no data")
                    elif failure is None:
                        message = cursor.string("a status message") if cursor.left() >= 4 else b""
                        failure = _status_error(code, message)
                else:
                    raise BackendProtocolError(f"the SFTP server answered a READ with packet type {kind}")
            if failure is not None:
                raise failure
        return view[:end] if into is not None else bytes(view[:end])

    def _read_data_length(self, length_left: int, asked: int) -> int:
        """DATA's string length (section 7), which must fill its packet and be 1 to ``asked``."""
        if length_left < 4:
            raise BackendProtocolError("malformed SFTP reply: a DATA packet without its length")
        self._recv_exact(self._header_view[:4])
        got: int = U32.unpack_from(self._header)[0]
        if got != length_left - 4:
            raise BackendProtocolError(
                f"malformed SFTP reply: DATA of {got} bytes in a packet with room for {length_left - 4}"
            )
        if not 0 < got <= asked:
            raise BackendProtocolError(f"the SFTP server answered a READ of {asked} bytes with {got}")
        return got

    def write(self, handle: bytes, data: bytes | memoryview, step: int, window: int) -> None:
        """``data`` from offset 0, in WRITE requests of ``step`` bytes with up to ``window``
        outstanding; every status is read, and the first error raised once all are in. Each
        wait is bounded by the stream's timeout, the whole write by the :attr:`patience` plus
        its length at :data:`MIN_RATE` (a server taking it in, or acknowledging it, a little
        now and then is given up as too slow: ``TimeoutError``)."""
        view = memoryview(data).cast("B")
        limit = self.patience + len(view) / MIN_RATE
        deadline = time.monotonic() + limit

        def in_time(done: int) -> None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the SFTP server took {done} of {len(view)} bytes written in over {limit:.0f} s; "
                    "given up as too slow"
                )

        with self._guard():
            asked: set[int] = set()
            failure: StatusError | None = None
            for pos in range(0, len(view), step):
                while len(asked) >= window:
                    error = self._write_ack(asked)
                    failure = failure or error
                    in_time(pos)
                if failure is not None:
                    break
                piece = view[pos : pos + step]
                request_id = self._take_id()
                head = pack_string(handle) + WRITE_ARGS.pack(pos, len(piece))
                self._stream.sendall(HEADER.pack(len(head) + len(piece) + 5, Packet.WRITE, request_id) + head)
                self._stream.sendall(piece)
                asked.add(request_id)
                in_time(pos)
            while asked:
                error = self._write_ack(asked)
                failure = failure or error
                in_time(len(view))
            if failure is not None:
                raise failure

    def _write_ack(self, asked: set[int]) -> StatusError | None:
        length, kind, request_id = self._read_header()
        if request_id not in asked:
            raise BackendProtocolError(f"the SFTP server answered request {request_id}, which was not asked")
        asked.discard(request_id)
        if kind != Packet.STATUS:
            raise BackendProtocolError(f"the SFTP server answered a WRITE with packet type {kind}")
        cursor = _Cursor(self._read_body(length))
        code = cursor.u32("a status code")
        if code == Status.OK:
            return None
        return _status_error(code, cursor.string("a status message") if cursor.left() >= 4 else b"")


def _answer(got: int, cursor: _Cursor, expect: int) -> _Cursor:
    """A reply of type ``got``, which must be ``expect`` or a status: an error status raises
    :class:`StatusError`, OK answers an ``expect`` of STATUS."""
    if got == Packet.STATUS:
        code = cursor.u32("a status code")
        if code == Status.OK and expect == Packet.STATUS:
            return cursor
        message = cursor.string("a status message") if cursor.left() >= 4 else b""
        if code == Status.OK:
            raise BackendProtocolError(f"the SFTP server answered OK where {Packet(expect).name} was due")
        raise _status_error(code, message)
    if got != expect:
        raise BackendProtocolError(f"the SFTP server answered with packet type {got}, not {_name(expect)}")
    return cursor


def _name(kind: int) -> str:
    try:
        return Packet(kind).name
    except ValueError:
        return str(kind)


def _path(path: str) -> bytes:
    return pack_string(path.encode("utf-8"))


def _handle(cursor: _Cursor) -> bytes:
    handle = cursor.string("a handle")
    if not 0 < len(handle) <= MAX_HANDLE:
        raise BackendProtocolError(f"the SFTP server gave a handle of {len(handle)} bytes (at most {MAX_HANDLE})")
    return handle

"""vmvault's SFTP client (``_sftp_wire``) against a scripted peer that breaks the protocol: every
length bounded before anything is buffered, replies to nothing asked refused, truncated and
stalled replies ending the session, never a hang. The packet parser is checked with hypothesis,
paramiko's SFTP message parsing as the oracle. (Against a real OpenSSH server, through both
transports: test_sftp.py, test_sftp_openssh.py and the contract suite.)"""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import paramiko
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmvault.backends import _sftp_wire
from vmvault.backends._sftp_layout import Attrs, OpenFlag, Packet, Status, pack_string
from vmvault.backends._sftp_wire import (
    MAX_PACKET,
    NoSuchFileError,
    PermissionDeniedError,
    RecvStream,
    Session,
    StatusError,
    _Cursor,
    parse_attrs,
    parse_name,
)
from vmvault.errors import BackendProtocolError

U32 = struct.Struct(">I")


class Peer:
    """The server's end of a socket pair, driven by a test's script."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_exact(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            got = self.sock.recv(size - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    def request(self) -> tuple[int, int, bytes]:
        """The next request: (type, id, the rest)."""
        (length,) = U32.unpack(self.recv_exact(4))
        packet = self.recv_exact(length)
        return packet[0], U32.unpack_from(packet, 1)[0], packet[5:]

    def handshake(self, extensions: dict[bytes, bytes] | None = None, version: int = 3) -> None:
        kind, _version, _rest = self.request()
        assert kind == Packet.INIT
        body = U32.pack(version) + b"".join(pack_string(k) + pack_string(v) for k, v in (extensions or {}).items())
        self.raw(U32.pack(len(body) + 1) + bytes([Packet.VERSION]) + body)

    def reply(self, kind: int, request_id: int, body: bytes = b"") -> None:
        self.raw(U32.pack(len(body) + 5) + bytes([kind]) + U32.pack(request_id) + body)

    def status(self, request_id: int, code: int, message: bytes = b"") -> None:
        self.reply(Packet.STATUS, request_id, U32.pack(code) + pack_string(message) + pack_string(b""))

    def data(self, request_id: int, payload: bytes) -> None:
        self.reply(Packet.DATA, request_id, pack_string(payload))

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)


class SocketChannel:
    """A socket seen as paramiko's ``Channel`` is (``recv`` only, no ``recv_into``): what the
    paramiko transport's :class:`RecvStream` wraps."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


#: the two ways a session reads its transport: a socket's recv_into (the OpenSSH transport's
#: socket pair) and RecvStream over a channel's recv (paramiko's)
VIA = ["socket", "channel"]


@contextmanager
def scripted(
    script: Callable[[Peer], None], *, timeout: float = 5.0, start: bool = True, via: str = "socket"
) -> Iterator[Session]:
    """A session whose server is ``script`` in a thread (the handshake done first when
    ``start``), read through ``via`` (one of :data:`VIA`); the script's own failures fail the
    test."""
    ours, theirs = socket.socketpair()
    ours.settimeout(timeout)
    errors: list[BaseException] = []

    def run() -> None:
        peer = Peer(theirs)
        try:
            if start:
                peer.handshake({b"limits@openssh.com": b"1"})
            script(peer)
        except (EOFError, OSError):
            pass  # the client closed its end: expected in most scripts
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    session = Session(ours if via == "socket" else RecvStream(SocketChannel(ours)))
    try:
        if start:
            session.start()
        yield session
    finally:
        session.close()
        thread.join(5)
        theirs.close()
    assert not thread.is_alive(), "the scripted server did not finish"
    assert not errors, errors


def idle(peer: Peer) -> None:
    peer.recv_exact(1)  # until the client closes


# --- what a well-behaved server gets ----------------------------------------------------------


def test_status_errors_keep_the_session() -> None:
    def script(peer: Peer) -> None:
        kind, rid, rest = peer.request()
        assert kind == Packet.LSTAT and rest == pack_string(b"/a")
        peer.status(rid, Status.NO_SUCH_FILE, b"No such file")
        _, rid, _ = peer.request()
        peer.status(rid, Status.PERMISSION_DENIED, b"Permission denied")
        _, rid, _ = peer.request()
        peer.status(rid, Status.FAILURE, b"\x1b[31mdisk\nfull" + b"!" * 1000)
        _, rid, _ = peer.request()
        peer.reply(Packet.ATTRS, rid, Attrs(size=5, mode=0o100644, atime=1, mtime=2).pack())
        idle(peer)

    with scripted(script) as session:
        with pytest.raises(NoSuchFileError) as missing:
            session.lstat("/a")
        assert isinstance(missing.value, FileNotFoundError)
        with pytest.raises(PermissionDeniedError):
            session.remove("/b")
        with pytest.raises(StatusError) as failed:
            session.mkdir("/c")
        text = str(failed.value)
        assert failed.value.code == Status.FAILURE and failed.value.errno is None
        assert "\x1b" not in text and "\n" not in text and len(text) < 250
        assert session.stat("/d") == Attrs(size=5, mode=0o100644, atime=1, mtime=2)
        assert not session.closed


@pytest.mark.parametrize("via", VIA)
def test_a_close_sent_ahead_is_answered_before_the_next_reply_and_passed_over(via: str) -> None:
    """``close_later`` sends CLOSE and goes on; its status, whatever it says, is taken before the
    next request's reply (in order or not); past ``_CLOSES_AHEAD`` unanswered a close waits."""
    ahead = _sftp_wire._CLOSES_AHEAD
    closes: list[int] = []

    def script(peer: Peer) -> None:
        kind, rid, rest = peer.request()
        assert kind == Packet.CLOSE and rest == pack_string(b"h1")
        closes.append(rid)
        kind, stat_id, _ = peer.request()
        assert kind == Packet.LSTAT
        peer.status(rid, Status.FAILURE, b"close failed")  # passed over: a read handle
        peer.reply(Packet.ATTRS, stat_id, Attrs(size=7).pack())
        # answered out of order: the next reply first, then the close's
        kind, rid, _ = peer.request()
        assert kind == Packet.CLOSE
        kind, stat_id, _ = peer.request()
        peer.reply(Packet.ATTRS, stat_id, Attrs(size=8).pack())
        peer.status(rid, Status.OK)
        # a run of closes, none answered, until one waits for its answer: the one above still
        # counts (its answer is in the stream, not yet read), so the run's last one waits
        for _ in range(ahead):
            kind, rid, _ = peer.request()
            assert kind == Packet.CLOSE
            closes.append(rid)
        for rid in closes[1:]:
            peer.status(rid, Status.OK)
        idle(peer)

    with scripted(script, via=via) as session:
        session.close_later(b"h1")
        assert session.lstat("/a").size == 7
        session.close_later(b"h2")
        assert session.lstat("/b").size == 8
        for i in range(ahead):
            session.close_later(f"h{i + 3}".encode())
        assert not session._closing and not session.closed


def test_the_end_of_an_upload_is_one_round_trip_answered_in_any_order() -> None:
    """``finish_write`` sends fsync, CLOSE and LSTAT together and reads every answer before it
    returns, whatever order they come in and whatever they say; without fsync only the two."""

    def script(peer: Peer) -> None:
        asked = [peer.request() for _ in range(3)]
        assert [kind for kind, _rid, _rest in asked] == [Packet.EXTENDED, Packet.CLOSE, Packet.LSTAT]
        assert asked[0][2] == pack_string(b"fsync@openssh.com") + pack_string(b"h")
        assert asked[2][2] == pack_string(b"/final")
        peer.reply(Packet.ATTRS, asked[2][1], Attrs(size=9, mode=0o100600).pack())
        peer.status(asked[1][1], Status.OK)
        peer.status(asked[0][1], Status.FAILURE, b"no space")
        asked = [peer.request() for _ in range(2)]
        assert [kind for kind, _rid, _rest in asked] == [Packet.CLOSE, Packet.LSTAT]
        peer.status(asked[0][1], Status.PERMISSION_DENIED, b"late write error")
        peer.status(asked[1][1], Status.NO_SUCH_FILE, b"absent")
        idle(peer)

    with scripted(script) as session:
        synced, closed, looked = session.finish_write(b"h", "/final", fsync=True)
        assert isinstance(synced, StatusError) and synced.code == Status.FAILURE
        assert closed is None and looked == Attrs(size=9, mode=0o100600)
        synced, closed, looked = session.finish_write(b"h", "/final", fsync=False)
        assert synced is None and isinstance(closed, PermissionDeniedError)
        assert isinstance(looked, NoSuchFileError)
        assert not session.closed


def test_an_exchange_answered_twice_or_for_something_not_asked_ends_the_session() -> None:
    def script(peer: Peer) -> None:
        _, first, _ = peer.request()
        peer.request()
        peer.status(first, Status.OK)
        peer.status(first, Status.OK)
        idle(peer)

    with scripted(script) as session:
        with pytest.raises(BackendProtocolError, match="not asked"):
            session.exchange([(Packet.CLOSE, [pack_string(b"a")], Packet.STATUS)] * 2)
        assert session.closed


def test_a_listing_closes_its_folder_without_waiting() -> None:
    def script(peer: Peer) -> None:
        kind, rid, _ = peer.request()
        assert kind == Packet.OPENDIR
        peer.reply(Packet.HANDLE, rid, pack_string(b"d"))
        _, rid, _ = peer.request()
        peer.reply(Packet.NAME, rid, U32.pack(1) + pack_string(b"f") + pack_string(b"") + U32.pack(0))
        _, rid, _ = peer.request()
        peer.status(rid, Status.EOF)
        kind, close_id, rest = peer.request()  # sent before the listing returned
        assert kind == Packet.CLOSE and rest == pack_string(b"d")
        kind, rid, _ = peer.request()
        assert kind == Packet.LSTAT
        peer.status(close_id, Status.OK)
        peer.reply(Packet.ATTRS, rid, Attrs(size=3).pack())
        idle(peer)

    with scripted(script) as session:
        assert [name for name, _attrs in session.listdir("/")] == [b"f"]
        assert session.lstat("/f").size == 3
        assert not session._closing


def _names(*names: bytes) -> bytes:
    return U32.pack(len(names)) + b"".join(pack_string(n) + pack_string(b"") + U32.pack(0) for n in names)


def test_a_listing_sends_its_readdirs_two_at_a_time() -> None:
    """The second READDIR goes out with the first (the script takes both before it answers:
    a client that waited for the first answer would hang here), pairs go on until the end, and
    what the READDIR after the end got (an error, from a server that takes it amiss) is not
    looked at."""
    pairs = []

    def script(peer: Peer) -> None:
        kind, rid, _ = peer.request()
        assert kind == Packet.OPENDIR
        peer.reply(Packet.HANDLE, rid, pack_string(b"d"))
        for first, second in ((_names(b"a", b"b"), _names(b"c")), (None, b"past the end")):
            (k1, r1, _), (k2, r2, _) = peer.request(), peer.request()
            assert k1 == k2 == Packet.READDIR
            pairs.append((r1, r2))
            if first is None:
                peer.status(r1, Status.EOF)
                peer.status(r2, Status.FAILURE, second)
            else:
                peer.reply(Packet.NAME, r1, first)
                peer.reply(Packet.NAME, r2, second)
        kind, rid, _ = peer.request()
        assert kind == Packet.CLOSE
        peer.status(rid, Status.OK)
        idle(peer)

    with scripted(script) as session:
        assert [name for name, _attrs in session.listdir("/")] == [b"a", b"b", b"c"]
    assert len(pairs) == 2


def test_a_listing_whose_second_readdir_fails_is_refused() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.reply(Packet.HANDLE, rid, pack_string(b"d"))
        (_, r1, _), (_, r2, _) = peer.request(), peer.request()
        peer.reply(Packet.NAME, r1, _names(b"a"))
        peer.status(r2, Status.PERMISSION_DENIED, b"no")
        kind, rid, _ = peer.request()
        assert kind == Packet.CLOSE
        peer.status(rid, Status.OK)
        idle(peer)

    with scripted(script) as session:
        with pytest.raises(StatusError) as failed:
            session.listdir("/")
        assert failed.value.code == Status.PERMISSION_DENIED
        assert not session.closed  # every answer was read: the session goes on


def test_the_quickest_reply_is_the_round_trip_of_the_quickest_request() -> None:
    """What the SFTP backend judges a server's distance by: the shortest time from a request
    to its answer (a server that takes 30 ms to answer, then 5 ms)."""

    def script(peer: Peer) -> None:
        for delay in (0.03, 0.005):
            _, rid, _ = peer.request()
            time.sleep(delay)
            peer.reply(Packet.ATTRS, rid, Attrs(size=1).pack())
        idle(peer)

    with scripted(script) as session:
        assert session.quickest_reply == float("inf")
        session.lstat("/a")
        assert 0.03 <= session.quickest_reply < 0.5
        session.lstat("/b")
        assert 0.005 <= session.quickest_reply < 0.03


def test_a_close_sent_ahead_answered_with_anything_but_a_status_ends_the_session() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        _, stat_id, _ = peer.request()
        peer.reply(Packet.HANDLE, rid, pack_string(b"x"))
        peer.reply(Packet.ATTRS, stat_id, Attrs(size=7).pack())
        idle(peer)

    with scripted(script) as session:
        session.close_later(b"h1")
        with pytest.raises(BackendProtocolError, match="answered a CLOSE"):
            session.lstat("/a")
        assert session.closed


@pytest.mark.parametrize("into", [False, True], ids=["copy", "into"])
@pytest.mark.parametrize("via", VIA)
def test_a_read_assembles_short_and_reordered_replies_and_stops_at_eof(via: str, into: bool) -> None:
    """Also received straight into a caller's buffer (``Backend.get_into``): what is returned
    is then a view of that buffer, not a copy."""
    content = bytes(range(256)) * 40  # 10240 bytes

    def script(peer: Peer) -> None:
        kind, rid, _ = peer.request()
        assert kind == Packet.OPEN
        peer.reply(Packet.HANDLE, rid, pack_string(b"h1"))
        asked = []
        for _ in range(4):  # 12000 bytes asked as 4 x 3000
            kind, rid, rest = peer.request()
            assert kind == Packet.READ
            offset, size = struct.unpack(">QI", rest[6:])
            asked.append((rid, offset, size))
        for rid, offset, size in reversed(asked):
            piece = content[offset : offset + size]
            if not piece:
                peer.status(rid, Status.EOF)
            else:
                peer.data(rid, piece[: max(1, len(piece) // 2)])  # half of it: asked again
        while True:
            kind, rid, rest = peer.request()
            if kind == Packet.CLOSE:
                peer.status(rid, Status.OK)
                break
            offset, size = struct.unpack(">QI", rest[6:])
            piece = content[offset : offset + size]
            if piece:
                peer.data(rid, piece)
            else:
                peer.status(rid, Status.EOF)
        idle(peer)

    buffer = bytearray(12345)
    with scripted(script, via=via) as session, session.closing(session.open("/f", OpenFlag.READ)) as handle:
        got = session.read(handle, 100, 12000, 3000, memoryview(buffer) if into else None)
        assert got == content[100:]
        if into:
            assert isinstance(got, memoryview) and got.obj is buffer and buffer[: len(got)] == content[100:]
        else:
            assert isinstance(got, bytes) and not any(buffer)


def test_a_read_into_a_buffer_shorter_than_the_range_is_refused() -> None:
    with scripted(idle) as session, pytest.raises(ValueError, match="shorter"):
        session.read(b"h", 0, 1000, 1000, memoryview(bytearray(999)))


@pytest.mark.parametrize("via", VIA)
def test_reads_share_the_session_buffer_but_never_each_others_bytes(via: str) -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.data(rid, b"A" * 1000)
        _, first, _ = peer.request()
        _, second, _ = peer.request()
        peer.data(first, b"B" * 500)
        peer.status(second, Status.EOF)
        idle(peer)

    with scripted(script, via=via) as session:
        whole = session.read(b"h", 0, 1000, 1000)
        shorter = session.read(b"h", 0, 1000, 500)
        assert whole == b"A" * 1000  # a copy: the next read did not change it
        assert shorter == b"B" * 500  # the end of the file: nothing of the first read behind it


def test_a_failed_write_reads_every_ack_and_keeps_the_session() -> None:
    def script(peer: Peer) -> None:
        ids = []
        for _ in range(10):
            kind, rid, _rest = peer.request()
            assert kind == Packet.WRITE
            ids.append(rid)
        for n, rid in enumerate(ids):
            peer.status(rid, Status.FAILURE if n == 3 else Status.OK, b"No space left on device")
        kind, rid, _ = peer.request()
        assert kind == Packet.LSTAT
        peer.reply(Packet.ATTRS, rid, Attrs(size=1).pack())
        idle(peer)

    with scripted(script) as session:
        with pytest.raises(StatusError, match="No space"):
            session.write(b"h", b"x" * 10_000, 1000, 64)
        assert session.lstat("/x").size == 1  # every ack was read: the next reply is this one's


# --- what a hostile or broken server gets -----------------------------------------------------


def test_an_announced_huge_packet_is_refused_before_any_buffering() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.raw(U32.pack(0xFFFFFFF0) + bytes([Packet.ATTRS]) + U32.pack(rid))
        idle(peer)

    with scripted(script) as session:
        tracemalloc.start()
        try:
            with pytest.raises(BackendProtocolError, match="over the"):
                session.stat("/a")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20
        assert session.closed
        with pytest.raises(EOFError):
            session.stat("/a")


@pytest.mark.parametrize("via", VIA)
def test_data_longer_than_the_read_asked_is_refused(via: str) -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        # within MAX_PACKET, but more than the 1000 bytes asked
        peer.data(rid, b"y" * 5000)
        idle(peer)

    with (
        scripted(script, via=via) as session,
        pytest.raises(BackendProtocolError, match="READ of 1000 bytes with 5000"),
    ):
        session.read(b"h", 0, 1000, 1000)
    assert session.closed


@pytest.mark.parametrize("length", [MAX_PACKET + 100, 0x7FFFFFFF])
def test_an_oversized_data_packet_is_refused(length: int) -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.raw(U32.pack(length) + bytes([Packet.DATA]) + U32.pack(rid) + U32.pack(length - 9))
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError):
        session.read(b"h", 0, 1000, 1000)


def test_empty_data_is_refused_rather_than_asked_for_forever() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.data(rid, b"")
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError):
        session.read(b"h", 0, 1000, 1000)


@pytest.mark.parametrize("operation", ["stat", "read", "write"])
def test_a_reply_to_a_request_never_sent_is_refused(operation: str) -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.status(rid + 1000, Status.OK)
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError, match="not asked"):
        if operation == "stat":
            session.stat("/a")
        elif operation == "read":
            session.read(b"h", 0, 100, 100)
        else:
            session.write(b"h", b"z" * 100, 100, 1)
    assert session.closed


def test_a_reply_of_the_wrong_type_is_refused() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.reply(Packet.HANDLE, rid, pack_string(b"h"))
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError, match=r"HANDLE|102"):
        session.stat("/a")


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no attribute flags at all
        U32.pack(0x1) + b"\x00\x00",  # a size cut short
        U32.pack(0x80000000) + U32.pack(0xFFFFFFFF),  # four billion extended attributes
        U32.pack(0x80000000) + U32.pack(1) + U32.pack(1000) + b"x",  # a string past the end
    ],
)
def test_malformed_attributes_are_refused(body: bytes) -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.reply(Packet.ATTRS, rid, body)
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError, match="malformed"):
        session.stat("/a")


def test_a_listing_with_a_huge_count_is_refused() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.reply(Packet.HANDLE, rid, pack_string(b"d"))
        _, rid, _ = peer.request()
        peer.reply(Packet.NAME, rid, U32.pack(0xFFFFFFFF) + pack_string(b"a"))
        _, rid, _ = peer.request()  # the second READDIR, sent with the first
        peer.status(rid, Status.EOF)
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError, match="names in"):
        session.listdir("/")


def test_a_listing_without_end_is_refused_at_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server answering every READDIR with more names (never EOF) fills no more memory than
    MAX_LISTING entries (lowered here to 250: three answers of 100 go over it)."""
    monkeypatch.setattr(_sftp_wire, "MAX_LISTING", 250)
    answered = []

    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.reply(Packet.HANDLE, rid, pack_string(b"d"))
        while True:
            kind, rid, _ = peer.request()
            if kind == Packet.CLOSE:
                peer.status(rid, Status.OK)
                continue
            n = len(answered) * 100
            names = b"".join(pack_string(b"f%d" % (n + i)) + pack_string(b"") + U32.pack(0) for i in range(100))
            peer.reply(Packet.NAME, rid, U32.pack(100) + names)
            answered.append(rid)

    with scripted(script) as session, pytest.raises(BackendProtocolError, match="more than 250 entries"):
        session.listdir("/")
    # READDIRs go out two at a time: the third answer goes over, the fourth is not parsed
    assert len(answered) == 4


def test_an_empty_listing_answer_is_refused_rather_than_asked_again_forever() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.reply(Packet.HANDLE, rid, pack_string(b"d"))
        for _ in range(2):  # READDIRs go out two at a time
            _, rid, _ = peer.request()
            peer.reply(Packet.NAME, rid, U32.pack(0))
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError, match="no names"):
        session.listdir("/")


def test_a_handle_over_256_bytes_is_refused() -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        peer.reply(Packet.HANDLE, rid, pack_string(b"h" * 257))
        idle(peer)

    with scripted(script) as session, pytest.raises(BackendProtocolError, match="handle of 257"):
        session.open("/f", OpenFlag.READ)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("cut", [2, 7, 20])
def test_a_reply_cut_short_by_the_end_of_the_stream_is_a_dropped_connection(cut: int, via: str) -> None:
    def script(peer: Peer) -> None:
        _, rid, _ = peer.request()
        whole = U32.pack(4 + 1 + 4 + 50) + bytes([Packet.DATA]) + U32.pack(rid) + pack_string(b"d" * 50)
        peer.raw(whole[:cut])
        peer.sock.shutdown(socket.SHUT_WR)
        idle(peer)

    with scripted(script, via=via) as session, pytest.raises(EOFError):
        session.read(b"h", 0, 50, 50)
    assert session.closed


def test_a_stalled_reply_times_out_instead_of_hanging() -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.raw(U32.pack(100) + bytes([Packet.DATA]))  # then nothing
        idle(peer)

    started = time.monotonic()
    with scripted(script, timeout=0.5) as session, pytest.raises(TimeoutError):
        session.read(b"h", 0, 100, 100)
    assert session.closed
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("via", VIA)
def test_a_reply_sent_a_byte_at_a_time_is_given_up(via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each byte within the stream's timeout (0.5 s), the packet never: it must arrive within
    the patience plus its length at MIN_RATE (here 0.3 s + 100 bytes at 1 KiB/s)."""
    monkeypatch.setattr(_sftp_wire, "MIN_RATE", 1024)

    def script(peer: Peer) -> None:
        _kind, rid, _ = peer.request()
        packet = U32.pack(4 + 5 + 100) + bytes([Packet.DATA]) + U32.pack(rid) + U32.pack(100) + bytes(100)
        with suppress(OSError):
            for i in range(len(packet)):
                peer.raw(packet[i : i + 1])
                time.sleep(0.05)
        idle(peer)

    started = time.monotonic()
    with scripted(script, timeout=0.5, via=via) as session:
        session.patience = 0.3
        with pytest.raises(TimeoutError, match="given up as too slow"):
            session.read(b"h", 0, 100, 100)
    assert session.closed
    assert time.monotonic() - started < 3  # 100 bytes at one per 0.05 s would take 5.7 s


def test_a_read_answered_a_byte_per_reply_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each reply whole and in time, but a byte each: the read as a whole meets MIN_RATE."""
    monkeypatch.setattr(_sftp_wire, "MIN_RATE", 1024)

    def script(peer: Peer) -> None:
        with suppress(OSError, EOFError):
            while True:
                _kind, rid, _ = peer.request()
                time.sleep(0.05)
                peer.data(rid, b"x")
        idle(peer)

    started = time.monotonic()
    with scripted(script, timeout=0.5) as session:
        session.patience = 0.3
        with pytest.raises(TimeoutError, match="given up as too slow"):
            session.read(b"h", 0, 100, 100)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"Welcome to the server!\n", "not SFTP"),  # a login shell talking
        (U32.pack(5) + bytes([Packet.VERSION]) + U32.pack(6), "version 6"),
        (U32.pack(0xFFFFFFF0) + bytes([Packet.VERSION]), "not SFTP"),
    ],
)
def test_a_handshake_that_is_not_sftp_v3_is_refused(answer: bytes, match: str) -> None:
    def script(peer: Peer) -> None:
        peer.request()
        peer.raw(answer)
        idle(peer)

    with scripted(script, start=False) as session:
        with pytest.raises(BackendProtocolError, match=match):
            session.start()
        assert session.closed


def test_limits_are_asked_only_of_a_server_that_offers_them() -> None:
    def script(peer: Peer) -> None:
        kind, rid, rest = peer.request()
        assert kind == Packet.EXTENDED and rest == pack_string(b"limits@openssh.com")
        peer.reply(Packet.EXTENDED_REPLY, rid, struct.pack(">4Q", 262144, 261120, 261120, 0))
        idle(peer)

    with scripted(script) as session:
        assert session.limits() == (262144, 261120, 261120, 0)
    with scripted(idle) as session:
        session.extensions.clear()
        assert session.limits() is None


def test_the_paramiko_channel_adapter() -> None:
    class FakeChannel:
        def __init__(self) -> None:
            self.sent = b""

        def recv(self, size: int) -> bytes:
            return b"abc"[:size]

        def sendall(self, data: bytes) -> None:
            assert isinstance(data, bytes)
            self.sent += data

        def close(self) -> None:
            pass

    channel = FakeChannel()
    stream = RecvStream(channel)
    buffer = bytearray(10)
    assert stream.recv_into(memoryview(buffer), 2) == 2 and buffer[:2] == b"ab"
    stream.sendall(memoryview(b"xyz")[1:])
    assert channel.sent == b"yz"


def test_the_channel_adapter_takes_what_the_channel_holds_and_serves_small_reads_from_it() -> None:
    class ScriptedChannel:
        def __init__(self, pieces: list[bytes]) -> None:
            self.pieces = pieces
            self.asked: list[int] = []

        def recv(self, size: int) -> bytes:
            self.asked.append(size)
            return self.pieces.pop(0)[:size] if self.pieces else b""

        def sendall(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

    # a header, a length and a payload arriving in one piece, then the rest of the payload
    channel = ScriptedChannel([b"HEADER123" + b"LEN4" + b"p" * 100, b"q" * 50])
    stream = RecvStream(channel)
    buffer = bytearray(200)
    view = memoryview(buffer)
    assert stream.recv_into(view[:9], 9) == 9 and buffer[:9] == b"HEADER123"
    assert stream.recv_into(view[:4], 4) == 4 and buffer[:4] == b"LEN4"
    # one call of the channel so far, asking for all it may hold
    assert channel.asked == [_sftp_wire.RECV_AHEAD]
    # a read larger than what is kept gets what is kept, never more than its buffer
    assert stream.recv_into(view[:150], 150) == 100 and buffer[:100] == b"p" * 100
    assert stream.recv_into(view[:30], 30) == 30 and buffer[:30] == b"q" * 30
    assert stream.recv_into(view, 0) == 20 and buffer[:20] == b"q" * 20  # nbytes 0: the buffer's size
    assert len(channel.asked) == 2
    assert stream.recv_into(view, 10) == 0  # the channel's end


# --- the parser, paramiko's as the oracle -----------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
optional_u32 = st.none() | u32
attrs_strategy = st.builds(
    Attrs,
    size=st.none() | st.integers(0, 0xFFFFFFFFFFFFFFFF),
    uid=optional_u32,
    gid=optional_u32,
    mode=optional_u32,
    atime=optional_u32,
    mtime=optional_u32,
).map(
    # uid/gid and the two times travel in pairs: both or neither
    lambda a: Attrs(
        a.size,
        a.uid if a.gid is not None else None,
        a.gid if a.uid is not None else None,
        a.mode,
        a.atime if a.mtime is not None else None,
        a.mtime if a.atime is not None else None,
    )
)
extended_strategy = st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=20)), max_size=3).map(tuple)


@given(attrs_strategy, extended_strategy)
def test_attributes_round_trip_and_agree_with_paramiko(attrs: Attrs, extended: tuple[tuple[bytes, bytes], ...]) -> None:
    packed = attrs.pack(extended)
    cursor = _Cursor(packed)
    assert parse_attrs(cursor) == attrs
    assert cursor.left() == 0
    oracle = paramiko.SFTPAttributes._from_msg(paramiko.Message(packed))
    assert (oracle.st_size, oracle.st_uid, oracle.st_gid, oracle.st_mode, oracle.st_atime, oracle.st_mtime) == (
        attrs.size,
        attrs.uid,
        attrs.gid,
        attrs.mode,
        attrs.atime,
        attrs.mtime,
    )


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=40), attrs_strategy), max_size=8))
def test_name_replies_parse_as_paramiko_builds_them(entries: list[tuple[bytes, bytes, Attrs]]) -> None:
    message = paramiko.Message()
    message.add_int(len(entries))
    for name, long_name, attrs in entries:
        message.add_string(name)
        message.add_string(long_name)
        message.add_bytes(attrs.pack())
    assert parse_name(_Cursor(message.asbytes())) == [(name, attrs) for name, _long, attrs in entries]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_cleanly(data: bytes) -> None:
    for parse in (parse_attrs, parse_name):
        with suppress(BackendProtocolError):
            parse(_Cursor(data))


# --- through the backend ----------------------------------------------------------------------


def test_the_backend_reports_a_protocol_error_with_its_url_and_does_not_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scripted server behind the backend's pool (no SSH): the error names the repository."""
    from vmvault.backends import sftp

    def script(peer: Peer) -> None:
        kind, rid, _ = peer.request()
        assert kind == Packet.OPENDIR  # the layout check's listing of the root
        peer.raw(U32.pack(0x40000000) + bytes([Packet.HANDLE]) + U32.pack(rid))
        idle(peer)

    backend = sftp.SftpBackend("nas.example", "/srv/repo", transport="paramiko", known_hosts=str(tmp_path / "kh"))
    connects: list[Session] = []
    with scripted(script) as session:

        def connect() -> sftp._Connection:
            connects.append(session)
            return sftp._Connection(session)

        monkeypatch.setattr(backend._pool, "_factory", connect)
        with pytest.raises(
            BackendProtocolError, match=r"^sftp://.*nas\.example/srv/repo: cannot look up data/x: .*over"
        ):
            backend.exists("data/x")
    assert len(connects) == 1
    assert session.closed


def test_a_write_taken_in_a_little_at_a_time_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each WRITE acknowledged in time, but slowly: the write as a whole meets MIN_RATE (here
    0.3 s + 100 kB at 1 MiB/s, where the server would take 5 s)."""
    monkeypatch.setattr(_sftp_wire, "MIN_RATE", 1 << 20)

    def script(peer: Peer) -> None:
        with suppress(OSError, EOFError):
            while True:
                kind, rid, _ = peer.request()
                assert kind == Packet.WRITE
                time.sleep(0.05)
                peer.status(rid, Status.OK)
        idle(peer)

    started = time.monotonic()
    with scripted(script, timeout=0.5) as session:
        session.patience = 0.3
        with pytest.raises(TimeoutError, match=r"took \d+ of 100000 bytes written in over 0 s; given up as too slow"):
            session.write(b"h", b"x" * 100_000, 1000, 1)
        assert session.closed
    assert time.monotonic() - started < 3

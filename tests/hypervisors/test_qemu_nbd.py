"""The NBD reader against qemu-nbd, cross-checked with libnbd, nbdinfo and qemu-img."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import require_tool
from vmvault.disk.base import Extent, ExtentKind
from vmvault.errors import SourceError
from vmvault.hypervisors import nbd_layout as wire
from vmvault.hypervisors._nbd import (
    BASE_ALLOCATION,
    MAX_READ,
    MIN_STATUS_STEP,
    STRUCTURED_REPLY,
    NbdConnection,
    NbdImage,
    ReplyChunk,
    import_libnbd,
)

MiB = 1024 * 1024
SIZE = 40 * MiB + 4096  # not a multiple of the cluster size: the last extent is short

#: (offset, length, pattern) written after the bitmap was added; pattern None = write zeroes
WRITES = [(0, MiB, 0x11), (5 * MiB + 333, 70_000, 0x22), (12 * MiB, MAX_READ // 4, 0x33), (39 * MiB, MiB, None)]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """qemu-nbd serving a qcow2 (read-only) with persistent bitmap ``b0``; yields (socket, content)."""
    qemu_img, qemu_io, qemu_nbd = (require_tool(t) for t in ("qemu-img", "qemu-io", "qemu-nbd"))
    d = tmp_path_factory.mktemp("nbd")
    img = str(d / "disk.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", img, str(SIZE)], check=True)
    subprocess.run(
        [qemu_io, "-f", "qcow2", "-c", f"write -P 0x99 {20 * MiB} {MiB}", img], check=True, capture_output=True
    )
    subprocess.run([qemu_img, "bitmap", "--add", img, "b0"], check=True)
    for off, n, pat in WRITES:
        cmd = f"write -z {off} {n}" if pat is None else f"write -P {pat:#x} {off} {n}"
        subprocess.run([qemu_io, "-f", "qcow2", "-c", cmd, img], check=True, capture_output=True)
    raw = d / "disk.raw"
    subprocess.run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", img, str(raw)], check=True)
    sock = str(d / "nbd.sock")
    proc = subprocess.Popen(
        [qemu_nbd, "-r", "-f", "qcow2", "-k", sock, "-x", "disk", "-B", "b0", "--shared=8", "--persistent", img]
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)
        yield sock, raw.read_bytes()
    finally:
        proc.terminate()
        proc.wait()


def dirty_expected() -> list[tuple[int, int]]:
    gran = 64 * 1024
    clusters = sorted({k for off, n, _ in WRITES for k in range(off // gran, -(-(off + n) // gran))})
    out: list[tuple[int, int]] = []
    for k in clusters:
        if out and out[-1][0] + out[-1][1] == k * gran:
            out[-1] = (out[-1][0], out[-1][1] + gran)
        else:
            out.append((k * gran, gran))
    return [(o, min(n, SIZE - o)) for o, n in out]


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["python", "libnbd"])
def test_reader_matches_the_image(export: tuple[str, bytes], backend: str) -> None:
    sock, content = export
    if backend == "libnbd" and import_libnbd() is None:
        pytest.skip("libnbd's Python bindings do not load for this Python (Debian: python3-libnbd)")
    with NbdImage(sock, "disk", bitmap="b0", backend=backend) as img:
        assert img.size == SIZE and img.format == "nbd"
        extents = list(img.extents())
        assert extents[0].offset == 0 and extents[-1].end == SIZE
        # everything outside DATA extents reads as zeros; the zero-written range is not DATA
        for ext in extents:
            if ext.kind is ExtentKind.ZERO:
                assert content[ext.offset : ext.end].count(0) == ext.length
        assert not any(e.kind is ExtentKind.DATA and e.offset <= 39 * MiB < e.end for e in extents)
        assert sum(e.length for e in extents if e.kind is ExtentKind.DATA) < SIZE // 2
        assert img.dirty_extents() == dirty_expected()
        assert img.read(0, SIZE) == content  # > 32 MiB: split
        assert img.read(5 * MiB + 1, 3 * MiB + 7) == content[5 * MiB + 1 : 8 * MiB + 8]
        assert img.read(SIZE - 10, 100) == content[-10:]
        assert img.read(SIZE, 10) == b""


@pytest.mark.integration
def test_parity_with_nbdinfo(export: tuple[str, bytes]) -> None:
    sock, _ = export
    nbdinfo = require_tool("nbdinfo")
    url = f"nbd+unix:///disk?socket={sock}"

    def nbd_map(context: str) -> list[dict[str, object]]:
        out = subprocess.run([nbdinfo, "--json", f"--map={context}", url], check=True, capture_output=True)
        return list(json.loads(out.stdout))

    with NbdImage(sock, "disk", bitmap="b0") as img:
        zero = [
            Extent(int(e["offset"]), int(e["length"]), ExtentKind.ZERO if int(e["type"]) & 2 else ExtentKind.DATA)  # type: ignore[call-overload]
            for e in nbd_map("base:allocation")
        ]
        assert list(img.extents()) == [e for e in zero if e.length]
        dirty = [(int(e["offset"]), int(e["length"])) for e in nbd_map("qemu:dirty-bitmap:b0") if int(e["type"]) & 1]  # type: ignore[call-overload]
        assert img.dirty_extents() == dirty


@pytest.mark.integration
def test_errors_are_source_errors(export: tuple[str, bytes], tmp_path: Path) -> None:
    sock, _ = export
    with pytest.raises(SourceError, match="unknown export"):
        NbdImage(sock, "nope")
    with pytest.raises(SourceError, match="qemu:dirty-bitmap:absent"):
        NbdImage(sock, "disk", bitmap="absent")
    with pytest.raises(SourceError, match="cannot connect"):
        NbdImage(str(tmp_path / "absent.sock"), "disk")
    img = NbdImage(sock, "disk")
    with pytest.raises(SourceError, match="no dirty bitmap"):
        img.dirty_extents()
    img.close()
    with pytest.raises(SourceError, match="closed"):
        img.read(0, 10)

    # something that is not an NBD server
    path = str(tmp_path / "junk.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def junk() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    t = threading.Thread(target=junk)
    t.start()
    try:
        with pytest.raises(SourceError, match="not a newstyle NBD server"):
            NbdImage(path, "disk")
    finally:
        t.join()
        server.close()


@pytest.mark.integration
def test_connection_pool_under_threads(export: tuple[str, bytes]) -> None:
    sock, content = export
    with NbdImage(sock, "disk") as img:
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for i in range(10):
                    off = ((k * 7 + i) * 1_000_003) % (SIZE - MiB)
                    assert img.read(off, MiB) == content[off : off + MiB]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert 1 <= img.connections <= 4
    assert img.connections == 0


class _NoSystemNbd:
    """``import nbd`` fails unless the private folder import_libnbd links into is on sys.path."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "nbd" and not any("vmvault-import-nbd-" in entry for entry in sys.path):
            raise ModuleNotFoundError("No module named 'nbd'", name="nbd")


def test_import_libnbd_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Debian fallback really runs (a stand-in dist-packages with a pure-Python ``nbd.py``):
    its private folder is made, imported from and removed, and sys.path is restored."""
    dist = tmp_path / "dist-packages"
    dist.mkdir()
    (dist / "nbd.py").write_text("STAND_IN = True\n")
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    (dist / f"libnbdmod.{tag}-x86_64-linux-gnu.so").write_bytes(b"")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr("vmvault.hypervisors._debian.DIST_PACKAGES", str(dist))
    monkeypatch.delitem(sys.modules, "nbd", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoSystemNbd(), *sys.meta_path])
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def spy(*args: object, **kwargs: object) -> str:
        folder = mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        made.append(str(folder))
        return str(folder)

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    path_before = list(sys.path)
    module = import_libnbd()
    sys.modules.pop("nbd", None)
    assert module is not None and module.STAND_IN is True
    assert len(made) == 1 and os.path.dirname(made[0]) == str(scratch)
    assert not os.path.exists(made[0]) and os.listdir(scratch) == []
    assert sys.path == path_before


@pytest.mark.integration
def test_server_error_keeps_the_connection_in_step(export: tuple[str, bytes]) -> None:
    sock, content = export
    conn = NbdConnection(sock, "disk", (BASE_ALLOCATION,))
    try:
        assert conn.structured and conn.size == SIZE and BASE_ALLOCATION in conn.context_ids
        with pytest.raises(SourceError, match="NBD server error"):
            conn.read(SIZE - 512, 4096)  # past the end: QEMU answers with an error chunk
        assert conn.read(0, 4096) == content[:4096]  # the next reply is read correctly
        with pytest.raises(SourceError, match="not negotiated"):
            conn.block_status("qemu:dirty-bitmap:b0", 0, 4096)
    finally:
        conn.close()


@given(
    flags=st.integers(0, 0xFFFF),
    rtype=st.integers(0, 0xFFFF),
    cookie=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
)
def test_reply_chunk_round_trip(flags: int, rtype: int, cookie: int, length: int) -> None:
    chunk = ReplyChunk(flags, rtype, cookie, length)
    raw = chunk.pack()
    assert len(raw) == STRUCTURED_REPLY.size
    assert ReplyChunk.unpack(raw) == chunk
    assert chunk.done is bool(flags & 1)
    with pytest.raises(ValueError, match="magic"):
        ReplyChunk.unpack(b"\0" + raw[1:])


class _HostileServer:
    """An NBD server that negotiates as QEMU does and then answers as a QEMU taken over by its
    guest might: ``mode`` names the lie. It counts what it sent, and streams until the client
    hangs up."""

    def __init__(self, path: str, mode: str) -> None:
        self.mode = mode
        self.sent = 0
        self.requests = 0
        self.contexts: list[str] = []
        self._last_option = b""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _endless(self, conn: socket.socket, piece: bytes) -> None:
        while True:
            self._send(conn, piece)

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            got = conn.recv(n - len(data))
            if not got:
                raise ConnectionResetError
            data += got
        return data

    def _reply(self, conn: socket.socket, opt: int, rtype: int, payload: bytes = b"") -> None:
        self._send(conn, wire.OPTION_REPLY.pack(wire.REPLY_MAGIC, opt, rtype, len(payload)) + payload)

    def _meta_contexts(self, conn: socket.socket, opt: int, data: bytes) -> None:
        """Grant every context asked for, numbered from 1 in the order asked."""
        (name_length,) = struct.unpack_from(">I", data)
        pos = 4 + name_length
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        for i in range(count):
            (n,) = struct.unpack_from(">I", data, pos)
            self.contexts.append(data[pos + 4 : pos + 4 + n].decode())
            self._reply(conn, opt, wire.Rep.META_CONTEXT, struct.pack(">I", i + 1) + data[pos + 4 : pos + 4 + n])
            pos += 4 + n
        self._reply(conn, opt, wire.Rep.ACK)

    def _crawl(self, conn: socket.socket) -> None:
        """Answer every block status with one descriptor of one byte, per context: zeros that
        are not dirty, so that a client taking what it is told would ask again for every byte
        of the export (a thousand million requests for 1 GiB). Fall silent after 100,000."""
        for _ in range(100_000):
            _m, _f, cmd, cookie, _offset, _length = wire.REQUEST.unpack(self._recv(conn, wire.REQUEST.size))
            if cmd != wire.Cmd.BLOCK_STATUS:
                return
            self.requests += 1
            for i, _name in enumerate(self.contexts):
                body = struct.pack(">I", i + 1) + wire.BLOCK_DESCRIPTOR.pack(1, wire.STATE_ZERO)
                last = wire.REPLY_FLAG_DONE if i == len(self.contexts) - 1 else 0
                self._send(conn, ReplyChunk(last, wire.ReplyType.BLOCK_STATUS, cookie, len(body)).pack() + body)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, contextlib.suppress(OSError):
            self._send(
                conn,
                wire.SERVER_HELLO.pack(wire.NBDMAGIC, wire.IHAVEOPT, wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES),
            )
            self._recv(conn, wire.CLIENT_FLAGS.size)
            while True:
                _magic, opt, length = wire.OPTION_HEADER.unpack(self._recv(conn, wire.OPTION_HEADER.size))
                self._last_option = self._recv(conn, length)
                if opt == wire.Opt.STRUCTURED_REPLY and self.mode == "a huge option reply":
                    self._send(conn, wire.OPTION_REPLY.pack(wire.REPLY_MAGIC, opt, wire.Rep.ACK, 512 * MiB))
                    self._endless(conn, bytes(MiB))
                if opt == wire.Opt.SET_META_CONTEXT:
                    self._meta_contexts(conn, opt, self._last_option)
                    continue
                if opt != wire.Opt.GO:
                    self._reply(conn, opt, wire.Rep.ACK)
                    continue
                if self.mode == "option replies without end":
                    self._endless(conn, wire.OPTION_REPLY.pack(wire.REPLY_MAGIC, opt, wire.Rep.INFO, 6) + b"\0\1name")
                self._reply(conn, opt, wire.Rep.INFO, wire.INFO_EXPORT.pack(wire.Info.EXPORT, 1 << 30, 1))
                if self.mode == "a 1 GiB minimum block":
                    self._reply(
                        conn,
                        opt,
                        wire.Rep.INFO,
                        wire.INFO_BLOCK_SIZE.pack(wire.Info.BLOCK_SIZE, 1 << 30, 1 << 30, 1 << 30),
                    )
                self._reply(conn, opt, wire.Rep.ACK)
                break
            if self.mode == "block status a byte at a time":
                self._crawl(conn)
            _m, _f, _cmd, cookie, offset, length = wire.REQUEST.unpack(self._recv(conn, wire.REQUEST.size))
            if self.mode == "a huge reply chunk":
                self._send(
                    conn, ReplyChunk(wire.REPLY_FLAG_DONE, wire.ReplyType.BLOCK_STATUS, cookie, 512 * MiB).pack()
                )
                self._endless(conn, bytes(MiB))
            if self.mode == "data chunks without end":
                data = ReplyChunk(0, wire.ReplyType.OFFSET_DATA, cookie, 8 + length).pack() + struct.pack(">Q", offset)
                self._endless(conn, data + bytes(length))
            if self.mode == "a short hole chunk":
                self._send(
                    conn, ReplyChunk(wire.REPLY_FLAG_DONE, wire.ReplyType.OFFSET_HOLE, cookie, 4).pack() + bytes(4)
                )
                conn.recv(1)


def test_a_server_answering_a_byte_at_a_time_cannot_stall_a_backup(tmp_path: Path) -> None:
    """A server may answer a block status for less than was asked (the NBD protocol allows
    it), and the client asks again from where the answer ended. A QEMU taken over by its guest
    that answered one byte each time would have the backup ask once per byte of the disk
    (before: after 100,000 requests the server fell silent and the backup timed out; at that
    pace a 1 TiB disk would take years). An answer covering less than ``MIN_STATUS_STEP`` is
    completed with what is always safe to assume, data and dirty, so the requests are
    bounded by the size over that step, and nothing is taken for zeros or clean that was
    not said to be."""
    server = _HostileServer(str(tmp_path / "nbd.sock"), "block status a byte at a time")
    image = NbdImage(str(tmp_path / "nbd.sock"), "disk", bitmap="b0")
    try:
        extents = list(image.extents())
        dirty = image.dirty_extents()
    finally:
        image.close()
    size, step = 1 << 30, MIN_STATUS_STEP
    assert server.requests == 2 * size // step
    # one byte at the start of each step as the server said, the rest as data
    assert extents == [
        e
        for pos in range(0, size, step)
        for e in (Extent(pos, 1, ExtentKind.ZERO), Extent(pos + 1, step - 1, ExtentKind.DATA))
    ]
    assert dirty == [(pos + 1, step - 1) for pos in range(0, size, step)]


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("a huge option reply", "option reply of 536870912 bytes"),
        ("option replies without end", "more than 1024 replies to GO"),
        ("a 1 GiB minimum block", "gives 1073741824 bytes as its minimum block size"),
        ("a huge reply chunk", "holds more than"),
        ("data chunks without end", "answered more than its 4096 bytes"),
        ("a short hole chunk", "hole chunk of 4 bytes"),
    ],
)
def test_a_hostile_server_gets_an_error_not_our_memory(tmp_path: Path, mode: str, says: str) -> None:
    """The NBD server is QEMU, which runs what its guest may have taken over. What it claims is
    never allocated or read beyond the protocol's bounds: the client ends the connection with an
    error naming the lie, at once, and reads a few MiB at most (before: 512 MiB allocated and
    read, or a loop without end, or a traceback)."""
    server = _HostileServer(str(tmp_path / "nbd.sock"), mode)
    started = time.monotonic()
    with pytest.raises(SourceError, match=re.escape(says)):
        conn = NbdConnection(str(tmp_path / "nbd.sock"), "disk", timeout=10)
        try:
            conn.read(0, 4096)
        finally:
            conn.close()
    assert time.monotonic() - started < 5
    server.thread.join(10)
    assert not server.thread.is_alive()
    assert server.sent < MAX_READ + 8 * MiB  # what the sockets' buffers took besides what was read

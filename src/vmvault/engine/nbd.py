"""A read-only NBD server over a snapshot's disk: ``vmvault serve`` and instant recovery.

Why our own server and not nbdkit's Python plugin: the export must read through
:class:`~vmvault.engine.reader.DiskReader` (verified chunks, the shared bounded cache, a damaged
chunk reported with its snapshot, disk and offset), which lives in this process; nbdkit would
run vmvault inside its embedded interpreter (Debian's plugin is built for the system Python,
not the one vmvault may run on), each plugin instance opening the repository again, and its
errors would reach the user as nbdkit's log lines. The read-only subset of the protocol is
small (this module; the wire layout is ``hypervisors/nbd_layout.py``, shared with vmvault's
NBD client), and QEMU's client and nbdinfo are its test oracles.

The protocol is the NBD specification (doc/proto.md in the NetworkBlockDevice/nbd
repository): the fixed newstyle handshake with ``NBD_OPT_INFO``/``NBD_OPT_GO`` (and the old
``NBD_OPT_EXPORT_NAME``), ``NBD_OPT_STARTTLS`` when a TLS context is given,
``NBD_OPT_STRUCTURED_REPLY`` and the ``base:allocation`` meta context; in transmission
``READ``, ``BLOCK_STATUS`` (holes and zero chunks reported as holes that read as zeros),
``FLUSH`` and ``CACHE`` (nothing to do), ``DISC``; ``WRITE``, ``TRIM`` and ``WRITE_ZEROES``
are refused with ``EPERM``. Every field is big-endian.

Who may connect: a unix socket is made mode 0600 (its owner only, and root). NBD itself
authenticates nobody, so on TCP the server does: a loopback address serves only connections
whose other end belongs to this user or root, as the kernel's socket table says
(``/proc/net/tcp``, ``tcp6``: the same table ``ss -tenp`` reads); any other address needs a TLS
context that requires a client certificate (``ssl.CERT_REQUIRED``), since TLS with a server
certificate alone encrypts the disk for anyone who asks. A client that is neither is closed
before the server's greeting, with a log line.

Clients are untrusted: every option's length, the number of options, the number of meta
context queries, every request's offset and length and the number of clients at once are
bounded, negotiation has a deadline, and a client that breaks the protocol loses its own
connection only. A chunk that cannot be read (damaged, lost, storage down) is ``EIO`` for
that request and one log line naming the snapshot, the disk and the offset; the server and
the other requests carry on. Each client is served by a thread of its own; the reader and its
cache are shared (and thread-safe).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import selectors
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

from vmvault import platform
from vmvault.disk.base import Extent, ExtentKind
from vmvault.errors import ConfigError, TargetError, VmvaultError
from vmvault.hypervisors.nbd_layout import (
    BASE_ALLOCATION,
    BLOCK_DESCRIPTOR,
    CMD_FLAG_REQ_ONE,
    EXPORT_NAME_REPLY,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REPLY_FLAG_DONE,
    REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SERVER_HELLO,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    TFLAG_CAN_MULTI_CONN,
    TFLAG_HAS_FLAGS,
    TFLAG_READ_ONLY,
    TFLAG_SEND_CACHE,
    TFLAG_SEND_DF,
    TFLAG_SEND_FLUSH,
    Cmd,
    Info,
    Opt,
    Rep,
    ReplyType,
)

__all__ = [
    "MAX_CLIENTS",
    "MAX_REQUEST",
    "ExportSource",
    "NbdServer",
    "ServerStats",
    "loopback_peer_uid",
    "nbd_uri",
    "serve",
]

log = logging.getLogger(__name__)


#: the id our one meta context (base:allocation) has in every connection
_CONTEXT_ID = 1
#: the largest READ (and WRITE payload) a client may ask for: QEMU's own limit, and what we announce
MAX_REQUEST = 32 << 20
#: the largest option payload read (an export name is at most 4096 bytes by the specification)
MAX_OPTION_DATA = 8192
#: options one client may send before transmission; meta context queries in one option
MAX_OPTIONS = 64
MAX_QUERIES = 16
#: the most one BLOCK_STATUS reply describes (a client asks again for the rest)
MAX_STATUS_SPAN = 1 << 30
#: a connection's buffer for its reads' data, kept between requests up to this size (a larger
#: request has a buffer of its own): the source fills it and the reply is sent from it
KEPT_READ_BUFFER = 4 << 20
#: clients served at once; more are closed at once
MAX_CLIENTS = 16
#: seconds a client has to finish negotiating
HANDSHAKE_TIMEOUT = 30.0


class ExportSource(Protocol):
    """What an export reads: :class:`~vmvault.engine.reader.DiskReader` is one."""

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, buf: bytearray | memoryview) -> int: ...

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]: ...


@dataclass
class ServerStats:
    clients: int = 0
    refused_clients: int = 0
    requests: int = 0
    bytes_read: int = 0
    #: requests answered with an error, by errno name ("EIO", "EPERM", "EINVAL")
    errors: dict[str, int] = field(default_factory=dict)
    #: connections dropped for breaking the protocol
    protocol_errors: int = 0
    #: monotonic time of the first READ served, for measurements
    first_read: float | None = None


class _Gone(Exception):
    """The client closed the connection, or broke the protocol so that it must be closed."""


def nbd_uri(socket_path: str, export: str = "") -> str:
    """The ``nbd+unix`` URI QEMU and libnbd take for an export on a unix socket."""
    return f"nbd+unix:///{export}?socket={socket_path}"


class NbdServer:
    """Serves one read-only export to many clients, each on a thread of its own.

    ``label`` names the export in log lines ("snapshot 1a2b3c4d disk vda"). ``tls``: a server
    context; then every client must negotiate ``NBD_OPT_STARTTLS`` before anything else.
    """

    def __init__(
        self,
        source: ExportSource,
        *,
        label: str,
        export_name: str = "",
        tls: ssl.SSLContext | None = None,
        max_clients: int = MAX_CLIENTS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.source = source
        self.label = label
        self.export_name = export_name
        self.tls = tls
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.stats = ServerStats()
        self.address: str | tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._unix_path: str | None = None
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        #: on loopback TCP without client certificates, the users whose connections are served
        self._peer_uids: frozenset[int] | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------- listening

    def listen_unix(self, path: str) -> Self:
        """Listen on a new unix socket at ``path`` (mode 0600); an existing name is never replaced."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise TargetError(f"{path}: something already exists there; choose another socket path") from exc
            raise TargetError(f"{path}: cannot create the socket: {exc.strerror or exc}") from exc
        finally:
            os.umask(old)
        sock.listen(64)
        self._listener, self._unix_path, self.address = sock, path, path
        return self

    def listen_tcp(self, host: str, port: int) -> Self:
        """Listen on TCP. On a loopback address only this user's (and root's) connections are
        served, unless TLS with client certificates authenticates clients; on any other address
        that TLS is required (``ConfigError`` otherwise)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        certified = self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED
        loopback = ipaddress.ip_address(str(addr[0]).split("%")[0]).is_loopback
        if not loopback and not certified:
            raise ConfigError(
                f"cannot listen on {host}:{port}: NBD authenticates nobody, so beyond loopback only clients "
                "with a TLS client certificate are served (--tls-cert, --tls-key and --tls-client-ca)"
            )
        if loopback and not certified:
            uid = platform.current_uid()
            if uid is None or not os.path.exists(_SOCKET_TABLES[socket.AF_INET]):
                raise ConfigError(
                    f"cannot listen on {host}:{port}: this system does not tell which user a loopback "
                    "client is; use a unix socket or TLS client certificates"
                )
            self._peer_uids = frozenset({uid, 0})
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        sock.listen(64)
        self._listener = sock
        bound = sock.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        return self

    def start(self) -> Self:
        """Accept clients on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="vmvault-nbd-accept", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        listener = self._listener
        if listener is None:
            raise RuntimeError("listen_unix or listen_tcp first")
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not self._closed.is_set():
                if not sel.select(timeout=0.2):
                    continue
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                if self._peer_uids is not None:
                    uid = loopback_peer_uid(conn)
                    if uid not in self._peer_uids:
                        with self._lock:
                            self.stats.refused_clients += 1
                        who = "an unknown user" if uid is None else f"user {uid}"
                        log.warning("%s: refused a loopback client of %s: only this user and root", self.label, who)
                        conn.close()
                        continue
                with self._lock:
                    full = len(self._clients) >= self.max_clients
                    if not full:
                        self._clients.add(conn)
                        self.stats.clients += 1
                    else:
                        self.stats.refused_clients += 1
                if full:
                    log.warning("%s: refused a client: %d already connected", self.label, self.max_clients)
                    conn.close()
                    continue
                threading.Thread(
                    target=self._serve_client, args=(conn,), name="vmvault-nbd-client", daemon=True
                ).start()

    def close(self) -> None:
        """Stop accepting, drop every client, remove the unix socket."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._unix_path is not None:
            try:
                if stat.S_ISSOCK(os.lstat(self._unix_path).st_mode):
                    os.unlink(self._unix_path)
            except OSError:
                pass
            self._unix_path = None
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    @property
    def connected(self) -> int:
        with self._lock:
            return len(self._clients)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------- one client

    def _serve_client(self, conn: socket.socket) -> None:
        sock: socket.socket = conn
        try:
            session = _Session(self, conn)
            session.run()
        except _Gone as exc:
            if str(exc):
                with self._lock:
                    self.stats.protocol_errors += 1
                log.warning("%s: dropped a client: %s", self.label, exc)
        except (OSError, ssl.SSLError) as exc:
            log.info("%s: a client's connection ended: %s", self.label, exc)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: dropped a client after an unexpected error", self.label)
        finally:
            with self._lock:
                self._clients.discard(conn)
            with suppress(OSError):
                sock.close()

    def _count_error(self, name: str) -> None:
        with self._lock:
            self.stats.errors[name] = self.stats.errors.get(name, 0) + 1


#: the kernel's tables of TCP sockets, by address family
_SOCKET_TABLES = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}
_TIME_WAIT = "06"


def _table_address(family: int, host: str, port: int) -> str:
    """``host:port`` as the socket table writes it: the address's 32-bit words in host byte order, in hex."""
    packed = socket.inet_pton(family, host.split("%")[0])
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def loopback_peer_uid(conn: socket.socket) -> int | None:
    """The user owning the other end of TCP connection ``conn`` when that end is on this host
    (the client's socket in the kernel's table, found by its address and port and ours); None
    when it is not there (another host, a client already gone, no such table)."""
    try:
        peer, mine = conn.getpeername(), conn.getsockname()
        theirs = _table_address(conn.family, str(peer[0]), int(peer[1]))
        ours = _table_address(conn.family, str(mine[0]), int(mine[1]))
        with open(_SOCKET_TABLES[conn.family], encoding="ascii") as table:
            for line in table:
                fields = line.split()
                # sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
                if len(fields) > 7 and fields[1] == theirs and fields[2] == ours and fields[3] != _TIME_WAIT:
                    return int(fields[7])
    except (OSError, KeyError, ValueError):
        return None
    return None


class _Session:
    """One client's connection: negotiation, then requests until it disconnects."""

    def __init__(self, server: NbdServer, conn: socket.socket) -> None:
        self.server = server
        self.sock: socket.socket = conn
        self.deadline = time.monotonic() + server.handshake_timeout
        self.structured = False
        self.meta = False
        self.tls_done = server.tls is None
        self.no_zeroes = False
        self._read_buffer = bytearray()

    # -- bytes

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.deadline:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise _Gone("it did not finish negotiating in time")
                self.sock.settimeout(left)
            try:
                part = self.sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError as exc:
                raise _Gone("it did not finish negotiating in time") from exc
            if not part:
                raise _Gone("")
            buf += part
        return bytes(buf)

    def send(self, *parts: bytes | memoryview) -> None:
        for part in parts:
            self.sock.sendall(part)

    # -- negotiation

    def run(self) -> None:
        self.send(SERVER_HELLO.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", self.recv_exact(4))
        if not client_flags & FLAG_FIXED_NEWSTYLE:
            raise _Gone("it does not speak the fixed newstyle handshake")
        if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise _Gone(f"it sent unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = OPTION_HEADER.unpack(self.recv_exact(OPTION_HEADER.size))
            if magic != IHAVEOPT:
                raise _Gone(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise _Gone(f"option {option} carries {length} bytes (at most {MAX_OPTION_DATA})")
            data = self.recv_exact(length)
            if self.option(option, data):
                self.deadline = 0.0
                self.sock.settimeout(None)
                self.transmission()
                return
        raise _Gone(f"more than {MAX_OPTIONS} options")

    def reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.send(OPTION_REPLY.pack(REPLY_MAGIC, option, kind, len(data)) + data)

    def option(self, option: int, data: bytes) -> bool:
        """Answer one option; True when transmission starts."""
        if not self.tls_done and option not in (Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                raise _Gone("it asked for an export without TLS")
            self.reply(option, REP_ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")
            return False
        if option == Opt.ABORT:
            self.reply(option, Rep.ACK)
            raise _Gone("")
        if option == Opt.STARTTLS:
            return self.starttls(data)
        if option == Opt.EXPORT_NAME:
            if data.decode("utf-8", "replace") not in ("", self.server.export_name):
                raise _Gone("it asked for an export that does not exist")
            flags = self.transmission_flags()
            self.send(EXPORT_NAME_REPLY.pack(self.server.source.size, flags) + (b"" if self.no_zeroes else bytes(124)))
            return True
        if option == Opt.LIST:
            if data:
                self.reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return False
            name = self.server.export_name.encode()
            self.reply(option, Rep.SERVER, struct.pack(">I", len(name)) + name)
            self.reply(option, Rep.ACK)
            return False
        if option == Opt.STRUCTURED_REPLY:
            if data:
                self.reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                return False
            self.structured = True
            self.reply(option, Rep.ACK)
            return False
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self.meta_context(option, data)
            return False
        if option in (Opt.INFO, Opt.GO):
            return self.info(option, data)
        self.reply(option, REP_ERR_UNSUP, b"not supported by this server")
        return False

    def starttls(self, data: bytes) -> bool:
        ctx = self.server.tls
        if ctx is None:
            self.reply(Opt.STARTTLS, REP_ERR_POLICY, b"this server does not offer TLS")
            return False
        if self.tls_done:
            self.reply(Opt.STARTTLS, REP_ERR_INVALID, b"TLS is already on")
            return False
        if data:
            self.reply(Opt.STARTTLS, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return False
        self.reply(Opt.STARTTLS, Rep.ACK)
        self.sock.settimeout(max(0.1, self.deadline - time.monotonic()))
        try:
            self.sock = ctx.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise _Gone(f"the TLS handshake failed: {exc}") from exc
        self.tls_done = True
        return False

    def transmission_flags(self) -> int:
        flags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE
        if self.structured:
            flags |= TFLAG_SEND_DF
        return flags

    def _name(self, data: bytes, pos: int) -> tuple[str, int]:
        if pos + 4 > len(data):
            raise ValueError("truncated")
        (n,) = struct.unpack_from(">I", data, pos)
        if pos + 4 + n > len(data):
            raise ValueError("truncated")
        return data[pos + 4 : pos + 4 + n].decode("utf-8", "replace"), pos + 4 + n

    def info(self, option: int, data: bytes) -> bool:
        try:
            name, pos = self._name(data, 0)
            if pos + 2 > len(data):
                raise ValueError("truncated")
            (n,) = struct.unpack_from(">H", data, pos)
            if pos + 2 + 2 * n != len(data):
                raise ValueError("wrong length")
            requests = struct.unpack_from(f">{n}H", data, pos + 2)
        except ValueError:
            self.reply(option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")
            return False
        if name not in ("", self.server.export_name):
            self.reply(option, REP_ERR_UNKNOWN, b"no such export")
            return False
        export = INFO_EXPORT.pack(Info.EXPORT, self.server.source.size, self.transmission_flags())
        self.reply(option, Rep.INFO, export)
        if Info.BLOCK_SIZE in requests:
            self.reply(option, Rep.INFO, INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        self.reply(option, Rep.ACK)
        return option == Opt.GO

    def meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            self.reply(option, REP_ERR_INVALID, b"negotiate structured replies first")
            return
        try:
            name, pos = self._name(data, 0)
            if pos + 4 > len(data):
                raise ValueError("truncated")
            (n,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if n > MAX_QUERIES:
                raise ValueError("too many queries")
            queries = []
            for _ in range(n):
                query, pos = self._name(data, pos)
                queries.append(query)
            if pos != len(data):
                raise ValueError("wrong length")
        except ValueError:
            self.reply(option, REP_ERR_INVALID, b"malformed meta context option")
            return
        if name not in ("", self.server.export_name):
            self.reply(option, REP_ERR_UNKNOWN, b"no such export")
            return
        if option == Opt.LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            match = BASE_ALLOCATION in queries
            self.meta = match
        if match:
            self.reply(option, Rep.META_CONTEXT, struct.pack(">I", _CONTEXT_ID) + BASE_ALLOCATION.encode())
        self.reply(option, Rep.ACK)

    # -- transmission

    def transmission(self) -> None:
        size = self.server.source.size
        while True:
            magic, flags, kind, handle, offset, length = REQUEST.unpack(self.recv_exact(REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise _Gone(f"bad request magic {magic:#x}")
            with self.server._lock:
                self.server.stats.requests += 1
            if kind == Cmd.DISC:
                return
            if kind == Cmd.WRITE:
                if length > MAX_REQUEST:
                    raise _Gone(f"a write of {length} bytes")
                self.recv_exact(length)  # stay in step with the stream, then refuse
                self.error(handle, errno.EPERM, "the export is read-only")
                continue
            if kind in (Cmd.TRIM, Cmd.WRITE_ZEROES):
                self.error(handle, errno.EPERM, "the export is read-only")
                continue
            in_range = offset <= size and length <= size - offset
            if kind == Cmd.FLUSH:
                self.simple(handle, 0)
            elif kind == Cmd.READ:
                if not in_range or length > MAX_REQUEST or length == 0:
                    self.error(handle, errno.EINVAL, f"a read of {length} bytes at {offset} is out of bounds")
                else:
                    self.read(handle, offset, length)
            elif kind == Cmd.CACHE:
                self.simple(handle, 0 if in_range else errno.EINVAL)
            elif kind == Cmd.BLOCK_STATUS:
                if not (self.structured and self.meta):
                    self.error(handle, errno.EINVAL, "no meta context was negotiated")
                elif not in_range or length == 0:
                    self.error(handle, errno.EINVAL, f"block status of {length} bytes at {offset} is out of bounds")
                else:
                    self.block_status(handle, offset, length, one=bool(flags & CMD_FLAG_REQ_ONE))
            else:
                self.error(handle, errno.EINVAL, f"unknown command {kind}")

    def simple(self, handle: int, error: int) -> None:
        self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))

    def error(self, handle: int, error: int, message: str) -> None:
        self.server._count_error(errno.errorcode.get(error, str(error)))
        if not self.structured:
            self.simple(handle, error)
            return
        msg = message.encode()[:4096]
        payload = struct.pack(">IH", error, len(msg)) + msg
        self.send(
            STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, handle, len(payload)),
            payload,
        )

    def read(self, handle: int, offset: int, length: int) -> None:
        server = self.server
        data = self._buffer(length)
        try:
            got = server.source.read_into(offset, data)
        except VmvaultError as exc:
            log.error("%s: read of %d bytes at offset %#x failed: %s", server.label, length, offset, exc)
            self.error(handle, errno.EIO, f"{server.label}: {exc}")
            return
        if got != length:  # the source is shorter than it said: never send a short read
            log.error("%s: read of %d bytes at offset %#x gave %d", server.label, length, offset, got)
            self.error(handle, errno.EIO, f"{server.label}: short read at {offset:#x}")
            return
        with server._lock:
            server.stats.bytes_read += length
            first = server.stats.first_read is None
            if first:
                server.stats.first_read = time.monotonic()
        if first:
            log.info("%s: first read served (at %.3f)", server.label, time.time())
        if self.structured:
            self.send(
                STRUCTURED_REPLY.pack(
                    STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, handle, 8 + length
                )
                + struct.pack(">Q", offset),
                data,
            )
        else:
            self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data)

    def _buffer(self, length: int) -> memoryview:
        """Room for a read's ``length`` bytes: the connection's kept buffer, or one of its own
        for a request larger than :data:`KEPT_READ_BUFFER` (a reply is sent before the next
        request is read, so one buffer serves them all)."""
        if length > KEPT_READ_BUFFER:
            return memoryview(bytearray(length))
        if len(self._read_buffer) < length:
            self._read_buffer = bytearray(max(length, min(2 * len(self._read_buffer), KEPT_READ_BUFFER)))
        return memoryview(self._read_buffer)[:length]

    def block_status(self, handle: int, offset: int, length: int, *, one: bool) -> None:
        server = self.server
        span = min(length, MAX_STATUS_SPAN)
        try:
            extents = server.source.block_status(offset, span)
        except VmvaultError as exc:
            log.error("%s: block status at offset %#x failed: %s", server.label, offset, exc)
            self.error(handle, errno.EIO, f"{server.label}: {exc}")
            return
        if not extents:
            self.error(handle, errno.EIO, f"{server.label}: no extents at {offset:#x}")
            return
        if one:
            extents = extents[:1]
        body = bytearray(struct.pack(">I", _CONTEXT_ID))
        for extent in extents:
            state = STATE_HOLE | STATE_ZERO if extent.kind is ExtentKind.ZERO else 0
            body += BLOCK_DESCRIPTOR.pack(extent.length, state)
        self.send(
            STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, handle, len(body)),
            bytes(body),
        )


@contextmanager
def serve(
    source: ExportSource, socket_path: str, *, label: str, tls: ssl.SSLContext | None = None
) -> Iterator[NbdServer]:
    """Serve ``source`` on a new unix socket in this process while the block runs."""
    server = NbdServer(source, label=label, tls=tls).listen_unix(socket_path)
    server.start()
    try:
        yield server
    finally:
        server.close()

"""Limits on the dashboard's clients: how many connections they hold, and how long one may take
to send a request or to read an answer.

An asyncio server holds a connection for as long as its client keeps it open, and uvicorn
waits without a limit for a request's head and body (its keep-alive timeout starts only after
an answer). A client that connects and sends nothing, or sends a byte now and then, holds one
of the process's file descriptors for good; TLS adds a minute per connection for the
handshake. The dashboard runs inside the daemon, so a few hundred such connections from
anywhere that reaches its port would leave the daemon without descriptors, and its backups
would fail with "Too many open files". So:

* at most ``max_connections`` connections are open at once and at most
  ``max_connections_per_address`` from one address (an IPv6 client: its /64); more are closed
  as they are accepted (before TLS), and each refusing address is logged (up to 1,000 of them);
* a connection must deliver a complete request, head and body, within ``client_timeout`` of
  being accepted or of its previous answer (a TLS handshake included), and must go on reading
  an answer (the server's send buffer drains) within ``client_timeout``; otherwise it is
  closed. A connection left idle is closed quietly; one that stalled mid-request or mid-answer
  is logged (once per address).

Connections are counted at the socket: the listening socket's ``accept`` admits or refuses,
an accepted socket's ``close`` (or its collection, unclosed) gives its place back. The request
and answer timers sit in a subclass of uvicorn's h11 protocol and read only h11's public
connection states.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections import Counter
from typing import Any

__all__ = ["ClientLimits", "address_of", "guarded_protocol", "listen_sockets"]

log = logging.getLogger("vmvault.web")

#: addresses logged as refused or as stalling, at most (a flood from many addresses is not a
#: flood of log lines)
_MAX_LOGGED = 1000
#: connections refused in one call of ``accept`` before the event loop gets its turn again
_REFUSED_PER_CALL = 64


class ClientLimits:
    """The connections the dashboard holds, by address, and the rules of admission and time."""

    def __init__(self, *, total: int, per_address: int, timeout: float) -> None:
        self.total = total
        self.per_address = per_address
        self.timeout = timeout
        # reentrant: a connection dropped without ``close`` gives its place back when collected,
        # which may happen while this thread holds the lock
        self._lock = threading.RLock()
        #: the open connections' addresses by file descriptor (not the sockets: one asyncio lost
        #: without closing it must stay collectable)
        self._open: dict[int, str] = {}
        self._served: set[int] = set()
        self._by_address: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()

    def open_count(self, address: str | None = None) -> int:
        with self._lock:
            return len(self._open) if address is None else self._by_address[address]

    def _admit(self, sock: _Accepted) -> bool:
        with self._lock:
            if len(self._open) >= self.total:
                refused = "the dashboard's connection limit (max_connections)"
            elif self._by_address[sock.address] >= self.per_address:
                refused = "the limit for one address (max_connections_per_address)"
            else:
                self._open[sock.fd] = sock.address
                self._by_address[sock.address] += 1
                return True
        self.note(sock.address, "refused", "refused connections from %s: %s is reached", refused)
        return False

    def _release(self, fd: int) -> None:
        with self._lock:
            address = self._open.pop(fd, None)
            self._served.discard(fd)
            if address is not None:
                self._by_address[address] -= 1
                if not self._by_address[address]:
                    del self._by_address[address]

    def _reached_http(self, fd: int) -> None:
        """The connection on ``fd`` reached the HTTP protocol (its TLS handshake is done)."""
        with self._lock:
            if fd in self._open:
                self._served.add(fd)

    def _handshake_over(self, sock: _Accepted) -> None:
        """Close an accepted connection that never reached HTTP (a TLS handshake that does not
        end). ``shutdown`` rather than ``close``: asyncio owns the descriptor and closes it."""
        with self._lock:
            if sock.fd == -1 or sock.fd in self._served:
                return
        self.note(sock.address, "handshake", "closed a connection from %s: no TLS handshake in %.0f s", self.timeout)
        with contextlib.suppress(OSError):  # already gone
            sock.shutdown(socket.SHUT_RDWR)

    def note(self, address: str, kind: str, message: str, *args: object) -> None:
        """Log ``message`` once per (address, kind)."""
        with self._lock:
            if (address, kind) in self._logged or len(self._logged) >= _MAX_LOGGED:
                return
            self._logged.add((address, kind))
        log.warning(message, address, *args)


def address_of(host: str) -> str:
    """What one client is counted as: its IPv4 address, or the /64 of its IPv6 address (one
    host may use any address of its /64)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Accepted(socket.socket):
    """An accepted connection that gives its place back when closed (or collected unclosed)."""

    limits: ClientLimits
    address: str
    fd: int = -1

    def close(self) -> None:
        self._give_back()
        super().close()

    def __del__(self) -> None:
        self._give_back()
        super().__del__()  # type: ignore[misc]  # the socket's own finalizer closes the descriptor

    def _give_back(self) -> None:
        fd, self.fd = self.fd, -1
        if fd != -1:
            self.limits._release(fd)


class _Listening(socket.socket):
    """A listening socket whose ``accept`` (called by asyncio's accept loop) admits a
    connection or closes it at once."""

    limits: ClientLimits

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(_REFUSED_PER_CALL):
            fd, peer = self._accept()  # type: ignore[attr-defined]  # BlockingIOError ends asyncio's loop
            sock = _Accepted(self.family, self.type, self.proto, fileno=fd)
            sock.limits, sock.address, sock.fd = self.limits, address_of(str(peer[0])), fd
            if not self.limits._admit(sock):
                sock.fd = -1  # never counted
                sock.close()
                continue
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # not under asyncio: no handshake timer
            else:
                loop.call_later(self.limits.timeout, self.limits._handshake_over, sock)
            return sock, peer
        raise BlockingIOError  # asyncio's "nothing more for now": the loop runs, then accepts again


def listen_sockets(host: str, port: int, limits: ClientLimits, *, backlog: int = 2048) -> list[socket.socket]:
    """Sockets bound to ``host:port`` (every address the name has, as asyncio would bind them)
    and listening, whose connections ``limits`` admits. ``OSError`` when one cannot be bound."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    made: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = _Listening(family, kind, proto)
            made.append(sock)
            sock.limits = limits
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except OSError:
        for done in made:
            done.close()
        raise
    return made


def guarded_protocol(limits: ClientLimits) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, with the request and answer timers of ``limits``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting_states = (h11.IDLE, h11.SEND_BODY)

    class Guarded(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _waiting: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                limits._reached_http(sock.fileno())
            self._wait("request")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting == "request" and self.conn.their_state not in waiting_states:
                self._stop()  # the request is complete: the application's turn

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state in waiting_states:
                self._wait("request")

        def pause_writing(self) -> None:
            super().pause_writing()
            self._wait("reading")

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._waiting == "reading":
                self._stop()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop()
            super().connection_lost(exc)

        def _wait(self, what: str) -> None:
            self._stop()
            self._waiting = what
            self._timer = asyncio.get_running_loop().call_later(limits.timeout, self._expired)

        def _stop(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._waiting = None

        def _expired(self) -> None:
            what, self._timer, self._waiting = self._waiting or "request", None, None
            if self.transport.is_closing():
                return
            address = address_of(str(self.client[0])) if self.client else "?"
            if what == "reading":
                limits.note(address, what, "closed a connection from %s: it read no answer for %.0f s", limits.timeout)
            elif self.conn.their_state is h11.SEND_BODY or self.conn.trailing_data[0]:
                limits.note(
                    address, what, "closed a connection from %s: no complete request within %.0f s (a stalled client, "
                    "or one holding connections open on purpose)", limits.timeout,
                )  # fmt: skip
            self.transport.abort()

    return Guarded

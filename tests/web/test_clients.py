"""The dashboard's limits on clients (web/clients.py), against the real uvicorn server on
loopback: connections that send nothing, send a request a byte at a time, never finish a TLS
handshake or never read their answer are closed after ``client_timeout``; connections beyond
the limits are closed as they arrive, and everyone else is still answered."""

from __future__ import annotations

import gc
import logging
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from vmvault.automation.config import WebSettings
from vmvault.errors import ConfigError
from vmvault.web.clients import ClientLimits, address_of, listen_sockets
from vmvault.web.server import Background, make_certificate, make_server

TIMEOUT = 1.0
BIG = 64 << 20


async def _hello(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(f"hello {len(body)}")


async def _big(request: Request) -> Response:
    async def chunks() -> Iterator[bytes]:  # type: ignore[misc]
        for _ in range(BIG >> 20):
            yield b"x" * (1 << 20)

    return StreamingResponse(chunks(), media_type="application/octet-stream")  # type: ignore[arg-type]


def _serve(settings: WebSettings) -> tuple[Background, int]:
    app = Starlette(routes=[Route("/", _hello, methods=["GET", "POST"]), Route("/big", _big)])
    server = make_server(app, settings, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    background = Background(server)
    background.start()
    return background, port


@pytest.fixture
def served() -> Iterator[tuple[Background, int]]:
    background, port = _serve(WebSettings(max_connections=8, max_connections_per_address=4, client_timeout=TIMEOUT))
    yield background, port
    background.stop()


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def _answer(sock: socket.socket, end: bytes = b"hello 0") -> bytes:
    answer = b""
    while not answer.endswith(end):
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    return answer


def _get(sock: socket.socket, path: str = "/") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return _answer(sock)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reading and dropping answers)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def _wait_open(background: Background, count: int) -> None:
    deadline = time.monotonic() + 5
    while background.server.limits.open_count() != count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert background.server.limits.open_count() == count


def test_a_connection_that_sends_nothing_is_closed(served: tuple[Background, int]) -> None:
    background, port = served
    idle = _connect(port)
    assert _closed_within(idle, TIMEOUT + 2)
    _wait_open(background, 0)


def test_a_request_sent_a_byte_at_a_time_is_cut_off(
    served: tuple[Background, int], caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn waits for a request's head and body without a limit; here a byte restarts no
    clock."""
    _background, port = served
    caplog.set_level(logging.WARNING, logger="vmvault.web")
    head = _connect(port)
    body = _connect(port)
    body.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
    started = time.monotonic()
    closed: dict[str, float] = {}
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 1000
    for i in range(len(request)):
        if len(closed) == 2 or time.monotonic() - started > TIMEOUT + 5:
            break
        for name, sock, data in (("head", head, request[i : i + 1]), ("body", body, b"b")):
            try:
                if name not in closed:
                    sock.sendall(data)
            except OSError:
                closed[name] = time.monotonic() - started
        time.sleep(0.1)
    assert set(closed) == {"head", "body"}
    assert max(closed.values()) < TIMEOUT + 2, closed
    assert "no complete request within 1 s" in caplog.text


def test_a_client_that_keeps_asking_keeps_its_connection(served: tuple[Background, int]) -> None:
    """The clock is per request: many quick requests on one connection over several timeouts."""
    _background, port = served
    sock = _connect(port)
    started = time.monotonic()
    answers = 0
    while time.monotonic() - started < 3 * TIMEOUT:
        assert _get(sock).endswith(b"hello 0")
        answers += 1
        time.sleep(0.2)
    assert answers >= 10
    sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc")
    assert _answer(sock, b"hello 3").endswith(b"hello 3")


def test_a_client_that_does_not_read_its_answer_is_closed(
    served: tuple[Background, int], caplog: pytest.LogCaptureFixture
) -> None:
    background, port = served
    caplog.set_level(logging.WARNING, logger="vmvault.web")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(TIMEOUT + 2)  # the server's send buffer fills and stays full
    assert "it read no answer for 1 s" in caplog.text
    assert _closed_within(sock, 10)  # what was buffered, then the end, long before 64 MiB
    _wait_open(background, 0)


def test_connections_beyond_the_limits_are_closed_as_they_arrive(
    served: tuple[Background, int], caplog: pytest.LogCaptureFixture
) -> None:
    """Four from one address, eight in all; the ones held are answered, later ones get in."""
    background, port = served
    caplog.set_level(logging.WARNING, logger="vmvault.web")
    held = [_connect(port) for _ in range(4)]
    _wait_open(background, 4)
    extra = _connect(port)
    assert _closed_within(extra, 2)
    assert "refused connections from 127.0.0.1: the limit for one address" in caplog.text
    others = [_connect(port, "127.0.0.2") for _ in range(4)]
    _wait_open(background, 8)
    third = _connect(port, "127.0.0.3")
    assert _closed_within(third, 2)
    assert "refused connections from 127.0.0.3: the dashboard's connection limit" in caplog.text
    assert _get(held[0]).endswith(b"hello 0") and _get(others[3]).endswith(b"hello 0")
    for sock in held:
        sock.close()
    _wait_open(background, 4)
    assert _get(_connect(port)).endswith(b"hello 0")


def test_a_tls_handshake_that_never_ends_is_closed_and_counted(tmp_path: Path) -> None:
    """Before the handshake the HTTP protocol has no connection yet: the socket counts it."""
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    make_certificate(str(cert), str(key), [])
    background, port = _serve(
        WebSettings(
            tls_cert=str(cert), tls_key=str(key), max_connections=8, max_connections_per_address=2,
            client_timeout=TIMEOUT,
        )
    )  # fmt: skip
    try:
        silent = [_connect(port) for _ in range(2)]
        _wait_open(background, 2)
        context = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(OSError), context.wrap_socket(_connect(port), server_hostname="localhost") as refused:
            refused.recv(1)
        for sock in silent:
            assert _closed_within(sock, TIMEOUT + 2)
        _wait_open(background, 0)
        with context.wrap_socket(_connect(port), server_hostname="localhost") as tls:
            assert _get(tls).endswith(b"hello 0")
    finally:
        background.stop()


def test_a_connection_lost_without_close_gives_its_place_back() -> None:
    """Counted at the socket: one dropped unclosed must not hold its place for good."""
    limits = ClientLimits(total=4, per_address=2, timeout=TIMEOUT)
    (listening,) = listen_sockets("127.0.0.1", 0, limits)
    with listening, socket.create_connection(listening.getsockname()) as client:
        accepted, _peer = listening.accept()
        assert limits.open_count() == 1 and limits.open_count("127.0.0.1") == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del accepted
            gc.collect()
        assert limits.open_count() == 0
        assert client.recv(1) == b""  # and the descriptor was closed


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    assert address_of("192.0.2.7") == "192.0.2.7" and address_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_of("2001:db8:1:2::1") == address_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_of("2001:db8:1:3::1") == "2001:db8:1:3::/64" and address_of("fe80::1%eth0") == "fe80::/64"


def test_an_address_in_use_is_a_clear_error(served: tuple[Background, int]) -> None:
    _background, port = served
    with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
        make_server(Starlette(), WebSettings(), "127.0.0.1", port)

"""Serving the dashboard with uvicorn: where it listens, TLS, and self-signed certificates.

* The default address is ``127.0.0.1:8620``. An address that is not loopback (``0.0.0.0``,
  a LAN address, a host name) needs TLS: the server refuses to start without a certificate
  and key, so passwords and session cookies never cross a network in the clear.
* The key file must not be readable by other users.
* ``vmvault web cert`` makes a self-signed pair (ECDSA P-256) for the host's names; the
  browser then shows the certificate's SHA-256 fingerprint, which ``cert`` prints, to compare.
* Connections are limited in number and in the time a client may take (web/clients.py).
* The server runs in the process's main thread (``vmvault web``) or in a thread beside the
  scheduler (``vmvault daemon`` with ``[web]``); jobs never run on its event loop.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
import stat
import threading
from collections.abc import Sequence
from typing import Any

from vmvault.automation.config import WebSettings, parse_listen
from vmvault.errors import ConfigError

from .clients import ClientLimits, guarded_protocol, listen_sockets

__all__ = ["Background", "DashboardServer", "is_loopback", "make_certificate", "make_server", "resolve_listen"]

log = logging.getLogger("vmvault.web")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as the network


def resolve_listen(settings: WebSettings, override: str | None = None) -> tuple[str, int]:
    """(host, port) to listen on; ``ConfigError`` when a non-loopback address has no TLS, or
    the TLS files are unusable."""
    text = override or settings.listen
    try:
        host, port = parse_listen(text)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    if not settings.tls and not is_loopback(host):
        raise ConfigError(
            f"{host}:{port} is not a loopback address: the dashboard serves it only over TLS. Give tls_cert and "
            "tls_key in [web] (make a self-signed pair with `vmvault web cert`), or listen on 127.0.0.1"
        )
    if settings.tls:
        assert settings.tls_cert is not None and settings.tls_key is not None
        for path, what in ((settings.tls_cert, "TLS certificate"), (settings.tls_key, "TLS key")):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"the {what} {path} is not a regular file")
        mode = os.stat(settings.tls_key).st_mode
        if mode & 0o077:
            raise ConfigError(
                f"the TLS key {settings.tls_key} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                f"chmod 600 it"
            )
    return host, port


def make_server(app: Any, settings: WebSettings, host: str, port: int) -> DashboardServer:
    """A server for ``app`` (not started), already listening on ``host:port`` with the client
    limits of ``settings`` (web/clients.py); ``ConfigError`` when it cannot listen there.
    Forwarded-for headers are not trusted: the login rate limit counts the real peer address."""
    import uvicorn

    limits = ClientLimits(
        total=settings.max_connections, per_address=settings.max_connections_per_address,
        timeout=settings.client_timeout,
    )  # fmt: skip
    try:
        sockets = listen_sockets(host, port, limits)
    except OSError as exc:
        raise ConfigError(f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        ws="none",
        log_config=None,
        access_log=True,
        proxy_headers=False,
        server_header=False,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        timeout_graceful_shutdown=5,
    )
    return DashboardServer(uvicorn.Server(config), sockets, limits)


class DashboardServer:
    """A uvicorn server and the sockets it serves (bound by :func:`make_server`)."""

    def __init__(self, server: Any, sockets: list[socket.socket], limits: ClientLimits) -> None:
        self.server = server
        self.sockets = sockets
        self.limits = limits

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self) -> None:
        """Serve until stopped (SIGINT or SIGTERM in the main thread, or :meth:`stop`)."""
        try:
            self.server.run(sockets=self.sockets)
        finally:
            for sock in self.sockets:
                sock.close()

    def stop(self) -> None:
        self.server.should_exit = True


class Background:
    """A dashboard server in a thread of its own (the daemon's scheduler keeps the main one)."""

    def __init__(self, server: DashboardServer) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.run, name="vmvault-web", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        waited = 0.0
        while not self.server.started and self.thread.is_alive() and waited < timeout:
            self.thread.join(0.05)
            waited += 0.05
        if not self.server.started:
            raise ConfigError("the dashboard could not start listening (see the log above)")

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)


def make_certificate(cert_path: str, key_path: str, names: Sequence[str], *, days: int = 825) -> str:
    """Write a self-signed certificate for ``names`` (host names and addresses; localhost,
    127.0.0.1 and ::1 are always included) and its key (mode 0600). Neither file may exist.
    Returns the certificate's SHA-256 fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    wanted = list(dict.fromkeys([*names, socket.gethostname(), "localhost", "127.0.0.1", "::1"]))
    sans: list[x509.GeneralName] = []
    for name in wanted:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0][:64] or "vmvault")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _create(key_path, key_pem, 0o600, "key")
    try:
        _create(cert_path, cert_pem, 0o644, "certificate")
    except BaseException:
        os.unlink(key_path)
        raise
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _create(path: str, data: bytes, mode: int, what: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise ConfigError(f"{path} exists; vmvault does not overwrite a {what} (remove it first)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create the {what} {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

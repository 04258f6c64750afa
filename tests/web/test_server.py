"""Serving: TLS off loopback, a self-signed pair, a real HTTPS server with Secure cookies,
and a server that stays responsive while a job runs."""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.web.conftest import PASSWORDS, Site
from vmvault.automation.config import Job, WebSettings
from vmvault.automation.runner import JobOutcome
from vmvault.automation.scheduler import SystemClock, run_and_record
from vmvault.errors import ConfigError
from vmvault.web.server import Background, is_loopback, make_certificate, make_server, resolve_listen


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_loopback_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("backup.example")
    plain = WebSettings()
    assert resolve_listen(plain) == ("127.0.0.1", 8620)
    assert resolve_listen(plain, "[::1]:9000") == ("::1", 9000)
    for address in ("0.0.0.0:8620", "192.168.1.10:443", "backup.example:8620", "[::]:8620"):
        with pytest.raises(ConfigError, match="not a loopback address: the dashboard serves it only over TLS"):
            resolve_listen(plain, address)
    for bad in ("8620", "host:", "host:99999", "a b:1", ":80"):
        with pytest.raises(ConfigError, match="--listen"):
            resolve_listen(plain, bad)


def test_certificate_and_its_checks(tmp_path: Path) -> None:
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    fingerprint = make_certificate(str(cert), str(key), ["backup.example", "192.0.2.7"], days=30)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"backup.example", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} >= {"192.0.2.7", "127.0.0.1", "::1"}
    assert fingerprint == parsed.fingerprint(parsed.signature_hash_algorithm).hex(":")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not overwrite"):
        make_certificate(str(cert), str(tmp_path / "other.key"), [])
    assert not (tmp_path / "other.key").exists()
    tls = WebSettings(tls_cert=str(cert), tls_key=str(key))
    assert resolve_listen(tls, "0.0.0.0:8443") == ("0.0.0.0", 8443)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        resolve_listen(tls, "0.0.0.0:8443")
    with pytest.raises(ConfigError, match="cannot read the TLS certificate"):
        resolve_listen(dataclasses.replace(tls, tls_cert=str(tmp_path / "nope")), "0.0.0.0:8443")


def test_https_with_secure_cookies(site: Site, tmp_path: Path) -> None:
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    make_certificate(str(cert), str(key), [])
    settings = dataclasses.replace(site.app.settings, tls_cert=str(cert), tls_key=str(key))
    site.app.settings, site.app.tls = settings, True
    port = _port()
    server = Background(make_server(site.app.build(), settings, "127.0.0.1", port))
    server.start()
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
        conn.request("GET", "/login")
        r = conn.getresponse()
        page = r.read().decode()
        assert r.status == 200
        login_cookie = r.getheader("set-cookie") or ""
        assert "Secure" in login_cookie and "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie
        assert r.getheader("strict-transport-security") == "max-age=31536000"
        m = re.search(r'name="login_token" value="([^"]+)"', page)
        assert m is not None
        body = f"username=vera&password={PASSWORDS['vera']}&login_token={m.group(1)}&next=/"
        conn.request(
            "POST", "/login", body,
            {"Content-Type": "application/x-www-form-urlencoded", "Cookie": login_cookie.split(";")[0],
             "Origin": f"https://localhost:{port}"},
        )  # fmt: skip
        r = conn.getresponse()
        r.read()
        assert r.status == 303, r.status
        for name in ("vmvault_session=", "vmvault_device="):
            cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie" and v.startswith(name)]
            assert cookie and "Secure" in cookie[0], name
        # plain HTTP to the TLS port gets nothing
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            plain.request("GET", "/login")
            plain.getresponse().read()
    finally:
        server.stop()


def test_the_server_answers_while_a_job_runs(site: Site) -> None:
    """A job holds its thread for as long as it runs; pages and the API answer meanwhile."""
    gate = threading.Event()
    started = threading.Event()

    def slow(config: object, job: object) -> JobOutcome:
        started.set()
        gate.wait(60)
        return JobOutcome(status="success")

    real = site.control._run

    def run(job: Job) -> None:
        run_and_record(site.config, job, site.history, SystemClock(), execute=slow)
        site.control.board.finished(job.name, "success")

    site.control._run = run  # type: ignore[method-assign]
    port = _port()
    server = Background(make_server(site.app.build(), site.app.settings, "127.0.0.1", port))
    server.start()
    token = site.users.add_token("otto", "t")[1]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/v1/jobs/web01-nightly/run", headers={"Authorization": f"Bearer {token}"})
        accepted = conn.getresponse()
        accepted.read()
        assert accepted.status == 202
        assert started.wait(10)
        times = []
        for path in ("/api/v1/jobs", "/api/v1/vms", "/api/v1/history", "/api/v1/progress"):
            t0 = time.monotonic()
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            r = conn.getresponse()
            r.read()
            times.append(time.monotonic() - t0)
            assert r.status == 200, path
        assert max(times) < 2.0, times
        assert site.history.last("web01-nightly").status == "running"  # type: ignore[union-attr]
    finally:
        gate.set()
        site.control.wait(30)
        site.control._run = real  # type: ignore[method-assign]
        server.stop()
    assert site.history.last("web01-nightly").status == "success"  # type: ignore[union-attr]

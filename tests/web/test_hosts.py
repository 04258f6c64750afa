"""The names the dashboard answers to (web/hosts.py): a page that rebinds a name of its own to
the dashboard's address reaches nothing, not even the login form."""

from __future__ import annotations

import logging
import socket
import urllib.request
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.web.conftest import PASSWORDS, Site, close_site, make_site
from tests.web.test_auth import _login
from vmvault.automation.config import WebSettings, host_name
from vmvault.errors import ConfigError
from vmvault.web.hosts import DashboardNames, certificate_names, dashboard_names
from vmvault.web.server import Background, make_certificate, make_server

REBOUND = "http://rebound.example:8620"


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("127.0.0.1:8620", True),
        ("127.0.0.1", True),
        ("192.0.2.7:443", True),  # any address: no name can be rebound into one
        ("[::1]:8620", True),
        ("[::1]", True),
        ("localhost:8620", True),
        ("LOCALHOST.:8620", True),
        ("backup.example.com", True),
        ("Backup.Example.COM:8620", True),
        ("web.lan:8620", True),
        ("a.b.lan:8620", False),  # a wildcard covers one label
        ("lan:8620", False),
        ("rebound.example:8620", False),
        ("backup.example.com.evil.test", False),
        ("evil-backup.example.com", False),
        ("localhost.evil.test", False),
        ("127.0.0.1.evil.test:8620", False),
        ("2130706433:8620", False),  # 127.0.0.1 as one number: not a form browsers send
        ("", False),
        ("localhost:port", False),
        ("[::1", False),
        ("[::1]x", False),
        ("[localhost]:8620", False),
        ("::1", False),  # an IPv6 address must be in brackets
    ],
)
def test_which_host_headers_name_the_dashboard(header: str, allowed: bool) -> None:
    names = DashboardNames(["backup.example.com", "*.lan"])
    assert names.allows(header) is allowed


def test_host_names_in_the_configuration_are_checked() -> None:
    assert host_name(" Backup.Example.com. ") == "backup.example.com"
    assert host_name("*.LAN") == "*.lan"
    for bad in ("backup example", "backup.example.com:443", "-x.example", "*", "a.*.example", "[::1]", "x" * 64):
        with pytest.raises(ValueError, match="is not a host name"):
            host_name(bad)


def test_the_names_come_from_listen_the_certificate_and_hosts(tmp_path: Path) -> None:
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    make_certificate(str(cert), str(key), ["backup.example", "192.0.2.7"], days=30)
    assert "backup.example" in certificate_names(str(cert))
    assert "192.0.2.7" not in certificate_names(str(cert))  # addresses need no listing
    settings = WebSettings(listen="vault.lan:8620", tls_cert=str(cert), tls_key=str(key), hosts=("proxy.example",))
    names = dashboard_names(settings)
    for header in ("vault.lan:8620", "backup.example:8620", "proxy.example", "localhost:8620", socket.gethostname()):
        assert names.allows(header), header
    assert not names.allows("rebound.example:8620")
    assert not dashboard_names(WebSettings()).allows("vault.lan:8620")
    # a certificate that cannot be read adds nothing (the server names the problem when it starts)
    (tmp_path / "bad.crt").write_text("not a certificate")
    assert certificate_names(str(tmp_path / "bad.crt")) == []
    assert certificate_names(str(tmp_path / "missing.crt")) == []


def test_a_rebound_name_reaches_nothing(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    rebound = TestClient(site.app.build(), base_url=REBOUND)
    with caplog.at_level(logging.WARNING, logger="vmvault.web"):
        for path in ("/login", "/", "/api/v1/whoami", "/static/style.css", "/api/v1/openapi.json"):
            r = rebound.get(path, follow_redirects=False)
            assert r.status_code == 421, path
            assert "does not answer to the name" in r.text
            assert r.headers["x-frame-options"] == "DENY" and "no-store" in r.headers["cache-control"]
        # five wrong passwords through the rebound name would have locked the administrator out
        for _ in range(6):
            r = rebound.post("/login", data={"username": "ada", "password": "guess", "login_token": "x", "next": "/"})
            assert r.status_code == 421
        # and the right one gives no session
        r = rebound.post("/login", data={"username": "ada", "password": PASSWORDS["ada"], "login_token": "x"})
        assert r.status_code == 421 and "set-cookie" not in r.headers
    assert sum("rebound.example:8620" in r.getMessage() for r in caplog.records) == 1  # once per name
    assert "DNS rebinding" in caplog.text
    # nothing was counted against the administrator, and nothing recorded as theirs
    assert not [a for a in site.history.actions(action="login")]
    own = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    assert _login(own, "ada", PASSWORDS["ada"]).status_code == 303  # type: ignore[attr-defined]
    assert site.login("vera", TestClient(site.app.build(), base_url="http://localhost:8620"))


def test_a_bearer_token_through_a_rebound_name_is_refused(site: Site) -> None:
    _token, token = site.users.add_token("ada", "script")
    rebound = TestClient(site.app.build(), base_url=REBOUND)
    r = rebound.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 421
    listed = TestClient(site.app.build(), base_url="http://backup.example:8620")
    assert listed.get("/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}).status_code == 421


def test_names_listed_in_web_hosts_are_served(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", web='hosts = ["Backup.Example", "*.lan"]')
    try:
        assert site.config.web is not None and site.config.web.hosts == ("backup.example", "*.lan")
        for base in ("http://backup.example:8620", "http://vault.lan"):
            c = TestClient(site.app.build(), base_url=base)
            assert c.get("/login").status_code == 200, base
            site.login("vera", c)
            assert c.get("/api/v1/whoami").json()["user"] == "vera"
    finally:
        close_site(site)
    with pytest.raises(ConfigError, match=r"web\.hosts: 'backup example' is not a host name"):
        make_site(tmp_path / "bad", web='hosts = ["backup example"]')


def test_a_real_server_refuses_a_rebound_name(site: Site) -> None:
    """Over a socket, as a browser's request arrives: the Host header is all that differs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Background(make_server(site.app.build(), site.app.settings, "127.0.0.1", port))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /login HTTP/1.1\r\nHost: rebound.example:%d\r\nConnection: close\r\n\r\n" % port)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 421 ")
        with socket.create_connection(("127.0.0.1", port)) as conn:  # two Host headers: refused too
            conn.sendall(
                b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: rebound.example\r\nConnection: close\r\n\r\n"
            )
            answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:40]
        with urllib.request.urlopen(f"http://localhost:{port}/login", timeout=10) as r:
            assert r.status == 200
    finally:
        server.stop()

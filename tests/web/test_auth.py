"""Logging in and staying logged in: the login form's own CSRF token, the rate limit and
lockout, sessions that end (idle, maximum, logout, user removed or role changed), and no
open redirect after login."""

from __future__ import annotations

import re

from starlette.testclient import TestClient

from tests.web.conftest import PASSWORDS, Site
from vmvault.web.app import SESSION_COOKIE
from vmvault.web.auth import LoginLimiter, SessionStore


def _form(client: TestClient, next_: str = "/") -> str:
    page = client.get(f"/login?next={next_}")
    m = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert m is not None
    return m.group(1)


def _login(client: TestClient, user: str, password: str, *, token: str | None = None, next_: str = "/") -> object:
    token = token if token is not None else _form(client, next_)
    return client.post(
        "/login",
        data={"username": user, "password": password, "login_token": token, "next": next_},
        follow_redirects=False,
    )


def test_login_needs_the_forms_token(site: Site) -> None:
    c = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    r = _login(c, "ada", PASSWORDS["ada"], token="forged")
    assert r.status_code == 403  # type: ignore[attr-defined]
    fresh = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    r = fresh.post("/login", data={"username": "ada", "password": PASSWORDS["ada"], "login_token": "x"})
    assert r.status_code == 403 and "expired" in r.text  # no login cookie at all
    r = _login(c, "ada", PASSWORDS["ada"])
    assert r.status_code == 303  # type: ignore[attr-defined]


def test_wrong_passwords_lock_the_name_and_the_address(site: Site) -> None:
    c = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    for _ in range(4):
        r = _login(c, "otto", "wrong-password")
        assert r.status_code == 401 and "wrong user name or password" in r.text  # type: ignore[attr-defined]
    r = _login(c, "otto", "wrong-password")
    assert r.status_code == 401  # type: ignore[attr-defined]  # the fifth failure starts the lockout
    # now even the right password is refused, without being checked
    r = _login(c, "otto", PASSWORDS["otto"])
    assert r.status_code == 429 and "too many failed logins" in r.text  # type: ignore[attr-defined]
    # the address is locked too: another name from it is refused
    r = _login(c, "vera", PASSWORDS["vera"])
    assert r.status_code == 429  # type: ignore[attr-defined]
    results = [a.result for a in site.history.actions(action="login")]
    assert results.count("failed") == 5 and results.count("locked") == 2
    # an unknown name is answered like a wrong password (no hint which names exist)
    site.app.limiter = LoginLimiter(5, 900)
    r = _login(c, "nobody", "wrong-password")
    assert r.status_code == 401 and "wrong user name or password" in r.text  # type: ignore[attr-defined]


def test_the_lockout_ends(site: Site) -> None:
    now = [1000.0]
    site.app.limiter = LoginLimiter(3, 60, clock=lambda: now[0])
    c = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    for _ in range(3):
        _login(c, "vera", "wrong-password")
    assert _login(c, "vera", PASSWORDS["vera"]).status_code == 429  # type: ignore[attr-defined]
    now[0] += 61
    assert _login(c, "vera", PASSWORDS["vera"]).status_code == 303  # type: ignore[attr-defined]


def test_lockouts_of_many_addresses_are_forgotten_when_they_end() -> None:
    """A flood from ever new addresses (an IPv6 /64 has plenty) keeps no record of lockouts
    that ended: the limiter's memory stays bounded."""
    now = [0.0]
    limiter = LoginLimiter(1, 60, clock=lambda: now[0])
    for i in range(10001):
        limiter.failed(f"addr:2001:db8::{i:x}")
    assert len(limiter._locked_until) == 10001
    now[0] += 61
    limiter.failed("addr:2001:db8::1:0")
    assert len(limiter._locked_until) == 1
    assert limiter.retry_after("addr:2001:db8::1:0") == 60


def test_sessions_end(site: Site) -> None:
    now = [0.0]
    site.app.sessions = SessionStore(idle=600, maximum=3600, clock=lambda: now[0])
    c = site.login("vera")
    assert c.get("/api/v1/whoami").status_code == 200
    now[0] += 599
    assert c.get("/api/v1/whoami").status_code == 200  # used within the idle time
    now[0] += 601
    assert c.get("/api/v1/whoami").status_code == 401  # idle too long
    c = site.login("vera")
    for _ in range(7):
        now[0] += 500
        assert c.get("/api/v1/whoami").status_code == 200  # 3500 s, each request within the idle time
    now[0] += 500
    assert c.get("/api/v1/whoami").status_code == 401  # past the maximum, however busy


def test_role_change_and_removal_end_sessions(site: Site) -> None:
    c = site.login("otto")
    assert c.get("/api/v1/whoami").json()["role"] == "operator"
    site.users.set_role("otto", "viewer")  # e.g. by `vmvault user role` in another process
    assert c.get("/api/v1/whoami").status_code == 401
    c = site.login("otto")
    assert c.get("/api/v1/whoami").json()["role"] == "viewer"
    site.users.remove("otto")
    assert c.get("/api/v1/whoami").status_code == 401


def test_logout_ends_the_session_and_clears_the_cookie(site: Site) -> None:
    c = site.login("vera")
    old = c.cookies.get(SESSION_COOKIE)
    r = c.post("/logout", data={"csrf_token": site.csrf(c)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?notice=logged-out"
    assert c.cookies.get(SESSION_COOKIE) is None
    # the old cookie is worthless now
    stale = TestClient(site.app.build(), base_url="http://127.0.0.1:8620", cookies={SESSION_COOKIE: str(old)})
    assert stale.get("/api/v1/whoami").status_code == 401
    assert [a.action for a in site.history.actions(user="vera")][:2] == ["logout", "login"]


def test_no_open_redirect_after_login(site: Site) -> None:
    for target, expected in (
        ("/history", "/history"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
    ):
        c = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
        r = _login(c, "vera", PASSWORDS["vera"], next_=target)
        assert r.headers["location"] == expected, target  # type: ignore[attr-defined]


def test_a_large_body_is_refused(site: Site) -> None:
    c = site.login("otto")
    r = c.post("/jobs/verify-local/run", content=b"x" * (65 * 1024), headers={"X-CSRF-Token": site.csrf(c)})
    assert r.status_code == 413

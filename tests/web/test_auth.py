"""Logging in and staying logged in: the login form's own CSRF token, the rate limit and
lockout, sessions that end (idle, maximum, logout, user removed or role changed), and no
open redirect after login."""

from __future__ import annotations

import re
from collections.abc import Iterator

from starlette.testclient import TestClient

from tests.web.conftest import PASSWORDS, Site
from vmvault.web.app import DEVICE_COOKIE, SESSION_COOKIE
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


def test_a_strangers_wrong_passwords_do_not_lock_out_a_browser_that_logged_in_before(site: Site) -> None:
    """Anyone who reaches the login form could lock a user out by failing five times for the
    name. A browser that logged in as the user before carries a device cookie and is counted
    on its own: the stranger locks only browsers without one (and their own address); the
    user's browser locks itself only with its own failures."""
    ada = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    assert _login(ada, "ada", PASSWORDS["ada"]).status_code == 303  # type: ignore[attr-defined]
    assert ada.cookies.get(DEVICE_COOKIE, "").startswith("ada:")
    stranger = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    for _ in range(5):
        assert _login(stranger, "ada", "wrong-password").status_code == 401  # type: ignore[attr-defined]
    assert _login(stranger, "ada", PASSWORDS["ada"]).status_code == 429  # type: ignore[attr-defined]
    # a browser never used by ada is refused for her name, and from the stranger's address
    # (the test client's, shared by all of them here)
    fresh = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    assert _login(fresh, "ada", PASSWORDS["ada"]).status_code == 429  # type: ignore[attr-defined]
    assert _login(fresh, "vera", PASSWORDS["vera"]).status_code == 429  # type: ignore[attr-defined]
    # ada's own browser logs in (again, as after a restart), even from the locked address
    ada.cookies.delete(SESSION_COOKIE)
    assert _login(ada, "ada", PASSWORDS["ada"]).status_code == 303  # type: ignore[attr-defined]
    assert ada.get("/api/v1/whoami").json()["user"] == "ada"
    # its cookie is worth nothing for another name: vera shares the address's count
    ada.cookies.delete(SESSION_COOKIE)
    assert _login(ada, "vera", PASSWORDS["vera"]).status_code == 429  # type: ignore[attr-defined]
    # the stranger copying the cookie's shape but not its MAC gains nothing
    name, nonce, issued, _ = ada.cookies.get(DEVICE_COOKIE, "").split(":")
    stranger.cookies.set(DEVICE_COOKIE, f"{name}:{nonce}:{issued}:{'0' * 64}")
    assert _login(stranger, "ada", PASSWORDS["ada"]).status_code == 429  # type: ignore[attr-defined]
    # the browser's own failures lock it, and only it
    for _ in range(5):
        assert _login(ada, "ada", "wrong-password").status_code == 401  # type: ignore[attr-defined]
    assert _login(ada, "ada", PASSWORDS["ada"]).status_code == 429  # type: ignore[attr-defined]
    results = [a.result for a in site.history.actions(action="login")]
    assert results.count("failed") == 10 and results.count("done") == 2


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


def test_a_large_chunked_body_is_refused_as_it_arrives(site: Site) -> None:
    """A chunked body carries no Content-Length: it is counted as it arrives (64 KiB), on the
    login form, on a page's form and on the API, and is never read whole."""

    def chunks() -> Iterator[bytes]:
        for _ in range(4096):  # 64 MiB if it were all read
            yield b"x" * (16 << 10)

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    c = TestClient(site.app.build(), base_url="http://127.0.0.1:8620")
    assert c.post("/login", content=chunks(), headers=form).status_code == 413
    c = site.login("otto")
    assert c.post("/jobs/verify-local/run", content=chunks(), headers=form).status_code == 413  # the CSRF field
    token = site.users.add_token("otto", "chunked")[1]
    r = c.post("/api/v1/snapshots/main/latest/verify", content=chunks(), headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 413 and r.json()["error"] == "the request is too large"


def test_an_unreadable_form_of_a_logged_in_user_is_a_400(site: Site) -> None:
    c = site.login("otto")
    files = {"upload": ("a.txt", b"a file", "text/plain")}  # forms take no files
    r = c.post("/jobs/verify-local/run", files=files, data={"csrf_token": site.csrf(c)})
    assert r.status_code == 400 and "unreadable form" in r.text

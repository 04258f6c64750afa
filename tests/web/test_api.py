"""The HTTP API: every endpoint for every role (bearer tokens and sessions), 401 without
credentials, 403 below the role, CSRF on every state-changing request made with a session,
and the same field names as the CLI's --json."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.web.conftest import ROLES, Site
from vmvault.web.app import DEVICE_COOKIE, SESSION_COOKIE
from vmvault.web.openapi import spec

RANK = {"viewer": 0, "operator": 1, "admin": 2}


def _snap(site: Site) -> str:
    snaps = site.client.get("/api/v1/snapshots", headers=_auth(site, "ada")).json()["snapshots"]
    return str(snaps[0]["id"])


_TOKENS: dict[tuple[str, str], str] = {}


def _auth(site: Site, user: str) -> dict[str, str]:
    # by the users file, not by id(site): a later test's site may get a freed one's id, and
    # with it a token its own users file never had (401)
    key = (str(site.users.path), user)
    if key not in _TOKENS:
        _TOKENS[key] = site.users.add_token(user, "tests")[1]
    return {"Authorization": f"Bearer {_TOKENS[key]}"}


def _gets(site: Site) -> list[tuple[str, str]]:
    snap = _snap(site)
    return [
        ("/api/v1/whoami", "viewer"),
        ("/api/v1/vms", "viewer"),
        ("/api/v1/jobs", "viewer"),
        ("/api/v1/progress", "viewer"),
        ("/api/v1/history", "viewer"),
        ("/api/v1/tasks", "viewer"),
        ("/api/v1/repositories", "viewer"),
        ("/api/v1/snapshots", "viewer"),
        (f"/api/v1/snapshots/local/{snap}", "viewer"),
        ("/api/v1/hosts", "viewer"),
        ("/api/v1/audit", "viewer"),
        ("/api/v1/actions", "admin"),
        ("/api/v1/users", "admin"),
    ]


def _posts(site: Site) -> list[tuple[str, str, dict[str, Any], int]]:
    snap = _snap(site)
    return [
        ("/api/v1/jobs/verify-local/run", "operator", {}, 202),
        ("/api/v1/jobs/web01-nightly/cancel", "operator", {}, 202),  # (not running: said in its answer)
        ("/api/v1/repositories/local/refresh", "operator", {}, 200),
        (f"/api/v1/snapshots/local/{snap}/verify", "operator", {}, 202),
        (f"/api/v1/snapshots/local/{snap}/restore", "operator", {"target": "scratch", "dry_run": True}, 200),
        (
            f"/api/v1/snapshots/local/{snap}/clone",
            "operator",
            {"target": "scratch", "clone": "web01-copy", "dry_run": True},
            200,
        ),
        (f"/api/v1/snapshots/local/{snap}/forget", "admin", {"dry_run": True}, 200),
        ("/api/v1/repositories/local/prune", "admin", {}, 202),
    ]


def _settle(site: Site) -> None:
    site.control.wait(120)
    site.app.actions.wait(120)


def test_every_get_endpoint_for_every_role(backed_up: Site) -> None:
    site = backed_up
    for path, needed in _gets(site):
        r = site.client.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["status"] == 401
        for user, role in ROLES.items():
            r = site.client.get(path, headers=_auth(site, user))
            if RANK[role] >= RANK[needed]:
                assert r.status_code == 200, (path, user, r.text)
                assert r.headers["content-type"].startswith("application/json")
            else:
                assert r.status_code == 403, (path, user)
                assert "needs the admin role" in r.json()["error"]


def test_every_post_endpoint_for_every_role(backed_up: Site) -> None:
    site = backed_up
    for path, needed, body, ok in _posts(site):
        assert site.client.post(path, json=body).status_code == 401, path
        for user, role in ROLES.items():
            r = site.client.post(path, json=body, headers=_auth(site, user))
            if RANK[role] >= RANK[needed]:
                assert r.status_code == ok, (path, user, r.text)
                _settle(site)
            else:
                assert r.status_code == 403, (path, user, r.text)
    # every refusal is in the activity log, with who and what
    denied = [a for a in site.history.actions(action="denied")]
    assert {a.user for a in denied} >= {"vera", "otto"}
    assert any("/prune" in a.target and a.user == "otto" for a in denied)


def test_bad_and_foreign_tokens_are_401(backed_up: Site) -> None:
    site = backed_up
    for header in ("Bearer nonsense", "Bearer vvt_00000000_" + "A" * 43, "Basic YWRhOnB3", "Bearer"):
        r = site.client.get("/api/v1/vms", headers={"Authorization": header})
        assert r.status_code == 401, header
    # a revoked token stops working at once
    record, token = site.users.add_token("vera", "short-lived")
    assert site.client.get("/api/v1/vms", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    site.users.revoke_token("vera", record.id)
    assert site.client.get("/api/v1/vms", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    # a token is for the API only: pages ignore it and ask for a login
    _rec, token = site.users.add_token("ada", "pages")
    r = site.client.get("/", headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_pages_redirect_to_login_and_posts_without_login_are_refused(backed_up: Site) -> None:
    site = backed_up
    for path in ("/", "/jobs", "/history", "/repositories", "/snapshots", "/audit", "/fleet", "/activity", "/users"):
        r = site.client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/login?next={path}", path
    r = site.client.post("/jobs/web01-nightly/run", data={}, follow_redirects=False)
    assert r.status_code == 401


def test_csrf_is_required_with_a_session(backed_up: Site) -> None:
    site = backed_up
    client = site.login("otto")
    csrf = site.csrf(client)
    before = len(site.history.runs(job="verify-local"))
    # API with the session cookie: no header, a wrong one, another session's one
    other = site.login("ada")
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": site.csrf(other)}):
        r = client.post("/api/v1/jobs/verify-local/run", headers=headers)
        assert r.status_code == 403 and "CSRF" in r.json()["error"], headers
    # pages: a form without the token, or with a wrong one
    for data in ({}, {"csrf_token": "x"}):
        r = client.post("/jobs/verify-local/run", data=data, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.text
    # a right token from another origin (a page elsewhere posting into the dashboard)
    r = client.post(
        "/api/v1/jobs/verify-local/run",
        headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
    )
    assert r.status_code == 403
    r = client.post(
        "/jobs/verify-local/run", data={"csrf_token": csrf}, headers={"Sec-Fetch-Site": "cross-site"},
        follow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 403
    _settle(site)
    assert len(site.history.runs(job="verify-local")) == before  # nothing ran
    assert len(site.history.actions(action="csrf")) >= 6
    # with the token it works, from the page and from the API
    r = client.post("/jobs/verify-local/run", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and "notice=queued" in r.headers["location"]
    _settle(site)
    r = client.post("/api/v1/jobs/verify-local/run", headers={"X-CSRF-Token": csrf, "Origin": "http://127.0.0.1:8620"})
    assert r.status_code == 202
    _settle(site)
    assert len(site.history.runs(job="verify-local")) == before + 2
    # a bearer token needs no CSRF token (no browser sends one by itself)
    assert site.client.post("/api/v1/jobs/verify-local/run", headers=_auth(site, "otto")).status_code == 202
    _settle(site)
    # logging out needs the token too
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert client.get("/api/v1/whoami").json()["user"] == "otto"


def test_running_a_job_twice_is_a_conflict_and_unknown_jobs_404(backed_up: Site) -> None:
    site = backed_up
    assert site.client.post("/api/v1/jobs/nosuch/run", headers=_auth(site, "otto")).status_code == 404
    import threading

    gate = threading.Event()
    real = site.control._run

    def slow(job: Any) -> None:
        gate.wait(30)
        real(job)

    site.control._run = slow  # type: ignore[method-assign]
    try:
        assert site.client.post("/api/v1/jobs/web01-nightly/run", headers=_auth(site, "otto")).status_code == 202
        r = site.client.post("/api/v1/jobs/web01-nightly/run", headers=_auth(site, "ada"))
        assert r.status_code == 409 and "running already" in r.json()["error"]
    finally:
        gate.set()
        site.control.wait(60)
        site.control._run = real  # type: ignore[method-assign]
    refused = [a for a in site.history.actions(action="run") if a.result == "refused"]
    assert refused and refused[0].user == "ada"


def test_field_names_are_the_clis(backed_up: Site, capsys: pytest.CaptureFixture[str]) -> None:
    from vmvault.cli import main

    site = backed_up
    auth = _auth(site, "vera")
    config = site.config.path
    assert main(["jobs", "--config", config, "--json"]) == 0
    cli_jobs = json.loads(capsys.readouterr().out)
    api_jobs = site.client.get("/api/v1/jobs", headers=auth).json()
    assert api_jobs["config"] == cli_jobs["config"]
    for cli_job, api_job in zip(cli_jobs["jobs"], api_jobs["jobs"], strict=True):
        assert set(cli_job) <= set(api_job)
        assert {k: api_job[k] for k in cli_job if k != "next_run"} == {
            k: v for k, v in cli_job.items() if k != "next_run"
        }
    assert main(["history", "--config", config, "--json"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["runs"] == site.client.get("/api/v1/history", headers=auth).json()["runs"]
    )
    env_repo = str(site.root / "repo")
    assert main(["snapshots", "-r", env_repo, "--password-file", str(site.root / "repo.pass"), "--json"]) == 0
    cli_snaps = json.loads(capsys.readouterr().out)
    site.app.dashboard.repo("local").snapshots(fresh=True)  # listings are cached for a few seconds
    api_snaps = site.client.get("/api/v1/snapshots", headers=auth).json()["snapshots"]
    assert [{k: v for k, v in s.items() if k != "repository"} for s in api_snaps] == sorted(
        cli_snaps, key=lambda s: (s["time"], s["id"]), reverse=True
    )
    snap = api_snaps[0]["id"]
    assert main(["show", snap, "-r", env_repo, "--password-file", str(site.root / "repo.pass"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    detail = site.client.get(f"/api/v1/snapshots/local/{snap[:10]}", headers=auth).json()
    assert {k: v for k, v in detail.items() if k != "repository"} == shown


def test_vms_report_state_last_good_backup_and_reasons(backed_up: Site) -> None:
    vms = {v["name"]: v for v in backed_up.client.get("/api/v1/vms", headers=_auth(backed_up, "vera")).json()["vms"]}
    assert vms["web01"]["state"] == "green"
    assert vms["web01"]["last_good_backup"]["consistency"] == "offline"
    assert vms["web01"]["verification"]["status"] == "success"
    assert vms["db01"]["state"] == "red"
    texts = [r["text"] for r in vms["db01"]["reasons"] if r["level"] == "red"]
    assert "no successful backup on record" in texts
    assert any("db01-hourly) failed" in t and "no such file or folder" in t for t in texts)


def test_history_filters(backed_up: Site) -> None:
    site = backed_up
    auth = _auth(site, "vera")

    def runs(**q: str) -> list[dict[str, Any]]:
        r = site.client.get("/api/v1/history", params=q, headers=auth)
        assert r.status_code == 200, r.text
        return list(r.json()["runs"])

    assert {r["job"] for r in runs(type="verify")} == {"verify-local"}
    assert {r["status"] for r in runs(status="failed")} == {"failed"}
    assert [r["job"] for r in runs(status="failed", type="backup")] == ["db01-hourly"]
    assert runs(q="no such file")[0]["job"] == "db01-hourly"
    assert len(runs(limit="1")) == 1 and runs(limit="1", page="1")[0] != runs(limit="1")[0]
    assert runs(since="24h") and runs(job="web01-nightly")[0]["job"] == "web01-nightly"
    for bad in ({"since": "yesterday"}, {"limit": "0"}, {"limit": "x"}, {"page": "-1"}):
        assert site.client.get("/api/v1/history", params=bad, headers=auth).status_code == 400, bad


def test_tasks_grid(backed_up: Site) -> None:
    grid = backed_up.client.get("/api/v1/tasks?hours=24", headers=_auth(backed_up, "vera")).json()["tasks"]
    assert grid["backup"]["ok"] >= 1 and grid["backup"]["failed"] >= 1 and grid["verify"]["ok"] >= 1
    assert set(grid) == {"backup", "verify", "copy", "prune"}
    assert backed_up.client.get("/api/v1/tasks?hours=0", headers=_auth(backed_up, "vera")).status_code == 400


def test_events_stream_progress(backed_up: Site) -> None:
    site = backed_up
    site.app.events_seconds = 1.0  # a stream ends by itself (the browser reconnects)
    with site.client.stream("GET", "/api/v1/events", headers=_auth(site, "vera")) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        seen = []
        for line in lines:
            seen.append(line)
            if line.startswith("data: "):
                states = json.loads(line[6:])
                assert isinstance(states, list)
                break
    assert "event: progress" in seen


def test_openapi_lists_exactly_the_api_routes(backed_up: Site) -> None:
    from starlette.routing import Route

    app = backed_up.app.build()
    routes: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/v1/"):
            for method in route.methods or ():
                if method != "HEAD":
                    routes.add((route.path, method.lower()))
    documented = {(path, method) for path, item in spec("x")["paths"].items() for method in item}
    assert routes == documented
    served = backed_up.client.get("/api/v1/openapi.json").json()
    assert served["openapi"].startswith("3.1") and set(served["paths"]) == {p for p, _ in documented}
    for path, item in served["paths"].items():
        for op in item.values():
            assert op["x-role"] in ("viewer", "operator", "admin", "public"), path


def test_responses_carry_security_headers(backed_up: Site) -> None:
    client = backed_up.login("vera")
    for path in ("/", "/api/v1/vms", "/login"):
        r = client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"


def test_session_cookie_attributes(backed_up: Site) -> None:
    c = TestClient(backed_up.app.build(), base_url="http://127.0.0.1:8620")
    page = c.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    r = c.post(
        "/login",
        data={"username": "vera", "password": "viewer-pass-1", "login_token": token.group(1)},
        follow_redirects=False,
    )
    for name in (SESSION_COOKIE, DEVICE_COOKIE):
        cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(name))
        attrs = {a.strip().lower() for a in cookie.split(";")}
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
        assert "secure" not in attrs  # no TLS on loopback: a Secure cookie would never come back


def test_audit_reports_checkpoints_and_backup_ages(site: Site, tmp_path: Path) -> None:
    from vmvault.testing.hyperv_lab import LabHost

    lab = LabHost(str(tmp_path / "hyperv"))
    lab.create_vm("sql01", (4 << 20,))
    lab.checkpoint("sql01", "before-upgrade")
    settings = dataclasses.replace(site.app.settings, audit=(str(tmp_path / "hyperv"),))
    site.app.settings = site.app.dashboard.settings = settings
    (target,) = site.client.get("/api/v1/audit", headers=_auth(site, "vera")).json()["targets"]
    assert target["error"] is None
    (vm,) = target["vms"]
    assert vm["name"] == "sql01" and vm["checkpoints"]["count"] == 1
    assert vm["last_backup_age_seconds"] is None
    assert "no snapshot of this VM in the repository" in vm["problems"]
    page = site.login("vera").get("/audit")
    assert page.status_code == 200 and "sql01" in page.text and "no snapshot of this VM" in page.text


def test_an_action_body_that_is_not_a_json_object_is_refused(backed_up: Site) -> None:
    """400 for text that is not JSON, JSON nested deeper than the parser goes (a
    RecursionError, which was a 500) and JSON that is not an object; nothing is done."""
    snap = _snap(backed_up)
    url = f"/api/v1/snapshots/local/{snap}/restore"
    for body, says in ((b"{", "must be JSON"), (b"[" * 60000, "must be JSON"), (b"[1]", "must be a JSON object")):
        r = backed_up.client.post(url, content=body, headers=_auth(backed_up, "otto"))
        assert r.status_code == 400 and says in r.text, (body[:10], r.status_code, r.text[:200])

"""Restore, clone, verify, forget and prune from the dashboard: planned, confirmed, run in
a thread, recorded (who, what, when, result); only into configured targets; never over
existing files; damage found and named."""

from __future__ import annotations

from pathlib import Path

from tests.web.conftest import Site
from vmvault.automation.history import Action


def _token(site: Site, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {site.users.add_token(user, 'test')[1]}"}


def _snapshot(site: Site) -> str:
    site.app.dashboard.repo("local").snapshots(fresh=True)
    return str(site.app.dashboard.snapshots()[0]["id"])


def _done(site: Site) -> list[Action]:
    site.app.actions.wait(120)
    return site.history.actions()


def test_restore_and_clone_into_a_configured_target(site: Site) -> None:
    assert site.run("web01-nightly") == "success"
    snap = _snapshot(site)
    auth = _token(site, "otto")
    r = site.client.post(f"/api/v1/snapshots/local/{snap}/restore", json={"target": "scratch"}, headers=auth)
    assert r.status_code == 202, r.text
    plan = r.json()["plan"]
    folder = Path(plan["target"])
    assert folder.parent == site.root / "restore" and folder.name.startswith(f"web01-{snap[:8]}-")
    actions = _done(site)
    assert [(a.action, a.user, a.result) for a in actions[:2]] == [
        ("restore", "otto", "done"),
        ("restore", "otto", "started"),
    ]
    original = site.root / "vms" / "web01"
    for f in original.iterdir():
        assert (folder / f.name).read_bytes() == f.read_bytes()
    # the same restore again: its folder exists, so it is refused before anything is written
    r = site.client.post(f"/api/v1/snapshots/local/{snap}/restore", json={"target": "scratch"}, headers=auth)
    assert r.status_code == 400 and "exists already" in r.json()["error"]
    # as a clone
    r = site.client.post(
        f"/api/v1/snapshots/local/{snap}/clone", json={"target": "scratch", "clone": "web01-test"}, headers=auth
    )
    assert r.status_code == 202, r.text
    _done(site)
    clone = site.root / "restore" / "web01-test"
    assert sorted(p.name for p in clone.iterdir()) == ["web01-test-disk0.raw", "web01-test.conf"]
    state = site.control.board.state(f"clone {snap[:8]}")
    assert state is not None and state.status == "success" and state.percent == 100.0


def test_restores_go_only_where_configured(site: Site) -> None:
    assert site.run("web01-nightly") == "success"
    snap = _snapshot(site)
    auth = _token(site, "otto")
    for body, message in (
        ({"target": "/etc"}, "no restore target"),
        ({"target": "../scratch"}, "no restore target"),
        ({}, "no restore target"),
        ({"target": "scratch", "clone": "../evil"}, "not allowed"),
        ({"target": "scratch", "clone": "web01"}, "other than the original"),
    ):
        action = "clone" if "clone" in body else "restore"
        r = site.client.post(f"/api/v1/snapshots/local/{snap}/{action}", json=body, headers=auth)
        assert r.status_code == 400 and message in r.json()["error"], body
    assert not (site.root / "restore").exists()
    r = site.client.post("/api/v1/snapshots/local/ffff/restore", json={"target": "scratch"}, headers=auth)
    assert r.status_code == 404
    r = site.client.post(f"/api/v1/snapshots/nosuch/{snap}/verify", headers=auth)
    assert r.status_code == 404
    r = site.client.post(f"/api/v1/snapshots/local/{snap}/explode", headers=auth)
    assert r.status_code == 404
    r = site.client.post(f"/api/v1/snapshots/local/{snap}/restore", content=b"[1]", headers=auth)
    assert r.status_code == 400


def test_verify_finds_damage_and_names_it(site: Site) -> None:
    assert site.run("web01-nightly") == "success"
    snap = _snapshot(site)
    auth = _token(site, "otto")
    assert site.client.post(f"/api/v1/snapshots/local/{snap}/verify", headers=auth).status_code == 202
    ok = _done(site)[0]
    assert ok.result == "done" and ok.details["outcome"]["chunks_verified"] >= 1
    # damage a pack: the next verification fails, saying where
    (pack,) = [p for p in (site.root / "repo" / "data").rglob("*") if p.is_file()]
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 0xFF
    pack.write_bytes(bytes(raw))
    assert site.client.post(f"/api/v1/snapshots/local/{snap}/verify", headers=auth).status_code == 202
    failed = _done(site)[0]
    assert failed.result == "failed" and f"snapshot {snap[:8]}" in failed.details["error"]
    # and the VM goes red: its repository's last verification found damage
    vms = {v["name"]: v for v in site.client.get("/api/v1/vms", headers=auth).json()["vms"]}
    assert vms["web01"]["state"] == "red"
    assert any("found damage" in r["text"] for r in vms["web01"]["reasons"])


def test_forget_and_prune_are_for_admins(site: Site) -> None:
    assert site.run("web01-nightly") == "success"
    snap = _snapshot(site)
    otto, ada = _token(site, "otto"), _token(site, "ada")
    assert site.client.post(f"/api/v1/snapshots/local/{snap}/forget", headers=otto).status_code == 403
    assert site.client.post("/api/v1/repositories/local/prune", headers=otto).status_code == 403
    r = site.client.post(f"/api/v1/snapshots/local/{snap}/forget", json={"dry_run": True}, headers=ada)
    assert r.status_code == 200 and "Forget snapshot" in r.json()["plan"]["summary"]
    assert len(list((site.root / "repo" / "snapshots").iterdir())) == 1
    assert site.client.post(f"/api/v1/snapshots/local/{snap}/forget", headers=ada).status_code == 202
    assert _done(site)[0].result == "done"
    assert list((site.root / "repo" / "snapshots").iterdir()) == []
    assert site.client.post("/api/v1/repositories/local/prune", headers=ada).status_code == 202
    done = _done(site)[0]
    assert done.action == "prune" and done.result == "done", done.details
    assert not [p for p in (site.root / "repo" / "data").rglob("*") if p.is_file()]
    grid = site.client.get("/api/v1/tasks?hours=1", headers=ada).json()["tasks"]
    assert grid["prune"]["ok"] == 1


def test_the_confirmation_page_names_what_happens_and_changes_nothing(site: Site) -> None:
    assert site.run("web01-nightly") == "success"
    snap = _snapshot(site)
    c = site.login("otto")
    page = c.get(f"/snapshots/local/{snap}/restore?target=scratch")
    assert page.status_code == 200
    assert f"Restore snapshot {snap[:8]} of web01" in page.text
    assert str(site.root / "restore" / f"web01-{snap[:8]}") in page.text
    assert not (site.root / "restore").exists()
    page = c.get(f"/snapshots/local/{snap}/clone?target=scratch&clone=web02")
    assert "as a NEW VM named web02" in page.text
    page = c.get(f"/snapshots/local/{snap}/forget")
    assert page.status_code == 403  # an operator may not even see the admin's confirmation
    # the confirmation posts with the CSRF token; without it nothing starts
    r = c.post(f"/snapshots/local/{snap}/restore", data={"target": "scratch"}, follow_redirects=False)
    assert r.status_code == 403
    r = c.post(
        f"/snapshots/local/{snap}/restore",
        data={"target": "scratch", "csrf_token": site.csrf(c)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    _done(site)
    assert (site.root / "restore").exists()

"""The users file: Argon2id hashes, tokens stored as digests, a private file replaced
atomically, never through a link, and clear errors for every mistake."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from vmvault.errors import ConfigError
from vmvault.web.users import DEVICE_MAX_AGE, UserStore, role_allows


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def test_add_verify_and_the_file_holds_no_secret(tmp_path: Path) -> None:
    os.umask(0o022)
    store = UserStore(str(tmp_path / "users.json"))
    store.add("ada", "admin", "correct horse battery")
    assert store.verify_password("ada", "correct horse battery") is not None
    assert store.verify_password("ada", "correct horse batterY") is None
    assert store.verify_password("nobody", "correct horse battery") is None
    assert store.verify_password("../etc", "whatever-long") is None
    raw = (tmp_path / "users.json").read_text()
    assert "correct horse" not in raw
    doc = json.loads(raw)["users"]["ada"]
    assert doc["password"]["kdf"] == "argon2id" and len(doc["password"]["salt"]) == 24
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users.json"]  # no temporary file left


def test_tokens_are_shown_once_and_stored_as_digests(tmp_path: Path) -> None:
    store = UserStore(str(tmp_path / "users.json"))
    store.add("bot", "viewer", "robot-password")
    record, token = store.add_token("bot", "nagios")
    assert token.startswith(f"vvt_{record.id}_") and len(token) == 4 + 8 + 1 + 43
    assert token not in (tmp_path / "users.json").read_text()
    user = store.verify_token(token)
    assert user is not None and user.name == "bot"
    assert store.verify_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify_token("vvt_" + record.id + "_" + "x" * 43) is None
    assert store.verify_token("") is None
    public = store.get("bot")
    assert public is not None and "sha256" not in json.dumps(public.public())
    store.revoke_token("bot", record.id)
    assert store.verify_token(token) is None
    with pytest.raises(ConfigError, match="no token"):
        store.revoke_token("bot", record.id)


def test_another_process_changes_are_seen(tmp_path: Path) -> None:
    a = UserStore(str(tmp_path / "users.json"))
    b = UserStore(str(tmp_path / "users.json"))
    a.add("ada", "admin", "password-one")
    assert b.get("ada") is not None
    a.set_role("ada", "admin")
    a.add("otto", "operator", "password-two")
    b.remove("otto")
    assert a.get("otto") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.add("ada", "admin", "another-one"), "exists"),
        (lambda s: s.add("bad name", "viewer", "long-enough"), "not allowed"),
        (lambda s: s.add("-dash", "viewer", "long-enough"), "not allowed"),
        (lambda s: s.add("x" * 65, "viewer", "long-enough"), "not allowed"),
        (lambda s: s.add("bob", "root", "long-enough"), "unknown role"),
        (lambda s: s.add("bob", "viewer", "short"), "8 to 1024"),
        (lambda s: s.add("bob", "viewer", " padded-password "), "blanks"),
        (lambda s: s.set_role("ada", "viewer"), "only admin"),
        (lambda s: s.remove("nobody"), "no user"),
        (lambda s: s.add_token("nobody"), "no user"),
    ],
)
def test_mistakes_are_clear_errors(tmp_path: Path, call: object, message: str) -> None:
    store = UserStore(str(tmp_path / "users.json"))
    store.add("ada", "admin", "admin-password")
    store.add("vera", "viewer", "viewer-password")
    with pytest.raises(ConfigError, match=message):
        call(store)  # type: ignore[operator]


def test_the_last_admin_stays(tmp_path: Path) -> None:
    store = UserStore(str(tmp_path / "users.json"))
    store.add("ada", "admin", "admin-password")
    store.add("otto", "operator", "operator-password")
    with pytest.raises(ConfigError, match="only admin"):
        store.remove("ada")
    store.set_role("otto", "admin")
    store.remove("ada")
    assert [u.name for u in store.users()] == ["otto"]


def test_a_link_or_damage_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "users.json").symlink_to(victim)
    store = UserStore(str(tmp_path / "users.json"))
    with pytest.raises(ConfigError, match="link"):
        store.users()
    with pytest.raises(ConfigError, match="link"):
        store.add("ada", "admin", "admin-password")
    assert victim.read_text() == "keep me"
    (tmp_path / "users.json").unlink()
    for damage in (b"{", b'{"version": 2, "users": {}}', b'{"version": 1, "users": {"ada": {"role": "god"}}}'):
        (tmp_path / "users.json").write_bytes(damage)
        with pytest.raises(ConfigError, match="damaged"):
            UserStore(str(tmp_path / "users.json")).users()


def test_a_device_cookie_holds_for_its_user_until_the_password_changes(tmp_path: Path) -> None:
    """A device cookie is good only for the name it was issued to, only as issued, only
    for ``DEVICE_MAX_AGE``, and only while the user keeps the password (and exists)."""
    store = UserStore(str(tmp_path / "users.json"))
    ada = store.add("ada", "admin", "admin-pass-1")
    otto = store.add("otto", "operator", "operator-pass-1")
    now = 1_800_000_000.0
    cookie = store.device_cookie(ada, now)
    device = store.device_of(cookie, "ada", now + 60)
    assert device is not None and device == cookie.split(":")[1]
    assert store.device_cookie(ada, now) != cookie  # each login a new id
    assert store.device_of(cookie, "otto", now) is None  # another name
    assert store.device_of(cookie, "ada", now + DEVICE_MAX_AGE + 1) is None  # too old
    assert store.device_of(cookie, "ada", now - 3600) is None  # from the future
    name, nonce, issued, mac = cookie.split(":")
    for forged in (
        f"{name}:{nonce}:{int(issued) + DEVICE_MAX_AGE}:{mac}",  # made to last longer
        f"{name}:{'A' * 16}:{issued}:{mac}",  # another id: a count of its own
        f"{name}:{nonce}:{issued}:{'0' * 64}",
        f"otto:{nonce}:{issued}:{mac}",
        store.device_cookie(otto, now).replace("otto", "ada", 1),
        "",
        None,
        cookie + ":",
    ):
        assert store.device_of(forged, "ada", now) is None, forged
    store.set_password("ada", "admin-pass-2")
    assert store.device_of(cookie, "ada", now) is None  # a new password voids it
    cookie = store.device_cookie(store.get("ada"), now)  # type: ignore[arg-type]
    store.remove("otto")
    assert store.device_of(cookie, "ada", now) is not None
    other = store.add("zoe", "admin", "admin-pass-3")
    store.remove("ada")
    assert store.device_of(cookie, "ada", now) is None  # nor is the user there
    assert store.device_of(store.device_cookie(other, now), "zoe", now) is not None


def test_roles() -> None:
    assert role_allows("admin", "operator") and role_allows("operator", "viewer")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "admin")
    assert not role_allows("root", "viewer")

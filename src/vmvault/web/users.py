"""Dashboard users: names, roles, password hashes and API tokens in one private file.

The file (``[web] users``, by default ``<config name>-users.json`` beside the configuration)
is JSON, mode 0600, replaced atomically on every change and never opened through a link::

    {"version": 1, "users": {"alice": {
        "role": "operator", "created": "2026-11-25T10:00:00+00:00",
        "password": {"kdf": "argon2id", "params": {"memory_kib": 65536, "iterations": 3, "lanes": 4},
                     "salt": "<base64, 16 bytes>", "hash": "<base64, 32 bytes>"},
        "tokens": [{"id": "3f9a0c1d", "label": "nagios", "created": "...", "sha256": "<hex>"}]}}}

* Passwords are hashed with Argon2id, the key derivation that protects repository keys
  (``repo/crypto.py``), with the same cost parameters. A login with an unknown name costs
  the same derivation, so timing does not tell which names exist.
* An API token is ``vvt_<8 hex id>_<43 characters>`` (256 random bits). Only its SHA-256
  is stored (it is random, so no stretching is needed); it is shown once, when made.
* A browser that logged in as a user carries a *device cookie* for that user (its name, a
  random id, when it was issued and a MAC keyed by a key derived from the user's password
  hash). The login rate limit counts such a browser's failures on their own, so a stranger's
  wrong passwords cannot lock the user out of a browser they used before. Changing the
  password or removing the user makes every device cookie of theirs worthless.
* Roles: ``viewer`` reads; ``operator`` also runs jobs, verifications and restores into the
  configured targets; ``admin`` also manages users and runs forget and prune.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from vmvault import platform
from vmvault.automation.locks import open_private
from vmvault.errors import ConfigError
from vmvault.repo.crypto import derive_passphrase_key
from vmvault.repo.keys import kdf_params

__all__ = ["ROLES", "Token", "User", "UserStore", "role_allows"]

#: from least to most rights
ROLES = ("viewer", "operator", "admin")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN = re.compile(r"vvt_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
#: a user has at most this many API tokens
MAX_TOKENS = 20
#: a device cookie is honoured for this long after it was issued (each login issues a new one)
DEVICE_MAX_AGE = 90 * 86400
_DEVICE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._@-]{0,63}):([A-Za-z0-9_-]{16}):([0-9]{1,12}):([0-9a-f]{64})")


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` has at least the rights of ``needed``."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hash_password(password: str, salt: bytes, params: dict[str, int]) -> bytes:
    return derive_passphrase_key(password.encode(), salt, params)


@dataclass(frozen=True)
class Token:
    id: str
    label: str
    created: str
    sha256: str

    def public(self) -> dict[str, str]:
        return {"id": self.id, "label": self.label, "created": self.created}


@dataclass(frozen=True)
class User:
    name: str
    role: str
    created: str
    password: dict[str, Any] = field(repr=False)
    tokens: tuple[Token, ...] = ()

    def public(self) -> dict[str, Any]:
        """What may be shown: never the hash or a token's digest."""
        return {
            "name": self.name,
            "role": self.role,
            "created": self.created,
            "tokens": [t.public() for t in self.tokens],
        }


def _device_mac(user: User, body: str) -> str:
    """The MAC of a device cookie's ``body``, keyed by the user's password hash (secret: the
    users file is private), so a new password or a removed user voids every cookie."""
    key = hmac.new(str(user.password.get("hash", "")).encode(), b"vmvault web device cookie 1", hashlib.sha256)
    return hmac.new(key.digest(), body.encode(), hashlib.sha256).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"user name {name!r} is not allowed: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a "
            "letter or digit"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ConfigError(f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if password != password.strip():
        raise ConfigError("a password may not start or end with blanks (a pasted line break?)")
    return password


class UserStore:
    """The users file. Thread-safe; re-read when another process (``vmvault user``) changed it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        self._users: dict[str, User] = {}
        self._stamp: tuple[int, int, int] | None = None
        # a login for an unknown name derives a hash all the same (no timing oracle)
        self._dummy = {"params": kdf_params(), "salt": os.urandom(16)}

    # ---- reading --------------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            self._users, self._stamp = {}, None
            return
        except OSError as exc:
            raise ConfigError(f"cannot read the users file {self.path}: {exc.strerror}") from exc
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        fd = open_private(self.path, os.O_RDONLY, "the users file")
        with os.fdopen(fd, "rb") as f:
            raw = f.read(4 << 20)
        self._users = self._parse(raw)
        self._stamp = stamp

    def _parse(self, raw: bytes) -> dict[str, User]:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("users"), dict):
                raise ValueError("not a vmvault users file (version 1)")
            users: dict[str, User] = {}
            for name, u in doc["users"].items():
                tokens = tuple(
                    Token(str(t["id"]), str(t.get("label", "")), str(t.get("created", "")), str(t["sha256"]))
                    for t in u.get("tokens", [])
                )
                pw = u["password"]
                if pw.get("kdf") != "argon2id":
                    raise ValueError(f"user {name}: unknown password hash {pw.get('kdf')!r}")
                users[name] = User(check_name(name), check_role(u["role"]), str(u.get("created", "")), pw, tokens)
            return users
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
            raise ConfigError(f"the users file {self.path} is damaged: {exc}") from exc

    def users(self) -> list[User]:
        with self._lock:
            self._refresh()
            return sorted(self._users.values(), key=lambda u: u.name)

    def get(self, name: str) -> User | None:
        with self._lock:
            self._refresh()
            return self._users.get(name)

    # ---- checking credentials ---------------------------------------------------------------

    def verify_password(self, name: str, password: str) -> User | None:
        """The user when ``password`` is theirs; None otherwise (same cost either way)."""
        user = self.get(name) if _NAME.fullmatch(name) else None
        if user is None or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            _hash_password(password[:MAX_PASSWORD] or "-", self._dummy["salt"], self._dummy["params"])  # type: ignore[arg-type]
            return None
        pw = user.password
        try:
            salt = base64.b64decode(pw["salt"], validate=True)
            expected = base64.b64decode(pw["hash"], validate=True)
            params = {k: int(pw["params"][k]) for k in ("memory_kib", "iterations", "lanes")}
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"the users file {self.path} holds a damaged hash for {name}") from exc
        got = _hash_password(password, salt, params)
        return user if hmac.compare_digest(got, expected) else None

    def verify_token(self, token: str) -> User | None:
        m = _TOKEN.fullmatch(token)
        if m is None:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for user in self.users():
            for t in user.tokens:
                if t.id == m.group(1) and hmac.compare_digest(t.sha256, digest):
                    found = user
        return found

    def device_cookie(self, user: User, now: float) -> str:
        """A new device cookie for ``user``, issued at ``now`` (seconds since the epoch)."""
        body = f"{user.name}:{secrets.token_urlsafe(12)}:{int(now)}"
        return f"{body}:{_device_mac(user, body)}"

    def device_of(self, cookie: str | None, name: str, now: float) -> str | None:
        """The random id of ``cookie`` when it is a device cookie of user ``name`` that is
        still good (issued within ``DEVICE_MAX_AGE`` under the user's current password);
        None for anything else."""
        m = _DEVICE.fullmatch(cookie or "")
        if m is None or m.group(1) != name or not 0 <= now - int(m.group(3)) <= DEVICE_MAX_AGE:
            return None
        user = self.get(name)
        body = m.group(0)[: m.start(4) - 1]
        return m.group(2) if user is not None and hmac.compare_digest(_device_mac(user, body), m.group(4)) else None

    # ---- changing -------------------------------------------------------------------------

    def _write(self, users: dict[str, User]) -> None:
        doc = {
            "version": 1,
            "users": {
                u.name: {
                    "role": u.role,
                    "created": u.created,
                    "password": u.password,
                    "tokens": [t.public() | {"sha256": t.sha256} for t in u.tokens],
                }
                for u in sorted(users.values(), key=lambda u: u.name)
            },
        }
        folder = os.path.dirname(self.path)
        tmp = f"{self.path}.tmp-{secrets.token_hex(6)}"
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "the users file")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(doc, indent=1).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            if os.path.islink(self.path):
                raise ConfigError(f"the users file {self.path} is a link; vmvault does not write through it")
            platform.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        platform.sync_dir(folder)
        self._users = users
        self._stamp = None

    def _new_hash(self, password: str) -> dict[str, Any]:
        check_password(password)
        salt = os.urandom(16)
        params = kdf_params()
        return {
            "kdf": "argon2id",
            "params": params,
            "salt": _b64(salt),
            "hash": _b64(_hash_password(password, salt, params)),
        }

    def add(self, name: str, role: str, password: str) -> User:
        check_name(name)
        check_role(role)
        pw = self._new_hash(password)
        with self._lock:
            self._refresh()
            if name in self._users:
                raise ConfigError(f"user {name} exists; use `vmvault user passwd` or remove it first")
            user = User(name, role, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), pw)
            self._write(self._users | {name: user})
            return user

    def _change(self, name: str, **changes: Any) -> User:
        with self._lock:
            self._refresh()
            user = self._users.get(name)
            if user is None:
                raise ConfigError(f"no user {name!r}")
            new = User(
                user.name,
                changes.get("role", user.role),
                user.created,
                changes.get("password", user.password),
                changes.get("tokens", user.tokens),
            )
            if user.role == "admin" and new.role != "admin" and self._admins() == [name]:
                raise ConfigError(f"{name} is the only admin; make another user admin first")
            self._write(self._users | {name: new})
            return new

    def _admins(self) -> list[str]:
        return [u.name for u in self._users.values() if u.role == "admin"]

    def set_password(self, name: str, password: str) -> User:
        return self._change(name, password=self._new_hash(password))

    def set_role(self, name: str, role: str) -> User:
        return self._change(name, role=check_role(role))

    def remove(self, name: str) -> None:
        with self._lock:
            self._refresh()
            if name not in self._users:
                raise ConfigError(f"no user {name!r}")
            if self._admins() == [name] and len(self._users) > 1:
                raise ConfigError(f"{name} is the only admin; make another user admin first")
            self._write({k: v for k, v in self._users.items() if k != name})

    def add_token(self, name: str, label: str = "") -> tuple[Token, str]:
        """A new API token for ``name``: (its record, the token itself, shown only now)."""
        label = label.strip()[:64]
        user = self.get(name)
        if user is None:
            raise ConfigError(f"no user {name!r}")
        if len(user.tokens) >= MAX_TOKENS:
            raise ConfigError(f"{name} has {MAX_TOKENS} tokens; revoke one first")
        token_id = secrets.token_hex(4)
        secret = f"vvt_{token_id}_{secrets.token_urlsafe(32)}"
        record = Token(
            token_id,
            label,
            dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            hashlib.sha256(secret.encode()).hexdigest(),
        )
        self._change(name, tokens=(*user.tokens, record))
        return record, secret

    def revoke_token(self, name: str, token_id: str) -> None:
        user = self.get(name)
        if user is None:
            raise ConfigError(f"no user {name!r}")
        if not any(t.id == token_id for t in user.tokens):
            raise ConfigError(f"{name} has no token {token_id!r}")
        self._change(name, tokens=tuple(t for t in user.tokens if t.id != token_id))

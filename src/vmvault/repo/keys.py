"""Key files: the master key wrapped by a passphrase (Argon2id) or by a key file's secret.

Each ``keys/<id>`` object is plaintext JSON (it must be readable before anything is
unlocked); only its ``data`` field is secret, sealed with AES-256-GCM under the
key-encryption key. Adding, removing or changing a passphrase touches only ``keys/``:
no data is ever re-encrypted.
"""

from __future__ import annotations

import base64
import datetime as dt
import getpass
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmvault.backends.base import Backend
from vmvault.errors import IntegrityError, PasswordError, RepositoryError
from vmvault.repo.crypto import MasterKey, derive_passphrase_key

__all__ = [
    "BACKUP_ONLY",
    "DEFAULT_KDF",
    "FULL",
    "ROLES",
    "KeyInfo",
    "add_key",
    "key_role",
    "list_keys",
    "remove_key",
    "unlock",
]

#: key roles: what a client opened with the key agrees to do (advisory: docs/storage.md)
FULL = "full"
BACKUP_ONLY = "backup-only"
ROLES = (FULL, BACKUP_ONLY)

#: Argon2id cost: ~64 MiB and a fraction of a second on a small server
DEFAULT_KDF: dict[str, int] = {"memory_kib": 65536, "iterations": 3, "lanes": 4}
#: cheap parameters, only for tests (set VMVAULT_TEST_CHEAP_KDF=1)
CHEAP_KDF: dict[str, int] = {"memory_kib": 1024, "iterations": 1, "lanes": 1}

_AAD = b"vmvault key"


def _aad(role: str) -> bytes:
    # a role other than full is bound to the wrapped key: editing or dropping the field makes
    # the key unopenable rather than silently giving full rights back
    return _AAD if role == FULL else _AAD + b" role " + role.encode()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    created: str
    hostname: str
    username: str
    kind: str  # "passphrase" or "keyfile"
    role: str = FULL


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _secret_kek(kind: str, secret: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    if kind == "keyfile":
        # a key file holds 32 random bytes: no stretching needed
        return hashlib.sha256(b"vmvault keyfile" + salt + secret).digest()
    return derive_passphrase_key(secret, salt, params)


def kdf_params() -> dict[str, int]:
    return dict(CHEAP_KDF if os.environ.get("VMVAULT_TEST_CHEAP_KDF") == "1" else DEFAULT_KDF)


def add_key(backend: Backend, master: MasterKey, secret: bytes, *, kind: str = "passphrase", role: str = FULL) -> str:
    """Wrap ``master`` with ``secret`` and store it as a new key; returns the key id."""
    if role not in ROLES:
        raise RepositoryError(f"unknown key role {role!r}; choose one of {', '.join(ROLES)}")
    salt = os.urandom(16)
    params = kdf_params()
    kek = _secret_kek(kind, secret, salt, params)
    nonce = os.urandom(12)
    sealed = AESGCM(kek).encrypt(nonce, master.to_bytes(), _aad(role))
    doc: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "username": getpass.getuser(),
        "kind": kind,
        "kdf": "argon2id" if kind == "passphrase" else "sha256",
        "kdf_params": params,
        "salt": _b64(salt),
        "data": _b64(nonce + sealed),
    }
    if role != FULL:
        doc["role"] = role
    raw = json.dumps(doc, indent=1).encode()
    key_id = hashlib.sha256(raw).hexdigest()
    backend.put(f"keys/{key_id}", raw)
    return key_id


def _load(backend: Backend, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(backend.get(name))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        return doc
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"key file {name} is damaged: {exc}", name=name) from exc


def unlock(backend: Backend, secret: bytes) -> tuple[MasterKey, str]:
    """Try ``secret`` against every key; returns the master key and the id of the key that opened."""
    names = [o.name for o in backend.list("keys/")]
    if not names:
        raise RepositoryError(f"{backend.url}: the repository has no keys")
    damaged = []
    for name in names:
        try:
            doc = _load(backend, name)
            salt = _unb64(doc["salt"])
            blob = _unb64(doc["data"])
            kek = _secret_kek(doc.get("kind", "passphrase"), secret, salt, doc["kdf_params"])
            aad = _aad(str(doc.get("role", FULL)))
        except (IntegrityError, KeyError, ValueError, TypeError) as exc:
            damaged.append(f"{name}: {exc}")
            continue
        try:
            raw = AESGCM(kek).decrypt(blob[:12], blob[12:], aad)
        except InvalidTag:
            continue
        return MasterKey.from_bytes(raw), name.removeprefix("keys/")
    hint = f" ({len(damaged)} damaged key files: {'; '.join(damaged)})" if damaged else ""
    raise PasswordError(f"wrong passphrase or key file: no key in {backend.url} opens with it{hint}")


def list_keys(backend: Backend) -> list[KeyInfo]:
    out = []
    for obj in backend.list("keys/"):
        doc = _load(backend, obj.name)
        out.append(
            KeyInfo(
                id=obj.name.removeprefix("keys/"),
                created=str(doc.get("created", "?")),
                hostname=str(doc.get("hostname", "?")),
                username=str(doc.get("username", "?")),
                kind=str(doc.get("kind", "passphrase")),
                role=str(doc.get("role", FULL)),
            )
        )
    return out


def key_role(backend: Backend, key_id: str) -> str:
    """The role stored with key ``key_id`` (bound to it by ``_aad``: it opened, so it is genuine)."""
    return str(_load(backend, f"keys/{key_id}").get("role", FULL))


def remove_key(backend: Backend, key_id: str, *, current: str) -> None:
    """Remove a key; refuses to remove the key in use or the last key."""
    ids = [k.id for k in list_keys(backend)]
    matches = [k for k in ids if k.startswith(key_id)]
    if len(matches) != 1:
        raise RepositoryError(f"key {key_id!r} matches {len(matches)} keys")
    if matches[0] == current:
        raise RepositoryError("refusing to remove the key this session is using (use `key passwd` to change it)")
    if len(ids) == 1:
        raise RepositoryError("refusing to remove the last key: the repository would become unreadable")
    backend.delete(f"keys/{matches[0]}")

"""Key objects: the master key wrapped by a passphrase (Argon2id) or by a key file's secret.

Each ``keys/<id>`` object is plaintext JSON (it must be readable before anything is
unlocked); only its ``data`` field is secret, sealed with AES-256-GCM under the
key-encryption key. Adding, removing or changing a passphrase touches only ``keys/``:
no data is ever re-encrypted.

Key objects come from the storage, which is not trusted (docs/design/repository-format.md,
section 10.1). Each is parsed strictly (``parse_key``): its name is the SHA-256 of its
content, its salt and sealed data have the sizes vmvault writes, its KDF parameters are
within ``crypto.KDF_BOUNDS``. One that is not is skipped and named, never fatal. ``unlock``
tries the key that opened last from this host first, then the others cheapest first, and
starts no new derivation once ``UNLOCK_BUDGET_SECONDS`` have passed: planted key objects can
make opening fail (so can deleting every key), but not hang or crash it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import getpass
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmvault.backends.base import Backend
from vmvault.errors import IntegrityError, ObjectNotFoundError, PasswordError, RepositoryError
from vmvault.repo._limits import MAX_SMALL_OBJECT, put_confirmed, read_bounded
from vmvault.repo.crypto import MasterKey, check_kdf_params, derive_passphrase_key
from vmvault.repo.names import key_id as parse_key_id
from vmvault.repo.secret import KEYFILE, PASSPHRASE

__all__ = [
    "BACKUP_ONLY",
    "DEFAULT_KDF",
    "FULL",
    "ROLES",
    "UNLOCK_BUDGET_SECONDS",
    "KeyInfo",
    "KeyObject",
    "Unlocked",
    "add_key",
    "list_keys",
    "parse_key",
    "remove_key",
    "replace_key",
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

#: opening starts no new passphrase derivation after this long (each takes ~0.5 s by default)
UNLOCK_BUDGET_SECONDS = 60.0
#: the clock the budget is measured on
_clock = time.monotonic

_AAD = b"vmvault key"
_SALT_SIZE = 16
#: nonce, master key (enc_key + id_key), GCM tag
_DATA_SIZE = 12 + 64 + 16
_KDF_OF_KIND = {PASSPHRASE: "argon2id", KEYFILE: "sha256"}


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
    #: why the key object cannot be used (damaged, planted, out-of-bounds KDF); "" when usable
    problem: str = ""


@dataclass(frozen=True)
class KeyObject:
    """A key object that passed every check but the secret."""

    id: str
    kind: str
    salt: bytes
    data: bytes
    params: dict[str, int]
    role: str
    doc: dict[str, Any]

    @property
    def cost(self) -> int:
        """Relative cost of trying a secret against it (key files need no stretching)."""
        return 0 if self.kind == KEYFILE else self.params["memory_kib"] * self.params["iterations"]

    def info(self) -> KeyInfo:
        return KeyInfo(
            id=self.id,
            created=str(self.doc.get("created", "?")),
            hostname=str(self.doc.get("hostname", "?")),
            username=str(self.doc.get("username", "?")),
            kind=self.kind,
            role=self.role,
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, size: int, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not text")
    try:
        raw = base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} is not base64") from exc
    if len(raw) != size:
        raise ValueError(f"{what} is {len(raw)} bytes, not {size}")
    return raw


def parse_key(name: str, raw: bytes) -> KeyObject:
    """Check a key object as read from the storage; IntegrityError says why it is unusable."""
    key_id = parse_key_id(name)
    try:
        if key_id is None:
            raise ValueError("its name is not a key id")
        if len(raw) > MAX_SMALL_OBJECT:
            raise ValueError(f"it is larger than {MAX_SMALL_OBJECT} bytes")
        if hashlib.sha256(raw).hexdigest() != key_id:
            raise ValueError("its content does not match its name")
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        kind = doc.get("kind", PASSPHRASE)
        if kind not in _KDF_OF_KIND:
            raise ValueError(f"unknown kind {str(kind)[:40]!r}")
        if doc.get("kdf", _KDF_OF_KIND[kind]) != _KDF_OF_KIND[kind]:
            raise ValueError(f"kdf {str(doc.get('kdf'))[:40]!r} does not fit kind {kind}")
        role = doc.get("role", FULL)
        if not isinstance(role, str) or not 0 < len(role) <= 64:
            raise ValueError("its role is not a short text")
        # a key file's secret is not stretched: its stored parameters are never used
        params = check_kdf_params(doc.get("kdf_params")) if kind == PASSPHRASE else {}
        return KeyObject(
            id=key_id,
            kind=kind,
            salt=_unb64(doc.get("salt"), _SALT_SIZE, "salt"),
            data=_unb64(doc.get("data"), _DATA_SIZE, "data"),
            params=params,
            role=role,
            doc=doc,
        )
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise IntegrityError(f"key object {name} is unusable: {exc}", name=name) from exc


def _load(backend: Backend, name: str) -> KeyObject:
    return parse_key(name, read_bounded(backend, name, MAX_SMALL_OBJECT, what=f"key object {name}"))


def _secret_kek(kind: str, secret: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    if kind == KEYFILE:
        # a key file holds 32 random bytes: no stretching needed
        return hashlib.sha256(b"vmvault keyfile" + salt + secret).digest()
    return derive_passphrase_key(secret, salt, params)


def kdf_params() -> dict[str, int]:
    return dict(CHEAP_KDF if os.environ.get("VMVAULT_TEST_CHEAP_KDF") == "1" else DEFAULT_KDF)


def add_key(backend: Backend, master: MasterKey, secret: bytes, *, kind: str = PASSPHRASE, role: str = FULL) -> str:
    """Wrap ``master`` with ``secret`` and store it as a new key; returns the key id.

    The secret is used as given: callers judge it (repo/secret.py) where it is read."""
    if role not in ROLES:
        raise RepositoryError(f"unknown key role {role!r}; choose one of {', '.join(ROLES)}")
    if kind not in _KDF_OF_KIND:
        raise RepositoryError(f"unknown key kind {kind!r}")
    salt = os.urandom(_SALT_SIZE)
    params = kdf_params()
    kek = _secret_kek(kind, secret, salt, params)
    nonce = os.urandom(12)
    sealed = AESGCM(kek).encrypt(nonce, master.to_bytes(), _aad(role))
    doc: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "username": getpass.getuser(),
        "kind": kind,
        "kdf": _KDF_OF_KIND[kind],
        "kdf_params": params,
        "salt": _b64(salt),
        "data": _b64(nonce + sealed),
    }
    if role != FULL:
        doc["role"] = role
    raw = json.dumps(doc, indent=1).encode()
    key_id = hashlib.sha256(raw).hexdigest()
    # read back before anything relies on it: `key passwd` removes the key in use next, and a
    # storage keeping other bytes would leave no key that opens the repository
    try:
        put_confirmed(backend, f"keys/{key_id}", raw)
    except IntegrityError as exc:
        raise IntegrityError(f"{exc}; no key was removed", name=exc.name) from exc
    return key_id


@dataclass(frozen=True)
class Unlocked:
    master: MasterKey
    key_id: str
    #: the role the key was sealed with (bound by the associated data: genuine)
    role: str
    #: key objects that were skipped on the way, and why
    warnings: list[str]


def _try(obj: KeyObject, secret: bytes) -> MasterKey | None:
    kek = _secret_kek(obj.kind, secret, obj.salt, obj.params)
    try:
        raw = AESGCM(kek).decrypt(obj.data[:12], obj.data[12:], _aad(obj.role))
    except InvalidTag:
        return None
    return MasterKey.from_bytes(raw)


def unlock(backend: Backend, secret: bytes, *, prefer: str | None = None) -> Unlocked:
    """Try ``secret`` against the keys: ``prefer`` first (the key that opened last from this
    host), then the others cheapest first. After UNLOCK_BUDGET_SECONDS no further key object
    is read and no further passphrase derivation started (key files cost nothing to try).
    Names that are not key ids are no key objects (repo/names.py; check reports them)."""
    names = sorted(o.name for o in backend.list("keys/") if parse_key_id(o.name) is not None)
    if not names:
        raise RepositoryError(f"{backend.url}: the repository has no keys")
    skipped: list[str] = []
    tried = 0

    def attempt(obj: KeyObject) -> Unlocked | None:
        nonlocal tried
        try:
            master = _try(obj, secret)
            tried += 1
        except MemoryError:
            skipped.append(f"{obj.id[:8]}: not enough memory for its KDF parameters {obj.params}")
            return None
        except IntegrityError as exc:
            skipped.append(f"{obj.id[:8]}: {exc}")
            return None
        return None if master is None else Unlocked(master, obj.id, obj.role, skipped)

    def load(name: str) -> KeyObject | None:
        try:
            return _load(backend, name)
        except ObjectNotFoundError:
            return None  # removed since the list
        except IntegrityError as exc:
            skipped.append(str(exc))
            return None

    first = f"keys/{prefer}" if prefer else None
    if first in names:
        names.remove(first)
        obj = load(first)
        if obj is not None and (opened := attempt(obj)) is not None:
            return opened
    deadline = _clock() + UNLOCK_BUDGET_SECONDS
    objects: list[KeyObject] = []
    untried = 0
    for i, name in enumerate(names):
        if _clock() > deadline:
            untried += len(names) - i
            break
        if (obj := load(name)) is not None:
            objects.append(obj)
    for obj in sorted(objects, key=lambda o: (o.cost, o.id)):
        if obj.cost and _clock() > deadline:
            untried += 1
        elif (opened := attempt(obj)) is not None:
            return opened
    if not tried and not untried:
        # the secret met no key it could be tried against: saying it is wrong would send the
        # administrator looking for another passphrase
        if not skipped:
            raise RepositoryError(f"{backend.url}: the repository has no keys")
        raise IntegrityError(
            f"no key object in {backend.url} could be used, so the passphrase or key file was not tried "
            f"({'; '.join(skipped[:5])}); a damaged key object can be put back from a copy of the repository"
        )
    hints = []
    if skipped:
        hints.append(f"{len(skipped)} unusable key objects: {'; '.join(skipped[:5])}")
    if untried:
        hints.append(
            f"{untried} key objects were not tried: opening stops trying after {UNLOCK_BUDGET_SECONDS:.0f} s "
            "(a repository with this many keys may hold planted ones; remove key objects you did not make)"
        )
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise PasswordError(f"wrong passphrase or key file: no key in {backend.url} opens with it{hint}")


def list_keys(backend: Backend) -> list[KeyInfo]:
    """Every key object; unusable ones too, with ``problem`` saying why."""
    out = []
    for obj in backend.list("keys/"):
        if parse_key_id(obj.name) is None:
            continue  # not a key vmvault wrote (check reports it)
        try:
            out.append(_load(backend, obj.name).info())
        except ObjectNotFoundError:
            continue
        except IntegrityError as exc:
            out.append(KeyInfo(obj.name.removeprefix("keys/"), "?", "?", "?", "?", "?", problem=str(exc)))
    return out


def _full_keys(infos: list[KeyInfo]) -> set[str]:
    # the role of a key this client cannot open is taken from its plaintext: a key object
    # planted with "full" counts (whoever plants keys can also delete them all)
    return {k.id for k in infos if not k.problem and k.role == FULL}


def remove_key(backend: Backend, key_id: str, *, current: str) -> str:
    """Remove a key; refuses the key in use, the last key, and the last key with full rights.
    Returns the full id of the removed key."""
    infos = list_keys(backend)
    matches = [k.id for k in infos if k.id.startswith(key_id)]
    if len(matches) != 1:
        raise RepositoryError(f"key {key_id!r} matches {len(matches)} keys")
    target = matches[0]
    if target == current:
        raise RepositoryError("refusing to remove the key this session is using (use `key passwd` to change it)")
    if len(infos) == 1:
        raise RepositoryError("refusing to remove the last key: the repository would become unreadable")
    full = _full_keys(infos)
    if full == {target}:
        raise RepositoryError(
            "refusing to remove the last key with full rights: nothing could forget, prune or manage keys any more"
        )
    backend.delete(f"keys/{target}")
    return target


def replace_key(
    backend: Backend, master: MasterKey, *, current: str, secret: bytes, kind: str = PASSPHRASE, role: str = FULL
) -> str:
    """Change the key in use: add the new one, then remove ``current``. Refuses when that
    would leave no key with full rights. Returns the new key's id."""
    full = _full_keys(list_keys(backend)) - {current}
    if role != FULL and not full:
        raise RepositoryError(
            f"refusing to make the last key with full rights {role}: nothing could forget, prune or manage "
            "keys any more (add a full key first, or keep this one full)"
        )
    new_id = add_key(backend, master, secret, kind=kind, role=role)
    backend.delete(f"keys/{current}")
    return new_id

"""The ``config`` object: what it may hold, and how its integrity is established.

The config is plaintext JSON because it must be read before any key is known; an encrypted
repository's config carries a MAC under the master key's id key. The storage is not trusted,
so nothing here takes the config's word for anything that decides how much to trust it
(docs/design/repository-format.md, sections 4 "config" and 10.1):

* every field is parsed strictly (types, ranges, the id's shape: it names a file on this
  host), an oversized object is not read (repo/_limits.py), and duplicate JSON keys are refused;
* the MAC covers the whole object as stored, unknown fields included, not a re-serialisation
  of the fields this reader knows;
* the chunk id function (``chunk_id``) is named from format version 3 on and only there: a
  config of an earlier version that names one, or of version 3 that does not, is damaged, so
  no repository can be read with two id functions;
* whether a MAC is required does not depend on the ``encryption`` field: ``Repository.open``
  refuses an unauthenticated config when key objects exist, when a secret was given, or
  when this host saw the repository encrypted (repo/hostrecord.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from vmvault import __version__
from vmvault.backends.base import Backend
from vmvault.errors import (
    IntegrityError,
    NoConfigError,
    NotARepositoryError,
    ObjectNotFoundError,
    RepositoryError,
    UnsupportedVersionError,
)
from vmvault.repo._layout import CHUNK_ID_VERSION, FORMAT_VERSION
from vmvault.repo._limits import MAX_SMALL_OBJECT, read_bounded
from vmvault.repo.crypto import BLAKE3, CHUNK_ID_FUNCTIONS, HMAC_SHA256, MasterKey

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PACK_SIZE",
    "ENCRYPTED",
    "FORMAT_NAME",
    "UNENCRYPTED",
    "RepoConfig",
    "StoredConfig",
    "check_settings",
    "encode_config",
    "read_config",
]

FORMAT_NAME = "vmvault-repository"
#: chosen by measurement: docs/benchmarks.md, "chunk size"
DEFAULT_CHUNK_SIZE = 256 * 1024
#: target pack size: few objects for object stores, small enough to upload in parallel
DEFAULT_PACK_SIZE = 16 * 1024 * 1024
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 4 << 10, 64 << 20
#: a pack closes once it reaches pack_size; above 1 GiB packs would near the 4 GiB that u32
#: offsets allow, and a writer holds several packs in memory
MIN_PACK_SIZE, MAX_PACK_SIZE = 4 << 10, 1 << 30
MAX_IMMUTABLE_DAYS = 36500

ENCRYPTED = "aes-256-gcm"
UNENCRYPTED = "none"
#: every field a config may hold (``chunk_id`` from version 3 on); any other is refused (see check_unknown)
_FIELDS = frozenset(
    {"format", "version", "id", "chunk_size", "pack_size", "encryption", "created", "immutable_days", "chunk_id", "mac"}
)
#: the id names this host's record of the repository (repo/hostrecord.py): 16 random bytes, hex
_ID = re.compile(r"[0-9a-f]{32}")
_MAC = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RepoConfig:
    id: str
    version: int
    chunk_size: int
    pack_size: int
    encrypted: bool
    created: str
    #: data, index and snapshot objects are kept at least this many days (None: no retention)
    immutable_days: int | None = None
    #: how chunk and index block ids are computed (crypto.CHUNK_ID_FUNCTIONS); named in the
    #: config from version 3 on, HMAC-SHA-256 before
    chunk_id: str = HMAC_SHA256

    @property
    def chunk_id_label(self) -> str:
        """The chunk id function as a person reads it: keyed when the repository is encrypted."""
        if self.chunk_id == BLAKE3:
            return "keyed BLAKE3" if self.encrypted else "BLAKE3 (unkeyed)"
        return "HMAC-SHA-256" if self.encrypted else "SHA-256 (unkeyed)"

    def body(self) -> dict[str, Any]:
        """The object as written, without its MAC."""
        # immutable_days only when set, chunk_id only from version 3 on, so the MAC of older
        # configs stays what it was
        extra: dict[str, Any] = {} if self.immutable_days is None else {"immutable_days": self.immutable_days}
        body: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": self.version,
            "id": self.id,
            "chunk_size": self.chunk_size,
            "pack_size": self.pack_size,
            "encryption": ENCRYPTED if self.encrypted else UNENCRYPTED,
        }
        if self.version >= CHUNK_ID_VERSION:
            body["chunk_id"] = self.chunk_id
        return extra | body | {"created": self.created}


def check_settings(*, chunk_size: int, pack_size: int, immutable_days: int | None) -> None:
    """The bounds a config's settings must meet, when it is made and whenever it is read."""
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise RepositoryError(f"chunk size {chunk_size} must be a power of two from 4 KiB to 64 MiB")
    if not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
        raise RepositoryError(f"pack size {pack_size} must be from 4 KiB to 1 GiB")
    if immutable_days is not None and not 1 <= immutable_days <= MAX_IMMUTABLE_DAYS:
        raise RepositoryError(f"immutable days must be from 1 to {MAX_IMMUTABLE_DAYS}, not {immutable_days}")


def _mac(key: MasterKey, body: dict[str, Any]) -> str:
    assert key.id_key is not None
    # sorted keys, ", " and ": " separators (json's defaults): repository-format.md, section 4
    canonical = json.dumps(body, sort_keys=True).encode()
    return hmac.new(key.id_key, b"config" + canonical, "sha256").hexdigest()


def encode_config(config: RepoConfig, key: MasterKey) -> bytes:
    """The config object as ``init`` stores it (with its MAC when the repository is encrypted)."""
    body = config.body()
    if key.encrypted:
        body["mac"] = _mac(key, config.body())
    return json.dumps(body, indent=1).encode()


@dataclass(frozen=True)
class StoredConfig:
    """A config as read from the storage: parsed, not yet authenticated."""

    config: RepoConfig
    doc: dict[str, Any]
    #: hex SHA-256 of the object's bytes (a config is written once and never changes)
    sha256: str
    url: str
    #: the object's bytes, as read
    raw: bytes = b""

    @property
    def authenticated(self) -> bool:
        """Whether the config carries a MAC (it then must verify: ``verify``)."""
        return "mac" in self.doc

    def verify(self, key: MasterKey) -> None:
        """Check the MAC over the whole object as stored; then refuse fields this reader does
        not know (a MAC-valid one was written by a newer vmvault)."""
        mac = self.doc.get("mac")
        body = {k: v for k, v in self.doc.items() if k != "mac"}
        if not isinstance(mac, str) or not _MAC.fullmatch(mac) or not hmac.compare_digest(mac, _mac(key, body)):
            raise IntegrityError(f"{self.url}: the config does not match its MAC (tampered or damaged)", name="config")
        self.check_unknown(authenticated=True)

    def check_unknown(self, *, authenticated: bool) -> None:
        unknown = sorted(set(self.doc) - _FIELDS)
        if not unknown:
            return
        why = "written by a newer vmvault" if authenticated else "written by a newer vmvault, or tampered with"
        raise UnsupportedVersionError(
            f"{self.url}: the config has fields this vmvault ({__version__}) does not know: "
            f"{', '.join(repr(u[:40]) for u in unknown[:5])} ({why}); upgrade vmvault"
        )


class _DuplicateField(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers differ on which of two equal keys wins: no vmvault writes one, so refuse it
    doc: dict[str, Any] = {}
    for k, v in pairs:
        if k in doc:
            raise _DuplicateField(f"field {k[:40]!r} appears twice")
        doc[k] = v
    return doc


def _int(doc: dict[str, Any], field: str) -> int:
    value = doc[field]
    # bool is an int in Python, and 1.0 is not what any vmvault writes
    if type(value) is not int:
        raise ValueError(f"{field} is {value!r}, not an integer")
    return value


def _chunk_id(doc: dict[str, Any], version: int) -> str:
    """The chunk id function a config of ``version`` names: HMAC-SHA-256 before version 3,
    where the field must be absent, and the field itself from version 3 on, where it must be
    present (ValueError: damaged). A name this reader does not know needs a newer vmvault."""
    if version < CHUNK_ID_VERSION:
        if "chunk_id" in doc:
            raise ValueError(f"a version-{version} config names no chunk id function, this one does")
        return HMAC_SHA256
    if "chunk_id" not in doc:
        raise ValueError(f"a version-{version} config names its chunk id function, this one does not")
    name = doc["chunk_id"]
    if not isinstance(name, str):
        raise ValueError(f"chunk_id is {str(name)[:40]!r}, not the name of a chunk id function")
    if name not in CHUNK_ID_FUNCTIONS:
        raise UnsupportedVersionError(
            f"the config names chunk id function {name[:40]!r}, which this vmvault ({__version__}) does not know "
            f"(it knows {', '.join(CHUNK_ID_FUNCTIONS)}); written by a newer vmvault, or tampered with: upgrade vmvault"
        )
    return name


def read_config(backend: Backend) -> StoredConfig:
    """Read and parse the config strictly. Raises NotARepositoryError, UnsupportedVersionError
    (a newer format) or IntegrityError (a config no vmvault writes)."""
    try:
        raw = read_bounded(backend, "config", MAX_SMALL_OBJECT, what=f"{backend.url}: the config")
    except ObjectNotFoundError:
        raise NoConfigError(
            f"{backend.url} is not a vmvault repository (no config); create one with `vmvault init`"
        ) from None
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ValueError("not a vmvault config")
    except _DuplicateField as exc:
        raise IntegrityError(f"{backend.url}: damaged config: {exc}", name="config") from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise NotARepositoryError(f"{backend.url} is not a vmvault repository ({exc})") from exc
    version = doc.get("version")
    if type(version) is int and version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{backend.url} has repository format version {version}; this vmvault ({__version__}) "
            f"reads versions up to {FORMAT_VERSION}. Upgrade vmvault."
        )
    try:
        if type(version) is not int or version < 1:
            raise ValueError(f"version is {version!r}")
        repo_id = doc["id"]
        if not isinstance(repo_id, str) or not _ID.fullmatch(repo_id):
            raise ValueError(f"the id {str(repo_id)[:80]!r} is not 32 hex digits")
        encryption = doc["encryption"]
        if encryption not in (ENCRYPTED, UNENCRYPTED):
            raise ValueError(f"unknown encryption {str(encryption)[:40]!r}")
        created = doc.get("created", "")
        if not isinstance(created, str):
            raise ValueError("created is not text")
        days = doc.get("immutable_days")
        chunk_id = _chunk_id(doc, version)
        config = RepoConfig(
            id=repo_id,
            version=version,
            chunk_size=_int(doc, "chunk_size"),
            pack_size=_int(doc, "pack_size") if "pack_size" in doc else DEFAULT_PACK_SIZE,
            encrypted=encryption == ENCRYPTED,
            created=created,
            immutable_days=None if days is None else _int(doc, "immutable_days"),
            chunk_id=chunk_id,
        )
        check_settings(chunk_size=config.chunk_size, pack_size=config.pack_size, immutable_days=config.immutable_days)
    except UnsupportedVersionError as exc:
        raise UnsupportedVersionError(f"{backend.url}: {exc}") from None
    except (KeyError, ValueError, RepositoryError) as exc:
        what = f"field {exc} is missing" if isinstance(exc, KeyError) else str(exc)
        raise IntegrityError(f"{backend.url}: damaged config: {what}", name="config") from exc
    return StoredConfig(config=config, doc=doc, sha256=hashlib.sha256(raw).hexdigest(), url=backend.url, raw=raw)

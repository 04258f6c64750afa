"""Object names: the exact forms vmvault writes, parsed from a listing in this one place.

A listing comes from storage that is not trusted (repository-format.md, section 10.3). It
may hold anything: an editor's backup file, names with NUL bytes, control characters or
bytes that are not UTF-8, or names made to resemble ours (upper-case hex, spaces that
``bytes.fromhex`` would skip, a wrong length, a pack in the wrong folder). Only a name of
exactly one of these forms is an object; readers ignore every other name, which therefore
never reaches a read, a delete or a message unescaped. ``check`` reports them.

::

    keys/<64 hex>            SHA-256 of the key object
    snapshots/<64 hex>       SHA-256 of the snapshot's JSON
    index/<64 hex>           SHA-256 of the index payload
    data/<2 hex>/<64 hex>    SHA-256 of the pack; its folder is the id's first two digits
    locks/<32 hex>           16 random bytes
    status/<64 hex>          SHA-256 of a host's status record (repo/status.py)

Hex digits are lower-case.
"""

from __future__ import annotations

import re

from vmvault.backends.base import shown

__all__ = ["index_id", "is_hex_id", "key_id", "lock_name", "pack_id", "shown", "snapshot_id", "status_id"]

_ID = re.compile(r"[0-9a-f]{64}")
_LOCK = re.compile(r"locks/[0-9a-f]{32}")
_PACK = re.compile(r"data/([0-9a-f]{2})/(([0-9a-f]{2})[0-9a-f]{62})")


def _hex_id(name: str, folder: str) -> str | None:
    if not name.startswith(folder) or not _ID.fullmatch(name, len(folder)):
        return None
    return name[len(folder) :]


def is_hex_id(name: str) -> bool:
    """Whether ``name`` is an id as the names above hold it: 64 lower-case hex digits."""
    return _ID.fullmatch(name) is not None


def key_id(name: str) -> str | None:
    """The id in ``keys/<id>``; None for any other name."""
    return _hex_id(name, "keys/")


def snapshot_id(name: str) -> str | None:
    """The id in ``snapshots/<id>``; None for any other name."""
    return _hex_id(name, "snapshots/")


def status_id(name: str) -> str | None:
    """The id in ``status/<id>``; None for any other name."""
    return _hex_id(name, "status/")


def index_id(name: str) -> bytes | None:
    """The id in ``index/<id>``; None for any other name."""
    found = _hex_id(name, "index/")
    return None if found is None else bytes.fromhex(found)


def pack_id(name: str) -> bytes | None:
    """The id in ``data/<xx>/<id>`` (``xx`` its first two digits); None for any other name."""
    match = _PACK.fullmatch(name)
    if match is None or match.group(1) != match.group(3):
        return None
    return bytes.fromhex(match.group(2))


def lock_name(name: str) -> bool:
    """Whether ``name`` is ``locks/<32 hex>``, as ``RepositoryLock`` names its objects."""
    return _LOCK.fullmatch(name) is not None

"""The storage interface under a repository: a flat namespace of immutable objects.

Names are ``/``-separated relative paths such as ``data/3f/3fa4...`` or ``snapshots/9c1e...``.
Every backend implements the same five operations with the same guarantees, checked by one
contract test suite (``tests/backends/contract.py``):

* ``put`` is atomic: a reader sees the whole object or nothing, also after a crash.
  Writing a name that exists replaces it whole (the repository only does so for
  identical content, except for lock files).
* ``get`` returns exactly the stored bytes (or a range of them) or raises ObjectNotFoundError.
* ``list`` yields every object under a prefix (recursively), with its size.
* ``delete`` of a missing object is not an error.

Backends translate their own failures into ``BackendError`` subclasses: ENOSPC into
``StorageFullError``, EACCES into ``BackendPermissionError``, a dropped connection (after
retries) into ``BackendConnectionError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = ["Backend", "ObjectInfo"]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int


class Backend(ABC):
    #: a URL-ish description for messages (never contains secrets)
    url: str = "?"

    #: True when the storage itself refuses deletes of locked objects (S3 Object Lock);
    #: False when only the client declines.
    enforces_immutability: bool = False

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` atomically and durably."""

    @abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` bytes from ``offset`` (short only at the end)."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (a directory such as ``"keys/"``)."""

    @abstractmethod
    def delete(self, name: str) -> None: ...

    def modified(self, name: str) -> float | None:
        """When ``name`` was last written (seconds since the epoch), None when unknown.

        Used to tell whether an object is still under the repository's retention period
        (``immutable_days``); unknown counts as still retained."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""An in-memory backend for tests: same contract, no durability."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from vmvault.backends.base import Backend, ObjectInfo
from vmvault.errors import ObjectNotFoundError

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        with self._lock:
            self._objects[name] = bytes(data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            try:
                data = self._objects[name]
            except KeyError:
                raise ObjectNotFoundError(f"{self.url}: no object {name}", name=name) from None
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._objects

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = [ObjectInfo(n, len(d)) for n, d in self._objects.items() if n.startswith(prefix)]
        yield from sorted(items, key=lambda o: o.name)

    def delete(self, name: str) -> None:
        with self._lock:
            self._objects.pop(name, None)

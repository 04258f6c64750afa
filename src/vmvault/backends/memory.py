"""An in-memory backend for tests: same contract, no durability."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from vmvault.backends.base import Backend, ObjectInfo
from vmvault.errors import ObjectNotFoundError

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    local_reads = True

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._objects: dict[str, bytes] = {}
        #: the stamp of each object: the number of the put that wrote it
        self._written: dict[str, int] = {}
        self._puts = 0
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        self.requests.count("put", written=len(data))
        with self._lock:
            self._objects[name] = bytes(data)
            self._puts += 1
            self._written[name] = self._puts

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.requests.count("get")
        with self._lock:
            try:
                data = self._objects[name]
            except KeyError:
                raise ObjectNotFoundError(f"{self.url}: no object {name}", name=name) from None
        end = len(data) if length is None else offset + length
        return self.requests.read(data[offset:end])

    def exists(self, name: str) -> bool:
        self.requests.count("stat")
        with self._lock:
            return name in self._objects

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.requests.count("list")
        with self._lock:
            items = [
                ObjectInfo(n, len(d), str(self._written[n])) for n, d in self._objects.items() if n.startswith(prefix)
            ]
        yield from sorted(items, key=lambda o: o.name)

    def delete(self, name: str) -> None:
        self.requests.count("delete")
        with self._lock:
            self._objects.pop(name, None)
            self._written.pop(name, None)

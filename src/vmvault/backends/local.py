"""A directory on a local (or mounted) file system.

Atomic put: write to a unique temporary file in the target directory, fsync it, rename it
over the name, fsync the directory. A crash leaves either the old state or the new object,
plus at worst a ``*.tmp-*`` file that ``list`` ignores and ``cleanup_temporary`` removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator

from vmvault.backends.base import Backend, ObjectInfo
from vmvault.errors import (
    BackendError,
    BackendPermissionError,
    ObjectNotFoundError,
    StorageFullError,
)

__all__ = ["LocalBackend"]

_TMP_MARK = ".tmp-"


class LocalBackend(Backend):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root
        self._known_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return os.path.join(self.root, name)

    def _error(self, exc: OSError, action: str, name: str) -> BackendError:
        text = f"{self.url}: cannot {action} {name}: {exc.strerror or exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFullError(f"{self.url}: the repository's disk is full (writing {name})", name=name)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return BackendPermissionError(text, name=name)
        if exc.errno in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
            # names are flat: the "directory" data/ab of data/ab/x is no object
            return ObjectNotFoundError(f"{self.url}: no object {name}", name=name)
        return BackendError(text, name=name)

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._known_dirs:
            return
        os.makedirs(directory, exist_ok=True)
        self._known_dirs.add(directory)

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        tmp = f"{path}{_TMP_MARK}{secrets.token_hex(6)}"
        try:
            self._ensure_dir(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error(exc, "write", name) from exc

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except OSError as exc:
            raise self._error(exc, "read", name) from exc
        try:
            if length is None:
                length = os.fstat(fd).st_size - offset
            chunks = []
            pos = offset
            remaining = length
            while remaining > 0:
                part = os.pread(fd, remaining, pos)
                if not part:
                    break
                chunks.append(part)
                pos += len(part)
                remaining -= len(part)
            return b"".join(chunks)
        except OSError as exc:
            raise self._error(exc, "read", name) from exc
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def modified(self, name: str) -> float | None:
        try:
            return os.stat(self._path(name)).st_mtime
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root
        if prefix and not prefix.endswith("/"):
            base = os.path.dirname(base)
        if not os.path.isdir(base):
            return
        out: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(base):
            for fname in files:
                if _TMP_MARK in fname:
                    continue
                full = os.path.join(dirpath, fname)
                name = os.path.relpath(full, self.root).replace(os.sep, "/")
                if not name.startswith(prefix):
                    continue
                try:
                    size = os.stat(full).st_size
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(name, size))
        yield from sorted(out, key=lambda o: o.name)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass  # nothing of that name (a directory is no object)
        except OSError as exc:
            if exc.errno == errno.EPERM and os.path.isdir(self._path(name)):
                return  # Linux answers EPERM for unlink() of a directory
            raise self._error(exc, "delete", name) from exc

    def cleanup_temporary(self) -> int:
        """Remove temporary files left by a killed writer; returns how many."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for fname in files:
                if _TMP_MARK in fname:
                    try:
                        os.unlink(os.path.join(dirpath, fname))
                        removed += 1
                    except OSError:
                        pass
        return removed

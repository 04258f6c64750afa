"""Raw disk images: the file *is* the disk. Holes are found with SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from vmvault.disk.base import DiskImage, DiskWriter, Extent, ExtentKind
from vmvault.errors import FormatError, SourceError, StorageFullError, VmvaultError

__all__ = ["RawImage", "RawWriter", "create_raw", "open_raw"]


class RawImage(DiskImage):
    format = "raw"

    def __init__(self, path: str, fd: int, size: int) -> None:
        self._path = path
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def path(self) -> str:
        return self._path

    def extents(self) -> Iterator[Extent]:
        pos = 0
        while pos < self._size:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield Extent(pos, self._size - pos, ExtentKind.ZERO)
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                    yield Extent(pos, self._size - pos, ExtentKind.DATA)
                    return
                raise SourceError(f"{self._path}: cannot map extents: {exc.strerror}") from exc
            data = min(data, self._size)
            if data > pos:
                yield Extent(pos, data - pos, ExtentKind.ZERO)
            if data >= self._size:
                return
            try:
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), self._size)
            except OSError:
                hole = self._size
            yield Extent(data, hole - data, ExtentKind.DATA)
            pos = hole

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self._path}: read at offset {offset:#x} failed: {exc.strerror}") from exc
        if len(data) < length:
            # The file shrank under us (a live source being truncated): fail rather than pad silently.
            raise SourceError(
                f"{self._path}: file ended at {offset + len(data):#x} while reading; "
                f"expected {self._size} bytes (did it change size during the backup?)"
            )
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_raw(path: str) -> RawImage:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
    size = os.fstat(fd).st_size
    if size == 0 and not os.path.isfile(path):
        # block devices report st_size 0; ask the device
        size = os.lseek(fd, 0, os.SEEK_END)
    return RawImage(path, fd, size)


class RawWriter(DiskWriter):
    format = "raw"

    def __init__(self, path: str, size: int) -> None:
        self._path = path
        self._size = size
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise FormatError(f"cannot create: {exc.strerror}", path=path) from exc

    @property
    def size(self) -> int:
        return self._size

    def _failed(self, exc: OSError, offset: int) -> VmvaultError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFullError(f"{self._path}: No space left on the target disk (writing at {offset:#x})")
        return FormatError(f"write failed: {exc.strerror}", path=self._path, offset=offset)

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self._size:
            raise ValueError(f"write past the end of {self._path}")
        view = memoryview(data)
        pos = offset
        try:
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
        except OSError as exc:
            raise self._failed(exc, pos) from exc

    def flush(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise self._failed(exc, 0) from exc

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1


def create_raw(path: str, size: int) -> RawWriter:
    """A new sparse raw image of ``size`` bytes (all holes)."""
    return RawWriter(path, size)

"""Raw disk images: the file *is* the disk. Holes are found with SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from vmvault import platform
from vmvault.disk._direct import DirectWrites, drain_and_fsync, write_or_queue
from vmvault.disk._open import ParentRule, open_checked
from vmvault.disk.base import (
    DiskFormat,
    DiskImage,
    DiskWriter,
    Extent,
    ExtentKind,
    Opener,
    open_new,
    write_error,
)
from vmvault.errors import FormatError, SourceError

__all__ = ["FORMAT", "RawFormat", "RawImage", "RawWriter", "create_raw", "open_raw", "open_raw_fd"]


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
                data = platform.seek_data(self._fd, pos)
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
                hole = min(platform.seek_hole(self._fd, data), self._size)
            except OSError:
                hole = self._size
            yield Extent(data, hole - data, ExtentKind.DATA)
            pos = hole

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        try:
            data = platform.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self._path}: read at offset {offset:#x} failed: {exc.strerror}") from exc
        if len(data) < length:
            # The file shrank under us (a live source being truncated): fail rather than pad silently.
            raise SourceError(
                f"{self._path}: file ended at {offset + len(data):#x} while reading; "
                f"expected {self._size} bytes (did it change size during the backup?)"
            )
        return data

    def read_done(self, offset: int, length: int) -> None:
        # a raw file's offsets are the disk's own
        if self._fd >= 0:
            platform.drop_cached(self._fd, offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_raw(path: str) -> RawImage:
    """Open a raw image (a regular file or a block device) read-only."""
    fd, _st = open_checked(path)
    return open_raw_fd(path, fd)


def open_raw_fd(path: str, fd: int) -> RawImage:
    """A raw image on ``fd``, opened and checked by the caller (``_open.open_checked``); owns ``fd``."""
    try:
        st = os.fstat(fd)
        size = st.st_size
        if stat.S_ISBLK(st.st_mode):
            # block devices report st_size 0; ask the device
            size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        os.close(fd)
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
    return RawImage(path, fd, size)


class RawWriter(DiskWriter):
    """A new raw image. Its data goes past the page cache where the file system takes
    ``O_DIRECT`` (disk/_direct.py: gathered into 8 MiB writes from a thread of its own), else
    through it; ``close`` makes it durable either way."""

    format = "raw"

    def __init__(self, path: str, size: int, *, opener: Opener | None = None) -> None:
        self._path = path
        self._size = size
        self._fd = open_new(path, opener)
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            raise write_error(exc, path, f"cannot make it {size} bytes") from exc
        self._direct = DirectWrites.open(self._fd, path)

    @property
    def size(self) -> int:
        return self._size

    @property
    def past_cache(self) -> bool:
        return self._direct is not None and self._direct.direct

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self._size:
            raise ValueError(f"write past the end of {self._path}")
        write_or_queue(self._direct, self._fd, data, offset, self._path)

    def flush(self) -> None:
        drain_and_fsync(self._direct, self._fd, self._path)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                direct, self._direct = self._direct, None
                if direct is not None:
                    direct.close()
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1


def create_raw(path: str, size: int, *, opener: Opener | None = None) -> RawWriter:
    """A new sparse raw image of ``size`` bytes (all holes); an existing name is never replaced."""
    return RawWriter(path, size, opener=opener)


class RawFormat(DiskFormat):
    """Raw: no header, so nothing identifies it; what no other format claims is raw."""

    name = "raw"
    suffixes = (".raw", ".img")
    qemu_name = "raw"
    checkpoint_format = "qcow2"  # raw has no parent reference: a checkpoint is a qcow2 overlay
    checkpoint_suffix = ".qcow2"
    is_fallback = True

    def open_fd(self, path: str, fd: int, *, parent: str | None, rule: ParentRule) -> DiskImage:
        return open_raw_fd(path, fd)

    def create(
        self, path: str, size: int, *, parent: str | None = None, unit: int | None = None, opener: Opener | None = None
    ) -> DiskWriter:
        if parent is not None:
            raise FormatError("a raw image cannot have a parent", path=path)
        return create_raw(path, size, opener=opener)


FORMAT = RawFormat()

"""The interface every virtual disk format implements, and what the backup engine reads through.

A ``DiskImage`` is one *layer*: a file (or an NBD export, or a frozen view) of ``size``
virtual bytes. ``extents()`` describes that layer alone: where it stores data, where it
reads as zeros, and where it defers to its parent. ``read()`` always returns the merged
view, i.e. what a guest would see, resolving the parent chain. ``merged_extents()`` is the
merged map (DATA and ZERO only) and is what a backup reads.

Writable images (``DiskWriter``) are produced by each format's ``create`` function and by
``open_image(..., writable=True)`` where a format supports in-place writes.
"""

from __future__ import annotations

import enum
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from vmvault.errors import FormatError, SourceError

__all__ = ["DiskImage", "DiskWriter", "Extent", "ExtentKind", "clip_extents", "coalesce"]


class ExtentKind(enum.Enum):
    DATA = "data"  # stored in this layer (may still contain zero bytes)
    ZERO = "zero"  # reads as zeros; nothing stored (hole, unallocated, zero cluster)
    PARENT = "parent"  # this layer stores nothing here; the parent supplies the bytes


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    kind: ExtentKind

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Merge adjacent extents of the same kind; drops empty ones. Input must be ordered."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length <= 0:
            continue
        if pending is not None and pending.kind is ext.kind and pending.end == ext.offset:
            pending = Extent(pending.offset, pending.length + ext.length, ext.kind)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


def clip_extents(extents: Iterable[Extent], start: int, end: int) -> Iterator[Extent]:
    """The parts of ordered ``extents`` that fall inside ``[start, end)``."""
    for ext in extents:
        if ext.end <= start:
            continue
        if ext.offset >= end:
            break
        lo, hi = max(ext.offset, start), min(ext.end, end)
        yield Extent(lo, hi - lo, ext.kind)


def read_structure(fd: int, path: str, offset: int, length: int, structure: str) -> bytes:
    """Exactly ``length`` bytes of an on-disk structure; a short read is a truncated file."""
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise SourceError(f"{path}: read of {structure} at offset {offset:#x} failed: {exc.strerror}") from exc
    if len(data) != length:
        raise FormatError(
            f"file ends inside this structure ({len(data)} of {length} bytes)",
            path=path,
            offset=offset,
            structure=structure,
        )
    return data


def is_zero(data: bytes | memoryview) -> bool:
    """All bytes zero? (bytes equality is a memcmp; ``any()`` over a memoryview is ~50x slower)."""
    raw = data.tobytes() if isinstance(data, memoryview) else data
    return raw == bytes(len(raw))


class DiskImage(ABC):
    """One readable layer of a virtual disk. Reads are positional and thread-safe."""

    #: short format name: "raw", "vhdx", "vhd", "qcow2", "nbd", ...
    format: str = "?"

    @property
    @abstractmethod
    def size(self) -> int:
        """Virtual size in bytes."""

    @property
    def path(self) -> str:
        """Where this layer lives (file path or URL); used in messages."""
        return "<disk>"

    @property
    def parent(self) -> DiskImage | None:
        """The opened parent layer, or None for a base image."""
        return None

    @abstractmethod
    def extents(self) -> Iterator[Extent]:
        """This layer's own map: ordered, non-overlapping, covering ``[0, size)``."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """The merged (guest-visible) bytes; short only at the end of the disk."""

    def merged_extents(self) -> Iterator[Extent]:
        """The guest-visible map (DATA/ZERO only), resolving PARENT ranges through the chain."""
        parent = self.parent
        for ext in coalesce(self.extents()):
            if ext.kind is not ExtentKind.PARENT:
                yield ext
            elif parent is None:
                yield Extent(ext.offset, ext.length, ExtentKind.ZERO)
            else:
                yield from clip_extents(parent.merged_extents(), ext.offset, ext.end)

    def chain(self) -> list[DiskImage]:
        """This layer followed by its ancestors, leaf first."""
        out: list[DiskImage] = []
        node: DiskImage | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        return out

    def info(self) -> dict[str, object]:
        """Format-specific facts for ``vmvault disk info`` (JSON-serialisable)."""
        return {"format": self.format, "path": self.path, "size": self.size}

    def close(self) -> None:
        """Release file handles (the parent chain too)."""
        if self.parent is not None:
            self.parent.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DiskWriter(ABC):
    """A disk being written: restore targets, new checkpoints, conversions.

    Regions never written read as zeros (or as the parent, for a differencing writer).
    Writers keep files sparse: callers skip all-zero data, and formats allocate lazily.
    """

    format: str = "?"

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Write guest-visible bytes at ``offset``. Not required to be thread-safe."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written durable (fsync)."""

    @abstractmethod
    def close(self) -> None:
        """Finish the file: write tables and headers, flush, close."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

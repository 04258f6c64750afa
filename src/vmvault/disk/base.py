"""The interface every virtual disk format implements, and what the backup engine reads through.

A ``DiskImage`` is one *layer*: a file (or an NBD export, or a frozen view) of ``size``
virtual bytes. ``extents()`` describes that layer alone: where it stores data, where it
reads as zeros, and where it defers to its parent. ``read()`` always returns the merged
view, i.e. what a guest would see, resolving the parent chain. ``merged_extents()`` is the
merged map (DATA and ZERO only) and is what a backup reads.

Writable images (``DiskWriter``) are produced by each format's ``create`` function;
``open_image`` opens read-only. A ``DiskFormat`` is a format's entry in the registry
(``vmvault.disk.registry``): how its files are recognised, opened and created, and how a
child records, and has rewritten, its parent (``ParentReference``). Merges and checkpoints are
``vmvault.disk.chain``'s, which reach each format only through its entry; every in-place change
of an existing file is a single atomic write.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Self

from vmvault import platform
from vmvault.errors import FormatError, SourceError, TargetError, TargetFullError, UnsupportedFormatError

if TYPE_CHECKING:
    from vmvault.disk._open import ParentRule
    from vmvault.disk.metadata_check import MetadataCheck

__all__ = [
    "CREATE_FLAGS",
    "CacheRelease",
    "DiskFormat",
    "DiskImage",
    "DiskWriter",
    "Extent",
    "ExtentKind",
    "Opener",
    "ParentReference",
    "clip_extents",
    "coalesce",
    "create_file",
    "fsync_file",
    "open_new",
    "write_error",
]

#: how a writer opens the file it creates: ``opener(path, flags) -> fd`` (as for Python's ``open``).
#: A restore passes one that creates the file under a temporary name inside its own folder
#: (a directory descriptor); ``path`` then only names the file in messages and locators.
Opener = Callable[[str, int], int]

#: a new image never replaces anything: not an existing file, and not through a link
CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | platform.O_NOFOLLOW | platform.O_CLOEXEC | platform.O_BINARY


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


def create_file(path: str, flags: int) -> int:
    """The default ``Opener``: a new file at ``path`` (``flags`` are ``CREATE_FLAGS``), mode 0644 less the umask."""
    return os.open(path, flags, 0o644)


def open_new(path: str, opener: Opener | None) -> int:
    """Create the file a writer writes, through ``opener``; an existing name (a link too) is refused."""
    try:
        return (opener or create_file)(path, CREATE_FLAGS)
    except OSError as exc:
        raise write_error(exc, path, "cannot create") from exc


def write_at(fd: int, data: bytes | bytearray | memoryview, offset: int, path: str) -> int:
    """Write all of ``data`` at ``offset``, at most ``platform.WRITE_SLICE`` a call (the writers'
    one loop); returns the offset after it. A failure is ``write_error``'s, naming the offset that
    failed; a file system that writes nothing is one too (it would otherwise loop for ever)."""
    view = memoryview(data)
    try:
        while len(view):
            n = platform.pwrite(fd, view[: platform.WRITE_SLICE], offset)
            if n <= 0:
                raise OSError(errno.EIO, "the file system wrote nothing")
            view, offset = view[n:], offset + n
    except OSError as exc:
        raise write_error(exc, path, "write failed", offset) from exc
    return offset


def fsync_file(fd: int, path: str) -> None:
    """The writers' fsync: a failure is ``write_error``'s ("flush failed")."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise write_error(exc, path, "flush failed") from exc


def write_error(exc: OSError, path: str, what: str, offset: int | None = None) -> TargetError:
    """The error for a failed create, write, grow or flush of a file being written.

    A full file system (or quota) is ``TargetFullError``: the place being written is full, not
    the repository and not the source.
    """
    where = f" at offset {offset:#x}" if offset is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetFullError(f"No space left on the file system being written ({what}{where})", path=path)
    if exc.errno == errno.EEXIST:
        return TargetError(f"{what}: the name exists (nothing is ever overwritten)", path=path)
    if exc.errno == errno.ELOOP:
        return TargetError(f"{what}: the name is a link (links are never followed when writing)", path=path)
    return TargetError(f"{what}{where}: {exc.strerror or exc}", path=path)


def read_structure(fd: int, path: str, offset: int, length: int, structure: str) -> bytes:
    """Exactly ``length`` bytes of an on-disk structure; a short read is a truncated file."""
    try:
        data = platform.pread(fd, length, offset)
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


class CacheRelease:
    """``read_done`` for an image format whose file offsets are not the disk's (qcow2, VHDX,
    VHD): every ``EVERY`` bytes a reader is done with, the file's written-back cached pages are
    freed, all of them (mapping each range to the file again would cost a walk of the format's
    tables; the format's tables are read again from the file when needed). Thread-safe: the
    backup's workers report their batches at once."""

    EVERY = 64 << 20

    def __init__(self) -> None:
        self._done = 0
        self._lock = threading.Lock()

    def done(self, fd: int, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            if self._done < self.EVERY or fd < 0:
                return
            self._done = 0
        platform.drop_cached(fd)


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

    def read_done(self, offset: int, length: int) -> None:
        """The caller has what it read of ``[offset, offset + length)`` and will not read it
        again soon (a backup reads each byte once): an image on a local file lets the kernel
        free those pages of its cache (``platform.drop_cached``), instead of filling the host's
        page cache with a whole disk; a raw file those bytes' pages, the formats with a map
        their file's every ``CacheRelease.EVERY`` bytes (:class:`CacheRelease`). The parent
        layer is told too (the default does only that)."""
        if self.parent is not None:
            self.parent.read_done(offset, length)

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
        """Write guest-visible bytes at ``offset``. Not required to be thread-safe. A writer
        may queue the bytes: a failure to write them is then raised by a later ``write``,
        ``flush`` or ``close``."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written durable (fsync)."""

    @property
    def past_cache(self) -> bool:
        """Whether the data written goes past the page cache (``O_DIRECT``): then there is no
        dirty data to write back while writing, nor clean pages to free afterwards."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Finish the file: write tables and headers, flush, close."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ============================================================================================ formats


@dataclass(frozen=True, slots=True)
class ParentReference:
    """What a differencing image records about its parent, read without opening the parent.

    ``paths`` are the files the format's reader tries, in its order, made absolute against the
    child's folder (``docs/design/disk-formats.md`` section 2). ``identity`` is what the parent's
    ``DiskFormat.identity`` must be (VHDX: a linkage GUID; VHD: ParentUniqueId), or None when the
    format records none (qcow2). ``format`` is the parent's format when recorded (a qcow2 backing
    format) or implied (a VHDX or VHD parent is of the child's format).
    """

    paths: tuple[str, ...]
    identity: str | None
    format: str | None
    #: further identities the parent may have (VHDX ``parent_linkage2`` during a merge)
    other_identities: tuple[str, ...] = ()


class DiskFormat(ABC):
    """One virtual disk format, as the registry (``vmvault.disk.registry``) knows it.

    Each format module defines one subclass and one instance (``FORMAT``); the registry lists
    those instances, and every place that once switched on a format name asks it instead.
    Adding a format is a new module with its ``FORMAT`` and one line in the registry
    (``docs/design/disk-formats.md`` section 7).
    """

    #: the short name used everywhere ("vhdx"); ``DiskImage.format`` of its images
    name: ClassVar[str]
    #: file name endings (lower case) of images of this format; the first names new files
    suffixes: ClassVar[tuple[str, ...]]
    #: qemu's (and libvirt's) name, as qcow2 records it in a backing format extension
    qemu_name: ClassVar[str]
    #: can an image of this format be a differencing child (have a parent)?
    can_be_child: ClassVar[bool] = False
    #: formats a child of this format accepts as its parent; None: any format vmvault reads
    parent_formats: ClassVar[frozenset[str] | None] = None
    #: the format of a checkpoint taken of an image of this format
    checkpoint_format: ClassVar[str]
    #: the file name ending of such a checkpoint (Hyper-V: ``.avhdx``, ``.avhd``)
    checkpoint_suffix: ClassVar[str]
    #: the format nothing else claims: detection falls back to it (raw)
    is_fallback: ClassVar[bool] = False

    # -- detection and opening -------------------------------------------------------------------

    def probe(self, head: bytes, tail: bytes) -> bool:
        """Does a file whose first and last 512 bytes are ``head`` and ``tail`` hold this format?"""
        return False

    @abstractmethod
    def open_fd(self, path: str, fd: int, *, parent: str | None, rule: ParentRule) -> DiskImage:
        """Open the image on ``fd`` (opened and checked by ``_open.open_checked``; owned from now on)."""

    @abstractmethod
    def create(
        self, path: str, size: int, *, parent: str | None = None, unit: int | None = None, opener: Opener | None = None
    ) -> DiskWriter:
        """A new, empty, sparse image; with ``parent`` a differencing child of that file.

        ``unit`` is the allocation unit (block or cluster size; None: the format's default).
        """

    def open_for_write(self, path: str) -> DiskWriter:
        """Modify an existing image in place."""
        raise UnsupportedFormatError(f"vmvault cannot write a {self.name} image in place", path=path)

    def accepts_parent(self, parent_format: str) -> bool:
        """May a child of this format sit on a ``parent_format`` parent?"""
        return self.can_be_child and (self.parent_formats is None or parent_format in self.parent_formats)

    def check_metadata(self, image: DiskImage, result: MetadataCheck) -> bool:
        """Add what is wrong with ``image``'s own metadata to ``result`` (``disk/metadata_check.py``);
        False when the format has no metadata to check."""
        return False

    # -- identity and parent references ----------------------------------------------------------

    def identity(self, image: DiskImage) -> str | None:
        """What a child records of ``image`` to check that it is its parent (None: nothing)."""
        return None

    def read_parent(self, path: str) -> ParentReference | None:
        """The parent reference of the image at ``path`` (None for a base image), without opening
        any other file. A link or a FIFO is never followed."""
        return None

    def set_parent(self, path: str, new_parent: str, rule: ParentRule) -> None:
        """Point the differencing image at ``path`` at ``new_parent`` in one crash-safe update
        (``new_parent`` holds what the old parent held, as after a merge)."""
        raise UnsupportedFormatError(f"a {self.name} image has no parent reference to change", path=path)

    def prepare_parent_swap(self, child: str, current: str, replacement: str) -> None:  # noqa: B027 - optional hook
        """Before ``replacement`` is renamed over ``current`` (the parent of ``child``), make
        ``child`` accept both files as its parent. Nothing to do for formats whose parent
        identity survives the rebuild."""

    # -- merging ---------------------------------------------------------------------------------

    def create_like(self, image: DiskImage, path: str, parent: DiskImage | None) -> DiskWriter:
        """A new, empty file at ``path`` with ``image``'s identity and properties, over ``parent``
        (the file that replaces ``image`` in a merge)."""
        return self.create(path, image.size, parent=parent.path if parent is not None else None)

    def is_fixed(self, image: DiskImage) -> bool:
        """Is ``image`` fully allocated by design (a fixed VHDX or VHD), so a rebuild is whole?"""
        return False

    def allocation_unit(self, image: DiskImage) -> int | None:
        """The block or cluster size ``image`` allocates in; None when it has none (raw, fixed VHD)."""
        info = image.info()
        return int(str(info.get("block_size") or info.get("cluster_size") or 0)) or None

    def layout_overhead(self, image: DiskImage, units: int, has_parent: bool) -> int:
        """Bytes of headers and tables a file like ``image`` holding ``units`` allocation units
        takes, as vmvault's writer lays it out (an upper bound)."""
        return 0

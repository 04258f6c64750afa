"""What is inside a guest disk: partition tables and filesystems, read without mounting.

Everything here reads through a ``read(offset, length)`` function (a
:class:`~vmvault.engine.reader.DiskReader` of a snapshot's disk, or a file in tests) and
treats what it reads as untrusted. Public surface::

    read_partition_table(read, size)   MBR (with logical partitions) or GPT, or none
    disk_volumes(read, size)           the table and each volume with what it holds (Probe)
    open_volume(read, size, part)      the Filesystem of partition ``part`` (None: the whole disk)
    Filesystem                         lookup, listdir, walk, holes, reader of a guest filesystem
    library()                          the filesystem library (pytsk3), or a one-line install error
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from vmvault.errors import GuestError

from .filesystems import MAX_DEPTH, Entry, Filesystem, Probe, library, probe
from .partitions import Partition, PartitionTable, ReadAt, read_partition_table

__all__ = [
    "MAX_DEPTH",
    "Entry",
    "Filesystem",
    "GuestFilesystem",
    "Partition",
    "PartitionTable",
    "Probe",
    "Prober",
    "ReadAt",
    "Volume",
    "disk_volumes",
    "library",
    "open_volume",
    "probe",
    "read_partition_table",
]


class GuestFilesystem(Protocol):
    """What vmvault asks of a guest filesystem: :class:`Filesystem` in this process, or
    :class:`~vmvault.browse.isolated.RemoteFilesystem` in a confined worker."""

    kind: str
    case_insensitive: bool
    root: Entry

    @property
    def bytes_read(self) -> int: ...

    def lookup(self, path: str) -> Entry: ...

    def listdir(self, entry: Entry) -> list[Entry]: ...

    def walk(self, entry: Entry) -> Iterator[Entry]: ...

    def holes(self, entry: Entry) -> list[tuple[int, int]]: ...

    def reader(self, entry: Entry) -> Callable[[int, int], bytes]: ...


#: what a volume at ``(offset, size)`` holds, and its filesystem if vmvault reads it
Prober = Callable[[int, int], "tuple[Probe, GuestFilesystem | None]"]


@dataclass(frozen=True)
class Volume:
    #: the partition number, or None for a disk without a partition table
    number: int | None
    offset: int
    size: int
    partition: Partition | None
    probe: Probe


def _local(read: ReadAt) -> Prober:
    return lambda offset, size: probe(read, offset, size)


def disk_volumes(
    read: ReadAt, size: int, *, prober: Prober | None = None
) -> tuple[PartitionTable, list[tuple[Volume, GuestFilesystem | None]]]:
    """The disk's partition table and, for each partition (or the whole disk without a table),
    what it holds and its filesystem when vmvault can read it. ``prober`` opens filesystems
    (default: in this process). A partition starting where an earlier one starts is not opened
    again (status ``duplicate``)."""
    prober = prober or _local(read)
    table = read_partition_table(read, size)
    out: list[tuple[Volume, GuestFilesystem | None]] = []
    if table.scheme == "none":
        found, fs = prober(0, size)
        out.append((Volume(None, 0, size, None, found), fs))
        return table, out
    starts: dict[int, int] = {}
    for p in table.partitions:
        first = starts.setdefault(p.offset, p.number)
        if first != p.number:
            # entries may overlap: a thousand starting where one filesystem starts would have it
            # opened and searched a thousand times; it is read as the first (by number, on request)
            found = Probe("", "duplicate", f"starts where partition {first} starts; read as partition {first}")
            out.append((Volume(p.number, p.offset, p.size, p, found), None))
            continue
        found, fs = prober(p.offset, p.size)
        out.append((Volume(p.number, p.offset, p.size, p, found), fs))
    return table, out


def open_volume(
    read: ReadAt, size: int, part: int | None, *, prober: Prober | None = None
) -> tuple[Volume, GuestFilesystem]:
    """The filesystem of partition ``part`` (1-based), or of the whole disk when ``part`` is None
    and the disk has no partition table."""
    prober = prober or _local(read)
    table = read_partition_table(read, size)
    if part is None:
        if table.scheme != "none":
            numbers = ", ".join(str(p.number) for p in table.partitions) or "none"
            raise GuestError(
                f"the disk has a {table.scheme.upper()} partition table: name a partition as DISK:PART:/PATH "
                f"(partitions: {numbers})"
            )
        volume = Volume(None, 0, size, None, Probe("", "none"))
    else:
        if table.scheme == "none":
            raise GuestError(f"the disk has no partition table, so no partition {part}: leave the number out")
        p = table.partition(part)
        volume = Volume(p.number, p.offset, p.size, p, Probe("", "none"))
    found, fs = prober(volume.offset, volume.size)
    volume = Volume(volume.number, volume.offset, volume.size, volume.partition, found)
    if fs is None:
        raise GuestError(found.note, partition=part)
    return volume, fs

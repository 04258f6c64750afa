"""The storage interface under a repository: a flat namespace of immutable objects.

Names are ``/``-separated relative paths such as ``data/3f/3fa4...`` or ``snapshots/9c1e...``.
Every backend implements the same five operations with the same guarantees, checked by one
contract test suite (``tests/backends/contract.py``):

* ``put`` is atomic: a reader sees the whole object or nothing, also after a crash.
  Writing a name that exists replaces it whole (the repository only does so for
  identical content, except for lock files).
* ``get`` returns exactly the stored bytes (or a range of them) or raises ObjectNotFoundError.
* ``list`` yields every object under a prefix (recursively), with its size (and a stamp
  of its version where the listing gives one, ``ObjectInfo.stamp``).
* ``delete`` of a missing object is not an error.

Backends translate their own failures into ``BackendError`` subclasses: ENOSPC into
``StorageFullError``, EACCES into ``BackendPermissionError``, a dropped connection (after
retries) into ``BackendConnectionError``.

Backends on a file system (local, SFTP) never follow a symbolic link inside the repository
(repository-format.md, section 10.3): ``list`` skips links, FIFOs, devices and sockets with
a warning, and every other operation refuses them with ``UnsafeStorageError``. A repository
whose top-level folders (``TOP_LEVEL_FOLDERS``) are links is refused whole, unless its
location says ``follow-links=1``. A backend lists what is there; which names are objects
is the repository's business (``vmvault.repo.names``).
"""

from __future__ import annotations

import logging
import math
import mmap
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar

from vmvault.errors import BackendError, ObjectNotFoundError

__all__ = [
    "DEFAULT_READS_AT_ONCE",
    "FAR_READS_AT_ONCE",
    "FAR_ROUND_TRIP",
    "MAX_LISTING",
    "MIN_RATE",
    "TOP_LEVEL_FOLDERS",
    "Backend",
    "HiddenObject",
    "ObjectInfo",
    "RequestStats",
    "describe_mode",
    "is_far",
    "note_skipped",
    "root_gone",
    "shown",
    "split_name",
    "unsafe_why",
]

_log = logging.getLogger("vmvault.backends")

#: the most entries one listing may hold: a repository's largest folder (one of the 256 pack
#: folders) holds ~26 thousand packs at 100 TiB; a server sending names without end would
#: otherwise fill memory
MAX_LISTING = 1 << 22
#: bytes a second below which a remote backend gives up an answer that has begun to arrive
#: (after its timeout), then retries it: a server sending a byte now and then would otherwise
#: hold a read for ever, each wait within the timeout. Low enough for a slow link shared by
#: every read at once (``FAR_READS_AT_ONCE``, 8 of them at 4 KiB/s: 256 kbit/s in all)
MIN_RATE = 4 * 1024

#: what a read returned: counted and handed on as it is (bytes, or a view into a buffer)
_Read = TypeVar("_Read", bound=bytes | memoryview)

#: the folders at a repository's top (repository-format.md, section 2): the only links a
#: file-system backend follows, and only when its location says ``follow-links=1``
TOP_LEVEL_FOLDERS = frozenset({"data", "index", "snapshots", "locks", "keys", "status"})

#: ranged reads at once of a long run of reads (``Backend.prepare_reads``) from storage near at
#: hand: a local disk, or a server on the same network
DEFAULT_READS_AT_ONCE = 4
#: ... and from a server far away (``is_far``): each read waits a round trip before its bytes
#: come, and an SSH connection carries at most its 2 MiB window per round trip
FAR_READS_AT_ONCE = 8
#: a server whose quickest answer so far took this long is far. Below it, four SSH windows of
#: 2 MiB a round trip still carry 800 MB/s (a calculation), more than a restore takes in on two
#: cores (about 450 MiB/s of packs read locally), and a LAN answers in well under 1 ms; moto on
#: loopback answers in about 2 ms, but on a busy CI machine the quickest of 300 answers once took
#: 5.3 ms, so the line is not drawn closer than 10 ms. Measured:
#: 30 ms away eight restored the 1 GiB test image in 2.8-2.9 s against 4.2 s from SFTP, in 1.6
#: s against 2.0 s from S3; over loopback eight were slower (more processes and threads sharing
#: the CPU): SFTP 1.5-1.7 s against 1.2-1.5 s (docs/storage.md, "A server far away")
FAR_ROUND_TRIP = 0.010


def is_far(quickest_reply: float) -> bool:
    """Whether a server whose quickest answer so far took ``quickest_reply`` seconds (``inf``:
    none yet, so not known to be far) is far away."""
    return FAR_ROUND_TRIP <= quickest_reply < math.inf


def shown(name: str) -> str:
    """A name read from the storage, safe in a message: control characters, anything not
    ASCII and bytes that were not UTF-8 are escaped (it may have been made to rewrite the
    terminal)."""
    return ascii(name)[1:-1]


def split_name(name: str) -> list[str]:
    """The folders and leaf of object name ``name``; ValueError unless every part is a plain
    name (no empty part, ``.``, ``..`` or NUL) and it is no temporary name (``.tmp-``)."""
    parts = name.split("/")
    if "\0" in name or ".tmp-" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad object name {name!r}")
    return parts


def note_skipped(skipped: dict[str, str], url: str, name: str, why: str) -> None:
    """Record an entry a listing skipped (a link, a FIFO, a name that is not UTF-8, ...) in a
    backend's ``skipped`` record, warning once per entry."""
    key = shown(name)
    if key not in skipped:
        skipped[key] = why
        _log.warning("%s: skipped %s: %s", url, key, why)


def root_gone(url: str) -> BackendError:
    """The error of a file-system backend whose repository folder, found by an earlier operation
    of the same command, is gone or another folder now: its disk unmounted (the path now leads to
    the empty mount point, or nowhere), or the folder removed or replaced while the command ran.
    Nothing is made there, written there or read from there: a backup carried on into a folder
    it made afresh would end "complete" in no repository, on the disk the repository was kept off,
    hidden once the disk is mounted again."""
    return BackendError(
        f"{url}: the repository folder is gone, or is another folder than the one this command opened "
        "(was its disk unmounted, or the folder removed or replaced, while the command ran?); nothing more "
        "is written there or read from there. Mount the disk again (or put the folder back) and run the "
        "command again."
    )


def unsafe_why(kind: str) -> str:
    """Why an entry of ``kind`` (``describe_mode``) is skipped."""
    return f"{kind}, never followed or opened (a repository holds only files and folders: was it planted?)"


def describe_mode(mode: int) -> str:
    """What a file-system entry that is not an object is: "a symbolic link", "a FIFO", ..."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int
    #: what the listing says of this version of the object at no extra cost, "" when nothing:
    #: the ETag (S3), modification and change times and inode (a local folder), the
    #: modification time (SFTP, in seconds). The object written again, it changes (SFTP: at a
    #: later second); damage below the storage's interface (bit rot) leaves it as it was.
    #: Not compared: two listings of one object differ only in it when it was rewritten.
    stamp: str = field(default="", compare=False)
    #: when the object was written (seconds since the epoch), where the listing says so at no
    #: extra cost (S3's LastModified); None elsewhere (``Backend.modified`` asks)
    modified: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class HiddenObject:
    """An object a delete hid and the storage still keeps (a versioned bucket): its newest
    kept version lies under one or more delete markers."""

    name: str
    #: the newest version that is not a delete marker
    version: str
    #: when that version was written (seconds since the epoch)
    written: float
    #: the delete markers above it, newest first
    markers: tuple[str, ...]


class RequestStats:
    """Operations a backend was asked for, by kind, with the bytes they moved. Thread-safe.

    One count is one call of an operation (``get``, ``put``, ``list``, ``exists``/``modified``
    as ``stat``, ``delete``), whatever the protocol makes of it (an SFTP read is a stat, an open
    and pipelined read requests; a retried call is counted once more under ``retries``). The
    benchmarks and tests read it to see how many round trips a restore costs.
    """

    KINDS = ("get", "put", "list", "stat", "delete")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = dict.fromkeys(self.KINDS, 0)
        self.bytes_read = 0
        self.bytes_written = 0
        self.retries = 0

    def count(self, kind: str, *, written: int = 0) -> None:
        """One call of ``kind`` (one of ``KINDS``), writing ``written`` bytes."""
        with self._lock:
            self.counts[kind] += 1
            self.bytes_written += written

    def read(self, data: _Read) -> _Read:
        """Count ``data`` as read, and return it."""
        self.read_bytes(len(data))
        return data

    def read_bytes(self, nbytes: int) -> None:
        """Count ``nbytes`` as read."""
        with self._lock:
            self.bytes_read += nbytes

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    @property
    def gets(self) -> int:
        return self.counts["get"]

    def reset(self) -> None:
        with self._lock:
            self.counts = dict.fromkeys(self.KINDS, 0)
            self.bytes_read = self.bytes_written = self.retries = 0

    def to_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                **self.counts,
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "retries": self.retries,
            }


_stats_lock = threading.Lock()


class Backend(ABC):
    """One kind of storage. Besides the five operations, a backend declares what it can do
    (its capabilities, with the defaults of a storage that can do none of it), so callers
    never probe for attributes by name; the contract suite checks each against the storage:

    * ``enforces_immutability``: the storage itself refuses deletes of locked objects (S3
      Object Lock); False when only the client declines;
    * ``retention_days``: the retention every new data, index and snapshot object gets from
      the storage, when the location asks for it (``s3://...?immutable-days=N``);
    * ``use_retention(days)``: ask the storage to enforce the repository's retention from now
      on; False (the default) when it cannot, and then nothing changes;
    * ``modified(name)``: when an object was written, when the storage can say (None: unknown);
    * ``retention_of(name)``, ``retain(name, until)``: the storage's own retention of one
      object, read and extended (Object Lock: ``vmvault check`` and ``repair locks``);
    * ``skipped()``: entries a listing met that cannot be objects (file-system backends);
    * ``warm_up()``: open, in the background, the connections a transfer is about to use;
    * ``names_per_read``: what listing a folder costs, against one small read;
    * ``local_reads``: a read costs no round trip, so runs of reads may be split up.
    """

    #: a URL-ish description for messages (never contains secrets)
    url: str = "?"

    #: True when the storage itself refuses deletes of locked objects (S3 Object Lock);
    #: False when only the client declines.
    enforces_immutability: bool = False

    #: days of retention the storage gives every new data, index and snapshot object (the
    #: location's own ``immutable-days=N``, or what ``use_retention`` set); None: none
    retention_days: int | None = None

    #: how many names a listing of a folder returns for the cost of one small read (a pack's
    #: presence confirmed with a one-byte read, repository-format.md section 12.4): 1,000 by
    #: default, one page of an S3 listing (ListObjectsV2); a backend whose listing costs more
    #: per name says so
    names_per_read: int = 1000

    #: True when a ranged read costs no round trip and no server's work (a local file system,
    #: memory): a reader may split a run of reads into a few smaller ones read and decoded at
    #: once. Against moto over loopback, such splitting (3 times the requests) was slower:
    #: 1 GiB read through a disk reader in 5.4-5.7 s against 3.7-3.9 s (docs/benchmarks.md)
    local_reads: bool = False

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` atomically and durably."""

    def put_parts(self, name: str, parts: Sequence[bytes]) -> None:
        """``put`` of the concatenation of ``parts`` (a pack's sealed blobs): a backend that
        can write them one after another without joining them first overrides this."""
        self.put(name, b"".join(parts))

    @abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` bytes from ``offset`` (short only at the end)."""

    def get_into(self, name: str, offset: int, length: int, buffer: mmap.mmap) -> memoryview:
        """What ``get(name, offset, length)`` returns, read into ``buffer`` where the backend can
        (the view is then into ``buffer``: valid until ``buffer`` is next used). ``buffer`` is
        page-aligned and at least ``length + 2 * platform.DIRECT_ALIGN`` bytes long, so a backend
        may read whole aligned blocks around the range past the page cache. The default is
        ``get``'s bytes."""
        return memoryview(self.get(name, offset, length))

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (a directory such as ``"keys/"``)."""

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @property
    def requests(self) -> RequestStats:
        """What this backend object was asked to do so far (``RequestStats``)."""
        stats = self.__dict__.get("_requests")
        if not isinstance(stats, RequestStats):
            with _stats_lock:
                stats = self.__dict__.setdefault("_requests", RequestStats())
            assert isinstance(stats, RequestStats)
        return stats

    def use_retention(self, days: int) -> bool:
        """Have the storage keep every data, index and snapshot object written from now on for
        ``days`` days (the repository's ``immutable_days``). True when the storage enforces it
        (then ``enforces_immutability`` and ``retention_days`` say so); False when it cannot,
        and nothing changes: retention is then only advisory (the client declines deletes)."""
        return False

    def skipped(self) -> dict[str, str]:
        """Entries this backend's listings met and skipped because they cannot be objects (a
        file-system backend's links, FIFOs, devices, sockets, names that are not UTF-8): the
        name, escaped, and why. ``check`` reports them."""
        return {}

    def modified(self, name: str) -> float | None:
        """When ``name`` was last written (seconds since the epoch), None when unknown.

        Used to tell whether an object is still under the repository's retention period
        (``immutable_days``); unknown counts as still retained."""
        return None

    def retention_of(self, name: str, version: str | None = None) -> float | None:
        """When the storage's own retention of ``name`` (its current version, or ``version``)
        ends (seconds since the epoch): until then it refuses to delete or overwrite that
        version, whoever asks. None when it keeps none of it (every storage that enforces
        nothing). ObjectNotFoundError when there is no such object."""
        if not self.exists(name):
            raise ObjectNotFoundError(f"{self.url}: no object {name}", name=name)
        return None

    def retain(self, name: str, until: float) -> bool:
        """Have the storage keep ``name`` (its current version) until ``until`` (seconds since
        the epoch) whoever asks to delete it: True when it does from now on (``retention_of``
        then says at least ``until``), False when this storage cannot, and nothing changed."""
        return False

    def hidden(self, prefix: str) -> Iterator[HiddenObject]:
        """Every object under ``prefix`` that a delete hid while the storage kept it (a
        versioned bucket's delete markers). None on storage that keeps nothing deleted."""
        return iter(())

    def unhide(self, hidden: HiddenObject) -> bool:
        """Bring ``hidden`` back: remove the delete markers above its kept version. True when
        done, False when this storage cannot (nothing changed)."""
        return False

    def free_space(self) -> int | None:
        """Bytes the storage can still take, None when it does not say (object stores, SFTP
        servers without the statvfs extension). Dashboards estimate when it fills up."""
        return None

    def warm_up(self) -> None:  # noqa: B027 - optional hook
        """A transfer (a backup, a restore, a copy) is about to run from several threads: a
        backend whose connections are slow to open (SFTP: an SSH handshake each, a quarter of
        a second on loopback and several round trips over a network) opens the ones it would
        open then now, in the background, while the caller unlocks the repository. Returns at
        once and raises nothing: a connection that fails to open here is opened again, and its
        failure reported, by the first transfer that needs it. The default does nothing."""

    def prepare_reads(self) -> int:
        """How many ranged reads at once serve a long run of reads from this storage best (a
        restore's): enough to keep the storage and the link busy, few enough not to crowd the
        CPU the reads' decryption needs. A backend whose connections are opened ahead may open
        more for them here. The default is 4."""
        return DEFAULT_READS_AT_ONCE

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""Writing a new image's data past the page cache: ``O_DIRECT``, in order, from a thread of its own.

A restore writes gigabytes it does not read again. Through the page cache every page written
must first be found free, then be copied into and later written back; on the development
machines (virtual, their freed memory handed back to the host) that was most of a restore's
CPU: ``perf`` found 41 % of a 4 GiB restore's samples in the kernel's copy into the page cache
(``copy_folio_from_iter_atomic``), and 2.5 GiB written 256 KiB a call, then fsynced, took 7.5
and 21 s with 6.5 and 19 s of system time, against 1.0 and 1.1 s with 0.1-0.2 s written 4 MiB a
call with ``O_DIRECT`` (two runs each, cold cache).

:class:`DirectWrites` takes a writer's ``write(offset, data)`` calls. Writes that continue one
another are gathered into a page-aligned buffer of :data:`STAGE_BYTES` (an anonymous ``mmap``);
a full buffer, or one the next write does not continue, goes to a thread of its own. It writes
the buffer's whole :data:`~vmvault.platform.DIRECT_ALIGN` blocks with ``O_DIRECT`` and a tail
after the last whole block through the page cache (the descriptor's ``O_DIRECT`` switched off for
that write). A write that starts off a block boundary has its head, up to the next boundary,
written through the page cache too. Every write, of either kind, leaves that one thread in the
order it was given, so a write through the cache that shares a block with a direct one never
races it. With :data:`BUFFERS` buffers the caller fills one while the thread writes another and
waits when all are taken: the memory is ``BUFFERS × STAGE_BYTES`` whatever the disk's size.

A file system that refuses ``O_DIRECT`` (:meth:`DirectWrites.open` returns None and the caller
writes as before) or refuses a direct write (``EINVAL``) is written through the page cache from
then on: slower, never wrong. Any other failure stops the writing; :meth:`~DirectWrites.write`,
:meth:`~DirectWrites.drain` and :meth:`~DirectWrites.close` raise it from then on (the
``TargetError`` of ``write_error``, with the offset that failed).

Durability stays the caller's fsync: ``O_DIRECT`` passes the page cache, not the device's own
write cache, nor the file's metadata (its allocated blocks).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import queue
import threading
from collections.abc import Iterator
from typing import Final

from vmvault import platform
from vmvault.disk.base import fsync_file, write_at, write_error
from vmvault.errors import TargetError

__all__ = ["BUFFERS", "STAGE_BYTES", "DirectWrites", "drain_and_fsync", "write_or_queue"]

#: the bytes gathered into one direct write, at most
STAGE_BYTES: Final[int] = 8 << 20
#: buffers of STAGE_BYTES: one being filled, the others being written
BUFFERS: Final[int] = 3

_ALIGN: Final[int] = platform.DIRECT_ALIGN

#: a write for the thread: the bytes (a staged buffer, or a head's own copy), how many of them,
#: the file offset, and whether the bytes are a buffer to give back afterwards
_Op = tuple[mmap.mmap | bytes, int, int, bool]


class DirectWrites:
    """The writes of one new file, past the page cache where they can be (module docstring).

    Not thread-safe: one caller writes (as ``DiskWriter.write`` is called)."""

    def __init__(self, fd: int, path: str) -> None:
        """Use :meth:`open`, which switches ``fd`` to ``O_DIRECT`` first."""
        self._fd = fd
        self._path = path
        #: whether the thread still writes whole blocks directly (it alone changes it)
        self._direct = True
        self._error: TargetError | None = None
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._buffers: list[mmap.mmap] = []
        self._work: queue.SimpleQueue[_Op | threading.Event | None] = queue.SimpleQueue()
        self._stage: mmap.mmap | None = None
        self._stage_offset = 0
        self._stage_len = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vmvault-direct-write", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, fd: int, path: str) -> DirectWrites | None:
        """Writes to ``fd`` (a new file; ``path`` names it in errors) past the page cache, or
        None where the system or the file system does not take ``O_DIRECT``."""
        if not platform.set_direct(fd, True):
            return None
        return cls(fd, path)

    @property
    def direct(self) -> bool:
        """Whether whole blocks still go past the page cache (False after a refused write)."""
        return self._direct

    # ---------------------------------------------------------------------------- the caller

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` to be written at ``offset``; a failure of an earlier write is raised."""
        if self._closed:
            raise ValueError(f"{self._path} is closed")
        self._check()
        view = memoryview(data).cast("B")
        while len(view):
            if self._stage is not None and offset != self._stage_offset + self._stage_len:
                self._submit()
            if self._stage is None:
                head = -offset % _ALIGN
                if head:  # up to the next block boundary: through the page cache
                    take = min(head, len(view))
                    self._work.put((bytes(view[:take]), take, offset, False))
                    view, offset = view[take:], offset + take
                    continue
                self._stage, self._stage_offset, self._stage_len = self._buffer(), offset, 0
            take = min(len(view), STAGE_BYTES - self._stage_len)
            self._stage[self._stage_len : self._stage_len + take] = view[:take]
            self._stage_len += take
            view, offset = view[take:], offset + take
            if self._stage_len == STAGE_BYTES:
                self._submit()

    def drain(self) -> None:
        """Wait until everything queued is written; raise the first failure."""
        if self._closed:  # the thread is gone; everything was written (or failed) at close
            self._check()
            return
        self._submit()
        done = threading.Event()
        self._work.put(done)
        done.wait()
        self._check()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Everything queued written, and the descriptor through the page cache, for the length
        of the block: a read of the file (which ``O_DIRECT`` would refuse from a buffer of
        Python's) then sees every write made before it. From the writing thread."""
        self.drain()
        if self._direct:
            platform.set_direct(self._fd, False)
        try:
            yield
        finally:
            if self._direct and not platform.set_direct(self._fd, True):
                self._direct = False

    def close(self) -> None:
        """Write what is queued (raising the first failure), stop the thread, free the buffers
        and switch the descriptor back to the page cache. The caller fsyncs and closes it."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._closed = True
            self._work.put(None)
            self._thread.join()
            for buffer in self._buffers:
                buffer.close()
            self._buffers.clear()
            if self._direct:
                platform.set_direct(self._fd, False)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _buffer(self) -> mmap.mmap:
        """A free buffer: a new one while fewer than BUFFERS exist, else the next given back."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if len(self._buffers) < BUFFERS:
            buffer = mmap.mmap(-1, STAGE_BYTES)  # page-aligned, as O_DIRECT wants
            self._buffers.append(buffer)
            return buffer
        return self._free.get()

    def _submit(self) -> None:
        if self._stage is not None:
            self._work.put((self._stage, self._stage_len, self._stage_offset, True))
            self._stage = None

    # ---------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            op = self._work.get()
            if op is None:
                return
            if isinstance(op, threading.Event):
                op.set()
                continue
            data, length, offset, recycle = op
            if self._error is None:  # after a failure nothing more is written
                try:
                    with memoryview(data) as view:
                        self._write(view[:length], offset)
                except Exception as exc:  # never a thread that dies and leaves the caller waiting
                    self._error = TargetError(f"write failed at offset {offset:#x}: {exc}", path=self._path)
            if recycle:
                assert isinstance(data, mmap.mmap)
                self._free.put(data)

    def _write(self, view: memoryview, offset: int) -> None:
        """Write ``view`` at ``offset``: its whole blocks directly, the rest through the cache."""
        pos = offset
        try:
            whole = len(view) - len(view) % _ALIGN if self._direct and not pos % _ALIGN else 0
            if whole:
                done = self._write_direct(view[:whole], pos)
                view, pos = view[done:], pos + done
            if len(view):
                self._write_cached(view, pos)
        except OSError as exc:  # of a direct write
            self._error = write_error(exc, self._path, "write failed", pos)
        except TargetError as exc:  # of a write through the cache, naming its offset
            self._error = exc

    def _write_direct(self, view: memoryview, offset: int) -> int:
        """Write ``view`` (whole blocks, at a block boundary) with ``O_DIRECT``; the bytes it
        wrote so. A refusal (``EINVAL``) turns direct writing off for good; a short write off a
        block boundary leaves the rest to the page cache."""
        done = 0
        while done < len(view):
            try:
                n = platform.pwrite(self._fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False
                platform.set_direct(self._fd, False)
                return done
            if n <= 0:
                raise OSError(errno.EIO, "the file system wrote nothing")
            done += n
            if n % _ALIGN:
                break
        return done

    def _write_cached(self, view: memoryview, offset: int) -> int:
        """Write ``view`` through the page cache; returns the offset after it."""
        if self._direct:
            platform.set_direct(self._fd, False)
        try:
            offset = write_at(self._fd, view, offset, self._path)
        finally:
            if self._direct and not platform.set_direct(self._fd, True):
                self._direct = False
        return offset


def write_or_queue(
    queue: DirectWrites | None, fd: int, data: bytes | bytearray | memoryview, offset: int, path: str
) -> None:
    """A writer's write of ``data`` at ``offset``: queued in order in ``queue`` for a writer
    going past the page cache, else written now (``write_at``)."""
    if queue is not None:
        queue.write(offset, data)
    else:
        write_at(fd, data, offset, path)


def drain_and_fsync(queue: DirectWrites | None, fd: int, path: str) -> None:
    """A writer's fsync: what ``queue`` holds is written first (``drain``), so the order of
    writes and fsyncs a format's crash safety rests on holds past the cache too."""
    if queue is not None:
        queue.drain()
    fsync_file(fd, path)

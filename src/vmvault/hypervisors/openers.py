"""Openers for ``SourceFile.open``: how every connector hands the engine a file to store.

One place for all connectors (folders, Hyper-V, and the ones to come):

* :func:`checked_opener` for a file on a file system that someone else writes: opened without
  following a link and without blocking, and only if it is still the file the scan saw
  (device and inode); changes at the open or during the read become warnings.
* :func:`bytes_opener` for content the connector already holds in memory.

The engine ``fstat()``s what it stores, so both give real files, never a ``BytesIO``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from typing import IO

from vmvault.disk import ParentRule, open_checked
from vmvault.errors import SourceError

__all__ = ["bytes_opener", "checked_opener"]


class _CheckedReader(io.BufferedReader):
    """A file being stored; on close, reports a change made while it was read."""

    def __init__(self, fd: int, on_close: Callable[[os.stat_result], None]) -> None:
        super().__init__(io.FileIO(fd, "rb", closefd=True))
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self._on_close(os.fstat(self.fileno()))
        super().close()


def checked_opener(
    path: str, name: str, scanned: os.stat_result, warnings: list[str], *, inside: ParentRule | None = None
) -> Callable[[], IO[bytes] | None]:
    """An opener for ``SourceFile.open``: the file a scan saw at ``path``, or None (and a warning).

    The file is opened without following a link and without blocking, and must still be the
    scanned file (device and inode) and, with ``inside``, lie in the rule's folders by the real
    path of the open file; a replaced or vanished file is not stored. A size or modification
    time different from the scan's, at the open or after the read, is reported.
    """

    def changed(st: os.stat_result) -> bool:
        return (st.st_size, st.st_mtime_ns) != (scanned.st_size, scanned.st_mtime_ns)

    def opener() -> IO[bytes] | None:
        try:
            fd, st = open_checked(
                path,
                block_devices=False,
                nofollow=True,
                expect=(scanned.st_dev, scanned.st_ino),
                inside=inside,
                what="a regular file",
            )
        except SourceError as exc:
            warnings.append(f"{name}: not backed up: it changed after the folder was scanned ({exc})")
            return None
        at_open = changed(st)
        if at_open:
            warnings.append(f"{name}: changed between the folder scan and its read (size or time); stored as read")

        def on_close(after: os.stat_result) -> None:
            if not at_open and (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                warnings.append(f"{name}: changed while it was read; the stored copy may mix old and new content")

        return _CheckedReader(fd, on_close)

    return opener


def bytes_opener(data: bytes) -> Callable[[], IO[bytes]]:
    """An opener for ``SourceFile.open`` of bytes a connector already holds (a configuration
    fetched from a host): each call gives a fresh anonymous file with them."""

    def opener() -> IO[bytes]:
        # the engine fstat()s what it stores: an anonymous file, not a BytesIO
        f = tempfile.TemporaryFile()  # noqa: SIM115 - returned open to the caller
        f.write(data)
        f.seek(0)
        return f

    return opener

"""A directory on a local (or mounted) file system.

Atomic put: write to a unique temporary file in the target directory, fsync it, rename it
over the name, fsync the directory. A crash leaves either the old state or the new object,
plus at worst a ``*.tmp-*`` file that ``list`` ignores and ``cleanup_temporary`` removes.

Links (repository-format.md, section 10.3). Whoever can write the repository's directory
can plant symbolic links in it; ``locks -> /some/folder`` once made ``forget`` delete every
file under that folder. So no operation follows a link inside the repository: every name is
resolved one component at a time from a descriptor of the root, each folder opened with
``O_DIRECTORY | O_NOFOLLOW`` relative to its parent's descriptor and the object itself with
``O_NOFOLLOW`` (and ``O_NONBLOCK``, so that a FIFO cannot hang a read). Folders are created
with ``mkdir`` relative to a descriptor and then opened the same way, and listed with
``scandir`` on a descriptor, where an entry's type is that of the entry itself.

* The root path the user gave is resolved as the system resolves any path: it may be a link
  the user chose (``/backup -> /mnt/disk``), and it lies outside what the storage's writer
  controls. It is opened again for each operation, so a long-running process pins no mount;
  the folder it leads to must be the one the backend first found there (device and inode), and
  once found it is never made again: a disk unmounted under a running backup leaves the path
  leading to the empty mount point (or nowhere), and writing on would store the backup on
  another disk, in no repository (``root_gone``).
* The top-level folders ``data``, ``index``, ``snapshots``, ``locks`` and ``keys`` may be links
  only when the location says so: ``file:///path?follow-links=1`` (``LocalBackend(root,
  follow_links=True)``), for an administrator who put, say, ``data`` on another disk.
  Otherwise a repository with such a link is refused whole, whatever the operation.
* Every other link (a deeper folder, an object, ``config``), and every FIFO, device or socket,
  is never followed nor opened: ``list`` skips it with a warning, every other operation
  refuses it with ``UnsafeStorageError``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from urllib.parse import parse_qs

from vmvault import platform
from vmvault.backends.base import (
    TOP_LEVEL_FOLDERS,
    Backend,
    ObjectInfo,
    describe_mode,
    note_skipped,
    root_gone,
    shown,
    split_name,
    unsafe_why,
)
from vmvault.errors import (
    BackendError,
    BackendPermissionError,
    ConfigError,
    ObjectNotFoundError,
    StorageFullError,
    UnsafeStorageError,
)

__all__ = ["LocalBackend", "open_local"]

_TMP_MARK = ".tmp-"
#: the temporary names ``put`` makes: the object's name, the mark, 6 random bytes in hex
_TMP_NAME = re.compile(r".+\.tmp-[0-9a-f]{12}")
#: vmvault writes three levels (data/xx/id); deeper trees are someone else's and are not walked
#: past this depth, so a planted tree cannot exhaust the stack or the descriptors
_MAX_DEPTH = 32

_DIR_FLAGS = os.O_RDONLY | platform.O_DIRECTORY | platform.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | platform.O_NOFOLLOW | platform.O_NONBLOCK | platform.O_NOCTTY | platform.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | platform.O_NOFOLLOW | platform.O_CLOEXEC


class LocalBackend(Backend):
    #: a one-byte read (open, read, close through the folder descriptors) took 52-60 µs here,
    #: a name of a listing (with its lstat) 4.3-4.8 µs
    names_per_read = 12
    local_reads = True

    def __init__(self, root: str, *, follow_links: bool = False) -> None:
        if platform.WINDOWS:
            raise BackendError(
                f"{root}: a repository in a local folder {platform.NO_FOLDER_DESCRIPTORS}; use sftp:// or s3://"
            )
        self.root = os.path.abspath(root)
        #: follow links that replace the top-level folders (nothing deeper, ever)
        self.follow_links = follow_links
        self.url = self.root
        self._layout_checked = False
        self._skipped: dict[str, str] = {}
        #: the device and inode of the root folder, once an operation found it
        self._root_id: tuple[int, int] | None = None

    def skipped(self) -> dict[str, str]:
        return dict(self._skipped)

    def _skip(self, rel: str, why: str) -> None:
        note_skipped(self._skipped, self.url, rel, why)

    # --- names and errors -------------------------------------------------------------

    @staticmethod
    def _folder_parts(rel: str) -> list[str]:
        parts = rel.split("/") if rel else []
        if "\0" in rel or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad prefix {rel!r}")
        return parts

    def _error(self, exc: OSError, action: str, name: str) -> BackendError:
        text = f"{self.url}: cannot {action} {shown(name)}: {exc.strerror or exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFullError(f"{self.url}: the repository's disk is full (writing {name})", name=name)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return BackendPermissionError(text, name=name)
        if action != "write" and exc.errno in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
            # names are flat: the "directory" data/ab of data/ab/x is no object
            return ObjectNotFoundError(f"{self.url}: no object {shown(name)}", name=name)
        return BackendError(text, name=name)

    def _unsafe(self, rel: str, mode: int) -> UnsafeStorageError:
        what = describe_mode(mode)
        if "/" not in rel and rel in TOP_LEVEL_FOLDERS and stat.S_ISLNK(mode):
            return UnsafeStorageError(
                f"{self.url}: the folder {rel} is a symbolic link. vmvault follows no link inside a "
                "repository (one planted there could make it read, write or delete files anywhere), so it "
                "refuses this repository. If you made the link yourself (a folder on another disk), give "
                f"the location as file://{self.root}?follow-links=1",
                name=rel,
                kind=what,
            )
        return UnsafeStorageError(
            f"{self.url}: {shown(rel)} is {what}, where the repository holds only files and folders; "
            "vmvault never follows or opens one (was it planted?). Remove it, or put the object it stands "
            "for in its place.",
            name=rel,
            kind=what,
        )

    def _refuse_if_unsafe(self, parent: int, component: str, rel: str) -> os.stat_result | None:
        """Raise UnsafeStorageError when ``component`` of folder ``parent`` is a link or a
        special file; its lstat otherwise (None when absent)."""
        try:
            st = os.stat(component, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise self._unsafe(rel, st.st_mode)
        return st

    # --- folders ----------------------------------------------------------------------

    def _open_root(self, *, create: bool) -> int | None:
        """A descriptor of the root folder; None when it does not exist and ``create`` is False."""
        known = self._root_id  # (before looking: another thread may make the root meanwhile)
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            if known is not None:
                raise root_gone(self.url) from None
            if not create:
                return None
            os.makedirs(self.root, exist_ok=True)  # the user's own path: links in it are theirs
            fd = os.open(self.root, _DIR_FLAGS)
        try:
            st = os.fstat(fd)
            if self._root_id is None:
                self._root_id = (st.st_dev, st.st_ino)
            elif (st.st_dev, st.st_ino) != self._root_id:
                raise root_gone(self.url)
            if not self._layout_checked:
                self._check_layout(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_layout(self, root: int) -> None:
        """Refuse a repository whose top-level folders are links (unless told to follow them)."""
        if not self.follow_links:
            for top in sorted(TOP_LEVEL_FOLDERS):
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(top, dir_fd=root, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise self._unsafe(top, st.st_mode)
        self._layout_checked = True

    def _open_dir(self, parent: int, component: str, rel: str, *, create: bool) -> int | None:
        """Open folder ``component`` of ``parent`` without following a link (but a top-level
        folder's link with ``follow_links``); None when it is absent and ``create`` is False."""
        flags = _DIR_FLAGS
        if not (self.follow_links and rel in TOP_LEVEL_FOLDERS):
            flags |= platform.O_NOFOLLOW
        try:
            return os.open(component, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
        except OSError:
            self._refuse_if_unsafe(parent, component, rel)
            raise
        with contextlib.suppress(FileExistsError):  # another writer may make it meanwhile
            os.mkdir(component, dir_fd=parent)
            os.fsync(parent)
        try:
            return os.open(component, flags, dir_fd=parent)
        except OSError:
            # replaced by a link between mkdir and open: refused like any other
            self._refuse_if_unsafe(parent, component, rel)
            raise

    @contextlib.contextmanager
    def _descend(self, parts: list[str], *, create: bool = False, listing: bool = False) -> Iterator[int | None]:
        """A descriptor of folder ``parts`` (``[]``: the root), reached from the root without
        following links; None when a folder on the way does not exist (and ``create`` is
        False). ``listing``: a file on the way, or a link below the top level (skipped with a
        warning), also gives None instead of an error."""
        fd = self._open_root(create=create)
        try:
            for depth in range(len(parts)):
                if fd is None:
                    break
                here = "/".join(parts[: depth + 1])
                try:
                    sub = self._open_dir(fd, parts[depth], here, create=create)
                except NotADirectoryError:
                    if not listing:
                        raise
                    sub = None
                except UnsafeStorageError as exc:
                    if not listing or here in TOP_LEVEL_FOLDERS:
                        raise
                    self._skip(here, unsafe_why(exc.kind))
                    sub = None
                os.close(fd)
                fd = sub
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    # --- the Backend interface ----------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        self.put_parts(name, (data,))

    def put_parts(self, name: str, parts: Sequence[bytes]) -> None:
        self.requests.count("put", written=sum(len(part) for part in parts))
        path = split_name(name)
        leaf = path[-1]
        tmp = f"{leaf}{_TMP_MARK}{secrets.token_hex(6)}"
        try:
            with self._descend(path[:-1], create=True) as parent:
                assert parent is not None
                fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=parent)
                try:
                    try:
                        _write_parts(fd, parts)
                        os.fsync(fd)
                        # written once, read back seldom: its pages go back to the kernel
                        platform.drop_cached(fd)
                    finally:
                        os.close(fd)
                    # rename would replace a link itself, not its target; still, a link where an
                    # object belongs was planted, and is reported rather than silently replaced
                    self._refuse_if_unsafe(parent, leaf, name)
                    os.rename(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=parent)
                    raise
                os.fsync(parent)
        except OSError as exc:
            raise self._error(exc, "write", name) from exc

    def _open_object(self, name: str) -> int:
        """A read descriptor of object ``name``, which is a regular file."""
        parts = split_name(name)
        try:
            with self._descend(parts[:-1]) as parent:
                if parent is None:
                    raise FileNotFoundError(errno.ENOENT, "no such object")
                try:
                    fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
                except OSError:
                    self._refuse_if_unsafe(parent, parts[-1], name)
                    raise
        except OSError as exc:
            raise self._error(exc, "read", name) from exc
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            os.close(fd)
            raise self._error(exc, "read", name) from exc
        if stat.S_ISREG(mode):
            return fd
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ObjectNotFoundError(f"{self.url}: no object {shown(name)}", name=name)
        raise self._unsafe(name, mode)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.requests.count("get")
        fd = self._open_object(name)
        try:
            # never more than the object holds: a bounded read of a small object (an index file
            # read with a limit of 1 GiB) must not allocate the limit
            size = os.fstat(fd).st_size
            remaining = max(0, size - offset) if length is None else min(length, max(0, size - offset))
            chunks = []
            pos = offset
            while remaining > 0:
                part = platform.pread(fd, remaining, pos)
                if not part:
                    break
                chunks.append(part)
                pos += len(part)
                remaining -= len(part)
            if name.startswith("data/"):
                # a pack's bytes are read once (a restore, check, copy, prune) and kept, where
                # needed, as plaintext by vmvault: their pages go back to the kernel, not push
                # the host's working set out of the page cache (and on the development
                # machines a 4 GiB restore took 0.4 s less system time, 8 pairs)
                platform.drop_cached(fd, offset, pos - offset)
            return self.requests.read(b"".join(chunks))
        except OSError as exc:
            raise self._error(exc, "read", name) from exc
        finally:
            os.close(fd)

    def get_into(self, name: str, offset: int, length: int, buffer: mmap.mmap) -> memoryview:
        """A pack's range read into ``buffer``, past the page cache where the file system takes
        ``O_DIRECT``: the whole 4 KiB blocks around it, so the kernel neither copies the bytes nor
        keeps them (a restore reads each pack once; 1.7 GiB of packs read 8 MiB at a time took
        0.09-0.12 s of system time so, against 0.47-0.48 s through the cache and freed, two runs
        each). Other objects, and ranges too large for ``buffer``, as ``get``."""
        align = platform.DIRECT_ALIGN
        if not name.startswith("data/") or length < 0 or len(buffer) < length + 2 * align:
            return super().get_into(name, offset, length, buffer)
        self.requests.count("get")
        fd = self._open_object(name)
        view = memoryview(buffer)
        try:
            start, got = offset, -1
            if platform.set_direct(fd, True):
                start = offset - offset % align
                end = -(-(offset + length) // align) * align
                try:
                    got = _fill(fd, view[: end - start], start, align)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    platform.set_direct(fd, False)  # taken, then refused: read through the cache
                    start = offset
            if got < 0:
                got = _fill(fd, view[:length], offset, 1)
                platform.drop_cached(fd, offset, got)  # read once: see ``get``
            head = offset - start
            out = view[head : head + max(0, min(length, got - head))]
            self.requests.read_bytes(len(out))
            return out
        except OSError as exc:
            raise self._error(exc, "read", name) from exc
        finally:
            os.close(fd)

    def _lstat(self, name: str, action: str) -> os.stat_result | None:
        """The object's own status (never a link's target); None when there is no object."""
        parts = split_name(name)
        try:
            with self._descend(parts[:-1]) as parent:
                if parent is None:
                    return None
                st = self._refuse_if_unsafe(parent, parts[-1], name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc, action, name) from exc
        return st if st is not None and stat.S_ISREG(st.st_mode) else None

    def exists(self, name: str) -> bool:
        self.requests.count("stat")
        return self._lstat(name, "look up") is not None

    def modified(self, name: str) -> float | None:
        self.requests.count("stat")
        st = self._lstat(name, "look up")
        return None if st is None else st.st_mtime

    def free_space(self) -> int | None:
        try:
            with self._descend([]) as fd:
                st = os.statvfs(fd) if fd is not None else None
        except OSError:
            return None
        return None if st is None else st.f_bavail * st.f_frsize

    def delete(self, name: str) -> None:
        self.requests.count("delete")
        parts = split_name(name)
        try:
            with self._descend(parts[:-1]) as parent:
                if parent is None:
                    return
                st = self._refuse_if_unsafe(parent, parts[-1], name)
                if st is None or stat.S_ISDIR(st.st_mode):
                    return  # nothing of that name (a directory is no object)
                os.unlink(parts[-1], dir_fd=parent)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            raise self._error(exc, "delete", name) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.requests.count("list")
        if prefix.startswith("/") or "\0" in prefix:
            raise ValueError(f"bad prefix {prefix!r}")
        start = prefix[: prefix.rfind("/")] if "/" in prefix else ""
        out: list[ObjectInfo] = []
        try:
            with self._descend(self._folder_parts(start), listing=True) as fd:
                if fd is not None:
                    for _dir, _name, rel, st in self._walk(fd, start, prefix, temporary=False):
                        out.append(ObjectInfo(rel, st.st_size, f"{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}"))
        except OSError as exc:
            raise self._error(exc, "list", prefix or "the repository") from exc
        yield from sorted(out, key=lambda o: o.name)

    def cleanup_temporary(self, older_than: float = 24 * 3600) -> int:
        """Remove temporary files that killed writers left behind, if older than
        ``older_than`` seconds (younger ones may belong to a write still running in another
        process); returns how many were removed. Only names ``put`` makes, only regular files."""
        cutoff = time.time() - older_than
        removed = 0
        try:
            with self._descend([]) as fd:
                if fd is None:
                    return 0
                for parent, leaf, _rel, st in self._walk(fd, "", "", temporary=True):
                    if st.st_mtime < cutoff:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(leaf, dir_fd=parent)
                            removed += 1
        except OSError as exc:
            raise self._error(exc, "remove temporary files in", "the repository") from exc
        return removed

    # --- walking ------------------------------------------------------------------------

    def _walk(
        self, fd: int, rel_dir: str, prefix: str, *, temporary: bool, depth: int = 0
    ) -> Iterator[tuple[int, str, str, os.stat_result]]:
        """(folder descriptor, name, relative name, lstat) of each regular file under folder
        ``fd`` whose relative name starts with ``prefix``: temporary files or objects. Links
        and special files are skipped with a warning, never followed."""
        folders: list[tuple[str, str]] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if not (rel.startswith(prefix) or prefix.startswith(rel + "/")):
                    continue
                try:
                    entry.name.encode()
                except UnicodeEncodeError:
                    self._skip(rel, "not UTF-8, so no name vmvault writes")
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                if stat.S_ISLNK(st.st_mode) and self.follow_links and rel in TOP_LEVEL_FOLDERS:
                    folders.append((entry.name, rel))
                elif stat.S_ISLNK(st.st_mode) and rel in TOP_LEVEL_FOLDERS:
                    raise self._unsafe(rel, st.st_mode)
                elif stat.S_ISDIR(st.st_mode):
                    folders.append((entry.name, rel))
                elif not stat.S_ISREG(st.st_mode):
                    self._skip(rel, unsafe_why(describe_mode(st.st_mode)))
                elif (_TMP_NAME.fullmatch(entry.name) if temporary else _TMP_MARK not in entry.name) and (
                    rel.startswith(prefix)
                ):
                    yield fd, entry.name, rel, st
        for name, rel in folders:
            if depth + 1 >= _MAX_DEPTH:
                self._skip(rel, "folders nested deeper than vmvault writes")
                continue
            try:
                sub = self._open_dir(fd, name, rel, create=False)
            except NotADirectoryError:
                continue  # a top-level link to a file, or replaced by a file meanwhile
            except UnsafeStorageError as exc:  # replaced by a link meanwhile
                if rel in TOP_LEVEL_FOLDERS:
                    raise
                self._skip(rel, unsafe_why(exc.kind))
                continue
            if sub is None:
                continue
            try:
                yield from self._walk(sub, rel, prefix, temporary=temporary, depth=depth + 1)
            finally:
                os.close(sub)


def open_local(location: str) -> LocalBackend:
    """``/path``, ``relative/path``, or ``file:///path[?follow-links=1]``.

    ``follow-links=1`` lets the top-level folders (data, index, snapshots, locks, keys) be
    symbolic links the administrator made; links anywhere deeper are never followed.
    A ``file://`` location takes options after ``?``; a path with ``?`` in it is given plainly.
    """
    if not location.startswith("file://"):
        return LocalBackend(location)
    path, _, query = location.removeprefix("file://").partition("?")
    if not path:
        raise ConfigError(f"{location!r}: a file:// location needs a path (file:///srv/backup)")
    options = parse_qs(query, keep_blank_values=True)
    unknown = set(options) - {"follow-links"}
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} in {location!r} (known: follow-links)")
    follow = options.get("follow-links", ["0"])[-1]
    if follow not in ("0", "1"):
        raise ConfigError(f"follow-links must be 1 or 0, not {follow!r}, in {location!r}")
    return LocalBackend(path, follow_links=follow == "1")


#: buffers given to one ``writev``, at most (POSIX allows IOV_MAX, 1024 on Linux, no fewer than 16)
_WRITEV_BUFFERS = 256


def _write_parts(fd: int, parts: Sequence[bytes]) -> None:
    """Write ``parts`` one after another, a few at a time with ``writev``, at most
    ``platform.WRITE_SLICE`` bytes and ``_WRITEV_BUFFERS`` parts a call (a 16 MiB pack in one
    call: 5-7 times the system time; a pack of small blobs has thousands of parts), never
    joining them first."""
    views = collections.deque(memoryview(part) for part in parts if len(part))
    while views:
        batch: list[memoryview] = []
        size = 0
        for view in views:
            if size == platform.WRITE_SLICE or len(batch) == _WRITEV_BUFFERS:
                break
            batch.append(view[: platform.WRITE_SLICE - size])
            size += len(batch[-1])
        written = os.writev(fd, batch)
        if written <= 0:
            raise OSError(errno.EIO, "the file system took none of the bytes written")
        while written >= len(views[0]):
            written -= len(views.popleft())
            if not views:
                return
        views[0] = views[0][written:]


def _fill(fd: int, view: memoryview, offset: int, align: int) -> int:
    """Read into ``view`` from ``offset`` until it is full or the file ends; the bytes read. A
    read that ends off an ``align`` boundary is the end of the file (past the page cache the next
    read could not start there)."""
    got = 0
    while got < len(view):
        n = platform.pread_into(fd, view[got:], offset + got)
        if n <= 0:
            break
        got += n
        if n % align:
            break
    return got

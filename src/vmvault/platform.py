"""The operating-system calls that differ between POSIX and Windows, in one place.

Everything else in vmvault calls these instead of the POSIX-only ``os``/``fcntl`` functions, so
that the core (disk formats, repository, engine) runs on a Hyper-V host too. On Linux every
function is the POSIX call itself, byte for byte; the fallbacks are what Windows gets:

==============================  ====================================  =====================================
what                            POSIX                                 fallback (Windows)
==============================  ====================================  =====================================
:func:`pread` / :func:`pwrite`  ``os.pread`` / ``os.pwrite``          ``lseek`` + ``read``/``write`` under a
                                                                      per-descriptor lock
:func:`pread_into`              ``os.preadv``                         :func:`pread`, then a copy
:func:`seek_data` /             ``lseek(SEEK_DATA / SEEK_HOLE)``      ``OSError(EOPNOTSUPP)``: callers read
:func:`seek_hole`                                                     the whole file as data
:func:`flush_data`              ``os.fdatasync``                      ``os.fsync`` (``_commit`` on Windows:
                                                                      ``FlushFileBuffers``)
:func:`drop_cached`             ``posix_fadvise(DONTNEED)``           nothing (the cache manager decides)
:func:`set_direct`              ``fcntl(F_SETFL, O_DIRECT)``          nothing: writes go through the cache
:func:`lock`                    ``fcntl.flock`` (whole file)          ``msvcrt.locking`` of one byte at
                                                                      :data:`LOCK_OFFSET`
:func:`replace`                 ``os.replace``                        ``os.replace``, retried while another
                                                                      process has the target open
:func:`current_uid`             ``os.geteuid()``                      ``None`` (no numeric owner)
:data:`O_BINARY`                0                                     ``os.O_BINARY`` (no CR/LF translation)
:func:`open_nofollow`           ``os.open(O_NOFOLLOW)``               ``lstat`` before and after the open:
                                                                      no link (:func:`is_link`), the same
                                                                      file (:func:`same_file`)
:func:`sync_dir`                ``fsync`` of the folder               nothing (NTFS journals it)
:func:`list_folder`             listed and examined through one       by name, the folder checked before
                                descriptor of the folder              and after (:func:`is_link`,
                                                                      :func:`same_file`)
:func:`keep_freed_memory`       glibc's ``mallopt``: freed buffers    nothing (another C library, or the
                                of up to 32 MiB stay in the process   variables set in the environment)
:func:`one_malloc_arena`        glibc's ``mallopt``: threads share    nothing (another C library, or the
                                the existing heaps                    variables set in the environment)
==============================  ====================================  =====================================

``VMVAULT_PLATFORM_HIDE_POSIX=1`` in the environment (read once, at import) makes this module
behave on Linux as if ``os.pread``, ``os.pwrite``, ``os.preadv``, ``SEEK_DATA``/``SEEK_HOLE``,
``os.fdatasync``, ``os.posix_fadvise``, ``fcntl.flock``, ``O_DIRECT`` and (for
:func:`open_nofollow`) ``O_NOFOLLOW`` were absent, so the fallbacks run
under the same tests as the POSIX path (``scripts/test.sh`` runs the engine, repository and disk tests that way).
Hidden on Linux, :func:`lock` takes the same one-byte range lock through ``fcntl``'s
open-file-description locks (``F_OFD_SETLK``), which, like Windows' ``LockFileEx``, belong to
one open file and conflict between descriptors of one process; ``msvcrt`` itself only exists
on Windows.

What stays POSIX-only (docs/hyperv.md, "Running on Windows"): folder descriptors (``dir_fd``,
``O_DIRECTORY``, ``O_NOFOLLOW`` relative to a folder), which the local backend and the restore
target are built on. Windows' equivalent of opening without following (``CreateFileW`` with
``FILE_FLAG_OPEN_REPARSE_POINT``) is not reachable through ``os.open``; the check that is
reachable is :func:`is_link` on an ``lstat`` (a reparse point: symbolic link, junction, mount
point) followed by :func:`same_file` on the opened descriptor, which leaves a window between
the two that ``O_NOFOLLOW`` does not have.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
import select
import shutil
import stat
import struct
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "DIRECT_ALIGN",
    "HIDE_POSIX",
    "LOCK_OFFSET",
    "NO_FOLDER_DESCRIPTORS",
    "O_BINARY",
    "O_CLOEXEC",
    "O_DIRECTORY",
    "O_NOCTTY",
    "O_NOFOLLOW",
    "O_NONBLOCK",
    "TRANSIENT_IDS",
    "WINDOWS",
    "WRITE_SLICE",
    "allocated_bytes",
    "current_uid",
    "drop_cached",
    "flush_data",
    "free_bytes",
    "give_owner",
    "id_named",
    "is_link",
    "keep_freed_memory",
    "kept_free",
    "list_folder",
    "lock",
    "lock_folder",
    "lock_shared",
    "name_key",
    "one_malloc_arena",
    "open_nofollow",
    "others_can_change",
    "pread",
    "pread_into",
    "pwrite",
    "replace",
    "same_file",
    "seek_data",
    "seek_hole",
    "set_blocking",
    "set_direct",
    "sync_dir",
    "transient_ids",
    "user_id",
    "wait_readable",
    "windows_name_problem",
]

#: the switch that hides the POSIX-only calls (tests of the fallbacks on Linux); read once
HIDE_POSIX: Final[bool] = os.environ.get("VMVAULT_PLATFORM_HIDE_POSIX", "") == "1"
WINDOWS: Final[bool] = sys.platform == "win32"

#: ``os.open`` flag for binary files: without it the Windows C runtime translates CR/LF
O_BINARY: Final[int] = getattr(os, "O_BINARY", 0)
#: ``os.open`` flag refusing a final symbolic link (0 where there is none: Windows)
O_NOFOLLOW: Final[int] = getattr(os, "O_NOFOLLOW", 0)
#: POSIX-only ``os.open`` flags, 0 on Windows (where Python makes every descriptor
#: non-inheritable anyway, and there are no FIFOs or terminals to open by name)
O_CLOEXEC: Final[int] = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK: Final[int] = getattr(os, "O_NONBLOCK", 0)
O_NOCTTY: Final[int] = getattr(os, "O_NOCTTY", 0)
O_DIRECTORY: Final[int] = getattr(os, "O_DIRECTORY", 0)

#: where :func:`lock`'s fallback locks one byte: a Windows byte-range lock also blocks reads
#: of that range by other handles, so it sits far past any text a lock file holds
LOCK_OFFSET: Final[int] = 1 << 30

#: how long :func:`replace` keeps trying while the target is open elsewhere (Windows)
REPLACE_TRIES: Final[int] = 20
REPLACE_PAUSE: Final[float] = 0.05


def _posix(obj: Any, name: str) -> Any:
    return None if HIDE_POSIX else getattr(obj, name, None)


_pread: Callable[[int, int, int], bytes] | None = _posix(os, "pread")
_pwrite: Callable[[int, Any, int], int] | None = _posix(os, "pwrite")
_preadv: Callable[[int, list[Any], int], int] | None = _posix(os, "preadv")
_fdatasync: Callable[[int], None] | None = _posix(os, "fdatasync")
_SEEK_DATA: int | None = _posix(os, "SEEK_DATA")
_SEEK_HOLE: int | None = _posix(os, "SEEK_HOLE")
_fadvise: Callable[[int, int, int, int], None] | None = _posix(os, "posix_fadvise")
#: the flag :func:`open_nofollow` passes; hidden, it checks by ``lstat`` as on Windows
_NOFOLLOW: int = 0 if HIDE_POSIX else O_NOFOLLOW

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]
_flock: Callable[[int, int], None] | None = _posix(_fcntl, "flock") if _fcntl is not None else None
#: the flag that sends a descriptor's reads and writes past the page cache (Linux, FreeBSD)
_O_DIRECT: int = 0 if HIDE_POSIX else getattr(os, "O_DIRECT", 0)


# ------------------------------------------------------------------------- positional I/O

_fd_locks: dict[int, threading.Lock] = {}
_fd_locks_guard = threading.Lock()


def _fd_lock(fd: int) -> threading.Lock:
    """The lock that keeps one descriptor's seek and read/write together. Kept for the life of
    the process: a reused descriptor number gets the same (free) lock, never a second one."""
    with _fd_locks_guard:
        found = _fd_locks.get(fd)
        if found is None:
            found = _fd_locks[fd] = threading.Lock()
        return found


#: the largest offset the system's calls take (``off_t`` is a signed 64-bit integer)
MAX_OFFSET: Final = (1 << 63) - 1


def pread(fd: int, length: int, offset: int) -> bytes:
    """Read at most ``length`` bytes at ``offset`` (fewer at the end of the file), without
    using a position another thread could move. Raises ``OSError``.

    An offset past the largest a file can have (a damaged image's pointer) reads as the end of
    the file, as ``pread`` does on Linux: ``lseek`` there fails with ``EINVAL`` instead (ext4
    with 4 KiB blocks refuses 16 TiB and beyond), and so does a read running past 2**63 - 1.
    ``EINVAL`` for a non-negative offset of a regular file means nothing else. An offset past
    ``MAX_OFFSET`` (a 64-bit pointer field can hold one) is never handed to the system, which
    could not take it (Python raises ``OverflowError``): it is past every file's end too."""
    if offset > MAX_OFFSET and length >= 0:
        return b""
    try:
        if _pread is not None:
            return _pread(fd, length, offset)
        with _fd_lock(fd):
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, length)
    except OSError as exc:
        if exc.errno == errno.EINVAL and offset >= 0 and length >= 0:
            return b""
        raise


def pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Read at most ``len(buffer)`` bytes at ``offset`` into ``buffer`` (writable); how many
    (fewer at the end of the file). Unlike :func:`pread`, every ``OSError`` is raised: a file
    written past the page cache (:func:`set_direct`) refuses a read off its alignment with
    ``EINVAL``, which the caller must see."""
    if _preadv is not None:
        return _preadv(fd, [buffer], offset)
    data = pread(fd, len(buffer), offset)
    buffer[: len(data)] = data
    return len(data)


#: the most bytes callers that loop give one write: 1.3 GiB written 2-16 MiB a call cost Linux
#: (6.x, ext4) 3-7 times the system time of the same bytes 1 MiB or 256 KiB a call, often 3 times
#: the wall time (the page cache then takes 2 MiB pages, which it must first make free;
#: measured: 0.3-0.5 s against 1.5-2.4 s)
WRITE_SLICE: Final[int] = 1 << 20


def pwrite(fd: int, data: Any, offset: int) -> int:
    """Write ``data`` (bytes-like) at ``offset``; returns how many bytes were written, which
    may be fewer (callers loop). Raises ``OSError``."""
    if _pwrite is not None:
        return _pwrite(fd, data, offset)
    with _fd_lock(fd):
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


# ------------------------------------------------------------------------ holes, flushing


def _no_holes() -> OSError:
    return OSError(errno.EOPNOTSUPP, "hole detection is not available here")


def seek_data(fd: int, offset: int) -> int:
    """The first offset at or after ``offset`` that holds data (``lseek(SEEK_DATA)``); raises
    ``OSError`` (``ENXIO``: only a hole follows; ``EOPNOTSUPP``: no hole detection here, read
    everything as data)."""
    if _SEEK_DATA is None:
        raise _no_holes()
    return os.lseek(fd, offset, _SEEK_DATA)


def seek_hole(fd: int, offset: int) -> int:
    """The first hole at or after ``offset`` (the end of the file counts as one); as
    :func:`seek_data`."""
    if _SEEK_HOLE is None:
        raise _no_holes()
    return os.lseek(fd, offset, _SEEK_HOLE)


def flush_data(fd: int) -> None:
    """Put a file's data on stable storage: ``fdatasync`` where it exists, else ``fsync``
    (on Windows ``_commit``, i.e. ``FlushFileBuffers``, which flushes metadata too)."""
    if _fdatasync is not None:
        _fdatasync(fd)
    else:
        os.fsync(fd)


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel that the file's written-back (clean) pages from ``offset``, ``length``
    bytes (0: to the end), will not be read again soon, so it frees them now
    (``posix_fadvise(POSIX_FADV_DONTNEED)``); pages still dirty stay, and are queued for writing.

    For files vmvault writes once and does not read back (a restored disk, a pack): their pages
    would otherwise push the host's own working set out of the page cache, and every page a long
    write takes is one the kernel must first find free. On the development machines (virtual,
    their freed memory handed back to the host) writing 2.5 GiB and fsyncing it took 7-8 s of
    system time when every page was new to the guest, 0.7 s when the pages of each 64 MiB
    written and flushed were freed for the next (measured with 4 MiB writes, three runs each).
    Only advice: failures are ignored; nothing happens where there is no such call.
    """
    if _fadvise is None:
        return
    with contextlib.suppress(OSError):
        _fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# ------------------------------------------------------------------------------- memory

#: glibc's ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
KEPT_ALLOCATION: Final[int] = 32 << 20
KEPT_FREE: Final[int] = 32 << 20
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def _mallopt(unless: tuple[str, ...], *settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt`` for each ``(parameter, value)``; True when every one was set. Nothing
    is changed under another C library, with the POSIX calls hidden, or when the environment
    names one of ``unless`` (the user's choice of glibc's own variables wins)."""
    if WINDOWS or HIDE_POSIX or any(name in os.environ for name in unless):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])


#: what :func:`keep_freed_memory` last set in this process (None: never, the C library's own)
_kept_free: int | None = None


def kept_free() -> int | None:
    """The ``kept_free`` that :func:`keep_freed_memory` last set in this process, or None when
    it never did (a program that imports vmvault as a library keeps its own malloc settings:
    the engine changes them only where the command line chose them)."""
    return _kept_free


def keep_freed_memory(kept_free: int = KEPT_FREE) -> bool:
    """Have glibc reuse freed buffers of up to ``KEPT_ALLOCATION`` bytes instead of handing
    them back to the kernel; True when it was set. ``kept_free``: see below.

    Backup and restore allocate a buffer per batch, pack range, decrypted and decompressed
    chunk (256 KiB to 16 MiB each, gigabytes in all). glibc serves such sizes with a fresh
    ``mmap`` or returns the top of a thread's heap once more than twice that is free, so each
    new buffer's pages are faulted in and zeroed by the kernel again: restoring 1.3 GiB of
    data took 85,000-93,000 page faults, with these settings 37,000-39,000 (0.1-0.3 s less
    system time, the same peak RSS). At most ``kept_free`` bytes stay free at the top of each
    heap (a backup keeps what its pipeline's budget moves, then sets the default back).
    Nothing is changed under another C library, or when the environment sets glibc's own
    variables (the user's choice wins).
    """
    global _kept_free
    applied = _mallopt(_MALLOC_ENVIRONMENT, (_M_MMAP_THRESHOLD, KEPT_ALLOCATION), (_M_TRIM_THRESHOLD, kept_free))
    if applied:
        _kept_free = kept_free
    return applied


def one_malloc_arena() -> bool:
    """Have threads started from now on share glibc's existing heaps (``M_ARENA_MAX`` 1) instead
    of each taking a heap of its own; True when it was set.

    Each heap keeps up to ``KEPT_FREE`` bytes free for reuse (:func:`keep_freed_memory`), so a
    pipeline of a dozen threads held freed memory in a dozen heaps: a backup's peak RSS grew with
    its duration and the order its threads happened to free buffers in, not with what it held
    (traced: 60-70 MiB in use, 100 MiB held by the heaps). Python allocates with the GIL held,
    so the threads seldom wait for a shared heap. Nothing is changed under another C library,
    or when the environment sets ``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES``.
    """
    return _mallopt(("MALLOC_ARENA_MAX", "GLIBC_TUNABLES"), (_M_ARENA_MAX, 1))


# ----------------------------------------------------------------------------- file locks

if sys.platform == "win32":  # pragma: no cover - not run by the test suite (Linux)
    import msvcrt

    def _range_lock(fd: int, wait: bool) -> bool:
        os.lseek(fd, LOCK_OFFSET, os.SEEK_SET)
        while True:
            try:
                # LK_LOCK gives up after 10 tries a second apart; wait by retrying LK_NBLCK
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EDEADLK):
                    raise
                if not wait:
                    return False
                time.sleep(0.05)
            else:
                return True

else:
    #: struct flock of Linux (l_type, l_whence, l_start, l_len, l_pid), for F_OFD_SETLK
    _FLOCK = struct.Struct("hhqqi4x")

    def _range_lock(fd: int, wait: bool) -> bool:
        # the Windows byte-range lock's stand-in where POSIX calls are hidden: a lock of the
        # same byte that belongs to the open file, not the process (see the module docstring)
        assert _fcntl is not None
        writable = _fcntl.fcntl(fd, _fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        kind = _fcntl.F_WRLCK if writable else _fcntl.F_RDLCK
        request = _FLOCK.pack(kind, os.SEEK_SET, LOCK_OFFSET, 1, 0)
        try:
            _fcntl.fcntl(fd, _fcntl.F_OFD_SETLKW if wait else _fcntl.F_OFD_SETLK, request)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True


def lock(fd: int, *, wait: bool) -> bool:
    """Take an exclusive lock on the open file ``fd`` (released when it is closed, or when the
    process ends). True when taken; False when another open file holds it and ``wait`` is
    false. Other failures (a file system without locks) raise ``OSError``."""
    if _flock is not None:
        assert _fcntl is not None
        return _flock_unless_held(fd, _fcntl.LOCK_EX, wait)
    return _range_lock(fd, wait)


def _flock_unless_held(fd: int, operation: int, wait: bool) -> bool:
    """``flock(fd, operation)``, not waiting unless ``wait``: False when another holds it."""
    assert _flock is not None and _fcntl is not None
    try:
        _flock(fd, operation | (0 if wait else _fcntl.LOCK_NB))
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock_shared(fd: int, *, wait: bool) -> bool:
    """Take a shared lock on the open file ``fd``: any number of them at once, never with
    :func:`lock`'s exclusive one (released when ``fd`` is closed). True when taken, False when
    an exclusive lock is held and ``wait`` is false. Where POSIX calls are hidden, ``fd`` must
    be open for reading only (a read lock). On Windows, whose ``msvcrt`` has no shared locks,
    True without a lock: what the callers guard (a file deleted while another process uses it)
    Windows refuses by itself while the file is open."""
    if _flock is not None:
        assert _fcntl is not None
        return _flock_unless_held(fd, _fcntl.LOCK_SH, wait)
    if WINDOWS:  # pragma: no cover - not run by the test suite (Linux)
        return True
    return _range_lock(fd, wait)


def lock_folder(fd: int) -> bool:
    """Take an exclusive lock on an open folder without waiting (``flock``): True when taken,
    False when held elsewhere. POSIX only, and not hidden by ``VMVAULT_PLATFORM_HIDE_POSIX``:
    a folder cannot be opened by ``os.open`` on Windows, so there is no fallback to test; the
    code that locks folders (the restore target) is refused on Windows before it gets here."""
    if _fcntl is None:  # pragma: no cover - Windows
        raise OSError(errno.EOPNOTSUPP, "folders cannot be locked here")
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


#: what the modules built on folder descriptors (the local backend, the restore target) say
#: on Windows, where ``os.open`` cannot open a folder and ``dir_fd`` is not supported
NO_FOLDER_DESCRIPTORS: Final[str] = (
    "is built on folder descriptors (openat, O_NOFOLLOW), which Windows does not offer through Python; "
    'it is not ported yet (docs/hyperv.md, "Running on Windows")'
)


# -------------------------------------------------------------------------- replacement


def replace(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` atomically (``os.replace``).

    On Windows the rename fails with ``PermissionError`` while another process has ``dst``
    open without ``FILE_SHARE_DELETE`` (a reader, a virus scanner, the indexer): that is
    retried for about a second, then raised. Renaming ``dst`` aside first would leave a
    moment with no ``dst`` at all, which a reader must never see, so it is not done; the
    caller's error names the file and nothing is lost (``src`` is still complete).
    On POSIX the rename never fails that way and the first error is raised.
    """
    for attempt in range(REPLACE_TRIES):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not (WINDOWS or HIDE_POSIX) or attempt == REPLACE_TRIES - 1:
                raise
            time.sleep(REPLACE_PAUSE)


# --------------------------------------------------------------------------- ownership


def current_uid() -> int | None:
    """The effective user id, or None where files have no numeric owner (Windows): checks
    of a file's owner are then skipped and said so by the caller."""
    geteuid: Callable[[], int] | None = getattr(os, "geteuid", None)
    return geteuid() if geteuid is not None else None


def user_id(name: str) -> int | None:
    """The user id of the account ``name``, or None: no such account, or no numeric owners
    (Windows)."""
    try:
        import pwd
    except ImportError:
        return None
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def group_id(name: str) -> int | None:
    """The group id of the group ``name``, or None: no such group, or no numeric groups (Windows)."""
    try:
        import grp
    except ImportError:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def others_can_change(path: str, owners: set[int] | None = None, *, container: bool = False) -> str | None:
    """Why an account other than ``owners`` (user ids; by default root and this process's user)
    could change ``path`` or put something else in its place: the file or a folder above it
    writable by group or others (a sticky folder above excepted), or owned by another account;
    None when only ``owners`` can (and on Windows, where owners are not numeric).
    ``container``: ``path`` is a folder that only holds entries of the caller's own making (a
    ``mkdtemp``), so it may be sticky too."""
    uid = current_uid()
    if uid is None:
        return None
    if owners is None:
        owners = {0, uid}
    current = os.path.realpath(path)
    first = not container
    while True:
        try:
            st = os.stat(current)
        except FileNotFoundError:
            st = None  # what does not exist yet can be made only where the folder allows
        if st is not None:
            mode = stat.S_IMODE(st.st_mode)
            sticky_folder = stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX and not first
            if st.st_uid not in owners:
                return f"{current} belongs to user id {st.st_uid}"
            if mode & 0o022 and not sticky_folder:
                return f"{current} is writable by other users (mode {mode:04o})"
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current, first = parent, False


# -------------------------------------------------------------------------- links, paths

#: IO_REPARSE_TAG's name-surrogate bit (winnt.h, IsReparseTagNameSurrogate): the reparse
#: point names another file (symbolic link, junction, mount point), unlike e.g. a
#: deduplicated or cloud file, which is the file itself
_NAME_SURROGATE: Final[int] = 0x20000000

#: FILE_ATTRIBUTE_REPARSE_POINT (winnt.h), in ``st_file_attributes`` of a Windows ``lstat``
_REPARSE_POINT: Final[int] = 0x400


def is_link(st: os.stat_result) -> bool:
    """Whether an ``lstat`` result is a link of any kind: a symbolic link, or on Windows any
    reparse point (junctions and mount points are reparse points but not ``S_ISLNK``)."""
    if stat.S_ISLNK(st.st_mode):
        return True
    reparse = getattr(st, "st_file_attributes", 0) & _REPARSE_POINT
    return bool(reparse and getattr(st, "st_reparse_tag", 0) & _NAME_SURROGATE)


def same_file(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether two stat results name the same file (device and inode; on Windows the volume
    serial number and file index). The check after an open without ``O_NOFOLLOW``: ``lstat``
    the name, refuse a link, open it, and refuse when ``fstat`` of the descriptor differs."""
    return (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)


def _link_error(path: str) -> OSError:
    return OSError(errno.ELOOP, "is a link (not followed)", path)


def open_nofollow(path: str, flags: int, mode: int = 0o777) -> int:
    """``os.open`` that refuses a link in the last component with ``OSError(ELOOP)``.

    With ``O_NOFOLLOW`` the kernel refuses it. Without (Windows): an existing name that
    :func:`is_link` is refused before the open, and after it the name must still be no link
    and the very file open on the descriptor (:func:`same_file`), or the descriptor is closed
    and ``ELOOP`` raised. A link planted and removed again between those steps is caught by
    the second check; what the open itself touched through it cannot be undone (for a new
    file ``O_CREAT|O_EXCL`` fails on any existing name, a link included).
    """
    if _NOFOLLOW:
        return os.open(path, flags | _NOFOLLOW, mode)
    try:
        if is_link(os.lstat(path)):
            raise _link_error(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, flags, mode)
    try:
        now = os.lstat(path)
        if is_link(now) or not same_file(now, os.fstat(fd)):
            raise _link_error(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def list_folder(
    path: str, seen: os.stat_result | None = None, *, limit: int | None = None
) -> list[tuple[str, os.stat_result | OSError]]:
    """The entries of the folder ``path``, sorted by name, each with its ``lstat`` (or the
    error that look raised: an entry removed meanwhile, say). A folder of more than ``limit``
    entries is ``OSError(E2BIG)``, found before more than ``limit + 1`` names are held.

    ``seen``: the folder's own ``lstat`` from the listing of the folder above it. The folder
    must still be that one and no link, else ``OSError`` (``ELOOP`` for a link, ``ESTALE`` for
    anything else): whoever writes the folder above could swap it for a link to a host folder
    between the two looks, and a scan by name would go where the link leads. On POSIX the
    folder is opened once (``O_DIRECTORY``, and ``O_NOFOLLOW`` with ``seen``) and listed and
    examined through that descriptor, so a swap after the check changes nothing. Windows
    (and ``VMVAULT_PLATFORM_HIDE_POSIX``): by name, the folder checked before and after the
    listing, which leaves a window a folder descriptor does not.
    """

    def check(now: os.stat_result) -> None:
        if seen is None:
            return
        if is_link(now):
            raise _link_error(path)
        if not same_file(seen, now) or not stat.S_ISDIR(now.st_mode):
            raise OSError(errno.ESTALE, "was replaced after it was listed", path)

    def sorted_entries(
        listed: int | str, look: Callable[[str], os.stat_result]
    ) -> list[tuple[str, os.stat_result | OSError]]:
        names: list[str] = []
        with os.scandir(listed) as it:
            for entry in it:
                names.append(entry.name)
                if limit is not None and len(names) > limit:
                    raise OSError(errno.E2BIG, f"holds more than {limit:,} entries", path)
        out: list[tuple[str, os.stat_result | OSError]] = []
        for name in sorted(names):
            try:
                out.append((name, look(name)))
            except OSError as exc:
                out.append((name, exc))
        return out

    if _NOFOLLOW and os.stat in os.supports_dir_fd:
        try:
            fd = os.open(path, os.O_RDONLY | O_CLOEXEC | O_DIRECTORY | (_NOFOLLOW if seen is not None else 0))
        except OSError as exc:
            if seen is not None and exc.errno in (errno.ENOTDIR, errno.ELOOP):
                check(os.lstat(path))  # a link (ELOOP) or anything else (ESTALE) in its place
            raise
        try:
            check(os.fstat(fd))
            return sorted_entries(fd, lambda name: os.stat(name, dir_fd=fd, follow_symlinks=False))
        finally:
            os.close(fd)
    check(os.lstat(path))
    entries = sorted_entries(path, lambda name: os.lstat(os.path.join(path, name)))
    check(os.lstat(path))
    return entries


def sync_dir(path: str) -> None:
    """Make a create, rename or unlink in the folder ``path`` durable: ``fsync`` of the folder
    on POSIX. On Windows a folder cannot be opened by ``os.open`` and NTFS journals the
    change itself, so there is nothing to do. Raises ``OSError``."""
    if WINDOWS:  # pragma: no cover - not run by the test suite (Linux)
        return
    fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str) -> int:
    """Bytes free for an unprivileged user on the file system of ``path`` (``statvfs``'s
    ``f_bavail * f_frsize``; ``GetDiskFreeSpaceExW`` on Windows). Raises ``OSError``."""
    statvfs: Callable[[str], Any] | None = getattr(os, "statvfs", None)
    if statvfs is None:  # pragma: no cover - Windows
        return shutil.disk_usage(path).free
    st = statvfs(path)
    return int(st.f_bavail * st.f_frsize)


def id_named(number: int) -> bool:
    """Whether a user or a group of the user and group databases has the id ``number`` (False
    where ids are not numeric: Windows)."""
    try:
        import grp
        import pwd
    except ImportError:
        return False
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(number)
            return True
        except KeyError:
            pass
    return False


#: the user and group ids a process vmvault starts as root may be given to run under instead
#: (:func:`transient_ids`): above the ranges Debian, systemd's dynamic users and the usual
#: container mappings use, below 2**31 (which some tools take for negative)
TRANSIENT_IDS = range(2_100_000_000, 2_140_000_000)
#: the ranges of user and group ids given to user namespaces (shadow's subordinate ids)
_SUBORDINATE_IDS = ("/etc/subuid", "/etc/subgid")
#: the ids this process's user namespace maps (Linux; a container's may map only a few)
_ID_MAPS = ("/proc/self/uid_map", "/proc/self/gid_map")


def _mapped(n: int) -> bool:
    """Whether ``n`` is a user and a group id this user namespace maps (True where there are
    no maps to read)."""
    for table in _ID_MAPS:
        try:
            with open(table, encoding="ascii", errors="replace") as f:
                fields = [line.split() for line in f]
        except OSError:
            continue
        usable = [x for x in fields if len(x) == 3 and all(map(str.isdigit, x))]
        if not any(int(x[0]) <= n < int(x[0]) + int(x[2]) for x in usable):
            return False
    return True


def _ids_in_use() -> tuple[set[int], list[range]]:
    """The user and group ids of running processes, and the ranges of /etc/subuid and
    /etc/subgid (ids that user namespaces' processes take), as far as they can be read."""
    held: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{entry}")
                    held.update((st.st_uid, st.st_gid))
    ranges = []
    for table in _SUBORDINATE_IDS:
        with contextlib.suppress(OSError), open(table, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    ranges.append(range(int(parts[1]), int(parts[1]) + int(parts[2])))
    return held, ranges


def transient_ids() -> tuple[int, int] | None:
    """A user id and an equal group id for one process that should hold no right of vmvault's
    (QEMU, the filesystem worker), drawn at random from :data:`TRANSIENT_IDS`: named in no user
    or group database, held by no running process, in no subordinate id range. None if none was
    found in 256 draws, or this user namespace (a container's) does not map the range. No file
    belongs to them, and two processes at once draw different ones (but for a chance of one in
    tens of millions)."""
    held, ranges = _ids_in_use()
    for _ in range(256):
        n = TRANSIENT_IDS.start + secrets.randbelow(len(TRANSIENT_IDS))
        if n not in held and not any(n in r for r in ranges) and not id_named(n) and _mapped(n):
            return n, n
    return None  # (a container's user namespace maps no id of the range, or all were taken)


def give_owner(path: str, uid: int, gid: int) -> None:
    """``chown`` where files have numeric owners; on Windows nothing (a new file's owner is
    the account that made it, and an NTFS owner is a SID, not a number). Raises ``OSError``."""
    chown: Callable[[str, int, int], None] | None = getattr(os, "chown", None)
    if chown is not None:
        chown(path, uid, gid)


def allocated_bytes(st: os.stat_result) -> int:
    """The space a file takes on disk (``st_blocks``); its size where that is not reported."""
    blocks: int | None = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else blocks * 512


#: what :func:`set_direct`'s writes must be aligned to: their offset, length and buffer address
#: (4 KiB logical blocks are the largest in common use; a device with larger ones refuses the
#: writes with ``EINVAL``, which callers take as "no ``O_DIRECT`` here")
DIRECT_ALIGN: Final[int] = 4096


def set_direct(fd: int, on: bool) -> bool:
    """Switch the open file ``fd`` to reading and writing past the page cache (``O_DIRECT``) or
    back; returns whether it now goes past the page cache. Never where there is no such flag
    (Windows, the fallbacks under test) or the file system refuses it (``EINVAL``: some network
    and FUSE file systems).

    While on, every read and write must start at a multiple of :data:`DIRECT_ALIGN`, be a
    multiple of it long and use a buffer aligned to it (an ``mmap``); one that is not fails with
    ``EINVAL`` (a read may end early at the end of the file). The flag belongs to the open file,
    so it applies to every ``dup`` of ``fd``."""
    if not _O_DIRECT or _fcntl is None:
        return False
    try:
        flags = _fcntl.fcntl(fd, _fcntl.F_GETFL)
        _fcntl.fcntl(fd, _fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
        return bool(_fcntl.fcntl(fd, _fcntl.F_GETFL) & _O_DIRECT)
    except OSError:
        return False


def wait_readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has bytes to read, or its other end closed, within ``timeout`` seconds.
    ``poll`` where there is one: ``select`` refuses a descriptor past 1023, which a daemon or
    the web server holding many connections reaches; Windows has ``select`` alone."""
    poll = getattr(select, "poll", None)
    if poll is not None:
        waiter = poll()
        waiter.register(fd, select.POLLIN)
        return bool(waiter.poll(max(0, math.ceil(timeout * 1000))))  # (milliseconds)
    return bool(select.select([fd], [], [], max(0.0, timeout))[0])


def set_blocking(fd: int) -> None:
    """Clear ``O_NONBLOCK`` (set to open a FIFO without hanging; a regular file is read
    blocking). Windows has no such flag for files."""
    if O_NONBLOCK:
        os.set_blocking(fd, True)


_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{dev}{n}" for dev in ("COM", "LPT") for n in (*"123456789", "¹", "²", "³")}
)
_FORBIDDEN_CHARS = frozenset('<>:"/\\|?*') | {chr(c) for c in range(32)}


def windows_name_problem(name: str) -> str | None:
    """Why ``name`` (one path component) cannot be a file name on Windows, or None.

    Windows refuses (or silently changes) names with ``<>:"/\\|?*`` or control characters,
    names ending in a dot or a space, and the device names (``CON``, ``NUL``, ``COM1``...,
    with any extension: ``nul.txt`` is the device too). A ``:`` would name an alternate data
    stream of another file (``a.vhdx:evil``), so a name from untrusted storage must be checked.
    """
    if name in ("", ".", ".."):
        return "it is empty or a folder reference"
    bad = sorted({c for c in name if c in _FORBIDDEN_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"it contains {shown}, which Windows does not allow in a file name"
    if name[-1] in ". ":
        return "it ends in a dot or a space, which Windows strips"
    if name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED:
        return "it is a Windows device name"
    return None


def name_key(name: str, *, case_insensitive: bool | None = None) -> str:
    """The key under which two names are the same file: the name itself on a case-sensitive
    file system (Linux), else (Windows, macOS, or ``case_insensitive``) its NFC-normalised case
    fold (what NTFS and APFS compare, near enough to find every collision; a collision check
    that refuses slightly too much is safe)."""
    if case_insensitive is None:
        case_insensitive = WINDOWS or sys.platform == "darwin"
    if not case_insensitive:
        return name
    return unicodedata.normalize("NFC", name).casefold()

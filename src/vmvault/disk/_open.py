"""Opening the files of a disk image and of its parents, when the files are not trusted.

Whoever writes a VM folder or an image file chooses what its parent locators and backing
file names say, and can put links, FIFOs, sockets and device nodes where vmvault looks.
These rules (``docs/design/repository-format.md`` section 10.4, ``docs/design/disk-formats.md``
section 2) hold for every file a reader opens:

* Every file is opened with ``O_NONBLOCK | O_NOCTTY`` and checked with ``fstat`` before a
  byte is read, so a FIFO can never block a reader and a terminal never becomes ours; a
  path that ``stat`` already shows to be a FIFO, socket or device is not even opened
  (opening some devices has side effects).
* The image a caller names may be a regular file or a block device (the caller chose it).
  A *parent* (found through a locator or backing file name) must be a regular file, and
  never kernel state: nothing under ``/proc`` or ``/sys``, nothing on the file systems
  mounted there or on ``/dev`` (``/dev/shm`` is an ordinary tmpfs and allowed).
* A parent must lie inside the folders a ``ParentRule`` allows. The check is made on the
  file actually opened (its path as the kernel reports it for the descriptor), so neither
  links nor a swap between the check and the open can lead outside.
* A file found by a folder scan is opened without following a link in its last component
  and must be the file that was scanned (same device and inode).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from vmvault import platform
from vmvault.errors import ParentError, SourceError

__all__ = [
    "ANYWHERE",
    "ParentRule",
    "describe_mode",
    "in_pseudo_fs",
    "names_a_file",
    "open_checked",
    "open_parent",
    "real_path",
]


def _inside(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


#: kernel pseudo file systems: their "files" are kernel state (environment, memory, devices), never a disk
PSEUDO_ROOTS = ("/proc", "/sys", "/dev")


def _pseudo_devices() -> frozenset[int]:
    """``st_dev`` of the file systems mounted on PSEUDO_ROOTS (not of ``/`` when one is no mount)."""
    devs: set[int] = set()
    try:
        root = os.stat("/").st_dev
    except OSError:
        return frozenset()
    for p in PSEUDO_ROOTS:
        try:
            dev = os.stat(p).st_dev
        except OSError:
            continue
        if dev != root:
            devs.add(dev)
    return frozenset(devs)


def names_a_file(path: str) -> bool:
    """Whether ``path`` can name a file at all. A parent reference read from an image or a
    merge journal is untrusted: one holding a NUL byte, which no file name can, is damaged
    (and the system calls and ``os.path.realpath`` raise ValueError for it). The one test of
    this, for every place such a name is used."""
    return "\0" not in path


def in_pseudo_fs(real: str, st: os.stat_result) -> bool:
    """Is this file kernel state: under /proc or /sys, or on the file system of /proc, /sys or /dev?

    (/dev/shm and the like are ordinary tmpfs mounts below /dev and hold ordinary files.)
    """
    if any(_inside(real, root) for root in PSEUDO_ROOTS[:2]):
        return True
    return st.st_dev in _pseudo_devices()


def describe_mode(mode: int) -> str:
    """What kind of file a ``st_mode`` is, for messages: "a FIFO", "a link", ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"a file of unknown type {stat.S_IFMT(mode):#o}"


@dataclass(frozen=True, slots=True)
class ParentRule:
    """Where the parents (backing files) of an image may be.

    ``folders`` are real paths (links resolved); a parent must lie inside one of them, at any
    depth. ``None`` allows any folder; the other rules (regular file, not in a pseudo file
    system, matching identity) hold whatever the rule.
    """

    folders: tuple[str, ...] | None = None

    @classmethod
    def inside(cls, folders: Iterable[str]) -> ParentRule:
        return cls(tuple(dict.fromkeys(os.path.realpath(f) for f in folders)))

    @classmethod
    def beside(cls, image: str, also: Iterable[str] = ()) -> ParentRule:
        """The image's own folder (and below), plus ``also``."""
        return cls.inside([os.path.dirname(os.path.abspath(image)), *also])

    def with_folder(self, folder: str) -> ParentRule:
        """This rule plus one more folder (nothing changes for a rule that allows anywhere)."""
        if self.folders is None:
            return self
        return ParentRule.inside([*self.folders, folder])

    def allows(self, real: str) -> bool:
        return self.folders is None or any(_inside(real, f) for f in self.folders)

    def describe(self) -> str:
        if self.folders is None:
            return "anywhere"
        return "inside " + " or ".join(self.folders)


#: no folder restriction (the type and identity rules still hold)
ANYWHERE = ParentRule()


def real_path(fd: int, path: str) -> str:
    """The real path of the file open on ``fd`` (as the kernel knows it), else of ``path``.

    Without /proc, the resolved ``path`` is used only if it still names the very file open
    on ``fd``; otherwise the file cannot be placed and counts as outside every folder.
    """
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        link = ""
    if link.startswith("/") and not link.endswith(" (deleted)"):
        return link
    resolved = os.path.realpath(path)
    try:
        st, now = os.fstat(fd), os.stat(resolved)
    except OSError:
        return "\0unplaceable"
    if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
        return "\0unplaceable"
    return resolved


def _open_raw(path: str, *, writable: bool, nofollow: bool) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | platform.O_NONBLOCK | platform.O_NOCTTY | platform.O_CLOEXEC
    flags |= platform.O_BINARY
    return platform.open_nofollow(path, flags) if nofollow else os.open(path, flags)


def open_checked(
    path: str,
    *,
    block_devices: bool = True,
    writable: bool = False,
    nofollow: bool = False,
    expect: tuple[int, int] | None = None,
    inside: ParentRule | None = None,
    what: str = "a disk image",
) -> tuple[int, os.stat_result]:
    """Open a file vmvault was told to read: ``(fd, fstat)``; raises SourceError if it is not a file.

    Regular files are accepted, block devices when ``block_devices``. With ``nofollow`` a link
    in the last component is refused; with ``expect`` the file must be that ``(st_dev, st_ino)``
    (the one a folder scan saw); with ``inside`` the open file must lie in the rule's folders
    by its real path, as the kernel has it (a folder on the way swapped for a link to a host
    folder leads the name elsewhere, and the scan's ``lstat`` went there too).
    """
    try:
        st = os.lstat(path) if nofollow else os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: cannot open: no such file") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc

    def acceptable(mode: int) -> bool:
        return stat.S_ISREG(mode) or (block_devices and stat.S_ISBLK(mode))

    if not acceptable(st.st_mode):
        raise SourceError(f"{path}: is {describe_mode(st.st_mode)}, not {what}; not opened")
    try:
        fd = _open_raw(path, writable=writable, nofollow=nofollow)
    except OSError as exc:
        if exc.errno == errno.ELOOP and nofollow:
            raise SourceError(f"{path}: was replaced by a link; not followed") from exc
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not acceptable(st.st_mode):
            raise SourceError(f"{path}: is {describe_mode(st.st_mode)}, not {what}; not read")
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            raise SourceError(f"{path}: was replaced by another file since it was examined; not used")
        if inside is not None:
            real = real_path(fd, path)
            if not inside.allows(real):
                where = "cannot be placed" if real.startswith("\0") else f"lies at {real}"
                raise SourceError(f"{path}: {where}, outside {inside.describe()} (a folder on its way was "
                                  "replaced by a link); not read")  # fmt: skip
        platform.set_blocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_parent(path: str, *, child: str, rule: ParentRule, named: bool = False) -> int | None:
    """Open a parent candidate of ``child`` read-only: its fd, None when there is no such file.

    A parent must be a regular file outside the pseudo file systems, inside ``rule``'s
    folders unless the user ``named`` it (``--parent``). Anything else is a ParentError
    naming the child, the parent and why. Type and place are checked before the open (so a
    refused file is not even opened) and again on the open descriptor (so a swap in between
    changes nothing).
    """

    def refuse(why: str) -> ParentError:
        return ParentError(f"parent {path} {why}", path=child, structure="parent")

    def check_place(real: str, st: os.stat_result) -> None:
        if in_pseudo_fs(real, st):
            raise refuse(f"is {real}, in a kernel pseudo file system; never a disk image")
        if not named and not rule.allows(real):
            raise refuse(
                f"(the file {real}) is outside the folders parents may be in ({rule.describe()}); "
                "refused: allow its folder explicitly (--allow-parent-dir) if it is trusted"
            )

    if not names_a_file(path):
        # a name read from a hostile file; the system calls below would raise ValueError
        raise refuse("holds a NUL byte, which no file name can: the reference is damaged")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise refuse(f"cannot be opened: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise refuse(f"is {describe_mode(st.st_mode)}, not a file: a parent must be a regular file (not opened)")
    check_place(os.path.realpath(path), st)
    try:
        fd = _open_raw(path, writable=False, nofollow=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise refuse(f"cannot be opened: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"is {describe_mode(st.st_mode)}, not a file: a parent must be a regular file (not read)")
        check_place(real_path(fd, path), st)
        platform.set_blocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd

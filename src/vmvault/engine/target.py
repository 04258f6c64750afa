"""A restore's target folder, written only through directory descriptors.

Whoever can write the target folder (another user, a script, whoever planted links there)
must not be able to make a restore write anywhere else, replace anything, or leave a file
that looks complete and is not. The rules (``docs/design/repository-format.md``, 10.5):

* The folder given by the user is opened as given: links in *that* path are followed, because
  the user chose it (``/srv/restore -> /mnt/big/restore``). Every folder the restore creates
  (missing parts of that path, the ``--as-clone`` folder, the snapshot's subfolders) is made
  with ``mkdir`` and opened ``O_NOFOLLOW`` through its parent's descriptor; an existing
  subfolder must be a real folder, never a link.
* Every file (and symbolic link) is created inside the restore's own work folder ``.vmvault-restore-<16 hex>``
  (mode 0700, ``flock``-held while the restore runs) with ``O_CREAT|O_EXCL|O_NOFOLLOW`` under
  a short name (``<n>.partial``, so any name that fits the file system can be restored),
  written, fsynced, given its owner, mode and times through its descriptor, and only then
  renamed to its final name with ``renameat2(RENAME_NOREPLACE)``. An existing name, a
  dangling link too, is never replaced, and a file under its final name is always complete.
  A symbolic link is made as it was stored (its target is never followed or resolved) the same
  way: ``symlinkat`` in the work folder, journaled, renamed without replacing.
* The work folder holds a journal of the files placed so far (name, device, inode, size,
  modification time): a header line, then one line appended (and fsynced) before each rename,
  so that a restore of a million files writes each line once. A rerun of the same restore (same
  snapshot, options and names) after a kill or a failure keeps the files that are still the
  very files placed, removes the dead restore's work folder with its partial files, and
  restores the rest. A work folder that
  cannot be shown to be a dead restore's own (another owner, wider mode, a live lock, no
  valid journal, unexpected entries) is left alone and named in a note.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any

from vmvault import platform, shape
from vmvault.disk.base import Opener, write_error
from vmvault.errors import TargetError

__all__ = ["WORK_PREFIX", "Partial", "RestoreTarget", "rename_noreplace", "write_all"]

#: the work folder of one restore, at the top of its target
WORK_PREFIX = ".vmvault-restore-"
_WORK_NAME = re.compile(r"\.vmvault-restore-[0-9a-f]{16}\Z")
_PARTIAL_NAME = re.compile(r"[0-9]{1,12}\.partial\Z")
_JOURNAL = "journal.json"
_JOURNAL_TMP = "journal.json.tmp"
_JOURNAL_FORMAT = "vmvault-restore-journal"
#: a journal names every restored file once (about 100 bytes each): millions of files
_MAX_JOURNAL = 256 << 20

_DIR = os.O_RDONLY | platform.O_DIRECTORY | platform.O_CLOEXEC
_DIR_NOFOLLOW = _DIR | platform.O_NOFOLLOW
_NEW_FILE = os.O_CREAT | os.O_EXCL | platform.O_NOFOLLOW | platform.O_CLOEXEC | platform.O_BINARY

_RENAME_NOREPLACE = 1
#: folder descriptors a restore keeps open at most (the usual limit is 1024 per process)
_MAX_OPEN_FOLDERS = 64


def _load_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28 or another libc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2: Any = _load_renameat2()


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Rename ``src`` (in folder ``src_dir``) to ``dst`` (in ``dst_dir``) unless ``dst`` exists.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system have it; else a hard link
    (which fails on any existing name, a dangling link too) and an unlink of the old name; on
    a file system with neither, a check for the name just before a plain rename (a window
    remains there, said in the design document). Raises ``FileExistsError`` if ``dst`` exists.
    """
    if _renameat2 is not None:
        if _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    try:
        os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    else:
        os.unlink(src, dir_fd=src_dir)
        return
    try:
        os.lstat(dst, dir_fd=dst_dir)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


def _in_the_way(dir_fd: int, name: str, shown: str, exc: OSError) -> TargetError:
    """Why ``name`` could not be opened as a folder: a link, a file, or the system's reason."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return write_error(exc, shown, "cannot open the folder")
    if stat.S_ISLNK(st.st_mode):
        return TargetError("is a link; links inside a restore target are never followed", path=shown)
    if not stat.S_ISDIR(st.st_mode):
        return TargetError("exists and is not a folder", path=shown)
    return write_error(exc, shown, "cannot open the folder")


def _open_dir(dir_fd: int, name: str, shown: str, *, create: bool) -> int:
    """The folder ``name`` inside ``dir_fd`` (made if missing and ``create``), never through a link."""
    if create:
        try:
            os.mkdir(name, 0o777, dir_fd=dir_fd)
        except FileExistsError:
            pass  # an existing folder is used; the open below refuses anything else
        except OSError as exc:
            raise write_error(exc, shown, "cannot create the folder") from exc
    try:
        return os.open(name, _DIR_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        raise _in_the_way(dir_fd, name, shown, exc) from exc


def _open_given(path: str) -> int:
    """The folder the user named, following links in that path; missing parts are created."""
    try:
        return os.open(path, _DIR)
    except FileNotFoundError:
        pass
    except NotADirectoryError as exc:
        raise TargetError("is not a folder", path=path) from exc
    except OSError as exc:
        raise write_error(exc, path, "cannot open the folder") from exc
    head, name = os.path.split(path.rstrip("/"))
    if not name or name in (".", ".."):
        raise TargetError("cannot open the folder", path=path)
    parent = _open_given(head or ".")
    try:
        return _open_dir(parent, name, path, create=True)
    finally:
        os.close(parent)


def _name_max(fd: int) -> int:
    try:
        return int(os.fpathconf(fd, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


@dataclass
class Partial:
    """A file being written in the work folder; ``fd`` is the restore's own descriptor of it."""

    name: str
    fd: int = -1


class RestoreTarget:
    """The folder a restore writes into. ``open``, ``begin``, create and ``place`` files, ``finish``."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        #: open folders, least recently used first (the target itself, "", always)
        self._dirs: collections.OrderedDict[str, int] = collections.OrderedDict({"": fd})
        #: (device, inode) of every folder this restore opened, to know one put in its place
        self._dir_ids: dict[str, tuple[int, int]] = {}
        self._name_max = _name_max(fd)
        self._work = ""
        self._work_fd = -1
        self._journal_fd = -1
        #: files placed by this run and adopted from an interrupted one
        self._placed = 0
        self._adopted: dict[str, tuple[int, ...]] = {}
        self._partials: list[Partial] = []
        self._count = 0
        #: what the restore found and did beyond the files themselves (leftovers, resumption)
        self.notes: list[str] = []

    # ---------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str, *, subfolder: str | None = None) -> RestoreTarget:
        """The folder ``path`` (links in it followed, missing parts created), or its new or
        existing ``subfolder`` (one name; never a link)."""
        if not path:
            raise TargetError("no target folder given", path=path)
        if "\0" in path:
            raise TargetError("the path holds a NUL byte", path=repr(path))
        if platform.WINDOWS:
            raise TargetError(f"restoring into a folder {platform.NO_FOLDER_DESCRIPTORS}", path=path)
        shown = os.path.abspath(path)
        fd = _open_given(path)
        if subfolder is not None:
            try:
                sub = _open_dir(fd, subfolder, os.path.join(shown, subfolder), create=True)
            finally:
                os.close(fd)
            fd, shown = sub, os.path.join(shown, subfolder)
        return cls(shown, fd)

    def shown(self, rel: str) -> str:
        """``rel`` as a path for messages and parent references."""
        return os.path.join(self.path, rel) if rel else self.path

    # ---------------------------------------------------------------------------- names

    def _walk_existing(self, parts: list[str]) -> tuple[int, list[int]] | None:
        """The descriptor of the existing folder ``parts`` (and the ones opened on the way),
        or None if a part does not exist yet; a link or a file in the way is an error."""
        fd, opened = self._fd, list[int]()
        try:
            for i, part in enumerate(parts):
                shown = self.shown("/".join(parts[: i + 1]))
                try:
                    st = os.lstat(part, dir_fd=fd)
                except FileNotFoundError:
                    for o in opened:
                        os.close(o)
                    return None
                except OSError as exc:
                    raise write_error(exc, shown, "cannot look at the folder") from exc
                if stat.S_ISLNK(st.st_mode):
                    raise TargetError("is a link; links inside a restore target are never followed", path=shown)
                if not stat.S_ISDIR(st.st_mode):
                    raise TargetError("exists and is not a folder", path=shown)
                fd = _open_dir(fd, part, shown, create=False)
                opened.append(fd)
        except BaseException:
            for o in opened:
                os.close(o)
            raise
        return fd, opened

    def _check_names(self, parts: list[str]) -> None:
        if _WORK_NAME.match(parts[0]):
            # a name from the snapshot (a guest's folder, a VM folder's file) that a later restore
            # here would take for a dead restore's work folder, and remove
            raise TargetError(
                "is named like a restore's work folder; it is not restored at the top of a target",
                path=self.shown(parts[0]),
            )
        for i, part in enumerate(parts):
            if len(os.fsencode(part)) > self._name_max:
                raise TargetError(
                    f"the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; "
                    f"the target's file system holds at most {self._name_max}",
                    path=self.shown("/".join(parts[:i])),
                )

    def check_free(self, rel: str) -> None:
        """Refuse now, before anything is written, what would refuse ``rel`` later: a name too
        long for the file system, a link or file where a folder goes, an existing name."""
        parts = rel.split("/")
        self._check_names(parts)
        found = self._walk_existing(parts[:-1])
        if found is None:
            return  # its folder does not exist yet: nothing can be in the way
        fd, opened = found
        try:
            os.lstat(parts[-1], dir_fd=fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise write_error(exc, self.shown(rel), "cannot look at the name") from exc
        finally:
            for o in opened:
                os.close(o)
        raise TargetError("exists; restore into an empty folder (nothing was overwritten)", path=self.shown(rel))

    def check_folder(self, rel: str) -> None:
        """Refuse now, before anything is written, what would refuse the folder ``rel`` later: a
        name too long, a link or a file where it or one of its parents goes. An existing
        folder is fine: it is used."""
        parts = rel.split("/")
        self._check_names(parts)
        found = self._walk_existing(parts)
        if found is not None:
            for o in found[1]:
                os.close(o)

    def folder(self, rel: str) -> None:
        """Make the folder ``rel`` (and its parents) unless it exists; never through a link."""
        self._folder(rel)

    def set_folder_time(self, rel: str, mtime_ns: int) -> None:
        """Give the folder ``rel`` (made or used by this restore) its modification time, through
        its descriptor. Last, when everything in it is placed: placing a name changes it."""
        try:
            os.utime(self._folder(rel), ns=(mtime_ns, mtime_ns))
        except OSError as exc:
            raise write_error(exc, self.shown(rel), "cannot set the folder's time") from exc
        except OverflowError as exc:
            raise TargetError(f"the stored time {mtime_ns} ns cannot be set", path=self.shown(rel)) from exc

    def _folder(self, rel_dir: str) -> int:
        """The descriptor of folder ``rel_dir`` of the target, created (never through a link).

        At most :data:`_MAX_OPEN_FOLDERS` stay open (a tree of thousands of folders would run out
        of descriptors); one closed is opened again from its parent, never through a link, and
        must be the very folder it was (device and inode), not one put under its name since."""
        fd = self._dirs.get(rel_dir)
        if fd is not None:
            self._dirs.move_to_end(rel_dir)
            return fd
        head, _, name = rel_dir.rpartition("/")
        parent = self._folder(head)
        shown = self.shown(rel_dir)
        fd = _open_dir(parent, name, shown, create=True)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise write_error(exc, shown, "cannot open the folder") from exc
        if self._dir_ids.setdefault(rel_dir, (st.st_dev, st.st_ino)) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise TargetError("was replaced by another folder during the restore; nothing more is written", path=shown)
        self._dirs[rel_dir] = fd
        while len(self._dirs) > _MAX_OPEN_FOLDERS:
            oldest = next(k for k in self._dirs if k and k != rel_dir)  # the target itself stays open
            os.close(self._dirs.pop(oldest))
        return fd

    def _still_placed(self, rel: str, identity: tuple[int, ...]) -> bool:
        parts = rel.split("/")
        try:
            found = self._walk_existing(parts[:-1])
        except TargetError:
            return False
        if found is None:
            return False
        fd, opened = found
        try:
            st = os.lstat(parts[-1], dir_fd=fd)
        except OSError:
            return False
        finally:
            for o in opened:
                os.close(o)
        return (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and _identity(st) == identity

    def is_placed(self, rel: str) -> bool:
        """``rel`` was restored by an interrupted run of this same restore and is still that file (or link)."""
        return rel in self._adopted

    # ---------------------------------------------------------------------------- work folder

    def begin(self, restore: dict[str, Any]) -> None:
        """Take over what a dead run of the same ``restore`` left, then make this run's work folder."""
        self._reclaim_leftovers(restore)
        for _ in range(16):
            name = WORK_PREFIX + secrets.token_hex(8)
            try:
                os.mkdir(name, 0o700, dir_fd=self._fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise write_error(exc, self.shown(name), "cannot create the restore's work folder") from exc
            break
        else:  # pragma: no cover - 16 collisions of 64 random bits
            raise TargetError("cannot find a free name for the restore's work folder", path=self.path)
        fd = _open_dir(self._fd, name, self.shown(name), create=False)
        st = os.fstat(fd)
        if st.st_uid != platform.current_uid() or stat.S_IMODE(st.st_mode) & 0o077:
            os.close(fd)  # someone swapped it between mkdir and open
            raise TargetError("the restore's work folder was replaced by someone else's", path=self.shown(name))
        try:
            if not platform.lock_folder(fd):
                raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))
        except OSError as exc:  # a file system without locks: a rerun cannot lock it either, and leaves it
            self.notes.append(f"cannot lock the work folder ({exc.strerror}); do not run two restores here at once")
        self._work, self._work_fd = name, fd
        header = {
            "format": _JOURNAL_FORMAT,
            "version": 2,
            "restore": restore,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
        }
        lines = [header, *([rel, *identity] for rel, identity in sorted(self._adopted.items()))]
        self._placed = len(self._adopted)
        data = b"".join(json.dumps(line, sort_keys=True).encode() + b"\n" for line in lines)
        try:
            flags = os.O_WRONLY | os.O_TRUNC | os.O_CREAT | platform.O_NOFOLLOW | platform.O_CLOEXEC | platform.O_BINARY
            tmp = os.open(_JOURNAL_TMP, flags, 0o600, dir_fd=self._work_fd)
            try:
                write_all(tmp, data, self.shown(self._work))
                os.fsync(tmp)
            finally:
                os.close(tmp)
            os.replace(_JOURNAL_TMP, _JOURNAL, src_dir_fd=self._work_fd, dst_dir_fd=self._work_fd)
            _sync_dir(self._work_fd)
            append = os.O_WRONLY | os.O_APPEND | platform.O_NOFOLLOW | platform.O_CLOEXEC | platform.O_BINARY
            self._journal_fd = os.open(_JOURNAL, append, dir_fd=self._work_fd)
        except OSError as exc:
            raise write_error(exc, self.shown(f"{self._work}/{_JOURNAL}"), "cannot write the restore journal") from exc

    def _journal_line(self, line: list[Any]) -> None:
        """Append ``line`` to the journal and make it durable: ``[rel, *identity]`` for a file about
        to be placed, ``[rel]`` for one that was not placed after all."""
        try:
            write_all(self._journal_fd, json.dumps(line).encode() + b"\n", self.shown(self._work))
            os.fsync(self._journal_fd)
        except OSError as exc:
            raise write_error(exc, self.shown(f"{self._work}/{_JOURNAL}"), "cannot write the restore journal") from exc

    def _reclaim_leftovers(self, restore: dict[str, Any]) -> None:
        try:
            names = sorted(n for n in os.listdir(self._fd) if _WORK_NAME.match(n))
        except OSError as exc:
            raise write_error(exc, self.path, "cannot list the folder") from exc
        for name in names:
            why = self._reclaim(name, restore)
            if why:
                self.notes.append(f"left {self.shown(name)} alone: {why}")

    def _reclaim(self, name: str, restore: dict[str, Any]) -> str | None:
        """Remove a dead restore's work folder (adopting its placed files if it was this same
        restore); the reason it was left alone otherwise."""
        try:
            fd = os.open(name, _DIR_NOFOLLOW, dir_fd=self._fd)
        except OSError:
            return "not a folder of a vmvault restore (a link, or not a folder)"
        try:
            st = os.fstat(fd)
            if st.st_uid != platform.current_uid() or stat.S_IMODE(st.st_mode) & 0o077:
                return "not a work folder of a vmvault restore run by this user (owner or mode)"
            if not platform.lock_folder(fd):
                return "another restore into this folder is running"
            journal = _read_journal(fd)
            if journal is None:
                return "it holds no journal of a vmvault restore"
            entries = os.listdir(fd)
            for entry in entries:
                if entry not in (_JOURNAL, _JOURNAL_TMP) and not _PARTIAL_NAME.match(entry):
                    return f"it holds {entry!r}, which no restore writes"
                mode = os.lstat(entry, dir_fd=fd).st_mode
                if not (stat.S_ISREG(mode) or (stat.S_ISLNK(mode) and _PARTIAL_NAME.match(entry))):
                    return f"{entry!r} in it is not a regular file"
            kept = 0
            if journal["restore"] == restore:
                for rel, *identity in journal["placed"]:
                    if self._still_placed(rel, tuple(identity)):
                        self._adopted[rel] = tuple(identity)
                        kept += 1
            for entry in entries:
                os.unlink(entry, dir_fd=fd)
            os.rmdir(name, dir_fd=self._fd)
        except OSError as exc:
            return f"cannot clean it up: {exc.strerror or exc}"
        finally:
            os.close(fd)
        try:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(journal["started"]))
        except (OverflowError, ValueError, OSError):
            started = "at an unknown time"
        what = f"removed the partial files of an interrupted restore (started {started}, pid {journal['pid']})"
        if kept:
            what += f"; resuming it: {kept} files it completed are kept"
        self.notes.append(what)
        return None

    # ---------------------------------------------------------------------------- files

    def new_partial(self) -> Partial:
        self._count += 1
        partial = Partial(f"{self._count}.partial")
        self._partials.append(partial)
        return partial

    def _create(self, partial: Partial, flags: int) -> int:
        fd = os.open(partial.name, flags | _NEW_FILE, 0o600, dir_fd=self._work_fd)
        if partial.fd < 0:
            partial.fd = os.dup(fd)
        return fd

    def opener(self, partial: Partial) -> Opener:
        """An ``Opener`` for a disk writer: the file is ``partial`` in the work folder."""
        return lambda _path, flags: self._create(partial, flags)

    def check_size(self, size: int, rel: str) -> None:
        """Refuse now, before anything is written, a file of ``size`` bytes (to be placed at
        ``rel``) that the target's file system cannot hold: a sparse file of that size is made
        in the work folder and removed (a size a source claims is untrusted; 8 EiB is a number)."""
        partial = self.new_partial()
        try:
            fd = self.create(partial, rel)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except (OSError, OverflowError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EFBIG, errno.EINVAL):
                raise write_error(exc, self.shown(rel), "cannot create") from exc
            raise TargetError(
                f"is {size} bytes, more than the target's file system holds in one file", path=self.shown(rel)
            ) from exc
        finally:
            self.discard(partial)

    def create(self, partial: Partial, rel: str) -> int:
        """A descriptor to write ``partial`` (to be placed at ``rel``) with; the caller closes it."""
        try:
            return self._create(partial, os.O_WRONLY)
        except OSError as exc:
            raise write_error(exc, self.shown(rel), "cannot create") from exc

    def place(
        self, partial: Partial, rel: str, *, mode: int, owner: tuple[int, int] | None, mtime_ns: int | None
    ) -> None:
        """Give the written ``partial`` its owner, mode and time, make it durable, journal it, and
        rename it to ``rel`` unless that name exists."""
        shown = self.shown(rel)
        fd = partial.fd
        try:
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, mode)  # after chown, which clears setuid/setgid
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            os.fsync(fd)
            st = os.fstat(fd)
        except OSError as exc:
            raise write_error(exc, shown, "cannot finish the file") from exc
        self._move_into_place(partial, rel, st)

    def place_link(self, rel: str, link_target: str) -> None:
        """Make ``rel`` a symbolic link to ``link_target``, as stored: the target is written as
        given, never followed, resolved or checked (a link to ``../../etc`` is restored as
        that link, and reading it later is the reader's business). Made in the work folder,
        journaled and renamed into place like a file, never over an existing name."""
        shown = self.shown(rel)
        if not link_target or "\0" in link_target:
            raise TargetError("the stored link has an empty target or one with a NUL byte", path=shown)
        partial = self.new_partial()
        try:
            os.symlink(link_target, partial.name, dir_fd=self._work_fd)
            st = os.lstat(partial.name, dir_fd=self._work_fd)
        except OSError as exc:
            self.discard(partial)
            raise write_error(exc, shown, "cannot create the link") from exc
        self._move_into_place(partial, rel, st)

    def _move_into_place(self, partial: Partial, rel: str, st: os.stat_result) -> None:
        """Journal the finished ``partial`` and rename it to ``rel`` unless that name exists."""
        shown = self.shown(rel)
        head, _, name = rel.rpartition("/")
        folder = self._folder(head)
        self._journal_line([rel, *_identity(st)])  # before the rename: a kill after it still knows the file is ours
        try:
            rename_noreplace(self._work_fd, partial.name, folder, name)
            _sync_dir(folder)
        except OSError as exc:
            self._journal_line([rel])
            if exc.errno == errno.EEXIST:
                raise TargetError("exists; restore into an empty folder (nothing was overwritten)", path=shown) from exc
            if exc.errno == errno.EXDEV:
                raise TargetError(
                    "its folder is on another file system than the target folder; restore into one file system",
                    path=shown,
                ) from exc
            raise write_error(exc, shown, "cannot move into place") from exc
        self._placed += 1
        self._forget(partial)

    def _forget(self, partial: Partial) -> None:
        if partial.fd >= 0:
            os.close(partial.fd)
            partial.fd = -1
        if partial in self._partials:
            self._partials.remove(partial)

    def discard(self, partial: Partial) -> None:
        """Remove a partial file that will not be placed."""
        self._forget(partial)
        # never created, or already gone; the next run removes what is left
        with contextlib.suppress(OSError):
            os.unlink(partial.name, dir_fd=self._work_fd)

    # ---------------------------------------------------------------------------- end

    def finish(self) -> None:
        """Everything is placed: remove the work folder."""
        for partial in list(self._partials):
            self.discard(partial)
        self._remove_work()

    def abort(self) -> None:
        """A failed restore: partial files go; the journal stays if files were placed, so a rerun resumes."""
        if self._work_fd < 0:
            return
        for partial in list(self._partials):
            self.discard(partial)
        if not self._placed:
            self._remove_work()

    def _remove_work(self) -> None:
        if self._work_fd < 0:
            return
        self._close_journal()
        for name in (_JOURNAL_TMP, _JOURNAL):
            try:
                os.unlink(name, dir_fd=self._work_fd)
            except FileNotFoundError:
                pass
            except OSError:
                return  # left for the next run to clean up
        try:
            os.rmdir(self._work, dir_fd=self._fd)
            _sync_dir(self._fd)
        except OSError:
            pass  # renamed or filled by someone else: left alone, as any other entry

    def _close_journal(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1

    def close(self) -> None:
        for partial in list(self._partials):
            self._forget(partial)
        self._close_journal()
        if self._work_fd >= 0:
            os.close(self._work_fd)  # releases the lock
            self._work_fd = -1
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()


def _sync_dir(fd: int) -> None:
    """fsync a folder, so the names in it last; file systems that cannot (EINVAL) are let be."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What says a file is still the one a restore placed: the same file (device, inode), not
    rewritten (size, modification time). Against accidents: whoever may write the folder can
    always replace a restored file later, resumed or not."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def write_all(fd: int, data: bytes | memoryview, shown: str) -> None:
    """Write all of ``data`` at ``fd``'s position; a failure names ``shown`` (a full disk: ``TargetFullError``)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[: platform.WRITE_SLICE])
        except OSError as exc:
            raise write_error(exc, shown, "write failed") from exc
        view = view[n:]


def _read_journal(dir_fd: int) -> dict[str, Any] | None:
    """A work folder's journal if it is one vmvault wrote, else None: its header with ``placed``,
    the files it names as placed. Version 2 is a header line and a line per file (``[rel]``
    takes one back; a last line cut short by a kill is no line); version 1 was one document."""
    try:
        fd = os.open(
            _JOURNAL, os.O_RDONLY | platform.O_NOFOLLOW | platform.O_NONBLOCK | platform.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_JOURNAL:
            return None
        data = platform.pread(fd, _MAX_JOURNAL + 1, 0)
        first, _, rest = data.partition(b"\n")
        doc = shape.loads(first)
        if isinstance(doc, dict) and doc.get("version") == 2:
            doc["placed"] = _journal_lines(rest)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(doc, dict) or doc.get("format") != _JOURNAL_FORMAT or doc.get("version") not in (1, 2):
        return None
    placed, started, pid = doc.get("placed"), doc.get("started"), doc.get("pid")
    if not isinstance(placed, list) or not isinstance(doc.get("restore"), dict):
        return None
    if not isinstance(started, int | float) or not isinstance(pid, int):
        return None
    for entry in placed:
        if not (
            isinstance(entry, list)
            and len(entry) == 5
            and isinstance(entry[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:])
        ):
            return None
    return doc


def _journal_lines(data: bytes) -> list[Any] | None:
    """The files a version 2 journal's lines name as placed, in order; None if a line (but a
    last one cut short) is not one vmvault writes."""
    placed: dict[str, list[Any]] = {}
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        if not raw:
            continue
        try:
            line = shape.loads(raw)
        except ValueError:
            if i == len(lines) - 1:
                break  # cut short by a kill while it was appended: its file was never renamed
            raise
        if isinstance(line, list) and len(line) == 1 and isinstance(line[0], str):
            placed.pop(line[0], None)
        elif isinstance(line, list) and len(line) == 5 and isinstance(line[0], str):
            placed[line[0]] = line
        else:
            return None
    return list(placed.values())

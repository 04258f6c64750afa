"""A read-only view of a repository's snapshots as files: ``vmvault mount``.

The view (:class:`MountView`) is a tree built once, when the mount starts, from the snapshots
asked for::

    by-vm/<vm>/<YYYY-MM-DD>T<HHMMSS>Z_<id>/<disk>.raw   each disk as a flat raw image
    by-vm/<vm>/<YYYY-MM-DD>T<HHMMSS>Z_<id>/<file>       the VM's other files
    by-vm/<vm>/latest -> <the newest snapshot's folder>

A disk file is the disk as the guest saw it at the backup, its checkpoint layers resolved
(each layer of a chain is a disk of its own: ``guest.vhdx.raw`` as it was when the checkpoint
was taken, ``guest_ckpt.avhdx.raw`` as it was at the backup). It is read through
:class:`~vmvault.engine.reader.DiskReader`: one reader per open file (so each sequential
reader gets its own read-ahead), all sharing one :class:`~vmvault.engine.reader.ChunkCache`
bounded in bytes. Holes and zero chunks read as zeros and are reported as holes to
``lseek(SEEK_DATA/SEEK_HOLE)``.

Every name in the view comes from the repository's storage, which is not trusted: a name part
that is empty, ``.``, ``..``, holds ``/`` or NUL, or is longer than 255 bytes is left out with
a warning (a VM name is made safe instead: ``/`` and NUL become ``_``). A read that fails (a
damaged or missing chunk, the storage unreachable) answers EIO for that request and logs one
line naming the snapshot, the file or disk and the offset; the mount goes on serving the rest.

Who may read: the files are decrypted disks. By default only the user who mounted reaches the
mount (FUSE's own rule: not even root otherwise). ``group`` makes it 0440/0550 for that group, to
be mounted with ``allow_other`` so that its members (a ``libvirt-qemu`` QEMU) and no one else
read it; ``allow_other`` without a group lets every local user read every disk.

The FUSE side is :func:`serve`, through ``mfusepy`` (ctypes over libfuse 3, Debian's
``fuse3``), imported only when a mount is made.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import logging
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault.disk.base import ExtentKind
from vmvault.errors import ConfigError, IntegrityError, MissingDependencyError, TargetError, VmvaultError, require
from vmvault.repo.filters import vm_name
from vmvault.repo.format import BlobType
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, FileRecord, Snapshot

from .reader import MAX_READ, ChunkCache, DiskReader, cache_bytes_for

__all__ = ["FSTYPE", "MountView", "binding", "check_mountpoint", "serve"]

log = logging.getLogger("vmvault.mount")

#: the file system type the kernel shows for a vmvault mount (``/proc/self/mountinfo``)
FSTYPE = "fuse.vmvault"
_NAME_MAX = 255
#: a failed range is logged again at most this often (a program retrying a read must not flood the log)
_RELOG_SECONDS = 60.0
#: lseek looks at this many chunks' index entries at a time
_SEEK_WINDOW = 4096
#: the most the kernel reads ahead of a reader of a mounted file in one go
_KERNEL_READAHEAD = 1 << 20
#: threads fetching chunks ahead of sequential readers (the cache's read-ahead pool)
_FETCH_THREADS = 4
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


# ------------------------------------------------------------------------------------- the tree


@dataclass
class _Node:
    kind: str  # "dir", "disk", "file" or "link"
    mtime_ns: int
    children: dict[str, _Node] = field(default_factory=dict)
    size: int = 0
    snapshot: Snapshot | None = None
    disk: DiskRecord | None = None
    file: FileRecord | None = None
    #: the record's place in its snapshot's disks or files (to find it in the whole snapshot)
    position: int = 0
    target: str = ""


def _safe_part(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\0" not in name
        and len(os.fsencode(name)) <= _NAME_MAX
    )


def _vm_name(snap: Snapshot) -> str:
    """The VM's folder name: ``vm_name`` (as the snapshot filters match it), made one safe name."""
    name = vm_name(snap) or "unnamed"
    name = name.replace("/", "_").replace("\0", "_")
    if name in (".", ".."):
        name = name.replace(".", "_")
    return name[:200]


def _time_ns(snap: Snapshot) -> int:
    try:
        when = dt.datetime.fromisoformat(snap.time)
    except (TypeError, ValueError):
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp()) * 1_000_000_000


def _folder_name(snap: Snapshot, ns: int) -> str:
    stamp = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    return f"{stamp}_{snap.short_id}"


def _disk_file_name(name: str) -> str:
    """A disk's name in the view: its stored name with ``.raw`` added (the file holds raw bytes,
    whatever format the disk was stored from) unless it is already ``.raw`` or ``.img``."""
    return name if name.lower().endswith((".raw", ".img")) else name + ".raw"


class MountView:
    """The tree of a mount and the reads behind it; thread-safe, independent of FUSE.

    ``cache_bytes`` bounds the decrypted chunks kept; ``readahead`` is the most chunks a
    sequential reader of one open disk has fetched ahead. ``group``: the group that may read
    (files 0440, folders 0550, owned by that group); without it files are 0444, folders 0555.
    """

    def __init__(
        self,
        repo: Repository,
        snapshots: list[Snapshot],
        *,
        cache_bytes: int | None = None,
        readahead: int | None = None,
        group: int | None = None,
    ) -> None:
        self.repo = repo
        self.cache = ChunkCache(max_bytes=cache_bytes_for(repo, cache_bytes), readahead_threads=_FETCH_THREADS)
        self.readahead = readahead
        self.uid, self.gid = os.getuid(), os.getgid() if group is None else group
        #: permission bits of files and folders: none for "other" when a group is named
        self._file_mode, self._dir_mode = (0o444, 0o555) if group is None else (0o440, 0o550)
        self.started_ns = time.time_ns()
        self.root = _Node("dir", self.started_ns)
        self.snapshots = 0
        self.left_out: list[str] = []
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self._logged: dict[str, float] = {}
        #: read requests answered, and their bytes (the kernel's page cache answers the rest)
        self.reads_served = 0
        self.bytes_served = 0
        by_vm = self._dir(self.root, "by-vm", self.started_ns)
        newest: dict[str, tuple[int, str, str]] = {}
        for snap in snapshots:
            self._add(by_vm, snap, newest)
        for vm, (_, _, folder) in newest.items():
            by_vm.children[vm].children["latest"] = _Node("link", by_vm.children[vm].mtime_ns, target=folder)

    # ---------------------------------------------------------------------------- building

    @staticmethod
    def _dir(parent: _Node, name: str, mtime_ns: int) -> _Node:
        node = parent.children.get(name)
        if node is None:
            node = parent.children[name] = _Node("dir", mtime_ns)
        return node

    def _leave_out(self, snap: Snapshot, what: str, why: str) -> None:
        self.left_out.append(f"snapshot {snap.short_id}: {what!r} {why}")
        log.warning("left out of the mount: snapshot %s: %r %s", snap.short_id, what, why)

    def _add(self, by_vm: _Node, snap: Snapshot, newest: dict[str, tuple[int, str, str]]) -> None:
        ns = _time_ns(snap)
        vm = _vm_name(snap)
        vm_node = self._dir(by_vm, vm, ns)
        vm_node.mtime_ns = max(vm_node.mtime_ns, ns)
        folder = _folder_name(snap, ns)
        if folder in vm_node.children:  # two snapshots whose ids share 8 digits, at the same second
            folder = f"{folder[: -len(snap.short_id)]}{snap.id}"
        node = vm_node.children[folder] = _Node("dir", ns)
        self.snapshots += 1
        if vm not in newest or (ns, snap.id) > newest[vm][:2]:
            newest[vm] = (ns, snap.id, folder)
        for n, record in enumerate(snap.disks):
            leaf = _Node("disk", ns, size=record.size, disk=record, position=n)
            self._place(snap, node, _disk_file_name(record.name), leaf)
        for n, f in enumerate(snap.files):
            self._place(snap, node, f.name, _Node("file", f.mtime_ns, size=f.size, file=f, position=n))
        for leaf in _leaves(node):
            leaf.snapshot = snap

    def _place(self, snap: Snapshot, top: _Node, name: str, leaf: _Node) -> None:
        parts = name.split("/")
        if not all(_safe_part(p) for p in parts):
            self._leave_out(snap, name, "is not a name the view can show")
            return
        folder = top
        for part in parts[:-1]:
            found = folder.children.get(part)
            if found is not None and found.kind != "dir":
                self._leave_out(snap, name, f"has {part!r} both as a file and as a folder")
                return
            folder = self._dir(folder, part, top.mtime_ns)
        if parts[-1] in folder.children:
            self._leave_out(snap, name, "names something already in the snapshot's folder")
            return
        folder.children[parts[-1]] = leaf

    # ---------------------------------------------------------------------------- lookups

    def node(self, path: str) -> _Node:
        """The node at ``path`` (``/by-vm/...``); ENOENT/ENOTDIR as OSError otherwise."""
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if node.kind != "dir":
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            child = node.children.get(part)
            if child is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            node = child
        return node

    def getattr(self, path: str) -> dict[str, int]:
        node = self.node(path)
        if node.kind == "dir":
            mode = stat.S_IFDIR | self._dir_mode
            nlink = 2 + sum(1 for c in node.children.values() if c.kind == "dir")
            size = 0
        elif node.kind == "link":
            mode, nlink, size = stat.S_IFLNK | 0o777, 1, len(os.fsencode(node.target))
        else:
            mode, nlink, size = stat.S_IFREG | self._file_mode, 1, node.size
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.mtime_ns,
            "st_atime": node.mtime_ns,
            "st_blocks": -(-size // 512),
            "st_blksize": 128 * 1024,
        }

    def readdir(self, path: str) -> list[str]:
        node = self.node(path)
        if node.kind != "dir":
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return [".", "..", *sorted(node.children)]

    def readlink(self, path: str) -> str:
        node = self.node(path)
        if node.kind != "link":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return node.target

    # ---------------------------------------------------------------------------- files

    def open(self, path: str, flags: int) -> int:
        node = self.node(path)
        if node.kind == "dir":
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if node.kind not in ("disk", "file"):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        handle = _Handle(node, path, *self._whole(node, path))
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def _whole(self, node: _Node, path: str) -> tuple[Snapshot, DiskRecord | None, FileRecord | None]:
        """The node's snapshot and record with their ids: those placed, when the view was given
        whole snapshots; else (a view of every snapshot holds summaries, repository-format.md
        12.10) the snapshot read again whole from this host's copy, held by the handle while it
        is open, not by the view. A snapshot that no longer reads is EIO, logged."""
        snap = node.snapshot
        assert snap is not None
        if not snap.is_summary:
            return snap, node.disk, node.file
        try:
            whole = self.repo.load_snapshot(snap.id, listed=True)
        except VmvaultError as exc:
            log.error("cannot open %s: snapshot %s no longer reads: %s", path, snap.short_id, exc)
            raise OSError(errno.EIO, os.strerror(errno.EIO), path) from exc
        if node.kind == "disk":
            return whole, whole.disks[node.position], None
        return whole, None, whole.files[node.position]

    def _handle(self, fh: int) -> _Handle:
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return handle

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.close()

    def _reader(self, handle: _Handle) -> DiskReader:
        with handle.lock:
            if handle.reader is None:
                assert handle.disk is not None
                handle.reader = DiskReader(
                    self.repo, handle.snapshot, handle.disk, cache=self.cache, readahead=self.readahead
                )
            return handle.reader

    def read(self, fh: int, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset`` of an open file; a failure is logged and is EIO."""
        buf = bytearray(max(0, min(size, MAX_READ)))
        return bytes(memoryview(buf)[: self.read_into(fh, buf, offset)])

    def read_into(self, fh: int, buf: bytearray | memoryview, offset: int) -> int:
        """Fill ``buf`` (at most :data:`MAX_READ` of it) with the bytes at ``offset`` of an open
        file; how many were filled (fewer at its end). A failure is logged and is EIO."""
        handle = self._handle(fh)
        out = memoryview(buf).cast("B")[:MAX_READ]
        try:
            if handle.node.kind == "disk":
                filled = self._reader(handle).read_into(offset, out)
            else:
                filled = self._read_file_into(handle, offset, out)
            with self._lock:
                self.reads_served += 1
                self.bytes_served += filled
            return filled
        except Exception as exc:  # any failure of one read is EIO for it, never the mount's end
            self._failed(handle, offset, len(out), exc)
            raise OSError(errno.EIO, os.strerror(errno.EIO), handle.path) from exc

    def _failed(self, handle: _Handle, offset: int, size: int, exc: Exception) -> None:
        node = handle.node
        snap = node.snapshot
        what = f"disk {node.disk.name}" if node.disk is not None else f"file {node.file.name if node.file else '?'}"
        reason = str(exc) if isinstance(exc, VmvaultError) else f"{type(exc).__name__}: {exc}"
        line = (
            f"read error (EIO) in snapshot {snap.short_id if snap else '?'}, {what}, "
            f"offset {offset} ({offset:#x}), {size} bytes: {reason}"
        )
        key = f"{id(node)}:{offset}"
        now = time.monotonic()
        with self._lock:
            last = self._logged.get(key)
            if last is not None and now - last < _RELOG_SECONDS:
                return
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[key] = now
        log.error("%s", line)

    def _read_file_into(self, handle: _Handle, offset: int, out: memoryview) -> int:
        """A VM file: its chunks are the repository's chunk size each, the last one shorter."""
        f = handle.file
        assert f is not None
        if offset < 0:
            raise ValueError(f"cannot read at offset {offset}")
        end = min(offset + len(out), f.size)
        if offset >= end:
            return 0
        cs = self.repo.config.chunk_size
        if len(f.chunks) != -(-f.size // cs):
            raise IntegrityError(f"file {f.name} has {len(f.chunks)} chunks for {f.size} bytes")
        for i in range(offset // cs, (end - 1) // cs + 1):
            try:
                chunk_id = bytes.fromhex(f.chunks[i])
            except ValueError as exc:
                raise IntegrityError(f"file {f.name}: chunk {i} has a malformed id") from exc
            data = self.cache.get(chunk_id, self._fetch_data)
            want = min(cs, f.size - i * cs)
            if len(data) != want:
                raise IntegrityError(f"chunk {chunk_id.hex()} holds {len(data)} bytes where file {f.name} needs {want}")
            base = i * cs
            lo, hi = max(offset, base) - base, min(end, base + cs) - base
            out[base + lo - offset : base + hi - offset] = memoryview(data)[lo:hi]
        return end - offset

    def _fetch_data(self, chunk_id: bytes) -> bytes:
        return self.repo.get_blob(BlobType.DATA, chunk_id)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the index alone (a disk's holes and zero chunks are holes;
        a VM file is all data). ENXIO at or past the end, as lseek(2) says."""
        handle = self._handle(fh)
        node = handle.node
        if whence not in (_SEEK_DATA, _SEEK_HOLE):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), handle.path)
        if offset < 0 or offset >= node.size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), handle.path)
        if node.kind != "disk":
            return offset if whence == _SEEK_DATA else node.size
        reader = self._reader(handle)
        want_data = whence == _SEEK_DATA
        step = _SEEK_WINDOW * reader.chunk_size
        pos = offset
        try:
            while pos < node.size:
                for extent in reader.block_status(pos, min(step, node.size - pos)):
                    if (extent.kind is ExtentKind.DATA) == want_data:
                        return max(extent.offset, offset)
                pos += step
        except Exception as exc:  # a damaged index block: EIO for this call only
            self._failed(handle, pos, 0, exc)
            raise OSError(errno.EIO, os.strerror(errno.EIO), handle.path) from exc
        if want_data:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), handle.path)
        return node.size

    def statfs(self) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": _NAME_MAX}

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()
        self.cache.close()


class _Handle:
    def __init__(
        self, node: _Node, path: str, snapshot: Snapshot, disk: DiskRecord | None, file: FileRecord | None
    ) -> None:
        self.node = node
        self.path = path
        #: whole (with the ids), where the node may hold a summary
        self.snapshot, self.disk, self.file = snapshot, disk, file
        self.reader: DiskReader | None = None
        self.lock = threading.Lock()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()  # its cache is the view's, shared: closing the reader leaves it


def _leaves(node: _Node) -> Iterator[_Node]:
    for child in node.children.values():
        if child.kind == "dir":
            yield from _leaves(child)
        else:
            yield child


# ------------------------------------------------------------------------------------- mount point


def _mounts() -> dict[str, tuple[str, str]]:
    """Mount point -> (file system type, its device ``major:minor``), from
    ``/proc/self/mountinfo`` (the last mount on a point, the one on top, wins)."""
    out: dict[str, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) >= 5 and rest:
                    point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                    out[point.replace("\\134", "\\")] = (rest[0], fields[2])
    except OSError:
        pass
    return out


def _mount_types() -> dict[str, str]:
    """Mount point -> file system type."""
    return {point: fstype for point, (fstype, _device) in _mounts().items()}


def raise_readahead(mountpoint: str, kib: int = _KERNEL_READAHEAD >> 10) -> bool:
    """Let the kernel read ahead ``kib`` KiB of a reader of the vmvault mount at ``mountpoint``
    (its real path, resolved before it was mounted on: resolving it now would ask the mount,
    which may not answer yet); whether it now does. A FUSE mount starts at the kernel's default
    of 128 KiB whatever libfuse asks for (the kernel takes the smaller), so a sequential
    reader's requests are 128 KiB each; the mount's ``read_ahead_kb`` in ``/sys/class/bdi``
    raises it, where this process may write there (root). Never lowered."""
    found = _mounts().get(mountpoint)
    if found is None or found[0] != FSTYPE or not re.fullmatch(r"\d+:\d+", found[1]):
        return False
    path = f"/sys/class/bdi/{found[1]}/read_ahead_kb"
    try:
        with open(path, "r+", encoding="ascii") as f:
            if int(f.read().strip()) < kib:
                f.seek(0)
                f.write(f"{kib}\n")
    except (OSError, ValueError) as exc:
        log.debug("the kernel's read-ahead of %s stays as it is: %s: %s", mountpoint, path, exc)
        return False
    return True


def check_mountpoint(path: str, *, notes: list[str] | None = None) -> str:
    """The absolute mount point, checked: an existing empty folder, not mounted on. A stale
    vmvault mount there (its process was killed) is unmounted with ``fusermount3 -u`` and said
    in ``notes``; any other stale mount is an error naming the command to clear it."""
    shown = os.path.realpath(path)
    stale = False
    try:
        st = os.stat(shown)
        if shown in _mount_types():
            os.listdir(shown)  # the kernel may answer stat from its cache; a dead mount fails here
    except FileNotFoundError as exc:
        raise TargetError("does not exist; create an empty folder to mount on", path=shown) from exc
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise TargetError(f"cannot use it as a mount point: {exc.strerror}", path=shown) from exc
        stale = True
    if stale:
        st = _clear_stale(shown, notes)
    if not stat.S_ISDIR(st.st_mode):
        raise TargetError("is not a folder", path=shown)
    if shown in _mount_types():
        raise TargetError(f"is already a mount point; unmount it first (fusermount3 -u {shown})", path=shown)
    try:
        if os.listdir(shown):
            raise TargetError("is not empty; mount on an empty folder", path=shown)
    except OSError as exc:
        raise TargetError(f"cannot list it: {exc.strerror}", path=shown) from exc
    return shown


def _clear_stale(shown: str, notes: list[str] | None) -> os.stat_result:
    fstype = _mount_types().get(shown)
    how = f"fusermount3 -u {shown}"
    if fstype != FSTYPE:
        raise TargetError(
            f"is a mount whose FUSE process is gone ({fstype or 'unknown type'}); unmount it first ({how})",
            path=shown,
        )
    try:
        done = subprocess.run(["fusermount3", "-u", shown], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TargetError(f"is a stale vmvault mount (its process was killed) and {how} failed: {exc}") from exc
    if done.returncode != 0:
        raise TargetError(
            f"is a stale vmvault mount (its process was killed) and {how} failed: "
            f"{(done.stderr or done.stdout).strip()[:200]}",
            path=shown,
        )
    if notes is not None:
        notes.append(f"unmounted the stale vmvault mount at {shown} (its process had been killed)")
    try:
        return os.stat(shown)
    except OSError as exc:
        raise TargetError(f"cannot use it as a mount point: {exc.strerror}", path=shown) from exc


# ------------------------------------------------------------------------------------- FUSE


def binding() -> Any:
    """The FUSE binding: mfusepy on libfuse 3 (never libfuse 2, which has no lseek), and a
    FUSE device; a one-line MissingDependencyError naming what to install otherwise."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would take libfuse 2 first
    try:
        module = require("mfusepy", purpose="vmvault mount", extra="mount")
    except (OSError, AttributeError) as exc:  # mfusepy found no libfuse 3
        raise MissingDependencyError(
            f"vmvault mount needs libfuse 3 (Debian package fuse3): {exc}", module="mfusepy"
        ) from exc
    if getattr(module, "fuse_version_major", 0) != 3:
        raise MissingDependencyError(
            "vmvault mount needs libfuse 3 (Debian package fuse3); mfusepy loaded another version",
            module="mfusepy",
        )
    if not os.path.exists("/dev/fuse"):
        raise MissingDependencyError(
            "vmvault mount needs /dev/fuse (the fuse kernel module; in a container, pass the device)",
            module="fuse",
        )
    return module


def serve(
    view: MountView,
    mountpoint: str,
    *,
    allow_other: bool = False,
    direct_io: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount ``view`` read-only at ``mountpoint`` and serve it (many requests at once) until it
    is unmounted: Ctrl-C, SIGTERM or ``fusermount3 -u``. Runs in the main thread (libfuse's
    signal handlers).

    By default the kernel keeps the pages it read (the files never change) and reads ahead for
    small sequential reads. ``direct_io`` (FUSE's own) passes the page cache for every reader:
    each read comes here, copied by the kernel straight into the reader's buffer, which large
    reads gain from as they would with ``O_DIRECT`` (docs/recovery.md); small reads lose the
    kernel's read-ahead, and the files cannot be memory-mapped."""
    fuse = binding()
    mounted = threading.Event()
    point = os.path.realpath(mountpoint)
    logging.getLogger("mfusepy").setLevel(logging.CRITICAL)  # our own lines say what failed

    class Operations(fuse.Operations):  # type: ignore[misc,name-defined]
        use_ns = True

        def init_with_config(self, conn: Any, config: Any) -> None:
            if conn is not None:
                conn.max_readahead = _KERNEL_READAHEAD  # fewer, larger requests for a sequential reader
                raise_readahead(point)  # what the kernel does with it
            if config is not None:
                if direct_io:
                    config.direct_io = 1  # every read comes here, past the page cache
                else:
                    config.kernel_cache = 1  # the files never change: the kernel may keep their pages
                config.entry_timeout = config.attr_timeout = 3600.0
                config.negative_timeout = 3600.0
            mounted.set()
            if on_ready is not None:
                on_ready()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            return view.getattr(path)

        def readdir(self, path: str, fh: int) -> list[str]:
            return view.readdir(path)

        def readlink(self, path: str) -> str:
            return view.readlink(path)

        def open(self, path: str, flags: int) -> int:
            return view.open(path, flags)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return view.read(fh, size, offset)  # registers the callback; reads come to Fuse.read

        def release(self, path: str, fh: int) -> int:
            view.release(fh)
            return 0

        def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
            return view.lseek(fh, offset, whence)

        def statfs(self, path: str) -> dict[str, int]:
            return view.statfs()

        def access(self, path: str, amode: int) -> int:
            view.node(path)
            if amode & os.W_OK:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return 0

    class Fuse(fuse.FUSE):  # type: ignore[misc,name-defined]
        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            # straight into libfuse's buffer for the reply: mfusepy's own read takes bytes from
            # Operations.read and copies them there (two more copies of every byte read)
            address = ctypes.cast(buf, ctypes.c_void_p).value
            if size <= 0 or not address:
                return 0
            return view.read_into(fip.contents.fh, memoryview((ctypes.c_ubyte * size).from_address(address)), offset)

        # mfusepy 3.1 declares libfuse 3's lseek callback but passes it on to no method: this
        # does (a later mfusepy that passes it on itself is used as it is)
        if not hasattr(fuse.FUSE, "lseek") and not hasattr(fuse.FUSE, "lseek_fuse_3"):

            def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
                decoded = None if path is None else path.decode(self.encoding, self.errors)
                return int(self.operations.lseek(decoded, offset, whence, fip.contents.fh))

    options: dict[str, Any] = {
        "foreground": True,
        "ro": True,
        "fsname": "vmvault",
        "subtype": "vmvault",
        "default_permissions": True,
        # libfuse 3's own defaults print a warning (an unset idle-thread count); say them
        "max_threads": 16,
        "max_idle_threads": 8,
    }
    if allow_other:
        options["allow_other"] = True
    try:
        Fuse(Operations(), point, **options)
    except RuntimeError as exc:
        if mounted.is_set():
            return  # served, then stopped by a signal: libfuse's loop reports the signal as an error
        raise ConfigError(
            f"libfuse could not mount {mountpoint} (code {exc}); its own message is above "
            "(is /dev/fuse usable, fusermount3 installed, and for --allow-other user_allow_other in /etc/fuse.conf?)"
        ) from exc

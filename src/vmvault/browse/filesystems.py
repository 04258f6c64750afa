"""Guest filesystems, read through The Sleuth Kit (``pytsk3``) over a disk reader.

The Sleuth Kit reads NTFS, FAT12/16/32, exFAT and ext2/3/4 (and HFS+, UFS, ISO 9660, APFS,
untested here) in user space, from a read function: no kernel mount, no root, and only the
blocks the library asks for are read (a folder listing reads the boot sector, the inode or MFT
records and the directory's blocks, not the disk). The filesystem a guest disk holds is
untrusted: the library was written for forensic work on hostile images, every call into it is
translated into ``GuestError`` with what was being done, and this module adds its own bounds
(path depth, folder entries, a walk that never visits a folder twice).

What the library cannot read is recognised by its signature and reported by name rather than
as "no filesystem": LVM physical volumes, LUKS and BitLocker volumes, XFS, Btrfs and swap.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vmvault.errors import GuestError, GuestPathError, VmvaultError, require

from .partitions import ReadAt

__all__ = ["MAX_DEPTH", "MAX_ENTRIES", "Entry", "Filesystem", "Probe", "describe", "library", "probe"]

#: folders deeper than this are not followed (a loop in a damaged filesystem ends here)
MAX_DEPTH = 256
#: entries listed from one folder, at most
MAX_ENTRIES = 1_000_000
#: the longest symbolic link target read (Linux's PATH_MAX)
_MAX_LINK = 4096


def library() -> Any:
    """The pytsk3 module (a core dependency; a broken install is a one-line error)."""
    return require("pytsk3", purpose="reading the files inside a disk (vmvault files)")


# ------------------------------------------------------------------------------------ probing


@dataclass(frozen=True)
class Probe:
    """What a volume holds: ``kind`` (``ntfs``, ``ext4``, ``lvm``, ...), and whether vmvault can
    read it (``status`` ``ok``, ``unsupported``, ``none``, ``damaged``, or ``duplicate`` for a
    partition starting where an earlier one starts) with a reason."""

    kind: str
    status: str
    note: str = ""


#: signatures of volumes the library cannot read: (offset, bytes, kind, description)
_UNSUPPORTED = (
    (0, b"LUKS\xba\xbe", "luks", "LUKS encrypted volume"),
    (3, b"-FVE-FS-", "bitlocker", "BitLocker encrypted volume"),
    (0, b"XFSB", "xfs", "XFS filesystem"),
    (0x10040, b"_BHRfS_M", "btrfs", "Btrfs filesystem"),
    (4086, b"SWAPSPACE2", "swap", "Linux swap"),
    (4086, b"SWAP-SPACE", "swap", "Linux swap"),
)
#: signatures of filesystems the library reads: a failure to open one means damage
_SUPPORTED = (
    (3, b"NTFS    ", "ntfs"),
    (3, b"EXFAT   ", "exfat"),
    (54, b"FAT1", "fat"),
    (82, b"FAT32   ", "fat"),
    (1080, b"\x53\xef", "ext"),
)


def _signature_at(read: ReadAt, base: int, size: int, offset: int, mark: bytes) -> bool:
    if offset + len(mark) > size:
        return False
    return read(base + offset, len(mark)) == mark


def _is_lvm(read: ReadAt, base: int, size: int) -> bool:
    # the LVM2 label sits in one of the first four sectors: "LABELONE", then "LVM2 001" at +24
    for sector in range(4):
        off = sector * 512
        if off + 32 <= size:
            label = read(base + off, 32)
            if label[:8] == b"LABELONE" and label[24:32] == b"LVM2 001":
                return True
    return False


def probe(read: ReadAt, offset: int, size: int) -> tuple[Probe, Filesystem | None]:
    """What the ``size`` bytes at ``offset`` hold, and the open filesystem if vmvault reads it."""
    if _is_lvm(read, offset, size):
        return Probe("lvm", "unsupported", "LVM physical volume: not supported"), None
    for off, mark, kind, what in _UNSUPPORTED:
        if _signature_at(read, offset, size, off, mark):
            return Probe(kind, "unsupported", f"{what}: not supported"), None
    try:
        fs = Filesystem(read, offset, size)
    except GuestError as exc:
        for off, mark, kind in _SUPPORTED:
            if _signature_at(read, offset, size, off, mark):
                return Probe(kind, "damaged", f"damaged {kind} filesystem: {exc}"), None
        return Probe("", "none", "no known filesystem"), None
    return Probe(fs.kind, "ok"), fs


# ------------------------------------------------------------------------------------ entries


@dataclass(frozen=True)
class Entry:
    name: str
    #: the guest path, "/" separated, from the filesystem's root
    path: str
    #: "file", "dir", "symlink" or "other" (devices, FIFOs, sockets: listed, never restored)
    type: str
    size: int
    mtime_ns: int | None
    #: permission bits where the filesystem has them (ext), else 0
    mode: int
    #: the library's metadata address (inode, MFT record)
    inode: int
    #: a symbolic link's target
    target: str | None = None


def _decode(name: bytes) -> str:
    # names that are not UTF-8 (ext allows any bytes) keep their bytes through surrogateescape
    return name.decode("utf-8", "surrogateescape")


_NTFS_FIRST_USER_RECORD = 27  # MFT records below this are the filesystem's own ($MFT ... $Extend)
_EXFAT_SPECIAL = re.compile(r"\$(ALLOC_BITMAP|UPCASE_TABLE|VOLUME_GUID|VOLUME_LABEL|TEX_FAT|ACCESS_CONTROL_TABLE)\Z")
_CASE_INSENSITIVE = ("ntfs", "fat12", "fat16", "fat32", "exfat", "hfs")


class _Window:
    """The library's view of one volume: reads are confined to ``[offset, offset + size)``.

    An error from the read function (a damaged chunk, the storage gone) is kept and raised
    again by :meth:`Filesystem._call` once the library has given up, instead of the library's
    generic message.
    """

    def __init__(self, read: ReadAt, offset: int, size: int) -> None:
        self.read_at = read
        self.offset = offset
        self.size = size
        self.error: BaseException | None = None
        self.bytes_read = 0

    def image(self) -> Any:
        window = self

        class Image(library().Img_Info):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__(url="", type=library().TSK_IMG_TYPE_EXTERNAL)

            def read(self, offset: int, length: int) -> bytes:
                return window.read(offset, length)

            def get_size(self) -> int:
                return window.size

            def close(self) -> None:
                pass

        return Image()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self.size:
            return b""
        length = min(length, self.size - offset, 16 << 20)
        try:
            data = self.read_at(self.offset + offset, length)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        self.bytes_read += len(data)
        return data


class Filesystem:
    """One guest filesystem: look paths up, list folders, read files. Not thread-safe (the
    library is not); open one per thread."""

    def __init__(self, read: ReadAt, offset: int, size: int) -> None:
        tsk = library()
        self._window = _Window(read, offset, size)
        self._img = self._window.image()
        self._fs = self._call(lambda: tsk.FS_Info(self._img, offset=0), "open the filesystem")
        ftype = int(self._fs.info.ftype)
        self.kind = _kind_name(tsk, ftype)
        self.case_insensitive = self.kind in _CASE_INSENSITIVE
        self.block_size = int(self._fs.info.block_size)
        self._root_inode = int(self._fs.info.root_inum)
        self.root = Entry("", "/", "dir", 0, None, 0, self._root_inode)

    @property
    def bytes_read(self) -> int:
        """Bytes the library has read from the volume so far."""
        return self._window.bytes_read

    def _call(self, call: Callable[[], Any], what: str) -> Any:
        self._window.error = None
        try:
            return call()
        except (OSError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            err, self._window.error = self._window.error, None
            if isinstance(err, VmvaultError):
                raise err from exc
            if err is not None and not isinstance(err, Exception):
                raise err from exc
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise GuestError(f"cannot {what}: {text}") from exc

    # ------------------------------------------------------------------------------- entries

    def _entry(self, f: Any, parent: str) -> Entry | None:
        """An Entry for a name the library listed, or None for what is not a user's file."""
        tsk = library()
        name_info = f.info.name
        meta = f.info.meta
        if name_info is None or meta is None:
            return None
        raw = bytes(name_info.name or b"")
        if raw in (b"", b".", b"..") or b"/" in raw or b"\0" in raw:
            return None
        if int(name_info.flags) & int(tsk.TSK_FS_NAME_FLAG_UNALLOC):
            return None  # a deleted name
        mtype = int(meta.type)
        if mtype in (int(tsk.TSK_FS_META_TYPE_VIRT), int(tsk.TSK_FS_META_TYPE_VIRT_DIR)):
            return None  # the library's own ($MBR, $FAT1, $OrphanFiles)
        name = _decode(raw)
        at_root = parent == "/"
        if at_root and self.kind == "ntfs" and name.startswith("$") and int(meta.addr) < _NTFS_FIRST_USER_RECORD:
            return None
        if at_root and self.kind == "exfat" and _EXFAT_SPECIAL.match(name):
            return None
        volume_label = name.endswith(" (Volume Label Entry)") and not meta.size
        if at_root and (self.kind.startswith("fat") or self.kind == "exfat") and volume_label:
            return None  # the library shows the volume label as a file
        if mtype == int(tsk.TSK_FS_META_TYPE_DIR):
            kind = "dir"
        elif mtype == int(tsk.TSK_FS_META_TYPE_REG):
            kind = "file"
        elif mtype == int(tsk.TSK_FS_META_TYPE_LNK):
            kind = "symlink"
        else:
            kind = "other"
        target = None
        if kind == "symlink":
            link = meta.link
            raw_target = link if isinstance(link, bytes) else str(link or "").encode()
            link_size = int(meta.size or 0)
            if not raw_target and 0 < link_size <= _MAX_LINK:
                # a target too long for the inode (over 60 bytes on ext) is the link's data,
                # which the library does not fill in as the link
                raw_target = bytes(f.read_random(0, link_size))
            target = _decode(raw_target)
        mtime = int(meta.mtime or 0)
        mtime_ns = mtime * 1_000_000_000 + int(meta.mtime_nano or 0) if mtime > 0 else None
        mode = stat.S_IMODE(int(meta.mode)) if self.kind.startswith("ext") else 0
        size = max(0, int(meta.size or 0))
        path = parent.rstrip("/") + "/" + name
        return Entry(name, path, kind, size, mtime_ns, mode, int(meta.addr), target)

    def listdir(self, entry: Entry) -> list[Entry]:
        """The entries of folder ``entry``, sorted by name."""
        if entry.type != "dir":
            raise GuestPathError(f"{entry.path} is not a folder", path=entry.path)

        def collect() -> list[Entry]:
            out = []
            for f in self._fs.open_dir(inode=entry.inode):
                e = self._entry(f, entry.path)
                if e is not None:
                    out.append(e)
                    if len(out) > MAX_ENTRIES:
                        raise GuestError(f"{entry.path} lists more than {MAX_ENTRIES} entries", path=entry.path)
            return out

        found: list[Entry] = self._call(collect, f"list {entry.path}")
        return sorted(found, key=lambda e: e.name)

    def lookup(self, path: str) -> Entry:
        """The entry at ``path`` ("/" separated from the root; NTFS and FAT names match
        without regard to case). Symbolic links are never followed."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if len(parts) > MAX_DEPTH:
            raise GuestPathError(f"the path is deeper than {MAX_DEPTH} folders", path=path)
        entry = self.root
        for i, part in enumerate(parts):
            if part == "..":
                raise GuestPathError("'..' is not allowed in a path", path=path)
            if entry.type != "dir":
                where = "/" + "/".join(parts[:i])
                raise GuestPathError(f"{where} is a {describe(entry)}, not a folder", path=path)
            entries = self.listdir(entry)
            match = next((e for e in entries if e.name == part), None)
            if match is None and self.case_insensitive:
                folded = part.casefold()
                match = next((e for e in entries if e.name.casefold() == folded), None)
            if match is None:
                raise GuestPathError("no such file or folder", path=path)
            entry = match
        return entry

    def walk(self, entry: Entry) -> Iterator[Entry]:
        """Every entry below folder ``entry``, parents before children; a folder reached twice
        (a loop in a damaged filesystem, a hard-linked folder) is not entered again. A folder
        more than :data:`MAX_DEPTH` levels below ``entry`` is an error (never a silent cut)."""
        seen = {entry.inode}
        stack = [(entry, 0)]
        while stack:
            folder, depth = stack.pop()
            children = self.listdir(folder)
            for child in children:
                yield child
            if depth + 1 >= MAX_DEPTH:
                if any(c.type == "dir" and c.inode not in seen for c in children):
                    raise GuestError(
                        f"{folder.path} holds folders deeper than {MAX_DEPTH} folders below {entry.path}; "
                        "they are not read",
                        path=folder.path,
                    )
                continue
            for child in reversed(children):
                if child.type == "dir" and child.inode not in seen:
                    seen.add(child.inode)
                    stack.append((child, depth + 1))

    # ------------------------------------------------------------------------------- content

    def _file(self, entry: Entry) -> Any:
        return self._call(lambda: self._fs.open_meta(inode=entry.inode), f"open {entry.path}")

    def holes(self, entry: Entry) -> list[tuple[int, int]]:
        """Ranges ``(offset, length)`` of the file that are sparse in the guest (never stored),
        as far as the library's runs tell; compressed or resident data has none."""
        tsk = library()
        f = self._file(entry)

        def runs() -> list[tuple[int, int]]:
            out: list[tuple[int, int]] = []
            default = int(tsk.TSK_FS_ATTR_TYPE_DEFAULT)
            data_types = {int(tsk.TSK_FS_ATTR_TYPE_NTFS_DATA), default}
            for attr in f:
                info = attr.info
                flags = int(info.flags)
                if int(info.type) not in data_types or info.name not in (None, b"", b"$Data"):
                    continue
                if not flags & int(tsk.TSK_FS_ATTR_NONRES) or flags & int(tsk.TSK_FS_ATTR_COMP):
                    return []
                hole_flags = int(tsk.TSK_FS_ATTR_RUN_FLAG_SPARSE) | int(tsk.TSK_FS_ATTR_RUN_FLAG_FILLER)
                for run in attr:
                    if int(run.flags) & hole_flags:
                        start = int(run.offset) * self.block_size
                        length = int(run.len) * self.block_size
                        out.append((start, length))
                return out
            return out

        found: list[tuple[int, int]] = self._call(runs, f"read the layout of {entry.path}")
        clipped = []
        for start, length in sorted(found):
            end = min(start + length, entry.size)
            if start < end:
                clipped.append((start, end - start))
        return clipped

    def reader(self, entry: Entry) -> Callable[[int, int], bytes]:
        """``read(offset, length)`` of file ``entry``'s content."""
        if entry.type != "file":
            raise GuestPathError(f"{entry.path} is a {describe(entry)}, not a file", path=entry.path)
        f = self._file(entry)

        def read(offset: int, length: int) -> bytes:
            length = min(length, entry.size - offset)
            if length <= 0:
                return b""
            data: bytes = self._call(lambda: f.read_random(offset, length), f"read {entry.path}")
            if len(data) != length:
                raise GuestError(
                    f"{entry.path}: the filesystem returned {len(data)} of {length} bytes at offset {offset}",
                    path=entry.path,
                )
            return data

        return read


def describe(entry: Entry) -> str:
    """What an entry is, in words: file, folder, symbolic link, special file."""
    return {"file": "file", "dir": "folder", "symlink": "symbolic link"}.get(entry.type, "special file")


def _kind_name(tsk: Any, ftype: int) -> str:
    names = {
        "TSK_FS_TYPE_NTFS": "ntfs",
        "TSK_FS_TYPE_FAT12": "fat12",
        "TSK_FS_TYPE_FAT16": "fat16",
        "TSK_FS_TYPE_FAT32": "fat32",
        "TSK_FS_TYPE_EXFAT": "exfat",
        "TSK_FS_TYPE_EXT2": "ext2",
        "TSK_FS_TYPE_EXT3": "ext3",
        "TSK_FS_TYPE_EXT4": "ext4",
        "TSK_FS_TYPE_HFS": "hfs",
        "TSK_FS_TYPE_ISO9660": "iso9660",
        "TSK_FS_TYPE_FFS1": "ufs1",
        "TSK_FS_TYPE_FFS1B": "ufs1",
        "TSK_FS_TYPE_FFS2": "ufs2",
        "TSK_FS_TYPE_APFS": "apfs",
        "TSK_FS_TYPE_YAFFS2": "yaffs2",
    }
    for attr, name in names.items():
        value = getattr(tsk, attr, None)
        if value is not None and int(value) == ftype:
            return name
    return f"type {ftype:#x}"

"""Legacy VHD images: fixed, dynamic and differencing (read and write).

Reference: Microsoft "Virtual Hard Disk Image Format Specification" v1.0; layout in
``_vhd_layout``. A fixed disk is the raw data followed by a 512-byte footer. A dynamic or
differencing disk is: footer copy (0), dynamic header (footer.DataOffset), BAT (array of
big-endian u32 sector numbers), blocks (sector bitmap rounded up to 512 bytes, then
BlockSize data bytes) and the footer at EOF. In a differencing disk bitmap bit 1 (MSB first)
means "this sector is here", 0 means "read the parent".
"""

from __future__ import annotations

import dataclasses
import errno
import ntpath
import os
import re
import struct
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vmvault import platform
from vmvault.disk._open import ANYWHERE, ParentRule, open_checked, open_parent, real_path
from vmvault.disk._vhd_layout import (
    BAT_UNUSED,
    DYNAMIC_HEADER_SIZE,
    FEATURE_RESERVED,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_COOKIE,
    NIL_UUID,
    NO_DATA_OFFSET,
    SECTOR,
    VERSION_1_0,
    DiskType,
    DynamicHeader,
    Footer,
    ParentLocator,
    PlatformCode,
    chs_geometry,
    vhd_checksum,
)
from vmvault.disk.base import (
    CacheRelease,
    DiskFormat,
    DiskImage,
    DiskWriter,
    Extent,
    ExtentKind,
    Opener,
    ParentReference,
    coalesce,
    fsync_file,
    is_zero,
    open_new,
    read_structure,
    write_at,
    write_error,
)
from vmvault.errors import FormatError, ParentError, SourceError, UnsupportedFormatError

if TYPE_CHECKING:
    from vmvault.disk.metadata_check import MetadataCheck

__all__ = ["FORMAT", "VhdFormat", "VhdImage", "VhdWriter", "create_vhd", "open_vhd", "open_vhd_fd"]

#: spec: a VHD holds at most 2040 GiB; refuse anything much larger before allocating tables
MAX_VHD_SIZE = 2 * 1024**4
#: VHD timestamps count from 2000-01-01 00:00:00 UTC
VHD_EPOCH = 946684800
#: a parent locator's path is short; refuse giant lengths rather than read them
MAX_LOCATOR_BYTES = 64 * 1024
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
_RUNS = re.compile(r"1+|0+")


def _bitmap_bytes(sectors_per_block: int) -> int:
    """Size of a block's sector bitmap: one bit per sector, padded to whole sectors (spec "Data Blocks")."""
    return (sectors_per_block + 8 * SECTOR - 1) // (8 * SECTOR) * SECTOR


def _check_footer(raw: bytes, path: str, offset: int) -> Footer:
    if raw[:8] != FOOTER_COOKIE:
        raise FormatError(
            f"bad cookie {raw[:8]!r}, expected {FOOTER_COOKIE!r}",
            path=path,
            offset=offset,
            structure="VHD footer",
        )
    footer = Footer.unpack(raw)
    want = vhd_checksum(raw, Footer.CHECKSUM_OFFSET)
    if footer.checksum != want:
        raise FormatError(
            f"checksum {footer.checksum:#010x} does not match {want:#010x}",
            path=path,
            offset=offset,
            structure="VHD footer",
        )
    return footer


class VhdImage(DiskImage):
    """One VHD layer. Reads are positional (``os.pread``), so concurrent reads are safe."""

    format = "vhd"

    def __init__(
        self,
        path: str,
        fd: int,
        file_size: int,
        footer: Footer,
        header: DynamicHeader | None,
        bat: tuple[int, ...],
        parent: DiskImage | None,
        notes: list[str],
    ) -> None:
        self._path = path
        self._fd = fd
        self._released = CacheRelease()
        self._file_size = file_size
        self.footer = footer
        self.header = header
        self._bat = bat
        self._parent = parent
        self._notes = notes
        self._size = footer.current_size
        self._type = DiskType(footer.disk_type)
        self._block_size = header.block_size if header else 0
        spb = self._block_size // SECTOR
        # the per-block sector bitmap occupies whole sectors (spec "Block Allocation Table and Data Blocks")
        self._bitmap_size = _bitmap_bytes(spb) if header else 0
        self._bitmaps: dict[int, str] = {}

    # -- DiskImage ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def path(self) -> str:
        return self._path

    @property
    def parent(self) -> DiskImage | None:
        return self._parent

    @property
    def disk_type(self) -> DiskType:
        return self._type

    @property
    def block_size(self) -> int:
        return self._block_size

    def info(self) -> dict[str, object]:
        out = super().info()
        f = self.footer
        out.update(
            {
                "disk_type": self._type.name.lower(),
                "unique_id": str(f.unique_id),
                "creator_app": f.creator_app.decode("latin-1"),
                "creator_version": f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
                "creator_host_os": f.creator_host_os.decode("latin-1"),
                "geometry": [f.cylinders, f.heads, f.sectors_per_track],
                "saved_state": bool(f.saved_state),
                "file_size": self._file_size,
            }
        )
        if self.header is not None:
            out["block_size"] = self._block_size
            out["allocated_blocks"] = sum(1 for e in self._bat if e != BAT_UNUSED)
        if self._type is DiskType.DIFFERENCING and self.header is not None:
            out["parent_unique_id"] = str(self.header.parent_unique_id)
            out["parent_name"] = self.header.parent_unicode_name
            if self._parent is not None:
                out["parent_path"] = self._parent.path
        if self._notes:
            out["warnings"] = list(self._notes)
        return out

    def _block_bits(self, block: int) -> str:
        """The block's sector bitmap as a string of '0'/'1', one character per sector (MSB first)."""
        bits = self._bitmaps.get(block)
        if bits is None:
            start = self._bat[block] * SECTOR
            raw = self._data_pread(start, self._bitmap_size, "VHD sector bitmap")
            spb = self._block_size // SECTOR
            bits = format(int.from_bytes(raw, "big"), f"0{len(raw) * 8}b")[:spb]
            self._bitmaps[block] = bits
        return bits

    def extents(self) -> Iterator[Extent]:
        yield from coalesce(self._extents())

    def _extents(self) -> Iterator[Extent]:
        if self._type is DiskType.FIXED:
            yield from self._fixed_extents()
            return
        diff = self._type is DiskType.DIFFERENCING
        empty = ExtentKind.PARENT if diff else ExtentKind.ZERO
        bs = self._block_size
        for block, entry in enumerate(self._bat):
            start = block * bs
            if start >= self._size:
                break
            length = min(bs, self._size - start)
            if entry == BAT_UNUSED:
                yield Extent(start, length, empty)
            elif not diff:
                yield Extent(start, length, ExtentKind.DATA)
            else:
                for m in _RUNS.finditer(self._block_bits(block)):
                    lo = start + m.start() * SECTOR
                    hi = min(start + m.end() * SECTOR, start + length)
                    if lo >= hi:
                        break
                    kind = ExtentKind.DATA if m.group()[0] == "1" else ExtentKind.PARENT
                    yield Extent(lo, hi - lo, kind)

    def _fixed_extents(self) -> Iterator[Extent]:
        """A fixed disk is raw data: holes in the file (SEEK_HOLE) read as zeros and need no reading."""
        pos, end = 0, self._size
        while pos < end:
            try:
                data = min(platform.seek_data(self._fd, pos), end)
                hole = min(platform.seek_hole(self._fd, data), end) if data < end else end
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only the footer (or nothing) after pos
                    yield Extent(pos, end - pos, ExtentKind.ZERO)
                    return
                yield Extent(pos, end - pos, ExtentKind.DATA)  # no hole support: all data
                return
            if data > pos:
                yield Extent(pos, data - pos, ExtentKind.ZERO)
            if hole > data:
                yield Extent(data, hole - data, ExtentKind.DATA)
            pos = max(hole, data)

    def _data_pread(self, offset: int, length: int, what: str = "VHD data") -> bytes:
        try:
            data = platform.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self._path}: read of {what} at offset {offset:#x} failed: {exc.strerror}") from exc
        if len(data) != length:
            raise SourceError(
                f"{self._path}: file ended at {offset + len(data):#x} while reading {what} "
                f"(did it change size during the backup?)"
            )
        return data

    def _parent_read(self, offset: int, length: int) -> bytes:
        if self._parent is None:
            return bytes(length)
        return self._parent.read(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        if self._type is DiskType.FIXED:
            return self._data_pread(offset, end - offset)
        out = bytearray()
        bs = self._block_size
        diff = self._type is DiskType.DIFFERENCING
        pos = offset
        while pos < end:
            block, boff = divmod(pos, bs)
            n = min(bs - boff, end - pos)
            entry = self._bat[block]
            if entry == BAT_UNUSED:
                out += self._parent_read(pos, n) if diff else bytes(n)
            else:
                base = entry * SECTOR + self._bitmap_size
                if not diff:
                    out += self._data_pread(base + boff, n)
                else:
                    out += self._read_diff_block(block, base, boff, n)
            pos += n
        return bytes(out)

    def _read_diff_block(self, block: int, base: int, boff: int, n: int) -> bytes:
        bits = self._block_bits(block)
        first, last = boff // SECTOR, (boff + n - 1) // SECTOR + 1
        out = bytearray()
        block_start = block * self._block_size
        for m in _RUNS.finditer(bits, first, last):
            lo = max(m.start() * SECTOR, boff)
            hi = min(m.end() * SECTOR, boff + n)
            if bits[m.start()] == "1":
                out += self._data_pread(base + lo, hi - lo)
            else:
                out += self._parent_read(block_start + lo, hi - lo)
        return bytes(out)

    def read_done(self, offset: int, length: int) -> None:
        self._released.done(self._fd, length)
        super().read_done(offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


# -- opening --------------------------------------------------------------------------------------


def _read_footer(fd: int, path: str, file_size: int, notes: list[str]) -> tuple[Footer, bool]:
    """The footer, and whether the file's checksums are known to be stale (see below)."""
    if file_size < FOOTER_SIZE:
        raise FormatError(
            f"file is {file_size} bytes, too small for a VHD footer",
            path=path,
            offset=0,
            structure="VHD footer",
        )
    tail_off = file_size - FOOTER_SIZE
    tail = read_structure(fd, path, tail_off, FOOTER_SIZE, "VHD footer")
    try:
        return _check_footer(tail, path, tail_off), False
    except FormatError as tail_err:
        # Dynamic and differencing disks keep a copy at offset 0 precisely so a damaged trailing footer
        # can be recovered (spec "Dynamic Disk Header Format": "a copy of the hard disk footer").
        head = read_structure(fd, path, 0, FOOTER_SIZE, "VHD footer copy") if tail_off > 0 else b""
        if tail[:8] == FOOTER_COOKIE and head == tail:
            # Both copies agree byte for byte but carry the same wrong checksum: the file was edited by a
            # tool that does not maintain checksums (dfvfs' image.vhd is one). Two identical copies
            # corroborate each other, so accept them, say so, and tolerate stale header checksums too.
            footer = Footer.unpack(tail)
            if footer.disk_type in (DiskType.DYNAMIC, DiskType.DIFFERENCING):
                notes.append(f"footer checksum is stale in both copies ({tail_err}); the copies are identical")
                return footer, True
        try:
            footer = _check_footer(head, path, 0)
        except FormatError:
            raise tail_err from None
        if footer.disk_type not in (DiskType.DYNAMIC, DiskType.DIFFERENCING):
            raise tail_err from None
        notes.append(f"trailing footer at offset {tail_off:#x} is damaged ({tail_err}); using the copy at offset 0")
        return footer, False


def _locator_paths(fd: int, path: str, file_size: int, header: DynamicHeader) -> list[tuple[str, str]]:
    """Candidate parent file names from the W2ru and W2ku locators, in that order, as (how, path)."""
    folder = os.path.dirname(os.path.abspath(path))
    found: dict[bytes, str] = {}
    for i, loc in enumerate(header.locators):
        if loc.platform_code not in (PlatformCode.W2RU.value, PlatformCode.W2KU.value):
            continue
        if loc.data_length == 0:
            continue
        if loc.data_length > MAX_LOCATOR_BYTES or loc.data_offset + loc.data_length > file_size:
            raise FormatError(
                f"parent locator {i} ({loc.data_length} bytes at {loc.data_offset:#x}) is outside the file",
                path=path,
                offset=loc.data_offset,
                structure="VHD parent locator",
            )
        raw = read_structure(fd, path, loc.data_offset, loc.data_length, "VHD parent locator")
        found.setdefault(loc.platform_code, raw.decode("utf-16-le", errors="replace").rstrip("\0"))
    out: list[tuple[str, str]] = []
    rel = found.get(PlatformCode.W2RU.value)
    if rel:
        # Windows relative path such as ".\parent.vhd" or "..\dir\parent.vhd"
        parts = [p for p in re.split(r"[\\/]", rel) if p not in ("", ".")]
        out.append(("W2ru", os.path.normpath(os.path.join(folder, *parts))))
    absolute = found.get(PlatformCode.W2KU.value)
    if absolute:
        # an absolute Windows path means nothing on this host; look for the same file name beside the child
        out.append(("W2ku", os.path.join(folder, ntpath.basename(absolute.replace("/", "\\")))))
    if header.parent_unicode_name:
        name = ntpath.basename(header.parent_unicode_name.replace("/", "\\"))
        if name:
            out.append(("ParentUnicodeName", os.path.join(folder, name)))
    return out


def _open_parent(
    path: str,
    header: DynamicHeader,
    candidates: list[tuple[str, str]],
    override: str | None,
    seen: frozenset[str],
    rule: ParentRule,
) -> VhdImage:
    """The first candidate that is a VHD, allowed by ``rule``, whose UniqueId is ParentUniqueId."""
    want = header.parent_unique_id
    if want == NIL_UUID:
        # a zero id names no file: it must never match (a crafted parent could carry zeros too)
        raise ParentError("ParentUniqueId is zero, which identifies no parent", path=path, structure="VHD parent")
    tried: list[str] = []
    if override is not None:
        candidates = [("parent=", override)]
    done: set[str] = set()
    for how, cand in candidates:
        if cand in done:
            continue
        done.add(cand)
        try:
            fd = open_parent(cand, child=path, rule=rule, named=override is not None)
        except ParentError as exc:
            if override is not None:
                raise
            tried.append(f"{how}: {exc}")
            continue
        if fd is None:
            tried.append(f"{cand} ({how}: not found)")
            continue
        real = real_path(fd, cand)
        if real in seen:
            os.close(fd)
            raise ParentError(
                f"parent chain is cyclic: {cand} is already in the chain", path=path, structure="VHD parent"
            )
        from vmvault.disk import detect_format_fd

        try:
            fmt = detect_format_fd(fd, cand)
        except BaseException:
            os.close(fd)
            raise
        if fmt != "vhd":
            os.close(fd)
            msg = f"{cand} ({how}: a {fmt} file; a VHD's parent must be a VHD)"
            if override is not None:
                raise ParentError(msg, path=path, structure="VHD parent")
            tried.append(msg)
            continue
        parent = _open(cand, None, seen, rule, fd=fd)
        if parent.footer.unique_id != want:
            got = parent.footer.unique_id
            parent.close()
            msg = f"{cand} ({how}: UniqueId {got} does not match the child's ParentUniqueId {want})"
            if override is not None:
                raise ParentError(msg, path=path, structure="VHD parent")
            tried.append(msg)
            continue
        return parent
    names = "; ".join(tried) if tried else "no parent locator or name"
    raise ParentError(
        f"parent {header.parent_unicode_name or '?'} (UniqueId {want}) not usable; tried: {names}",
        path=path,
        structure="VHD parent",
    )


def _open(
    path: str, parent: str | None, seen: frozenset[str], rule: ParentRule | None = None, *, fd: int | None = None
) -> VhdImage:
    """Open ``path`` (or take over ``fd``, already opened and checked for it) and its chain."""
    if fd is None:
        fd, _st = open_checked(path)
    try:
        return _open_fd(path, fd, parent, seen | {real_path(fd, path)}, rule or ANYWHERE)
    except BaseException:
        os.close(fd)
        raise


def _open_fd(path: str, fd: int, parent_override: str | None, seen: frozenset[str], rule: ParentRule) -> VhdImage:
    file_size = os.fstat(fd).st_size
    notes: list[str] = []
    footer, stale = _read_footer(fd, path, file_size, notes)
    foot_off = file_size - FOOTER_SIZE
    try:
        dtype = DiskType(footer.disk_type)
    except ValueError:
        raise UnsupportedFormatError(
            f"unknown disk type {footer.disk_type}", path=path, offset=foot_off + 60, structure="VHD footer"
        ) from None
    size = footer.current_size
    if size % SECTOR or size > MAX_VHD_SIZE:
        raise FormatError(
            f"CurrentSize {size} is not a multiple of 512 or exceeds {MAX_VHD_SIZE}",
            path=path,
            offset=foot_off + 48,
            structure="VHD footer",
        )
    if dtype is DiskType.FIXED:
        if size > foot_off:
            raise FormatError(
                f"fixed disk of {size} bytes but only {foot_off} data bytes precede the footer",
                path=path,
                offset=foot_off,
                structure="VHD footer",
            )
        return VhdImage(path, fd, file_size, footer, None, (), None, notes)
    if dtype not in (DiskType.DYNAMIC, DiskType.DIFFERENCING):
        raise UnsupportedFormatError(
            f"disk type {dtype.name} is not a valid VHD type",
            path=path,
            offset=foot_off + 60,
            structure="VHD footer",
        )
    hoff = footer.data_offset
    if hoff == NO_DATA_OFFSET or hoff + DYNAMIC_HEADER_SIZE > file_size:
        raise FormatError(
            f"dynamic header offset {hoff:#x} lies outside the file",
            path=path,
            offset=foot_off + 16,
            structure="VHD footer",
        )
    raw = read_structure(fd, path, hoff, DYNAMIC_HEADER_SIZE, "VHD dynamic header")
    if raw[:8] != HEADER_COOKIE:
        raise FormatError(
            f"bad cookie {raw[:8]!r}, expected {HEADER_COOKIE!r}",
            path=path,
            offset=hoff,
            structure="VHD dynamic header",
        )
    header = DynamicHeader.unpack(raw)
    want = vhd_checksum(raw, DynamicHeader.CHECKSUM_OFFSET)
    if header.checksum != want and stale:
        notes.append(f"dynamic header checksum {header.checksum:#010x} is stale (computed {want:#010x})")
    elif header.checksum != want:
        raise FormatError(
            f"checksum {header.checksum:#010x} does not match {want:#010x}",
            path=path,
            offset=hoff,
            structure="VHD dynamic header",
        )
    bs = header.block_size
    if bs < SECTOR or bs & (bs - 1) or bs > 256 * 1024 * 1024:
        raise FormatError(
            f"block size {bs} is not a power of two between 512 B and 256 MiB",
            path=path,
            offset=hoff + 32,
            structure="VHD dynamic header",
        )
    nblocks = -(-size // bs)
    entries = header.max_table_entries
    if entries < nblocks:
        raise FormatError(
            f"BAT has {entries} entries but {nblocks} blocks are needed for {size} bytes",
            path=path,
            offset=hoff + 28,
            structure="VHD dynamic header",
        )
    toff = header.table_offset
    if toff + 4 * entries > file_size:
        raise FormatError(
            f"BAT ({entries} entries at {toff:#x}) lies outside the file",
            path=path,
            offset=hoff + 16,
            structure="VHD dynamic header",
        )
    bat = struct.unpack(f">{nblocks}I", read_structure(fd, path, toff, 4 * nblocks, "VHD BAT"))
    bitmap_size = _bitmap_bytes(bs // SECTOR)
    for i, entry in enumerate(bat):
        if entry == BAT_UNUSED:
            continue
        needed = min(bs, size - i * bs)
        if entry * SECTOR + bitmap_size + needed > file_size:
            raise FormatError(
                f"block {i} at sector {entry:#x} extends past the end of the file ({file_size} bytes)",
                path=path,
                offset=toff + 4 * i,
                structure="VHD BAT",
            )
    parent: VhdImage | None = None
    if dtype is DiskType.DIFFERENCING:
        candidates = _locator_paths(fd, path, file_size, header)
        parent = _open_parent(path, header, candidates, parent_override, seen, rule)
        if parent.size != size:
            psize = parent.size
            parent.close()
            raise ParentError(
                f"parent {parent.path} is {psize} bytes but the child is {size}",
                path=path,
                structure="VHD parent",
            )
    return VhdImage(path, fd, file_size, footer, header, bat, parent, notes)


def open_vhd(path: str, *, parent: str | None = None, rule: ParentRule | None = None) -> VhdImage:
    """Open a VHD read-only; a differencing disk opens its whole parent chain.

    The parent is looked for via the W2ru (relative) locator, then the W2ku locator's file name
    beside the child, then the ParentUnicodeName beside the child; ``parent`` overrides all of
    these. The parent must be a VHD whose UniqueId equals the child's (non-zero) ParentUniqueId,
    and lie where ``rule`` allows (``vmvault.disk.open_image``).
    """
    return _open(path, parent, frozenset(), rule)


def open_vhd_fd(path: str, fd: int, *, parent: str | None = None, rule: ParentRule | None = None) -> VhdImage:
    """``open_vhd`` on a file the caller opened and checked (``_open.open_checked``); owns ``fd``."""
    return _open(path, parent, frozenset(), rule, fd=fd)


# -- writing --------------------------------------------------------------------------------------


class VhdWriter(DiskWriter):
    """Writes a fixed, dynamic or differencing VHD. Tables and footers are written by ``close``."""

    format = "vhd"

    def __init__(
        self,
        path: str,
        size: int,
        disk_type: DiskType,
        block_size: int,
        parent: VhdImage | None,
        parent_path: str | None,
        unique_id: uuid.UUID | None = None,
        *,
        opener: Opener | None = None,
    ) -> None:
        if size <= 0 or size % SECTOR or size > MAX_VHD_SIZE:
            raise FormatError(f"size {size} must be a positive multiple of 512 up to {MAX_VHD_SIZE}", path=path)
        if block_size < SECTOR or block_size & (block_size - 1) or block_size > 256 * 1024 * 1024:
            raise FormatError(f"block size {block_size} must be a power of two from 512 B to 256 MiB", path=path)
        self._path = path
        self._size = size
        self._type = disk_type
        self._bs = block_size
        self._parent = parent
        self._spb = block_size // SECTOR
        self._bitmap_size = _bitmap_bytes(self._spb)
        self._nblocks = -(-size // block_size)
        self._bat = [BAT_UNUSED] * self._nblocks
        self._bitmaps: dict[int, bytearray] = {}
        self._dirty_bitmaps: set[int] = set()
        cyl, heads, spt = chs_geometry(size // SECTOR)
        # qemu <= 9 sizes a VHD by this CHS geometry unless the creator is one of a few it trusts
        # ("win ", "qem2", "d2v ", "CTXS", "tap\0"); for "vmvt" it reports cyl*heads*spt*512, which is
        # smaller than CurrentSize whenever the size is not a whole number of CHS cylinders. Windows,
        # Hyper-V, libvhdi and vmvault use CurrentSize. qemu's vpc driver option
        # force_size_calc=current_size makes qemu agree.
        self._footer = Footer(
            features=FEATURE_RESERVED,
            format_version=VERSION_1_0,
            data_offset=NO_DATA_OFFSET if disk_type is DiskType.FIXED else FOOTER_SIZE,
            timestamp=max(0, int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF,
            creator_app=b"vmvt",
            creator_version=0x00010000,
            creator_host_os=b"Wi2k",
            original_size=size,
            current_size=size,
            cylinders=cyl,
            heads=heads,
            sectors_per_track=spt,
            disk_type=int(disk_type),
            unique_id=unique_id or uuid.uuid4(),
            saved_state=0,
        )
        self._fd = open_new(path, opener)
        self._header: DynamicHeader | None = None
        try:
            if disk_type is DiskType.FIXED:
                os.ftruncate(self._fd, size + FOOTER_SIZE)
                self._eof = size
            else:
                table_offset = FOOTER_SIZE + DYNAMIC_HEADER_SIZE
                bat_bytes = -(-(4 * self._nblocks) // SECTOR) * SECTOR
                self._eof = table_offset + bat_bytes
                locators: tuple[ParentLocator, ...] = ()
                pname = ""
                puid = uuid.UUID(int=0)
                pts = 0
                extra = b""
                if parent is not None and parent_path is not None:
                    puid = parent.footer.unique_id
                    pts = parent.footer.timestamp
                    pname = os.path.basename(parent_path)
                    rel = os.path.relpath(os.path.abspath(parent_path), os.path.dirname(os.path.abspath(path)))
                    rel_win = ".\\" + rel.replace("/", "\\") if not rel.startswith("..") else rel.replace("/", "\\")
                    abs_win = os.path.abspath(parent_path).replace("/", "\\")
                    locs = []
                    for code, text in ((PlatformCode.W2KU, abs_win), (PlatformCode.W2RU, rel_win)):
                        data = text.encode("utf-16-le")
                        # Windows writes a byte count in PlatformDataSpace (spec: sectors); so do we
                        space = -(-len(data) // SECTOR) * SECTOR
                        locs.append(ParentLocator(code.value, space, len(data), self._eof + len(extra)))
                        extra += data.ljust(space, b"\0")
                    locators = tuple(locs)
                    self._eof += len(extra)
                self._header = DynamicHeader(
                    table_offset=table_offset,
                    max_table_entries=self._nblocks,
                    block_size=block_size,
                    parent_unique_id=puid,
                    parent_timestamp=pts,
                    parent_unicode_name=pname,
                    locators=locators,
                )
                platform.pwrite(self._fd, b"\xff" * (4 * self._nblocks), table_offset)
                if extra:
                    platform.pwrite(self._fd, extra, table_offset + bat_bytes)
                os.ftruncate(self._fd, self._eof)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            raise write_error(exc, path, "cannot write the new image's tables") from exc

    @property
    def size(self) -> int:
        return self._size

    @property
    def unique_id(self) -> uuid.UUID:
        return self._footer.unique_id

    def _write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        write_at(self._fd, data, offset, self._path)

    def _allocate(self, block: int) -> int:
        start = self._eof
        self._bat[block] = start // SECTOR
        self._eof = start + self._bitmap_size + self._bs
        bitmap = bytearray(self._bitmap_size)
        if self._type is DiskType.DYNAMIC:
            # the whole block is valid data in a dynamic disk; mark every sector present
            bitmap[: self._spb // 8] = b"\xff" * (self._spb // 8)
        self._bitmaps[block] = bitmap
        self._dirty_bitmaps.add(block)
        try:
            os.ftruncate(self._fd, self._eof)
        except OSError as exc:
            raise write_error(exc, self._path, "cannot extend the file") from exc
        return start

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self._size:
            raise ValueError(f"write of {len(data)} bytes at {offset} is outside the {self._size}-byte disk")
        if self._type is DiskType.FIXED:
            self._write(data, offset)
            return
        view = memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            block, boff = divmod(pos, self._bs)
            n = min(self._bs - boff, end - pos)
            self._write_block(block, boff, view[pos - offset : pos - offset + n])
            pos += n

    def _write_block(self, block: int, boff: int, chunk: memoryview) -> None:
        entry = self._bat[block]
        diff = self._type is DiskType.DIFFERENCING
        if entry == BAT_UNUSED:
            if not diff and is_zero(chunk):
                return  # unallocated blocks of a dynamic disk already read as zeros
            start = self._allocate(block)
        else:
            start = entry * SECTOR
        data_base = start + self._bitmap_size
        if not diff:
            self._write(chunk, data_base + boff)
            return
        # differencing: widen to whole sectors, taking the unwritten bytes of a partly written sector
        # from what the guest currently sees there (this file if its bit is set, else the parent)
        bitmap = self._bitmaps[block]
        first, last = boff // SECTOR, (boff + len(chunk) - 1) // SECTOR + 1
        lo, hi = first * SECTOR, last * SECTOR
        if lo != boff or hi != boff + len(chunk):
            buf = bytearray(self._current(block, data_base, bitmap, first))
            if last - 1 != first:
                buf += bytes((last - first - 2) * SECTOR)
                buf += self._current(block, data_base, bitmap, last - 1)
            buf[boff - lo : boff - lo + len(chunk)] = chunk
            self._write(buf, data_base + lo)
        else:
            self._write(chunk, data_base + boff)
        for s in range(first, last):
            bitmap[s >> 3] |= 0x80 >> (s & 7)
        self._dirty_bitmaps.add(block)

    def _current(self, block: int, data_base: int, bitmap: bytearray, sector: int) -> bytes:
        if bitmap[sector >> 3] & (0x80 >> (sector & 7)):
            return platform.pread(self._fd, SECTOR, data_base + sector * SECTOR)
        assert self._parent is not None
        return self._parent.read(block * self._bs + sector * SECTOR, SECTOR)

    def _write_tables(self) -> None:
        if self._type is DiskType.FIXED:
            self._write(self._footer.pack(), self._size)
            return
        assert self._header is not None
        for block in sorted(self._dirty_bitmaps):
            self._write(self._bitmaps[block], self._bat[block] * SECTOR)
        self._dirty_bitmaps.clear()
        self._write(struct.pack(f">{self._nblocks}I", *self._bat), self._header.table_offset)
        footer = self._footer.pack()
        self._write(footer, 0)
        self._write(self._header.pack(), FOOTER_SIZE)
        self._write(footer, self._eof)

    def _fsync(self) -> None:
        fsync_file(self._fd, self._path)

    def flush(self) -> None:
        self._write_tables()
        self._fsync()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self._write_tables()
            self._fsync()
        finally:
            os.close(self._fd)
            self._fd = -1
            if self._parent is not None:
                self._parent.close()


def create_vhd(
    path: str,
    size: int,
    *,
    fixed: bool = False,
    parent: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    unique_id: uuid.UUID | None = None,
    opener: Opener | None = None,
) -> VhdWriter:
    """A new VHD: dynamic (default), ``fixed``, or differencing over the VHD at ``parent``.

    A differencing disk takes its size from the parent (``size`` must match it) and records
    the parent as W2ku (absolute) and W2ru (relative) locators plus its file name.
    ``unique_id`` keeps a disk's identity (restoring in place); by default a new one is made.
    The file is created new (``opener``, by default at ``path``): an existing name, a link too,
    is never replaced.
    """
    if parent is None:
        kind = DiskType.FIXED if fixed else DiskType.DYNAMIC
        return VhdWriter(path, size, kind, block_size, None, None, unique_id, opener=opener)
    if fixed:
        raise FormatError("a differencing VHD cannot be fixed", path=path)
    pimg = open_vhd(parent)
    if pimg.size != size:
        pimg.close()
        raise ParentError(f"parent {parent} is {pimg.size} bytes, not {size}", path=path, structure="VHD parent")
    try:
        return VhdWriter(path, size, DiskType.DIFFERENCING, block_size, pimg, parent, unique_id, opener=opener)
    except BaseException:
        pimg.close()
        raise


# -- the registry entry ---------------------------------------------------------------------------


def _read_parent(path: str) -> ParentReference | None:
    """A differencing VHD's ParentUniqueId and the files its locators and parent name lead to."""
    fd, st = open_checked(path, block_devices=False, nofollow=True)
    try:
        footer, _stale = _read_footer(fd, path, st.st_size, [])
        if footer.disk_type != DiskType.DIFFERENCING:
            return None
        hoff = footer.data_offset
        if hoff == NO_DATA_OFFSET or hoff + DYNAMIC_HEADER_SIZE > st.st_size:
            raise FormatError(
                f"dynamic header offset {hoff:#x} lies outside the file", path=path, structure="VHD footer"
            )
        header = DynamicHeader.unpack(read_structure(fd, path, hoff, DYNAMIC_HEADER_SIZE, "VHD dynamic header"))
        paths = tuple(dict.fromkeys(p for _how, p in _locator_paths(fd, path, st.st_size, header)))
    finally:
        os.close(fd)
    return ParentReference(paths, str(header.parent_unique_id), "vhd")


def _set_parent(path: str, new_parent: str, rule: ParentRule) -> None:
    """Point a differencing VHD at ``new_parent``: locator texts, then the dynamic header.

    The locator texts are rewritten in their existing space first. Should a crash stop us
    there, the header still names the old parent (ParentUniqueId and ParentUnicodeName), and a
    reader that finds the new path's UniqueId wrong falls back to the old parent's name beside
    the file. The header (ParentUniqueId, time stamp, name, locator lengths; spec "Dynamic Disk
    Header Format") is then written with one ``pwrite`` of its 1024 bytes.
    """
    with open_vhd(new_parent) as p:
        puid, pts = p.footer.unique_id, p.footer.timestamp
    with open_vhd(path, rule=rule) as img:
        data_offset = img.footer.data_offset
        checked = os.fstat(img._fd)
    parent_abs = os.path.abspath(new_parent)
    rel = os.path.relpath(parent_abs, os.path.dirname(os.path.abspath(path)))
    texts = {
        PlatformCode.W2KU.value: parent_abs.replace("/", "\\"),
        PlatformCode.W2RU.value: (".\\" + rel if not rel.startswith("..") else rel).replace("/", "\\"),
    }
    # opened by name again: it must be the file just checked, not one swapped in since
    fd, _st = open_checked(path, block_devices=False, writable=True, expect=(checked.st_dev, checked.st_ino))
    try:
        header = DynamicHeader.unpack(read_structure(fd, path, data_offset, DYNAMIC_HEADER_SIZE, "VHD dynamic header"))
        locators = list(header.locators)
        writes: list[tuple[int, bytes]] = []
        for i, loc in enumerate(locators):
            text = texts.get(loc.platform_code)
            if text is None or loc.data_length == 0:
                continue
            data = text.encode("utf-16-le")
            room = -(-loc.data_length // FOOTER_SIZE) * FOOTER_SIZE
            if len(data) > room:
                raise UnsupportedFormatError(
                    f"the parent path {text!r} does not fit in the {room} bytes of parent locator {i}",
                    path=path,
                    structure="VHD parent locator",
                )
            writes.append((loc.data_offset, data.ljust(room, b"\0")))
            locators[i] = dataclasses.replace(loc, data_length=len(data))
        for off, data in writes:
            platform.pwrite(fd, data, off)
        os.fsync(fd)
        new = dataclasses.replace(
            header,
            parent_unique_id=puid,
            parent_timestamp=pts,
            parent_unicode_name=os.path.basename(parent_abs),
            locators=tuple(locators),
        )
        platform.pwrite(fd, new.pack(), data_offset)
        os.fsync(fd)
    except OSError as exc:
        raise SourceError(f"{path}: cannot update the parent locators: {exc.strerror}") from exc
    finally:
        os.close(fd)


class VhdFormat(DiskFormat):
    """VHD: fixed, dynamic and differencing (``.avhd``); a child names its parent's UniqueId."""

    name = "vhd"
    suffixes = (".vhd", ".avhd")
    qemu_name = "vpc"
    can_be_child = True
    parent_formats = frozenset({"vhd"})
    checkpoint_format = "vhd"
    checkpoint_suffix = ".avhd"

    def probe(self, head: bytes, tail: bytes) -> bool:
        # the footer is at the end; dynamic disks keep a copy at offset 0
        return head.startswith(FOOTER_COOKIE) or tail.startswith(FOOTER_COOKIE)

    def open_fd(self, path: str, fd: int, *, parent: str | None, rule: ParentRule) -> DiskImage:
        return open_vhd_fd(path, fd, parent=parent, rule=rule)

    def create(
        self, path: str, size: int, *, parent: str | None = None, unit: int | None = None, opener: Opener | None = None
    ) -> DiskWriter:
        return create_vhd(path, size, parent=parent, block_size=unit or DEFAULT_BLOCK_SIZE, opener=opener)

    def check_metadata(self, image: DiskImage, result: MetadataCheck) -> bool:
        from vmvault.disk.metadata_check import check_vhd

        check_vhd(image, result)
        return True

    def identity(self, image: DiskImage) -> str | None:
        assert isinstance(image, VhdImage)
        return str(image.footer.unique_id)

    def read_parent(self, path: str) -> ParentReference | None:
        return _read_parent(path)

    def set_parent(self, path: str, new_parent: str, rule: ParentRule) -> None:
        _set_parent(path, new_parent, rule)

    def create_like(self, image: DiskImage, path: str, parent: DiskImage | None) -> DiskWriter:
        assert isinstance(image, VhdImage)
        return create_vhd(
            path,
            image.size,
            fixed=image.disk_type is DiskType.FIXED,
            parent=os.path.abspath(parent.path) if parent is not None else None,
            block_size=image.block_size or DEFAULT_BLOCK_SIZE,
            unique_id=image.footer.unique_id,
        )

    def is_fixed(self, image: DiskImage) -> bool:
        assert isinstance(image, VhdImage)
        return image.disk_type is DiskType.FIXED

    def layout_overhead(self, image: DiskImage, units: int, has_parent: bool) -> int:
        assert isinstance(image, VhdImage)
        if image.disk_type is DiskType.FIXED:
            return FOOTER_SIZE  # the data, then the footer
        unit = image.block_size
        blocks = -(-image.size // unit)
        bitmap = _bitmap_bytes(unit // SECTOR)
        # footer copy, dynamic header, BAT, each block's sector bitmap, footer
        return FOOTER_SIZE + DYNAMIC_HEADER_SIZE + 4 * blocks + 511 + units * bitmap + FOOTER_SIZE


FORMAT = VhdFormat()

"""qcow2 images, versions 2 and 3 (read), version 3 (write).

Reference: qemu ``docs/interop/qcow2.txt``; layout in ``_qcow2_layout``. A guest offset maps
through a two-level table: the L1 table (in the header) points at L2 tables, whose entries
point at host clusters (or mark them compressed, zero, or unallocated). Unallocated clusters
read from the backing file if there is one, else as zeros. Refcounts only matter to writers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from vmvault import platform
from vmvault.disk._direct import DirectWrites, drain_and_fsync, write_or_queue
from vmvault.disk._open import ANYWHERE, ParentRule, open_checked, open_parent, real_path
from vmvault.disk._qcow2_layout import (
    HEADER_V2_SIZE,
    HEADER_V3_SIZE,
    L1_OFFSET_MASK,
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET_MASK,
    L2_ZERO,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    AutoclearFeature,
    BitmapDirectoryEntry,
    BitmapsExtension,
    CompatibleFeature,
    CompressionType,
    ExtensionType,
    Header,
    IncompatibleFeature,
    pack_extension,
    unpack_extension_header,
    unpack_feature_names,
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
    is_zero,
    open_new,
    read_structure,
    write_error,
)
from vmvault.errors import FormatError, ParentError, SourceError, TargetError, UnsupportedFormatError

if TYPE_CHECKING:
    from vmvault.disk.metadata_check import MetadataCheck

__all__ = [
    "FORMAT",
    "Qcow2Format",
    "Qcow2Image",
    "Qcow2Writer",
    "create_qcow2",
    "open_qcow2",
    "open_qcow2_fd",
    "open_qcow2_for_write",
]

#: qemu's own limit on the L1 table (QCOW_MAX_L1_SIZE); bounds memory for absurd virtual sizes
MAX_L1_BYTES = 32 * 1024 * 1024
#: qemu-img's default cluster size
DEFAULT_CLUSTER_SIZE: Final = 64 * 1024
#: how many L2 tables a reader keeps in memory (64 KiB each at the default cluster size)
L2_CACHE_TABLES = 256
#: qemu's protocol driver for a plain file, which some backing format extensions name
_QEMU_FILE_DRIVER = "file"
_KNOWN_INCOMPATIBLE = (
    IncompatibleFeature.DIRTY
    | IncompatibleFeature.CORRUPT
    | IncompatibleFeature.EXTERNAL_DATA_FILE
    | IncompatibleFeature.COMPRESSION_TYPE
    | IncompatibleFeature.EXTENDED_L2
)

# run kinds produced by the mapper (ExtentKind plus "compressed" and "unallocated")
_DATA: Final = 0
_ZERO: Final = 1
_UNALLOC: Final = 2
_COMPRESSED: Final = 3


class Qcow2Image(DiskImage):
    """One qcow2 layer. Reads are positional; the L2 cache is guarded by a lock."""

    format = "qcow2"

    def __init__(
        self,
        path: str,
        fd: int,
        file_size: int,
        header: Header,
        l1: array[int],
        backing: DiskImage | None,
        facts: dict[str, object],
        notes: list[str],
    ) -> None:
        self._path = path
        self._fd = fd
        self._file_size = file_size
        self.header = header
        self._l1 = l1
        self._backing = backing
        self._facts = facts
        self._notes = notes
        self._cbits = header.cluster_bits
        self._cs = 1 << header.cluster_bits
        self._extended = bool(header.incompatible_features & IncompatibleFeature.EXTENDED_L2)
        # an L2 entry is 8 bytes, or 16 with extended L2 (spec "Extended L2 Entries")
        self._l2_entries = self._cs // (16 if self._extended else 8)
        self._sub = self._cs // 32 if self._extended else self._cs
        self._v3 = header.version >= 3
        self._zstd = header.compression_type == CompressionType.ZSTD
        # compressed descriptor: bits 0..x-1 host offset, x..61 extra sectors (spec "Compressed Clusters")
        self._cx = 62 - (self._cbits - 8)
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._lock = threading.Lock()
        self._released = CacheRelease()

    # -- DiskImage ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.header.size

    @property
    def path(self) -> str:
        return self._path

    @property
    def parent(self) -> DiskImage | None:
        return self._backing

    @property
    def cluster_size(self) -> int:
        return self._cs

    def info(self) -> dict[str, object]:
        out = super().info()
        out.update(self._facts)
        out["file_size"] = self._file_size
        if self._notes:
            out["warnings"] = list(self._notes)
        return out

    def read_done(self, offset: int, length: int) -> None:
        self._released.done(self._fd, length)
        super().read_done(offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()

    # -- tables ------------------------------------------------------------------------------------
    def _l2(self, l1_index: int) -> array[int] | None:
        """The L2 table for ``l1_index`` as host-order integers, or None when it is unallocated."""
        entry = self._l1[l1_index]
        off = entry & L1_OFFSET_MASK
        if off == 0:
            return None
        with self._lock:
            table = self._l2_cache.get(off)
            if table is not None:
                self._l2_cache.move_to_end(off)
                return table
        where = self.header.l1_table_offset + 8 * l1_index
        if off & (self._cs - 1) or off + self._cs > self._file_size:
            raise FormatError(
                f"L1 entry {l1_index} points at {off:#x}, which is unaligned or past the end of the file "
                f"({self._file_size} bytes)",
                path=self._path,
                offset=where,
                structure="qcow2 L1 table",
            )
        table = array("Q", read_structure(self._fd, self._path, off, self._cs, "qcow2 L2 table"))
        if table.itemsize != 8:  # pragma: no cover - every supported platform has 8-byte "Q"
            raise UnsupportedFormatError("platform lacks 64-bit arrays", path=self._path)
        if _LITTLE:
            table.byteswap()
        self._check_l2(table, off)
        with self._lock:
            self._l2_cache[off] = table
            if len(self._l2_cache) > L2_CACHE_TABLES:
                self._l2_cache.popitem(last=False)
        return table

    def _check_l2(self, table: array[int], table_off: int) -> None:
        step = 2 if self._extended else 1
        cs, fsize, cmask = self._cs, self._file_size, (1 << self._cx) - 1
        for i in range(0, len(table), step):
            e = table[i]
            if e & L2_COMPRESSED:
                host = e & cmask
                if host >= fsize:
                    raise FormatError(
                        f"compressed cluster at {host:#x} lies past the end of the file ({fsize} bytes)",
                        path=self._path,
                        offset=table_off + 8 * i,
                        structure="qcow2 L2 table",
                    )
                continue
            host = e & L2_OFFSET_MASK
            # the last cluster may end past EOF: with subclusters qemu writes only the allocated ones,
            # and qemu reads the rest of a cluster past EOF as zeros
            if host and (host & (cs - 1) or host >= fsize):
                raise FormatError(
                    f"data cluster at {host:#x} is unaligned or past the end of the file ({fsize} bytes)",
                    path=self._path,
                    offset=table_off + 8 * i,
                    structure="qcow2 L2 table",
                )

    def _runs(self, offset: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Coalesced (guest offset, length, kind, host) runs covering ``[offset, end)``.

        For _DATA runs ``host`` is the file offset of the run's first byte and runs are merged
        only when their host bytes are contiguous too; for _COMPRESSED it is the L2 descriptor.
        """
        pend: list[int] | None = None
        for pos, n, kind, host in self._clusters(offset, end):
            if (
                pend is not None
                and kind == pend[2]
                and kind != _COMPRESSED
                and pend[0] + pend[1] == pos
                and (kind != _DATA or pend[3] + pend[1] == host)
            ):
                pend[1] += n
                continue
            if pend is not None:
                yield pend[0], pend[1], pend[2], pend[3]
            pend = [pos, n, kind, host]
        if pend is not None:
            yield pend[0], pend[1], pend[2], pend[3]

    def _clusters(self, offset: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        cs, cbits, l2n = self._cs, self._cbits, self._l2_entries
        span = l2n * cs  # guest bytes one L2 table maps
        v3, extended = self._v3, self._extended
        pos = offset
        while pos < end:
            l1i = pos // span
            table = self._l2(l1i)
            stop = min(end, (l1i + 1) * span)
            if table is None:
                yield pos, stop - pos, _UNALLOC, 0
                pos = stop
                continue
            while pos < stop:
                ci = pos >> cbits
                cstart = ci << cbits
                cend = min(cstart + cs, stop)
                idx = ci - l1i * l2n
                if extended:
                    yield from self._subclusters(table[2 * idx], table[2 * idx + 1], pos, cstart, cend)
                else:
                    e = table[idx]
                    if e & L2_COMPRESSED:
                        yield pos, cend - pos, _COMPRESSED, e
                    elif v3 and e & L2_ZERO:
                        yield pos, cend - pos, _ZERO, 0
                    else:
                        # extend over following entries with contiguous host clusters (or that are
                        # also unallocated) here, which is much cheaper than merging per cluster later
                        host = e & L2_OFFSET_MASK
                        last = min(l2n, ((stop - 1) >> cbits) - l1i * l2n + 1)
                        j = idx + 1
                        want = (host + cs) if host else 0
                        while j < last and table[j] & ~L2_COPIED == want:
                            j += 1
                            if host:
                                want += cs
                        cend = min(stop, (l1i * l2n + j) << cbits)
                        if host:
                            yield pos, cend - pos, _DATA, host + pos - cstart
                        else:
                            yield pos, cend - pos, _UNALLOC, 0
                pos = cend

    def _subclusters(
        self, e: int, bitmap: int, pos: int, cstart: int, cend: int
    ) -> Iterator[tuple[int, int, int, int]]:
        if e & L2_COMPRESSED:
            yield pos, cend - pos, _COMPRESSED, e
            return
        host = e & L2_OFFSET_MASK
        sub = self._sub
        while pos < cend:
            si = (pos - cstart) // sub
            send = min(cstart + (si + 1) * sub, cend)
            if bitmap >> (32 + si) & 1:
                yield pos, send - pos, _ZERO, 0
            elif bitmap >> si & 1:
                if not host:
                    raise FormatError(
                        f"subcluster {si} of the cluster at guest offset {cstart:#x} is allocated but the "
                        "entry has no host offset",
                        path=self._path,
                        structure="qcow2 extended L2 entry",
                    )
                yield pos, send - pos, _DATA, host + pos - cstart
            else:
                yield pos, send - pos, _UNALLOC, 0
            pos = send

    # -- reading -----------------------------------------------------------------------------------
    def extents(self) -> Iterator[Extent]:
        backing_end = self._backing.size if self._backing is not None else 0
        out: list[Extent] = []
        for pos, n, kind, _host in self._runs(0, self.size):
            if kind in (_DATA, _COMPRESSED):
                out.append(Extent(pos, n, ExtentKind.DATA))
            elif kind == _ZERO:
                out.append(Extent(pos, n, ExtentKind.ZERO))
            else:
                # unallocated: the backing file supplies the bytes, and zeros past its end
                cut = min(max(backing_end, pos), pos + n)
                out.append(Extent(pos, cut - pos, ExtentKind.PARENT))
                out.append(Extent(cut, pos + n - cut, ExtentKind.ZERO))
        yield from coalesce(out)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        # Contiguous host clusters were merged into one run by _runs, so a request over a
        # sequentially allocated area costs one pread, as for a raw file.
        pieces: list[bytes] = []
        for pos, n, kind, host in self._runs(offset, end):
            if kind == _DATA:
                pieces.append(self._pread_data(host, n))
            elif kind == _UNALLOC and self._backing is not None:
                data = self._backing.read(pos, n)
                pieces.append(data if len(data) == n else data + bytes(n - len(data)))  # past its end: zeros
            elif kind == _COMPRESSED:
                cstart = pos >> self._cbits << self._cbits
                cluster = self._decompress(host, cstart)
                pieces.append(cluster[pos - cstart : pos - cstart + n])
            else:
                pieces.append(bytes(n))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _pread_data(self, host: int, n: int) -> bytes:
        want = max(0, min(n, self._file_size - host))
        try:
            data = platform.pread(self._fd, want, host)
        except OSError as exc:
            raise SourceError(f"{self._path}: read at offset {host:#x} failed: {exc.strerror}") from exc
        if len(data) == want < n:
            return data + bytes(n - want)  # the part of the last cluster past EOF (see _check_l2)
        if len(data) != n:
            raise SourceError(
                f"{self._path}: file ended at {host + len(data):#x} while reading data "
                "(did it change size during the backup?)"
            )
        return data

    def _decompress(self, desc: int, cstart: int) -> bytes:
        host = desc & ((1 << self._cx) - 1)
        sectors = (desc >> self._cx) & ((1 << (62 - self._cx)) - 1)
        nbytes = min((sectors + 1) * 512 - (host & 511), self._file_size - host)
        raw = read_structure(self._fd, self._path, host, nbytes, "qcow2 compressed cluster")
        try:
            if self._zstd:
                import zstandard

                # the descriptor counts whole sectors, so the zstd frame may be followed by padding
                out = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
            else:
                # raw deflate (no zlib header), as qemu writes it
                out = zlib.decompressobj(-15).decompress(raw, self._cs)
        except Exception as exc:  # zlib.error, zstandard.ZstdError
            raise FormatError(
                f"compressed cluster for guest offset {cstart:#x} does not decompress: {exc}",
                path=self._path,
                offset=host,
                structure="qcow2 compressed cluster",
            ) from exc
        if len(out) < self._cs:
            raise FormatError(
                f"compressed cluster for guest offset {cstart:#x} holds {len(out)} bytes, not {self._cs}",
                path=self._path,
                offset=host,
                structure="qcow2 compressed cluster",
            )
        return out[: self._cs]


_LITTLE = array("H", [1]).tobytes() == b"\x01\x00"


# -- opening --------------------------------------------------------------------------------------


def _parse_extensions(
    fd: int, path: str, start: int, limit: int, facts: dict[str, object], notes: list[str], file_size: int
) -> tuple[str | None, BitmapsExtension | None]:
    """Walk the header extensions (spec "Header extensions"); returns (backing format, bitmaps ext)."""
    backing_format: str | None = None
    bitmaps: BitmapsExtension | None = None
    raw = read_structure(fd, path, 0, min(limit, file_size), "qcow2 header extensions") if start < limit else b""
    pos = start
    seen_types: list[str] = []
    while pos + 8 <= len(raw):
        ext_type, length = unpack_extension_header(raw[pos : pos + 8])
        if ext_type == ExtensionType.END:
            break
        data_end = pos + 8 + length
        if data_end > len(raw):
            raise FormatError(
                f"header extension {ext_type:#010x} of {length} bytes runs past the header cluster",
                path=path,
                offset=pos,
                structure="qcow2 header extension",
            )
        data = raw[pos + 8 : data_end]
        if ext_type == ExtensionType.BACKING_FORMAT:
            backing_format = data.rstrip(b"\0").decode("utf-8", errors="replace")
            seen_types.append("backing_format")
        elif ext_type == ExtensionType.FEATURE_NAME_TABLE:
            facts["feature_names"] = [
                {"type": ("incompatible", "compatible", "autoclear")[t] if t < 3 else str(t), "bit": b, "name": n}
                for t, b, n in unpack_feature_names(data)
            ]
            seen_types.append("feature_names")
        elif ext_type == ExtensionType.BITMAPS:
            if length < 24:
                raise FormatError(
                    f"bitmaps extension is {length} bytes, expected 24",
                    path=path,
                    offset=pos,
                    structure="qcow2 bitmaps extension",
                )
            bitmaps = BitmapsExtension.unpack(data)
            seen_types.append("bitmaps")
        elif ext_type == ExtensionType.FULL_DISK_ENCRYPTION:
            raise UnsupportedFormatError(
                "encrypted qcow2 images are not supported", path=path, offset=pos, structure="qcow2 header extension"
            )
        elif ext_type == ExtensionType.EXTERNAL_DATA_FILE:
            raise UnsupportedFormatError(
                "qcow2 images with an external data file are not supported",
                path=path,
                offset=pos,
                structure="qcow2 header extension",
            )
        else:
            seen_types.append(f"{ext_type:#010x}")  # unknown extensions may be ignored (spec)
        pos = data_end + (-length % 8)
    facts["header_extensions"] = seen_types
    return backing_format, bitmaps


def _read_bitmap_names(
    fd: int,
    path: str,
    ext: BitmapsExtension,
    file_size: int,
    autoclear: int,
    facts: dict[str, object],
    notes: list[str],
) -> None:
    if not autoclear & AutoclearFeature.BITMAPS:
        # a program that does not know bitmaps wrote the image: the directory is stale (spec "Bitmaps")
        notes.append("bitmaps extension present but the autoclear bitmaps bit is clear: bitmaps are stale")
    if ext.directory_size > 64 * 1024 * 1024 or ext.directory_offset + ext.directory_size > file_size:
        raise FormatError(
            f"bitmap directory ({ext.directory_size} bytes at {ext.directory_offset:#x}) lies outside the file",
            path=path,
            offset=ext.directory_offset,
            structure="qcow2 bitmap directory",
        )
    raw = read_structure(fd, path, ext.directory_offset, ext.directory_size, "qcow2 bitmap directory")
    names: list[str] = []
    pos = 0
    for _ in range(ext.nb_bitmaps):
        try:
            entry, pos = BitmapDirectoryEntry.unpack(raw, pos)
        except (ValueError, IndexError, struct.error) as exc:  # struct.error: an entry cut off by the directory's end
            raise FormatError(
                f"bitmap directory entry {len(names)} is damaged: {exc}",
                path=path,
                offset=ext.directory_offset + pos,
                structure="qcow2 bitmap directory",
            ) from exc
        names.append(entry.name)
    facts["bitmaps"] = names


def _open_backing(
    path: str, name: str, fmt: str | None, override: str | None, seen: frozenset[str], rule: ParentRule
) -> DiskImage:
    """Open the backing file ``name`` of ``path``.

    qcow2 records no identity of its backing file, so what is checked is where it is and what
    it is: a regular file where ``rule`` allows (``_open.open_parent``), read in the backing
    format the header records (never probed then, as qemu does: a guest can write any header
    into a raw disk), probed only when none is recorded or the user named the file.
    """
    if override is not None:
        target = override
    else:
        if ":" in name.split("/", 1)[0] and not os.path.exists(name):
            raise UnsupportedFormatError(
                f"backing file {name!r} uses a protocol vmvault cannot open", path=path, structure="qcow2 backing file"
            )
        target = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(path)), name)
    recorded = _format_named(fmt) if fmt else None
    if fmt and recorded is None:
        raise UnsupportedFormatError(
            f"backing format {fmt!r} is not one vmvault reads", path=path, structure="qcow2 backing format"
        )
    fd = open_parent(target, child=path, rule=rule, named=override is not None)
    if fd is None:
        raise ParentError(
            f"backing file {target} (named {name!r}) does not exist", path=path, structure="qcow2 backing file"
        )
    from vmvault.disk import detect_format_fd, registry

    try:
        if real_path(fd, target) in seen:
            raise ParentError(
                f"backing chain is cyclic: {target} is already in the chain", path=path, structure="qcow2 backing file"
            )
        # an override is probed by content: the recorded backing format describes the recorded file
        kind = recorded if recorded is not None and override is None else detect_format_fd(fd, target)
    except BaseException:
        os.close(fd)
        raise
    # each opener owns fd from here
    if kind == FORMAT.name:
        return _open(target, None, seen, rule, fd=fd)  # keeps the cycle check across qcow2 layers
    return registry.get(kind).open_fd(target, fd, parent=None, rule=rule)


def _format_named(name: str) -> str | None:
    """vmvault's name for the format a backing format extension names (qemu's names: "vpc" is VHD)."""
    from vmvault.disk import registry

    if name == _QEMU_FILE_DRIVER:
        return registry.FALLBACK.name  # a plain file: raw
    entry = registry.by_qemu_name(name)
    return entry.name if entry is not None else None


def _open(
    path: str, parent: str | None, seen: frozenset[str], rule: ParentRule | None = None, *, fd: int | None = None
) -> Qcow2Image:
    """Open ``path`` (or take over ``fd``, already opened and checked for it) and its chain."""
    if fd is None:
        fd, _st = open_checked(path)
    try:
        return _open_fd(path, fd, parent, seen | {real_path(fd, path)}, rule or ANYWHERE)
    except BaseException:
        os.close(fd)
        raise


def _read_header(fd: int, path: str) -> tuple[Header, bytes]:
    """The header and its raw bytes (72 for v2, ``header_length`` for v3): magic and version checked."""
    raw = read_structure(fd, path, 0, HEADER_V2_SIZE, "qcow2 header")
    if raw[:4] != MAGIC:
        raise FormatError(f"bad magic {raw[:4]!r}", path=path, offset=0, structure="qcow2 header")
    version = int.from_bytes(raw[4:8], "big")
    if version not in (2, 3):
        raise UnsupportedFormatError(
            f"qcow2 version {version} is not supported (only 2 and 3)", path=path, offset=4, structure="qcow2 header"
        )
    if version == 3:
        hlen = int.from_bytes(read_structure(fd, path, 100, 4, "qcow2 header"), "big")
        if hlen < 104 or hlen % 8 or hlen > 4096:
            raise FormatError(
                f"header_length {hlen} is not a multiple of 8 between 104 and 4096",
                path=path,
                offset=100,
                structure="qcow2 header",
            )
        raw = read_structure(fd, path, 0, hlen, "qcow2 header")
    return Header.unpack(raw), raw


def _open_fd(path: str, fd: int, parent: str | None, seen: frozenset[str], rule: ParentRule) -> Qcow2Image:
    file_size = os.fstat(fd).st_size
    h, _raw = _read_header(fd, path)
    version = h.version
    notes: list[str] = []
    facts: dict[str, object] = {"version": version}

    def bad(msg: str, off: int, cls: type[FormatError] = FormatError) -> FormatError:
        return cls(msg, path=path, offset=off, structure="qcow2 header")

    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"cluster_bits {h.cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", 20)
    cs = 1 << h.cluster_bits
    if h.crypt_method != 0:
        raise bad(f"encrypted images (crypt_method {h.crypt_method}) are not supported", 32, UnsupportedFormatError)
    unknown = h.incompatible_features & ~int(_KNOWN_INCOMPATIBLE)
    if unknown:
        raise bad(f"unknown incompatible feature bits {unknown:#x}", 72, UnsupportedFormatError)
    incompat = IncompatibleFeature(h.incompatible_features)
    if incompat & IncompatibleFeature.EXTERNAL_DATA_FILE:
        raise bad("images with an external data file are not supported", 72, UnsupportedFormatError)
    if incompat & IncompatibleFeature.DIRTY:
        notes.append("image is marked dirty (not closed cleanly); refcounts may be stale, data is readable")
    if incompat & IncompatibleFeature.CORRUPT:
        notes.append("image is marked corrupt by qemu; data is read as the tables describe it")
    if h.compression_type not in (0, 1):
        raise bad(f"unknown compression type {h.compression_type}", 104, UnsupportedFormatError)
    if h.compression_type and not incompat & IncompatibleFeature.COMPRESSION_TYPE:
        raise bad("compression type set without the compression-type feature bit", 104)
    if incompat & IncompatibleFeature.EXTENDED_L2 and h.cluster_bits < 14:
        raise bad("extended L2 entries need clusters of at least 16 KiB", 20)
    if h.refcount_order > 6:
        raise bad(f"refcount_order {h.refcount_order} exceeds 6", 96)
    extended = bool(incompat & IncompatibleFeature.EXTENDED_L2)
    l2_entries = cs // (16 if extended else 8)
    if h.size >= 1 << 63:
        raise bad(f"virtual size {h.size} is absurd", 24)
    need_l1 = -(-h.size // (l2_entries * cs))
    if h.l1_size < need_l1:
        raise bad(f"l1_size {h.l1_size} is too small for {h.size} bytes (needs {need_l1})", 36)
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"L1 table of {h.l1_size} entries exceeds qemu's 32 MiB limit", 36)
    if h.l1_table_offset & (cs - 1) or h.l1_table_offset + 8 * h.l1_size > file_size:
        raise bad(f"L1 table ({h.l1_size} entries at {h.l1_table_offset:#x}) is unaligned or past EOF", 40)
    facts.update(
        {
            "cluster_size": cs,
            "compression_type": CompressionType(h.compression_type).name.lower(),
            "extended_l2": extended,
            "dirty": bool(incompat & IncompatibleFeature.DIRTY),
            "corrupt": bool(incompat & IncompatibleFeature.CORRUPT),
            "lazy_refcounts": bool(h.compatible_features & CompatibleFeature.LAZY_REFCOUNTS),
            "refcount_bits": 1 << h.refcount_order,
            "snapshots": h.nb_snapshots,
        }
    )
    ext_start = h.header_length if version == 3 else HEADER_V2_SIZE
    # extensions end at the backing file name or at the end of the first cluster
    limit = cs
    if h.backing_file_offset and h.backing_file_offset > ext_start:
        limit = min(limit, h.backing_file_offset)
    backing_format, bitmaps = _parse_extensions(fd, path, ext_start, limit, facts, notes, file_size)
    if bitmaps is not None:
        _read_bitmap_names(fd, path, bitmaps, file_size, h.autoclear_features, facts, notes)
    l1 = array("Q", read_structure(fd, path, h.l1_table_offset, 8 * h.l1_size, "qcow2 L1 table"))
    if _LITTLE:
        l1.byteswap()
    backing: DiskImage | None = None
    if h.backing_file_offset:
        if h.backing_file_size == 0 or h.backing_file_size > MAX_BACKING_NAME:
            raise bad(f"backing file name length {h.backing_file_size} is not 1..{MAX_BACKING_NAME}", 16)
        if h.backing_file_offset + h.backing_file_size > file_size:
            raise bad(f"backing file name at {h.backing_file_offset:#x} lies past the end of the file", 8)
        name_raw = read_structure(fd, path, h.backing_file_offset, h.backing_file_size, "qcow2 backing file name")
        try:
            name = name_raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad("backing file name is not UTF-8", h.backing_file_offset) from exc
        facts["backing_file"] = name
        if backing_format:
            facts["backing_format"] = backing_format
        backing = _open_backing(path, name, backing_format, parent, seen, rule)
        facts["backing_path"] = backing.path
    elif parent is not None:
        raise ParentError(
            f"parent {parent} given but the image has no backing file", path=path, structure="qcow2 header"
        )
    return Qcow2Image(path, fd, file_size, h, l1, backing, facts, notes)


def open_qcow2(path: str, *, parent: str | None = None, rule: ParentRule | None = None) -> Qcow2Image:
    """Open a qcow2 image read-only, with its backing chain.

    The backing file is resolved relative to the image's folder; ``parent`` overrides it;
    ``rule`` says where backing files may be (``vmvault.disk.open_image``). Encrypted images
    and external data files raise UnsupportedFormatError.
    """
    return _open(path, parent, frozenset(), rule)


def open_qcow2_fd(path: str, fd: int, *, parent: str | None = None, rule: ParentRule | None = None) -> Qcow2Image:
    """``open_qcow2`` on a file the caller opened and checked (``_open.open_checked``); owns ``fd``."""
    return _open(path, parent, frozenset(), rule, fd=fd)


# -- writing --------------------------------------------------------------------------------------


class Qcow2Writer(DiskWriter):
    """Writes a qcow2 v3 image: a new one (``create_qcow2``) or an existing one in place.

    New clusters are appended at EOF. While the writer is open the header carries the dirty bit
    (spec "incompatible_features" bit 0: refcounts may be stale; qemu repairs them on open), and
    ``flush``/``close`` write the tables, rebuild every refcount from the L1/L2 tables (so a
    cluster that nothing references any more simply gets refcount 0, never a leak), and then
    clear the bit.

    A new image (``create_qcow2``) is written past the page cache where the file system takes
    ``O_DIRECT`` (disk/_direct.py): every write queued in order and written from one thread;
    each fsync first waits for what was queued, and each read of the file (an L2 table read
    back, a cluster partly overwritten) runs with the queue drained and ``O_DIRECT`` off. The
    order of ``flush``/``close`` (tables and refcounts, fsync, header, fsync) holds as before.
    """

    format = "qcow2"

    def __init__(
        self,
        path: str,
        fd: int,
        header: Header,
        head_end: int,
        l1: list[int],
        backing: DiskImage | None,
        reader: Qcow2Image | None,
    ) -> None:
        self._path = path
        self._fd = fd
        self._hdr = header
        self._size = header.size
        self._cbits = header.cluster_bits
        self._cs = 1 << header.cluster_bits
        self._l2n = self._cs // 8
        self._head_end = head_end  # header, extensions and backing name end here
        self._l1 = l1
        self._l1_dirty = False
        self._l2: dict[int, list[int]] = {}
        self._l2_dirty: set[int] = set()
        self._backing = backing
        self._reader = reader  # an existing image's reader: decompresses old compressed clusters
        self._eof = -(-os.fstat(fd).st_size // self._cs) * self._cs
        self._direct: DirectWrites | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def past_cache(self) -> bool:
        return self._direct is not None and self._direct.direct

    def _go_past_cache(self) -> None:
        """Write past the page cache from now on, where the file system takes it (a new image,
        once its first tables are written)."""
        self._direct = DirectWrites.open(self._fd, self._path)

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        """Around every read of the file: what was queued is written first (class docstring)."""
        return self._direct.paused() if self._direct is not None else contextlib.nullcontext()

    # -- low level -----------------------------------------------------------------------------------
    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        write_or_queue(self._direct, self._fd, data, offset, self._path)

    def _write_header(self, *, dirty: bool, rt_off: int, rt_clusters: int) -> None:
        incompat = self._hdr.incompatible_features & ~int(IncompatibleFeature.DIRTY)
        if dirty:
            incompat |= IncompatibleFeature.DIRTY
        self._hdr = Header(
            version=3,
            backing_file_offset=self._hdr.backing_file_offset,
            backing_file_size=self._hdr.backing_file_size,
            cluster_bits=self._hdr.cluster_bits,
            size=self._hdr.size,
            crypt_method=0,
            l1_size=self._hdr.l1_size,
            l1_table_offset=self._hdr.l1_table_offset,
            refcount_table_offset=rt_off,
            refcount_table_clusters=rt_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible_features=incompat,
            compatible_features=self._hdr.compatible_features,
            autoclear_features=self._hdr.autoclear_features,
            refcount_order=4,
            header_length=self._hdr.header_length,
            compression_type=self._hdr.compression_type,
        )
        self._pwrite(self._hdr.pack(), 0)

    def _sync(self) -> None:
        drain_and_fsync(self._direct, self._fd, self._path)

    def _alloc(self) -> int:
        off = self._eof
        self._eof += self._cs
        return off

    def _load_l2(self, off: int) -> list[int]:
        with self._reading():
            raw = array("Q", read_structure(self._fd, self._path, off, self._cs, "qcow2 L2 table"))
        if _LITTLE:
            raw.byteswap()
        return raw.tolist()

    def _table(self, l1i: int, create: bool) -> list[int] | None:
        table = self._l2.get(l1i)
        if table is not None:
            return table
        off = self._l1[l1i] & L1_OFFSET_MASK
        if off:
            table = self._load_l2(off)
        elif not create:
            return None
        else:
            table = [0] * self._l2n
            self._l1[l1i] = self._alloc() | L2_COPIED
            self._l1_dirty = True
            self._l2_dirty.add(l1i)
        self._l2[l1i] = table
        return table

    def _current(self, entry: int, cstart: int) -> bytes:
        """What the guest sees in the cluster at ``cstart`` now (before a partial overwrite)."""
        cs = self._cs
        if entry & L2_COMPRESSED:
            assert self._reader is not None  # only existing images hold compressed clusters
            return self._reader._decompress(entry, cstart)
        if entry & L2_ZERO:
            return bytes(cs)
        host = entry & L2_OFFSET_MASK
        if host:
            with self._reading():
                data = platform.pread(self._fd, cs, host)
            return data + bytes(cs - len(data))
        if self._backing is not None:
            data = self._backing.read(cstart, cs)
            return data + bytes(cs - len(data))
        return bytes(cs)

    def _reads_zero(self, entry: int) -> bool:
        if entry & L2_COMPRESSED:
            return False
        if entry & L2_ZERO:
            return True
        return not entry & L2_OFFSET_MASK and self._backing is None

    # -- writing -------------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        if self._fd < 0:
            raise ValueError(f"{self._path} is closed")
        if offset < 0 or offset + len(data) > self._size:
            raise ValueError(f"write of {len(data)} bytes at {offset} is outside the {self._size}-byte disk")
        view = memoryview(data)
        cs, pos, end = self._cs, offset, offset + len(data)
        while pos < end:
            cstart = pos >> self._cbits << self._cbits
            cend = min(cstart + cs, end)
            self._write_cluster(cstart, pos, view[pos - offset : cend - offset])
            pos = cend

    def _write_cluster(self, cstart: int, pos: int, chunk: memoryview) -> None:
        l1i, l2i = divmod(cstart >> self._cbits, self._l2n)
        table = self._table(l1i, create=False)
        entry = table[l2i] if table is not None else 0
        host = entry & L2_OFFSET_MASK
        owned = host and entry & L2_COPIED and not entry & L2_COMPRESSED  # refcount 1: write in place
        whole = pos == cstart and len(chunk) == min(self._cs, self._size - cstart)
        if owned and not entry & L2_ZERO:
            self._pwrite(chunk, host + pos - cstart)
            return
        zero = is_zero(chunk)
        if zero and self._reads_zero(entry):
            return  # already reads as zeros
        if zero and whole:
            # a v3 zero cluster needs no space and hides the backing file (spec "Standard Cluster Descriptor")
            self._set(l1i, l2i, L2_ZERO)
            return
        # a preallocated zero cluster we own is filled in place; anything else gets a new cluster
        target = host if owned else self._alloc()
        if whole:
            self._pwrite(chunk, target)
        else:
            buf = bytearray(self._current(entry, cstart))
            buf[pos - cstart : pos - cstart + len(chunk)] = chunk
            self._pwrite(buf, target)
        self._set(l1i, l2i, target | L2_COPIED)

    def _set(self, l1i: int, l2i: int, entry: int) -> None:
        table = self._table(l1i, create=True)
        assert table is not None
        table[l2i] = entry
        self._l2_dirty.add(l1i)

    # -- tables and refcounts --------------------------------------------------------------------------
    def _write_tables(self) -> None:
        for l1i in sorted(self._l2_dirty):
            raw = array("Q", self._l2[l1i])
            if _LITTLE:
                raw.byteswap()
            self._pwrite(raw.tobytes(), self._l1[l1i] & L1_OFFSET_MASK)
        self._l2_dirty.clear()
        if self._l1_dirty:
            l1 = array("Q", self._l1)
            if _LITTLE:
                l1.byteswap()
            self._pwrite(l1.tobytes(), self._hdr.l1_table_offset)
            self._l1_dirty = False
        # keep memory bounded on big restores: tables already written can be read back when needed
        if len(self._l2) > L2_CACHE_TABLES:
            self._l2.clear()

    def _write_refcounts(self) -> tuple[int, int]:
        """Count every reference from the tables, then append refcount table and blocks at EOF."""
        cs, cbits = self._cs, self._cbits
        used = self._eof >> cbits
        counts = array("H", bytes(2 * used))

        def mark(start: int, nbytes: int) -> None:
            for c in range(start >> cbits, (start + nbytes - 1 >> cbits) + 1):
                if counts[c] == 0xFFFF:
                    raise FormatError(f"refcount overflow at cluster {c}", path=self._path)
                counts[c] += 1

        mark(0, max(self._head_end, 1))
        mark(self._hdr.l1_table_offset, 8 * len(self._l1))
        cx = 62 - (cbits - 8)
        for l1i, l1e in enumerate(self._l1):
            off = l1e & L1_OFFSET_MASK
            if not off:
                continue
            mark(off, cs)
            table = self._l2.get(l1i)
            for e in table if table is not None else self._load_l2(off):
                if e & L2_COMPRESSED:
                    host = e & ((1 << cx) - 1)
                    sectors = (e >> cx) & ((1 << (62 - cx)) - 1)
                    mark(host, (sectors + 1) * 512 - (host & 511))
                elif e & L2_OFFSET_MASK:
                    mark(e & L2_OFFSET_MASK, cs)
        # the refcount structures count themselves too (spec "Host cluster management")
        per_block = cs * 8 // 16
        blocks, table_clusters = 0, 0
        while True:
            total = used + blocks + table_clusters
            need = (-(-total // per_block), -(-(-(-total // per_block) * 8) // cs))
            if need == (blocks, table_clusters):
                break
            blocks, table_clusters = need
        rt_off = used * cs
        first_block = used + table_clusters
        counts.extend([1] * (blocks + table_clusters))
        counts.extend([0] * (blocks * per_block - len(counts)))
        rtable = array("Q", [(first_block + i) * cs for i in range(blocks)])
        rtable.extend([0] * (table_clusters * cs // 8 - blocks))
        if _LITTLE:
            rtable.byteswap()
            counts.byteswap()
        self._pwrite(rtable.tobytes(), rt_off)
        self._pwrite(counts.tobytes(), first_block * cs)
        # later allocations go after these; at the next flush nothing references them (refcount 0)
        self._eof = (used + blocks + table_clusters) * cs
        return rt_off, table_clusters

    def _commit(self, *, dirty: bool) -> None:
        self._write_tables()
        rt_off, rt_clusters = self._write_refcounts()
        self._sync()  # tables and refcounts are durable before the header points at them
        self._write_header(dirty=dirty, rt_off=rt_off, rt_clusters=rt_clusters)
        self._sync()

    def flush(self) -> None:
        self._commit(dirty=True)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self._commit(dirty=False)
        finally:
            self._release()

    def _release(self) -> None:
        direct, self._direct = self._direct, None
        if direct is not None:
            # after a commit, everything queued was written at its fsync; after a failure, the
            # failure is the one already raised
            with contextlib.suppress(TargetError):
                direct.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._reader is not None:
            self._reader.close()  # closes the backing chain too
        elif self._backing is not None:
            self._backing.close()


def _open_backing_for_write(path: str, backing: str, backing_format: str | None) -> DiskImage:
    # resolve like a reader will, so partial-cluster writes can copy the backing data
    target = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(os.path.abspath(path)), backing)
    if not os.path.isfile(target):
        raise ParentError(f"backing file {target} does not exist", path=path, structure="qcow2 backing file")
    from vmvault.disk import detect_format, open_image

    fmt = (_format_named(backing_format) or backing_format) if backing_format else detect_format(target)
    return open_qcow2(target) if fmt == FORMAT.name else open_image(target, format=fmt)


def create_qcow2(
    path: str,
    size: int,
    *,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    backing: str | None = None,
    backing_format: str | None = None,
    opener: Opener | None = None,
) -> Qcow2Writer:
    """A new qcow2 v3 image; with ``backing`` an overlay whose unwritten clusters read the backing file.

    ``backing`` is stored as given (relative names resolve against the new image's folder).
    The file is created new (``opener``, by default at ``path``): an existing name, a link too,
    is never replaced. ``path`` is the file's final name: relative backing names resolve from it.
    """
    if cluster_size < 512 or cluster_size & (cluster_size - 1) or cluster_size > 2 * 1024 * 1024:
        raise FormatError(f"cluster size {cluster_size} must be a power of two from 512 B to 2 MiB", path=path)
    if size < 0 or size >= 1 << 56:
        raise FormatError(f"size {size} is out of range", path=path)
    l2n = cluster_size // 8
    l1_size = max(1, -(-size // (l2n * cluster_size)))
    if l1_size * 8 > MAX_L1_BYTES:
        raise FormatError(f"size {size} needs an L1 table larger than 32 MiB; use bigger clusters", path=path)
    name_raw = backing.encode("utf-8") if backing else b""
    if len(name_raw) > MAX_BACKING_NAME:
        raise FormatError(f"backing file name longer than {MAX_BACKING_NAME} bytes", path=path)
    exts = b""
    if backing_format:
        exts += pack_extension(ExtensionType.BACKING_FORMAT, backing_format.encode("utf-8"))
    exts += pack_extension(ExtensionType.END, b"")
    head_end = HEADER_V3_SIZE + len(exts) + len(name_raw)
    l1_off = -(-head_end // cluster_size) * cluster_size
    header = Header(
        version=3,
        backing_file_offset=HEADER_V3_SIZE + len(exts) if backing else 0,
        backing_file_size=len(name_raw),
        cluster_bits=cluster_size.bit_length() - 1,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=0,
        refcount_table_clusters=0,
        nb_snapshots=0,
        snapshots_offset=0,
        header_length=HEADER_V3_SIZE,
    )
    backing_img = _open_backing_for_write(path, backing, backing_format) if backing is not None else None
    try:
        fd = open_new(path, opener)
    except BaseException:
        if backing_img is not None:
            backing_img.close()
        raise
    writer = Qcow2Writer(path, fd, header, head_end, [0] * l1_size, backing_img, None)
    try:
        platform.pwrite(fd, header.pack() + exts + name_raw, 0)
        os.ftruncate(fd, l1_off + -(-(8 * l1_size) // cluster_size) * cluster_size)
        writer._eof = os.fstat(fd).st_size
        writer._l1_dirty = True
        # a valid (dirty) image from the start, so an interrupted restore is still repairable by qemu
        writer._commit(dirty=True)
        writer._go_past_cache()
    except OSError as exc:
        writer._release()
        raise write_error(exc, path, "cannot write the new image's tables") from exc
    except BaseException:
        writer._release()
        raise
    return writer


def open_qcow2_for_write(path: str) -> Qcow2Writer:
    """Open an existing qcow2 v3 image to write into it in place (merges, restores into a copy).

    Images with internal snapshots, persistent bitmaps, extended L2 entries, or that are already
    dirty or corrupt are refused (UnsupportedFormatError): writing would need their bookkeeping.
    """
    reader = open_qcow2(path)
    try:
        h = reader.header
        why = None
        if h.version < 3:
            why = "version 2 images (no zero clusters); convert to v3 first"
        elif h.nb_snapshots:
            why = f"{h.nb_snapshots} internal snapshots"
        elif "bitmaps" in reader._facts:
            why = "persistent bitmaps"
        elif h.incompatible_features & (
            IncompatibleFeature.EXTENDED_L2 | IncompatibleFeature.DIRTY | IncompatibleFeature.CORRUPT
        ):
            why = "extended L2 entries, or the dirty/corrupt flag"
        elif h.header_length > HEADER_V3_SIZE:
            why = f"a {h.header_length}-byte header"
        if why is not None:
            raise UnsupportedFormatError(
                f"cannot write in place into an image with {why}", path=path, structure="qcow2 header"
            )
        try:
            fd = os.open(path, os.O_RDWR | platform.O_BINARY | platform.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"cannot open for writing: {exc.strerror}", path=path) from exc
        # opened by name a second time: it must be the file just checked, not one swapped in
        # under the name since (a link to a host file would get the header written into it)
        try:
            same = platform.same_file(os.fstat(reader._fd), os.fstat(fd))
        except OSError:
            same = False
        if not same:
            os.close(fd)
            raise FormatError("was replaced by another file while it was opened for writing; not written", path=path)
    except BaseException:
        reader.close()
        raise
    head_end = max(HEADER_V3_SIZE, h.backing_file_offset + h.backing_file_size)
    writer = Qcow2Writer(path, fd, h, head_end, list(reader._l1), reader.parent, reader)
    try:
        # mark dirty before the first data write, so a crash leaves an image qemu knows to repair
        writer._write_header(dirty=True, rt_off=h.refcount_table_offset, rt_clusters=h.refcount_table_clusters)
        writer._sync()
    except BaseException:
        writer._release()
        raise
    return writer


# -- the registry entry ---------------------------------------------------------------------------


def _backing_area(fd: int, path: str) -> tuple[Header, bytes, list[tuple[int, bytes]]]:
    """(header, its raw bytes, the header extensions) of an image with a backing file name.

    The extensions are read up to the backing name, which must lie in the first cluster (spec
    "Header": "must not exceed the first cluster").
    """
    h, raw = _read_header(fd, path)
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(
            f"cluster_bits {h.cluster_bits} is out of range", path=path, offset=20, structure="qcow2 header"
        )
    bfo, bfs = h.backing_file_offset, h.backing_file_size
    if not bfo:
        return h, raw, []
    if bfs > MAX_BACKING_NAME or bfo + bfs > 1 << h.cluster_bits or bfo < len(raw):
        raise FormatError(
            "backing file name lies outside the first cluster", path=path, offset=8, structure="qcow2 header"
        )
    area = read_structure(fd, path, 0, bfo + bfs, "qcow2 header")
    exts: list[tuple[int, bytes]] = []
    pos = len(raw)
    while pos + 8 <= bfo:
        etype, elen = unpack_extension_header(area[pos : pos + 8])
        if etype == ExtensionType.END:
            break
        if pos + 8 + elen > bfo:
            raise FormatError(
                "header extension runs into the backing name", path=path, offset=pos, structure="qcow2 header extension"
            )
        exts.append((etype, area[pos + 8 : pos + 8 + elen]))
        pos += 8 + elen + (-elen % 8)
    return h, area, exts


def _read_parent(path: str) -> ParentReference | None:
    fd, _st = open_checked(path, block_devices=False, nofollow=True)
    try:
        h, area, exts = _backing_area(fd, path)
    finally:
        os.close(fd)
    if not h.backing_file_offset:
        return None
    name = area[h.backing_file_offset : h.backing_file_offset + h.backing_file_size].decode("utf-8", "replace")
    target = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(path)), name)
    recorded = next((d for t, d in exts if t == ExtensionType.BACKING_FORMAT), None)
    fmt = _format_named(recorded.rstrip(b"\0").decode("utf-8", "replace")) if recorded is not None else None
    # qcow2 records no identity of its backing file
    return ParentReference((os.path.normpath(target),), None, fmt)


def _set_backing(path: str, name: str, fmt: str) -> None:
    """Rewrite a qcow2's backing file name and backing format extension in one ``pwrite``.

    Everything that changes (header fields, the extension area, the name) lies in the first
    cluster, so a single write switches from the old backing file to the new one. Other header
    extensions are kept as they are.
    """
    from vmvault.disk import registry

    raw_name = name.encode("utf-8")
    fd, _st = open_checked(path, block_devices=False, writable=True)
    try:
        h, area, exts = _backing_area(fd, path)
        if not h.backing_file_offset:
            raise FormatError("image has no backing file to re-point", path=path, structure="qcow2 header")
        hlen = h.header_length if h.version >= 3 else HEADER_V2_SIZE
        kept = [pack_extension(t, d) for t, d in exts if t != ExtensionType.BACKING_FORMAT]
        qemu_name = registry.get(fmt, path=path).qemu_name
        new_area = b"".join(
            [pack_extension(ExtensionType.BACKING_FORMAT, qemu_name.encode("ascii")), *kept]
        ) + pack_extension(ExtensionType.END, b"")
        new_bfo = hlen + len(new_area)
        if new_bfo + len(raw_name) > 1 << h.cluster_bits or len(raw_name) > MAX_BACKING_NAME:
            raise UnsupportedFormatError(f"backing name {name!r} does not fit in the header cluster", path=path)
        packed = dataclasses.replace(h, backing_file_offset=new_bfo, backing_file_size=len(raw_name)).pack()
        # header bytes this layout does not know (a longer v3 header) are kept as they were
        known = min(len(packed), 105 if h.version >= 3 and hlen > 104 else len(packed))
        head = packed[:known] + area[known:hlen]
        platform.pwrite(fd, head + new_area + raw_name, 0)
        os.fsync(fd)
    except OSError as exc:
        raise SourceError(f"{path}: cannot update the backing file name: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _refcount_overhead(size: int, cluster: int, units: int) -> int:
    """Header, L1, L2 and refcount clusters of a file our writer makes holding ``units`` clusters."""
    per_l2 = cluster // 8
    l2_total = -(-size // (cluster * per_l2))
    l1 = -(-8 * l2_total // cluster)
    l2 = min(units, l2_total)
    used = 1 + l1 + l2 + units
    per_block = cluster * 8 // 16  # our writer's 16-bit refcounts
    blocks = -(-(used + 2) // per_block) + 1
    table = -(-8 * blocks // cluster) + 1
    return (1 + l1 + l2 + blocks + table + 2) * cluster


class Qcow2Format(DiskFormat):
    """qcow2: an overlay names its backing file (of any format) by path, with no identity."""

    name = "qcow2"
    suffixes = (".qcow2",)
    qemu_name = "qcow2"
    can_be_child = True
    parent_formats = None  # any format vmvault reads
    checkpoint_format = "qcow2"
    checkpoint_suffix = ".qcow2"

    def probe(self, head: bytes, tail: bytes) -> bool:
        return head.startswith(MAGIC)

    def open_fd(self, path: str, fd: int, *, parent: str | None, rule: ParentRule) -> DiskImage:
        return open_qcow2_fd(path, fd, parent=parent, rule=rule)

    def create(
        self, path: str, size: int, *, parent: str | None = None, unit: int | None = None, opener: Opener | None = None
    ) -> DiskWriter:
        from vmvault.disk import detect_format, registry

        cluster = unit or DEFAULT_CLUSTER_SIZE
        if parent is None:
            return create_qcow2(path, size, cluster_size=cluster, opener=opener)
        backing = os.path.relpath(os.path.abspath(parent), os.path.dirname(os.path.abspath(path)))
        # recorded in qemu's name, so qemu reads the chain too
        backing_format = registry.get(detect_format(parent), path=parent).qemu_name
        return create_qcow2(
            path, size, cluster_size=cluster, backing=backing, backing_format=backing_format, opener=opener
        )

    def open_for_write(self, path: str) -> DiskWriter:
        return open_qcow2_for_write(path)

    def check_metadata(self, image: DiskImage, result: MetadataCheck) -> bool:
        from vmvault.disk.metadata_check import check_qcow2

        check_qcow2(image, result)
        return True

    def read_parent(self, path: str) -> ParentReference | None:
        return _read_parent(path)

    def set_parent(self, path: str, new_parent: str, rule: ParentRule) -> None:
        from vmvault.disk import detect_format

        rel = os.path.relpath(os.path.abspath(new_parent), os.path.dirname(os.path.abspath(path)))
        _set_backing(path, rel, detect_format(new_parent))

    def create_like(self, image: DiskImage, path: str, parent: DiskImage | None) -> DiskWriter:
        from vmvault.disk import registry

        assert isinstance(image, Qcow2Image)
        h = image.header
        if h.nb_snapshots:
            raise UnsupportedFormatError(
                f"{image.path} holds {h.nb_snapshots} internal snapshots, which a merge would lose", path=image.path
            )
        if parent is None:
            return create_qcow2(path, image.size, cluster_size=image.cluster_size)
        return create_qcow2(
            path,
            image.size,
            cluster_size=image.cluster_size,
            backing=os.path.relpath(os.path.abspath(parent.path), os.path.dirname(path)),
            backing_format=registry.get(parent.format).qemu_name,
        )

    def allocation_unit(self, image: DiskImage) -> int | None:
        assert isinstance(image, Qcow2Image)
        return image.cluster_size

    def layout_overhead(self, image: DiskImage, units: int, has_parent: bool) -> int:
        assert isinstance(image, Qcow2Image)
        return _refcount_overhead(image.size, image.cluster_size, units)


FORMAT = Qcow2Format()

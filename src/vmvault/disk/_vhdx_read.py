"""Reading VHDX images: fixed, dynamic and differencing (.avhdx), with log replay.

Reference: [MS-VHDX] v8.0 (section numbers below are that document's). Structures live in
``_vhdx_layout``, the log in ``_vhdx_log``; this module decides what the structures mean.

``open_vhdx`` checks everything cheap to check before the first byte is served: identifier,
both headers, the log (replayed into an in-memory overlay, never into the file), both region
tables, the metadata table and items, and every BAT entry. A differencing file opens its
parent, which must be a VHDX whose DataWriteGuid the locator names (section 2.6.2.6).
"""

from __future__ import annotations

import array
import bisect
import contextlib
import itertools
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Final

from vmvault import platform
from vmvault.disk import _vhdx_layout as L
from vmvault.disk._open import ANYWHERE, ParentRule, open_checked, open_parent, real_path
from vmvault.disk._vhdx_log import check_log_location, find_active_sequence, replay
from vmvault.disk.base import CacheRelease, DiskImage, Extent, ExtentKind, coalesce, read_structure
from vmvault.errors import FormatError, ParentError, SourceError, UnsupportedFormatError

__all__ = ["VhdxImage", "find_locator", "locator_candidates", "open_vhdx", "open_vhdx_fd", "read_locator"]

MIB: Final = L.MIB
#: sector-bitmap blocks a reader keeps in memory (1 MiB each)
SB_CACHE_BLOCKS: Final = 16

_PRESENT = (L.PayloadState.FULLY_PRESENT, L.PayloadState.PARTIALLY_PRESENT)


def _braced(guid: uuid.UUID) -> str:
    return "{" + str(guid) + "}"


def _parse_braced_guid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        return None


def _bit_runs(bitmap: bytes | bytearray, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
    """Runs of equal bits in ``bitmap[first:last]`` (bit numbers, LSB-first: section 2.5.2)."""
    i = first
    while i < last:
        v = (bitmap[i >> 3] >> (i & 7)) & 1
        fill = b"\xff" if v else b"\x00"
        j = i + 1
        while j < last:
            if j & 7 == 0 and last - j >= 8:
                seg = bytes(bitmap[j >> 3 : last >> 3])
                j += 8 * (len(seg) - len(seg.lstrip(fill)))
                if j >= last:
                    break
            if (bitmap[j >> 3] >> (j & 7)) & 1 != v:
                break
            j += 1
        yield i, min(j, last), bool(v)
        i = j


class VhdxImage(DiskImage):
    """One VHDX layer, read-only unless owned by a ``VhdxWriter``."""

    format = "vhdx"

    def __init__(self, path: str, fd: int, *, writable: bool = False) -> None:
        self._path = path
        self._fd = fd
        #: set by a writer that queues its writes past the page cache (``_vhdx_write``): every
        #: read of the file runs inside it, so it sees every write made before it
        self._reading: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
        self._released = CacheRelease()
        self._writable = writable
        self._physical_size = os.fstat(fd).st_size
        self._eff_size = self._physical_size
        self._overlay: dict[int, bytes] = {}
        self._overlay_keys: list[int] = []
        self._log_entries_replayed = 0
        self._sb_cache: dict[int, bytes | bytearray] = {}
        self._parent: DiskImage | None = None
        self._parent_path: str | None = None
        self._parent_linkage_checked = False
        # filled in by _load
        self.creator = ""
        self._header: L.Header
        self._header_slot = 0
        self._regions: dict[uuid.UUID, L.RegionTableEntry] = {}
        self._spans: list[tuple[int, int, str]] = []
        self._region_table: L.RegionTable
        self._meta_table: L.MetadataTable
        self._params: L.FileParameters
        self._size = 0
        self._lss = 512
        self._pss = 512
        self._disk_id = L.ZERO_GUID
        self._locator: L.ParentLocator | None = None
        self._geom: L.BatGeometry
        self._bat: array.array[int]
        self._fast_bs = self._fast_cr = 1

    # ---------------------------------------------------------------------------- properties

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
    def data_write_guid(self) -> uuid.UUID:
        return self._header.data_write_guid

    @property
    def file_write_guid(self) -> uuid.UUID:
        return self._header.file_write_guid

    @property
    def virtual_disk_id(self) -> uuid.UUID:
        return self._disk_id

    @property
    def block_size(self) -> int:
        return self._params.block_size

    @property
    def logical_sector_size(self) -> int:
        return self._lss

    @property
    def physical_sector_size(self) -> int:
        return self._pss

    @property
    def has_parent(self) -> bool:
        return self._params.has_parent

    @property
    def subtype(self) -> str:
        if self._params.has_parent:
            return "differencing"
        return "fixed" if self._params.leave_blocks_allocated else "dynamic"

    @property
    def parent_locator(self) -> dict[str, str]:
        return self._locator.as_dict() if self._locator is not None else {}

    @property
    def log_entries_replayed(self) -> int:
        return self._log_entries_replayed

    # ---------------------------------------------------------------------------- low-level I/O

    def _err(self, message: str, structure: str, offset: int | None = None) -> FormatError:
        return FormatError(message, path=self._path, offset=offset, structure=structure)

    def _pread(self, length: int, offset: int, structure: str) -> bytes:
        """Metadata read through the log overlay; zeros past EOF only where replay grew the file."""
        try:
            with self._reading():
                data = platform.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self._path}: read of {structure} at {offset:#x} failed: {exc.strerror}") from exc
        if len(data) < length:
            if offset + length > self._eff_size:
                raise self._err(f"file is truncated ({self._eff_size} bytes)", structure, offset)
            data += bytes(length - len(data))
        if self._overlay_keys:
            data = self._patch_overlay(data, offset)
        return data

    def _pread_raw(self, length: int, offset: int, structure: str) -> bytes:
        """The file's own bytes (short at EOF), without the overlay."""
        try:
            with self._reading():
                return platform.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self._path}: read of {structure} at {offset:#x} failed: {exc.strerror}") from exc

    def _patch_overlay(self, data: bytes, offset: int) -> bytes:
        end = offset + len(data)
        keys = self._overlay_keys
        i = bisect.bisect_right(keys, offset - L.LOG_SECTOR)
        if i >= len(keys) or keys[i] >= end:
            return data
        buf = bytearray(data)
        while i < len(keys) and keys[i] < end:
            k = keys[i]
            sector = self._overlay[k]
            lo, hi = max(k, offset), min(k + L.LOG_SECTOR, end)
            buf[lo - offset : hi - offset] = sector[lo - k : hi - k]
            i += 1
        return bytes(buf)

    # ---------------------------------------------------------------------------- opening

    def _load(self, *, parent_override: str | None, seen: frozenset[str], rule: ParentRule) -> None:
        if self._physical_size < L.HEADER_SECTION_SIZE:
            raise self._err(f"file is {self._physical_size} bytes, smaller than the 1 MiB header section", "file", 0)
        ident = self._pread(L.FILE_IDENTIFIER.size, 0, "file identifier")
        try:
            self.creator = L.FileIdentifier.unpack(ident).creator
        except ValueError as exc:
            raise self._err(f"not a VHDX file: {exc}", "file identifier", 0) from exc
        self._load_headers()
        h = self._header
        # Section 2.2.2: Version must be 1; LogVersion 0 (only matters if there is a log to replay).
        if h.version != 1:
            raise UnsupportedFormatError(
                f"header version {h.version} (only 1 is defined)", path=self._path, structure="header"
            )
        if h.log_guid != L.ZERO_GUID:
            if h.log_version != 0:
                raise UnsupportedFormatError(
                    f"log version {h.log_version} with a log to replay", path=self._path, structure="header"
                )
            self._replay_log()
        self._load_region_table()
        self._load_metadata()
        self._load_bat()
        if self._params.has_parent:
            self._open_parent(parent_override, seen, rule)

    def _load_headers(self) -> None:
        """Both headers; the current is the valid one with the larger sequence (section 2.2.2.1)."""
        found: list[tuple[int, L.Header, bytes]] = []
        reasons: list[str] = []
        for slot, off in enumerate(L.HEADER_OFFSETS):
            raw = self._pread(L.HEADER_SIZE, off, f"header {slot + 1}")
            try:
                found.append((slot, L.Header.unpack(raw), raw))
            except ValueError as exc:
                reasons.append(f"header {slot + 1} at {off:#x}: {exc}")
        if not found:
            raise self._err("no valid header (" + "; ".join(reasons) + ")", "header", L.HEADER_OFFSETS[0])
        # [MS] does not cover equal sequence numbers; like qemu, accept only identical headers.
        if (
            len(found) == 2
            and found[0][1].sequence_number == found[1][1].sequence_number
            and found[0][2] != found[1][2]
        ):
            raise self._err(
                f"both headers carry sequence number {found[0][1].sequence_number} but differ; "
                "cannot tell which is current",
                "header",
                L.HEADER_OFFSETS[0],
            )
        slot, header, _raw = max(found, key=lambda t: (t[1].sequence_number, -t[0]))
        self._header, self._header_slot = header, slot

    # ---------------------------------------------------------------------------- the log

    def _replay_log(self) -> None:
        """Find the log's active sequence and replay it into the in-memory overlay (``_vhdx_log``)."""
        h = self._header
        check_log_location(h, L.HEADER_OFFSETS[self._header_slot], self._physical_size, self._path)
        log = self._pread_raw(h.log_length, h.log_offset, "log")
        if len(log) != h.log_length:
            raise self._err("log region is truncated", "log", h.log_offset)
        found = find_active_sequence(log, h.log_guid)
        if found is None:
            raise self._err(
                "the header names a log (LogGuid set) but the log holds no valid entry sequence", "log", h.log_offset
            )
        self._overlay, self._eff_size = replay(found, self._physical_size, self._path, h.log_offset)
        self._overlay_keys = sorted(self._overlay)
        self._log_entries_replayed = len(found.entries)

    # ---------------------------------------------------------------------------- regions and metadata

    def _load_region_table(self) -> None:
        reasons: list[str] = []
        table: L.RegionTable | None = None
        for i, off in enumerate(L.REGION_TABLE_OFFSETS):
            raw = self._pread(L.REGION_TABLE_SIZE, off, f"region table {i + 1}")
            try:
                table = L.RegionTable.unpack(raw)
                break
            except ValueError as exc:
                reasons.append(f"copy {i + 1} at {off:#x}: {exc}")
        if table is None:
            raise self._err("no valid region table (" + "; ".join(reasons) + ")", "region table", 0x30000)
        self._region_table = table
        regions: dict[uuid.UUID, L.RegionTableEntry] = {}
        spans: list[tuple[int, int, str]] = []
        h = self._header
        if h.log_guid != L.ZERO_GUID or h.log_length:
            spans.append((h.log_offset, h.log_length, "log"))
        for e in table.entries:
            name = L.KNOWN_REGIONS.get(e.guid)
            if e.guid in regions:
                raise self._err(f"region {e.guid} appears twice", "region table", 0x30000)
            if name is None and e.required:
                raise UnsupportedFormatError(
                    f"unknown required region {e.guid}", path=self._path, structure="region table"
                )
            if e.file_offset % MIB or e.file_offset < MIB or e.length % MIB or e.length == 0:
                raise self._err(
                    f"{name or e.guid} region [{e.file_offset:#x}, +{e.length:#x}) is not 1 MiB aligned",
                    "region table",
                    0x30000,
                )
            if e.file_offset + e.length > self._eff_size:
                raise self._err(
                    f"{name or e.guid} region ends at {e.file_offset + e.length:#x}, past the end of the file "
                    f"({self._eff_size} bytes): file is truncated",
                    "region table",
                    0x30000,
                )
            regions[e.guid] = e
            spans.append((e.file_offset, e.length, name or str(e.guid)))
        for guid, name in L.KNOWN_REGIONS.items():
            if guid not in regions:
                raise self._err(f"the {name} region is missing", "region table", 0x30000)
        spans.sort()
        for (a_off, a_len, a_name), (b_off, _b_len, b_name) in itertools.pairwise(spans):
            if a_off + a_len > b_off:
                raise self._err(f"regions {a_name} and {b_name} overlap", "region table", 0x30000)
        self._regions = regions
        self._spans = spans

    def _load_metadata(self) -> None:
        region = self._regions[L.METADATA_REGION_GUID]
        base = region.file_offset
        raw = self._pread(L.METADATA_TABLE_SIZE, base, "metadata table")
        try:
            table = L.MetadataTable.unpack(raw)
        except ValueError as exc:
            raise self._err(str(exc), "metadata table", base) from exc
        self._meta_table = table
        items: dict[uuid.UUID, bytes] = {}
        for i, e in enumerate(table.entries):
            where = base + 32 + 32 * i
            known = L.KNOWN_METADATA.get(e.item_id) if not e.is_user else None
            if known is None and e.is_required:
                raise UnsupportedFormatError(
                    f"unknown required metadata item {e.item_id}", path=self._path, structure="metadata table"
                )
            if e.length > MIB or (e.length and (e.offset < L.METADATA_TABLE_SIZE)):
                raise self._err(
                    f"item {e.item_id} at offset {e.offset:#x} length {e.length} is out of bounds",
                    "metadata table",
                    where,
                )
            if e.offset + e.length > region.length:
                raise self._err(f"item {e.item_id} ends past the metadata region", "metadata table", where)
            if known is None:
                continue
            if e.item_id in items:
                raise self._err(f"metadata item {known} appears twice", "metadata table", where)
            items[e.item_id] = self._pread(e.length, base + e.offset, f"metadata item {known}")

        def need(guid: uuid.UUID, size: int | None) -> bytes:
            name = L.KNOWN_METADATA[guid]
            if guid not in items:
                raise self._err(f"required item {name} is missing", "metadata table", base)
            data = items[guid]
            if size is not None and len(data) != size:
                raise self._err(f"item {name} is {len(data)} bytes, expected {size}", f"metadata {name}", base)
            return data

        params = L.FileParameters.unpack(need(L.FILE_PARAMETERS_GUID, 8))
        bs = params.block_size
        if bs < L.MIN_BLOCK_SIZE or bs > L.MAX_BLOCK_SIZE or bs & (bs - 1):
            raise self._err(
                f"block size {bs} is not a power of two in [1 MiB, 256 MiB]", "metadata file parameters", base
            )
        if params.flags & ~3:
            raise self._err(f"reserved file parameter flags set ({params.flags:#x})", "metadata file parameters")
        self._params = params
        self._size = L.unpack_u64(need(L.VIRTUAL_DISK_SIZE_GUID, 8))
        self._lss = L.unpack_u32(need(L.LOGICAL_SECTOR_SIZE_GUID, 4))
        self._pss = L.unpack_u32(need(L.PHYSICAL_SECTOR_SIZE_GUID, 4))
        self._disk_id = L.unpack_guid(need(L.VIRTUAL_DISK_ID_GUID, 16))
        if self._lss not in L.SECTOR_SIZES:
            raise self._err(f"logical sector size {self._lss} is not 512 or 4096", "metadata logical sector size")
        if self._pss not in L.SECTOR_SIZES:
            raise self._err(f"physical sector size {self._pss} is not 512 or 4096", "metadata physical sector size")
        if self._size == 0 or self._size % self._lss or self._size > L.MAX_VIRTUAL_SIZE:
            raise self._err(
                f"virtual size {self._size} is zero, not a multiple of {self._lss} or above 64 TiB",
                "metadata virtual disk size",
            )
        if params.has_parent:
            if L.PARENT_LOCATOR_GUID not in items:
                raise self._err("differencing file has no parent locator", "metadata parent locator", base)
            try:
                loc = L.ParentLocator.unpack(items[L.PARENT_LOCATOR_GUID])
            except ValueError as exc:
                raise self._err(str(exc), "metadata parent locator", base) from exc
            if loc.locator_type != L.VHDX_LOCATOR_TYPE:
                raise UnsupportedFormatError(
                    f"parent locator type {loc.locator_type} is not the VHDX locator",
                    path=self._path,
                    structure="metadata parent locator",
                )
            keys = loc.as_dict()
            if "parent_linkage" not in keys:
                raise self._err("parent locator has no parent_linkage", "metadata parent locator", base)
            if not {"relative_path", "volume_path", "absolute_win32_path"} & keys.keys():
                raise self._err("parent locator names no path", "metadata parent locator", base)
            self._locator = loc
        self._geom = L.BatGeometry(self._size, bs, self._lss, params.has_parent)
        self._fast_bs, self._fast_cr = bs, self._geom.chunk_ratio

    # ---------------------------------------------------------------------------- BAT

    def _load_bat(self) -> None:
        region = self._regions[L.BAT_REGION_GUID]
        g = self._geom
        total = g.total_entries
        if total * 8 > region.length:
            raise self._err(
                f"BAT region of {region.length} bytes cannot hold {total} entries", "BAT", region.file_offset
            )
        raw = self._pread(total * 8, region.file_offset, "BAT")
        bat = array.array("Q")
        bat.frombytes(raw)
        if sys.byteorder == "big":  # pragma: no cover - the format is little-endian
            bat.byteswap()
        self._bat = bat
        self._validate_bat()

    def _validate_bat(self) -> None:
        """Every allocated block lies inside the file, is MiB aligned, and overlaps nothing."""
        g = self._geom
        bat = self._bat
        bat_off = self._regions[L.BAT_REGION_GUID].file_offset
        bs = g.block_size
        cr = g.chunk_ratio
        spans: list[tuple[int, int, str]] = list(self._spans)
        eff = self._eff_size
        for i, entry in enumerate(bat):
            if entry == 0:
                continue
            state, off = entry & 7, entry & L.BAT_OFFSET_MASK
            is_sb = (i + 1) % (cr + 1) == 0
            where = bat_off + 8 * i
            if is_sb:
                if state == L.SectorBitmapState.NOT_PRESENT:
                    continue
                if state != L.SectorBitmapState.PRESENT:
                    raise self._err(f"sector bitmap entry {i} has reserved state {state}", "BAT", where)
                if not g.has_parent:
                    raise self._err(f"sector bitmap entry {i} is present in a non-differencing file", "BAT", where)
                length = L.SECTOR_BITMAP_BLOCK_SIZE
                name = f"sector bitmap entry {i}"
            else:
                if state == 4:
                    raise self._err(f"payload entry {i} has reserved state 4", "BAT", where)
                if state == L.PayloadState.PARTIALLY_PRESENT and not g.has_parent:
                    raise self._err(f"payload entry {i} is PARTIALLY_PRESENT in a non-differencing file", "BAT", where)
                if state not in _PRESENT:
                    continue
                block = i - i // (cr + 1)
                length = min(bs, max(g.virtual_size - block * bs, 0))
                if block >= g.payload_blocks:
                    raise self._err(f"payload entry {i} lies past the last block", "BAT", where)
                if state == L.PayloadState.PARTIALLY_PRESENT:
                    sb = bat[g.bitmap_index(block // cr)] if g.bitmap_index(block // cr) < len(bat) else 0
                    if sb & 7 != L.SectorBitmapState.PRESENT:
                        raise self._err(
                            f"payload entry {i} is PARTIALLY_PRESENT but its sector bitmap block is absent",
                            "BAT",
                            where,
                        )
                name = f"payload entry {i}"
            if off < L.HEADER_SECTION_SIZE:
                raise self._err(f"{name} points into the header section ({off:#x})", "BAT", where)
            if off + length > eff:
                raise self._err(f"{name} block at {off:#x} ends past the end of the file ({eff} bytes)", "BAT", where)
            spans.append((off, length, name))
        spans.sort()
        for (a_off, a_len, a_name), (b_off, _b_len, b_name) in itertools.pairwise(spans):
            if a_off + a_len > b_off:
                raise self._err(f"{a_name} overlaps {b_name} at {b_off:#x}", "BAT", bat_off)

    def _block_entry(self, block: int) -> tuple[int, int]:
        entry = self._bat[block + block // self._geom.chunk_ratio]
        return entry & 7, entry & L.BAT_OFFSET_MASK

    def _sb_block(self, chunk: int) -> bytes | bytearray:
        cached = self._sb_cache.get(chunk)
        if cached is not None:
            return cached
        entry = self._bat[self._geom.bitmap_index(chunk)]
        if entry & 7 != L.SectorBitmapState.PRESENT:
            raise self._err(f"sector bitmap block of chunk {chunk} is absent", "sector bitmap")
        data = self._pread(L.SECTOR_BITMAP_BLOCK_SIZE, entry & L.BAT_OFFSET_MASK, "sector bitmap")
        if not self._writable:
            while len(self._sb_cache) >= SB_CACHE_BLOCKS:
                self._sb_cache.pop(next(iter(self._sb_cache)))
        self._sb_cache[chunk] = data
        return data

    def _block_bits(self, block: int) -> tuple[bytes | bytearray, int]:
        """(sector bitmap block, first bit of ``block``) for a PARTIALLY_PRESENT block (section 2.5.2)."""
        g = self._geom
        return self._sb_block(block // g.chunk_ratio), (block % g.chunk_ratio) * g.sectors_per_block

    # ---------------------------------------------------------------------------- parent

    def _open_parent(self, override: str | None, seen: frozenset[str], rule: ParentRule) -> None:
        """Find, open and check the parent (section 2.6.2.6): a VHDX whose DataWriteGuid is the
        locator's ``parent_linkage`` (or a non-zero ``parent_linkage2``).

        Candidates in the spec's order (relative_path, then the absolute path's file name beside
        the child, then the absolute path itself); a candidate that ``rule`` or the file type
        rules refuse is skipped and named if no candidate is usable.
        """
        tried: list[str] = []
        candidates = [override] if override is not None else locator_candidates(self._path, self.parent_locator)
        found: str | None = None
        fd: int | None = None
        for cand in candidates:
            # a name holding a NUL (a damaged locator) goes to open_parent, which refuses it
            # by name; the folder listing would raise ValueError
            path = cand if "\0" in cand or os.path.lexists(cand) else _case_insensitive_match(cand)
            if path is None:
                tried.append(f"{cand} (not found)")
                continue
            try:
                fd = open_parent(path, child=self._path, rule=rule, named=override is not None)
            except ParentError as exc:
                if override is not None:
                    raise
                tried.append(str(exc))
                continue
            if fd is None:
                tried.append(f"{cand} (not found)")
                continue
            found = path
            break
        if found is None or fd is None:
            raise ParentError(
                f"no usable parent (tried: {'; '.join(tried) or 'nothing: no usable path'})",
                path=self._path,
                structure="parent locator",
            )
        real = real_path(fd, found)
        if real in seen:
            os.close(fd)
            raise ParentError(
                f"{found} is its own ancestor (cycle through {self._path})",
                path=self._path,
                structure="parent locator",
            )
        from vmvault.disk import detect_format_fd

        try:
            fmt = detect_format_fd(fd, found)
        except BaseException:
            os.close(fd)
            raise
        if fmt != "vhdx":
            os.close(fd)
            raise ParentError(
                f"parent {found} is a {fmt} file; a VHDX child's parent must be a VHDX (section 2.6.2.6)",
                path=self._path,
                structure="parent",
            )
        try:
            parent = _open(found, parent=None, seen=seen | {real}, rule=rule, fd=fd)
        except ParentError:
            raise
        except (FormatError, SourceError) as exc:
            raise ParentError(
                f"parent {found} of {self._path} cannot be opened: {exc}", path=self._path, structure="parent"
            ) from exc
        try:
            self._check_parent(parent, found)
        except BaseException:
            parent.close()
            raise
        self._parent = parent
        self._parent_path = found

    def _check_parent(self, parent: VhdxImage, found: str) -> None:
        keys = self.parent_locator
        linkage = _parse_braced_guid(keys.get("parent_linkage", ""))
        linkage2 = _parse_braced_guid(keys.get("parent_linkage2", ""))
        if linkage is None:
            raise self._err(f"parent_linkage {keys.get('parent_linkage')!r} is not a GUID", "parent locator")
        # a zero GUID names no file: it must never match (a crafted parent could carry zeros too)
        ok = {g for g in (linkage, linkage2) if g is not None and g != L.ZERO_GUID}
        if not ok:
            raise ParentError(
                "parent_linkage is the zero GUID, which identifies no parent",
                path=self._path,
                structure="parent locator",
            )
        parent_guid = parent.data_write_guid
        if parent_guid not in ok:
            raise ParentError(
                f"{found} is not the parent of {self._path}: its DataWriteGuid {_braced(parent_guid)} does "
                f"not match parent_linkage {_braced(linkage)} (the parent was modified or replaced)",
                path=self._path,
                structure="parent locator",
            )
        self._parent_linkage_checked = True
        if parent.logical_sector_size != self._lss:
            raise ParentError(
                f"{self._path} has {self._lss}-byte logical sectors but its parent {found} has "
                f"{parent.logical_sector_size}",
                path=self._path,
                structure="parent",
            )

    # ---------------------------------------------------------------------------- the map and reads

    def _segments(self, start: int, end: int) -> Iterator[tuple[int, int, ExtentKind, int]]:
        """(virtual offset, length, kind, file offset) pieces of ``[start, end)``, in order."""
        bs = self._params.block_size
        lss = self._lss
        has_parent = self._params.has_parent
        block = start // bs
        while start < end:
            bstart = block * bs
            hi = min(end, bstart + bs)
            state, off = self._block_entry(block)
            if state == L.PayloadState.FULLY_PRESENT:
                yield start, hi - start, ExtentKind.DATA, off + start - bstart
            elif state == L.PayloadState.PARTIALLY_PRESENT:
                bitmap, base = self._block_bits(block)
                s0 = (start - bstart) // lss
                s1 = (hi - bstart + lss - 1) // lss
                for a, b, bit in _bit_runs(bitmap, base + s0, base + s1):
                    lo_v = max(start, bstart + (a - base) * lss)
                    hi_v = min(hi, bstart + (b - base) * lss)
                    if bit:
                        yield lo_v, hi_v - lo_v, ExtentKind.DATA, off + lo_v - bstart
                    else:
                        yield lo_v, hi_v - lo_v, ExtentKind.PARENT, 0
            elif state == L.PayloadState.NOT_PRESENT and has_parent:
                yield start, hi - start, ExtentKind.PARENT, 0
            else:
                # ZERO, UNDEFINED, UNMAPPED (and NOT_PRESENT without a parent) read as zeros;
                # section 2.5.1.1 allows old data for some of them, zeros is what Hyper-V returns.
                yield start, hi - start, ExtentKind.ZERO, 0
            start = hi
            block += 1

    def extents(self) -> Iterator[Extent]:
        """This layer's own map; see ``DiskImage.extents``."""
        return coalesce(self._extents())

    def _extents(self) -> Iterator[Extent]:
        g = self._geom
        bs, cr, size = g.block_size, g.chunk_ratio, self._size
        bat = self._bat
        raw = bat.tobytes()  # for skipping runs of empty entries without a Python loop
        unallocated = ExtentKind.PARENT if g.has_parent else ExtentKind.ZERO
        run_start, run_kind = 0, unallocated
        block, blocks = 0, g.payload_blocks
        while block < blocks:
            index = block + block // cr
            state = bat[index] & 7
            if bat[index] == 0:
                # Skip every following all-zero entry (payload or sector bitmap) at once.
                rest = raw[index * 8 :]
                skipped = (len(rest) - len(rest.lstrip(b"\0"))) // 8
                end_index = index + max(skipped, 1)
                next_block = end_index - end_index // (cr + 1)
                kind = unallocated
            else:
                next_block = block + 1
                if state == L.PayloadState.FULLY_PRESENT:
                    kind = ExtentKind.DATA
                elif state == L.PayloadState.PARTIALLY_PRESENT:
                    if run_start < block * bs:
                        yield Extent(run_start, block * bs - run_start, run_kind)
                    for v, n, k, _ in self._segments(block * bs, min(size, (block + 1) * bs)):
                        yield Extent(v, n, k)
                    block = next_block
                    run_start, run_kind = block * bs, unallocated
                    continue
                elif state == L.PayloadState.NOT_PRESENT:
                    kind = unallocated
                else:
                    kind = ExtentKind.ZERO
            if kind is not run_kind:
                if run_start < block * bs:
                    yield Extent(run_start, block * bs - run_start, run_kind)
                run_start, run_kind = block * bs, kind
            block = next_block
        if run_start < size:
            yield Extent(run_start, size - run_start, run_kind)

    def allocated_bytes(self) -> int:
        """Bytes of payload and sector-bitmap blocks this file holds."""
        g = self._geom
        total = 0
        for i, entry in enumerate(self._bat):
            state = entry & 7
            if (i + 1) % (g.chunk_ratio + 1) == 0:
                if state == L.SectorBitmapState.PRESENT:
                    total += L.SECTOR_BITMAP_BLOCK_SIZE
            elif state in _PRESENT:
                total += g.block_size
        return total

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        # Fast path: the engine's reads mostly fall inside one block (64 KiB - 4 MiB pieces).
        bs = self._fast_bs
        block = offset // bs
        if (end - 1) // bs == block:
            entry = self._bat[block + block // self._fast_cr]
            state = entry & 7
            if state == L.PayloadState.FULLY_PRESENT:
                return self._read_data((entry & L.BAT_OFFSET_MASK) + offset - block * bs, end - offset)
            if state != L.PayloadState.PARTIALLY_PRESENT and (state or self._parent is None):
                return bytes(end - offset)
        segs = list(self._segments(offset, end))
        # Merge runs that are contiguous both in the disk and in the file: one pread each.
        merged: list[list[int]] = []  # [virt, length, kind_code, file_off]
        for v, n, kind, f in segs:
            code = 0 if kind is ExtentKind.DATA else 1 if kind is ExtentKind.ZERO else 2
            if merged:
                last = merged[-1]
                if last[2] == code and last[0] + last[1] == v and (code != 0 or last[3] + last[1] == f):
                    last[1] += n
                    continue
            merged.append([v, n, code, f])
        parts: list[bytes] = []
        for v, n, code, f in merged:
            if code == 0:
                parts.append(self._read_data(f, n))
            elif code == 1 or self._parent is None:
                parts.append(bytes(n))  # calloc'd: no page is touched here
            else:
                data = self._parent.read(v, n)
                parts.append(data if len(data) == n else data + bytes(n - len(data)))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_data(self, file_offset: int, length: int) -> bytes:
        try:
            with self._reading():
                data = platform.pread(self._fd, length, file_offset)
        except OSError as exc:
            raise SourceError(f"{self._path}: read at {file_offset:#x} failed: {exc.strerror}") from exc
        if len(data) < length:
            # Blocks were checked to lie inside the file when it was opened; past the physical end
            # only a replayed log (which may grow the file) or a file shrinking under us can put them.
            if file_offset + length <= self._eff_size and self._eff_size > self._physical_size:
                data += bytes(length - len(data))
            else:
                raise SourceError(
                    f"{self._path}: file ended at {file_offset + len(data):#x} while reading a block "
                    "(did it shrink while open?)"
                )
        if self._overlay_keys:
            data = self._patch_overlay(data, file_offset)
        return data

    def info(self) -> dict[str, object]:
        out = super().info()
        h = self._header
        out.update(
            {
                "subtype": self.subtype,
                "block_size": self.block_size,
                "logical_sector_size": self._lss,
                "physical_sector_size": self._pss,
                "virtual_disk_id": str(self._disk_id),
                "data_write_guid": str(h.data_write_guid),
                "file_write_guid": str(h.file_write_guid),
                "header_sequence": h.sequence_number,
                "log": (
                    f"replayed {self._log_entries_replayed} entries (in memory)"
                    if self._log_entries_replayed
                    else "clean"
                ),
                "creator": self.creator,
                "parent_locator": self.parent_locator,
                "parent_path": self._parent_path,
                "parent_linkage_checked": self._parent_linkage_checked if self.has_parent else None,
                "allocated_bytes": self.allocated_bytes(),
                "file_size": self._physical_size,
            }
        )
        return out

    def read_done(self, offset: int, length: int) -> None:
        self._released.done(self._fd, length)
        super().read_done(offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def locator_candidates(child: str, keys: dict[str, str]) -> list[str]:
    """The files a parent locator names, in the order they are tried (section 2.6.2.6.3):
    ``relative_path``, the file name of ``absolute_win32_path`` beside the child, then that
    path itself when it is a POSIX path (vmvault's writers record one there)."""
    child_dir = os.path.dirname(os.path.abspath(child))
    out: list[str] = []
    rel = keys.get("relative_path")
    if rel:
        out.append(os.path.normpath(os.path.join(child_dir, rel.replace("\\", "/"))))
    absolute = keys.get("absolute_win32_path")
    if absolute:
        name = absolute.replace("\\", "/").rsplit("/", 1)[-1]
        if name:
            out.append(os.path.join(child_dir, name))
        if absolute.startswith("/"):
            out.append(absolute)
    return out


def _case_insensitive_match(path: str) -> str | None:
    """Windows names are case-insensitive: find ``path``'s file whatever its case."""
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return None
    low = name.lower()
    for n in names:
        if n.lower() == low:
            return os.path.join(folder, n)
    return None


def _open(
    path: str,
    *,
    parent: str | None,
    seen: frozenset[str],
    writable: bool = False,
    rule: ParentRule | None = None,
    fd: int | None = None,
) -> VhdxImage:
    """Open ``path`` (or take over ``fd``, already opened and checked for it) and its chain."""
    rule = rule or ANYWHERE
    if fd is None:
        fd, _st = open_checked(path, writable=writable)
    try:
        image = VhdxImage(path, fd, writable=writable)
    except BaseException:
        os.close(fd)
        raise
    try:
        image._load(parent_override=parent, seen=seen | {real_path(fd, path)}, rule=rule)
    except BaseException:
        image.close()
        raise
    return image


def open_vhdx(path: str, *, parent: str | None = None, rule: ParentRule | None = None) -> VhdxImage:
    """Open a VHDX read-only (a differencing file opens its parent chain).

    ``parent`` overrides where the direct parent is looked for; ``rule`` says where parents
    may be (``vmvault.disk.open_image``). A dirty log is replayed into memory only; the file
    is never written.
    """
    return _open(path, parent=parent, seen=frozenset(), rule=rule)


def open_vhdx_fd(path: str, fd: int, *, parent: str | None = None, rule: ParentRule | None = None) -> VhdxImage:
    """``open_vhdx`` on a file the caller opened and checked (``_open.open_checked``); owns ``fd``."""
    return _open(path, parent=parent, seen=frozenset(), rule=rule, fd=fd)


# ============================================================================================ the locator, in place


def _metadata_table(fd: int, path: str) -> tuple[int, int, L.MetadataTable]:
    """(metadata region offset, its length, the metadata table) of a clean VHDX."""
    for off in L.REGION_TABLE_OFFSETS:
        try:
            table = L.RegionTable.unpack(read_structure(fd, path, off, L.REGION_TABLE_SIZE, "region table"))
            break
        except ValueError:
            continue
    else:
        raise FormatError("no valid region table", path=path, structure="region table", offset=0x30000)
    region = next((e for e in table.entries if e.guid == L.METADATA_REGION_GUID), None)
    if region is None:
        raise FormatError("no metadata region", path=path, structure="region table", offset=0x30000)
    raw = read_structure(fd, path, region.file_offset, L.METADATA_TABLE_SIZE, "metadata table")
    try:
        meta = L.MetadataTable.unpack(raw)
    except ValueError as exc:
        raise FormatError(str(exc), path=path, structure="metadata table", offset=region.file_offset) from exc
    return region.file_offset, region.length, meta


def find_locator(path: str) -> L.ParentLocator | None:
    """A VHDX's parent locator (None: a base file), read without opening its chain nor
    following a link. The file must be clean (no log to replay), as a merge leaves it."""
    fd, _st = open_checked(path, block_devices=False, nofollow=True)
    try:
        base, length, meta = _metadata_table(fd, path)
        entry = next((e for e in meta.entries if e.item_id == L.PARENT_LOCATOR_GUID), None)
        if entry is None:
            return None
        if entry.offset + entry.length > length:
            raise FormatError(
                f"parent locator [{entry.offset:#x}, +{entry.length:#x}) lies outside the metadata region",
                path=path,
                offset=base,
                structure="metadata table",
            )
        raw = read_structure(fd, path, base + entry.offset, entry.length, "metadata parent locator")
        try:
            return L.ParentLocator.unpack(raw)
        except ValueError as exc:
            raise FormatError(str(exc), path=path, structure="metadata parent locator") from exc
    finally:
        os.close(fd)


def read_locator(path: str) -> L.ParentLocator:
    """A differencing VHDX's parent locator, read without opening its chain (nor following a link)."""
    locator = find_locator(path)
    if locator is None:
        raise ParentError("no parent locator", path=path, structure="metadata parent locator")
    return locator

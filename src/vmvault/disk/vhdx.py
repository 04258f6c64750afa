"""VHDX images: fixed, dynamic and differencing (.avhdx), with log replay; reading and writing.

Reference: [MS-VHDX] v8.0 (section numbers below are that document's). Structures live in
``_vhdx_layout``; this module decides what they mean.

Reading (``open_vhdx``) checks everything cheap to check before the first byte is served:
identifier, both headers, the log (replayed into an in-memory overlay, never into the file),
both region tables, the metadata table and items, and every BAT entry. A differencing file
opens its parent (any format ``vmvault.disk.open_image`` reads) and checks the linkage GUID.

Writing (``create_vhdx``, ``open_vhdx_for_write``) lays files out the way Hyper-V does (log at
1 MiB, metadata at 2 MiB, BAT at 3 MiB, blocks after it, whole-MiB sizes) and journals every
BAT and sector-bitmap change through the log: payload data is written and flushed first, then
a log entry with the new metadata sectors is written and flushed, then the sectors are written
in place and flushed. A crash at any point leaves a file whose last complete log entry, when
replayed, yields a consistent BAT (section 2.3). ``close()`` clears the LogGuid.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import itertools
import os
import sys
import uuid
from collections.abc import Iterable, Iterator
from typing import Final

from vmvault.disk import _vhdx_layout as L
from vmvault.disk.base import DiskImage, DiskWriter, Extent, ExtentKind, coalesce
from vmvault.errors import FormatError, ParentError, SourceError, UnsupportedFormatError

__all__ = ["VhdxImage", "VhdxWriter", "create_vhdx", "open_vhdx", "open_vhdx_for_write"]

MIB: Final = L.MIB
DEFAULT_BLOCK_SIZE: Final = 32 * MIB
#: where Hyper-V puts things (observed in Windows 10 files)
LOG_OFFSET: Final = 1 * MIB
LOG_LENGTH: Final = 1 * MIB
METADATA_OFFSET: Final = 2 * MIB
METADATA_LENGTH: Final = 1 * MIB
BAT_OFFSET: Final = 3 * MIB
#: sanity bounds that keep a hostile file from making us allocate without limit
MAX_LOG_LENGTH: Final = 256 * MIB
MAX_OVERLAY_SECTORS: Final = 1 << 18
#: logged sectors per log entry: one descriptor sector holds 126 descriptors
MAX_SECTORS_PER_ENTRY: Final = 126
#: sector-bitmap blocks a reader keeps in memory (1 MiB each)
SB_CACHE_BLOCKS: Final = 16

_ZERO_SECTOR: Final = bytes(L.LOG_SECTOR)
_PRESENT = (L.PayloadState.FULLY_PRESENT, L.PayloadState.PARTIALLY_PRESENT)


def _creator() -> str:
    try:
        from importlib.metadata import version

        return f"vmvault {version('vmvault')}"
    except Exception:  # pragma: no cover - not installed as a distribution
        return "vmvault"


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


def _set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set bits ``[first, last)`` of an LSB-first bitmap."""
    while first < last and first & 7:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1
    full_end = last & ~7
    if first < full_end:
        bitmap[first >> 3 : full_end >> 3] = b"\xff" * ((full_end - first) >> 3)
        first = full_end
    while first < last:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1


@dataclasses.dataclass
class _LogReplay:
    """The active log sequence found in a file (section 2.3.3)."""

    entries: list[L.LogEntry]
    flushed_file_offset: int
    last_file_offset: int


class VhdxImage(DiskImage):
    """One VHDX layer, read-only unless owned by a ``VhdxWriter``."""

    format = "vhdx"

    def __init__(self, path: str, fd: int, *, writable: bool = False) -> None:
        self._path = path
        self._fd = fd
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
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self._path}: read of {structure} at {offset:#x} failed: {exc.strerror}") from exc
        if len(data) < length:
            if offset + length > self._eff_size:
                raise self._err(f"file is truncated ({self._eff_size} bytes)", structure, offset)
            data += bytes(length - len(data))
        if self._overlay_keys:
            data = self._patch_overlay(data, offset)
        return data

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

    def _load(self, *, parent_override: str | None, seen: frozenset[str]) -> None:
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
            self._check_log_location()
            replay = self._find_active_sequence()
            self._apply_replay(replay)
        self._load_region_table()
        self._load_metadata()
        self._load_bat()
        if self._params.has_parent:
            self._open_parent(parent_override, seen)

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

    def _check_log_location(self) -> None:
        h = self._header
        if h.log_length == 0 or h.log_length % MIB or h.log_offset % MIB or h.log_offset < MIB:
            raise self._err(
                f"log offset {h.log_offset:#x} / length {h.log_length:#x} are not 1 MiB multiples past 1 MiB",
                "header",
                L.HEADER_OFFSETS[self._header_slot],
            )
        if h.log_length > MAX_LOG_LENGTH:
            raise UnsupportedFormatError(
                f"log of {h.log_length} bytes is larger than {MAX_LOG_LENGTH}", path=self._path, structure="log"
            )
        if h.log_offset + h.log_length > self._physical_size:
            raise self._err(
                f"log [{h.log_offset:#x}, +{h.log_length:#x}) lies past the end of the file "
                f"({self._physical_size} bytes): file is truncated",
                "log",
                h.log_offset,
            )

    def _find_active_sequence(self) -> _LogReplay:
        """Section 2.3.3: scan the circular log for the valid sequence with the highest number."""
        h = self._header
        log = os.pread(self._fd, h.log_length, h.log_offset)
        size = len(log)
        if size != h.log_length:
            raise self._err("log region is truncated", "log", h.log_offset)
        parsed: dict[int, L.LogEntry | None] = {}

        def entry_at(pos: int) -> L.LogEntry | None:
            if pos in parsed:
                return parsed[pos]
            result: L.LogEntry | None = None
            try:
                head = L.LogEntryHeader.unpack(log[pos : pos + 64])
                length = head.entry_length
                if (
                    head.log_guid == h.log_guid
                    and 0 < length <= size
                    and length % L.LOG_SECTOR == 0
                    and head.tail < size
                ):
                    end = pos + length
                    raw = log[pos:end] if end <= size else log[pos:] + log[: end - size]
                    result = L.LogEntry.unpack(raw)
            except ValueError:
                result = None
            parsed[pos] = result
            return result

        candidate: list[tuple[int, L.LogEntry]] = []
        tail = old_tail = 0
        max_entries = size // L.LOG_SECTOR
        while True:
            current: list[tuple[int, L.LogEntry]] = []
            pos = tail
            while len(current) < max_entries:
                entry = entry_at(pos)
                if entry is None:
                    break
                if current and entry.sequence_number != current[-1][1].sequence_number + 1:
                    break
                current.append((pos, entry))
                pos = (pos + entry.entry_length) % size
            valid = False
            if current:
                head_entry = current[-1][1]
                starts = [p for p, _ in current]
                if head_entry.tail in starts:
                    valid = True
                    active = current[starts.index(head_entry.tail) :]
                    if not candidate or head_entry.sequence_number > candidate[-1][1].sequence_number:
                        candidate = active
            if not valid:
                tail = tail + L.LOG_SECTOR
                if tail >= size:
                    tail = 0
            else:
                tail = pos
            if tail <= old_tail:
                break
            old_tail = tail
        if not candidate:
            raise self._err(
                "the header names a log (LogGuid set) but the log holds no valid entry sequence",
                "log",
                h.log_offset,
            )
        head_entry = candidate[-1][1]
        return _LogReplay([e for _, e in candidate], head_entry.flushed_file_offset, head_entry.last_file_offset)

    def _apply_replay(self, replay: _LogReplay) -> None:
        """Replay into the in-memory overlay (never the file, for a read-only open)."""
        if self._physical_size < replay.flushed_file_offset:
            raise self._err(
                f"file is {self._physical_size} bytes but the log says {replay.flushed_file_offset} were "
                "flushed: file is truncated",
                "log",
                self._header.log_offset,
            )
        overlay: dict[int, bytes] = {}
        end = max(self._physical_size, replay.last_file_offset)
        for entry in replay.entries:
            sectors = iter(entry.data_sectors)
            for d in entry.descriptors:
                if isinstance(d, L.DataDescriptor):
                    overlay[d.file_offset] = d.leading_bytes + next(sectors).data + d.trailing_bytes
                    end = max(end, d.file_offset + L.LOG_SECTOR)
                else:
                    if d.zero_length // L.LOG_SECTOR + len(overlay) > MAX_OVERLAY_SECTORS:
                        raise UnsupportedFormatError(
                            f"log zero descriptor of {d.zero_length} bytes is too large to replay in memory",
                            path=self._path,
                            structure="log",
                        )
                    for k in range(d.file_offset, d.file_offset + d.zero_length, L.LOG_SECTOR):
                        overlay[k] = _ZERO_SECTOR
                    end = max(end, d.file_offset + d.zero_length)
            if len(overlay) > MAX_OVERLAY_SECTORS:
                raise UnsupportedFormatError(
                    "log replay touches too many sectors to hold in memory", path=self._path, structure="log"
                )
        self._overlay = overlay
        self._overlay_keys = sorted(overlay)
        self._eff_size = end
        self._log_entries_replayed = len(replay.entries)

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

    def _open_parent(self, override: str | None, seen: frozenset[str]) -> None:
        keys = self.parent_locator
        child_dir = os.path.dirname(os.path.abspath(self._path))
        tried: list[str] = []
        candidates: list[str] = []
        if override is not None:
            candidates.append(override)
        else:
            rel = keys.get("relative_path")
            if rel:
                candidates.append(os.path.normpath(os.path.join(child_dir, rel.replace("\\", "/"))))
            absolute = keys.get("absolute_win32_path")
            if absolute:
                name = absolute.replace("\\", "/").rsplit("/", 1)[-1]
                if name:
                    candidates.append(os.path.join(child_dir, name))
                if absolute.startswith("/"):
                    candidates.append(absolute)
        found: str | None = None
        for cand in candidates:
            tried.append(cand)
            if os.path.isfile(cand):
                found = cand
                break
            ci = _case_insensitive_match(cand)
            if ci is not None:
                found = ci
                break
        if found is None:
            raise ParentError(
                f"parent of {self._path} not found (tried: {', '.join(tried) or 'nothing: no usable path'})",
                path=self._path,
                structure="parent locator",
            )
        real = os.path.realpath(found)
        if real in seen:
            raise ParentError(
                f"{found} is its own ancestor (cycle through {self._path})",
                path=self._path,
                structure="parent locator",
            )
        from vmvault.disk import detect_format, open_image

        try:
            if detect_format(found) == "vhdx":
                parent: DiskImage = _open(found, parent=None, seen=seen | {real})
            else:
                parent = open_image(found)
        except ParentError:
            raise
        except FormatError as exc:
            raise ParentError(
                f"parent {found} of {self._path} cannot be opened: {exc}", path=self._path, structure="parent"
            ) from exc
        except SourceError as exc:
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

    def _check_parent(self, parent: DiskImage, found: str) -> None:
        keys = self.parent_locator
        linkage = _parse_braced_guid(keys.get("parent_linkage", ""))
        linkage2 = _parse_braced_guid(keys.get("parent_linkage2", ""))
        if linkage is None:
            raise self._err(f"parent_linkage {keys.get('parent_linkage')!r} is not a GUID", "parent locator")
        parent_guid = getattr(parent, "data_write_guid", None)
        if isinstance(parent_guid, uuid.UUID):
            ok = {linkage} | ({linkage2} if linkage2 is not None and linkage2 != L.ZERO_GUID else set())
            if parent_guid not in ok:
                raise ParentError(
                    f"{found} is not the parent of {self._path}: its DataWriteGuid {_braced(parent_guid)} does "
                    f"not match parent_linkage {_braced(linkage)} (the parent was modified or replaced)",
                    path=self._path,
                    structure="parent locator",
                )
            self._parent_linkage_checked = True
        parent_lss = getattr(parent, "logical_sector_size", None)
        if isinstance(parent_lss, int) and parent_lss != self._lss:
            raise ParentError(
                f"{self._path} has {self._lss}-byte logical sectors but its parent {found} has {parent_lss}",
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
            data = os.pread(self._fd, length, file_offset)
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

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def _case_insensitive_match(path: str) -> str | None:
    """Windows names are case-insensitive: find ``path``'s file whatever its case."""
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return None
    low = name.lower()
    for n in names:
        if n.lower() == low and os.path.isfile(os.path.join(folder, n)):
            return os.path.join(folder, n)
    return None


def _open(path: str, *, parent: str | None, seen: frozenset[str], writable: bool = False) -> VhdxImage:
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError as exc:
        raise SourceError(f"{path}: no such file") from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
    image = VhdxImage(path, fd, writable=writable)
    try:
        image._load(parent_override=parent, seen=seen | {os.path.realpath(path)})
    except BaseException:
        image.close()
        raise
    return image


def open_vhdx(path: str, *, parent: str | None = None) -> VhdxImage:
    """Open a VHDX read-only (a differencing file opens its parent chain).

    ``parent`` overrides where the direct parent is looked for. A dirty log is replayed into
    memory only; the file is never written.
    """
    return _open(path, parent=parent, seen=frozenset())


# ============================================================================================ writing


class VhdxWriter(DiskWriter):
    """A VHDX opened for writing; ``image`` reads what has been written so far."""

    format = "vhdx"

    def __init__(self, image: VhdxImage, *, fresh: bool) -> None:
        self.image = image
        self._fd = image._fd
        self._path = image.path
        self._data_guid_changed = fresh
        self._pending_bat: set[int] = set()
        self._pending_sb: set[int] = set()  # file offsets of 4 KiB sectors inside SB blocks
        self._pending_raw: dict[int, bytes] = {}  # other metadata sectors: file offset -> 4 KiB
        self._log_active = False
        self._log_pos = 0
        self._log_seq = 0
        self._log_guid = L.ZERO_GUID
        self._closed = False
        size = os.fstat(self._fd).st_size
        self._file_end = (size + MIB - 1) // MIB * MIB

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def path(self) -> str:
        return self._path

    # ---------------------------------------------------------------------------- headers

    def _write_header(self, **changes: object) -> None:
        """Write the non-current slot with sequence+1, then flush (section 2.2.2.1)."""
        img = self.image
        new = dataclasses.replace(img._header, sequence_number=img._header.sequence_number + 1, **changes)  # type: ignore[arg-type]
        slot = 1 - img._header_slot
        self._pwrite(new.pack(), L.HEADER_OFFSETS[slot])
        self._fsync()
        img._header, img._header_slot = new, slot

    def _update_headers(self, **changes: object) -> None:
        # Twice, so both slots hold the current values (what Windows leaves behind).
        self._write_header(**changes)
        self._write_header()

    def _begin_data_change(self) -> None:
        if not self._data_guid_changed:
            self._update_headers(data_write_guid=uuid.uuid4())
            self._data_guid_changed = True

    # ---------------------------------------------------------------------------- I/O helpers

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        try:
            view = memoryview(data)
            while len(view):
                n = os.pwrite(self._fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise FormatError(f"write failed: {exc.strerror}", path=self._path, offset=offset) from exc

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise FormatError(f"flush failed: {exc.strerror}", path=self._path) from exc

    def _allocate(self, length: int) -> int:
        """New MiB-aligned space at the end of the file; it reads as zeros (sparse)."""
        off = self._file_end
        try:
            os.ftruncate(self._fd, off + length)
        except OSError as exc:
            raise FormatError(f"cannot grow the file: {exc.strerror}", path=self._path) from exc
        self._file_end = off + length
        self.image._physical_size = self.image._eff_size = self._file_end
        return off

    def _set_bat(self, index: int, state: int, offset: int) -> None:
        self.image._bat[index] = L.pack_bat_entry(state, offset)
        self._pending_bat.add(index)

    # ---------------------------------------------------------------------------- writing data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError(f"{self._path} is closed")
        img = self.image
        n = len(data)
        if offset < 0 or offset + n > img.size:
            raise ValueError(f"write [{offset:#x}, +{n:#x}) outside the disk of {img.size} bytes")
        if n == 0:
            return
        self._begin_data_change()
        view = memoryview(data).cast("B")
        lss = img.logical_sector_size
        if img.has_parent and (offset % lss or n % lss):
            # The sector bitmap has one bit per logical sector: widen to whole sectors with the
            # bytes the merged view shows now, so the bits we set cover only correct data.
            lo = offset - offset % lss
            hi = min(-(-(offset + n) // lss) * lss, img.size)
            buf = bytearray(img.read(lo, hi - lo))
            buf[offset - lo : offset - lo + n] = view
            view, offset, n = memoryview(buf), lo, hi - lo
        bs = img.block_size
        pos = 0
        while pos < n:
            voff = offset + pos
            block, inner = divmod(voff, bs)
            take = min(bs - inner, n - pos)
            self._write_block(block, inner, view[pos : pos + take])
            pos += take
        if len(self._pending_bat) + len(self._pending_sb) >= MAX_SECTORS_PER_ENTRY * 8:
            self._commit()

    def _write_block(self, block: int, inner: int, piece: memoryview) -> None:
        img = self.image
        g = img._geom
        idx = g.payload_index(block)
        state, off = img._block_entry(block)
        if state == L.PayloadState.FULLY_PRESENT:
            self._pwrite(piece, off + inner)
            return
        if not img.has_parent or state not in (L.PayloadState.NOT_PRESENT, L.PayloadState.PARTIALLY_PRESENT):
            # A new block in a dynamic file, or a block that reads as zeros: the fresh space is
            # zero-filled, so the rest of the block keeps reading zeros once it is FULLY_PRESENT.
            off = self._allocate(g.block_size)
            self._pwrite(piece, off + inner)
            self._set_bat(idx, L.PayloadState.FULLY_PRESENT, off)
            return
        # Differencing: data goes into the block, then its sectors' bits are set (section 2.5.2).
        if state == L.PayloadState.NOT_PRESENT:
            off = self._allocate(g.block_size)
        chunk = block // g.chunk_ratio
        sb_idx = g.bitmap_index(chunk)
        sb_entry = img._bat[sb_idx]
        if sb_entry & 7 != L.SectorBitmapState.PRESENT:
            sb_off = self._allocate(L.SECTOR_BITMAP_BLOCK_SIZE)
            self._set_bat(sb_idx, L.SectorBitmapState.PRESENT, sb_off)
            img._sb_cache[chunk] = bytearray(L.SECTOR_BITMAP_BLOCK_SIZE)
        else:
            sb_off = sb_entry & L.BAT_OFFSET_MASK
        bitmap = img._sb_cache.get(chunk)
        if not isinstance(bitmap, bytearray):
            bitmap = bytearray(img._sb_block(chunk))
            img._sb_cache[chunk] = bitmap
        self._pwrite(piece, off + inner)
        lss = img.logical_sector_size
        base = (block % g.chunk_ratio) * g.sectors_per_block
        first, last = base + inner // lss, base + (inner + len(piece)) // lss
        _set_bits(bitmap, first, last)
        for sector in range((first >> 3) // L.LOG_SECTOR, ((last - 1) >> 3) // L.LOG_SECTOR + 1):
            self._pending_sb.add(sb_off + sector * L.LOG_SECTOR)
        nbits = min(g.sectors_per_block, (img.size - block * g.block_size) // lss)
        full = bitmap[base >> 3 : (base + nbits) >> 3] == b"\xff" * (nbits >> 3) and all(
            (bitmap[b >> 3] >> (b & 7)) & 1 for b in range(base + (nbits & ~7), base + nbits)
        )
        new_state = L.PayloadState.FULLY_PRESENT if full else L.PayloadState.PARTIALLY_PRESENT
        if state != new_state or state == L.PayloadState.NOT_PRESENT:
            self._set_bat(idx, new_state, off)

    # ---------------------------------------------------------------------------- the log

    def _dirty_sectors(self) -> list[tuple[int, bytes]]:
        img = self.image
        bat_off = img._regions[L.BAT_REGION_GUID].file_offset
        per = L.LOG_SECTOR // 8
        out: dict[int, bytes] = {}
        raw = img._bat
        for s in sorted({i // per for i in self._pending_bat}):
            entries = raw[s * per : (s + 1) * per]
            if sys.byteorder == "big":  # pragma: no cover
                entries = array.array("Q", entries)
                entries.byteswap()
            data = entries.tobytes()
            out[bat_off + s * L.LOG_SECTOR] = data + bytes(L.LOG_SECTOR - len(data))
        g = img._geom
        sb_offsets = {
            img._bat[g.bitmap_index(c)] & L.BAT_OFFSET_MASK: c
            for c in range(g.sector_bitmap_blocks)
            if g.has_parent and img._bat[g.bitmap_index(c)] & 7 == L.SectorBitmapState.PRESENT
        }
        for sector_off in sorted(self._pending_sb):
            base = sector_off - sector_off % L.SECTOR_BITMAP_BLOCK_SIZE
            chunk = sb_offsets[base]
            bitmap = img._sb_cache[chunk]
            rel = sector_off - base
            out[sector_off] = bytes(bitmap[rel : rel + L.LOG_SECTOR])
        out.update(self._pending_raw)
        return sorted(out.items())

    def _commit(self) -> None:
        """Make pending BAT/SB changes durable through the log (section 2.3)."""
        if not self._pending_bat and not self._pending_sb and not self._pending_raw:
            return
        img = self.image
        # Payload first: the BAT must never point at data that is not on disk yet.
        self._fsync()
        sectors = self._dirty_sectors()
        if not self._log_active:
            self._log_pos = 0
            self._log_seq = 0
            self._log_guid = uuid.uuid4()
        h = img._header
        for i in range(0, len(sectors), MAX_SECTORS_PER_ENTRY):
            batch = sectors[i : i + MAX_SECTORS_PER_ENTRY]
            self._log_seq += 1
            length = (L.descriptor_sectors(len(batch)) + len(batch)) * L.LOG_SECTOR
            if self._log_pos + length > h.log_length:
                self._log_pos = 0
            entry = L.LogEntry.build(
                tail=self._log_pos,
                sequence_number=self._log_seq,
                log_guid=self._log_guid,
                flushed_file_offset=self._file_end,
                last_file_offset=self._file_end,
                writes=batch,
            )
            self._pwrite(entry.pack(), h.log_offset + self._log_pos)
            self._fsync()
            if not self._log_active:
                # Only now may the header name the log: a header naming a log that holds no
                # complete entry would make the file unreadable (section 2.3.3).
                self._write_header(log_guid=self._log_guid)
                self._log_active = True
            for off, data in batch:
                self._pwrite(data, off)
            self._fsync()
            self._log_pos += length
        self._pending_bat.clear()
        self._pending_sb.clear()
        self._pending_raw.clear()

    def set_parent_locator(self, entries: Iterable[tuple[str, str]]) -> None:
        """Replace a differencing file's parent locator (e.g. after a merge or a move).

        The new metadata table and locator item are journalled together in one log entry, so a
        crash leaves either the old or the new locator in force (section 2.6.2.6, 2.3).
        """
        img = self.image
        if not img.has_parent:
            raise UnsupportedFormatError("only a differencing file has a parent locator", path=self._path)
        loc = L.ParentLocator(L.VHDX_LOCATOR_TYPE, tuple(entries))
        keys = loc.as_dict()
        if len(keys) != len(loc.entries):
            raise FormatError("parent locator keys must be unique", path=self._path, structure="parent locator")
        if _parse_braced_guid(keys.get("parent_linkage", "")) is None:
            raise FormatError(
                "a parent locator needs a parent_linkage GUID", path=self._path, structure="parent locator"
            )
        if not {"relative_path", "volume_path", "absolute_win32_path"} & keys.keys():
            raise FormatError("a parent locator needs a path", path=self._path, structure="parent locator")
        blob = loc.pack()
        region = img._regions[L.METADATA_REGION_GUID]
        table = img._meta_table
        idx = next(i for i, e in enumerate(table.entries) if e.item_id == L.PARENT_LOCATOR_GUID and not e.is_user)
        # Place it where no other item lives; its own old place is fine (the log makes it atomic).
        live = sorted((e.offset, e.offset + e.length) for i, e in enumerate(table.entries) if e.length and i != idx)
        where = L.METADATA_TABLE_SIZE
        for lo, hi in live:
            if where + len(blob) <= lo:
                break
            where = max(where, hi)
        if where + len(blob) > region.length:
            raise UnsupportedFormatError(
                "the metadata region has no room for the new parent locator", path=self._path, structure="metadata"
            )
        new_table = L.MetadataTable(
            tuple(
                dataclasses.replace(e, offset=where, length=len(blob)) if i == idx else e
                for i, e in enumerate(table.entries)
            )
        )
        base = region.file_offset
        first = where // L.LOG_SECTOR * L.LOG_SECTOR
        last = -(-(where + len(blob)) // L.LOG_SECTOR) * L.LOG_SECTOR
        area = bytearray(img._pread(last - first, base + first, "metadata region"))
        area[where - first : where - first + len(blob)] = blob
        changes = {base + first + k: bytes(area[k : k + L.LOG_SECTOR]) for k in range(0, len(area), L.LOG_SECTOR)}
        packed = new_table.pack()
        old_packed = table.pack()
        for k in range(0, L.METADATA_TABLE_SIZE, L.LOG_SECTOR):
            if packed[k : k + L.LOG_SECTOR] != old_packed[k : k + L.LOG_SECTOR]:
                changes[base + k] = packed[k : k + L.LOG_SECTOR]
        self._pending_raw.update(changes)
        self._commit()
        img._meta_table = new_table
        img._locator = loc

    def flush(self) -> None:
        self._commit()
        self._fsync()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._commit()
            self._fsync()
            if self.image._header.log_guid != L.ZERO_GUID:
                self._update_headers(log_guid=L.ZERO_GUID)
        finally:
            self._closed = True
            self.image.close()


def _replay_into_file(image: VhdxImage) -> None:
    """A writable open applies the active log sequence to the file (section 2.3.3)."""
    fd = image._fd
    for off, data in sorted(image._overlay.items()):
        os.pwrite(fd, data, off)
    if os.fstat(fd).st_size < image._eff_size:
        os.ftruncate(fd, image._eff_size)
    os.fsync(fd)
    image._overlay = {}
    image._overlay_keys = []
    image._physical_size = os.fstat(fd).st_size


def open_vhdx_for_write(path: str, *, parent: str | None = None) -> VhdxWriter:
    """Open an existing VHDX to modify it in place (checkpoints, merges).

    A dirty log is replayed into the file first; then both headers get a new FileWriteGuid.
    """
    image = _open(path, parent=parent, seen=frozenset(), writable=True)
    try:
        if image._overlay:
            _replay_into_file(image)
        writer = VhdxWriter(image, fresh=False)
        writer._update_headers(file_write_guid=uuid.uuid4(), log_guid=L.ZERO_GUID)
    except OSError as exc:
        image.close()
        raise FormatError(f"cannot update: {exc.strerror}", path=path) from exc
    except BaseException:
        image.close()
        raise
    return writer


def create_vhdx(
    path: str,
    size: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    fixed: bool = False,
    parent: str | None = None,
    logical_sector: int = 512,
    physical_sector: int = 4096,
    virtual_disk_id: uuid.UUID | None = None,
) -> VhdxWriter:
    """Create a VHDX laid out as Hyper-V does and open it for writing.

    With ``parent`` the file is a differencing child: it takes the parent's size (``size`` must
    equal it, or be 0), sector sizes and virtual disk id, and a locator whose
    ``absolute_win32_path`` holds the parent's absolute POSIX path (a drive-letter path cannot
    be known on this host); ``relative_path`` is what Windows resolves first.
    """

    def bad(message: str) -> FormatError:
        return FormatError(message, path=path, structure="create parameters")

    locator: L.ParentLocator | None = None
    if parent is not None:
        if fixed:
            raise bad("a differencing file cannot be fixed")
        if os.path.realpath(parent) == os.path.realpath(path):
            raise ParentError("a differencing file cannot be its own parent", path=path, structure="parent")
        from vmvault.disk import open_image

        try:
            pimg = open_image(parent)
        except FormatError as exc:
            raise ParentError(f"parent {parent} cannot be opened: {exc}", path=path, structure="parent") from exc
        except SourceError as exc:
            raise ParentError(f"parent {parent} cannot be opened: {exc}", path=path, structure="parent") from exc
        try:
            if not isinstance(pimg, VhdxImage):
                raise UnsupportedFormatError(
                    f"parent {parent} is {pimg.format}; a VHDX child needs a VHDX parent", path=path
                )
            if size and size != pimg.size:
                raise bad(f"size {size} differs from the parent's {pimg.size}")
            size = pimg.size
            logical_sector, physical_sector = pimg.logical_sector_size, pimg.physical_sector_size
            virtual_disk_id = pimg.virtual_disk_id
            linkage = pimg.data_write_guid
        finally:
            pimg.close()
        child_dir = os.path.dirname(os.path.abspath(path))
        parent_abs = os.path.abspath(parent)
        rel = os.path.relpath(parent_abs, child_dir).replace("/", "\\")
        if not rel.startswith(".."):
            rel = ".\\" + rel
        locator = L.ParentLocator(
            L.VHDX_LOCATOR_TYPE,
            (
                ("parent_linkage", _braced(linkage)),
                ("absolute_win32_path", parent_abs),
                ("relative_path", rel),
            ),
        )
    if logical_sector not in L.SECTOR_SIZES or physical_sector not in L.SECTOR_SIZES:
        raise UnsupportedFormatError(
            f"sector sizes {logical_sector}/{physical_sector}: only 512 and 4096 exist", path=path
        )
    if size <= 0 or size % logical_sector or size > L.MAX_VIRTUAL_SIZE:
        raise bad(f"size {size} must be a positive multiple of {logical_sector} up to 64 TiB")
    if block_size < L.MIN_BLOCK_SIZE or block_size > L.MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise bad(f"block size {block_size} must be a power of two from 1 MiB to 256 MiB")

    geom = L.BatGeometry(size, block_size, logical_sector, locator is not None)
    bat_length = max(MIB, -(-geom.total_entries * 8 // MIB) * MIB)
    data_start = BAT_OFFSET + bat_length
    bat = array.array("Q", bytes(geom.total_entries * 8))
    file_size = data_start
    if fixed:
        for b in range(geom.payload_blocks):
            bat[geom.payload_index(b)] = L.pack_bat_entry(L.PayloadState.FULLY_PRESENT, file_size)
            file_size += block_size
    if sys.byteorder == "big":  # pragma: no cover
        bat.byteswap()

    flags = 0
    if fixed:
        flags |= L.FileParametersFlags.LEAVE_BLOCKS_ALLOCATED
    if locator is not None:
        flags |= L.FileParametersFlags.HAS_PARENT
    vd, req = L.MetadataFlags.IS_VIRTUAL_DISK, L.MetadataFlags.IS_REQUIRED
    items: list[tuple[uuid.UUID, bytes, L.MetadataFlags]] = [
        (L.FILE_PARAMETERS_GUID, L.FileParameters(block_size, flags).pack(), req),
        (L.VIRTUAL_DISK_SIZE_GUID, L.pack_u64(size), vd | req),
        (L.LOGICAL_SECTOR_SIZE_GUID, L.pack_u32(logical_sector), vd | req),
        (L.PHYSICAL_SECTOR_SIZE_GUID, L.pack_u32(physical_sector), vd | req),
        (L.VIRTUAL_DISK_ID_GUID, L.pack_guid(virtual_disk_id or uuid.uuid4()), vd | req),
    ]
    if locator is not None:
        items.append((L.PARENT_LOCATOR_GUID, locator.pack(), req))
    entries: list[L.MetadataTableEntry] = []
    blob = bytearray()
    for guid, value, item_flags in items:
        entries.append(L.MetadataTableEntry(guid, L.METADATA_TABLE_SIZE + len(blob), len(value), item_flags))
        blob += value
    metadata = L.MetadataTable(tuple(entries)).pack() + bytes(blob)
    regions = L.RegionTable(
        (
            L.RegionTableEntry(L.BAT_REGION_GUID, BAT_OFFSET, bat_length, True),
            L.RegionTableEntry(L.METADATA_REGION_GUID, METADATA_OFFSET, METADATA_LENGTH, True),
        )
    ).pack()

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise FormatError(f"cannot create: {exc.strerror}", path=path) from exc
    try:
        os.ftruncate(fd, file_size)
        os.pwrite(fd, L.FileIdentifier(_creator()).pack(), 0)
        for off in L.REGION_TABLE_OFFSETS:
            os.pwrite(fd, regions, off)
        os.pwrite(fd, metadata, METADATA_OFFSET)
        os.pwrite(fd, bat.tobytes(), BAT_OFFSET)
        os.fsync(fd)
        # Headers last: a file cut short before this point has no valid header and is refused.
        file_guid, data_guid = uuid.uuid4(), uuid.uuid4()
        for slot, off in enumerate(L.HEADER_OFFSETS):
            header = L.Header(slot + 1, file_guid, data_guid, L.ZERO_GUID, 0, 1, LOG_LENGTH, LOG_OFFSET)
            os.pwrite(fd, header.pack(), off)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise FormatError(f"cannot write: {exc.strerror}", path=path) from exc
    os.close(fd)
    image = _open(path, parent=parent, seen=frozenset(), writable=True)
    return VhdxWriter(image, fresh=True)

"""Writing VHDX images: creating them laid out as Hyper-V does, and modifying them in place.

Reference: [MS-VHDX] v8.0. ``create_vhdx`` and ``open_vhdx_for_write`` lay files out the way
Hyper-V does (log at 1 MiB, metadata at 2 MiB, BAT at 3 MiB, blocks after it, whole-MiB
sizes) and journal every BAT and sector-bitmap change through the log: payload data is written
and flushed first, then a log entry with the new metadata sectors is written and flushed, then
the sectors are written in place and flushed. A crash at any point leaves a file whose last
complete log entry, when replayed, yields a consistent BAT (section 2.3). ``close()`` clears
the LogGuid. ``set_locator`` re-points a differencing file without the log, atomically.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import os
import sys
import uuid
from collections.abc import Iterable
from typing import Final

from vmvault import platform
from vmvault.disk import _vhdx_layout as L
from vmvault.disk._direct import DirectWrites, drain_and_fsync, write_or_queue
from vmvault.disk._open import open_checked
from vmvault.disk._vhdx_read import VhdxImage, _braced, _metadata_table, _open, _parse_braced_guid
from vmvault.disk.base import DiskWriter, Opener, open_new, read_structure, write_error
from vmvault.errors import FormatError, ParentError, SourceError, TargetError, UnsupportedFormatError

__all__ = ["VhdxWriter", "create_vhdx", "open_vhdx_for_write", "set_locator"]

MIB: Final = L.MIB
DEFAULT_BLOCK_SIZE: Final = 32 * MIB
#: where Hyper-V puts things (observed in Windows 10 files)
LOG_OFFSET: Final = 1 * MIB
LOG_LENGTH: Final = 1 * MIB
METADATA_OFFSET: Final = 2 * MIB
METADATA_LENGTH: Final = 1 * MIB
BAT_OFFSET: Final = 3 * MIB
#: logged sectors per log entry: one descriptor sector holds 126 descriptors
MAX_SECTORS_PER_ENTRY: Final = 126


def _creator() -> str:
    try:
        from importlib.metadata import version

        return f"vmvault {version('vmvault')}"
    except Exception:  # pragma: no cover - not installed as a distribution
        return "vmvault"


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


class VhdxWriter(DiskWriter):
    """A VHDX opened for writing; ``image`` reads what has been written so far.

    A new file without a parent (a restored disk) is written past the page cache where the file
    system takes ``O_DIRECT`` (disk/_direct.py): every write is queued, in order, and written
    from one thread. Every fsync, and every read through ``image`` (which reads through the
    cache), first waits for what was queued before it, so the order the format's crash safety
    rests on (payload, fsync, log, fsync, BAT and bitmaps, fsync) holds as before. A
    differencing file, or one opened again, is written through the cache (its writes read the
    file back: sector bitmaps, the parent's data for partial sectors)."""

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
        self._direct = DirectWrites.open(self._fd, self._path) if fresh and not image.has_parent else None
        if self._direct is not None:
            image._reading = self._direct.paused

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def path(self) -> str:
        return self._path

    @property
    def past_cache(self) -> bool:
        return self._direct is not None and self._direct.direct

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
        write_or_queue(self._direct, self._fd, data, offset, self._path)

    def _fsync(self) -> None:
        drain_and_fsync(self._direct, self._fd, self._path)

    def _allocate(self, length: int) -> int:
        """New MiB-aligned space at the end of the file; it reads as zeros (sparse)."""
        off = self._file_end
        try:
            os.ftruncate(self._fd, off + length)
        except OSError as exc:
            raise write_error(exc, self._path, "cannot grow the file") from exc
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
            direct, self._direct = self._direct, None
            self.image._reading = contextlib.nullcontext
            try:
                if direct is not None:
                    # the last fsync wrote everything queued: a failure here is one already
                    # raised (by that fsync, or the write that failed before it)
                    with contextlib.suppress(TargetError):
                        direct.close()
            finally:
                self.image.close()


def _replay_into_file(image: VhdxImage) -> None:
    """A writable open applies the active log sequence to the file (section 2.3.3)."""
    fd = image._fd
    for off, data in sorted(image._overlay.items()):
        platform.pwrite(fd, data, off)
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
    opener: Opener | None = None,
) -> VhdxWriter:
    """Create a VHDX laid out as Hyper-V does and open it for writing.

    With ``parent`` the file is a differencing child: it takes the parent's size (``size`` must
    equal it, or be 0), sector sizes and virtual disk id, and a locator whose
    ``absolute_win32_path`` holds the parent's absolute POSIX path (a drive-letter path cannot
    be known on this host); ``relative_path`` is what Windows resolves first.

    The file is created new (``opener``, by default at ``path``): an existing name, a link too,
    is never replaced. ``path`` is the file's final name: the locator is computed from it.
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

    fd = open_new(path, opener)
    try:
        os.ftruncate(fd, file_size)
        platform.pwrite(fd, L.FileIdentifier(_creator()).pack(), 0)
        for off in L.REGION_TABLE_OFFSETS:
            platform.pwrite(fd, regions, off)
        platform.pwrite(fd, metadata, METADATA_OFFSET)
        platform.pwrite(fd, bat.tobytes(), BAT_OFFSET)
        os.fsync(fd)
        # Headers last: a file cut short before this point has no valid header and is refused.
        file_guid, data_guid = uuid.uuid4(), uuid.uuid4()
        for slot, off in enumerate(L.HEADER_OFFSETS):
            header = L.Header(slot + 1, file_guid, data_guid, L.ZERO_GUID, 0, 1, LOG_LENGTH, LOG_OFFSET)
            platform.pwrite(fd, header.pack(), off)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        raise write_error(exc, path, "cannot write the new image's structures") from exc
    # the writer keeps the descriptor the file was created with: never reopened by name
    image = _open(path, parent=parent, seen=frozenset(), writable=True, fd=fd)
    return VhdxWriter(image, fresh=True)


# ============================================================================================ the locator, in place


def set_locator(path: str, entries: tuple[tuple[str, str], ...]) -> None:
    """Replace a differencing VHDX's parent locator, atomically with respect to a crash.

    The file is first made clean and given a new FileWriteGuid by the regular writer (section
    2.2.2: a file must get a new FileWriteGuid before it is modified). The new locator is then
    written into free space of the metadata region and flushed, and only then does the one
    metadata table entry that names it change (a single 32-byte entry inside one sector), so
    either the old or the new locator is in force at every instant.
    """
    writer = open_vhdx_for_write(path)
    checked = os.fstat(writer._fd)
    writer.close()
    # opened by name again: it must be the file just checked and made clean, not one swapped in
    fd, _st = open_checked(path, block_devices=False, writable=True, expect=(checked.st_dev, checked.st_ino))
    try:
        base, length, meta = _metadata_table(fd, path)
        idx = next((i for i, e in enumerate(meta.entries) if e.item_id == L.PARENT_LOCATOR_GUID), None)
        if idx is None:
            raise ParentError("no parent locator", path=path, structure="metadata parent locator")
        old = L.ParentLocator.unpack(
            read_structure(fd, path, base + meta.entries[idx].offset, meta.entries[idx].length, "parent locator")
        )
        blob = L.ParentLocator(old.locator_type, entries).pack()
        live = sorted((e.offset, e.offset + e.length) for e in meta.entries if e.length)
        where = _free_span(live, len(blob), L.METADATA_TABLE_SIZE, length)
        if where is None:
            raise UnsupportedFormatError(
                "no free space in the metadata region for a new parent locator", path=path, structure="metadata"
            )
        platform.pwrite(fd, blob, base + where)
        os.fsync(fd)
        new_entries = list(meta.entries)
        new_entries[idx] = dataclasses.replace(meta.entries[idx], offset=where, length=len(blob))
        platform.pwrite(fd, L.MetadataTable(tuple(new_entries)).pack(), base)
        os.fsync(fd)
    except OSError as exc:
        raise SourceError(f"{path}: cannot update the parent locator: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _free_span(live: list[tuple[int, int]], need: int, start: int, limit: int) -> int | None:
    """The lowest 4 KiB-aligned offset >= ``start`` where ``need`` bytes overlap no live span."""
    candidates = sorted({start, *(-(-end // 4096) * 4096 for _, end in live)})
    for cand in candidates:
        if cand < start or cand + need > limit:
            continue
        if all(cand + need <= lo or cand >= hi for lo, hi in live):
            return cand
    return None

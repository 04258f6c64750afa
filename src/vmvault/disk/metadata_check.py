"""Metadata checks of one image layer, like ``qemu-img check``: without reading guest data.

``vmvault disk check --metadata-only`` runs these on every layer of a chain; the full check
runs them and then reads every allocated byte. What each format's check covers:

* **VHDX** (opening already checks headers, region table, metadata, and every BAT entry for
  its state, bounds, alignment and overlaps with the other blocks and the header section;
  vhdx-format.md 2.5): the sector bitmap blocks of partially present blocks are read, and a
  log that had to be replayed is named.
* **VHD** (opening checks footer and dynamic header checksums and each block's end against
  the file): the footer copy, dynamic header, BAT and every block (bitmap and data) must not
  overlap, and no block may reach into the closing footer; a differencing disk's sector
  bitmaps are read.
* **qcow2** (qemu ``docs/interop/qcow2.txt``): every structure that uses host clusters is
  walked and its clusters counted (header cluster, active L1 and its L2 tables with their data
  and compressed clusters, internal snapshots' table, L1 and L2 tables, the bitmap directory,
  bitmap tables and bitmap data, the refcount table and blocks). Each count is compared with
  the stored refcount: a stored refcount below the count is damage (a cluster in use could be
  handed out again), one above it a **leak** (space used by nothing, harmless). Alignment,
  references a cluster or more past the end of the file, and the COPIED flag of active L1 and
  L2 entries (set exactly when the refcount is 1) are checked. These are ``qemu-img check``'s
  rules: for the images in the tests both count the same corruptions and leaks.
* **raw** has no metadata.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from dataclasses import dataclass, field

from vmvault.disk._open import open_checked
from vmvault.disk._qcow2_layout import (
    HEADER_V2_SIZE,
    L1_OFFSET_MASK,
    L2_COMPRESSED,
    L2_COPIED,
    L2_OFFSET_MASK,
    REFCOUNT_OFFSET_MASK,
    AutoclearFeature,
    BitmapDirectoryEntry,
    IncompatibleFeature,
)
from vmvault.disk.base import DiskImage, read_structure
from vmvault.errors import FormatError, SourceError

__all__ = ["Finding", "MetadataCheck", "check_metadata", "check_qcow2", "check_vhd", "check_vhdx"]

_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True)
class Finding:
    """One thing found: a sentence, the structure it is in, the file offset (or None)."""

    message: str
    structure: str
    offset: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {"message": self.message, "structure": self.structure, "offset": self.offset}


@dataclass
class MetadataCheck:
    """The metadata check of one layer."""

    path: str
    format: str
    #: damage: structures that contradict each other or the file
    problems: list[Finding] = field(default_factory=list)
    #: space in use by nothing (qcow2 leaked clusters); harmless to the data
    leaks: list[Finding] = field(default_factory=list)
    #: bytes of the leaked clusters
    leaked_bytes: int = 0
    #: how many tables (BAT, sector bitmaps, L1/L2, refcount table and blocks, ...) were read
    tables: int = 0
    #: facts worth saying that are not damage (a replayed log, a dirty flag)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.format,
            "problems": [f.as_dict() for f in self.problems],
            "leaks": len(self.leaks),
            "leaked_bytes": self.leaked_bytes,
            "tables": self.tables,
            "notes": list(self.notes),
        }


def check_metadata(image: DiskImage) -> MetadataCheck:
    """Check the metadata of ``image`` (one layer; its parents are not looked at)."""
    result = MetadataCheck(image.path, image.format)
    from vmvault.disk import FORMATS, disk_format

    try:
        # the format's registry entry knows which checker applies (an NBD export has none)
        if image.format not in FORMATS or not disk_format(image.format).check_metadata(image, result):
            result.notes.append(f"{image.format} images have no metadata to check")
    except (FormatError, SourceError) as exc:
        # a structure that could not even be read ends this layer's check
        result.problems.append(
            Finding(str(exc), getattr(exc, "structure", None) or "file", getattr(exc, "offset", None))
        )
    return result


def _walk_extents(image: DiskImage, result: MetadataCheck) -> None:
    """Build the layer's own map: for VHDX and VHD it comes from the BAT and the sector
    bitmaps, so this reads them (and nothing else)."""
    for _ext in image.extents():
        pass
    result.tables += 1


# ============================================================================ VHDX


def check_vhdx(image: DiskImage, result: MetadataCheck) -> None:
    info = image.info()
    log = info.get("log")
    if isinstance(log, str) and log != "clean":
        result.notes.append(f"log: {log} (the file was not closed cleanly; readers replay it)")
    result.tables += 1  # the BAT, checked when the file was opened
    _walk_extents(image, result)


# ============================================================================ VHD


def check_vhd(image: DiskImage, result: MetadataCheck) -> None:
    from vmvault.disk.vhd import VhdImage

    assert isinstance(image, VhdImage)
    header = image.header
    if header is None:
        result.notes.append("fixed VHD: no allocation table")
        return
    fd, st = open_checked(image.path)
    try:
        file_size = st.st_size
        bs = header.block_size
        nblocks = -(-image.size // bs)
        raw = read_structure(fd, image.path, header.table_offset, 4 * nblocks, "VHD BAT")
        result.tables += 1
    finally:
        os.close(fd)
    bat = struct.unpack(f">{nblocks}I", raw)
    bitmap = -(-(bs // 512) // 8)
    bitmap += -bitmap % 512
    hoff = image.footer.data_offset
    spans: list[tuple[int, int, str]] = [
        (0, 512, "footer copy"),
        (hoff, 1024, "dynamic header"),
        (header.table_offset, 4 * header.max_table_entries, "BAT"),
    ]
    footer_at = file_size - 512
    for i, entry in enumerate(bat):
        if entry == 0xFFFFFFFF:
            continue
        start = entry * 512
        length = bitmap + min(bs, image.size - i * bs)
        if start + length > footer_at:
            result.problems.append(
                Finding(
                    f"block {i} at {start:#x} (+{length:#x}) reaches into the closing footer at {footer_at:#x}",
                    "VHD BAT",
                    header.table_offset + 4 * i,
                )
            )
        spans.append((start, length, f"block {i}"))
    spans.sort()
    end, last = -1, ""
    for start, length, name in spans:
        if start < end:
            result.problems.append(Finding(f"{name} at {start:#x} overlaps {last}", "VHD BAT", header.table_offset))
        if start + length > end:
            end, last = start + length, name
    _walk_extents(image, result)


# ============================================================================ qcow2

#: L1 entry bits that must be zero (spec "Cluster mapping": bits 1-8 and 56-62 are reserved)
_L1_RESERVED = 0x7F000000000001FE
#: bitmap table entry bits 9-55: the cluster holding the bitmap's data
_BITMAP_OFFSET_MASK = 0x00FFFFFFFFFFFE00
#: the fixed part of a snapshot table entry (spec "Snapshot table")
_SNAPSHOT = struct.Struct(">QIHHIIQII")
assert _SNAPSHOT.size == 40
#: most tables one check reads (a hostile header cannot make it loop for hours)
_MAX_L1_ENTRIES = 32 * 1024 * 1024 // 8


class _Qcow2Walk:
    """Counts references to the host clusters of one qcow2 file (see the module docstring)."""

    def __init__(self, image: DiskImage, fd: int, file_size: int, result: MetadataCheck) -> None:
        from vmvault.disk.qcow2 import Qcow2Image

        assert isinstance(image, Qcow2Image)
        self.h = image.header
        self.path = image.path
        self.fd = fd
        self.file_size = file_size
        self.result = result
        self.cbits = self.h.cluster_bits
        self.cs = 1 << self.cbits
        self.extended = bool(self.h.incompatible_features & IncompatibleFeature.EXTENDED_L2)
        self.nclusters = -(-file_size // self.cs)
        self.refs = array("I", bytes(4 * (self.nclusters + 1)))
        #: (structure, entry offset, entry value, host cluster offset) of active entries whose
        #: COPIED flag is checked against the refcount once the refcounts are read
        self.copied: list[tuple[str, int, int, int]] = []

    def problem(self, message: str, structure: str, offset: int | None) -> None:
        self.result.problems.append(Finding(message, structure, offset))

    def read(self, offset: int, length: int, structure: str) -> bytes:
        return read_structure(self.fd, self.path, offset, length, structure)

    def table(self, offset: int, entries: int, structure: str) -> array[int]:
        out = array("Q", self.read(offset, 8 * entries, structure))
        if _LITTLE:
            out.byteswap()
        self.result.tables += 1
        return out

    def inc(self, offset: int, length: int, what: str, where: int | None) -> None:
        """Count a reference to the clusters of ``[offset, offset + length)``."""
        if length <= 0:
            return
        # the last cluster may be cut short by the end of the file, nothing more
        if offset + length - self.file_size >= self.cs:
            self.problem(
                f"{what} at {offset:#x} (+{length:#x}) lies a cluster or more past the end of the file "
                f"({self.file_size} bytes)",
                what,
                where,
            )
            return
        for c in range(offset >> self.cbits, ((offset + length - 1) >> self.cbits) + 1):
            self.refs[c] += 1

    # ---- the mapping tables ----------------------------------------------------------------

    def l1(self, offset: int, size: int, *, active: bool, name: str) -> None:
        if size > _MAX_L1_ENTRIES:
            self.problem(f"{name} of {size} entries is larger than any image needs", name, offset)
            return
        if offset & (self.cs - 1):
            self.problem(f"{name} at {offset:#x} is not cluster aligned", name, offset)
            return
        self.inc(offset, 8 * size, name, offset)
        if offset + 8 * size > self.file_size:
            return  # reported by inc (or cut short within the last cluster: nothing to walk)
        l1 = self.table(offset, size, name)
        for i, entry in enumerate(l1):
            where = offset + 8 * i
            if entry & _L1_RESERVED:
                self.problem(f"{name} entry {i} ({entry:#x}) has reserved bits set", name, where)
            l2_off = entry & L1_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off & (self.cs - 1):
                # counted and read where it points all the same, as qemu-img check does
                self.problem(f"{name} entry {i}: L2 table at {l2_off:#x} is not cluster aligned", name, where)
            self.inc(l2_off, self.cs, "L2 table", where)
            if active:
                self.copied.append(("L1 entry", where, entry, l2_off))
            if l2_off + self.cs > self.file_size:
                continue
            self.l2(l2_off, active=active)

    def l2(self, offset: int, *, active: bool) -> None:
        step = 2 if self.extended else 1
        table = self.table(offset, self.cs // 8, "L2 table")
        cx = 62 - (self.cbits - 8)
        for j in range(0, len(table), step):
            entry = table[j]
            where = offset + 8 * j
            bitmap = table[j + 1] if self.extended else 0
            if entry & L2_COMPRESSED:
                host = entry & ((1 << cx) - 1)
                sectors = ((entry >> cx) & ((1 << (self.cbits - 8)) - 1)) + 1
                if entry & L2_COPIED:
                    self.problem("compressed cluster with the COPIED flag set", "qcow2 L2 table", where)
                if bitmap:
                    self.problem("compressed cluster with a subcluster bitmap", "qcow2 L2 table", where)
                self.inc(host & ~511, sectors * 512, "compressed cluster", where)
                continue
            host = entry & L2_OFFSET_MASK
            if self.extended and (bitmap & 0xFFFFFFFF) & (bitmap >> 32):
                self.problem("subclusters both allocated and zero", "qcow2 L2 table", where)
            if not host:
                if self.extended and bitmap & 0xFFFFFFFF:
                    self.problem("subclusters allocated in an unallocated cluster", "qcow2 L2 table", where)
                continue
            if host & (self.cs - 1):
                self.problem(f"data cluster at {host:#x} is not cluster aligned", "qcow2 L2 table", where)
            self.inc(host, self.cs, "data cluster", where)
            if active:
                self.copied.append(("L2 entry", where, entry, host))

    # ---- other structures using clusters ----------------------------------------------------

    def snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        for n in range(h.nb_snapshots):
            fixed = self.read(pos, _SNAPSHOT.size, "qcow2 snapshot table")
            l1_off, l1_size, id_size, name_size, _s, _ns, _clock, _vm, extra = _SNAPSHOT.unpack(fixed)
            self.l1(l1_off, l1_size, active=False, name=f"snapshot {n} L1 table")
            length = _SNAPSHOT.size + extra + id_size + name_size
            pos += length + (-length % 8)
        self.result.tables += 1
        self.inc(h.snapshots_offset, pos - h.snapshots_offset, "snapshot table", h.snapshots_offset)

    def bitmaps(self) -> None:
        from vmvault.disk.qcow2 import _parse_extensions

        h = self.h
        if not h.autoclear_features & AutoclearFeature.BITMAPS:
            return  # a directory the bits disown is stale: its clusters count as used by nothing
        start = h.header_length if h.version >= 3 else HEADER_V2_SIZE
        limit = self.cs
        if h.backing_file_offset and h.backing_file_offset > start:
            limit = min(limit, h.backing_file_offset)
        _fmt, ext = _parse_extensions(self.fd, self.path, start, limit, {}, [], self.file_size)
        if ext is None or not ext.nb_bitmaps:
            return
        raw = self.read(ext.directory_offset, ext.directory_size, "qcow2 bitmap directory")
        self.inc(ext.directory_offset, ext.directory_size, "bitmap directory", ext.directory_offset)
        pos = 0
        for _ in range(ext.nb_bitmaps):
            entry, pos = BitmapDirectoryEntry.unpack(raw, pos)
            self.inc(entry.table_offset, 8 * entry.table_size, "bitmap table", ext.directory_offset)
            for i, e in enumerate(self.table(entry.table_offset, entry.table_size, "qcow2 bitmap table")):
                off = e & _BITMAP_OFFSET_MASK
                if off:
                    self.inc(off, self.cs, "bitmap data cluster", entry.table_offset + 8 * i)

    def refcounts(self) -> dict[int, array[int] | None]:
        """Count the refcount table and blocks; the stored refcounts, block index -> counts
        (None for a block the table points at wrongly: its clusters' refcounts are unknown)."""
        h = self.h
        rt_off = h.refcount_table_offset
        self.inc(rt_off, h.refcount_table_clusters * self.cs, "refcount table", 48)
        rt = self.table(rt_off, h.refcount_table_clusters * self.cs // 8, "qcow2 refcount table")
        bits = 1 << h.refcount_order
        per_block = self.cs * 8 // bits
        stored: dict[int, array[int] | None] = {}
        for i, entry in enumerate(rt):
            off = entry & REFCOUNT_OFFSET_MASK
            if not off:
                continue
            where = rt_off + 8 * i
            if off & (self.cs - 1) or off >= self.file_size:
                wrong = "is not cluster aligned" if off & (self.cs - 1) else "lies outside the file"
                self.problem(
                    f"refcount block {i} at {off:#x} {wrong}: the refcounts of clusters "
                    f"{i * per_block}-{(i + 1) * per_block - 1} are unknown",
                    "qcow2 refcount table",
                    where,
                )
                stored[i] = None
                continue
            self.inc(off, self.cs, "refcount block", where)
            raw = self.read(off, self.cs, "qcow2 refcount block")
            self.result.tables += 1
            stored[i] = _decode_refcounts(raw, bits, per_block)
        return stored

    def compare(self, stored: dict[int, array[int] | None]) -> None:
        bits = 1 << self.h.refcount_order
        per_block = self.cs * 8 // bits
        zeros = array("I", bytes(4 * per_block))
        for b in range(-(-self.nclusters // per_block)):
            lo, hi = b * per_block, min((b + 1) * per_block, self.nclusters)
            block = stored.get(b, zeros)
            if block is None:
                continue  # unknown: already reported
            have = block[: hi - lo]
            want = self.refs[lo:hi]
            if have == want:
                continue
            for k, (r, n) in enumerate(zip(have, want, strict=True)):
                if r == n:
                    continue
                c = lo + k
                if r < n:
                    self.problem(
                        f"cluster {c} (at {c << self.cbits:#x}) is used {n} time(s) but its refcount is {r}",
                        "qcow2 refcounts",
                        c << self.cbits,
                    )
                else:
                    self.result.leaks.append(
                        Finding(
                            f"cluster {c} (at {c << self.cbits:#x}) has refcount {r} but is used {n} time(s)",
                            "qcow2 refcounts",
                            c << self.cbits,
                        )
                    )
                    self.result.leaked_bytes += self.cs

    def check_copied(self, stored: dict[int, array[int] | None]) -> None:
        bits = 1 << self.h.refcount_order
        per_block = self.cs * 8 // bits
        for what, where, entry, host in self.copied:
            c = host >> self.cbits
            if c // per_block in stored and stored[c // per_block] is None:
                continue  # its refcount is unknown
            block = stored.get(c // per_block)
            refcount = block[c % per_block] if block is not None else 0
            if (refcount == 1) != bool(entry & L2_COPIED):
                state = "set" if entry & L2_COPIED else "clear"
                self.problem(
                    f"{what}: COPIED flag {state} but the refcount of cluster {c} is {refcount}",
                    "qcow2 " + what.split()[0] + " table",
                    where,
                )


def _decode_refcounts(raw: bytes, bits: int, per_block: int) -> array[int]:
    """One refcount block as counts (``bits`` per entry, big-endian; spec "Host cluster management")."""
    if bits >= 8:
        code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
        wide = array(code, raw)
        if _LITTLE and bits > 8:
            wide.byteswap()
        return array("I", (min(v, 0xFFFFFFFF) for v in wide)) if bits == 64 else array("I", wide)
    out = array("I", bytes(4 * per_block))
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    for i in range(per_block):
        byte = raw[i // per_byte]
        # sub-byte refcounts fill each byte from its least significant bit
        out[i] = (byte >> (bits * (i % per_byte))) & mask
    return out


def check_qcow2(image: DiskImage, result: MetadataCheck) -> None:
    from vmvault.disk.qcow2 import Qcow2Image

    assert isinstance(image, Qcow2Image)
    h = image.header
    if h.incompatible_features & IncompatibleFeature.DIRTY:
        result.notes.append("the image is marked dirty (not closed cleanly): its refcounts may be stale")
    if h.incompatible_features & IncompatibleFeature.CORRUPT:
        result.notes.append("the image is marked corrupt by qemu")
    fd, st = open_checked(image.path)
    try:
        walk = _Qcow2Walk(image, fd, st.st_size, result)
        walk.inc(0, walk.cs, "header", 0)
        walk.l1(h.l1_table_offset, h.l1_size, active=True, name="L1 table")
        walk.snapshots()
        walk.bitmaps()
        stored = walk.refcounts()
        walk.compare(stored)
        walk.check_copied(stored)
    finally:
        os.close(fd)

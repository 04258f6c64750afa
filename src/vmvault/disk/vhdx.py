"""VHDX images: fixed, dynamic and differencing (.avhdx), with log replay; reading and writing.

Reference: [MS-VHDX] v8.0. The format is split the way its concepts are:

* ``_vhdx_layout``: magic values, GUIDs and ``struct`` layouts, one frozen dataclass per
  on-disk structure (headers, region table, metadata items, parent locator, BAT geometry, log
  entries), each with ``unpack``/``pack``;
* ``_vhdx_log``: finding the log's active sequence and replaying it in memory (section 2.3);
* ``_vhdx_read``: ``VhdxImage`` and ``open_vhdx`` (what the structures mean, parent checks);
* ``_vhdx_write``: ``VhdxWriter``, ``create_vhdx``, ``open_vhdx_for_write`` and the in-place
  locator rewrite.

This module re-exports their public names and holds VHDX's entry in the format registry.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

from vmvault.disk import _vhdx_layout as L
from vmvault.disk._open import ParentRule
from vmvault.disk._vhdx_read import (
    VhdxImage,
    _braced,
    _parse_braced_guid,
    find_locator,
    locator_candidates,
    open_vhdx,
    open_vhdx_fd,
    read_locator,
)
from vmvault.disk._vhdx_write import (
    BAT_OFFSET,
    DEFAULT_BLOCK_SIZE,
    MIB,
    VhdxWriter,
    create_vhdx,
    open_vhdx_for_write,
    set_locator,
)
from vmvault.disk.base import DiskFormat, DiskImage, DiskWriter, Opener, ParentReference

if TYPE_CHECKING:
    from vmvault.disk.metadata_check import MetadataCheck

__all__ = [
    "FORMAT",
    "VhdxFormat",
    "VhdxImage",
    "VhdxWriter",
    "create_vhdx",
    "locator_candidates",
    "open_vhdx",
    "open_vhdx_fd",
    "open_vhdx_for_write",
    "read_locator",
    "set_locator",
]


def _data_write_guid(path: str) -> uuid.UUID:
    with open_vhdx(path) as img:
        return img.data_write_guid


class VhdxFormat(DiskFormat):
    """VHDX: fixed, dynamic and differencing (``.avhdx``); a child names its parent's DataWriteGuid."""

    name = "vhdx"
    suffixes = (".vhdx", ".avhdx")
    qemu_name = "vhdx"
    can_be_child = True
    parent_formats = frozenset({"vhdx"})
    checkpoint_format = "vhdx"
    checkpoint_suffix = ".avhdx"

    def probe(self, head: bytes, tail: bytes) -> bool:
        return head.startswith(L.SIG_FILE)

    def open_fd(self, path: str, fd: int, *, parent: str | None, rule: ParentRule) -> DiskImage:
        return open_vhdx_fd(path, fd, parent=parent, rule=rule)

    def create(
        self, path: str, size: int, *, parent: str | None = None, unit: int | None = None, opener: Opener | None = None
    ) -> DiskWriter:
        return create_vhdx(path, size, parent=parent, block_size=unit or DEFAULT_BLOCK_SIZE, opener=opener)

    def open_for_write(self, path: str) -> DiskWriter:
        return open_vhdx_for_write(path)

    def check_metadata(self, image: DiskImage, result: MetadataCheck) -> bool:
        from vmvault.disk.metadata_check import check_vhdx

        check_vhdx(image, result)
        return True

    def identity(self, image: DiskImage) -> str | None:
        assert isinstance(image, VhdxImage)
        return _braced(image.data_write_guid)

    def read_parent(self, path: str) -> ParentReference | None:
        locator = find_locator(path)
        if locator is None:
            return None
        keys = locator.as_dict()
        linkage = _parse_braced_guid(keys.get("parent_linkage", ""))
        linkage2 = _parse_braced_guid(keys.get("parent_linkage2", ""))
        return ParentReference(
            tuple(dict.fromkeys(locator_candidates(path, keys))),
            _braced(linkage) if linkage is not None else None,
            self.name,
            (_braced(linkage2),) if linkage2 is not None and linkage2 != L.ZERO_GUID else (),
        )

    def set_parent(self, path: str, new_parent: str, rule: ParentRule) -> None:
        parent_abs = os.path.abspath(new_parent)
        rel = os.path.relpath(parent_abs, os.path.dirname(os.path.abspath(path))).replace("/", "\\")
        if not rel.startswith(".."):
            rel = ".\\" + rel
        entries = (
            ("parent_linkage", _braced(_data_write_guid(new_parent))),
            ("absolute_win32_path", parent_abs),
            ("relative_path", rel),
        )
        set_locator(path, entries)

    def prepare_parent_swap(self, child: str, current: str, replacement: str) -> None:
        # The replacement has a new DataWriteGuid: the child's locator names both, parent_linkage
        # the file in place now (on a re-run that may be an earlier merged file), parent_linkage2
        # the one about to replace it, so the child accepts its parent throughout (section 2.6.2.6).
        old_guid, new_guid = _data_write_guid(current), _data_write_guid(replacement)
        entries = [(k, v) for k, v in read_locator(child).entries if k not in ("parent_linkage", "parent_linkage2")]
        entries[:0] = [("parent_linkage", _braced(old_guid)), ("parent_linkage2", _braced(new_guid))]
        set_locator(child, tuple(entries))

    def create_like(self, image: DiskImage, path: str, parent: DiskImage | None) -> DiskWriter:
        assert isinstance(image, VhdxImage)
        if parent is not None:
            return create_vhdx(path, image.size, block_size=image.block_size, parent=os.path.abspath(parent.path))
        return create_vhdx(
            path,
            image.size,
            block_size=image.block_size,
            fixed=image.subtype == "fixed",
            logical_sector=image.logical_sector_size,
            physical_sector=image.physical_sector_size,
            virtual_disk_id=image.virtual_disk_id,
        )

    def is_fixed(self, image: DiskImage) -> bool:
        assert isinstance(image, VhdxImage)
        return image.subtype == "fixed"

    def layout_overhead(self, image: DiskImage, units: int, has_parent: bool) -> int:
        assert isinstance(image, VhdxImage)
        geom = L.BatGeometry(image.size, image.block_size, image.logical_sector_size, has_parent)
        bat = max(MIB, -(-geom.total_entries * 8 // MIB) * MIB)
        bitmaps = geom.sector_bitmap_blocks * L.SECTOR_BITMAP_BLOCK_SIZE if has_parent else 0
        return BAT_OFFSET + bat + bitmaps


FORMAT = VhdxFormat()

"""Virtual disk formats: raw, VHDX (fixed, dynamic, differencing), VHD and qcow2.

``open_image`` detects the format and resolves parent chains; ``create_image`` makes a new,
sparse image to write into. Every format module exposes ``open_<fmt>(path, ...)`` and
``create_<fmt>(path, size, ...)``.
"""

from __future__ import annotations

import os

from vmvault.disk.base import DiskImage, DiskWriter, Extent, ExtentKind, clip_extents, coalesce
from vmvault.errors import FormatError, SourceError, UnsupportedFormatError

__all__ = [
    "DIFFERENCING_FORMATS",
    "DISK_SUFFIXES",
    "FORMATS",
    "DiskImage",
    "DiskWriter",
    "Extent",
    "ExtentKind",
    "clip_extents",
    "coalesce",
    "create_image",
    "detect_format",
    "open_image",
]

#: formats vmvault can read and write
FORMATS = ("raw", "vhdx", "vhd", "qcow2")

#: file name endings that mark a disk image in a VM folder
DISK_SUFFIXES = (".raw", ".img", ".vhdx", ".avhdx", ".vhd", ".avhd", ".qcow2")


def detect_format(path: str) -> str:
    """The format of the image at ``path``, by content (never by name alone)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(0, os.SEEK_END)
            end = f.tell()
            tail = b""
            if end >= 512:
                f.seek(end - 512)
                tail = f.read(512)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "vhd"
    return "raw"


def open_image(path: str, *, format: str | None = None, parent: str | None = None) -> DiskImage:
    """Open ``path`` read-only; a differencing image opens its whole chain.

    ``parent`` overrides where the direct parent is looked for (``--parent``).
    """
    fmt = format or detect_format(path)
    if fmt == "raw":
        from vmvault.disk.raw import open_raw

        return open_raw(path)
    if fmt == "vhdx":
        from vmvault.disk.vhdx import open_vhdx

        return open_vhdx(path, parent=parent)
    if fmt == "vhd":
        from vmvault.disk.vhd import open_vhd

        return open_vhd(path, parent=parent)
    if fmt == "qcow2":
        from vmvault.disk.qcow2 import open_qcow2

        return open_qcow2(path, parent=parent)
    raise UnsupportedFormatError(f"unknown disk format {fmt!r}", path=path)


#: formats that can hold a differencing child (a checkpoint layer)
DIFFERENCING_FORMATS = ("vhdx", "vhd", "qcow2")


def create_image(path: str, format: str, size: int, *, parent: str | None = None) -> DiskWriter:
    """A new, empty, sparse image of ``size`` virtual bytes in ``format``.

    With ``parent``, a differencing child of that image: unwritten ranges read from the parent.
    """
    if parent is not None and format not in DIFFERENCING_FORMATS:
        raise FormatError(f"format {format!r} cannot hold a differencing child", path=path)
    if format == "raw":
        from vmvault.disk.raw import create_raw

        return create_raw(path, size)
    if format == "vhdx":
        from vmvault.disk.vhdx import create_vhdx

        return create_vhdx(path, size, parent=parent)
    if format == "vhd":
        from vmvault.disk.vhd import create_vhd

        return create_vhd(path, size, parent=parent)
    if format == "qcow2":
        from vmvault.disk.qcow2 import create_qcow2

        return create_qcow2(path, size, backing=parent)
    raise FormatError(f"cannot create format {format!r}; choose one of {', '.join(FORMATS)}", path=path)

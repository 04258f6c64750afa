"""The disk format registry: every format vmvault reads and writes, one entry each.

An entry is a ``DiskFormat`` (``vmvault.disk.base``) defined in its format's own module
(``raw.FORMAT``, ``vhdx.FORMAT``, ...): its name, file name endings, how its files are
recognised, opened and created, whether it can be a differencing child and of which parents,
how it records, rewrites and checks its parent. ``vmvault.disk`` derives ``FORMATS``,
``DISK_SUFFIXES``, ``DIFFERENCING_FORMATS``, ``detect_format``, ``open_image`` and
``create_image`` from this list; nothing else in vmvault switches on a format name.

To add a format: write its module with a ``DiskFormat`` subclass and ``FORMAT`` instance, and
add that instance to ``_ENTRIES`` below (``docs/design/disk-formats.md`` section 7).
"""

from __future__ import annotations

from vmvault.disk import qcow2, raw, vhd, vhdx
from vmvault.disk.base import DiskFormat
from vmvault.errors import UnsupportedFormatError

__all__ = ["ENTRIES", "FALLBACK", "by_qemu_name", "by_suffix", "detect", "get"]

#: every format, in detection order (the fallback, raw, is tried last whatever its place)
_ENTRIES: tuple[DiskFormat, ...] = (raw.FORMAT, vhdx.FORMAT, vhd.FORMAT, qcow2.FORMAT)

ENTRIES: tuple[DiskFormat, ...] = _ENTRIES
_BY_NAME: dict[str, DiskFormat] = {f.name: f for f in _ENTRIES}
#: the format of a file no other format claims (raw)
FALLBACK: DiskFormat = next(f for f in _ENTRIES if f.is_fallback)

# the registry is the single source of these facts: a clash is a programming error, caught at import
assert len(_BY_NAME) == len(_ENTRIES), "two formats share a name"
assert sum(f.is_fallback for f in _ENTRIES) == 1, "exactly one format is the detection fallback"
assert len({s for f in _ENTRIES for s in f.suffixes}) == sum(len(f.suffixes) for f in _ENTRIES), "shared suffix"
assert all(f.checkpoint_format in _BY_NAME for f in _ENTRIES), "checkpoint format not registered"
assert all(f.suffixes and all(s == s.lower() and s.startswith(".") for s in f.suffixes) for f in _ENTRIES)


def get(name: str, *, path: str | None = None) -> DiskFormat:
    """The entry of format ``name``; an unknown name is an ``UnsupportedFormatError``."""
    entry = _BY_NAME.get(name)
    if entry is None:
        raise UnsupportedFormatError(
            f"unknown disk format {name!r}; vmvault knows {', '.join(_BY_NAME)}", path=path, structure="format"
        )
    return entry


def detect(head: bytes, tail: bytes) -> DiskFormat:
    """The format of a file whose first and last 512 bytes are ``head`` and ``tail``."""
    for entry in _ENTRIES:
        if not entry.is_fallback and entry.probe(head, tail):
            return entry
    return FALLBACK


def by_suffix(name: str) -> DiskFormat | None:
    """The format a file name's ending names (``.avhdx``: VHDX), or None."""
    low = name.lower()
    return next((f for f in _ENTRIES if low.endswith(f.suffixes)), None)


def by_qemu_name(name: str) -> DiskFormat | None:
    """The format qemu calls ``name`` (``vpc``: VHD); vmvault's own names are accepted too."""
    return next((f for f in _ENTRIES if name in (f.qemu_name, f.name)), None)

"""Virtual disk formats: raw, VHDX (fixed, dynamic, differencing), VHD and qcow2.

``open_image`` detects the format and resolves parent chains; ``create_image`` makes a new,
sparse image to write into. Both go through the format registry (``vmvault.disk.registry``):
one ``DiskFormat`` entry per format, defined in that format's module, from which the names,
file suffixes and differencing formats below are derived.
"""

from __future__ import annotations

import os

from vmvault import platform
from vmvault.disk import registry
from vmvault.disk._open import ANYWHERE, ParentRule, describe_mode, open_checked, real_path
from vmvault.disk.base import (
    DiskFormat,
    DiskImage,
    DiskWriter,
    Extent,
    ExtentKind,
    Opener,
    ParentReference,
    clip_extents,
    coalesce,
)
from vmvault.errors import FormatError, ParentError, SourceError, UnsupportedFormatError

__all__ = [
    "DIFFERENCING_FORMATS",
    "DISK_SUFFIXES",
    "FALLBACK_FORMAT",
    "FORMATS",
    "QEMU_FORMATS",
    "DiskFormat",
    "DiskImage",
    "DiskWriter",
    "Extent",
    "ExtentKind",
    "Opener",
    "ParentReference",
    "ParentRule",
    "clip_extents",
    "coalesce",
    "create_image",
    "describe_mode",
    "detect_format",
    "detect_format_fd",
    "disk_format",
    "format_from_qemu",
    "open_checked",
    "open_image",
    "real_path",
]

#: formats vmvault can read and write
FORMATS: tuple[str, ...] = tuple(f.name for f in registry.ENTRIES)

#: file name endings that mark a disk image in a VM folder
DISK_SUFFIXES: tuple[str, ...] = tuple(s for f in registry.ENTRIES for s in f.suffixes)

#: the format of a file no format recognises by content (raw): such files are known by name only
FALLBACK_FORMAT: str = registry.FALLBACK.name

#: the names qemu and libvirt give the formats vmvault reads ("vpc" is VHD)
QEMU_FORMATS: tuple[str, ...] = tuple(f.qemu_name for f in registry.ENTRIES)

#: formats that can hold a differencing child (a checkpoint layer)
DIFFERENCING_FORMATS: tuple[str, ...] = tuple(f.name for f in registry.ENTRIES if f.can_be_child)


def disk_format(name: str, *, path: str | None = None) -> DiskFormat:
    """The registry entry of format ``name``; an unknown name is an ``UnsupportedFormatError``."""
    return registry.get(name, path=path)


def format_from_qemu(name: str) -> str:
    """vmvault's name of the format qemu or libvirt calls ``name`` ("vpc": "vhd")."""
    entry = registry.by_qemu_name(name)
    if entry is None:
        raise UnsupportedFormatError(f"qemu format {name!r} is not one vmvault reads", structure="format")
    return entry.name


def detect_format_fd(fd: int, path: str) -> str:
    """The format of the image open on ``fd``, by content; a file named ``.raw`` is raw
    whatever its first bytes say (a guest writes them, and could make its raw disk look like a
    qcow2 whose backing file is another disk: qemu's format probing issue)."""
    if path.lower().endswith(".raw"):
        return registry.FALLBACK.name
    try:
        head = platform.pread(fd, 512, 0)
        end = os.lseek(fd, 0, os.SEEK_END)
        tail = platform.pread(fd, 512, end - 512) if end >= 512 else b""
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from exc
    return registry.detect(head, tail).name


def detect_format(path: str) -> str:
    """The format of the image at ``path``, by content (never by name alone, but that a
    ``.raw`` name is raw: ``detect_format_fd``).

    The file is opened like every image (``_open.open_checked``): a FIFO, socket or character
    device is refused before a byte is read, so probing can never block.
    """
    fd, _st = open_checked(path)
    try:
        return detect_format_fd(fd, path)
    finally:
        os.close(fd)


def open_image(
    path: str,
    *,
    format: str | None = None,
    parent: str | None = None,
    rule: ParentRule | None = None,
    expect: tuple[int, int] | None = None,
    fd: int | None = None,
) -> DiskImage:
    """Open ``path`` read-only; a differencing image opens its whole chain.

    ``parent`` overrides where the direct parent is looked for (``--parent``): the user named
    it, so it may be anywhere, and its folder is added to ``rule``. ``rule`` says where parents
    may lie; the default allows any folder, which suits images vmvault wrote itself or a
    hypervisor manages. Callers that read images someone else controls (backups of VM
    folders, ``vmvault disk``) pass ``ParentRule.beside(path, ...)``. Whatever the rule, a
    parent is a regular file of the expected format with a matching identity
    (``docs/design/disk-formats.md`` section 2). ``expect`` = ``(st_dev, st_ino)``: the file
    must be that one and is opened without following a link (a folder scan saw it). ``fd``: the
    image is already open (by ``open_checked``, whose checks it passed) and is not opened by
    its name again; it is this image's from the call on, closed with it or when opening fails.
    """
    rule = rule or ANYWHERE
    if parent is not None:
        rule = rule.with_folder(os.path.dirname(os.path.realpath(parent)))
    if fd is None:
        fd, _st = open_checked(path, nofollow=expect is not None, expect=expect)
    try:
        entry = registry.get(format or detect_format_fd(fd, path), path=path)
        if parent is not None and not entry.can_be_child:
            raise ParentError(f"parent {parent} given, but a {entry.name} image has no parent", path=path)
    except BaseException:
        os.close(fd)
        raise
    # from here the format's opener owns fd (and closes it if opening fails)
    return entry.open_fd(path, fd, parent=parent, rule=rule)


def create_image(
    path: str, format: str, size: int, *, parent: str | None = None, opener: Opener | None = None
) -> DiskWriter:
    """A new, empty, sparse image of ``size`` virtual bytes in ``format``.

    With ``parent``, a differencing child of that image: unwritten ranges read from the parent,
    which the child names by its path relative to the child's folder (and, for VHDX and VHD,
    also by its absolute path), so a restored chain stays whole when its folder is moved.

    The file is created new: an existing name, a link too, is never replaced nor followed.
    ``opener(path, flags) -> fd`` creates it somewhere else (a restore creates it under a
    temporary name through a directory descriptor and renames it when complete); ``path``
    is then the name the image will have, for messages and parent references.
    """
    entry = registry.get(format, path=path)
    if parent is not None and not entry.can_be_child:
        raise FormatError(f"format {format!r} cannot hold a differencing child", path=path)
    return entry.create(path, size, parent=parent, opener=opener)

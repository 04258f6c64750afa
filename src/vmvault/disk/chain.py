"""Checkpoint chains on real disk files: take, apply and delete (merge) checkpoints the way
Hyper-V does; flatten (convert) and compare whole chains.

Hyper-V's model, which these functions reproduce on files:

* **checkpoint** (``checkpoint``): the disk the VM writes to becomes read-only and a new
  differencing child is created beside it (``<stem>_<GUID>.avhdx`` for VHDX, ``.avhd`` for VHD,
  a qcow2 overlay for qcow2 and raw); from then on writes go to the child. A parent is never
  written while it has children.
* **apply** (``apply``): throw a child's changes away: delete the child (refused when the child
  has children of its own, unless the whole subtree is discarded).
* **delete a checkpoint** (``merge``): fold a child into its parent: afterwards the parent file
  holds the data and the child is gone; the child's own children now hang off the parent.

Merging is crash-safe (a ``kill -9`` at any point leaves a chain that reads as before or as
after, and running ``merge`` again finishes the job). The merged parent is built as a new file
beside the parent (``<parent>.vmvault-merge``) and then swapped in with one atomic
``rename``; see ``merge`` and ``docs/design/disk-formats.md`` for the sequence and why each
step keeps the chain readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from vmvault import platform
from vmvault.disk import DISK_SUFFIXES, FORMATS, ParentRule, create_image, detect_format, disk_format, open_image
from vmvault.disk._open import names_a_file, open_checked
from vmvault.disk.base import DiskImage, DiskWriter, Extent, ExtentKind, clip_extents, coalesce
from vmvault.errors import ConfigError, FormatError, SourceError, UnsupportedFormatError

__all__ = [
    "Chain",
    "Layer",
    "apply",
    "checkpoint",
    "children",
    "compare",
    "convert",
    "merge",
    "merge_space",
    "open_chain",
    "open_for_write",
]

#: copy granularity: large enough for few syscalls, small enough to skip zero runs
COPY_CHUNK: Final = 1024 * 1024
#: the allocation unit of a sparse file: a file system block
FS_BLOCK: Final = 4096
#: compare() reports differences in whole sectors
COMPARE_GRAIN: Final = 512
#: the new parent is built under this name beside the parent, then renamed over it
MERGE_TMP_SUFFIX: Final = ".vmvault-merge"
#: room a merged parent may need beyond its format's blocks and tables: the file system's own
#: blocks (extent trees, rounding to its block size)
MERGE_SPACE_SLACK: Final = 1024 * 1024
#: the merge journal beside the child: which grandchildren move to the parent
MERGE_JOURNAL_SUFFIX: Final = ".vmvault-merge.json"
#: a Hyper-V checkpoint name ends in "_<GUID>"; strip it so names do not grow with depth
_GUID_TAIL = re.compile(r"_\{?[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}?$")

ProgressFn = Callable[[int], None]


# ============================================================================================ chain view


@dataclasses.dataclass(frozen=True, slots=True)
class Layer:
    """One file of a chain, as ``vmvault disk info`` shows it."""

    path: str
    format: str
    subtype: str
    size: int
    #: guest bytes this layer stores itself (its DATA extents)
    allocated_bytes: int
    file_size: int
    #: identity GUIDs by name (VHDX: virtual_disk_id, data_write_guid, file_write_guid; VHD: unique_id)
    guids: dict[str, str]
    #: format-specific facts (``DiskImage.info()``)
    info: dict[str, object]

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.format,
            "subtype": self.subtype,
            "size": self.size,
            "allocated_bytes": self.allocated_bytes,
            "file_size": self.file_size,
            "guids": dict(self.guids),
            "info": dict(self.info),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Chain:
    """The layers of an image, leaf first (``layers[0]`` is the file opened, ``layers[-1]`` the base)."""

    layers: tuple[Layer, ...]

    @property
    def leaf(self) -> Layer:
        return self.layers[0]

    @property
    def base(self) -> Layer:
        return self.layers[-1]

    @property
    def depth(self) -> int:
        return len(self.layers)

    def as_dict(self) -> dict[str, object]:
        return {"depth": self.depth, "layers": [layer.as_dict() for layer in self.layers]}


_GUID_KEYS = ("virtual_disk_id", "data_write_guid", "file_write_guid", "unique_id", "parent_unique_id")


def _layer_of(img: DiskImage) -> Layer:
    info = img.info()
    allocated = sum(e.length for e in img.extents() if e.kind is ExtentKind.DATA)
    try:
        file_size = os.stat(img.path).st_size
    except OSError:
        file_size = 0
    subtype = str(info.get("subtype") or info.get("disk_type") or ("differencing" if img.parent else img.format))
    guids = {k: str(info[k]) for k in _GUID_KEYS if info.get(k) is not None}
    return Layer(img.path, img.format, subtype.lower(), img.size, allocated, file_size, guids, info)


def _rule(image: str, allow_dirs: Sequence[str]) -> ParentRule:
    """Where the parents of an image named by a user may be: its folder and ``allow_dirs``.

    A hostile image must not make ``vmvault disk`` read (or, merging, write) files elsewhere
    (``docs/design/disk-formats.md`` section 2).
    """
    return ParentRule.beside(image, allow_dirs)


def open_chain(path: str, *, parent: str | None = None, allow_dirs: Sequence[str] = ()) -> Chain:
    """Describe the chain of ``path`` (leaf first). ``parent`` overrides the direct parent's location.

    Parents must lie in ``path``'s folder, ``parent``'s folder or ``allow_dirs``.
    """
    with open_image(path, parent=parent, rule=_rule(path, allow_dirs)) as img:
        return Chain(tuple(_layer_of(layer) for layer in img.chain()))


# ============================================================================================ tree


def _parent_path(path: str, allow_dirs: Sequence[str]) -> str | None:
    """The resolved path of ``path``'s direct parent, or None for a base image."""
    with open_image(path, rule=_rule(path, allow_dirs)) as img:
        return img.parent.path if img.parent is not None else None


def children(path: str, *, allow_dirs: Sequence[str] = ()) -> list[str]:
    """Differencing images in ``path``'s folder whose direct parent is ``path``.

    Like Hyper-V, checkpoints live beside their parent; files elsewhere are not found, and
    links are not followed. Files that cannot be opened (damaged, or their own parent missing
    or refused) are skipped.
    """
    real = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    out: list[str] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise SourceError(f"{folder}: cannot list: {exc.strerror}") from exc
    for name in names:
        cand = os.path.join(folder, name)
        if not name.lower().endswith(DISK_SUFFIXES) or os.path.realpath(cand) == real:
            continue
        try:
            if not stat.S_ISREG(os.lstat(cand).st_mode):
                continue
            parent = _parent_path(cand, allow_dirs)
        except (OSError, FormatError, SourceError):
            continue
        if parent is not None and os.path.realpath(parent) == real:
            out.append(cand)
    return out


def _descendants(path: str, allow_dirs: Sequence[str]) -> list[str]:
    """Every image below ``path``, deepest first (so deleting in order never orphans a file)."""
    out: list[str] = []
    for child in children(path, allow_dirs=allow_dirs):
        out.extend(_descendants(child, allow_dirs))
        out.append(child)
    return out


# ============================================================================================ checkpoint


def _checkpoint_name(image_path: str, fmt: str, name: str | None) -> str:
    folder = os.path.dirname(os.path.abspath(image_path))
    ext = disk_format(fmt).checkpoint_suffix
    if name is not None:
        if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
            raise ConfigError(f"checkpoint name {name!r} must be a plain file name")
        return os.path.join(folder, name if name.lower().endswith(ext) else name + ext)
    stem = os.path.splitext(os.path.basename(image_path))[0]
    stem = _GUID_TAIL.sub("", stem) or stem
    # Hyper-V: "<disk>_<GUID>.avhdx", the GUID in upper case without braces
    return os.path.join(folder, f"{stem}_{str(uuid.uuid4()).upper()}{ext}")


def checkpoint(image_path: str, *, name: str | None = None, allow_dirs: Sequence[str] = ()) -> str:
    """Take a checkpoint of ``image_path``: create a differencing child beside it; return its path.

    VHDX gets ``<stem>_<GUID>.avhdx``, VHD ``<stem>_<GUID>.avhd``, qcow2 and raw a qcow2 overlay
    ``<stem>_<GUID>.qcow2`` (``name`` chooses the file name instead). The image itself is only
    read; from now on writes belong in the child. Its parents must lie in its folder or
    ``allow_dirs``.
    """
    fmt = detect_format(image_path)
    entry = disk_format(fmt, path=image_path)
    child_format = disk_format(entry.checkpoint_format)
    # opening checks the whole chain now, so a broken chain is refused before a file is made
    with open_image(image_path, format=fmt, rule=_rule(image_path, allow_dirs)) as img:
        size = img.size
        # the child keeps the parent's allocation unit, so a merge copies whole units
        unit = entry.allocation_unit(img) if child_format is entry else None
    child = _checkpoint_name(image_path, fmt, name)
    if os.path.lexists(child):
        raise ConfigError(f"{child} already exists")
    writer = child_format.create(child, size, parent=image_path, unit=unit)
    try:
        writer.close()
    except BaseException:
        _unlink_quietly(child)
        raise
    _fsync_dir(os.path.dirname(child))
    return child


def open_for_write(image_path: str) -> DiskWriter:
    """A writer for the disk a VM runs on: refused while ``image_path`` has checkpoints below it.

    Writing a parent would change what every child shows (and, for VHDX, its DataWriteGuid,
    which breaks the children's linkage). VHDX and qcow2 only: VHD has no in-place writer.
    """
    below = children(image_path)
    if below:
        raise ConfigError(
            f"{image_path} has checkpoints below it ({', '.join(below)}) and must not be written: "
            "write to the newest checkpoint instead"
        )
    return disk_format(detect_format(image_path), path=image_path).open_for_write(image_path)


# ============================================================================================ apply


def apply(
    child_path: str,
    *,
    discard_subtree: bool = False,
    allow_dirs: Sequence[str] = (),
    confirm: Callable[[list[str]], bool] | None = None,
) -> str:
    """Discard a checkpoint's changes: delete ``child_path``; return its parent's path.

    Refused when the child has children of its own, unless ``discard_subtree`` (then they are
    deleted too, deepest first). Parents must lie in the child's folder or ``allow_dirs``.
    ``confirm`` is shown the files about to be deleted (deepest first); unless it returns
    True nothing is deleted (ConfigError).
    """
    parent = _parent_path(child_path, allow_dirs)
    if parent is None:
        raise ConfigError(f"{child_path} is not a differencing image: it has no parent to go back to")
    below = _descendants(child_path, allow_dirs)
    if below and not discard_subtree:
        raise ConfigError(
            f"{child_path} has {len(below)} checkpoint(s) below it ({', '.join(below)}); "
            "discard the whole subtree or merge them first"
        )
    doomed = [*below, child_path]
    if confirm is not None and not confirm(doomed):
        raise ConfigError(f"not confirmed: nothing was deleted ({', '.join(doomed)})")
    for path in doomed:
        try:
            os.unlink(path)
        except OSError as exc:
            raise SourceError(f"{path}: cannot delete: {exc.strerror}") from exc
    _fsync_dir(os.path.dirname(os.path.abspath(child_path)))
    return parent


# ============================================================================================ merge


def merge_space(child_path: str, *, allow_dirs: Sequence[str] = ()) -> int:
    """The free bytes ``merge(child_path)`` may need in its parent's folder: the merged parent
    is built there as a new file before it replaces the parent.

    An upper bound for that file: every allocation unit of the parent's format (VHDX and VHD
    blocks, qcow2 clusters, 4 KiB for raw) that the merged data touches, counted whole, plus
    the format's headers and tables; a fixed-size parent is rebuilt whole. The old parent and
    the child are removed only afterwards, so their space does not count.
    """
    child_abs = os.path.abspath(child_path)
    with open_image(child_abs, rule=_rule(child_abs, allow_dirs)) as child:
        parent = child.parent
        if parent is None:
            raise ConfigError(f"{child_path} is not a differencing image: there is no parent to merge into")
        has_grand = parent.parent is not None
        entry = disk_format(parent.format, path=parent.path)
        fixed = not has_grand and entry.is_fixed(parent)
        # a file without blocks of its own (raw, fixed VHD) takes the file system's blocks
        unit = entry.allocation_unit(parent) or FS_BLOCK
        if fixed:
            units = -(-parent.size // unit)
        else:
            units, last = 0, -1
            for ext, source in _own_layer(child, parent):
                if ext.kind is ExtentKind.PARENT or (source is None and not has_grand):
                    continue  # still the grandparent's, or zeros a base file leaves unwritten
                first, end = ext.offset // unit, (ext.end - 1) // unit
                if end > last:
                    units += end - max(first, last + 1) + 1
                    last = end
        return units * unit + entry.layout_overhead(parent, units, has_grand) + MERGE_SPACE_SLACK


def merge(child_path: str, *, progress: ProgressFn | None = None, allow_dirs: Sequence[str] = ()) -> str:
    """Delete a checkpoint: fold ``child_path`` into its parent; return the parent's path.

    Afterwards the parent file reads as the child did, the child is gone, and the child's own
    children are re-pointed at the parent. Refused when the parent has other children (their
    view would change). Crash-safe: the sequence is

    1. journal ``<child>.vmvault-merge.json`` (parent, grandchildren) written atomically;
    2. the new parent is written to ``<parent>.vmvault-merge`` (same identity, parent and
       properties as the parent; its own layer = the child's layer over the parent's) and
       flushed; a crash leaves only that scratch file;
    3. VHDX: the child's locator gets ``parent_linkage2`` = the new file's DataWriteGuid
       (section 2.6.2.6), so the child accepts either file as its parent;
    4. ``rename(new, parent)``: atomic. The child now sits on a parent that already holds its
       data, so every view through the child is unchanged;
    5. each grandchild's locator is re-pointed at the parent (one atomic update each);
    6. the child and then the journal are deleted.

    Running ``merge`` again after a crash redoes what is missing (steps 2-4 are idempotent).

    The parent is written (replaced), so it must be a parent by every rule: in the child's
    folder or ``allow_dirs``, of the right format and identity (a raw file is never the parent
    of a VHDX or VHD). A journal is read like any file of the folder: one naming files
    elsewhere is refused.
    """
    child_abs = os.path.abspath(child_path)
    rule = _rule(child_abs, allow_dirs)
    journal_path = child_abs + MERGE_JOURNAL_SUFFIX
    journal = _read_journal(journal_path, rule)
    if not os.path.lexists(child_abs):
        if journal is None:
            raise SourceError(f"{child_path}: no such file")
        # crashed after the child was deleted: only the journal is left to remove
        _finish_moves(journal[0], [g for g in journal[1] if os.path.exists(g)], child_abs, allow_dirs)
        _unlink_quietly(journal_path)
        return journal[0]

    with open_image(child_abs, rule=rule) as child:
        if child.parent is None:
            raise ConfigError(f"{child_path} is not a differencing image: there is no parent to merge into")
        parent_abs = os.path.abspath(child.parent.path)
    moved = journal[1] if journal is not None else []
    grandchildren = sorted(set(children(child_abs, allow_dirs=allow_dirs)) | {g for g in moved if os.path.exists(g)})
    siblings = [
        s for s in children(parent_abs, allow_dirs=allow_dirs) if os.path.realpath(s) != os.path.realpath(child_abs)
    ]
    siblings = [s for s in siblings if os.path.abspath(s) not in grandchildren]
    if siblings:
        raise ConfigError(
            f"cannot merge {child_path} into {parent_abs}: the parent has other children "
            f"({', '.join(siblings)}) whose contents would change"
        )
    fmt = detect_format(parent_abs)
    for g in grandchildren:
        _check_repointable(g, fmt)
    doc: dict[str, object] = {"parent": parent_abs, "child": child_abs, "grandchildren": grandchildren}
    if journal is not None and journal[2] == "replaced":
        # the merged parent is already in place and grandchildren may already point at it:
        # building another would change its DataWriteGuid under them, so only finish the moves
        _finish_moves(parent_abs, grandchildren, child_abs, allow_dirs)
        _unlink_child_and_journal(child_abs, journal_path)
        return parent_abs
    _check_merge_space(child_abs, parent_abs, allow_dirs)
    _write_json_atomically(journal_path, {**doc, "stage": "prepared"})

    tmp = parent_abs + MERGE_TMP_SUFFIX
    try:
        _build_and_swap(child_abs, parent_abs, fmt, tmp, progress, rule)
    except BaseException:
        # nothing was re-pointed yet (that starts at stage "replaced"): a failed merge (disk
        # full, permission denied, damaged data) leaves the chain exactly as it was
        _unlink_quietly(tmp)
        _unlink_quietly(journal_path)
        raise
    _fsync_dir(os.path.dirname(parent_abs))
    # from here on a re-run must not build another parent (see the "replaced" case above)
    _write_json_atomically(journal_path, {**doc, "stage": "replaced"})
    _finish_moves(parent_abs, grandchildren, child_abs, allow_dirs)
    _unlink_child_and_journal(child_abs, journal_path)
    return parent_abs


def _check_merge_space(child_abs: str, parent_abs: str, allow_dirs: Sequence[str]) -> None:
    """Refuse a merge the parent's file system has no room for, before anything is written."""
    need = merge_space(child_abs, allow_dirs=allow_dirs)
    folder = os.path.dirname(parent_abs)
    try:
        free = platform.free_bytes(folder)
    except OSError as exc:
        raise SourceError(f"{folder}: cannot tell its free space: {exc.strerror}") from exc
    with contextlib.suppress(OSError):
        free += platform.allocated_bytes(os.lstat(parent_abs + MERGE_TMP_SUFFIX))  # an earlier attempt's, removed first
    if need > free:
        raise SourceError(
            f"cannot merge {child_abs} into {parent_abs}: the merge writes a new copy of the parent beside it "
            f"and needs up to {need:,} bytes free in {folder}, which has {free:,}; nothing was changed"
        )


def _build_and_swap(
    child_abs: str, parent_abs: str, fmt: str, tmp: str, progress: ProgressFn | None, rule: ParentRule
) -> None:
    """Steps 2-4 of ``merge``: build the merged parent beside the parent and rename it over it."""
    _unlink_quietly(tmp)
    with open_image(child_abs, rule=rule) as child:
        parent = child.parent
        assert parent is not None
        _build_merged_parent(child, parent, tmp, progress)
    # step 3: a child that names its parent's identity must accept the new file too (VHDX)
    disk_format(detect_format(child_abs), path=child_abs).prepare_parent_swap(child_abs, parent_abs, tmp)
    try:
        # the merged file takes the parent's place: it keeps its permissions and owner too
        st = os.stat(parent_abs)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        with contextlib.suppress(PermissionError):
            platform.give_owner(tmp, st.st_uid, st.st_gid)
        platform.replace(tmp, parent_abs)
    except OSError as exc:
        raise SourceError(f"{parent_abs}: cannot replace with the merged file: {exc.strerror}") from exc


def _unlink_child_and_journal(child_abs: str, journal_path: str) -> None:
    try:
        os.unlink(child_abs)
    except OSError as exc:
        raise SourceError(f"{child_abs}: cannot delete the merged child: {exc.strerror}") from exc
    _fsync_dir(os.path.dirname(child_abs))
    _unlink_quietly(journal_path)


#: a journal names a handful of paths; anything larger was not written by vmvault
MAX_JOURNAL_BYTES: Final = 1024 * 1024


def _read_journal(path: str, rule: ParentRule) -> tuple[str, list[str], str] | None:
    """(parent, grandchildren, stage) from an unfinished merge's journal, or None.

    The journal lies in the (untrusted) folder: it is opened like an image file (no link, no
    FIFO) and every path it names must be where the merge's parents may be, because a merge
    writes into them.
    """
    if not os.path.lexists(path):
        return None
    try:
        fd, _st = open_checked(path, block_devices=False, nofollow=True, what="a merge journal")
    except SourceError as exc:
        raise SourceError(f"unreadable merge journal: {exc}") from exc
    try:
        raw = os.read(fd, MAX_JOURNAL_BYTES + 1)
    except OSError as exc:
        raise SourceError(f"{path}: unreadable merge journal: {exc.strerror}") from exc
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw) if len(raw) <= MAX_JOURNAL_BYTES else None
    except (ValueError, RecursionError) as exc:  # (nested too deeply for the parser)
        raise SourceError(f"{path}: unreadable merge journal: {exc}") from exc
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("parent"), str)
        or not isinstance(doc.get("grandchildren"), list)
        or not all(isinstance(g, str) for g in doc["grandchildren"])
    ):
        raise SourceError(f"{path}: merge journal is not what vmvault writes")
    for named in [doc["parent"], *doc["grandchildren"]]:
        if not names_a_file(named) or not os.path.isabs(named) or not rule.allows(os.path.realpath(named)):
            raise SourceError(
                f"{path}: merge journal names {named!r}, which is not where this merge's files may be "
                f"({rule.describe()}); not finishing it"
            )
    return doc["parent"], list(doc["grandchildren"]), str(doc.get("stage", "prepared"))


def _write_json_atomically(path: str, doc: dict[str, object]) -> None:
    tmp = path + ".tmp"
    # a link planted under the temporary name must not redirect the write: remove whatever is
    # there and create the file afresh, refusing to follow a link (O_EXCL | O_NOFOLLOW)
    _unlink_quietly(tmp)
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | platform.O_NOFOLLOW | platform.O_CLOEXEC | platform.O_BINARY,
            0o644,
        )
        try:
            os.write(fd, json.dumps(doc, indent=1).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        platform.replace(tmp, path)
    except OSError as exc:
        raise SourceError(f"{path}: cannot write the merge journal: {exc.strerror}") from exc
    _fsync_dir(os.path.dirname(path))


def _finish_moves(parent_abs: str, grandchildren: list[str], child_abs: str, allow_dirs: Sequence[str]) -> None:
    """Point every grandchild still naming the child at the (merged) parent."""
    for g in grandchildren:
        if _names_as_parent(g, child_abs, allow_dirs):
            _repoint(g, parent_abs, allow_dirs)


def _names_as_parent(path: str, target: str, allow_dirs: Sequence[str]) -> bool:
    """Does ``path``'s parent reference lead to ``target`` (without opening the chain)?

    Any file the reference names counts: a VHD whose locators were re-pointed but whose header
    was not (a crash inside ``set_parent``) still names ``target`` by its parent name.
    """
    ref = disk_format(detect_format(path), path=path).read_parent(path)
    real = os.path.realpath(target)
    # a damaged reference names no file: not the target either
    return ref is not None and any(names_a_file(p) and os.path.realpath(p) == real for p in ref.paths)


def _check_repointable(path: str, parent_fmt: str) -> None:
    fmt = detect_format(path)
    if disk_format(fmt, path=path).accepts_parent(parent_fmt):
        return
    raise UnsupportedFormatError(
        f"{path} is a {fmt} child of the checkpoint being merged; re-pointing a {fmt} image at a "
        f"{parent_fmt} parent is not supported: merge or apply {path} first",
        path=path,
    )


def _repoint(path: str, new_parent: str, allow_dirs: Sequence[str] = ()) -> None:
    disk_format(detect_format(path), path=path).set_parent(path, new_parent, _rule(path, allow_dirs))


# ---------------------------------------------------------------------------------- building the new parent


def _own_layer(child: DiskImage, parent: DiskImage) -> Iterator[tuple[Extent, DiskImage | None]]:
    """The map of child-over-parent as one layer: (extent, image holding its bytes or None)."""
    for ext in coalesce(child.extents()):
        if ext.kind is ExtentKind.DATA:
            yield ext, child
        elif ext.kind is ExtentKind.ZERO:
            yield ext, None
        else:
            for pe in clip_extents(coalesce(parent.extents()), ext.offset, ext.end):
                yield pe, (parent if pe.kind is ExtentKind.DATA else None)


def _build_merged_parent(child: DiskImage, parent: DiskImage, tmp: str, progress: ProgressFn | None) -> None:
    grand = parent.parent
    writer = _create_like(parent, tmp, grand)
    try:
        for ext, source in _own_layer(child, parent):
            if ext.kind is ExtentKind.PARENT:
                continue  # still defers to the grandparent
            for off in range(ext.offset, ext.end, COPY_CHUNK):
                n = min(COPY_CHUNK, ext.end - off)
                data = source.read(off, n) if source is not None else bytes(n)
                if not any(data) and (grand is None or not any(grand.read(off, n))):
                    pass  # reads as zeros either way: keep the file sparse
                else:
                    writer.write(off, data)
                if progress is not None:
                    progress(n)
        writer.close()
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the original error matters more
            writer.close()
        _unlink_quietly(tmp)
        if isinstance(exc, OSError):  # a writer that let a system error through
            raise SourceError(f"{tmp}: cannot write the merged parent: {exc.strerror or exc}") from exc
        raise


def _create_like(parent: DiskImage, tmp: str, grand: DiskImage | None) -> DiskWriter:
    """A new empty file at ``tmp`` with ``parent``'s identity, properties and parent."""
    return disk_format(parent.format, path=parent.path).create_like(parent, tmp, grand)


# ============================================================================================ convert


def convert(
    src: str,
    dest: str,
    fmt: str,
    *,
    parent: str | None = None,
    progress: ProgressFn | None = None,
    allow_dirs: Sequence[str] = (),
) -> str:
    """Flatten the chain of ``src`` into a new, sparse ``fmt`` image at ``dest``; return ``dest``.

    Only allocated, non-zero data is written. The image is built as ``dest.partial`` and renamed
    into place when complete, so ``dest`` never holds half an image. Parents must lie in
    ``src``'s folder, ``parent``'s folder or ``allow_dirs`` (the copy would carry their data).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if os.path.lexists(dest):
        raise ConfigError(f"{dest} already exists")
    tmp = dest + ".partial"
    with open_image(src, parent=parent, rule=_rule(src, allow_dirs)) as img:
        chain_files = {os.path.realpath(layer.path) for layer in img.chain()}
        if os.path.realpath(dest) in chain_files:
            raise ConfigError(f"{dest} is part of the chain being converted")
        writer = create_image(tmp, fmt, img.size)
        try:
            for ext in img.merged_extents():
                if ext.kind is not ExtentKind.DATA:
                    continue
                for off in range(ext.offset, ext.end, COPY_CHUNK):
                    n = min(COPY_CHUNK, ext.end - off)
                    data = img.read(off, n)
                    if any(data):
                        writer.write(off, data)
                    if progress is not None:
                        progress(n)
            writer.close()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the original error matters more
                writer.close()
            _unlink_quietly(tmp)
            if isinstance(exc, OSError):  # a writer that let a system error through
                raise SourceError(f"{dest}: cannot write: {exc.strerror or exc}") from exc
            raise
    try:
        platform.replace(tmp, dest)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise SourceError(f"{dest}: cannot create: {exc.strerror}") from exc
    _fsync_dir(os.path.dirname(os.path.abspath(dest)))
    return dest


# ============================================================================================ compare


def _sector_runs(a: bytes, b: bytes, base: int) -> Iterator[tuple[int, int]]:
    """Differing ``COMPARE_GRAIN`` runs of two equal-length buffers, as (offset, end)."""
    g = COMPARE_GRAIN
    start: int | None = None
    for i in range(0, len(a), g):
        if a[i : i + g] != b[i : i + g]:
            if start is None:
                start = i
        elif start is not None:
            yield base + start, base + i
            start = None
    if start is not None:
        yield base + start, base + len(a)


def _boundaries(a: DiskImage, b: DiskImage, size: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, both_zero) pieces of ``[0, size)`` cut at every extent boundary of a and b."""
    ea = list(clip_extents(coalesce(a.merged_extents()), 0, size))
    eb = list(clip_extents(coalesce(b.merged_extents()), 0, size))
    cuts = sorted({0, size, *(e.offset for e in ea), *(e.offset for e in eb)})
    ia = ib = 0
    for lo, hi in itertools.pairwise(cuts):
        while ia < len(ea) and ea[ia].end <= lo:
            ia += 1
        while ib < len(eb) and eb[ib].end <= lo:
            ib += 1
        za = ia >= len(ea) or ea[ia].kind is ExtentKind.ZERO
        zb = ib >= len(eb) or eb[ib].kind is ExtentKind.ZERO
        yield lo, hi, za and zb


def compare(
    a: str, b: str, *, progress: ProgressFn | None = None, allow_dirs: Sequence[str] = ()
) -> list[tuple[int, int]]:
    """The ``(offset, length)`` ranges where the guest-visible contents of two images differ.

    Ranges are in whole 512-byte sectors. Regions that are holes/zero in both maps are not read.
    A size difference is reported as the range past the smaller size. Each image's parents
    must lie in its own folder or ``allow_dirs``.
    """
    out: list[list[int]] = []

    def add(lo: int, hi: int) -> None:
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1][1] += hi - lo
        else:
            out.append([lo, hi - lo])

    with open_image(a, rule=_rule(a, allow_dirs)) as ia, open_image(b, rule=_rule(b, allow_dirs)) as ib:
        size = min(ia.size, ib.size)
        for lo, hi, both_zero in _boundaries(ia, ib, size):
            if both_zero:
                if progress is not None:
                    progress(hi - lo)
                continue
            for off in range(lo, hi, COPY_CHUNK):
                n = min(COPY_CHUNK, hi - off)
                da, db = ia.read(off, n), ib.read(off, n)
                if da != db:
                    for s, e in _sector_runs(da, db, off):
                        add(s, e)
                if progress is not None:
                    progress(n)
        if ia.size != ib.size:
            add(size, max(ia.size, ib.size))
    return [(o, n) for o, n in out]


# ============================================================================================ helpers


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _fsync_dir(folder: str) -> None:
    """Make a create/rename/unlink in ``folder`` durable."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

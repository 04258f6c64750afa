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
from collections.abc import Callable, Iterator
from typing import Final

from vmvault.disk import DISK_SUFFIXES, FORMATS, create_image, detect_format, open_image
from vmvault.disk import _vhdx_layout as L
from vmvault.disk.base import DiskImage, DiskWriter, Extent, ExtentKind, clip_extents, coalesce, read_structure
from vmvault.errors import ConfigError, FormatError, ParentError, SourceError, UnsupportedFormatError

__all__ = [
    "Chain",
    "Layer",
    "apply",
    "checkpoint",
    "children",
    "compare",
    "convert",
    "merge",
    "open_chain",
    "open_for_write",
]

#: copy granularity: large enough for few syscalls, small enough to skip zero runs
COPY_CHUNK: Final = 1024 * 1024
#: allocation units of a new checkpoint when the parent does not tell (the writers' defaults)
DEFAULT_VHDX_BLOCK: Final = 32 * 1024 * 1024
DEFAULT_VHD_BLOCK: Final = 2 * 1024 * 1024
DEFAULT_QCOW2_CLUSTER: Final = 64 * 1024
#: compare() reports differences in whole sectors
COMPARE_GRAIN: Final = 512
#: the new parent is built under this name beside the parent, then renamed over it
MERGE_TMP_SUFFIX: Final = ".vmvault-merge"
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


def open_chain(path: str, *, parent: str | None = None) -> Chain:
    """Describe the chain of ``path`` (leaf first). ``parent`` overrides the direct parent's location."""
    with open_image(path, parent=parent) as img:
        return Chain(tuple(_layer_of(layer) for layer in img.chain()))


# ============================================================================================ tree


def _parent_path(path: str) -> str | None:
    """The resolved path of ``path``'s direct parent, or None for a base image."""
    with open_image(path) as img:
        return img.parent.path if img.parent is not None else None


def children(path: str) -> list[str]:
    """Differencing images in ``path``'s folder whose direct parent is ``path``.

    Like Hyper-V, checkpoints live beside their parent; files elsewhere are not found. Files that
    cannot be opened (damaged, or their own parent missing) are skipped.
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
        if not name.lower().endswith(DISK_SUFFIXES) or os.path.realpath(cand) == real or not os.path.isfile(cand):
            continue
        try:
            parent = _parent_path(cand)
        except (FormatError, SourceError):
            continue
        if parent is not None and os.path.realpath(parent) == real:
            out.append(cand)
    return out


def _descendants(path: str) -> list[str]:
    """Every image below ``path``, deepest first (so deleting in order never orphans a file)."""
    out: list[str] = []
    for child in children(path):
        out.extend(_descendants(child))
        out.append(child)
    return out


# ============================================================================================ checkpoint


def _checkpoint_name(image_path: str, fmt: str, name: str | None) -> str:
    folder = os.path.dirname(os.path.abspath(image_path))
    ext = {"vhdx": ".avhdx", "vhd": ".avhd"}.get(fmt, ".qcow2")
    if name is not None:
        if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
            raise ConfigError(f"checkpoint name {name!r} must be a plain file name")
        return os.path.join(folder, name if name.lower().endswith(ext) else name + ext)
    stem = os.path.splitext(os.path.basename(image_path))[0]
    stem = _GUID_TAIL.sub("", stem) or stem
    # Hyper-V: "<disk>_<GUID>.avhdx", the GUID in upper case without braces
    return os.path.join(folder, f"{stem}_{str(uuid.uuid4()).upper()}{ext}")


def checkpoint(image_path: str, *, name: str | None = None) -> str:
    """Take a checkpoint of ``image_path``: create a differencing child beside it; return its path.

    VHDX gets ``<stem>_<GUID>.avhdx``, VHD ``<stem>_<GUID>.avhd``, qcow2 and raw a qcow2 overlay
    ``<stem>_<GUID>.qcow2`` (``name`` chooses the file name instead). The image itself is only
    read; from now on writes belong in the child.
    """
    fmt = detect_format(image_path)
    # opening checks the whole chain now, so a broken chain is refused before a file is made
    with open_image(image_path, format=fmt) as img:
        size = img.size
        # the child keeps the parent's allocation unit, so a merge copies whole units
        unit = int(str(img.info().get("block_size") or img.info().get("cluster_size") or 0))
    child = _checkpoint_name(image_path, fmt, name)
    if os.path.lexists(child):
        raise ConfigError(f"{child} already exists")
    writer: DiskWriter
    if fmt == "vhdx":
        from vmvault.disk.vhdx import create_vhdx

        writer = create_vhdx(child, size, parent=image_path, block_size=unit or DEFAULT_VHDX_BLOCK)
    elif fmt == "vhd":
        from vmvault.disk.vhd import create_vhd

        writer = create_vhd(child, size, parent=image_path, block_size=unit or DEFAULT_VHD_BLOCK)
    else:
        from vmvault.disk.qcow2 import create_qcow2

        backing = os.path.relpath(os.path.abspath(image_path), os.path.dirname(child))
        cluster = unit if fmt == "qcow2" and unit else DEFAULT_QCOW2_CLUSTER
        writer = create_qcow2(child, size, backing=backing, backing_format=fmt, cluster_size=cluster)
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
    fmt = detect_format(image_path)
    if fmt == "vhdx":
        from vmvault.disk.vhdx import open_vhdx_for_write

        return open_vhdx_for_write(image_path)
    if fmt == "qcow2":
        from vmvault.disk.qcow2 import open_qcow2_for_write

        return open_qcow2_for_write(image_path)
    raise UnsupportedFormatError(f"vmvault cannot write a {fmt} image in place", path=image_path)


# ============================================================================================ apply


def apply(child_path: str, *, discard_subtree: bool = False) -> str:
    """Discard a checkpoint's changes: delete ``child_path``; return its parent's path.

    Refused when the child has children of its own, unless ``discard_subtree`` (then they are
    deleted too, deepest first).
    """
    parent = _parent_path(child_path)
    if parent is None:
        raise ConfigError(f"{child_path} is not a differencing image: it has no parent to go back to")
    below = _descendants(child_path)
    if below and not discard_subtree:
        raise ConfigError(
            f"{child_path} has {len(below)} checkpoint(s) below it ({', '.join(below)}); "
            "discard the whole subtree or merge them first"
        )
    for path in [*below, child_path]:
        try:
            os.unlink(path)
        except OSError as exc:
            raise SourceError(f"{path}: cannot delete: {exc.strerror}") from exc
    _fsync_dir(os.path.dirname(os.path.abspath(child_path)))
    return parent


# ============================================================================================ merge


def merge(child_path: str, *, progress: ProgressFn | None = None) -> str:
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
    """
    child_abs = os.path.abspath(child_path)
    journal_path = child_abs + MERGE_JOURNAL_SUFFIX
    journal = _read_journal(journal_path)
    if not os.path.exists(child_abs):
        if journal is None:
            raise SourceError(f"{child_path}: no such file")
        # crashed after the child was deleted: only the journal is left to remove
        _finish_moves(journal[0], [g for g in journal[1] if os.path.exists(g)], child_abs)
        _unlink_quietly(journal_path)
        return journal[0]

    with open_image(child_abs) as child:
        if child.parent is None:
            raise ConfigError(f"{child_path} is not a differencing image: there is no parent to merge into")
        parent_abs = os.path.abspath(child.parent.path)
    moved = journal[1] if journal is not None else []
    grandchildren = sorted(set(children(child_abs)) | {g for g in moved if os.path.exists(g)})
    siblings = [s for s in children(parent_abs) if os.path.realpath(s) != os.path.realpath(child_abs)]
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
        _finish_moves(parent_abs, grandchildren, child_abs)
        _unlink_child_and_journal(child_abs, journal_path)
        return parent_abs
    _write_json_atomically(journal_path, {**doc, "stage": "prepared"})

    tmp = parent_abs + MERGE_TMP_SUFFIX
    try:
        _build_and_swap(child_abs, parent_abs, fmt, tmp, progress)
    except BaseException:
        # nothing was re-pointed yet (that starts at stage "replaced"): a failed merge (disk
        # full, permission denied, damaged data) leaves the chain exactly as it was
        _unlink_quietly(tmp)
        _unlink_quietly(journal_path)
        raise
    _fsync_dir(os.path.dirname(parent_abs))
    # from here on a re-run must not build another parent (see the "replaced" case above)
    _write_json_atomically(journal_path, {**doc, "stage": "replaced"})
    _finish_moves(parent_abs, grandchildren, child_abs)
    _unlink_child_and_journal(child_abs, journal_path)
    return parent_abs


def _build_and_swap(child_abs: str, parent_abs: str, fmt: str, tmp: str, progress: ProgressFn | None) -> None:
    """Steps 2-4 of ``merge``: build the merged parent beside the parent and rename it over it."""
    _unlink_quietly(tmp)
    with open_image(child_abs) as child:
        parent = child.parent
        assert parent is not None
        _build_merged_parent(child, parent, tmp, progress)
    if detect_format(child_abs) == "vhdx" and fmt == "vhdx":
        from vmvault.disk.vhdx import open_vhdx

        with open_vhdx(tmp) as new_parent:
            new_guid = new_parent.data_write_guid
        with open_vhdx(parent_abs) as old_parent:
            old_guid = old_parent.data_write_guid
        # parent_linkage names the file in place now (on a re-run that may already be an earlier
        # merged file), parent_linkage2 the one about to replace it: both are accepted throughout
        entries = [
            (k, v) for k, v in _vhdx_locator(child_abs).entries if k not in ("parent_linkage", "parent_linkage2")
        ]
        entries[:0] = [("parent_linkage", _braced(old_guid)), ("parent_linkage2", _braced(new_guid))]
        _vhdx_set_locator(child_abs, tuple(entries))
    try:
        # the merged file takes the parent's place: it keeps its permissions and owner too
        st = os.stat(parent_abs)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
        with contextlib.suppress(PermissionError):
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, parent_abs)
    except OSError as exc:
        raise SourceError(f"{parent_abs}: cannot replace with the merged file: {exc.strerror}") from exc


def _unlink_child_and_journal(child_abs: str, journal_path: str) -> None:
    try:
        os.unlink(child_abs)
    except OSError as exc:
        raise SourceError(f"{child_abs}: cannot delete the merged child: {exc.strerror}") from exc
    _fsync_dir(os.path.dirname(child_abs))
    _unlink_quietly(journal_path)


def _read_journal(path: str) -> tuple[str, list[str], str] | None:
    """(parent, grandchildren, stage) from an unfinished merge's journal, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable merge journal: {exc}") from exc
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("parent"), str)
        or not isinstance(doc.get("grandchildren"), list)
    ):
        raise SourceError(f"{path}: merge journal is not what vmvault writes")
    return doc["parent"], [str(g) for g in doc["grandchildren"]], str(doc.get("stage", "prepared"))


def _write_json_atomically(path: str, doc: dict[str, object]) -> None:
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, json.dumps(doc, indent=1).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise SourceError(f"{path}: cannot write the merge journal: {exc.strerror}") from exc
    _fsync_dir(os.path.dirname(path))


def _finish_moves(parent_abs: str, grandchildren: list[str], child_abs: str) -> None:
    """Point every grandchild still naming the child at the (merged) parent."""
    for g in grandchildren:
        if _names_as_parent(g, child_abs):
            _repoint(g, parent_abs)


def _names_as_parent(path: str, target: str) -> bool:
    """Does ``path``'s locator resolve to ``target`` (without opening the chain)?"""
    fmt = detect_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    real = os.path.realpath(target)
    if fmt == "vhdx":
        keys = _vhdx_locator(path).as_dict()
        rel = keys.get("relative_path", "")
        if rel and os.path.realpath(os.path.join(folder, rel.replace("\\", "/"))) == real:
            return True
        absolute = keys.get("absolute_win32_path", "")
        return bool(absolute) and os.path.realpath(absolute) == real
    if fmt == "qcow2":
        name = _qcow2_backing_name(path)
        return name is not None and os.path.realpath(os.path.join(folder, name)) == real
    if fmt == "vhd":
        from vmvault.disk.vhd import open_vhd

        # the VHD reader tries the locators and the parent's name and checks the UniqueId
        try:
            with open_vhd(path) as img:
                return img.parent is not None and os.path.realpath(img.parent.path) == real
        except (FormatError, SourceError):
            return False
    return False


def _check_repointable(path: str, parent_fmt: str) -> None:
    fmt = detect_format(path)
    if fmt == parent_fmt and fmt in ("vhdx", "vhd"):
        return
    if fmt == "qcow2":
        return
    raise UnsupportedFormatError(
        f"{path} is a {fmt} child of the checkpoint being merged; re-pointing a {fmt} image at a "
        f"{parent_fmt} parent is not supported: merge or apply {path} first",
        path=path,
    )


def _repoint(path: str, new_parent: str) -> None:
    fmt = detect_format(path)
    if fmt == "vhdx":
        from vmvault.disk.vhdx import open_vhdx

        with open_vhdx(new_parent) as p:
            guid = p.data_write_guid
        folder = os.path.dirname(os.path.abspath(path))
        parent_abs = os.path.abspath(new_parent)
        rel = os.path.relpath(parent_abs, folder).replace("/", "\\")
        if not rel.startswith(".."):
            rel = ".\\" + rel
        entries = (
            ("parent_linkage", _braced(guid)),
            ("absolute_win32_path", parent_abs),
            ("relative_path", rel),
        )
        _vhdx_set_locator(path, entries)
    elif fmt == "qcow2":
        rel = os.path.relpath(os.path.abspath(new_parent), os.path.dirname(os.path.abspath(path)))
        _qcow2_set_backing(path, rel, detect_format(new_parent))
    elif fmt == "vhd":
        _vhd_set_parent(path, new_parent)
    else:  # pragma: no cover - refused by _check_repointable
        raise UnsupportedFormatError(f"cannot re-point a {fmt} image", path=path)


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
    fmt = parent.format
    info = parent.info()
    grand_path = os.path.abspath(grand.path) if grand is not None else None
    if fmt == "vhdx":
        from vmvault.disk.vhdx import VhdxImage, create_vhdx

        assert isinstance(parent, VhdxImage)
        if grand_path is not None:
            return create_vhdx(tmp, parent.size, block_size=parent.block_size, parent=grand_path)
        return create_vhdx(
            tmp,
            parent.size,
            block_size=parent.block_size,
            fixed=parent.subtype == "fixed",
            logical_sector=parent.logical_sector_size,
            physical_sector=parent.physical_sector_size,
            virtual_disk_id=parent.virtual_disk_id,
        )
    if fmt == "vhd":
        from vmvault.disk.vhd import VhdImage, create_vhd

        assert isinstance(parent, VhdImage)
        return create_vhd(
            tmp,
            parent.size,
            fixed=str(info.get("disk_type", "")).lower() == "fixed",
            parent=grand_path,
            block_size=parent.block_size or 2 * 1024 * 1024,
            unique_id=parent.footer.unique_id,
        )
    if fmt == "qcow2":
        from vmvault.disk.qcow2 import Qcow2Image, create_qcow2

        assert isinstance(parent, Qcow2Image)
        h = parent.header
        if h.nb_snapshots:
            raise UnsupportedFormatError(
                f"{parent.path} holds {h.nb_snapshots} internal snapshots, which a merge would lose", path=parent.path
            )
        backing = os.path.relpath(grand_path, os.path.dirname(tmp)) if grand_path is not None else None
        return create_qcow2(
            tmp,
            parent.size,
            cluster_size=parent.cluster_size,
            backing=backing,
            backing_format=grand.format if grand is not None else None,
        )
    if fmt == "raw":
        return create_image(tmp, "raw", parent.size)
    raise UnsupportedFormatError(f"cannot merge into a {fmt} image", path=parent.path)


# ---------------------------------------------------------------------------------- VHDX locator update


def _braced(guid: uuid.UUID) -> str:
    return "{" + str(guid) + "}"


def _vhdx_metadata(fd: int, path: str) -> tuple[int, int, L.MetadataTable]:
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


def _vhdx_locator(path: str) -> L.ParentLocator:
    """A differencing VHDX's parent locator, read without opening its chain."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        base, _length, meta = _vhdx_metadata(fd, path)
        entry = next((e for e in meta.entries if e.item_id == L.PARENT_LOCATOR_GUID), None)
        if entry is None:
            raise ParentError("no parent locator", path=path, structure="metadata parent locator")
        raw = read_structure(fd, path, base + entry.offset, entry.length, "metadata parent locator")
        try:
            return L.ParentLocator.unpack(raw)
        except ValueError as exc:
            raise FormatError(str(exc), path=path, structure="metadata parent locator") from exc
    finally:
        os.close(fd)


def _vhdx_set_locator(path: str, entries: tuple[tuple[str, str], ...]) -> None:
    """Replace a differencing VHDX's parent locator, atomically with respect to a crash.

    The file is first made clean and given a new FileWriteGuid by the regular writer (section
    2.2.2: a file must get a new FileWriteGuid before it is modified). The new locator is then
    written into free space of the metadata region and flushed, and only then does the one
    metadata table entry that names it change (a single 32-byte entry inside one sector), so
    either the old or the new locator is in force at every instant.
    """
    from vmvault.disk.vhdx import open_vhdx_for_write

    open_vhdx_for_write(path).close()
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open for writing: {exc.strerror}") from exc
    try:
        base, length, meta = _vhdx_metadata(fd, path)
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
        os.pwrite(fd, blob, base + where)
        os.fsync(fd)
        new_entries = list(meta.entries)
        new_entries[idx] = dataclasses.replace(meta.entries[idx], offset=where, length=len(blob))
        os.pwrite(fd, L.MetadataTable(tuple(new_entries)).pack(), base)
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


# ---------------------------------------------------------------------------------- VHD parent


def _vhd_set_parent(path: str, new_parent: str) -> None:
    """Point a differencing VHD at ``new_parent``: locator texts, then the dynamic header.

    The locator texts are rewritten in their existing space first. Should a crash stop us
    there, the header still names the old parent (ParentUniqueId and ParentUnicodeName), and a
    reader that finds the new path's UniqueId wrong falls back to the old parent's name beside
    the file. The header (ParentUniqueId, time stamp, name, locator lengths; spec "Dynamic Disk
    Header Format") is then written with one ``pwrite`` of its 1024 bytes.
    """
    from vmvault.disk._vhd_layout import DYNAMIC_HEADER_SIZE, FOOTER_SIZE, DynamicHeader, PlatformCode
    from vmvault.disk.vhd import open_vhd

    with open_vhd(new_parent) as p:
        puid, pts = p.footer.unique_id, p.footer.timestamp
    with open_vhd(path) as img:
        data_offset = img.footer.data_offset
    parent_abs = os.path.abspath(new_parent)
    rel = os.path.relpath(parent_abs, os.path.dirname(os.path.abspath(path)))
    texts = {
        PlatformCode.W2KU.value: parent_abs.replace("/", "\\"),
        PlatformCode.W2RU.value: (".\\" + rel if not rel.startswith("..") else rel).replace("/", "\\"),
    }
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open for writing: {exc.strerror}") from exc
    try:
        header = DynamicHeader.unpack(read_structure(fd, path, data_offset, DYNAMIC_HEADER_SIZE, "VHD dynamic header"))
        locators = list(header.locators)
        writes: list[tuple[int, bytes]] = []
        for i, loc in enumerate(locators):
            text = texts.get(loc.platform_code)
            if text is None or loc.data_length == 0:
                continue
            data = text.encode("utf-16-le")
            room = -(-loc.data_length // FOOTER_SIZE) * FOOTER_SIZE
            if len(data) > room:
                raise UnsupportedFormatError(
                    f"the parent path {text!r} does not fit in the {room} bytes of parent locator {i}",
                    path=path,
                    structure="VHD parent locator",
                )
            writes.append((loc.data_offset, data.ljust(room, b"\0")))
            locators[i] = dataclasses.replace(loc, data_length=len(data))
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.fsync(fd)
        new = dataclasses.replace(
            header,
            parent_unique_id=puid,
            parent_timestamp=pts,
            parent_unicode_name=os.path.basename(parent_abs),
            locators=tuple(locators),
        )
        os.pwrite(fd, new.pack(), data_offset)
        os.fsync(fd)
    except OSError as exc:
        raise SourceError(f"{path}: cannot update the parent locators: {exc.strerror}") from exc
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- qcow2 backing name


def _qcow2_head(fd: int, path: str) -> tuple[bytes, int, int, int]:
    """(bytes up to the end of the backing name, its offset, its size, cluster size)."""
    raw = read_structure(fd, path, 0, 72, "qcow2 header")
    if raw[:4] != b"QFI\xfb":
        raise FormatError("bad magic", path=path, offset=0, structure="qcow2 header")
    bfo = int.from_bytes(raw[8:16], "big")
    bfs = int.from_bytes(raw[16:20], "big")
    cbits = int.from_bytes(raw[20:24], "big")
    if not 9 <= cbits <= 21 or bfs > 1023 or bfo + bfs > (1 << cbits):
        raise FormatError("backing file name lies outside the first cluster", path=path, structure="qcow2 header")
    head = read_structure(fd, path, 0, bfo + bfs, "qcow2 header") if bfo else raw
    return head, bfo, bfs, 1 << cbits


def _qcow2_backing_name(path: str) -> str | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        head, bfo, bfs, _cs = _qcow2_head(fd, path)
    finally:
        os.close(fd)
    return head[bfo : bfo + bfs].decode("utf-8", "replace") if bfo else None


#: qcow2 header extension types (spec "Header extensions")
_QCOW2_EXT_END: Final = 0
_QCOW2_EXT_BACKING_FORMAT: Final = 0xE2792ACA


def _qcow2_set_backing(path: str, name: str, fmt: str) -> None:
    """Rewrite a qcow2's backing file name and backing format extension in one ``pwrite``.

    Everything that changes (header fields, the extension area, the name) lies in the first
    cluster, so a single write switches from the old backing file to the new one.
    """
    raw_name = name.encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open for writing: {exc.strerror}") from exc
    try:
        head, bfo, _bfs, cs = _qcow2_head(fd, path)
        if not bfo:
            raise FormatError("image has no backing file to re-point", path=path, structure="qcow2 header")
        version = int.from_bytes(head[4:8], "big")
        hlen = int.from_bytes(head[100:104], "big") if version >= 3 else 72
        exts: list[tuple[int, bytes]] = []
        pos = hlen
        while pos + 8 <= bfo:
            etype = int.from_bytes(head[pos : pos + 4], "big")
            elen = int.from_bytes(head[pos + 4 : pos + 8], "big")
            if etype == _QCOW2_EXT_END:
                break
            if pos + 8 + elen > bfo:
                raise FormatError("header extension runs into the backing name", path=path, offset=pos)
            if etype != _QCOW2_EXT_BACKING_FORMAT:
                exts.append((etype, head[pos + 8 : pos + 8 + elen]))
            pos += 8 + -(-elen // 8) * 8
        exts.insert(0, (_QCOW2_EXT_BACKING_FORMAT, {"vhd": "vpc"}.get(fmt, fmt).encode("ascii")))
        area = bytearray()
        for etype, data in [*exts, (_QCOW2_EXT_END, b"")]:
            area += etype.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data.ljust(-(-len(data) // 8) * 8, b"\0")
        new_bfo = hlen + len(area)
        # the name must stay inside the header cluster (spec: "must not exceed the first cluster")
        if new_bfo + len(raw_name) > cs or len(raw_name) > 1023:
            raise UnsupportedFormatError(f"backing name {name!r} does not fit in the header cluster", path=path)
        buf = bytearray(head[:hlen]) + area + raw_name
        buf[8:16] = new_bfo.to_bytes(8, "big")
        buf[16:20] = len(raw_name).to_bytes(4, "big")
        os.pwrite(fd, bytes(buf), 0)
        os.fsync(fd)
    except OSError as exc:
        raise SourceError(f"{path}: cannot update the backing file name: {exc.strerror}") from exc
    finally:
        os.close(fd)


# ============================================================================================ convert


def convert(src: str, dest: str, fmt: str, *, parent: str | None = None, progress: ProgressFn | None = None) -> str:
    """Flatten the chain of ``src`` into a new, sparse ``fmt`` image at ``dest``; return ``dest``.

    Only allocated, non-zero data is written. The image is built as ``dest.partial`` and renamed
    into place when complete, so ``dest`` never holds half an image.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if os.path.lexists(dest):
        raise ConfigError(f"{dest} already exists")
    tmp = dest + ".partial"
    with open_image(src, parent=parent) as img:
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
        os.replace(tmp, dest)
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


def compare(a: str, b: str, *, progress: ProgressFn | None = None) -> list[tuple[int, int]]:
    """The ``(offset, length)`` ranges where the guest-visible contents of two images differ.

    Ranges are in whole 512-byte sectors. Regions that are holes/zero in both maps are not read.
    A size difference is reported as the range past the smaller size.
    """
    out: list[list[int]] = []

    def add(lo: int, hi: int) -> None:
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1][1] += hi - lo
        else:
            out.append([lo, hi - lo])

    with open_image(a) as ia, open_image(b) as ib:
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

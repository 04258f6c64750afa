"""Snapshot manifests: what one backup of one source contains.

A snapshot is a JSON document sealed like every other object (aad = ``b"snapshot"``) and
stored as ``snapshots/<id>``, where id is the hex SHA-256 of the JSON. It is written last,
after every pack and index file it needs, so a snapshot that exists is complete.

Each disk is described by a *full* chunk index (no chain of incrementals to merge):
``index`` lists index blocks, each covering ``index_span`` chunks of ``chunk_size`` bytes
(ID_SIZE bytes per chunk: a chunk id, ZERO_ID or PARENT_ID). An index block whose chunks are
all zero is ``None``. Unchanged index blocks keep their id from one snapshot to the next,
so an incremental backup stores only the blocks that changed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from vmvault import shape
from vmvault.errors import IntegrityError

__all__ = ["DiskRecord", "FileRecord", "Snapshot", "UnloadedIds"]

#: Snapshot fields to_dict does not deep-copy (``id`` is not stored at all)
_SHALLOW = ("id", "disks", "files")


@dataclass
class DiskRecord:
    name: str
    format: str
    size: int
    chunk_size: int
    index_span: int
    index: list[str | None]
    #: True: a checkpoint-chain layer; PARENT_ID entries defer to ``parent``
    layer: bool = False
    parent: str | None = None
    #: for layers: the byte ranges [offset, length] this layer itself stores (DATA)
    layer_map: list[list[int]] | None = None
    cbt: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: bytes read, bytes new in the repository (compressed), ...
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class FileRecord:
    name: str
    size: int
    mode: int
    mtime_ns: int
    chunks: list[str]


@dataclass
class Snapshot:
    time: str
    hostname: str
    username: str
    source: dict[str, str]
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    vm: dict[str, Any] = field(default_factory=dict)
    consistency: str = "offline"
    warnings: list[str] = field(default_factory=list)
    disks: list[DiskRecord] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    program: str = ""
    #: file name -> [uid, gid] where the source knows the numeric owner (``restore --numeric-owner``).
    #: A top-level field, which older readers ignore, left out of the document when empty so
    #: snapshots without it keep their bytes and id; disks keep theirs in ``meta``.
    file_owners: dict[str, list[int]] = field(default_factory=dict)
    #: set when loaded or saved; not part of the stored document
    id: str = field(default="", compare=False)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies every entry of every disk's index one by one
        # (seconds for the million entries of an empty petabyte); ids and None need no copy
        doc = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in _SHALLOW}
        doc["disks"] = [_record_dict(d, "index") for d in self.disks]
        doc["files"] = [_record_dict(f, "chunks") for f in self.files]
        if not doc["file_owners"]:
            del doc["file_owners"]
        return doc

    @classmethod
    def from_dict(cls, doc: Any, *, snapshot_id: str = "") -> Snapshot:
        """The snapshot ``doc`` describes. Every field this reader knows must have its type
        (``_FIELDS``): a manifest is written by whoever can write the repository, and one of
        the wrong shape is an IntegrityError here, not a failure wherever a field is used."""
        try:
            problem = _shape_problem(doc)
            if problem is not None:
                raise TypeError(problem)
            disks = [DiskRecord(**d) for d in doc.get("disks", [])]
            files = [FileRecord(**f) for f in doc.get("files", [])]
            rest = {k: v for k, v in doc.items() if k not in ("disks", "files")}
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in rest.items() if k in known}, disks=disks, files=files, id=snapshot_id)
        except TypeError as exc:
            raise IntegrityError(
                f"snapshot {snapshot_id[:8]}: unreadable manifest: {exc}", object_id=snapshot_id
            ) from exc

    def total_size(self) -> int:
        return sum(d.size for d in self.disks) + sum(f.size for f in self.files)

    def id_count(self) -> int:
        """How many index block and chunk ids the whole snapshot holds (a summary knows it)."""
        return sum(len(d.index) for d in self.disks) + sum(len(f.chunks) for f in self.files)

    def summary(self) -> Snapshot:
        """This snapshot without its disks' index block ids and its files' chunk ids (each an
        ``UnloadedIds`` that knows how many there were and refuses to be read): what a listing,
        a selection and retention need, a few KiB, where the ids take about 120 bytes per GiB
        of disk (a snapshot of 2 TiB of disks, 240 KiB). Saving a summary fails."""
        return dataclasses.replace(
            self,
            disks=[dataclasses.replace(d, index=_unloaded(self, d.index)) for d in self.disks],
            files=[dataclasses.replace(f, chunks=_unloaded(self, f.chunks)) for f in self.files],
            id=self.id,
        )

    @property
    def is_summary(self) -> bool:
        return any(isinstance(d.index, UnloadedIds) for d in self.disks) or any(
            isinstance(f.chunks, UnloadedIds) for f in self.files
        )


class UnloadedIds(Sequence[Any]):
    """The ids of a snapshot loaded as a summary: their number, nothing else. Reading them
    (indexing, iterating, saving) raises: load the snapshot whole (``Repository.load_snapshot``)."""

    __slots__ = ("_count", "_snapshot")

    def __init__(self, count: int, snapshot: str) -> None:
        self._count = count
        self._snapshot = snapshot

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> NoReturn:
        self._refuse()

    def __iter__(self) -> Iterator[Any]:
        self._refuse()

    def __deepcopy__(self, memo: Any) -> NoReturn:
        self._refuse()

    def _refuse(self) -> NoReturn:
        raise RuntimeError(f"snapshot {self._snapshot[:8]} was loaded as a summary: its ids are not loaded")


def _unloaded(snap: Snapshot, ids: Sequence[Any]) -> Any:
    # typed as the list it stands in for: every read of it raises instead of reading nothing
    return UnloadedIds(len(ids), snap.id)


# -- the manifest's shape, checked when it is read ---------------------------------------------

_EXTENTS = shape.optional(shape.list_of(shape.list_of(shape.count, sizes=(2, 3))))
#: what each field a reader knows must be; fields it does not know are left alone (a newer
#: writer's), missing ones take their defaults or, when they have none, make it unreadable.
#: A layer map is ``[offset, length, kind]`` per extent (``[offset, length]`` before kinds).
_FIELDS: dict[str, dict[str, shape.Check]] = {
    "snapshot": {
        "time": shape.time, "hostname": shape.text, "username": shape.text,
        "source": shape.map_of(shape.text), "tags": shape.list_of(shape.text), "parent": shape.optional(shape.text),
        "vm": shape.obj, "consistency": shape.text, "warnings": shape.list_of(shape.text), "extra": shape.obj,
        "stats": shape.obj, "program": shape.text,
        "file_owners": shape.map_of(shape.list_of(shape.count, sizes=(2,))),
    },
    "disk": {
        "name": shape.text, "format": shape.text, "size": shape.count, "chunk_size": shape.positive,
        "index_span": shape.positive, "index": shape.list_of(shape.optional(shape.text)), "layer": shape.flag,
        "parent": shape.optional(shape.text), "layer_map": _EXTENTS, "cbt": shape.optional(shape.obj),
        "meta": shape.obj, "stats": shape.map_of(shape.count),
    },
    "file": {
        "name": shape.text, "size": shape.count, "mode": shape.count, "mtime_ns": shape.integer,
        "chunks": shape.list_of(shape.text),
    },
}  # fmt: skip


def _shape_problem(doc: Any) -> str | None:
    """What is wrong with the shape of manifest ``doc``; None when nothing is."""
    found = shape.problem("snapshot", doc, _FIELDS["snapshot"])
    if found is not None:
        return found
    for what, key in (("disk", "disks"), ("file", "files")):
        records = doc.get(key, [])
        if type(records) is not list:
            return f"the snapshot field {key!r} holds {shape.describe(records)}"
        for record in records:
            found = shape.problem(what, record, _FIELDS[what])
            if found is not None:
                return found
    return None


def _record_dict(record: DiskRecord | FileRecord, ids: str) -> dict[str, Any]:
    """A record as a dict; its list of ids (strings and None, immutable) is copied shallowly."""
    out = {f.name: copy.deepcopy(getattr(record, f.name)) for f in dataclasses.fields(record) if f.name != ids}
    out[ids] = list(getattr(record, ids))
    return out

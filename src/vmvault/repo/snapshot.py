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
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from vmvault import times
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

#: the largest size, offset or count a manifest may give (a file offset's range)
_INT_LIMIT = 1 << 63


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < _INT_LIMIT


def _positive(value: Any) -> bool:
    return type(value) is int and 0 < value < _INT_LIMIT


def _integer(value: Any) -> bool:
    return type(value) is int and -_INT_LIMIT <= value < _INT_LIMIT


def _text(value: Any) -> bool:
    return type(value) is str


def _texts(value: Any) -> bool:
    return type(value) is list and all(type(v) is str for v in value)


def _object(value: Any) -> bool:
    return type(value) is dict


def _text_map(value: Any) -> bool:
    return _object(value) and all(type(v) is str for v in value.values())


def _counts(value: Any) -> bool:
    return _object(value) and all(map(_count, value.values()))


def _time(value: Any) -> bool:
    """An ISO 8601 time that converts to UTC and to epoch seconds (what listings do with it)."""
    try:
        times.as_datetime(value).astimezone(dt.UTC).timestamp()
    except (ValueError, OverflowError, TypeError):
        return False
    return type(value) is str


def _text_or_none(value: Any) -> bool:
    return value is None or type(value) is str


def _owners(value: Any) -> bool:
    return _object(value) and all(map(_pair, value.values()))


def _pair(value: Any) -> bool:
    return type(value) is list and len(value) == 2 and all(map(_count, value))


def _extent(value: Any) -> bool:
    return type(value) is list and len(value) in (2, 3) and all(map(_count, value))


def _ranges(value: Any) -> bool:
    """A layer map: ``[offset, length, kind]`` per extent (``[offset, length]`` before kinds)."""
    return value is None or (type(value) is list and all(map(_extent, value)))


def _index(value: Any) -> bool:
    return type(value) is list and all(i is None or type(i) is str for i in value)


def _flag(value: Any) -> bool:
    return type(value) is bool


def _object_or_none(value: Any) -> bool:
    return value is None or type(value) is dict


#: what each field a reader knows must be; fields it does not know are left alone (a newer
#: writer's), missing ones take their defaults or, when they have none, make it unreadable
_FIELDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "snapshot": {
        "time": _time, "hostname": _text, "username": _text, "source": _text_map, "tags": _texts,
        "parent": _text_or_none, "vm": _object, "consistency": _text, "warnings": _texts,
        "extra": _object, "stats": _object, "program": _text, "file_owners": _owners,
    },
    "disk": {
        "name": _text, "format": _text, "size": _count, "chunk_size": _positive, "index_span": _positive,
        "index": _index, "layer": _flag, "parent": _text_or_none, "layer_map": _ranges, "cbt": _object_or_none,
        "meta": _object, "stats": _counts,
    },
    "file": {"name": _text, "size": _count, "mode": _count, "mtime_ns": _integer, "chunks": _texts},
}  # fmt: skip


def _shape_problem(doc: Any) -> str | None:
    """What is wrong with the shape of manifest ``doc``; None when nothing is."""

    def fields(what: str, record: Any) -> str | None:
        if not _object(record):
            return f"a {what} record is a {type(record).__name__}, not an object"
        for name, ok in _FIELDS[what].items():
            if name in record and not ok(record[name]):
                return f"the {what} field {name!r} holds {_describe(record[name])}"
        return None

    problem = fields("snapshot", doc)
    if problem is not None:
        return problem
    for what, key in (("disk", "disks"), ("file", "files")):
        records = doc.get(key, [])
        if type(records) is not list:
            return f"{key!r} is a {type(records).__name__}, not a list"
        for record in records:
            problem = fields(what, record)
            if problem is not None:
                return problem
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"


def _record_dict(record: DiskRecord | FileRecord, ids: str) -> dict[str, Any]:
    """A record as a dict; its list of ids (strings and None, immutable) is copied shallowly."""
    out = {f.name: copy.deepcopy(getattr(record, f.name)) for f in dataclasses.fields(record) if f.name != ids}
    out[ids] = list(getattr(record, ids))
    return out

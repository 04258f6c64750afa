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
from dataclasses import dataclass, field
from typing import Any

from vmvault.errors import IntegrityError

__all__ = ["DiskRecord", "FileRecord", "Snapshot"]

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
    def from_dict(cls, doc: dict[str, Any], *, snapshot_id: str = "") -> Snapshot:
        try:
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


def _record_dict(record: DiskRecord | FileRecord, ids: str) -> dict[str, Any]:
    """A record as a dict; its list of ids (strings and None, immutable) is copied shallowly."""
    out = {f.name: copy.deepcopy(getattr(record, f.name)) for f in dataclasses.fields(record) if f.name != ids}
    out[ids] = list(getattr(record, ids))
    return out

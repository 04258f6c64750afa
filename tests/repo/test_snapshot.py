"""Snapshot manifests as read (vmvault.repo.snapshot): every field this reader knows has its
type, or the manifest is unreadable (``IntegrityError``), never a failure wherever the field
is used later. A manifest is written by whoever can write the repository: any host holding
the key, or anyone with write access to an unencrypted one."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from vmvault.errors import IntegrityError
from vmvault.repo.snapshot import Snapshot

ID = "ab" * 32
#: a manifest as backups write it, with a layer map of each generation
GOOD: dict[str, Any] = {
    "time": "2026-12-07T11:04:03.849205+00:00",
    "hostname": "hv01",
    "username": "root",
    "source": {"kind": "qemu", "location": "qemu:///web01"},
    "tags": ["nightly"],
    "parent": "cd" * 32,
    "vm": {"name": "web01", "uuid": "0f0e", "disks": [{"device": "vda"}]},
    "consistency": "crash",
    "warnings": ["a warning"],
    "disks": [
        {
            "name": "vda.qcow2", "format": "qcow2", "size": 1 << 30, "chunk_size": 1 << 18, "index_span": 4096,
            "index": ["ef" * 32, None], "layer": False, "parent": None, "layer_map": None,
            "cbt": {"bitmap": "vmvault-1"}, "meta": {"mode": 420}, "stats": {"bytes_read": 5, "incremental": 1},
        },
        {
            "name": "vda-top.qcow2", "format": "qcow2", "size": 1 << 30, "chunk_size": 1 << 18, "index_span": 4096,
            "index": ["ef" * 32], "layer": True, "parent": "vda.qcow2", "layer_map": [[0, 65536, 1], [65536, 512]],
            "cbt": None, "meta": {}, "stats": {},
        },
    ],
    "files": [{"name": "web01.xml", "size": 3, "mode": 0o644, "mtime_ns": -5, "chunks": ["01" * 32]}],
    "extra": {"anything": [1, "two"]},
    "stats": {"bytes_added": 7, "excluded": ["x"]},
    "program": "vmvault 1.0",
    "file_owners": {"web01.xml": [0, 107]},
}  # fmt: skip


def test_a_manifest_of_the_right_shape_loads_whole() -> None:
    snap = Snapshot.from_dict(copy.deepcopy(GOOD), snapshot_id=ID)
    assert snap.to_dict() == GOOD
    assert snap.disks[1].layer_map == [[0, 65536, 1], [65536, 512]]
    # fields a newer writer added are left alone; missing ones with defaults take them
    newer = {k: v for k, v in GOOD.items() if k not in ("tags", "vm", "file_owners")} | {"future": {"x": 1}}
    assert Snapshot.from_dict(copy.deepcopy(newer), snapshot_id=ID).tags == []


@pytest.mark.parametrize(
    ("where", "value", "says"),
    [
        ((), [], "a snapshot record is list [], not an object"),
        (("time",), "yesterday", "'time' holds str 'yesterday'"),
        (("time",), 1733560000, "'time' holds int"),
        (("source",), 1.5, "'source' holds float"),
        (("source", "location"), ["/etc"], "'source' holds dict"),
        (("tags",), "nightly", "'tags' holds str"),
        (("warnings",), [None], "'warnings'"),
        (("parent",), 5, "'parent' holds int"),
        (("vm",), "web01", "'vm' holds str"),
        (("file_owners", "web01.xml"), [0], "'file_owners'"),
        (("disks",), {}, "the snapshot field 'disks' holds dict {}"),
        (("disks", 0), "vda", "a disk record is str 'vda', not an object"),
        (("disks", 0, "size"), -1, "the disk field 'size' holds int -1"),
        (("disks", 0, "size"), True, "the disk field 'size' holds bool True"),
        (("disks", 0, "size"), 1 << 64, "the disk field 'size'"),
        (("disks", 0, "chunk_size"), 0, "the disk field 'chunk_size'"),
        (("disks", 0, "index_span"), "4096", "the disk field 'index_span'"),
        (("disks", 0, "index"), [5], "the disk field 'index'"),
        (("disks", 0, "layer"), 1, "the disk field 'layer' holds int 1"),
        (("disks", 0, "layer_map"), [[1]], "the disk field 'layer_map'"),
        (("disks", 0, "stats", "bytes_read"), "12", "the disk field 'stats'"),
        (("disks", 0, "meta"), [], "the disk field 'meta'"),
        (("files", 0, "chunks"), None, "the file field 'chunks' holds NoneType None"),
        (("files", 0, "mtime_ns"), 1.5, "the file field 'mtime_ns' holds float 1.5"),
        (("files", 0, "mode"), -1, "the file field 'mode'"),
    ],
)
def test_a_field_of_the_wrong_type_makes_the_manifest_unreadable(
    where: tuple[str | int, ...], value: object, says: str
) -> None:
    """Before, these loaded and failed later, each as a traceback: ``show`` (``abs()`` of a
    list), ``stats`` and ``forget`` (a float's ``.get``), ``ls`` (a time that is none),
    restore of sizes past any file's."""
    doc: Any = copy.deepcopy(GOOD)
    if where:
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        parent[where[-1]] = value
    else:
        doc = value
    with pytest.raises(IntegrityError, match=r"^snapshot abababab: unreadable manifest: ") as info:
        Snapshot.from_dict(doc, snapshot_id=ID)
    assert says in str(info.value)
    assert info.value.object_id == ID

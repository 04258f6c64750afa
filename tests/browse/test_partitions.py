"""MBR and GPT parsing: against sfdisk's own reading of the tables it wrote, and hostile tables."""

from __future__ import annotations

import json
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fsimages import MiB, Part, partitioned_disk, run
from vmvault.browse import read_partition_table
from vmvault.browse.partitions import PartitionTable
from vmvault.errors import GuestError


def _reader(data: bytes | bytearray) -> Callable[[int, int], bytes]:
    blob = bytes(data)
    return lambda off, length: blob[off : off + length]


def _table(path: Path) -> PartitionTable:
    data = path.read_bytes()
    return read_partition_table(_reader(data), len(data))


def _sfdisk(path: Path) -> list[dict[str, object]]:
    parts: list[dict[str, object]] = json.loads(run("sfdisk", "--json", path))["partitiontable"]["partitions"]
    return parts


def _node_number(node: object) -> int:
    text = str(node)
    digits = len(text) - len(text.rstrip("0123456789"))
    return int(text[-digits:])


@pytest.mark.parametrize("scheme", ["dos", "gpt"])
def test_tables_read_as_sfdisk_reads_them(tmp_path: Path, scheme: str) -> None:
    types = ["83", "7", "c"] if scheme == "dos" else ["linux", "uefi", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"]
    parts = [Part(None, t, size=(i + 2) * MiB) for i, t in enumerate(types)]
    disk = partitioned_disk(tmp_path / "d.img", 64 * MiB, scheme, parts)
    table = _table(disk)
    assert table.scheme == ("mbr" if scheme == "dos" else "gpt")
    assert table.notes == ()
    oracle = _sfdisk(disk)
    assert [(p.number, p.offset, p.size) for p in table.partitions] == [
        (_node_number(o["node"]), int(str(o["start"])) * 512, int(str(o["size"])) * 512) for o in oracle
    ]
    if scheme == "gpt":
        assert [p.type_name for p in table.partitions] == ["Linux filesystem", "EFI System", "Microsoft basic data"]
        assert table.disk_guid
    else:
        assert [p.type for p in table.partitions] == ["0x83", "0x07", "0x0c"]


def test_logical_partitions_are_numbered_from_5(tmp_path: Path) -> None:
    parts = [Part(None, "83", size=2 * MiB), Part(None, "83", size=3 * MiB), Part(None, "7", size=4 * MiB)]
    disk = partitioned_disk(tmp_path / "d.img", 32 * MiB, "dos", parts, logical_from=1)
    table = _table(disk)
    oracle = [o for o in _sfdisk(disk) if o["type"] != "5"]
    assert [p.number for p in table.partitions] == [1, 5, 6]
    assert [(p.offset, p.size) for p in table.partitions] == [
        (int(str(o["start"])) * 512, int(str(o["size"])) * 512) for o in oracle
    ]


def test_a_disk_without_a_table_and_a_filesystem_boot_sector_are_no_table() -> None:
    assert read_partition_table(_reader(bytes(4096)), 4096).scheme == "none"
    boot = bytearray(4096)
    boot[3:11] = b"NTFS    "
    boot[510:512] = b"\x55\xaa"
    assert read_partition_table(_reader(boot), 4096).scheme == "none"
    fat = bytearray(4096)
    fat[82:90] = b"FAT32   "
    fat[510:512] = b"\x55\xaa"
    fat[446] = 0x12  # boot code where an MBR's status byte would be
    assert read_partition_table(_reader(fat), 4096).scheme == "none"
    assert read_partition_table(_reader(b""), 0).scheme == "none"


def _gpt_disk(tmp_path: Path) -> bytearray:
    disk = partitioned_disk(tmp_path / "g.img", 16 * MiB, "gpt", [Part(None, "linux", size=4 * MiB)])
    return bytearray(disk.read_bytes())


def test_a_damaged_primary_gpt_falls_back_to_the_backup(tmp_path: Path) -> None:
    data = _gpt_disk(tmp_path)
    good = read_partition_table(_reader(data), len(data))
    data[512 + 40] ^= 1  # first usable LBA: the header CRC no longer matches
    table = read_partition_table(_reader(data), len(data))
    assert table.partitions == good.partitions
    assert any("backup GPT header was used" in n for n in table.notes)
    data[512:1024] = bytes(512)  # primary header gone entirely
    assert read_partition_table(_reader(data), len(data)).partitions == good.partitions
    data[-512:] = bytes(512)  # and the backup too
    with pytest.raises(GuestError, match="neither GPT header"):
        read_partition_table(_reader(data), len(data))


def test_a_damaged_entry_array_is_an_error(tmp_path: Path) -> None:
    data = _gpt_disk(tmp_path)
    data[1024 + 40] ^= 1  # primary entry array
    table = read_partition_table(_reader(data), len(data))  # the backup's array is intact
    assert any("entry array CRC32" in n for n in table.notes)
    backup_array = len(data) - 512 - 128 * 128
    data[backup_array + 40] ^= 1
    with pytest.raises(GuestError, match=r"damaged GPT.*entry array CRC32.*entry array CRC32"):
        read_partition_table(_reader(data), len(data))


def _forge_gpt(data: bytearray, **fields: int) -> None:
    """Rewrite fields of the primary GPT header and fix its CRC (an attacker can do that)."""
    names = [
        "signature", "revision", "header_size", "crc", "reserved", "my_lba", "alt_lba", "first_usable",
        "last_usable", "guid", "entries_lba", "n_entries", "entry_size", "entries_crc",
    ]  # fmt: skip
    fmt = struct.Struct("<8sIIIIQQQQ16sQIII")
    values = dict(zip(names, fmt.unpack_from(data, 512), strict=True))
    values.update(fields)
    values["crc"] = 0
    raw = bytearray(fmt.pack(*values.values()))
    struct.pack_into("<I", raw, 16, zlib.crc32(raw))
    data[512 : 512 + 92] = raw


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_entries": 1 << 30}, "more than vmvault reads"),
        ({"entry_size": 100}, "not a multiple of 128"),
        ({"entries_lba": 1 << 50}, "outside the disk"),
        ({"header_size": 9000}, "header size"),
        ({"my_lba": 7}, "found at LBA 1"),
    ],
)
def test_forged_gpt_headers_are_bounded(tmp_path: Path, fields: dict[str, int], message: str) -> None:
    data = _gpt_disk(tmp_path)
    data[-512:] = bytes(512)  # no backup to fall back to
    _forge_gpt(data, **fields)
    with pytest.raises(GuestError, match=message):
        read_partition_table(_reader(data), len(data))


def test_entries_past_the_end_are_clipped_or_dropped_and_overlaps_noted() -> None:
    size = 8 * MiB
    mbr = bytearray(size)
    mbr[510:512] = b"\x55\xaa"

    def entry(slot: int, ptype: int, first: int, count: int) -> None:
        struct.pack_into("<B3sB3sII", mbr, 446 + 16 * slot, 0, b"", ptype, b"", first, count)

    entry(0, 0x83, 2048, 4096)
    entry(1, 0x83, 4096, 16384)  # overlaps 1 and runs past the end
    entry(2, 0x07, 1 << 31, 100)  # starts past the end
    entry(3, 0x0C, 0, 10)  # over the MBR itself
    table = read_partition_table(_reader(mbr), size)
    assert [p.number for p in table.partitions] == [1, 2]
    assert table.partitions[1].offset + table.partitions[1].size == size
    text = " ".join(table.notes)
    assert "partition 2 runs" in text and "partition 3 starts past the end" in text
    assert "partitions 1 and 2 overlap" in text and "partition 4 starts at sector 0" in text
    with pytest.raises(GuestError, match=r"no partition 3 .*partitions: 1, 2"):
        table.partition(3)


def test_a_looping_ebr_chain_stops() -> None:
    size = 8 * MiB
    disk = bytearray(size)
    disk[510:512] = b"\x55\xaa"
    struct.pack_into("<B3sB3sII", disk, 446, 0, b"", 0x05, b"", 2048, 8192)
    ebr = 2048 * 512
    disk[ebr + 510 : ebr + 512] = b"\x55\xaa"
    struct.pack_into("<B3sB3sII", disk, ebr + 446, 0, b"", 0x83, b"", 64, 100)
    struct.pack_into("<B3sB3sII", disk, ebr + 462, 0, b"", 0x05, b"", 0, 1)  # next EBR: relative 0
    table = read_partition_table(_reader(disk), size)
    assert [p.number for p in table.partitions] == [5]
    struct.pack_into("<B3sB3sII", disk, ebr + 462, 0, b"", 0x05, b"", 2048, 1)  # points at a second EBR...
    ebr2 = (2048 + 2048) * 512
    disk[ebr2 + 510 : ebr2 + 512] = b"\x55\xaa"
    struct.pack_into("<B3sB3sII", disk, ebr2 + 446, 0, b"", 0x83, b"", 64, 100)
    struct.pack_into("<B3sB3sII", disk, ebr2 + 462, 0, b"", 0x05, b"", 0 + 2048, 1)  # ...that points at itself
    table = read_partition_table(_reader(disk), size)
    assert [p.number for p in table.partitions] == [5, 6]
    assert any("loops" in n for n in table.notes)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_damage_never_escapes_the_disk_or_raises_anything_else(tmp_path: Path, data: st.DataObject) -> None:
    scheme = data.draw(st.sampled_from(["dos", "gpt"]))
    path = tmp_path / f"fuzz-{scheme}.img"
    if not path.exists():
        parts = [Part(None, "83" if scheme == "dos" else "linux", size=MiB)] * 2
        partitioned_disk(path, 4 * MiB, scheme, parts, logical_from=1 if scheme == "dos" else 0)
    disk = bytearray(path.read_bytes())
    size = data.draw(st.sampled_from([len(disk), len(disk) - 512, 3 * MiB, 40 * 512]))
    regions = [(0, 512), (512, 1024), (1024, 1024 + 128 * 128), (len(disk) - 512, len(disk)), (MiB, MiB + 4 * 512)]
    for _ in range(data.draw(st.integers(1, 12))):
        lo, hi = data.draw(st.sampled_from(regions))
        pos = data.draw(st.integers(lo, hi - 1))
        disk[pos] = data.draw(st.integers(0, 255))
    try:
        table = read_partition_table(_reader(disk[:size]), size)
    except GuestError:
        return
    for p in table.partitions:
        assert 0 < p.offset < size and p.size > 0 and p.offset + p.size <= size
        assert p.number >= 1


def test_gpt_names_and_types_come_from_the_entries(tmp_path: Path) -> None:
    data = _gpt_disk(tmp_path)
    entry = 1024
    name = "Données système".encode("utf-16-le")
    data[entry + 56 : entry + 56 + 72] = name + bytes(72 - len(name))
    data[entry : entry + 16] = uuid.UUID("e6d6d379-f507-44c2-a23c-238f2a3df928").bytes_le
    array = bytes(data[1024 : 1024 + 128 * 128])
    _forge_gpt(data, entries_crc=zlib.crc32(array))
    p = read_partition_table(_reader(data), len(data)).partitions[0]
    assert (p.name, p.type_name) == ("Données système", "Linux LVM")
    assert os.path.exists(tmp_path / "g.img")

"""Round trips and checks for every structure in the VHDX layout module."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from vmvault.disk import _vhdx_layout as L

guids = st.builds(uuid.UUID, int=st.integers(0, 2**128 - 1))
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(st.characters(min_codepoint=1, max_codepoint=0xD7FF), min_size=1, max_size=40)


def test_crc32c_check_value() -> None:
    assert L.crc32c(b"123456789") == 0xE3069283


def test_guid_bytes_match_the_spec_table() -> None:
    # Section 11 of the reference: on-disk bytes of two GUIDs.
    assert L.pack_guid(L.BAT_REGION_GUID).hex() == "6677c22d23f600429d64115e9bfd4a08"
    assert L.pack_guid(L.VHDX_LOCATOR_TYPE).hex() == "b7ef4ab09ed1814ab78925b8e9445913"


@given(guids)
def test_guid_round_trip(g: uuid.UUID) -> None:
    assert L.unpack_guid(L.pack_guid(g)) == g


@given(u32, u64)
def test_int_round_trips(a: int, b: int) -> None:
    assert L.unpack_u32(L.pack_u32(a)) == a
    assert L.unpack_u64(L.pack_u64(b)) == b


@given(st.text(max_size=200).filter(lambda s: "\0" not in s))
def test_file_identifier_round_trip(creator: str) -> None:
    raw = creator.encode("utf-16-le", errors="surrogatepass")
    assume(len(raw) <= 512 and not any(0xD800 <= ord(c) <= 0xDFFF for c in creator))
    assert L.FileIdentifier.unpack(L.FileIdentifier(creator).pack()) == L.FileIdentifier(creator)


def test_file_identifier_rejects_other_signature() -> None:
    with pytest.raises(ValueError, match="vhdxfile"):
        L.FileIdentifier.unpack(b"conectix" + bytes(512))


@given(u64, guids, guids, guids, u16, u16, u32, u64)
def test_header_round_trip(
    seq: int, a: uuid.UUID, b: uuid.UUID, c: uuid.UUID, lv: int, v: int, ll: int, lo: int
) -> None:
    h = L.Header(seq, a, b, c, lv, v, ll, lo)
    raw = h.pack()
    assert len(raw) == 4096
    assert L.Header.unpack(raw) == h


@given(st.integers(0, 4095), st.integers(1, 255))
def test_header_crc_catches_any_flip(pos: int, flip: int) -> None:
    raw = bytearray(L.Header(7, uuid.uuid4(), uuid.uuid4(), L.ZERO_GUID, 0, 1, L.MIB, L.MIB).pack())
    raw[pos] ^= flip
    with pytest.raises(ValueError):
        L.Header.unpack(bytes(raw))


region_entries = st.builds(L.RegionTableEntry, guids, u64, u32, st.booleans())


@given(st.lists(region_entries, max_size=40))
def test_region_table_round_trip(entries: list[L.RegionTableEntry]) -> None:
    t = L.RegionTable(tuple(entries))
    raw = t.pack()
    assert len(raw) == L.REGION_TABLE_SIZE
    assert L.RegionTable.unpack(raw) == t
    for e in entries:
        assert L.RegionTableEntry.unpack(e.pack()) == e


meta_entries = st.builds(L.MetadataTableEntry, guids, u32, u32, st.builds(L.MetadataFlags, st.integers(0, 7)))


@given(st.lists(meta_entries, max_size=40))
def test_metadata_table_round_trip(entries: list[L.MetadataTableEntry]) -> None:
    t = L.MetadataTable(tuple(entries))
    assert L.MetadataTable.unpack(t.pack()) == t
    for e in entries:
        assert L.MetadataTableEntry.unpack(e.pack()) == e


@given(u32, u32)
def test_file_parameters_round_trip(bs: int, flags: int) -> None:
    p = L.FileParameters(bs, flags)
    assert L.FileParameters.unpack(p.pack()) == p


@given(guids, st.dictionaries(text, text, max_size=8))
def test_parent_locator_round_trip(kind: uuid.UUID, kv: dict[str, str]) -> None:
    loc = L.ParentLocator(kind, tuple(kv.items()))
    assert L.ParentLocator.unpack(loc.pack()) == loc


def test_parent_locator_rejects_pointers_past_the_end() -> None:
    raw = bytearray(L.ParentLocator(L.VHDX_LOCATOR_TYPE, (("parent_linkage", "{x}"),)).pack())
    raw[20:24] = (len(raw) + 10).to_bytes(4, "little")
    with pytest.raises(ValueError, match="past the end"):
        L.ParentLocator.unpack(bytes(raw))


@given(st.integers(0, 7), st.integers(0, 2**44 - 1))
def test_bat_entry_round_trip(state: int, mib: int) -> None:
    entry = L.pack_bat_entry(state, mib * L.MIB)
    assert L.unpack_bat_entry(entry) == (state, mib * L.MIB)


def test_bat_geometry_matches_observed_files() -> None:
    # Reference section 7: Hyper-V .avhdx 8 GiB / 2 MiB -> 4096 payload + 2 SB entries.
    g = L.BatGeometry(8 << 30, 2 << 20, 512, True)
    assert (g.chunk_ratio, g.payload_blocks, g.total_entries) == (2048, 4096, 4098)
    assert g.bitmap_index(0) == 2048 and g.payload_index(2048) == 2049
    # Windows fixed 10 MiB / 2 MiB -> 5 entries.
    assert L.BatGeometry(10 << 20, 2 << 20, 512, False).total_entries == 5
    assert L.BatGeometry(1 << 30, 32 << 20, 4096, False).chunk_ratio == 1024


sector_data = st.binary(min_size=4096, max_size=4096)


@st.composite
def log_entries(draw: st.DrawFn) -> L.LogEntry:
    seq = draw(st.integers(1, 2**64 - 1))
    writes = draw(st.lists(st.tuples(st.integers(0, 2**40).map(lambda x: x * 4096), sector_data), max_size=4))
    zeros = draw(
        st.lists(
            st.tuples(st.integers(0, 2**40).map(lambda x: x * 4096), st.integers(0, 1000).map(lambda x: x * 4096)),
            max_size=3,
        )
    )
    return L.LogEntry.build(
        tail=draw(st.integers(0, 255)) * 4096,
        sequence_number=seq,
        log_guid=draw(guids),
        flushed_file_offset=draw(u64),
        last_file_offset=draw(u64),
        writes=writes,
        zeros=zeros,
    )


@given(log_entries())
def test_log_entry_round_trip(entry: L.LogEntry) -> None:
    raw = entry.pack()
    assert len(raw) == entry.entry_length
    back = L.LogEntry.unpack(raw)
    assert back == entry
    header = L.LogEntryHeader.unpack(raw)
    assert L.LogEntryHeader.unpack(header.pack()) == header
    for d in entry.descriptors:
        assert L.unpack_descriptor(d.pack()) == d
    for s in entry.data_sectors:
        assert L.DataSector.unpack(s.pack()) == s
    sectors = [w for w in entry.target_writes()]
    assert all(len(data) == 4096 for _, data in sectors)


@given(log_entries(), st.data())
def test_log_entry_detects_any_flip(entry: L.LogEntry, data: st.DataObject) -> None:
    raw = bytearray(entry.pack())
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ValueError):
        L.LogEntry.unpack(bytes(raw))


def test_descriptor_sector_count() -> None:
    # 126 descriptors fit beside the 64-byte header; 17 descriptors -> 1 sector (reference section 9).
    assert L.descriptor_sectors(0) == 1
    assert L.descriptor_sectors(17) == 1
    assert L.descriptor_sectors(126) == 1
    assert L.descriptor_sectors(127) == 2

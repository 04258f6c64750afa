"""Sealed envelopes and every object built on them: round trips, and every byte flip is caught."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.repo.builders import Content, backup, disk_image, make_repo
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import IntegrityError
from vmvault.repo._layout import BlobType
from vmvault.repo.crypto import MasterKey, open_envelope, seal_envelope
from vmvault.repo.index import IndexFile
from vmvault.repo.pack import BlobEntry, PackBuilder, open_blob, parse_pack_header, seal_blob

KEYS = {"encrypted": MasterKey.generate(), "plain": MasterKey.unencrypted()}
keys = st.sampled_from(sorted(KEYS)).map(KEYS.__getitem__)
payloads = st.one_of(
    st.binary(max_size=2000), st.builds(lambda n, b: b * n, st.integers(0, 3000), st.binary(min_size=1, max_size=3))
)


@settings(max_examples=300, deadline=None)
@given(keys, payloads, st.binary(max_size=40), st.booleans())
def test_envelope_round_trip(key: MasterKey, payload: bytes, aad: bytes, compress: bool) -> None:
    sealed = seal_envelope(key, payload, aad, compress=compress)
    assert open_envelope(key, sealed, aad, what="x") == payload


@settings(max_examples=500, deadline=None)
@given(keys, payloads, st.data())
def test_any_byte_flip_of_an_envelope_is_an_integrity_error(
    key: MasterKey, payload: bytes, data: st.DataObject
) -> None:
    sealed = bytearray(seal_envelope(key, payload, b"aad"))
    pos = data.draw(st.integers(0, len(sealed) - 1), label="pos")
    sealed[pos] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(IntegrityError):
        open_envelope(key, bytes(sealed), b"aad", what="x")


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_every_single_bit_flip_of_one_envelope(kind: str) -> None:
    key = KEYS[kind]
    sealed = seal_envelope(key, b"vmvault " * 40, b"aad")  # compressible: the zstd path
    for pos in range(len(sealed)):
        for bit in range(8):
            bad = bytearray(sealed)
            bad[pos] ^= 1 << bit
            with pytest.raises(IntegrityError):
                open_envelope(key, bytes(bad), b"aad", what="x")


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_wrong_aad_wrong_key_and_truncation(kind: str) -> None:
    key = KEYS[kind]
    sealed = seal_envelope(key, b"payload", b"chunk A")
    with pytest.raises(IntegrityError):
        open_envelope(key, sealed, b"chunk B", what="x")
    for cut in range(len(sealed)):
        with pytest.raises(IntegrityError):
            open_envelope(key, sealed[:cut], b"chunk A", what="x")
    if key.encrypted:
        with pytest.raises(IntegrityError):
            open_envelope(MasterKey.generate(), sealed, b"chunk A", what="x")


@settings(max_examples=200, deadline=None)
@given(keys, st.binary(max_size=5000))
def test_blob_round_trip_and_id_binding(key: MasterKey, data: bytes) -> None:
    blob_id = key.chunk_id(data)
    sealed = seal_blob(key, BlobType.DATA, blob_id, data)
    assert open_blob(key, BlobType.DATA, blob_id, sealed) == data
    with pytest.raises(IntegrityError):  # the same bytes under another type
        open_blob(key, BlobType.INDEX, blob_id, sealed)
    other = hashlib.sha256(blob_id).digest()
    with pytest.raises(IntegrityError):  # ... or another id
        open_blob(key, BlobType.DATA, other, sealed)


def test_keyed_ids_differ_from_plain_sha256() -> None:
    data = b"secret content"
    assert MasterKey.unencrypted().chunk_id(data) == hashlib.sha256(data).digest()
    assert MasterKey.generate().chunk_id(data) != hashlib.sha256(data).digest()


def build_pack(key: MasterKey, blobs: list[bytes]) -> tuple[bytes, bytes]:
    builder = PackBuilder()
    for b in blobs:
        builder.add(BlobType.DATA, key.chunk_id(b), seal_blob(key, BlobType.DATA, key.chunk_id(b), b), len(b))
    return builder.finish(key)


def read_whole_pack(key: MasterKey, data: bytes) -> list[bytes]:
    return [
        open_blob(key, e.type, e.id, data[e.offset : e.offset + e.length])
        for e in parse_pack_header(key, data, name="p")
    ]


@settings(max_examples=100, deadline=None)
@given(keys, st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=6, unique=True))
def test_pack_round_trip(key: MasterKey, blobs: list[bytes]) -> None:
    pack_id, data = build_pack(key, blobs)
    assert pack_id == hashlib.sha256(data).digest()
    assert read_whole_pack(key, data) == blobs


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_every_byte_flip_of_a_pack_is_caught_and_never_returns_wrong_data(kind: str) -> None:
    key = KEYS[kind]
    blobs = [b"alpha" * 30, bytes(range(200)), b"gamma"]
    _pack_id, data = build_pack(key, blobs)
    entries = parse_pack_header(key, data, name="p")
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            read_whole_pack(key, bytes(bad))
        # reading any one blob through the (intact) index: its own data, or an IntegrityError
        for e, expected in zip(entries, blobs, strict=True):
            try:
                got = open_blob(key, e.type, e.id, bytes(bad[e.offset : e.offset + e.length]))
            except IntegrityError:
                assert e.offset <= pos < e.offset + e.length
            else:
                assert got == expected


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.binary(min_size=32, max_size=32),
        st.lists(
            st.builds(
                BlobEntry,
                st.sampled_from(list(BlobType)),
                st.binary(min_size=32, max_size=32),
                st.integers(0, 2**32 - 1),
                st.integers(0, 2**32 - 1),
                st.integers(0, 2**32 - 1),
            ),
            max_size=4,
        ),
        max_size=4,
    ),
    st.lists(st.binary(min_size=32, max_size=32), max_size=3),
)
def test_index_file_encode_decode(packs: dict[bytes, list[BlobEntry]], supersedes: list[bytes]) -> None:
    f = IndexFile(packs=packs, supersedes=supersedes)
    back = IndexFile.decode(f.encode(), name="i")
    assert back.packs == packs and back.supersedes == supersedes


@pytest.mark.parametrize("encrypted", [True, False])
def test_every_byte_flip_of_stored_index_file_and_snapshot(encrypted: bool) -> None:
    repo = make_repo(MemoryBackend(), encrypted=encrypted)
    snap = backup(repo, Content(disks={"d": disk_image(3, 6)}, files={"f": b"x" * 10}))
    objects = [o.name for o in repo.backend.list("index/")] + [f"snapshots/{snap.id}"]
    for name in objects:
        good = repo.backend.get(name)
        for pos in range(len(good)):
            bad = bytearray(good)
            bad[pos] ^= 0x80
            repo.backend.put(name, bytes(bad))
            with pytest.raises(IntegrityError):
                if name.startswith("index/"):
                    repo.read_index_file(bytes.fromhex(name.removeprefix("index/")))
                else:
                    repo.load_snapshot(snap.id)
        repo.backend.put(name, good)
    assert repo.load_snapshot(snap.id).disks[0].size == 6 * 4096


def test_object_swapped_under_another_name_is_caught() -> None:
    repo = make_repo(MemoryBackend())
    a = backup(repo, Content(files={"a": b"a"}))
    b = backup(repo, Content(files={"b": b"b"}))
    repo.backend.put(f"snapshots/{a.id}", repo.backend.get(f"snapshots/{b.id}"))
    with pytest.raises(IntegrityError, match="does not match its name"):
        repo.load_snapshot(a.id)

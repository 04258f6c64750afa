"""Sealed envelopes and every object built on them: round trips, and every byte flip is caught."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import random
import threading
import time
from collections.abc import Iterator

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.repo.builders import Content, backup, disk_image, make_repo
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import IntegrityError
from vmvault.repo import crypto
from vmvault.repo._layout import ENVELOPE_HEADER, ENVELOPE_VERSION, TAG_SIZE
from vmvault.repo.crypto import (
    BLAKE3,
    HMAC_SHA256,
    MasterKey,
    blake3_id_key,
    open_envelope,
    seal_envelope,
    seal_envelope_parts,
)
from vmvault.repo.format import BlobType
from vmvault.repo.index import IndexFile
from vmvault.repo.pack import BlobEntry, PackBuilder, open_blob, parse_pack_header, seal_blob

KEYS = {
    "encrypted": MasterKey.generate(),
    "plain": MasterKey.unencrypted(),
    "encrypted-blake3": MasterKey.generate().with_id_function(BLAKE3),
    "plain-blake3": MasterKey.unencrypted().with_id_function(BLAKE3),
}
keys = st.sampled_from(sorted(KEYS)).map(KEYS.__getitem__)
payloads = st.one_of(
    st.binary(max_size=2000), st.builds(lambda n, b: b * n, st.integers(0, 3000), st.binary(min_size=1, max_size=3))
)


@pytest.mark.parametrize("compress", [False, True])
def test_sealing_into_a_buffer_writes_the_same_envelope_as_encrypting_then_joining(
    monkeypatch: pytest.MonkeyPatch, compress: bool
) -> None:
    """Both ways of building an encrypted envelope (``encrypt_into`` where cryptography has
    it, else ``header + encrypt``) give the same bytes, and it opens from bytes and views."""
    key = KEYS["encrypted"]
    payload = b"disk sector " * 30_000 + bytes(range(256)) * 40
    monkeypatch.setattr(crypto.os, "urandom", lambda n: b"\x07" * n)
    made = {}
    for into in (False, True):
        if into and not hasattr(crypto.AESGCM, "encrypt_into"):
            pytest.skip("this cryptography has no encrypt_into (before 47): only the join is used")
        monkeypatch.setattr(crypto, "_ENCRYPT_INTO", into)
        made[into] = seal_envelope(key, payload, b"aad", compress=compress)
        assert type(made[into]) is bytes
    assert made[True] == made[False]
    sealed = made[True]
    for form in (sealed, memoryview(sealed), memoryview(b"junk" + sealed)[4:]):
        assert open_envelope(key, form, b"aad", what="x") == payload
    flipped = bytearray(sealed)
    flipped[len(sealed) // 2] ^= 1
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_envelope(key, memoryview(flipped), b"aad", what="x")


@settings(max_examples=300, deadline=None)
@given(keys, payloads, st.binary(max_size=40), st.booleans())
def test_envelope_round_trip(key: MasterKey, payload: bytes, aad: bytes, compress: bool) -> None:
    sealed = seal_envelope(key, payload, aad, compress=compress)
    assert open_envelope(key, sealed, aad, what="x") == payload


@settings(max_examples=300, deadline=None)
@given(keys, payloads, st.binary(max_size=40))
def test_envelope_parts_join_into_the_envelope(key: MasterKey, payload: bytes, aad: bytes) -> None:
    """``seal_envelope_parts`` (a pack's blobs): the header and the sealed body, whose
    concatenation is the envelope ``seal_envelope`` makes with the same nonce."""
    header, body = seal_envelope_parts(key, payload, aad)
    assert type(header) is bytes and type(body) is bytes
    assert len(header) == ENVELOPE_HEADER.size
    assert open_envelope(key, header + body, aad, what="x") == payload
    nonce = header[-12:]
    with _fixed_urandom(nonce):
        assert seal_envelope(key, payload, aad) == header + body


@contextlib.contextmanager
def _fixed_urandom(value: bytes) -> Iterator[None]:
    real = crypto.os.urandom
    crypto.os.urandom = lambda n: value[:n]  # type: ignore[assignment]
    try:
        yield
    finally:
        crypto.os.urandom = real  # type: ignore[assignment]


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


def _authentic(key: MasterKey, flags: int, body: bytes, aad: bytes) -> bytes:
    """An envelope as a writer with the key seals it, with any flags (seal_envelope sets only ZSTD)."""
    nonce = bytes(range(12))
    header = ENVELOPE_HEADER.pack(ENVELOPE_VERSION, flags, 0, nonce if key.encrypted else bytes(12))
    if key.enc_key is None:
        return header + body + hashlib.sha256(aad + header + body).digest()[:TAG_SIZE]
    return header + AESGCM(key.enc_key).encrypt(nonce, body, aad + header)


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("flags", [0x02, 0x03, 0x80, 0xFF])
def test_an_authentic_envelope_with_a_flag_this_reader_does_not_know_is_refused(kind: str, flags: int) -> None:
    """repository-format.md: every flag bit but ZSTD MUST be 0 (a later flag may change what
    the body means); with ZSTD set or not."""
    key = KEYS[kind]
    payload = b"vmvault " * 40
    body = zstandard.ZstdCompressor().compress(payload) if flags & 1 else payload
    assert open_envelope(key, _authentic(key, flags & 1, body, b"aad"), b"aad", what="x") == payload
    with pytest.raises(IntegrityError, match=f"x: unknown envelope flags {flags:#x}"):
        open_envelope(key, _authentic(key, flags, body, b"aad"), b"aad", what="x")


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


# ---- chunk id functions (repository-format.md, sections 3 and 6) --------------------------

#: BLAKE3's own test vectors (test_vectors/test_vectors.json of the BLAKE3 specification's
#: repository): the input is the bytes 0, 1, ..., 250 repeated to ``input_len``; keyed_hash uses
#: the key below; the first 32 bytes of each output are the default-length digest
SPEC_KEY = b"whats the Elvish word for friend"
SPEC_VECTORS = [
    # input_len, hash, keyed_hash
    (
        0,
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
        "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26",
    ),
    (
        1,
        "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
        "6d7878dfff2f485635d39013278ae14f1454b8c0a3a2d34bc1ab38228a80c95b",
    ),
    (
        1024,
        "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7",
        "75c46f6f3d9eb4f55ecaaee480db732e6c2105546f1e675003687c31719c7ba4",
    ),
    (
        1025,
        "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444",
        "357dc55de0c7e382c900fd6e320acc04146be01db6a8ce7210b7189bd664ea69",
    ),
    (
        4097,
        "9b4052b38f1c5fc8b1f9ff7ac7b27cd242487b3d890d15c96a1c25b8aa0fb995",
        "00df940cd36bb9fa7cbbc3556744e0dbc8191401afe70520ba292ee3ca80abbc",
    ),
]


def spec_input(length: int) -> bytes:
    return bytes(i % 251 for i in range(length))


@pytest.mark.parametrize(("length", "plain", "keyed"), SPEC_VECTORS, ids=[str(v[0]) for v in SPEC_VECTORS])
def test_blake3_ids_match_the_specifications_test_vectors(length: int, plain: str, keyed: str) -> None:
    """The primitive as chunk_id calls it: keyed (an encrypted repository, here with the
    specification's key in place of the derived one) and unkeyed (an unencrypted repository),
    from bytes and from a view of a larger buffer (how the backup hands its batches over)."""
    data = spec_input(length)
    keyed_key = MasterKey(None, None, id_function=BLAKE3, blake3_key=SPEC_KEY)
    unkeyed = MasterKey.unencrypted().with_id_function(BLAKE3)
    view = memoryview(bytearray(b"x" * 7 + data + b"y" * 9))[7 : 7 + length]
    for buffer in (data, view):
        assert keyed_key.chunk_id(buffer).hex() == keyed
        assert unkeyed.chunk_id(buffer).hex() == plain


#: vmvault's derivation pinned: for the master key bytes 0..63 (enc_key 0..31, id_key 32..63),
#: the keyed-BLAKE3 id key and the ids of the 1025-byte specification input and of nothing
FIXED_MASTER = bytes(range(64))
FIXED_BLAKE3_KEY = "45a48bd834271cba69de6407e8011e4de7bca37ead7c7129ab0dc2d37deab40e"
FIXED_ID_1025 = "18d4fa5917047c4d074b1a692037d76d1734ad05f5a43e0b2c67e46049e6eb60"
FIXED_ID_EMPTY = "8239c3f034df229b059754215b8b38cffea3c43d57e508b3bb5f77024cb8b575"


def test_a_fixed_repository_key_gives_fixed_blake3_ids() -> None:
    key = MasterKey.from_bytes(FIXED_MASTER).with_id_function(BLAKE3)
    assert blake3_id_key(FIXED_MASTER[32:]).hex() == FIXED_BLAKE3_KEY
    assert key.blake3_key is not None and key.blake3_key.hex() == FIXED_BLAKE3_KEY
    assert key.chunk_id(spec_input(1025)).hex() == FIXED_ID_1025
    assert key.chunk_id(b"").hex() == FIXED_ID_EMPTY
    # the same master key under HMAC-SHA-256 ids: the id key itself, as before
    hmac_key = MasterKey.from_bytes(FIXED_MASTER)
    assert hmac_key.id_function == HMAC_SHA256
    assert hmac_key.chunk_id(b"") == hmac.digest(FIXED_MASTER[32:], b"", "sha256")
    assert hmac_key.with_id_function(HMAC_SHA256) == hmac_key


def test_the_blake3_id_key_is_none_of_the_other_keys_and_ids_differ_by_function() -> None:
    key = MasterKey.generate().with_id_function(BLAKE3)
    assert key.blake3_key not in (key.enc_key, key.id_key, None)
    assert "blake3_key" not in repr(key)
    data = b"secret content"
    ids = {
        key.chunk_id(data),
        key.with_id_function(HMAC_SHA256).chunk_id(data),
        MasterKey.unencrypted().with_id_function(BLAKE3).chunk_id(data),
        MasterKey.unencrypted().chunk_id(data),
        MasterKey.generate().with_id_function(BLAKE3).chunk_id(data),  # another repository
    }
    assert len(ids) == 5
    # the master key stored in keys/ is the same 64 bytes whatever the id function
    assert key.to_bytes() == key.with_id_function(HMAC_SHA256).to_bytes()
    with pytest.raises(ValueError, match="unknown chunk id function"):
        key.with_id_function("sha3-256")


def test_blake3_ids_let_other_threads_run_while_hashing() -> None:
    """The backup hashes in worker threads: BLAKE3 must let go of the interpreter lock while it
    hashes, as HMAC-SHA-256 does, or the workers hash one at a time. A thread hashes 128 MiB in
    one call while this one counts: holding the lock, it would let this thread count nothing
    during the call (``bytes.count``, which holds it, counts 0 here; BLAKE3 and HMAC-SHA-256
    thousands). Tried three times, so a busy machine cannot fail it."""
    key = MasterKey.generate().with_id_function(BLAKE3)
    data = bytes(128 << 20)
    for _attempt in range(3):
        span: list[float] = []

        def work(span: list[float] = span) -> None:
            span.append(time.perf_counter())
            key.chunk_id(data)
            span.append(time.perf_counter())

        seen: list[float] = []
        worker = threading.Thread(target=work)
        worker.start()
        while worker.is_alive():
            seen.append(time.perf_counter())
        worker.join()
        # the first half of the call only: a thread that held the lock through the call lets
        # this one run after it, before it notes the end
        start, end = span
        if sum(1 for t in seen if start < t < start + (end - start) / 2) > 10:
            return
    pytest.fail("no other thread ran while BLAKE3 hashed 128 MiB: it holds the interpreter lock")


def test_compressed_envelopes_opened_in_many_threads_at_once_each_get_their_own_plaintext() -> None:
    """A compressed body is decrypted into its thread's reused buffer: threads opening at once
    must never see each other's bytes, and what is returned must not change afterwards."""
    key = MasterKey.generate()
    payloads = [bytes([n]) * 50_000 + n.to_bytes(4, "little") * 1000 for n in range(64)]
    sealed = [seal_envelope(key, p, b"aad%d" % n) for n, p in enumerate(payloads)]
    assert all(s[1] & 1 for s in sealed), "compressible: the zstd path"
    wrong: list[int] = []
    kept: dict[int, bytes] = {}

    def work(offset: int) -> None:
        for i in range(200):
            n = (i + offset) % 64
            try:
                got = open_envelope(key, sealed[n], b"aad%d" % n, what="t")
            except IntegrityError:
                got = b""
            if got != payloads[n]:
                wrong.append(n)
            kept.setdefault(n, got)

    threads = [threading.Thread(target=work, args=(k * 7,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and all(kept[n] == payloads[n] for n in kept)


@pytest.mark.parametrize("into", [False, True])
def test_both_ways_of_opening_a_compressed_envelope_agree(monkeypatch: pytest.MonkeyPatch, into: bool) -> None:
    """``decrypt_into`` a reused buffer where cryptography has it (47 and later), else a fresh
    plaintext (the floor, 44): the same payload, and the same refusal of a damaged envelope."""
    if into and not hasattr(crypto.AESGCM, "decrypt_into"):
        pytest.skip("this cryptography has no decrypt_into (before 47): only the fallback is used")
    monkeypatch.setattr(crypto, "_DECRYPT_INTO", into)
    key = MasterKey.generate()
    payload = b"restore me " * 20_000
    sealed = seal_envelope(key, payload, b"aad")
    assert sealed[1] & 1, "compressible: the zstd path"
    assert open_envelope(key, memoryview(sealed), b"aad", what="t") == payload
    flipped = bytearray(sealed)
    flipped[-3] ^= 1
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_envelope(key, bytes(flipped), b"aad", what="t")


@pytest.mark.parametrize("size", [100, 3 << 20, (17 << 20) + 5])
def test_a_damaged_compressed_envelope_of_any_size_is_refused_and_the_next_opens(size: int) -> None:
    """The buffer a compressed body is decrypted into holds unauthenticated bytes when the tag
    does not match: they are never returned, and the next envelope opens as if nothing had been."""
    key = MasterKey.generate()
    payload = (b"vmvault " * (size // 8 + 1))[:size]
    sealed = bytearray(seal_envelope(key, payload, b"aad"))
    assert sealed[1] & 1
    good = bytes(sealed)
    sealed[len(sealed) // 2] ^= 0x10
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_envelope(key, bytes(sealed), b"aad", what="t")
    assert open_envelope(key, good, b"aad", what="t") == payload
    # a body larger than the reused buffer's bound gets a buffer of its own
    assert len(getattr(crypto._tls, "scratch", b"")) <= crypto._MAX_SCRATCH


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


def test_a_pack_of_envelope_parts_is_the_pack_of_the_envelopes() -> None:
    """Blobs added as ``seal_envelope_parts`` (the backup's workers) give the same pack bytes
    and entries as the same envelopes added whole."""
    key = KEYS["encrypted"]
    blobs = [b"chunk %d " % i * (i * 500 + 1) for i in range(5)]
    whole, parted = PackBuilder(), PackBuilder()
    for b in blobs:
        blob_id = key.chunk_id(b)
        header, body = seal_envelope_parts(key, b, b"aad")
        whole.add(BlobType.DATA, blob_id, header + body, len(b))
        parted.add(BlobType.DATA, blob_id, (header, body), len(b))
    assert parted.size == whole.size and parted.entries == whole.entries
    with _fixed_urandom(b"\x05" * 12):  # the pack header's nonce
        assert parted.finish(key) == whole.finish(key)


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


def test_a_threads_decryption_buffer_starts_at_what_it_needs_and_doubles() -> None:
    """A thread that opens only small envelopes (a copy's index block readers) holds 64 KiB
    for them, not the 1 MiB each held before; a larger body at least doubles the buffer, and
    one past ``_MAX_SCRATCH`` gets a buffer of its own."""
    if not crypto._DECRYPT_INTO:
        pytest.skip("this cryptography has no decrypt_into (before 47): no buffer is reused")
    key = MasterKey.generate()
    rnd = random.Random(5)
    lengths: list[tuple[int, int]] = []

    def run() -> None:
        for n in (1_000, 150_000, 400_000, 2_000_000, 40 << 20):
            # half random, half zeros: compressed, so opened through the thread's buffer
            payload = rnd.randbytes(n // 2) + bytes(n - n // 2)
            sealed = seal_envelope(key, payload, b"aad")
            assert sealed[1] & 1
            assert open_envelope(key, sealed, b"aad", what="t") == payload
            lengths.append((len(sealed), len(crypto._tls.scratch)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    (_, first), (s2, second), (s3, third), (s4, fourth), (_, last) = lengths
    assert first == crypto._MIN_SCRATCH
    assert second == 2 * crypto._MIN_SCRATCH and s2 < second
    # (a body is the sealed envelope less its header, nonce and tag)
    assert third == 2 * second > s3  # a 200 KB body: doubled
    assert s4 - TAG_SIZE - 32 <= fourth <= s4 and fourth > 2 * third  # a 1 MB body: what it needs
    assert last == fourth  # 20 MiB of body: a buffer of its own, the thread's kept

"""The index-block API (repo/index_block.py): decode, encode, build, store, read, resolve."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.repo.builders import CHUNK, make_repo
from vmvault.backends.memory import MemoryBackend
from vmvault.errors import IntegrityError
from vmvault.repo._limits import MAX_INDEX_SPAN
from vmvault.repo.format import (
    INDEX_SPAN,
    PARENT_ID,
    ZERO_ID,
    BlobType,
    ChunkResolver,
    IndexBlock,
    IndexBlockBuilder,
    block_length,
    chunk_count,
    is_chunk,
)
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

refs = st.one_of(st.just(ZERO_ID), st.just(PARENT_ID), st.binary(min_size=32, max_size=32))


@settings(max_examples=200, deadline=None)
@given(st.lists(refs, min_size=1, max_size=64))
def test_refs_survive_encode_and_decode(entries: list[bytes]) -> None:
    block = IndexBlock.from_refs(entries)
    raw = block.encode()
    assert raw == b"".join(entries)  # the documented layout: the refs, concatenated
    again = IndexBlock.decode(raw, count=len(entries))
    assert again == block and list(again) == entries and len(again) == len(entries)
    assert [again[i] for i in range(len(entries))] == entries and again[-1] == entries[-1]
    assert again[1:3] == entries[1:3]
    assert list(again.chunk_ids()) == [e for e in entries if e not in (ZERO_ID, PARENT_ID)]
    assert again.empty == all(e == ZERO_ID for e in entries)
    assert again.defers == (PARENT_ID in entries)


def test_a_parent_id_across_two_entries_is_not_a_deferral() -> None:
    """``defers`` searches the bytes: 32 bytes of 0xff spanning two entries are no PARENT_ID."""
    half = b"\x01" * 16 + b"\xff" * 16, b"\xff" * 16 + b"\x02" * 16
    assert not IndexBlock.from_refs([*half, *half]).defers
    assert IndexBlock.from_refs([*half, PARENT_ID]).defers
    assert IndexBlock.from_refs([b"\xff" * 31 + b"\x00", PARENT_ID, ZERO_ID]).defers


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(
                st.one_of(
                    st.tuples(st.just("set"), st.integers(0, n - 1), st.lists(refs, min_size=1, max_size=4)),
                    st.tuples(st.just("fill"), st.integers(0, n), st.integers(0, n), refs),
                ),
                max_size=20,
            ),
        )
    )
)
def test_the_builder_does_what_a_list_of_refs_does(case: tuple[int, list[tuple[object, ...]]]) -> None:
    n, ops = case
    model = [ZERO_ID] * n
    builder = IndexBlockBuilder(n)
    for op in ops:
        if op[0] == "set":
            _, pos, new = op
            assert isinstance(pos, int) and isinstance(new, list)
            new = new[: n - pos]
            builder.set(pos, new)
            model[pos : pos + len(new)] = new
        else:
            _, a, b, ref = op
            assert isinstance(a, int) and isinstance(b, int) and isinstance(ref, bytes)
            first, end = min(a, b), max(a, b)
            builder.fill(first, end, ref)
            model[first:end] = [ref] * (end - first)
    assert len(builder) == n and [builder[i] for i in range(n)] == model
    assert list(builder.build()) == model
    assert list(IndexBlockBuilder.from_block(builder.build()).build()) == model


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"", None, "has 0 entries"),
        (bytes(31), None, "not a whole number of entries"),
        (bytes(65), None, "not a whole number of entries"),
        (bytes(32 * (MAX_INDEX_SPAN + 1)), None, f"has {MAX_INDEX_SPAN + 1} entries"),
        (bytes(64), 3, "has 2 entries, expected 3"),
        (bytes(96), 2, "has 3 entries, expected 2"),
    ],
)
def test_a_block_that_does_not_fit_the_grammar_is_an_integrity_error(
    raw: bytes, count: int | None, message: str
) -> None:
    with pytest.raises(IntegrityError, match=message):
        IndexBlock.decode(raw, count=count, what="index block x")


def test_refs_that_are_not_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        IndexBlock.from_refs([b"short"])
    with pytest.raises(ValueError):
        IndexBlock.from_refs([])
    builder = IndexBlockBuilder(4)
    with pytest.raises(ValueError):
        builder.set(0, [bytes(33)])
    with pytest.raises(ValueError):
        builder.fill(0, 2, "x" * 32)  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        builder.set(3, [ZERO_ID, ZERO_ID])
    with pytest.raises(IndexError):
        builder.fill(2, 5, ZERO_ID)
    with pytest.raises(ValueError):
        IndexBlockBuilder(0)
    with pytest.raises(ValueError):
        IndexBlockBuilder(MAX_INDEX_SPAN + 1)
    assert builder.build().empty  # nothing was changed by the refused calls


def test_geometry_of_a_disk_index() -> None:
    rec = DiskRecord(name="d", format="raw", size=10 * CHUNK + 1, chunk_size=CHUNK, index_span=4, index=[None] * 3)
    assert chunk_count(rec) == 11
    assert [block_length(rec, b) for b in range(4)] == [4, 4, 3, 0]
    assert INDEX_SPAN == 4096 and is_chunk(os.urandom(32)) and not is_chunk(ZERO_ID) and not is_chunk(PARENT_ID)
    for bad in (
        DiskRecord(name="d", format="raw", size=10, chunk_size=0, index_span=4, index=[]),
        DiskRecord(name="d", format="raw", size=10, chunk_size=CHUNK, index_span=0, index=[]),
        DiskRecord(name="d", format="raw", size=-1, chunk_size=CHUNK, index_span=4, index=[]),
        DiskRecord(name="d", format="raw", size=10, chunk_size="4096", index_span=4, index=[]),  # type: ignore[arg-type]
    ):
        with pytest.raises(IntegrityError, match="disk d"):
            chunk_count(bad)


def test_blocks_are_stored_and_read_through_the_repository() -> None:
    repo = make_repo(MemoryBackend())
    data_id = os.urandom(32)
    block = IndexBlock.from_refs([data_id, ZERO_ID, PARENT_ID])
    writer = repo.writer()
    ref = writer.add_index_block(block)
    assert ref == repo.index_block_ref(block) == repo.key.chunk_id(block.encode()).hex()
    assert writer.add_index_block(block) == ref  # stored once
    assert writer.add_index_block(IndexBlock.from_refs([ZERO_ID] * 5)) is None  # empty: never stored
    writer.close()
    assert writer.index_blocks_added == 1 and writer.new_blobs == 1
    assert repo.read_index_block(ref) == block
    assert repo.read_index_block(bytes.fromhex(ref), count=3) == block
    with pytest.raises(IntegrityError, match="has 3 entries, expected 4") as info:
        repo.read_index_block(ref, count=4)
    assert info.value.object_id == ref
    with pytest.raises(IntegrityError, match="not an id"):
        repo.read_index_block("zz" * 32)
    with pytest.raises(IntegrityError, match="not an id"):
        repo.read_index_block("ab" * 31)
    with pytest.raises(IntegrityError, match="missing from the repository index"):
        repo.read_index_block(os.urandom(32))


def test_a_stored_blob_that_is_no_block_is_refused_when_read_as_one() -> None:
    repo = make_repo(MemoryBackend())
    raw = os.urandom(40)  # authentic (written with the key), but 40 bytes: no whole entries
    block_id = repo.key.chunk_id(raw)
    writer = repo.writer()
    writer.add(BlobType.INDEX, block_id, raw)
    writer.close()
    with pytest.raises(IntegrityError, match="not a whole number of entries"):
        repo.read_index_block(block_id)


def _layered(repo: Repository) -> tuple[Snapshot, bytes]:
    """A base disk of 6 chunks (two index blocks) and a layer over it that stores chunks 1 and
    4 and zeros at 2, deferring elsewhere; and the layer's merged view."""
    chunks = [os.urandom(CHUNK) for _ in range(7)]
    ids = [repo.key.chunk_id(data) for data in chunks]
    writer = repo.writer()
    for chunk_id, data in zip(ids, chunks, strict=True):
        writer.add(BlobType.DATA, chunk_id, data)
    base_refs = [ids[0], ids[1], ids[2], ZERO_ID, ids[3], ids[4]]
    top_refs = [PARENT_ID, ids[5], ZERO_ID, PARENT_ID, ids[6], PARENT_ID]
    base = [writer.add_index_block(IndexBlock.from_refs(base_refs[i : i + 4])) for i in (0, 4)]
    top = [writer.add_index_block(IndexBlock.from_refs(top_refs[i : i + 4])) for i in (0, 4)]
    writer.close()
    size = 6 * CHUNK
    disks = [
        DiskRecord(name="base", format="raw", size=size, chunk_size=CHUNK, index_span=4, index=base),
        DiskRecord(
            name="top", format="raw", size=size, chunk_size=CHUNK, index_span=4, index=top, layer=True, parent="base"
        ),
    ]
    snap = Snapshot(time="t", hostname="h", username="u", source={}, disks=disks)
    merged = [chunks[0], chunks[5], bytes(CHUNK), bytes(CHUNK), chunks[6], chunks[4]]
    return snap, b"".join(merged)


def test_the_resolver_follows_parent_entries_through_the_layers() -> None:
    repo = make_repo(MemoryBackend())
    snap, merged = _layered(repo)
    top = snap.disks[1]
    resolver = ChunkResolver(repo, snap, top)
    ids = [resolver.chunk_id(k) for k in range(6)]
    assert b"".join(bytes(CHUNK) if c is None else resolver.fetch(c) for c in ids) == merged
    assert resolver.resolve(top, 0, flatten=False) == PARENT_ID
    assert [e for _, e in resolver.entries(flatten=False)] == list(repo.read_index_block(top.index[0] or "")) + list(
        repo.read_index_block(top.index[1] or "")
    )
    flat = dict(resolver.entries(flatten=True))
    assert PARENT_ID not in flat.values() and [flat[k] if is_chunk(flat[k]) else None for k in range(6)] == ids


def test_the_resolver_refuses_what_does_not_fit_the_disk() -> None:
    repo = make_repo(MemoryBackend())
    snap, _ = _layered(repo)
    base = snap.disks[0]
    short = DiskRecord(
        name="short", format="raw", size=9 * CHUNK, chunk_size=CHUNK, index_span=4, index=[base.index[0], base.index[1]]
    )
    snap.disks.append(short)
    resolver = ChunkResolver(repo, snap, short)
    with pytest.raises(IntegrityError, match="disk short has 2 index blocks; block 2 is needed"):
        resolver.chunk_id(8)
    with pytest.raises(IntegrityError, match="has 2 entries, expected 4"):
        resolver.chunk_id(4)  # the base's second block holds 2 entries, this disk needs 4 there
    # a layer whose parent is missing or forms a cycle reads as zeros where it defers
    loop = DiskRecord(
        name="loop", format="raw", size=6 * CHUNK, chunk_size=CHUNK, index_span=4, index=snap.disks[1].index,
        layer=True, parent="loop",
    )  # fmt: skip
    snap.disks.append(loop)
    assert ChunkResolver(repo, snap, loop).chunk_id(0) is None

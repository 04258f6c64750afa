"""IndexFileWriter: the new index files prune and repair write (repository-format.md, 12.5)."""

from __future__ import annotations

import os

import pytest

from tests.repo.builders import make_repo
from vmvault.backends.memory import MemoryBackend
from vmvault.repo._layout import BlobType
from vmvault.repo.index import MAX_V2_PAYLOAD, IndexFile, encode_index, encode_pack_record, parse_index
from vmvault.repo.pack import BlobEntry
from vmvault.repo.rewrite import REWRITE_LIMIT, IndexFileWriter


def _pack(n: int) -> tuple[bytes, list[BlobEntry]]:
    return os.urandom(32), [BlobEntry(BlobType.DATA, os.urandom(32), i * 100, 100, 90) for i in range(n)]


@pytest.mark.parametrize("version", [1, 2])
def test_encoded_records_are_the_index_file_encoding(version: int) -> None:
    packs = dict(_pack(n) for n in (0, 1, 7))
    lengths = {p: 1000 + i for i, p in enumerate(packs)}
    supersedes = [os.urandom(32), os.urandom(32)]
    whole = IndexFile(packs=packs, supersedes=supersedes, lengths=lengths, version=version)
    records = [encode_pack_record(version, p, e, lengths[p]) for p, e in packs.items()]
    assert encode_index(version, supersedes, records) == whole.encode()
    parsed = parse_index(whole.encode(), name="x")
    assert [r.pack_id for r in parsed.records] == list(packs) and parsed.supersedes == supersedes
    with pytest.raises(ValueError):
        encode_pack_record(3, *_pack(1))


def test_files_are_split_at_the_limit_and_the_last_supersedes() -> None:
    repo = make_repo(MemoryBackend())
    old = [repo.write_index_file(IndexFile(packs=dict([_pack(2)]), version=repo.index_version)) for _ in range(3)]
    writer = IndexFileWriter(repo, limit=4096)
    packs = dict(_pack(10) for _ in range(40))  # 40 + 450 bytes a pack: 8 a file
    for pack_id, entries in packs.items():
        writer.add(pack_id, entries, 5000)
        writer.add(pack_id, entries, 5000)  # listed once, also when its file is full
    assert writer.packs == 40
    superseded = writer.finish([*old, b"\0" * 32], keep=[old[0]], before=lambda: None)
    assert superseded == sorted([old[1], old[2], b"\0" * 32])
    listed: dict[bytes, list[BlobEntry]] = {}
    for n, file_id in enumerate(writer.written):
        payload = repo.read_index_payload(file_id)
        assert len(payload) <= 4096
        parsed = parse_index(payload, name=file_id.hex())
        assert parsed.supersedes == (superseded if n == len(writer.written) - 1 else [])
        for rec in parsed.records:
            assert rec.pack_id not in listed and rec.length == 5000
            listed[rec.pack_id] = rec.entries()
    assert listed == packs and len(writer.written) == 5


def test_nothing_to_supersede_writes_only_what_is_held() -> None:
    repo = make_repo(MemoryBackend())
    writer = IndexFileWriter(repo)
    called = []
    assert writer.finish([], before=lambda: called.append(1)) == [] and writer.written == [] and not called
    writer.add(*_pack(3))
    assert writer.finish([], before=lambda: called.append(1)) == [] and len(writer.written) == 1 and not called
    # a superseding file with no pack of its own
    empty = IndexFileWriter(repo)
    assert empty.finish(writer.written, keep=[], before=lambda: called.append(1)) == writer.written
    parsed = parse_index(repo.read_index_payload(empty.written[0]), name="x")
    assert parsed.records == [] and parsed.supersedes == writer.written and called == [1]


def test_the_limit_is_within_the_format_s_bound() -> None:
    repo = make_repo(MemoryBackend())
    assert IndexFileWriter(repo).limit == REWRITE_LIMIT <= MAX_V2_PAYLOAD
    for limit in (0, MAX_V2_PAYLOAD + 1):
        with pytest.raises(ValueError):
            IndexFileWriter(repo, limit=limit)


def test_the_files_written_go_into_the_cache_together_after_the_last() -> None:
    """Each file is staged as it is written; ``finish`` puts them all into this host's cache
    in one commit (the rows of the files they supersede dropped first). A writer closed
    without ``finish`` leaves them to the next sync."""
    repo = make_repo(MemoryBackend())
    old = [repo.write_index_file(IndexFile(packs=dict([_pack(2)]), version=repo.index_version)) for _ in range(3)]
    repo.index.sync()
    cache = repo.index.cache
    commits: list[str] = []
    cache.before_commit = commits.append
    packs = dict(_pack(10) for _ in range(40))
    with IndexFileWriter(repo, limit=4096) as writer:
        for pack_id, entries in packs.items():
            writer.add(pack_id, entries, 5000)
        assert len(writer.written) == 4 and not set(writer.written) & set(cache.live_files())
        assert commits == [] and repo.index.locations(packs[next(iter(packs))][0].id) == []
        writer.finish(old, before=lambda: None)
    assert commits == ["files"] and set(cache.live_files()) == set(writer.written)
    for pack_id, entries in packs.items():
        for e in entries:
            assert [loc.pack_id for loc in repo.index.locations(e.id)] == [pack_id]

    left = IndexFileWriter(repo, limit=4096)
    more = dict(_pack(10) for _ in range(10))
    for pack_id, entries in more.items():
        left.add(pack_id, entries, 5000)
    left.close()  # an error before finish: the files written are in storage only
    assert not set(left.written) & set(cache.live_files())
    repo.index.sync()
    assert set(left.written) <= set(cache.live_files())

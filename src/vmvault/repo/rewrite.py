"""Rewriting part of the index: new index files first, the superseding file last (prune and
repair; repository-format.md, sections 7 and 12.5).

Writers of many pack records (prune re-listing the packs that stay, repair listing every
readable pack) add them one at a time to an :class:`IndexFileWriter`, which writes an index
file each time the one it builds reaches ``REWRITE_LIMIT`` (16 MiB, below the 64 MiB bound of
section 12.2), so memory holds at most one file. The last file written (``finish``) also
supersedes the old files: a kill before it leaves the old files live beside the new ones
(every pack listed twice, which readers allow), a kill after it only files to delete.

The files written are staged in one ``IngestBatch`` and go into this host's index cache
together after the last (``finish``), in one sorted pass that first drops the rows of the
files they supersede: a kill before that leaves the cache as it was, and the next sync
downloads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vmvault.repo.index import MAX_V2_PAYLOAD, encode_index, encode_pack_record, parse_index
from vmvault.repo.pack import BlobEntry
from vmvault.repo.repository import Repository

__all__ = ["REWRITE_LIMIT", "IndexFileWriter"]

#: the payload of each index file prune and repair write. A file is held while it is built,
#: then joined, compressed, sealed and staged for this host's cache: at 64 MiB (the format's
#: bound) ``repair index`` peaked at 345 MiB of RSS at 4 M chunks and 368 at 40 M, at 16 MiB
#: at 144-147 and 149 MiB. 16 MiB is still four times the size below which prune folds a file
#: into others (``prune.SMALL_INDEX_FILE``), and about a thousand files per 400 M chunks
REWRITE_LIMIT = 16 << 20

_HEADER = 16
_RECORD = 40  # the larger of the two versions' pack records
_ENTRY = 45


class IndexFileWriter:
    """Writes pack records into new index files of this repository's version, each at most
    ``limit`` bytes of payload. The file being built is held encoded (45 bytes an entry), not
    as objects."""

    def __init__(self, repo: Repository, *, limit: int = REWRITE_LIMIT) -> None:
        if not 0 < limit <= MAX_V2_PAYLOAD:
            raise ValueError(f"an index file's payload is at most {MAX_V2_PAYLOAD} bytes, not {limit}")
        self.repo = repo
        self.limit = limit
        self.version = repo.index_version
        self.written: list[bytes] = []
        self.packs = 0
        self._batch = repo.index.batch()
        self._records: list[bytes] = []
        self._ids: set[bytes] = set()
        self._size = _HEADER

    def add(self, pack_id: bytes, entries: list[BlobEntry], length: int = 0) -> None:
        """List one pack (every entry of its header, in header order; ``length``: its size,
        0 when not known). A pack already in the file being built is not listed again; one
        added again after its file was written is (readers allow a pack listed twice)."""
        if pack_id in self._ids:
            return
        record = _RECORD + _ENTRY * len(entries)
        if self._records and self._size + record > self.limit:
            self.flush()
        self._ids.add(pack_id)
        self._records.append(encode_pack_record(self.version, pack_id, entries, length))
        self._size += record
        self.packs += 1

    def absorb(self, file_ids: list[bytes]) -> None:
        """List again the packs of these index files (written by this run's writer), so that
        ``finish`` can supersede them too and the index does not keep a small file per run."""
        for file_id in file_ids:
            parsed = parse_index(self.repo.read_index_payload(file_id), name=f"index/{file_id.hex()}")
            for rec in parsed.records:
                self.add(rec.pack_id, rec.entries(), rec.length)

    def flush(self) -> None:
        if self._records:
            self._write([])

    def _write(self, supersedes: list[bytes]) -> None:
        payload = encode_index(self.version, supersedes, self._records)
        self._records = []
        self._ids = set()
        self._size = _HEADER
        self.written.append(self.repo.write_index_payload(payload, batch=self._batch))

    def __enter__(self) -> IndexFileWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Forget the files staged for the cache and not committed (``finish`` commits them;
        after an error the next sync downloads them)."""
        if self._batch is not None:
            self._batch.close()

    def finish(self, old: Iterable[bytes], *, keep: Iterable[bytes] = (), before: Callable[[], None]) -> list[bytes]:
        """Write the last file: the packs still held, superseding ``old`` except ``keep`` and
        the files this writer wrote (a new file may have the same content, hence the same id,
        as an old one). ``before`` runs first (prune's lock check). Returns the ids superseded;
        with nothing to supersede, only the packs held are written."""
        doomed = sorted(set(old) - set(keep) - set(self.written))
        if not doomed:
            self.flush()
        else:
            before()
            self._write(doomed)
        self.repo.index.commit_batch(self._batch)
        return doomed

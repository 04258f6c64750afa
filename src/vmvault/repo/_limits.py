"""How big a stored object may be: nothing is read into memory because the storage says so.

The storage is not trusted (docs/design/repository-format.md, section 10.2). A pack
truncated or extended to 8 GiB, an index entry claiming a 4 GiB blob, a planted 100 GiB
"lock": each must be rejected by its size (from ``list``, from the index, or by a read
bounded to one byte more than allowed), never read whole. Every bound here is what vmvault
itself can write, with headroom, derived from the repository's config where it depends on
it; an object above its bound is damaged or planted, and says so.
"""

from __future__ import annotations

from vmvault.backends.base import Backend
from vmvault.errors import IntegrityError, ObjectNotFoundError
from vmvault.repo._layout import BLOB_ENTRY, ENVELOPE_HEADER, ID_SIZE, PACK_TRAILER, TAG_SIZE

__all__ = [
    "ENVELOPE_OVERHEAD",
    "MAX_INDEX_BLOCKS",
    "MAX_INDEX_FILE",
    "MAX_INDEX_SPAN",
    "MAX_SMALL_OBJECT",
    "MAX_SNAPSHOT",
    "MAX_SNAPSHOT_PAYLOAD",
    "confirm_stored",
    "largest_blob",
    "pack_limit",
    "put_confirmed",
    "read_bounded",
]

#: bytes an envelope adds to its (possibly compressed) payload; compression is used only when
#: it makes the payload smaller, so a sealed payload is never longer than this plus the payload
ENVELOPE_OVERHEAD = ENVELOPE_HEADER.size + TAG_SIZE

#: entries per index block that vmvault writes (repository.INDEX_SPAN)
MAX_INDEX_SPAN = 4096

#: config, key objects and locks are a few hundred bytes of JSON
MAX_SMALL_OBJECT = 1 << 20

#: one index file; prune and repair write the whole index as one file, 45 bytes per blob:
#: this is ~24 million blobs (6 TiB of distinct data at 256 KiB chunks), whose in-memory
#: index would already take ~3.5 GB (docs/design.md, "Memory")
MAX_INDEX_FILE = 1 << 30

#: index blocks per disk: 4 PiB at the default 256 KiB chunks, 64 TiB at 4 KiB chunks. The
#: snapshot lists one entry per block (null for an empty one), so this bounds a snapshot
MAX_INDEX_BLOCKS = 1 << 22

#: a snapshot manifest as stored, and its JSON once decompressed (67 bytes per non-empty
#: index block and per file chunk)
MAX_SNAPSHOT = 256 << 20
MAX_SNAPSHOT_PAYLOAD = 512 << 20


def largest_blob(chunk_size: int) -> int:
    """The largest plaintext blob: a chunk, or an index block of MAX_INDEX_SPAN entries."""
    return max(chunk_size, MAX_INDEX_SPAN * ID_SIZE)


def pack_limit(pack_size: int, chunk_size: int) -> int:
    """The largest pack a writer with this config can produce.

    A writer closes a pack once its blobs reach ``pack_size``, so the blobs take less than
    ``pack_size`` plus one sealed blob; the header has one entry per blob, and no sealed blob
    is shorter than ENVELOPE_OVERHEAD. Packs also stay below 4 GiB (u32 offsets).
    """
    blob_bytes = pack_size + largest_blob(chunk_size) + ENVELOPE_OVERHEAD
    entries = blob_bytes // ENVELOPE_OVERHEAD + 1
    return min(blob_bytes + entries * BLOB_ENTRY.size + ENVELOPE_OVERHEAD + PACK_TRAILER.size, (1 << 32) - 1)


def read_bounded(backend: Backend, name: str, limit: int, *, what: str) -> bytes:
    """The whole object ``name``, read only if it is at most ``limit`` bytes.

    One bounded read of ``limit + 1`` bytes: an oversized object costs no more memory than
    the limit. Raises IntegrityError (naming it) when it is larger; ObjectNotFoundError passes.
    """
    data = backend.get(name, 0, limit + 1)
    if len(data) > limit:
        raise IntegrityError(
            f"{what} is larger than {limit} bytes, more than vmvault ever writes (damaged or planted); not read",
            name=name,
        )
    return data


def put_confirmed(backend: Backend, name: str, data: bytes) -> None:
    """Store ``data`` as ``name`` and read it back (one byte more at most), for the objects
    everything hangs on (a key object, the config) before anything relies on them. Raises
    ``IntegrityError`` naming the object when the storage kept other bytes (a server not
    reporting a full disk, a faulty gateway)."""
    backend.put(name, data)
    confirm_stored(backend, name, data)


def confirm_stored(backend: Backend, name: str, data: bytes) -> None:
    """That ``name`` reads back as ``data`` (one byte more at most): ``IntegrityError`` naming
    the object when the storage kept other bytes; the storage's own errors as they come."""
    try:
        kept: bytes | None = bytes(backend.get(name, 0, len(data) + 1))
    except ObjectNotFoundError:
        kept = None
    if kept != data:
        got = "nothing" if kept is None else f"{len(kept)} other bytes"
        raise IntegrityError(
            f"{backend.url}: {name}: {len(data)} bytes written, {got} read back: the storage does not keep what "
            "it is given",
            name=name,
        )

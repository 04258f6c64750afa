"""What code outside ``repo/`` may know of the repository format.

The byte layouts themselves live in ``repo/_layout.py`` and the bounds in ``repo/_limits.py``,
both private to this package (docs/design/repository-format.md is their specification). The
engine, the CLI and the readers of ``files`` and ``mount`` import from here instead:

* ``BlobType``: what a blob is (DATA: a chunk; INDEX: an index block), for
  ``Repository.get_blob`` and ``BlobWriter.add``;
* ``ZERO_ID`` and ``PARENT_ID``: the two special chunk refs of an index block, and
  ``is_chunk`` to tell a stored chunk's id from them;
* ``IndexBlock``, ``IndexBlockBuilder`` and ``ChunkResolver``: index blocks read, built
  and resolved through checkpoint layers (``Repository.read_index_block`` and
  ``BlobWriter.add_index_block`` read and store them);
* ``INDEX_SPAN``, ``MAX_INDEX_BLOCKS``, ``chunk_count``, ``block_length``: the geometry of
  a disk's index;
* ``FORMAT_VERSION``: the newest repository format this vmvault reads and writes.
"""

from __future__ import annotations

from vmvault.repo._layout import FORMAT_VERSION, BlobType
from vmvault.repo._limits import MAX_INDEX_BLOCKS
from vmvault.repo.index_block import (
    INDEX_SPAN,
    PARENT_ID,
    ZERO_ID,
    ChunkResolver,
    IndexBlock,
    IndexBlockBuilder,
    block_length,
    chunk_count,
    is_chunk,
)

__all__ = [
    "FORMAT_VERSION",
    "INDEX_SPAN",
    "MAX_INDEX_BLOCKS",
    "PARENT_ID",
    "ZERO_ID",
    "BlobType",
    "ChunkResolver",
    "IndexBlock",
    "IndexBlockBuilder",
    "block_length",
    "chunk_count",
    "is_chunk",
]

"""The VHDX log: finding the active sequence and replaying it ([MS-VHDX] section 2.3).

A file whose header names a log (a non-zero LogGuid) was not closed cleanly: its BAT and
metadata are what the log's active sequence says, not what the file holds. A reader replays
that sequence into an in-memory overlay of 4 KiB sectors and reads through it, so a read-only
open never writes the file; a writable open applies the overlay to the file first
(``_vhdx_write``). Writing log entries is the writer's journalling (``VhdxWriter._commit``).
Structures (entry header, descriptors, data sectors) live in ``_vhdx_layout``.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Final

from vmvault.disk import _vhdx_layout as L
from vmvault.errors import FormatError, UnsupportedFormatError

__all__ = ["MAX_LOG_LENGTH", "MAX_OVERLAY_SECTORS", "LogReplay", "check_log_location", "find_active_sequence", "replay"]

#: sanity bounds that keep a hostile file from making us allocate without limit
MAX_LOG_LENGTH: Final = 256 * L.MIB
MAX_OVERLAY_SECTORS: Final = 1 << 18

_ZERO_SECTOR: Final = bytes(L.LOG_SECTOR)


@dataclasses.dataclass
class LogReplay:
    """The active log sequence found in a file (section 2.3.3)."""

    entries: list[L.LogEntry]
    flushed_file_offset: int
    last_file_offset: int


def check_log_location(header: L.Header, header_offset: int, physical_size: int, path: str) -> None:
    """The log a header names must lie in the file, on 1 MiB boundaries past the first MiB (section 2.2.2)."""
    h = header
    if h.log_length == 0 or h.log_length % L.MIB or h.log_offset % L.MIB or h.log_offset < L.MIB:
        raise FormatError(
            f"log offset {h.log_offset:#x} / length {h.log_length:#x} are not 1 MiB multiples past 1 MiB",
            path=path,
            offset=header_offset,
            structure="header",
        )
    if h.log_length > MAX_LOG_LENGTH:
        raise UnsupportedFormatError(
            f"log of {h.log_length} bytes is larger than {MAX_LOG_LENGTH}", path=path, structure="log"
        )
    if h.log_offset + h.log_length > physical_size:
        raise FormatError(
            f"log [{h.log_offset:#x}, +{h.log_length:#x}) lies past the end of the file "
            f"({physical_size} bytes): file is truncated",
            path=path,
            offset=h.log_offset,
            structure="log",
        )


def find_active_sequence(log: bytes, log_guid: uuid.UUID) -> LogReplay | None:
    """Section 2.3.3: scan the circular ``log`` for the valid sequence with the highest number
    whose entries carry ``log_guid``; None if there is none."""
    size = len(log)
    parsed: dict[int, L.LogEntry | None] = {}

    def entry_at(pos: int) -> L.LogEntry | None:
        if pos in parsed:
            return parsed[pos]
        result: L.LogEntry | None = None
        try:
            head = L.LogEntryHeader.unpack(log[pos : pos + 64])
            length = head.entry_length
            if head.log_guid == log_guid and 0 < length <= size and length % L.LOG_SECTOR == 0 and head.tail < size:
                end = pos + length
                raw = log[pos:end] if end <= size else log[pos:] + log[: end - size]
                result = L.LogEntry.unpack(raw)
        except ValueError:
            result = None
        parsed[pos] = result
        return result

    candidate: list[tuple[int, L.LogEntry]] = []
    tail = old_tail = 0
    max_entries = size // L.LOG_SECTOR
    while True:
        current: list[tuple[int, L.LogEntry]] = []
        pos = tail
        while len(current) < max_entries:
            entry = entry_at(pos)
            if entry is None:
                break
            if current and entry.sequence_number != current[-1][1].sequence_number + 1:
                break
            current.append((pos, entry))
            pos = (pos + entry.entry_length) % size
        valid = False
        if current:
            head_entry = current[-1][1]
            starts = [p for p, _ in current]
            if head_entry.tail in starts:
                valid = True
                active = current[starts.index(head_entry.tail) :]
                if not candidate or head_entry.sequence_number > candidate[-1][1].sequence_number:
                    candidate = active
        if not valid:
            tail = tail + L.LOG_SECTOR
            if tail >= size:
                tail = 0
        else:
            tail = pos
        if tail <= old_tail:
            break
        old_tail = tail
    if not candidate:
        return None
    head_entry = candidate[-1][1]
    return LogReplay([e for _, e in candidate], head_entry.flushed_file_offset, head_entry.last_file_offset)


def replay(found: LogReplay, physical_size: int, path: str, log_offset: int) -> tuple[dict[int, bytes], int]:
    """(overlay: file offset -> 4 KiB sector, effective file size) after replaying ``found`` in memory."""
    if physical_size < found.flushed_file_offset:
        raise FormatError(
            f"file is {physical_size} bytes but the log says {found.flushed_file_offset} were flushed: "
            "file is truncated",
            path=path,
            offset=log_offset,
            structure="log",
        )
    overlay: dict[int, bytes] = {}
    end = max(physical_size, found.last_file_offset)
    for entry in found.entries:
        sectors = iter(entry.data_sectors)
        for d in entry.descriptors:
            if isinstance(d, L.DataDescriptor):
                overlay[d.file_offset] = d.leading_bytes + next(sectors).data + d.trailing_bytes
                end = max(end, d.file_offset + L.LOG_SECTOR)
            else:
                if d.zero_length // L.LOG_SECTOR + len(overlay) > MAX_OVERLAY_SECTORS:
                    raise UnsupportedFormatError(
                        f"log zero descriptor of {d.zero_length} bytes is too large to replay in memory",
                        path=path,
                        structure="log",
                    )
                for k in range(d.file_offset, d.file_offset + d.zero_length, L.LOG_SECTOR):
                    overlay[k] = _ZERO_SECTOR
                end = max(end, d.file_offset + d.zero_length)
        if len(overlay) > MAX_OVERLAY_SECTORS:
            raise UnsupportedFormatError(
                "log replay touches too many sectors to hold in memory", path=path, structure="log"
            )
    return overlay, end

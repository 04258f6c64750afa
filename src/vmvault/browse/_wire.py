"""Framing between vmvault and its filesystem worker: a 4-byte big-endian length, a JSON header,
then, when the header says ``"data": N``, N raw bytes. Sizes are bounded on both sides."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import IO, Any

__all__ = ["MAX_DATA", "MAX_HEADER", "WireError", "recv", "send"]

_LENGTH = struct.Struct(">I")
#: a header holds one batch of entries at most
MAX_HEADER = 64 << 20
#: raw bytes after a header: one read of the disk or of a file
MAX_DATA = 64 << 20


class WireError(Exception):
    """The other side closed the pipe or sent something malformed."""


def _exact(stream: IO[bytes], n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            raise WireError("the pipe closed")
        out += chunk
    return bytes(out)


def send(stream: IO[bytes], header: dict[str, Any], data: bytes = b"") -> None:
    if data:
        header = {**header, "data": len(data)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    stream.write(_LENGTH.pack(len(raw)) + raw)
    if data:
        stream.write(data)
    stream.flush()


def recv(stream: IO[bytes], exact: Callable[[IO[bytes], int], bytes] = _exact) -> tuple[dict[str, Any], bytes]:
    """One message; ``exact(stream, n)`` reads exactly n bytes (the parent's has a deadline)."""
    (length,) = _LENGTH.unpack(exact(stream, _LENGTH.size))
    if length > MAX_HEADER:
        raise WireError(f"a header of {length} bytes")
    try:
        header = json.loads(exact(stream, length))
    except (ValueError, RecursionError) as exc:  # (nested too deeply for the parser)
        raise WireError(f"a header that is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise WireError("a header that is not an object")
    size = header.get("data", 0)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_DATA:
        raise WireError(f"a data size of {size!r}")
    return header, exact(stream, size) if size else b""


def binary_stdio() -> tuple[IO[bytes], IO[bytes]]:
    """The worker's own stdin and stdout as binary streams (buffered: whole writes, whole reads)."""
    return os.fdopen(0, "rb"), os.fdopen(1, "wb")

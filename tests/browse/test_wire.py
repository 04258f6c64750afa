"""The messages between vmvault and its filesystem worker (vmvault.browse._wire): what the
worker (parsing a guest's filesystem, so possibly taken over by it) sends is checked."""

from __future__ import annotations

import io
import struct

import pytest

from vmvault.browse import _wire


def _message(header: bytes) -> io.BytesIO:
    return io.BytesIO(struct.pack(">I", len(header)) + header)


def test_a_message_round_trips() -> None:
    out = io.BytesIO()
    _wire.send(out, {"result": [1, "two"]}, b"data")
    out.seek(0)
    assert _wire.recv(out) == ({"result": [1, "two"], "data": 4}, b"data")


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (b"{", "a header that is not JSON"),
        (b"[" * 60000, "a header that is not JSON"),  # nested too deeply: was a RecursionError
        (b"[1]", "a header that is not an object"),
    ],
)
def test_a_header_that_is_not_a_json_object_is_a_wire_error(header: bytes, says: str) -> None:
    with pytest.raises(_wire.WireError, match=says):
        _wire.recv(_message(header))

"""The one place connectors get their ``SourceFile.open`` functions from."""

from __future__ import annotations

import os
import re
from pathlib import Path

from vmvault.hypervisors.openers import bytes_opener

SRC = Path(__file__).resolve().parents[2] / "src" / "vmvault"


def test_bytes_opener_gives_a_fresh_real_file_each_time() -> None:
    opener = bytes_opener(b"<config/>\n")
    first, second = opener(), opener()
    try:
        assert first is not second
        assert os.fstat(first.fileno()).st_size == 10  # the engine fstat()s what it stores
        assert first.read() == b"<config/>\n"
        assert second.read() == b"<config/>\n"  # reading one does not consume the other
    finally:
        first.close()
        second.close()


def test_no_connector_defines_its_own_opener() -> None:
    """Openers live in hypervisors/openers.py; a connector (or the test lab) defining another
    would be a second way to hand the engine a file."""
    found = []
    for path in [*(SRC / "hypervisors").rglob("*.py"), *(SRC / "testing").rglob("*.py")]:
        if path.name == "openers.py":
            continue
        for name in re.findall(r"^\s*def (\w*opener\w*)\(", path.read_text(), re.M):
            found.append(f"{path.relative_to(SRC)}: {name}")
    assert found == []

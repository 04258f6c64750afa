"""Shared fixtures: where ../shared is, and skips for missing external tools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

#: the read-only folder beside the project with real test images; absent for a user's clone
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: it holds the real Windows/qemu test images (developers' checkout only)")
    return SHARED


def require_tool(name: str) -> str:
    """The path of an external program, or skip the test saying which package brings it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/test.sh installs it)")
    return path

"""What the page cache holds of a file, for tests of code that frees it (``platform.drop_cached``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from vmvault import platform


def cached_pages(path: Path) -> int:
    """How many of ``path``'s pages the page cache holds (util-linux's ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "PAGES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.split()[0])


def page_cache_droppable(folder: Path) -> str | None:
    """Why a test of freeing cached pages cannot run in ``folder``, or None when it can."""
    if platform.HIDE_POSIX:
        return "posix_fadvise is hidden (VMVAULT_PLATFORM_HIDE_POSIX=1), as on Windows"
    if not shutil.which("fincore"):
        return "util-linux's fincore is not installed"
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True).stdout.strip()
    if kind in ("tmpfs", "ramfs"):
        return f"{folder} is on {kind}, whose cached pages are the file itself"
    return None

"""What the page cache holds of a file, for tests of code that frees it (``platform.drop_cached``)
or goes past it (``platform.set_direct``)."""

from __future__ import annotations

import os
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


def takes_direct(folder: Path) -> bool:
    """Whether files in ``folder`` can be read and written past the page cache (O_DIRECT)."""
    probe = folder / "direct-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return platform.set_direct(fd, True)
    finally:
        os.close(fd)
        probe.unlink()

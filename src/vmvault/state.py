"""Where vmvault keeps what it must remember on this host between runs.

``$VMVAULT_STATE_DIR``, else ``$XDG_STATE_HOME/vmvault``, else ``~/.local/state/vmvault``.
Each user has their own. Nothing here is needed to restore: it holds change-tracking
reference points (Hyper-V) and what this host has seen of each repository (repo/hostrecord.py).
"""

from __future__ import annotations

import os

__all__ = ["state_dir"]


def state_dir(*parts: str) -> str:
    """The state folder, or a path below it (not created)."""
    base = os.environ.get("VMVAULT_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "vmvault"
    )
    return os.path.join(base, *parts)

"""vmvault: real backups of virtual machines.

Complete, verified, deduplicated, encrypted copies of a VM (configuration, every virtual
disk, its checkpoint tree) on separate storage, taken live or offline, incrementally with
changed-block tracking, restorable on any host and as a clone beside the original.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

"""Where repository bytes live. ``open_backend`` turns a repository location into a backend."""

from __future__ import annotations

from vmvault.backends.base import Backend, ObjectInfo
from vmvault.errors import ConfigError

__all__ = ["Backend", "ObjectInfo", "open_backend"]


def open_backend(location: str) -> Backend:
    """``/path`` or ``file:///path`` (local), ``sftp://user@host[:port]/path``,
    ``s3://[endpoint/]bucket/prefix``, ``memory://`` (tests)."""
    if location.startswith("sftp://"):
        from vmvault.backends.sftp import open_sftp

        return open_sftp(location)
    if location.startswith("s3://"):
        from vmvault.backends.s3 import open_s3

        return open_s3(location)
    if location.startswith("memory://"):
        from vmvault.backends.memory import MemoryBackend

        return MemoryBackend(location)
    if "://" in location and not location.startswith("file://"):
        raise ConfigError(f"unknown repository location {location!r} (use a path, sftp:// or s3://)")
    from vmvault.backends.local import LocalBackend

    return LocalBackend(location.removeprefix("file://"))

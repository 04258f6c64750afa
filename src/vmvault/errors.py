"""vmvault's exceptions: one root, one branch per layer.

::

    VmvaultError
    ├── FormatError                  a disk image is damaged or not what it claims (path, offset, structure)
    │   ├── UnsupportedFormatError   a valid file vmvault cannot handle (unknown required region, ...)
    │   └── ParentError              a differencing disk's parent is missing, mismatched or cyclic
    ├── RepositoryError              the repository as a whole (path/url)
    │   ├── NotARepositoryError
    │   ├── RepositoryExistsError
    │   ├── UnsupportedVersionError  written by a newer vmvault
    │   ├── PasswordError            wrong passphrase / key file, or none given
    │   ├── IntegrityError           a stored object fails its check (object id, what it affects)
    │   ├── LockedError              another process holds a conflicting lock
    │   ├── ImmutableError           the storage or repository policy refuses a delete/overwrite
    │   └── SnapshotNotFoundError
    ├── BackendError                 the storage underneath (url, object name)
    │   ├── ObjectNotFoundError
    │   ├── StorageFullError
    │   ├── BackendPermissionError
    │   └── BackendConnectionError   network drop, server gone (after retries)
    ├── SourceError                  what is being backed up: vanished, changed size, unreadable
    ├── HypervisorError              a hypervisor connector failed (QMP, WMI, ...)
    │   └── ChangeTrackingError      change tracking is unusable; callers fall back to a full read
    └── ConfigError                  bad configuration or command-line input (file, line)

Exit codes are mapped from these classes in the CLI (``vmvault.cli``), not stored on the
exceptions. Errors from lower layers are translated at the boundary with ``raise X(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "BackendConnectionError",
    "BackendError",
    "BackendPermissionError",
    "ChangeTrackingError",
    "ConfigError",
    "FormatError",
    "HypervisorError",
    "ImmutableError",
    "IntegrityError",
    "LockedError",
    "NotARepositoryError",
    "ObjectNotFoundError",
    "ParentError",
    "PasswordError",
    "RepositoryError",
    "RepositoryExistsError",
    "SnapshotNotFoundError",
    "SourceError",
    "StorageFullError",
    "UnsupportedFormatError",
    "UnsupportedVersionError",
    "VmvaultError",
]


class VmvaultError(Exception):
    """Root of every error vmvault raises on purpose."""


class FormatError(VmvaultError):
    """A disk image is damaged or is not what it claims to be."""

    def __init__(
        self, message: str, *, path: str | None = None, offset: int | None = None, structure: str | None = None
    ) -> None:
        self.path = path
        self.offset = offset
        self.structure = structure
        where = []
        if path is not None:
            where.append(str(path))
        if structure is not None:
            where.append(structure)
        if offset is not None:
            where.append(f"offset {offset:#x}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class UnsupportedFormatError(FormatError):
    """A well-formed image that uses something vmvault does not support."""


class ParentError(FormatError):
    """The parent of a differencing image is missing, does not match, or forms a cycle."""


class RepositoryError(VmvaultError):
    """Something about the repository as a whole."""


class NotARepositoryError(RepositoryError):
    pass


class RepositoryExistsError(RepositoryError):
    pass


class UnsupportedVersionError(RepositoryError):
    pass


class PasswordError(RepositoryError):
    """No key in the repository opens with the given passphrase or key file."""


class IntegrityError(RepositoryError):
    """A stored object fails verification (bad MAC, wrong id, truncated, unparsable)."""

    def __init__(self, message: str, *, object_id: str | None = None, name: str | None = None) -> None:
        self.object_id = object_id
        self.name = name
        super().__init__(message)


class LockedError(RepositoryError):
    pass


class ImmutableError(RepositoryError):
    pass


class SnapshotNotFoundError(RepositoryError):
    pass


class BackendError(VmvaultError):
    """The storage underneath the repository failed."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        self.name = name
        super().__init__(message)


class ObjectNotFoundError(BackendError):
    pass


class StorageFullError(BackendError):
    pass


class BackendPermissionError(BackendError):
    pass


class BackendConnectionError(BackendError):
    pass


class SourceError(VmvaultError):
    """The thing being backed up vanished, changed size or could not be read."""


class HypervisorError(VmvaultError):
    pass


class ChangeTrackingError(HypervisorError):
    """Changed-block information cannot be trusted; the caller falls back to a full read."""


class ConfigError(VmvaultError):
    """Invalid configuration or command-line input."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        prefix = ""
        if path is not None:
            prefix = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(prefix + message)

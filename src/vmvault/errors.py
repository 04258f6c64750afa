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
    │   ├── TamperingError           the storage holds what vmvault never writes, or contradicts what
    │   │                            this host saw of it (encryption switched off, repository replaced)
    │   ├── LockedError              another process holds a conflicting lock
    │   ├── ImmutableError           the storage or repository policy refuses a delete/overwrite
    │   └── SnapshotNotFoundError
    ├── BackendError                 the storage underneath (url, object name)
    │   ├── ObjectNotFoundError
    │   ├── StorageFullError
    │   ├── BackendPermissionError
    │   ├── BackendConnectionError   network drop, server gone (after retries)
    │   │   └── BackendUnreachableError  the first connection failed: refused, no route, unknown name
    │   ├── BackendProtocolError     the server broke its protocol (an SFTP packet too long, a reply
    │   │                            to nothing asked, a malformed field): the connection is dropped
    │   └── UnsafeStorageError       a link (or FIFO, device, socket) where an object or folder belongs: never followed
    ├── SourceError                  what is being backed up: vanished, changed size, unreadable
    ├── CleanupError                 a backup is stored (its snapshot named), but undoing what it did on
    │                                the source failed: what was left there is named
    ├── GuestError                   inside a backed-up disk: partition table, filesystem (disk, partition, path)
    │   └── GuestPathError           the path names nothing in the guest's filesystem
    ├── TargetError                  where a restore or new image is written: a name or link in the way, unwritable
    │   └── TargetFullError          that file system is full
    ├── HypervisorError              a hypervisor connector failed (QMP, WMI, ...)
    │   └── ChangeTrackingError      change tracking is unusable; callers fall back to a full read
    ├── ServiceError                 installing or querying the daemon's service failed (systemd, Task Scheduler)
    └── ConfigError                  bad configuration or command-line input (file, line)
        └── MissingDependencyError   a Python package this feature needs is not installed (module)

Exit codes are mapped from these classes in the CLI (``vmvault.cli``), not stored on the
exceptions. Errors from lower layers are translated at the boundary with ``raise X(...) from exc``.

Every import of a package that an install can lack goes through :func:`require`, so a
missing one is a one-line ``MissingDependencyError`` (exit 2) naming the install command,
never a traceback.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

__all__ = [
    "BackendConnectionError",
    "BackendError",
    "BackendPermissionError",
    "BackendProtocolError",
    "BackendUnreachableError",
    "ChangeTrackingError",
    "CleanupError",
    "ConfigError",
    "FormatError",
    "GuestError",
    "GuestPathError",
    "HypervisorError",
    "ImmutableError",
    "IntegrityError",
    "JobCancelled",
    "LockedError",
    "MissingDependencyError",
    "NotARepositoryError",
    "ObjectNotFoundError",
    "ParentError",
    "PasswordError",
    "RepositoryError",
    "RepositoryExistsError",
    "ServiceError",
    "SnapshotNotFoundError",
    "SourceError",
    "StorageFullError",
    "TamperingError",
    "TargetError",
    "TargetFullError",
    "UnsafeStorageError",
    "UnsupportedFormatError",
    "UnsupportedVersionError",
    "VmvaultError",
    "require",
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


class NoConfigError(NotARepositoryError):
    """The location holds no repository config at all: nothing there yet, or no more (a disk
    not mounted, a folder moved)."""


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


class TamperingError(RepositoryError):
    """The storage was changed in a way no vmvault writes it: an unauthenticated config where
    keys exist or a secret was given, a config that changed, a different repository at a
    location this host knows (docs/design/repository-format.md, section 10.1)."""


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


class BackendUnreachableError(BackendConnectionError):
    """The storage's server could not be reached at all on the first connection; not retried."""


class BackendProtocolError(BackendError):
    """The storage's server answered outside its protocol (a length over the bound, a reply to no
    request, a field past its packet's end). Not retried: a server that does this once is
    broken or hostile, not passing through a fault."""


class UnsafeStorageError(BackendError):
    """The storage holds a symbolic link (or a FIFO, device or socket) where the repository
    expects an object or a folder. vmvault never follows or opens one: whoever planted it
    could point it at anything (repository-format.md, section 10.3)."""

    def __init__(self, message: str, *, name: str | None = None, kind: str = "a symbolic link") -> None:
        #: what stands there: "a symbolic link", "a FIFO", "a device", "a socket"
        self.kind = kind
        super().__init__(message, name=name)


class SourceError(VmvaultError):
    """The thing being backed up vanished, changed size or could not be read."""


class CleanupError(VmvaultError):
    """The backup is stored and its snapshot complete, but undoing what the backup did on the
    source (a checkpoint, an overlay, a frozen guest) failed: ``left`` says what remains there.
    ``result`` is the backup's result (the engine's ``BackupResult``), so a caller can report
    the snapshot as saved."""

    result: object = None

    def __init__(self, message: str, *, snapshot_id: str, left: list[str]) -> None:
        self.snapshot_id = snapshot_id
        self.left = left
        super().__init__(message)


class JobCancelled(VmvaultError):
    """A job's run was stopped before it finished: somebody cancelled it (``vmvault cancel``,
    the dashboard) or it reached its ``time_limit``. Raised where the run next reports
    progress; what it had begun is undone as after any other failure."""


class GuestError(VmvaultError):
    """What is inside a backed-up disk cannot be read: a damaged or unknown partition table or
    filesystem, or one vmvault does not support (guest disks are untrusted data)."""

    def __init__(
        self, message: str, *, disk: str | None = None, partition: int | None = None, path: str | None = None
    ) -> None:
        self.disk = disk
        self.partition = partition
        self.path = path
        where = disk or ""
        if disk is not None and partition is not None:
            where += f":{partition}"
        if path is not None:
            where = f"{where}:{path}" if where else path
        super().__init__(f"{where}: {message}" if where else message)


class GuestPathError(GuestError):
    """The path names nothing in the guest's filesystem."""


class TargetError(VmvaultError):
    """The folder or file being written (a restore target, a new disk image) cannot be written as asked:
    a name in it exists, a link or a non-folder is in the way, or a write failed."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class TargetFullError(TargetError):
    """The file system being written (restore target, new image) has no space left (or the quota is used up)."""


class HypervisorError(VmvaultError):
    pass


class ChangeTrackingError(HypervisorError):
    """Changed-block information cannot be trusted; the caller falls back to a full read."""


class ServiceError(VmvaultError):
    """Installing, removing or querying ``vmvault daemon``'s service failed (a unit that cannot
    be written, ``systemctl`` or ``schtasks`` refusing)."""


class ConfigError(VmvaultError):
    """Invalid configuration or command-line input."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        prefix = ""
        if path is not None:
            prefix = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(prefix + message)


class MissingDependencyError(ConfigError):
    """A Python package that the requested feature needs cannot be imported."""

    def __init__(self, message: str, *, module: str) -> None:
        self.module = module
        super().__init__(message)


def _requirement(package: str) -> str:
    """``package`` with the version range vmvault's metadata declares for it (any extra), or
    the bare name when vmvault itself is not installed as a distribution."""
    from importlib import metadata  # (only on this error path: it costs every command 20 ms cold)

    try:
        declared = metadata.requires("vmvault") or []
    except metadata.PackageNotFoundError:
        return package
    wanted = re.sub(r"[-_.]+", "-", package).lower()
    for line in declared:
        spec = line.split(";", 1)[0].strip()
        name = re.split(r"[\s<>=!~\[(]", spec, maxsplit=1)[0]
        if re.sub(r"[-_.]+", "-", name).lower() == wanted:
            return spec.replace(" ", "")
    return package


def require(module: str, *, purpose: str, package: str | None = None, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise a one-line :class:`MissingDependencyError`.

    ``purpose`` completes "... needs the Python package X" (e.g. "hyperv://HOST");
    ``package`` is the distribution to install (default: the module's top-level name);
    ``extra`` names vmvault's optional-dependency group that brings it, None for a core
    dependency (then the message says the install is incomplete).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # the module itself, or one that it imports (boto3 without botocore): either way the
        # install lacks a package, and installing the one named brings what it needs
        missing = exc.name or module
        dist = package or module.split(".", 1)[0]
        spec = _requirement(dist)
        if extra is not None:
            how = f"install it with: python3 -m pip install '{spec}' (or the extra: 'vmvault[{extra}]')"
        else:
            how = (
                f"it is part of vmvault's install but missing here; reinstall it with: python3 -m pip install '{spec}'"
            )
        raise MissingDependencyError(
            f"{purpose} needs the Python package {dist} (module {missing} is not installed); {how}",
            module=missing,
        ) from exc

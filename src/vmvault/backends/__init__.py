"""Where repository bytes live: the backend registry.

``open_backend`` turns a repository location into a :class:`Backend` through
:data:`BACKENDS`, one :class:`BackendEntry` per kind of storage, in the style of the
connector registry (``vmvault.hypervisors.registry``): an entry declares the location
schemes it answers (and whether it takes plain paths), a usage and a one-line summary for help texts and
errors, and names its opener as ``"module:function"`` (``(location: str) -> Backend``),
imported on first use, so a storage whose Python package is missing matters only to whoever
uses it.

Adding a backend (docs/design.md, "Adding a backend"): write ``backends/NAME.py`` with a
``Backend`` subclass and an opener, add one line here, and run the contract suite against it
(``tests/backends/contract.py``, with a ``store`` fixture in ``tests/backends/conftest.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from vmvault.backends.base import Backend, ObjectInfo
from vmvault.errors import ConfigError, require

__all__ = ["BACKENDS", "Backend", "BackendEntry", "ObjectInfo", "backend_for", "describe", "open_backend"]


@dataclass(frozen=True)
class BackendEntry:
    """One kind of storage."""

    #: short name, for messages
    name: str
    #: location schemes it answers (``sftp`` for ``sftp://...``)
    schemes: tuple[str, ...]
    #: what a location looks like
    usage: str
    #: one line for help texts
    summary: str
    #: ``"module:function"``: ``(location: str) -> Backend``
    opener: str
    #: the optional-dependency group that brings its Python packages (``vmvault[EXTRA]``), if any
    extra: str | None = None
    #: it also takes plain paths (one entry does: the local folder)
    paths: bool = False
    #: for tests only: left out of help texts and error messages
    test_only: bool = False

    def open(self, location: str) -> Backend:
        module_name, _, attribute = self.opener.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or module_name
            if missing.split(".")[0] == "vmvault":
                raise  # a module of vmvault itself: a bug, not an install problem
            require(missing, purpose=f"the {self.name} storage ({self.usage})", extra=self.extra)
            raise
        backend: Backend = getattr(module, attribute)(location)
        return backend


#: every kind of storage, by location scheme; one entry also takes plain paths
BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry(
        name="local",
        schemes=("file",),
        usage="/PATH or file:///PATH[?follow-links=1]",
        summary="a folder on this machine (a mounted NAS or USB disk)",
        opener="vmvault.backends.local:open_local",
        paths=True,
    ),
    BackendEntry(
        name="sftp",
        schemes=("sftp",),
        usage="sftp://USER@HOST[:PORT]/PATH",
        summary="a folder on an SSH server (OpenSSH's SFTP)",
        opener="vmvault.backends.sftp:open_sftp",
    ),
    BackendEntry(
        name="s3",
        schemes=("s3",),
        usage="s3://[ENDPOINT/]BUCKET/PREFIX",
        summary="an S3 bucket (AWS, MinIO, Ceph RADOS Gateway, ...), optionally with Object Lock",
        opener="vmvault.backends.s3:open_s3",
    ),
    BackendEntry(
        name="memory",
        schemes=("memory",),
        usage="memory://",
        summary="in this process only (tests)",
        opener="vmvault.backends.memory:MemoryBackend",
        test_only=True,
    ),
)


def backend_for(location: str) -> BackendEntry:
    """The entry for a repository location; an unknown scheme is a ConfigError naming the known ones."""
    scheme = location.split("://", 1)[0].lower() if "://" in location else None
    for entry in BACKENDS:
        if (scheme is None and entry.paths) or (scheme is not None and scheme in entry.schemes):
            return entry
    known = ", ".join(e.usage for e in BACKENDS if not e.test_only)
    raise ConfigError(f"unknown repository location {location!r}: give {known}")


def open_backend(location: str) -> Backend:
    """The backend of a repository location (see :data:`BACKENDS`)."""
    return backend_for(location).open(location)


def describe() -> str:
    """The repository locations vmvault accepts, one per line with what each is, for help texts."""
    rows = [(e.usage, e.summary) for e in BACKENDS if not e.test_only]
    width = max(len(u) for u, _ in rows)
    return "\n".join(f"  {u.ljust(width)}  {s}" for u, s in rows)

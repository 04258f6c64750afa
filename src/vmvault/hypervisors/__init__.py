"""Connectors: where a backup's data comes from.

``open_source`` turns a source argument into a ``Source`` through the connector registry
(``registry``: one entry per kind of source); ``BackupOptions`` say how to back it up and
reach the connector with ``Source.open_session``.
"""

from __future__ import annotations

from vmvault.hypervisors.base import (
    DEFAULT_OPTIONS,
    BackupOptions,
    BackupSession,
    PreviousBackup,
    Registration,
    RestoredVm,
    RestoreNote,
    Source,
    SourceDisk,
    SourceFile,
)
from vmvault.hypervisors.registry import (
    CONNECTORS,
    Connector,
    connector_for,
    connector_for_kind,
    expand_sources,
    open_source,
)

__all__ = [
    "CONNECTORS",
    "DEFAULT_OPTIONS",
    "BackupOptions",
    "BackupSession",
    "Connector",
    "PreviousBackup",
    "Registration",
    "RestoreNote",
    "RestoredVm",
    "Source",
    "SourceDisk",
    "SourceFile",
    "connector_for",
    "connector_for_kind",
    "expand_sources",
    "open_source",
]

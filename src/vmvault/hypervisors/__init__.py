"""Connectors: where a backup's data comes from. ``open_source`` parses a source argument."""

from __future__ import annotations

from vmvault.errors import ConfigError
from vmvault.hypervisors.base import BackupSession, PreviousBackup, Source, SourceDisk, SourceFile

__all__ = ["BackupSession", "PreviousBackup", "Source", "SourceDisk", "SourceFile", "open_source"]


def open_source(spec: str) -> Source:
    """A path (image file or VM folder), ``qemu+unix:///path/qmp.sock``, ``hyperv://[HOST]/VM``,
    or ``hyperv-lab://DIR/VM``."""
    if spec.startswith("qemu+unix://"):
        from vmvault.hypervisors.qemu import QemuSource

        return QemuSource(spec)
    if spec.startswith("hyperv-lab://"):
        from vmvault.hypervisors.hyperv_lab import open_lab_source

        return open_lab_source(spec)
    if spec.startswith("hyperv://"):
        from vmvault.hypervisors.hyperv import HyperVSource

        return HyperVSource(spec)
    if "://" in spec:
        raise ConfigError(f"unknown source {spec!r}: give a path, qemu+unix://, hyperv:// or hyperv-lab://")
    from vmvault.hypervisors.files import FilesSource

    return FilesSource(spec)

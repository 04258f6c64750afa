"""The connector registry: every kind of source vmvault can back up, in one table.

A connector is one entry of :data:`CONNECTORS`. The entry names, as ``"module:function"``
references imported only when used (so a connector whose optional Python package is missing
matters only to whoever asks for it):

* ``source``: ``(spec: str) -> Source``, which parses a source argument (``vmvault backup``,
  a daemon ``[sources.NAME]`` location) into a :class:`~vmvault.hypervisors.base.Source`;
* ``after_restore`` (optional): ``(RestoredVm) -> RestoreNote``, run once a snapshot the
  connector made has been restored: give a clone its identity, write a definition to start
  the VM with, or say how to register it;
* ``audit`` (optional): ``(target: str, now: float) -> list[VmAudit]`` for ``vmvault audit``.

and declares, without importing anything: the URL schemes it answers (none for the path
connector), the snapshot ``source.kind`` values it owns, the connector-specific
:class:`~vmvault.hypervisors.base.BackupOptions` it honours, a one-line description and a
usage example for help texts, and the optional-dependency group (``vmvault[EXTRA]``) that
brings its Python packages.

Adding a connector (docs/design.md, "Adding a connector"): write one module with the
functions above, and add one :class:`Connector` line here. Nothing else dispatches on a
scheme or a snapshot kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vmvault.errors import ConfigError, require
from vmvault.hypervisors.base import CONNECTOR_OPTIONS, DEFAULT_OPTIONS, BackupOptions, Source

__all__ = [
    "CONNECTORS",
    "Connector",
    "check_options",
    "connector_for",
    "connector_for_kind",
    "describe",
    "expand_sources",
    "open_source",
]

#: how each connector-specific option is spelled on the command line and in the daemon's configuration
OPTION_NAMES = {
    "scratch_dir": "--scratch-dir (scratch_dir)",
    "allow_parent_dirs": "--allow-parent-dir (allow_parent_dirs)",
    "follow_links": "--follow-links (follow_links)",
}


@dataclass(frozen=True)
class Connector:
    """One kind of source. See the module documentation for what each reference must be."""

    #: short name, shown in help texts and errors
    name: str
    #: what it backs up, in the plural, for messages ("QEMU VMs")
    noun: str
    #: URL schemes it answers (``qemu+unix`` for ``qemu+unix://...``); empty for plain paths
    schemes: tuple[str, ...]
    #: the ``source.kind`` values of the snapshots it makes
    kinds: tuple[str, ...]
    #: what a source argument looks like
    usage: str
    #: one line for help texts
    summary: str
    #: ``"module:function"``: ``(spec) -> Source``
    source: str
    #: ``"module:function"``: ``(RestoredVm) -> RestoreNote``, or None
    after_restore: str | None = None
    #: ``"module:function"``: ``(RestoredVm) -> RestoreNote`` run instead of ``after_restore``
    #: when the restore registers the VM with libvirt (``restore --define``), or None (refused)
    define: str | None = None
    #: ``"module:function"``: ``(spec) -> list[str]``, the source arguments a spec stands for
    #: (``libvirt:///`` is every domain), or None (a spec is one source)
    expand: str | None = None
    #: ``"module:function"``: ``(target, now) -> list[VmAudit]``, or None (no ``vmvault audit``)
    audit: str | None = None
    #: what ``vmvault audit`` accepts for it, when it has ``audit``
    audit_usage: str = ""
    #: the connector-specific options (``CONNECTOR_OPTIONS``) it honours
    options: frozenset[str] = frozenset()
    #: the optional-dependency group that brings its Python packages (``vmvault[EXTRA]``)
    extra: str | None = None
    #: test and demo machinery (``vmvault.testing``), left out of help texts
    demo: bool = False
    #: opening a backup session changes nothing on the source (no checkpoint, no freeze), so
    #: ``vmvault backup --dry-run`` may open one to list the disks and files
    offline: bool = False

    def load(self, ref: str) -> Any:
        """The object ``ref`` (``"module:attribute"``) names, imported now.

        A Python package the connector needs that is not installed is a one-line
        ``MissingDependencyError`` (a ConfigError) naming the install command; an error in
        vmvault's own code is not hidden.
        """
        module_name, _, attribute = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or module_name
            if missing.split(".")[0] == "vmvault":
                raise  # a module of vmvault itself: a bug, not an install problem
            # the one wording (and install command) for every missing package
            require(missing, purpose=f"the {self.name} connector ({self.usage})", extra=self.extra)
            raise
        return getattr(module, attribute)


#: every connector; the first whose ``schemes`` holds a source's scheme opens it, and the
#: one with no scheme opens plain paths
CONNECTORS: tuple[Connector, ...] = (
    Connector(
        name="files",
        noun="VM folders and image files",
        schemes=(),
        kinds=("files",),
        usage="PATH | HOSTFOLDER#VM",
        summary="a VM folder, one disk image, or one VM (name or ID) of a Hyper-V host folder, offline "
        "(raw, VHDX, VHD, qcow2; checkpoint chains as layers)",
        source="vmvault.hypervisors.files:FilesSource",
        after_restore="vmvault.hypervisors.files_restore:after_restore",
        audit="vmvault.hypervisors.folder_audit:audit_folder",
        audit_usage="FOLDER | HOSTFOLDER#VM",
        options=frozenset({"allow_parent_dirs", "follow_links"}),
        offline=True,
    ),
    Connector(
        name="qemu",
        noun="running QEMU VMs",
        schemes=("qemu+unix",),
        kinds=("qemu",),
        usage="qemu+unix:///path/qmp.sock[?qga=GUEST_AGENT_SOCKET]",
        summary="a running QEMU VM through its QMP socket (live, dirty-bitmap incrementals)",
        source="vmvault.hypervisors.qemu:QemuSource",
        after_restore="vmvault.hypervisors.qemu_restore:after_restore",
        define="vmvault.hypervisors.libvirt_restore:define_qemu",
        options=frozenset({"scratch_dir"}),
    ),
    Connector(
        name="libvirt",
        noun="libvirt domains",
        schemes=("libvirt",),
        kinds=("libvirt",),
        usage="libvirt:///DOMAIN[?uri=URI]",
        summary="a libvirt domain, live (backup API, checkpoint incrementals) or shut off; libvirt:/// is every domain",
        source="vmvault.hypervisors.libvirt:LibvirtSource",
        expand="vmvault.hypervisors.libvirt:expand",
        after_restore="vmvault.hypervisors.libvirt_restore:after_restore",
        define="vmvault.hypervisors.libvirt_restore:after_restore",
        audit="vmvault.hypervisors.libvirt:audit",
        audit_usage="libvirt:///[DOMAIN][?uri=URI]",
        options=frozenset({"scratch_dir", "allow_parent_dirs"}),
        extra="libvirt",
    ),
    Connector(
        name="hyperv",
        noun="Hyper-V VMs",
        schemes=("hyperv",),
        kinds=("hyperv",),
        usage="hyperv://[HOST]/VM",
        summary="a Hyper-V VM, locally or over WinRM (recovery checkpoint, RCT incrementals)",
        source="vmvault.hypervisors.hyperv.connector:open_source",
        after_restore="vmvault.hypervisors.hyperv.connector:after_restore",
        define="vmvault.hypervisors.libvirt_restore:define_hyperv",
        audit="vmvault.hypervisors.hyperv.connector:audit",
        audit_usage="hyperv://[HOST]",
        extra="hyperv",
    ),
    # Test and demo machinery: the real Hyper-V connector over the lab host's transport. The
    # only production line naming vmvault.testing; imported when a user asks for hyperv-lab://.
    Connector(
        name="hyperv-lab",
        noun="VMs of the Hyper-V lab host",
        schemes=("hyperv-lab",),
        kinds=("hyperv-lab",),
        usage="hyperv-lab://DIR/VM",
        summary="the Hyper-V connector against the lab host, a folder of VMs (tests and demos)",
        source="vmvault.testing.hyperv_lab:open_lab_source",
        after_restore="vmvault.testing.hyperv_lab:after_restore",
        define="vmvault.hypervisors.libvirt_restore:define_hyperv",
        audit="vmvault.testing.hyperv_lab:audit",
        audit_usage="hyperv-lab://DIR[/VM]",
        demo=True,
    ),
)


def _scheme(spec: str) -> str | None:
    return spec.split("://", 1)[0].lower() if "://" in spec else None


def _known(connectors: Iterable[Connector]) -> str:
    return ", ".join(c.usage for c in connectors)


def connector_for(spec: str) -> Connector:
    """The connector of a source argument; an unknown scheme is a ConfigError listing the known ones."""
    scheme = _scheme(spec)
    for c in CONNECTORS:
        if (scheme is None and not c.schemes) or (scheme is not None and scheme in c.schemes):
            return c
    raise ConfigError(f"unknown source {spec!r}: give {_known(CONNECTORS)}")


def connector_for_kind(kind: str) -> Connector | None:
    """The connector that makes snapshots of ``kind`` (a snapshot's ``source.kind``), if any."""
    return next((c for c in CONNECTORS if kind in c.kinds), None)


def _listed(nouns: list[str]) -> str:
    """``a and b``, ``a, b and c``; with a comma before the last ``and`` when a noun holds one
    (``VM folders and image files, and libvirt domains``)."""
    if len(nouns) == 1:
        return nouns[0]
    last = ", and " if any(" and " in n for n in nouns) else " and "
    return ", ".join(nouns[:-1]) + last + nouns[-1]


def check_options(connector: Connector, options: BackupOptions, where: str) -> None:
    """Refuse connector-specific options ``connector`` does not honour (ConfigError naming them)."""
    foreign = sorted((options.given() & CONNECTOR_OPTIONS) - connector.options)
    if not foreign:
        return
    by_takers: dict[str, list[str]] = {}
    for name in foreign:
        takers = [c.noun for c in CONNECTORS if name in c.options and not c.demo] or ["no source"]
        by_takers.setdefault(_listed(takers), []).append(OPTION_NAMES.get(name, name))
    parts = [
        f"{' and '.join(names)} {'apply' if len(names) > 1 else 'applies'} to {takers}"
        for takers, names in by_takers.items()
    ]
    raise ConfigError(f"{where}: {'; '.join(parts)}, not to {connector.noun}")


def open_source(spec: str, options: BackupOptions = DEFAULT_OPTIONS) -> Source:
    """The :class:`Source` for a source argument (see :func:`describe`).

    ``options`` are only checked here (a connector-specific option the connector does not
    honour is a ConfigError); they reach the connector with ``Source.open_session``.
    """
    connector = connector_for(spec)
    check_options(connector, options, spec)
    source = connector.load(connector.source)(spec)
    if not isinstance(source, Source) or source.kind not in connector.kinds:
        raise TypeError(f"connector {connector.name} made {source!r}, not a Source of kind {connector.kinds}")
    return source


def expand_sources(spec: str) -> list[str]:
    """The source arguments ``spec`` stands for: several for a connector that expands one
    (``libvirt:///``: every domain of the connection), else ``[spec]``."""
    connector = connector_for(spec)
    if connector.expand is None:
        return [spec]
    specs: list[str] = connector.load(connector.expand)(spec)
    return specs


def describe(*, audit: bool = False) -> str:
    """The source arguments vmvault accepts (or, with ``audit``, the audit targets), one per
    line with what each is, for help texts."""
    rows = [
        (c.audit_usage if audit else c.usage, c.summary)
        for c in CONNECTORS
        if not c.demo and (c.audit is not None or not audit)
    ]
    width = max(len(u) for u, _ in rows)
    return "\n".join(f"  {u.ljust(width)}  {s}" for u, s in rows)

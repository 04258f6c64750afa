"""Backup of libvirt-managed domains: live through libvirt's backup API, offline from files.

``LibvirtSource("libvirt:///web01")`` (connection ``LIBVIRT_DEFAULT_URI`` or
``qemu:///system``; ``?uri=qemu+ssh://root@host/system`` for another) opens a session that

* for a **running** domain starts one pull-mode backup job for every disk
  (``virDomainBackupBegin``): libvirt freezes all disks at one instant, keeps the old blocks
  in scratch files in a private folder and exports the frozen disks over NBD on a UNIX
  socket. With the job it creates a checkpoint ``vmvault-<token>``; an incremental asks
  libvirt for the changes since the checkpoint the parent snapshot recorded, which the
  export carries as ``qemu:dirty-bitmap:backup-<disk>``. The disks are read with the QEMU
  connector's NBD reader (``NbdImage``: ``base:allocation`` for holes, the bitmap for changes).
  A guest agent, when the domain has one, freezes the guest's file systems around the start.
* for a **shut-off** domain reads the disk files (qcow2 backing chains as one disk) and
  checks before the snapshot is written that the domain was not started meanwhile.

Every snapshot holds the inactive domain XML (``domain.xml``), UEFI variables and TPM state
when present, and the list of disks not backed up with the reason. ``complete`` binds the
new checkpoint to the snapshot (its description names the snapshot) and deletes every other
``vmvault-`` checkpoint of the domain; checkpoints of other tools are never touched. ``close``
ends the job, deletes an unbound checkpoint, and removes the scratch folder. See
docs/libvirt.md.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

from vmvault.disk import QEMU_FORMATS, ParentRule, format_from_qemu, open_image
from vmvault.disk.base import DiskImage
from vmvault.errors import ConfigError, HypervisorError, SourceError
from vmvault.hypervisors._debian import import_system_module
from vmvault.hypervisors._nbd import NbdImage
from vmvault.hypervisors._qmp import NoAnswer
from vmvault.hypervisors.audit import CheckpointSummary, VmAudit
from vmvault.hypervisors.base import (
    DEFAULT_OPTIONS,
    BackupOptions,
    BackupSession,
    PreviousBackup,
    Source,
    SourceDisk,
    SourceFile,
    open_or_clean_up,
)
from vmvault.hypervisors.openers import bytes_opener, checked_opener
from vmvault.hypervisors.qemu import SOCKET_FOLDER, make_scratch_folder, scratch_space_warning, socket_folder
from vmvault.hypervisors.walk import HINT_TPM, regular_files
from vmvault.platform import current_uid
from vmvault.waits import within

__all__ = [
    "CBT_KIND",
    "CHECKPOINT_PREFIX",
    "INSTALL_HINT",
    "LibvirtSession",
    "LibvirtSource",
    "audit",
    "call_within",
    "connect",
    "default_uri",
    "domain_names",
    "error_code",
    "error_message",
    "expand",
    "import_libvirt",
    "parse_location",
]

log = logging.getLogger(__name__)

SCHEME = "libvirt"
#: the ``kind`` of the change-tracking record in ``SourceDisk.cbt``
CBT_KIND = "libvirt-checkpoint"
#: every checkpoint vmvault creates starts with this; no other is ever deleted
CHECKPOINT_PREFIX = "vmvault-"
#: private folders for the NBD socket and the scratch files: leftovers are recognisable
TEMP_PREFIX = "vmvault-libvirt-"
_OWNER_FILE = "owner"
#: where libvirt keeps each domain's TPM state (swtpm's, in a folder named by the domain's UUID)
SWTPM_STATE = "/var/lib/libvirt/swtpm"
#: seconds a call on a domain may take. libvirt waits for QEMU's monitor without a limit: a
#: QEMU stopped or stuck on its storage held a backup (and a daemon's whole schedule) forever
CALL_LIMIT = 300.0
#: seconds a call may take after one went unanswered (``Bounded``)
QUICK_LIMIT = 10.0
#: seconds opening a connection may take (a libvirtd stopped or stuck accepts and never answers)
OPEN_LIMIT = 60.0
#: per-disk ``backupmode``/``incremental`` in the backup XML (mixing full and incremental disks)
MIN_LIBVIRT = (7, 6, 0)
INSTALL_HINT = (
    "pip install libvirt-python (it builds against Debian's libvirt-dev and pkg-config), "
    "or on the system Python 3: apt-get install python3-libvirt"
)
#: disks of these formats can carry a libvirt checkpoint (a persistent dirty bitmap)
_CHECKPOINT_FORMATS = ("qcow2",)
#: formats our disk readers open from files (offline backup)
_OFFLINE_FORMATS = QEMU_FORMATS
_AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: libvirt error codes (virErrorNumber) the session acts on
_ERR_NO_DOMAIN = 42
_ERR_NO_CHECKPOINT = 103
_ERR_CHECKPOINT_INCONSISTENT = 109
_ERR_NO_BACKUP = 104
_ERR_OPERATION_INVALID = 55
_JOB_OPERATION_BACKUP = 9


# -- the binding ----------------------------------------------------------------------------------


def import_libvirt() -> Any:
    """The ``libvirt`` module (libvirt-python from PyPI, or Debian's python3-libvirt).

    Raises ConfigError naming the install command when neither loads.
    """
    module = import_system_module("libvirt", ("libvirtmod",))
    if module is None:
        raise ConfigError(f"the libvirt Python binding is not installed: {INSTALL_HINT}")
    return module


def default_uri() -> str:
    return os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


# -- locations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    domain: str | None  # None: every domain of the connection
    uri: str | None  # None: the default connection
    exclude: frozenset[str] = frozenset()
    scratch: str | None = None

    def for_domain(self, name: str) -> str:
        """The canonical location of one domain (options that do not name the history are dropped)."""
        text = f"{SCHEME}:///{quote(name, safe='')}"
        return text + (f"?uri={quote(self.uri, safe='')}" if self.uri else "")


def parse_location(spec: str) -> Location:
    """``libvirt:///NAME?uri=URI&exclude=vdb,vdc&scratch=/dir``; ``libvirt:///`` is every domain."""
    url = urlparse(spec)
    if url.scheme != SCHEME or url.netloc:
        raise ConfigError(f"not a libvirt location: {spec!r} (expected {SCHEME}:///DOMAIN or {SCHEME}:///)")
    name = unquote(url.path[1:]) if url.path.startswith("/") else ""
    if "/" in name:
        raise ConfigError(f"{spec}: a domain name cannot contain '/'")
    opts: dict[str, str] = {}
    for key, values in parse_qs(url.query, keep_blank_values=True).items():
        if key not in ("uri", "exclude", "scratch"):
            raise ConfigError(f"{spec}: unknown option {key!r} (known: uri, exclude, scratch)")
        if not values[-1].strip():
            raise ConfigError(f"{spec}: option {key} needs a value")
        opts[key] = values[-1]
    exclude = frozenset(x.strip() for x in opts.get("exclude", "").split(",") if x.strip())
    return Location(name or None, opts.get("uri"), exclude, opts.get("scratch"))


def error_code(exc: BaseException) -> int:
    get = getattr(exc, "get_error_code", None)
    code = get() if callable(get) else None
    return int(code) if isinstance(code, int) else -1


def error_message(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or exc).strip().replace("\n", " ")


def call_within(limit: float | None, what: str, call: Callable[[], Any]) -> Any:
    """``call()``'s result, or ``NoAnswer`` when it has not returned after ``limit`` seconds
    (None: ``CALL_LIMIT``). The binding cannot cancel a call: it is left to end in its own
    thread (``vmvault.waits.within``)."""
    seconds = CALL_LIMIT if limit is None else limit
    return within(
        seconds,
        call,
        name=f"libvirt {what}",
        late=lambda: NoAnswer(
            f"{what}: libvirt did not answer within {seconds:g} s (is libvirtd, or the domain's QEMU, stopped or "
            "stuck?)"
        ),
    )


class Bounded:
    """A libvirt domain (or checkpoint) whose every call ends within ``CALL_LIMIT`` seconds
    (``call_within``), the checkpoints it hands out bounded alike. Once a call went unanswered,
    the next ones get ``QUICK_LIMIT`` until one is answered in time: a teardown after a QEMU
    that stopped answering costs seconds, not ``CALL_LIMIT`` for every step."""

    def __init__(self, obj: Any, where: str, silent: list[bool] | None = None) -> None:
        self._obj = obj.unbounded if isinstance(obj, Bounded) else obj
        self._where = where
        #: shared by a domain and its checkpoints: whether the last call went unanswered
        self._silent = silent if silent is not None else [False]

    @property
    def unbounded(self) -> Any:
        """The binding's own object, for a caller that bounds its calls itself."""
        return self._obj

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            limit = min(QUICK_LIMIT, CALL_LIMIT) if self._silent[0] else CALL_LIMIT
            try:
                result = call_within(limit, f"{self._where}: {name}()", lambda: attr(*args, **kwargs))
            except NoAnswer:
                self._silent[0] = True
                raise
            except BaseException:
                self._silent[0] = False  # answered, if with an error
                raise
            self._silent[0] = False
            if isinstance(result, list):
                return [self._wrapped(r) for r in result]
            return self._wrapped(result)

        return call

    def _wrapped(self, result: Any) -> Any:
        is_libvirt_object = type(result).__name__.startswith("virDomain")
        return Bounded(result, self._where, self._silent) if is_libvirt_object else result


def connect(lv: Any, uri: str) -> Bounded:
    """A connection to ``uri`` whose every call (and every domain it hands out) is bounded
    (``Bounded``); opening it may take ``OPEN_LIMIT`` seconds."""
    try:
        conn = call_within(OPEN_LIMIT, f"connecting to {uri}", lambda: lv.open(uri))
    except lv.libvirtError as exc:
        raise HypervisorError(f"cannot connect to libvirt at {uri}: {error_message(exc)}") from exc
    if conn is None:
        raise HypervisorError(f"cannot connect to libvirt at {uri}")
    return Bounded(conn, uri)


def expand(spec: str) -> list[str]:
    """The source arguments ``spec`` stands for: ``libvirt:///`` (with its options) is one
    ``libvirt:///NAME`` per domain of the connection; a named domain is itself."""
    loc = parse_location(spec)
    if loc.domain is not None:
        return [spec]
    query = urlparse(spec).query
    return [f"{SCHEME}:///{quote(name, safe='')}" + (f"?{query}" if query else "") for name in domain_names(spec)]


def domain_names(spec: str) -> list[str]:
    """The names of every domain (running or defined) of the connection ``spec`` names."""
    loc = parse_location(spec)
    lv = import_libvirt()
    conn = connect(lv, loc.uri or default_uri())
    try:
        return sorted(d.name() for d in conn.listAllDomains(0))
    except lv.libvirtError as exc:
        raise HypervisorError(
            f"listing the domains of {loc.uri or default_uri()} failed: {error_message(exc)}"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            conn.close()


# -- the domain XML -------------------------------------------------------------------------------


@dataclass
class _Disk:
    """One ``<disk>`` of the domain as its XML describes it."""

    target: str
    bus: str
    device: str  # disk, cdrom, floppy, lun
    type: str  # file, block, network, volume, dir, nvme
    format: str
    source: str  # the file or block device ("" when none)
    readonly: bool
    shareable: bool
    protocol: str = ""
    skip: str = ""  # why it is not backed up ("" = it is)
    size: int = 0
    checkpoint_bitmap: str | None = None  # the bitmap the previous checkpoint has on this disk


def _parse_xml(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise HypervisorError(f"libvirt answered {what} that is not XML: {exc}") from exc


def _disks_of(dom_xml: ET.Element, exclude: frozenset[str], patterns: tuple[str, ...] = ()) -> list[_Disk]:
    out: list[_Disk] = []
    for el in dom_xml.findall("./devices/disk"):
        target = el.find("target")
        src = el.find("source")
        driver = el.find("driver")
        disk = _Disk(
            target=str(target.get("dev", "")) if target is not None else "",
            bus=str(target.get("bus", "")) if target is not None else "",
            device=el.get("device", "disk"),
            type=el.get("type", "file"),
            format=str(driver.get("type", "raw")) if driver is not None else "raw",
            source=str((src.get("file") or src.get("dev") or src.get("name") or "") if src is not None else ""),
            readonly=el.find("readonly") is not None,
            shareable=el.find("shareable") is not None,
            protocol=str(src.get("protocol", "")) if src is not None else "",
        )
        if not disk.target:
            disk.skip = "it has no target device name"
        elif disk.device in ("cdrom", "floppy"):
            disk.skip = f"removable medium ({disk.device})"
        elif disk.device == "lun":
            disk.skip = "a passed-through LUN (device='lun')"
        elif disk.readonly:
            disk.skip = "read-only"
        elif disk.shareable:
            disk.skip = "shared with other domains (<shareable/>): one domain's backup cannot freeze it"
        elif src is None or not disk.source:
            disk.skip = "no medium"
        elif disk.target in exclude:
            disk.skip = "excluded (?exclude=)"
        elif any(fnmatch.fnmatchcase(disk.target, p) for p in patterns):
            disk.skip = "excluded (--exclude)"
        out.append(disk)
    targets = [d.target for d in out if d.target]
    if len(set(targets)) != len(targets):
        raise HypervisorError(f"two disks share a target device in {targets}")
    return out


def _agent_channel(dom_xml: ET.Element) -> bool:
    return any(t.get("name") == _AGENT_CHANNEL for t in dom_xml.findall("./devices/channel/target"))


def _qemu_ids(dom_xml: ET.Element) -> tuple[int, int] | None:
    """The uid and gid libvirt runs QEMU as (``<seclabel model='dac'><label>+64055:+109``)."""
    for sec in dom_xml.findall("seclabel"):
        if sec.get("model") != "dac":
            continue
        label = sec.findtext("label") or ""
        uid, _, gid = label.partition(":")
        try:
            return int(uid.lstrip("+")), int(gid.lstrip("+"))
        except ValueError:
            return None
    return None


def _text(root: ET.Element, path: str) -> str:
    return (root.findtext(path) or "").strip()


def _attr(root: ET.Element, path: str, name: str) -> str:
    el = root.find(path)
    return str(el.get(name, "")) if el is not None else ""


def _memory_bytes(dom_xml: ET.Element) -> int | None:
    el = dom_xml.find("memory")
    if el is None or not (el.text or "").strip().isdigit():
        return None
    unit = (el.get("unit") or "KiB").lower()
    scale = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    return int(str(el.text).strip()) * scale.get(unit, 1024)


# -- the source -----------------------------------------------------------------------------------


class LibvirtSource(Source):
    """One domain of a libvirt connection."""

    kind = "libvirt"

    def __init__(
        self,
        location: str,
        *,
        uri: str | None = None,
        timeout: float = 60.0,
        nbd_backend: str = "python",
    ) -> None:
        loc = parse_location(location)
        if loc.domain is None:
            raise ConfigError(f"{location}: names every domain; back up each (vmvault backup --all) or name one")
        self.domain = loc.domain
        self.explicit_uri = uri or loc.uri
        self.uri = self.explicit_uri or default_uri()
        self.location = Location(loc.domain, self.explicit_uri).for_domain(loc.domain)
        #: ``?scratch=`` and ``?exclude=`` of the location; ``BackupOptions`` add to them
        self.scratch_dir = loc.scratch
        self.exclude = loc.exclude
        self.timeout = timeout
        self.nbd_backend = nbd_backend

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> LibvirtSession:
        """Freeze the domain (live) or check it is shut off (offline); honours ``options``:
        ``scratch_dir``, ``exclude`` (shell patterns matched against disk targets) and
        ``allow_crash_consistent``."""
        session = LibvirtSession(self, options)
        if session.scratch_dir is not None and not os.path.isdir(session.scratch_dir):
            raise ConfigError(f"{self.location}: the scratch folder {session.scratch_dir} is not a folder")
        return open_or_clean_up(session, lambda: session._open(previous), self.location)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # no process: a folder its run gave up (``_abandon_owner``)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _FileState:
    """What an offline disk file looked like when the backup began."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> _FileState:
        st = os.stat(path)
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Job:
    """The backup job this session started (live backups)."""

    socket: str
    exports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # target -> (export, bitmap)


class LibvirtSession(BackupSession):
    """A frozen view of one domain. Always ``close`` it."""

    def __init__(self, source: LibvirtSource, options: BackupOptions = DEFAULT_OPTIONS) -> None:
        self.source = source
        self.scratch_dir = options.scratch_dir or source.scratch_dir
        #: where an offline disk's backing files may be besides its own folder
        self.allow_parent_dirs = options.parent_folders()
        self.allow_crash_consistent = options.allow_crash_consistent
        self.patterns = options.exclude
        self.vm: dict[str, Any] = {"hypervisor": "libvirt"}
        self.disks: list[SourceDisk] = []
        self.files: list[SourceFile] = []
        self.consistency = "crash-consistent"
        self.warnings: list[str] = []
        self.extra: dict[str, Any] = {}
        self.token = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self.checkpoint = f"{CHECKPOINT_PREFIX}{self.token}"
        self.tempdir: str | None = None
        self._lv: Any = None
        self._conn: Any = None
        self._dom: Any = None
        self._uuid = ""
        self._images: list[DiskImage] = []
        self._job: _Job | None = None
        self._checkpoint_made = False
        self._frozen_fs = False
        self._offline: list[_FileState] | None = None
        self._completed = False
        #: a teardown went unanswered while the job may run: QEMU may still use the scratch folder
        self._scratch_held = False
        self._closed = False

    # -- helpers ------------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def _fail(self, what: str, exc: BaseException) -> HypervisorError:
        return HypervisorError(f"{self.source.location}: {what}: {error_message(exc)}")

    @property
    def _name(self) -> str:
        return self.source.domain

    # -- opening ------------------------------------------------------------------------------
    def _open(self, previous: PreviousBackup | None) -> None:
        src = self.source
        self._lv = lv = import_libvirt()
        self._conn = connect(lv, src.uri)
        version = self._conn.getLibVersion()
        have = (version // 1_000_000, version // 1000 % 1000, version % 1000)
        try:
            self._dom = Bounded(self._conn.lookupByName(src.domain), src.location)
        except lv.libvirtError as exc:
            if error_code(exc) == _ERR_NO_DOMAIN:
                raise HypervisorError(f"{src.location}: no domain named {src.domain!r} on {src.uri}") from exc
            raise self._fail("looking up the domain", exc) from exc
        dom = self._dom
        self._uuid = dom.UUIDString()
        active = bool(dom.isActive())
        if active and have < MIN_LIBVIRT:
            raise HypervisorError(
                f"{src.location}: libvirt {'.'.join(map(str, have))} is too old for live backup; vmvault needs "
                f"{'.'.join(map(str, MIN_LIBVIRT))} or newer (tested with 9.0)"
            )
        live = _parse_xml(dom.XMLDesc(0), "a domain description")
        inactive_text = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
        inactive = _parse_xml(inactive_text, "a domain description")
        disks = _disks_of(live, src.exclude, self.patterns)
        unknown = src.exclude - {d.target for d in disks}
        if unknown:
            raise ConfigError(f"{src.location}: ?exclude names no disk of the domain: {', '.join(sorted(unknown))}")
        self._record_vm(live, inactive, have)
        self.files.append(
            SourceFile(
                "domain.xml", len(inactive_text.encode()), 0o600, time.time_ns(), bytes_opener(inactive_text.encode())
            )
        )
        self._add_state_files(live)
        if active:
            self._sweep_leftovers()
            self._open_live(live, disks, previous)
        else:
            self._open_offline(disks)
        self.vm["disks"] = [self._disk_record(d) for d in disks]
        self.vm["skipped_disks"] = [
            {"target": d.target, "device": d.device, "source": d.source, "reason": d.skip} for d in disks if d.skip
        ]
        for d in disks:
            if d.skip:
                self._warn(f"{d.target or d.source}: not backed up: {d.skip}")
        if not any(not d.skip for d in disks):
            raise HypervisorError(f"{src.location}: the domain has no disk to back up")

    def _record_vm(self, live: ET.Element, inactive: ET.Element, have: tuple[int, int, int]) -> None:
        dom = self._dom
        state = dom.state()[0]
        names = {
            0: "nostate",
            1: "running",
            2: "blocked",
            3: "paused",
            4: "shutdown",
            5: "shutoff",
            6: "crashed",
            7: "pmsuspended",
        }
        loader_type = _attr(live, "./os/loader", "type")
        self.vm.update(
            {
                "name": _text(live, "name"),
                "uuid": self._uuid,
                "id": self._uuid,
                "uri": self._conn.getURI(),
                "libvirt_version": ".".join(map(str, have)),
                "domain_type": live.get("type", ""),
                "state": names.get(state, str(state)),
                "persistent": bool(dom.isPersistent()),
                "machine": _attr(live, "./os/type", "machine"),
                "firmware": "uefi" if loader_type == "pflash" else (_attr(live, "os", "firmware") or "bios"),
                "cpus": int(_text(live, "vcpu") or 1),
                "nics": [
                    {"mac": _attr(i, "mac", "address"), "model": _attr(i, "model", "type"), "type": i.get("type", "")}
                    for i in live.findall("./devices/interface")
                ],
                "guest_agent": _agent_channel(live),
            }
        )
        memory = _memory_bytes(inactive)
        if memory is not None:
            self.vm["memory"] = memory

    def _disk_record(self, d: _Disk) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "target": d.target,
            "bus": d.bus,
            "device": d.device,
            "type": d.type,
            "format": d.format,
            "source": d.source,
            "backed_up": not d.skip,
        }
        if d.size:
            rec["size"] = d.size
        if d.skip:
            rec["reason"] = d.skip
        return rec

    def _add_state_files(self, live: ET.Element) -> None:
        """UEFI variables (``<os><nvram>``) and TPM state (swtpm's folder for this domain)."""
        nvram = _text(live, "./os/nvram")
        if nvram:
            self._add_file(f"nvram/{os.path.basename(nvram)}", nvram, "UEFI variable store")
        for tpm in live.findall("./devices/tpm"):
            backend = tpm.find("backend")
            if backend is None or backend.get("type") != "emulator":
                continue
            folder = os.path.join(SWTPM_STATE, self._uuid)
            if not os.path.isdir(folder):
                self._warn(f"TPM state folder {folder} not found; the snapshot has no TPM state")
                continue
            # swtpm's user owns the folder: a folder in it swapped for a link leads elsewhere,
            # so it is walked by descriptors and each file must lie in it when it is opened
            inside = ParentRule.inside([folder])
            try:
                found = list(regular_files([folder], self.warnings, hint=HINT_TPM))
            except SourceError as exc:
                self._warn(f"TPM state folder {folder}: {exc}; the snapshot has no TPM state")
                continue
            for path, st in found:
                rel = os.path.relpath(path, folder).replace(os.sep, "/")
                self._add_file(f"tpm/{rel}", path, "TPM state", inside, st)

    def _add_file(
        self, name: str, path: str, what: str, inside: ParentRule | None = None, st: os.stat_result | None = None
    ) -> None:
        """``path`` stored as ``name`` (``st``: its ``lstat``, when a walk took it)."""
        try:
            st = st or os.lstat(path)
        except OSError as exc:
            self._warn(f"{what} {path} cannot be read ({exc.strerror}); it is not in the snapshot")
            return
        if not stat.S_ISREG(st.st_mode):
            self._warn(f"{what} {path} is not a regular file; it is not in the snapshot")
            return
        opener = checked_opener(path, name, st, self.warnings, inside=inside)
        self.files.append(SourceFile(name, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, opener))

    # -- leftovers of a killed run --------------------------------------------------------------
    def _job_socket(self) -> str | None:
        """The NBD socket of the domain's running backup job, or None when it has none."""
        lv, dom = self._lv, self._dom
        # a failing question is an error, not "no job": the teardown would skip a job it must end
        stats = dom.jobStats()
        if stats.get("operation") != _JOB_OPERATION_BACKUP:
            return None
        try:
            desc = _parse_xml(dom.backupGetXMLDesc(), "a backup description")
        except lv.libvirtError as exc:
            if error_code(exc) == _ERR_NO_BACKUP:
                return None
            raise
        server = desc.find("server")
        return str(server.get("socket", "")) if server is not None else ""

    def _sweep_leftovers(self) -> None:
        """End a backup job and remove scratch folders that a killed vmvault run left."""
        sock = self._job_socket()
        if sock is not None:
            folder = _scratch_folder_of(sock)
            if folder is None:
                raise HypervisorError(
                    f"{self.source.location}: another tool's backup job is running on the domain (NBD socket "
                    f"{sock or 'not on a UNIX socket'}); vmvault starts when it has ended"
                )
            owner = _read_owner(folder)
            if owner is not None and owner[0] == socket.gethostname() and _pid_alive(owner[1]):
                raise HypervisorError(
                    f"{self.source.location}: another vmvault backup of this domain is running (pid {owner[1]})"
                )
            self._warn(f"ending a backup job left by an interrupted vmvault run ({folder})")
            self._abort_job(sock)
            shutil.rmtree(folder, ignore_errors=True)
        parent = self.scratch_dir or tempfile.gettempdir()
        with contextlib.suppress(OSError):
            for entry in os.listdir(parent):
                path = os.path.join(parent, entry)
                if not entry.startswith(TEMP_PREFIX) or not os.path.isdir(path) or os.path.islink(path):
                    continue
                owner = _read_owner(path)
                if owner is None or owner[2] != self._uuid:
                    continue  # not of this domain (or not readable): another session's business
                if owner[0] == socket.gethostname() and _pid_alive(owner[1]):
                    continue
                self._warn(f"removing scratch folder {path} left by an interrupted vmvault run")
                shutil.rmtree(path, ignore_errors=True)

    # -- live -----------------------------------------------------------------------------------
    def _checkpoints(self) -> dict[str, Any]:
        lv = self._lv
        try:
            return {c.getName(): c for c in self._dom.listAllCheckpoints(0)}
        except lv.libvirtError as exc:
            raise self._fail("listing the checkpoints", exc) from exc

    def _previous_checkpoint(self, previous: PreviousBackup | None, disks: list[_Disk]) -> str | None:
        """The checkpoint the parent snapshot is bound to, when it can give a correct incremental;
        for each disk that cannot use it, the reason is warned about and it is read whole."""
        usable = [d for d in disks if not d.skip]
        if previous is None:
            self._warn("reading every disk whole: no previous snapshot")
            return None
        records = {d.target: previous.disks.get(d.target) for d in usable}
        names = {str(r.get("checkpoint")) for r in records.values() if r and r.get("kind") == CBT_KIND}
        if not names:
            self._warn(f"reading every disk whole: snapshot {previous.snapshot_id[:8]} recorded no libvirt checkpoint")
            return None
        if len(names) > 1:
            self._warn(f"reading every disk whole: snapshot {previous.snapshot_id[:8]} names several checkpoints")
            return None
        (name,) = names
        checkpoints = self._checkpoints()
        if name not in checkpoints:
            self._warn(
                f"reading every disk whole: checkpoint {name} of snapshot {previous.snapshot_id[:8]} is gone "
                "(deleted, the domain was restarted as a transient domain, or another repository's backup ran)"
            )
            return None
        try:
            cp_xml = _parse_xml(
                checkpoints[name].getXMLDesc(self._lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN), "a checkpoint"
            )
        except self._lv.libvirtError as exc:
            raise self._fail(f"reading checkpoint {name}", exc) from exc
        bitmaps = {
            str(el.get("name")): el.get("bitmap") or name
            for el in cp_xml.findall("./disks/disk")
            if el.get("checkpoint") == "bitmap"
        }
        any_usable = False
        for d in usable:
            record = records.get(d.target)
            reason = None
            if d.format not in _CHECKPOINT_FORMATS:
                continue  # read whole every time; said once, in _open_live
            if record is None or record.get("kind") != CBT_KIND:
                reason = "the disk is new since the previous snapshot"
            elif record.get("domain_uuid") != self._uuid:
                reason = f"the previous snapshot is of domain {record.get('domain_uuid')}, this is {self._uuid}"
            elif record.get("source") != d.source:
                reason = f"the disk was replaced ({record.get('source')} -> {d.source})"
            elif record.get("disk_size") != d.size:
                reason = f"the disk was resized from {record.get('disk_size')} to {d.size} bytes"
            elif d.target not in bitmaps:
                reason = f"checkpoint {name} has no bitmap for it"
            if reason:
                self._warn(f"{d.target}: reading the whole disk: {reason}")
            else:
                d.checkpoint_bitmap = bitmaps[d.target]
                any_usable = True
        return name if any_usable else None

    def _open_live(self, live: ET.Element, disks: list[_Disk], previous: PreviousBackup | None) -> None:
        lv, dom = self._lv, self._dom
        usable = [d for d in disks if not d.skip]
        for d in usable:
            try:
                d.size = int(dom.blockInfo(d.target)[0])
            except lv.libvirtError as exc:
                raise self._fail(f"asking the size of disk {d.target}", exc) from exc
        base = self._previous_checkpoint(previous, disks)
        for d in usable:
            if d.format not in _CHECKPOINT_FORMATS:
                self._warn(
                    f"{d.target}: a {d.format} disk cannot carry a libvirt checkpoint; it is read whole every time "
                    "(convert it to qcow2 for incremental backups)"
                )
        ids = _qemu_ids(live)
        other = ids if ids is not None and ids[0] != current_uid() else None
        # libvirtd, as root, creates each scratch file in this folder (following a link, with
        # O_TRUNC) and chowns it to QEMU's user by name: a folder QEMU could change would let
        # whatever runs in QEMU have a host file truncated, made or given to it
        self.tempdir = make_scratch_folder(TEMP_PREFIX, self.scratch_dir, other)
        with open(os.path.join(self.tempdir, _OWNER_FILE), "w", encoding="utf-8") as f:
            f.write(f"{socket.gethostname()}\n{os.getpid()}\n{self._uuid}\n")
        warning = scratch_space_warning(self.tempdir, sum(d.size for d in usable))
        if warning:
            self._warn(warning)
        job = _Job(os.path.join(socket_folder(self.tempdir, other), "nbd.sock"))
        checkpointed = [d for d in usable if d.format in _CHECKPOINT_FORMATS]
        backup_xml, checkpoint_xml = self._job_xml(job, disks, base, checkpointed)
        self._quiesce_and_begin(live, backup_xml, checkpoint_xml, job, disks, base, checkpointed)
        self._open_exports(job, usable, base)

    def _job_xml(
        self, job: _Job, disks: list[_Disk], base: str | None, checkpointed: list[_Disk]
    ) -> tuple[str, str | None]:
        assert self.tempdir is not None
        backup = ET.Element("domainbackup", mode="pull")
        if base is not None:
            ET.SubElement(backup, "incremental").text = base
        ET.SubElement(backup, "server", transport="unix", socket=job.socket)
        bdisks = ET.SubElement(backup, "disks")
        for d in disks:
            if not d.target:
                continue
            if d.skip:
                ET.SubElement(bdisks, "disk", name=d.target, backup="no")
                continue
            attrs = {"name": d.target, "backup": "yes", "type": "file"}
            if base is not None:
                attrs |= (
                    {"backupmode": "incremental", "incremental": base}
                    if d.checkpoint_bitmap
                    else {"backupmode": "full"}
                )
            el = ET.SubElement(bdisks, "disk", attrs)
            ET.SubElement(el, "scratch", file=os.path.join(self.tempdir, f"scratch-{d.target}.qcow2"))
        checkpoint = None
        if checkpointed:
            cp = ET.Element("domaincheckpoint")
            ET.SubElement(cp, "name").text = self.checkpoint
            ET.SubElement(cp, "description").text = f"vmvault backup in progress (pid {os.getpid()})"
            cdisks = ET.SubElement(cp, "disks")
            for d in disks:
                if d.target:
                    ET.SubElement(cdisks, "disk", name=d.target, checkpoint="bitmap" if d in checkpointed else "no")
            checkpoint = ET.tostring(cp, encoding="unicode")
        return ET.tostring(backup, encoding="unicode"), checkpoint

    def _quiesce_and_begin(
        self,
        live: ET.Element,
        backup_xml: str,
        checkpoint_xml: str | None,
        job: _Job,
        disks: list[_Disk],
        base: str | None,
        checkpointed: list[_Disk],
    ) -> None:
        lv, dom = self._lv, self._dom
        quiesced = False
        if _agent_channel(live):
            try:
                try:
                    frozen = dom.fsFreeze()
                except NoAnswer:
                    self._frozen_fs = True  # it may have frozen them: the teardown thaws
                    raise
                self._frozen_fs = True
                quiesced = isinstance(frozen, int) and frozen > 0
                if not quiesced:
                    self._warn("the guest agent froze no file system; the backup is crash-consistent")
            except lv.libvirtError as exc:
                reason = f"the guest agent could not freeze the guest's file systems: {error_message(exc)}"
                if not self.allow_crash_consistent:
                    raise HypervisorError(
                        f"{self.source.location}: {reason}; nothing was backed up "
                        "(--allow-crash-consistent takes a crash-consistent backup instead)"
                    ) from exc
                self._warn(f"{reason}; the backup is crash-consistent (--allow-crash-consistent)")
        else:
            self._warn("the domain has no guest agent channel: the backup is crash-consistent")
        try:
            try:
                dom.backupBegin(backup_xml, checkpoint_xml, 0)
            except NoAnswer:
                # the job and its checkpoint may yet begin: the teardown ends what it finds
                self._job, self._checkpoint_made = job, checkpoint_xml is not None
                raise
            except lv.libvirtError as exc:
                if base is None or error_code(exc) != _ERR_CHECKPOINT_INCONSISTENT:
                    raise self._fail("starting the backup job", exc) from exc
                # the checkpoint's bitmap is missing or broken in an image (a replaced disk file, a
                # QEMU that died without saving it): read everything instead
                self._warn(f"reading every disk whole: checkpoint {base} is inconsistent ({error_message(exc)})")
                for d in disks:
                    d.checkpoint_bitmap = None
                backup_xml, checkpoint_xml = self._job_xml(job, disks, None, checkpointed)
                try:
                    dom.backupBegin(backup_xml, checkpoint_xml, 0)
                except NoAnswer:
                    self._job, self._checkpoint_made = job, checkpoint_xml is not None
                    raise
                except lv.libvirtError as exc2:
                    raise self._fail("starting the backup job", exc2) from exc2
            self._job = job
            self._checkpoint_made = checkpoint_xml is not None
        finally:
            if self._frozen_fs:
                self._thaw()
        if quiesced:
            self.consistency = "filesystem-consistent"

    def _thaw(self) -> None:
        try:
            self._dom.fsThaw()
            self._frozen_fs = False
        except self._lv.libvirtError as exc:
            self._warn(f"could not thaw the guest's file systems: {error_message(exc)}")

    def _open_exports(self, job: _Job, usable: list[_Disk], base: str | None) -> None:
        lv, dom = self._lv, self._dom
        try:
            desc = _parse_xml(dom.backupGetXMLDesc(), "a backup description")
        except lv.libvirtError as exc:
            raise self._fail("reading the backup job", exc) from exc
        exports = {
            str(el.get("name")): (str(el.get("exportname") or el.get("name")), el.get("exportbitmap"))
            for el in desc.findall("./disks/disk")
            if el.get("backup") == "yes"
        }
        for d in usable:
            export, bitmap = exports.get(d.target, (d.target, None))
            incremental = d.checkpoint_bitmap is not None and base is not None
            if incremental and not bitmap:
                bitmap = f"backup-{d.target}"
            image = NbdImage(
                job.socket,
                export,
                bitmap=bitmap if incremental else None,
                backend=self.source.nbd_backend,
                timeout=self.source.timeout,
            )
            self._images.append(image)
            if image.size != d.size:
                raise HypervisorError(f"{d.target}: the NBD export has {image.size} bytes, the disk {d.size}")
            changed = image.dirty_extents() if incremental else None
            self.disks.append(
                SourceDisk(
                    name=d.target,
                    image=image,
                    format=d.format,
                    changed=changed,
                    cbt={
                        "kind": CBT_KIND,
                        "checkpoint": self.checkpoint if d.format in _CHECKPOINT_FORMATS else None,
                        "domain_uuid": self._uuid,
                        "source": d.source,
                        "disk_size": d.size,
                    }
                    if d.format in _CHECKPOINT_FORMATS
                    else None,
                    meta={
                        "target": d.target,
                        "bus": d.bus,
                        "source": d.source,
                        "incremental_from": base if incremental else None,
                    },
                )
            )
        self.extra["libvirt"] = {
            "method": "backup-api-pull",
            "checkpoint": self.checkpoint if self._checkpoint_made else None,
            "incremental_from": base,
        }

    # -- offline --------------------------------------------------------------------------------
    def _open_offline(self, disks: list[_Disk]) -> None:
        self.consistency = "offline"
        self._offline = []
        for d in disks:
            if d.skip:
                continue
            if d.type not in ("file", "block"):
                d.skip = f"a {d.type} disk{' (' + d.protocol + ')' if d.protocol else ''} has no local file to read"
                continue
            if d.format not in _OFFLINE_FORMATS:
                d.skip = f"format {d.format} cannot be read from its file"
                continue
            try:
                self._offline.append(_FileState.of(d.source))
                # the image's header names its backing files, and whatever runs in QEMU (the
                # guest, taken over) writes that header: vmvault, as root, reads the chain only
                # in the image's folder and the allowed ones, never a host file it names
                rule = ParentRule.beside(d.source, self.allow_parent_dirs)
                image = open_image(d.source, format=format_from_qemu(d.format), rule=rule)
            except OSError as exc:
                raise SourceError(f"{d.target}: {d.source}: {exc.strerror}") from exc
            self._images.append(image)
            d.size = image.size
            self.disks.append(
                SourceDisk(
                    name=d.target,
                    image=image,
                    format=image.format,
                    meta={"target": d.target, "bus": d.bus, "source": d.source},
                )
            )
        self.extra["libvirt"] = {"method": "offline-files"}

    def before_snapshot(self) -> None:
        """Offline: the domain must still be shut off and its disk files unchanged."""
        if self._offline is None:
            return
        lv = self._lv
        try:
            active = bool(self._dom.isActive())
        except lv.libvirtError as exc:
            raise self._fail("checking the domain's state after the read", exc) from exc
        changed = []
        for before in self._offline:
            try:
                now = _FileState.of(before.path)
            except OSError:
                changed.append(before.path)
                continue
            if now != before:
                changed.append(before.path)
        if active or changed:
            what = "was started" if active else f"disk files changed ({', '.join(changed)})"
            raise SourceError(
                f"{self.source.location}: the domain {what} while its disks were read offline; "
                "nothing was stored as a snapshot, run the backup again"
            )

    # -- commit and teardown --------------------------------------------------------------------
    def complete(self, snapshot_id: str) -> None:
        """Bind the new checkpoint to the snapshot and delete every other vmvault checkpoint."""
        if self._closed:
            raise HypervisorError(f"{self.source.location}: complete() after close()")
        self._completed = True
        self.extra.setdefault("libvirt", {})["snapshot_id"] = snapshot_id
        if self._offline is not None or self._dom is None:
            return
        lv = self._lv
        # The snapshot is stored whatever happens here: a refusal is a warning, the job is
        # ended again by close, and the checkpoints are tidied by the next backup.
        try:
            self._end_job()  # the previous checkpoint cannot be deleted while the job reads from it
            checkpoints = self._checkpoints()
        except (lv.libvirtError, HypervisorError) as exc:
            self._warn(
                f"snapshot {snapshot_id[:8]} is stored, but its checkpoints were not tidied: {error_message(exc)}"
            )
            return
        if self._checkpoint_made and self.checkpoint in checkpoints:
            try:
                cp = checkpoints[self.checkpoint]
                doc = _parse_xml(cp.getXMLDesc(lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN), "a checkpoint")
                desc = doc.find("description")
                if desc is None:
                    desc = ET.Element("description")
                    doc.insert(1, desc)
                desc.text = f"vmvault snapshot {snapshot_id}"
                self._dom.checkpointCreateXML(
                    ET.tostring(doc, encoding="unicode"), lv.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                )
            except (lv.libvirtError, HypervisorError) as exc:
                self._warn(
                    f"checkpoint {self.checkpoint} could not be bound to snapshot {snapshot_id[:8]}: "
                    + error_message(exc)
                )
        for name, cp in sorted(checkpoints.items()):
            if name.startswith(CHECKPOINT_PREFIX) and name != self.checkpoint:
                self._delete_checkpoint(name, cp)

    def _delete_checkpoint(self, name: str, cp: Any) -> None:
        """Delete an older vmvault checkpoint with its bitmaps; one whose bitmap is already gone
        from an image (libvirt then refuses: "not found in backing chain") loses its record only."""
        lv = self._lv
        try:
            cp.delete(0)
            return
        except lv.libvirtError as exc:
            message = error_message(exc)
            if "not found" not in message:
                self._warn(f"old checkpoint {name} stays until the next backup: {message}")
                return
        try:
            cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            self._warn(f"old checkpoint {name} had lost its bitmap ({message}); only libvirt's record of it was left")
        except lv.libvirtError as exc:
            self._warn(f"old checkpoint {name} stays until the next backup: {error_message(exc)}")

    def _abort_job(self, sock: str) -> None:
        """End the backup job whose NBD socket is ``sock`` and wait until it is gone."""
        lv, dom = self._lv, self._dom
        try:
            dom.abortJob()
        except lv.libvirtError as exc:
            if error_code(exc) != _ERR_OPERATION_INVALID:  # no job: it ended already
                raise
        deadline = time.monotonic() + self.source.timeout
        while self._job_socket() == sock:
            if time.monotonic() > deadline:
                raise HypervisorError(f"{self.source.location}: the backup job did not end")
            time.sleep(0.05)

    def _end_job(self) -> None:
        if self._job is None:
            return
        for image in self._images:
            image.close()
        if self._job_socket() == self._job.socket:
            self._abort_job(self._job.socket)
        self._job = None

    def close(self) -> None:
        """End the job, delete an unbound checkpoint, remove the scratch folder. Idempotent."""
        if self._closed:
            return
        failures: list[str] = []
        for image in self._images:
            with contextlib.suppress(OSError, SourceError):
                image.close()
        if self._dom is not None:
            # a second pass after a refusal (every step looks before it acts), on a new
            # connection when libvirtd went away (restarted) meanwhile
            for attempt in (1, 2):
                try:
                    self._teardown()
                    break
                except NoAnswer as exc:  # asked again, it would wait as long
                    failures.append(self._left_unanswered(exc))
                    break
                except Exception as exc:  # libvirtError or ours
                    if attempt == 2:
                        failures.append(error_message(exc))
                    else:
                        self._reconnect(exc)  # acts only when the connection is gone
        if self.tempdir is not None and os.path.exists(self.tempdir) and not self._scratch_held:
            try:
                shutil.rmtree(self.tempdir)
            except OSError as exc:
                failures.append(f"removing {self.tempdir}: {exc.strerror}")
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._closed = True
        if failures:
            for f in failures:
                self._warn(f"cleanup: {f}")
            raise HypervisorError(
                f"{self.source.location}: the backup session left things behind: " + "; ".join(failures)
            )

    def _left_unanswered(self, exc: NoAnswer) -> str:
        """What a teardown libvirt stopped answering may leave, for the error. While the job
        may run the scratch folder is kept (QEMU writes into its files; removed, their space
        would be used by files seen nowhere), marked as no live run's so the next backup
        removes it."""
        name = self.source.domain
        left = [
            *([f"the guest's file systems frozen (virsh domfsthaw {name})"] if self._frozen_fs else []),
            *([f"the backup job (virsh domjobabort {name})"] if self._job is not None else []),
            *([f"checkpoint {self.checkpoint}"] if self._checkpoint_made and not self._completed else []),
        ]
        kept = ""
        if self._job is not None and self.tempdir is not None:
            self._scratch_held = True
            with contextlib.suppress(OSError):
                _abandon_owner(self.tempdir, self._uuid)
            kept = f"; the scratch folder {self.tempdir} is kept, as QEMU may still write into it"
        return (
            f"{exc}: what this backup began may remain: {', '.join(left) or 'nothing known'}{kept}. The next "
            "backup of this domain removes them once libvirt answers again"
        )

    def _teardown(self) -> None:
        if self._frozen_fs:
            self._thaw()
        self._end_job()
        if self._checkpoint_made and not self._completed:
            # the new checkpoint is not bound to a snapshot: delete it (libvirt merges its bitmap
            # into its parent's, so the previous checkpoint still covers every change)
            lv = self._lv
            try:
                self._dom.checkpointLookupByName(self.checkpoint).delete(0)
            except lv.libvirtError as exc:
                if error_code(exc) != _ERR_NO_CHECKPOINT:
                    raise
            self._checkpoint_made = False

    def _reconnect(self, exc: BaseException) -> bool:
        """After a lost connection (libvirtd restarted), connect again once; True when done."""
        lv = self._lv
        if lv is None or not isinstance(exc, lv.libvirtError):
            return False
        try:
            alive = bool(self._conn.isAlive())
        except lv.libvirtError:
            alive = False
        if alive:
            return False
        with contextlib.suppress(Exception):
            self._conn.close()
        try:
            self._conn = connect(lv, self.source.uri)
            self._dom = Bounded(self._conn.lookupByUUIDString(self._uuid), self.source.location)
        except (HypervisorError, lv.libvirtError) as err:
            self._warn(f"libvirt cannot be reached again to clean up ({error_message(err)})")
            return False
        self._warn("the libvirt connection was lost; reconnected to clean up")
        return True


def _scratch_folder_of(sock: str) -> str | None:
    """The vmvault scratch folder a backup job's NBD socket lies in (directly, or in the socket
    folder of a QEMU running as another user), or None when the job is not vmvault's."""
    folder = os.path.dirname(sock)
    if os.path.basename(folder) == SOCKET_FOLDER:
        folder = os.path.dirname(folder)
    return folder if os.path.basename(folder).startswith(TEMP_PREFIX) else None


def _abandon_owner(folder: str, uuid: str) -> None:
    """Mark the scratch folder ``folder``, made by this process for the domain ``uuid``, as
    no running session's (pid 0): kept after a teardown libvirt did not answer, it is the next
    backup's to remove, even in a daemon whose process made it."""
    fd = os.open(os.path.join(folder, _OWNER_FILE), os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, f"{socket.gethostname()}\n0\n{uuid}\n".encode())
    finally:
        os.close(fd)


def _read_owner(folder: str) -> tuple[str, int, str] | None:
    """(host, pid, domain UUID) written into a scratch folder by the session that made it.

    A folder left by an older vmvault may be QEMU's (it handed the whole folder over), and what
    runs in QEMU may have put a link or a FIFO under the name: the name is opened without
    following a link and without blocking, and read only when it is a regular file."""
    try:
        fd = os.open(os.path.join(folder, _OWNER_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        host, pid, uuid = ([*os.read(fd, 4096).decode("utf-8").splitlines(), "", "", ""])[:3]
        return host, int(pid), uuid
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


# -- audit (vmvault audit libvirt:///) -----------------------------------------------------------


def audit(target: str, now: float) -> list[VmAudit]:
    """One report per domain of ``target`` (``libvirt:///`` every domain, ``libvirt:///NAME``
    one): its libvirt snapshots (the checkpoints that stand in for backups), the backup
    checkpoints (dirty bitmaps) with vmvault's beyond the newest one, and a backup job or
    scratch folder an interrupted vmvault run left."""
    loc = parse_location(target)
    lv = import_libvirt()
    uri = loc.uri or default_uri()
    conn = connect(lv, uri)
    try:
        try:
            doms = [conn.lookupByName(loc.domain)] if loc.domain else conn.listAllDomains(0)
        except lv.libvirtError as exc:
            raise HypervisorError(f"{target}: {error_message(exc)}") from exc
        return [
            _audit_domain(lv, Bounded(dom, loc.for_domain(str(dom.name()))), loc, now)
            for dom in sorted(doms, key=lambda d: str(d.name()))
        ]
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _created(xml_text: str) -> float | None:
    try:
        text = ET.fromstring(xml_text).findtext("creationTime") or ""
        return float(text)
    except (ET.ParseError, ValueError):
        return None


def _audit_domain(lv: Any, dom: Any, loc: Location, now: float) -> VmAudit:
    name = str(dom.name())
    report = VmAudit(name=name, id=str(dom.UUIDString()), location=loc.for_domain(name))
    items: list[dict[str, Any]] = []
    ages: list[float] = []
    try:
        snapshots = dom.listAllSnapshots(0)
        checkpoints = dom.listAllCheckpoints(0)
    except (lv.libvirtError, HypervisorError) as exc:
        report.problems.append(f"libvirt could not list the domain's snapshots and checkpoints: {error_message(exc)}")
        return report
    depth: dict[str, int] = {}
    for snap in snapshots:
        created = _created(snap.getXMLDesc(0))
        parent = ""
        with contextlib.suppress(lv.libvirtError):
            parent = str(snap.getParent(0).getName())
        depth[str(snap.getName())] = 0
        items.append({"name": snap.getName(), "type": "snapshot", "parent": parent, "created": created})
        if created is not None:
            ages.append(now - created)
    for item in items:  # depth in the snapshot tree
        d, seen, cur = 1, {item["name"]}, item["parent"]
        while cur and cur not in seen:
            seen.add(cur)
            d += 1
            cur = next((i["parent"] for i in items if i["name"] == cur), "")
        item["depth"] = d
    ours: list[tuple[float, str]] = []
    for cp in checkpoints:
        cp_name = str(cp.getName())
        created = _created(cp.getXMLDesc(lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        owner = "vmvault" if cp_name.startswith(CHECKPOINT_PREFIX) else "other"
        items.append({"name": cp_name, "type": "backup-checkpoint", "owner": owner, "created": created})
        if owner == "vmvault":
            ours.append((created or 0.0, cp_name))
    report.checkpoints = CheckpointSummary.of_ages(
        ages, count=len(snapshots), chain_depth=max((i.get("depth", 0) for i in items), default=0), items=items
    )
    if snapshots:
        report.problems.append(
            f"{len(snapshots)} libvirt snapshot(s): they live on the same storage as the domain and are not backups"
        )
    if len(ours) > 1:
        stale = ", ".join(n for _, n in sorted(ours)[:-1])
        report.problems.append(
            f"vmvault checkpoints beyond the newest: {stale} (left by an interrupted backup; the next backup "
            "deletes them)"
        )
    try:
        stats = dom.jobStats() if dom.isActive() else {}
        if stats.get("operation") == _JOB_OPERATION_BACKUP:
            desc = _parse_xml(dom.backupGetXMLDesc(), "a backup description")
            server = desc.find("server")
            sock = str(server.get("socket", "")) if server is not None else ""
            folder = _scratch_folder_of(sock)
            if folder is not None:
                owner_info = _read_owner(folder)
                alive = owner_info is not None and owner_info[0] == socket.gethostname() and _pid_alive(owner_info[1])
                if not alive:
                    report.problems.append(
                        f"a backup job left by an interrupted vmvault run is still open ({sock}); "
                        "the next backup ends it"
                    )
    except (lv.libvirtError, HypervisorError) as exc:
        report.problems.append(f"libvirt could not say whether a backup job runs: {error_message(exc)}")
    return report

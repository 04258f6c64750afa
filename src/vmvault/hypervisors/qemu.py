"""Live backup of a running QEMU VM over QMP: fleecing + NBD, with dirty-bitmap change tracking.

``QemuSource("qemu+unix:///run/vm1/qmp.sock?qga=/run/vm1/qga.sock")`` opens a session that

1. discovers the VM (``query-name``, ``query-uuid``, ``query-block``,
   ``query-named-block-nodes``): every disk device with a medium and its root node;
2. optionally freezes the guest's file systems through the guest agent;
3. freezes every disk at one instant with one QMP ``transaction`` (pull-mode "fleecing",
   as libvirt does it): per disk a scratch qcow2 overlay whose backing is the live node,
   a ``blockdev-backup sync=none`` job that copies each block into it before the guest
   overwrites it, a frozen disabled copy of the previous tracking bitmap and a new
   tracking bitmap;
4. thaws the guest, starts one NBD server on a unix socket in a private temp folder and
   exports each overlay read-only with its frozen bitmap (``qemu:dirty-bitmap:NAME``).

The engine reads the disks (``NbdImage``); ``complete`` makes the new bitmap the tracking
one; ``close`` removes exports, server, jobs, overlays, frozen bitmaps, the new bitmap when
the backup did not complete, and the temp folder. What stays on the VM is one
``vmvault-<token>`` bitmap per disk (persistent on qcow2, in memory only on raw disks).

See docs/design/qemu-live-backup.md for why pull mode, and the QMP sequence in full.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from vmvault import shape
from vmvault.errors import ConfigError, HypervisorError, SourceError
from vmvault.hypervisors._nbd import NbdImage
from vmvault.hypervisors._qmp import GuestAgentClient, NoAnswer, QmpClient, QmpError
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
from vmvault.platform import current_uid

__all__ = [
    "BITMAP_PREFIX",
    "CBT_KIND",
    "QemuBackupSession",
    "QemuSource",
    "QmpClient",
    "QmpError",
    "parse_location",
    "scratch_space_warning",
]

log = logging.getLogger(__name__)

SCHEME = "qemu+unix"
#: the ``kind`` of the change-tracking record this connector writes into ``SourceDisk.cbt``
CBT_KIND = "qemu-dirty-bitmap"
#: every bitmap, node, job and export vmvault makes starts with this, so leftovers are recognisable
BITMAP_PREFIX = "vmvault-"
_OBJ_PREFIX = "vmvault-"
_TEMP_PREFIX = "vmvault-qemu-"
#: the oldest QEMU whose QMP has everything the session uses
MIN_QEMU = (6, 0)


def parse_location(location: str) -> tuple[str, dict[str, str]]:
    """``qemu+unix:///path/qmp.sock?qga=/path/qga.sock&scratch=/dir`` -> (socket path, options)."""
    url = urlparse(location)
    if url.scheme != SCHEME or not url.path or url.netloc:
        raise ConfigError(f"not a QEMU location: {location!r} (expected {SCHEME}:///path/to/qmp.sock)")
    opts: dict[str, str] = {}
    for key, values in parse_qs(url.query, keep_blank_values=False).items():
        if key not in ("qga", "scratch"):
            raise ConfigError(f"{location}: unknown option {key!r} (known: qga, scratch)")
        opts[key] = values[-1]
    return unquote(url.path), opts


def scratch_space_warning(tempdir: str, worst: int) -> str | None:
    """A warning when the folder of ``tempdir`` has less free space than ``worst`` bytes.

    Fleecing overlays receive the old contents of every block the guest overwrites while a
    backup runs, at worst the whole disks. QEMU's backup job (7.2) fails the *guest's*
    write when it cannot copy a block out (ENOSPC), so a full scratch folder hurts the VM.
    Shared by the QEMU and libvirt connectors.
    """
    free = shutil.disk_usage(tempdir).free
    if free >= worst:
        return None
    return (
        f"the scratch folder {os.path.dirname(tempdir)} has {free >> 20} MiB free, less than the "
        f"{worst >> 20} MiB the disks could need if the guest rewrites them during the backup; "
        "guest writes fail once it is full (choose another with --scratch-dir DIR)"
    )


#: the folder, in a scratch folder, where a QEMU running as another user makes its NBD socket
SOCKET_FOLDER = "nbd"


def make_scratch_folder(prefix: str, parent: str | None, qemu_ids: tuple[int, int] | None) -> str:
    """A new scratch folder for one backup, in ``parent`` (the temporary folder by default).

    When QEMU runs as another user (``qemu_ids``; libvirt's qemu user, ``-runas``) the folder
    stays vmvault's and others may only pass through it (0711): QEMU opens the files handed to
    it by name but can neither list nor change the folder. Whatever runs in QEMU (the guest,
    taken over) could otherwise plant a link under the name where vmvault or libvirtd, both
    root, create and chown a scratch file next, and have a host file truncated or given to it.
    Shared by the QEMU and libvirt connectors.
    """
    folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
    if qemu_ids is not None:
        os.chmod(folder, 0o711)
    return folder


def hand_to_qemu(path: str, qemu_ids: tuple[int, int]) -> None:
    """Give ``path`` (a file or folder vmvault just made in its own scratch folder) to QEMU's
    user, by the open file: a link is never followed. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, *qemu_ids)
    finally:
        os.close(fd)


def socket_folder(tempdir: str, qemu_ids: tuple[int, int] | None) -> str:
    """The folder QEMU makes its NBD socket in: ``tempdir`` itself, or when QEMU runs as
    another user a folder of QEMU's own in it (QEMU must create the socket; the scratch folder
    stays closed to it). A link there may lead vmvault's client to another socket: the client
    says nothing before the server's NBD greeting, which only an NBD server sends."""
    if qemu_ids is None:
        return tempdir
    folder = os.path.join(tempdir, SOCKET_FOLDER)
    os.mkdir(folder, 0o700)
    try:
        hand_to_qemu(folder, qemu_ids)
    except OSError as exc:
        raise HypervisorError(
            f"QEMU runs as uid {qemu_ids[0]} and cannot make its NBD socket in {folder} ({exc.strerror}); "
            "run vmvault as root"
        ) from exc
    return folder


@dataclass
class _Disk:
    """One disk device of the VM as QMP describes it."""

    device: str  # qdev id: "vda"
    qdev: str  # QOM path of the block backend (for qemu-io -d / qom-set), or the id
    node: str  # root node of the device: where bitmaps live and what the job copies from
    format: str  # "qcow2", "raw", ...
    file: str
    size: int
    qcow2_v3: bool
    bitmaps: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Plan:
    """What one session does to one disk, filled in as it is done (close undoes it)."""

    disk: _Disk
    index: int
    new_bitmap: str
    persistent: bool
    previous: str | None = None  # usable previous tracking bitmap
    previous_any: str | None = None  # the bitmap the previous snapshot recorded, usable or not
    frozen: str | None = None  # disabled copy of ``previous`` taken in the transaction
    fleece_node: str = ""
    cbw_node: str = ""
    job: str = ""
    export: str = ""
    scratch: str = ""
    granularity: int = 0


def _bitmaps_of(nodes: dict[str, dict[str, Any]], node: str) -> dict[str, dict[str, Any]]:
    """The named dirty bitmaps of ``node`` (jobs add anonymous ones, which are skipped)."""
    return {b["name"]: b for b in nodes.get(node, {}).get("dirty-bitmaps") or [] if b.get("name")}


def _scratch_path(filename: str) -> str:
    """The scratch file of a fleecing node; QEMU names an overlay with an overridden backing
    ``json:{..., "file": {"filename": ...}}``."""
    if not filename.startswith("json:"):
        return filename
    try:
        return str(shape.loads(filename[5:])["file"]["filename"])
    except (ValueError, KeyError, TypeError):
        return ""


def _device_id(block: dict[str, Any]) -> str:
    qdev = str(block.get("qdev") or "")
    parts = qdev.strip("/").split("/")
    if qdev.startswith("/machine/peripheral/") and len(parts) >= 3:
        return parts[2]  # /machine/peripheral/<id>/virtio-backend
    if qdev and "/" not in qdev:
        return qdev  # devices whose backend is the device itself (ide-hd, scsi-hd): the id
    if block.get("device"):
        return str(block["device"])  # -drive without an id on the device: the drive id
    return str(block.get("inserted", {}).get("node-name") or qdev)


class QemuSource(Source):
    """A running QEMU VM reached through its QMP unix socket."""

    kind = "qemu"

    def __init__(
        self,
        location: str,
        *,
        qga: str | None = None,
        scratch_dir: str | None = None,
        timeout: float = 30.0,
        nbd_backend: str = "python",
    ) -> None:
        self.socket_path, opts = parse_location(location)
        self.location = f"{SCHEME}://{self.socket_path}"
        self.qga = qga or opts.get("qga")
        self.scratch_dir = scratch_dir or opts.get("scratch")
        self.timeout = timeout
        self.nbd_backend = nbd_backend

    def open_session(
        self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS
    ) -> QemuBackupSession:
        scratch = self.scratch_dir
        if options.scratch_dir is not None:
            if scratch is not None and os.path.abspath(scratch) != os.path.abspath(options.scratch_dir):
                raise ConfigError(
                    f"{self.location}: two scratch folders given, {scratch} (in the location) and "
                    f"{options.scratch_dir} (the option); give one"
                )
            scratch = options.scratch_dir
        if scratch is not None and not os.path.isdir(scratch):
            raise ConfigError(f"{self.location}: the scratch folder {scratch} is not a folder")
        session = QemuBackupSession(self, scratch)
        return open_or_clean_up(session, lambda: session._open(previous), self.location)


class QemuBackupSession(BackupSession):
    """A frozen, NBD-exported view of every disk of one running VM. Always ``close`` it."""

    def __init__(self, source: QemuSource, scratch_dir: str | None = None) -> None:
        self.source = source
        #: the folder for the fleecing overlays and the NBD socket (None: the system's temp folder)
        self.scratch_dir = scratch_dir
        self.vm: dict[str, Any] = {"hypervisor": "qemu"}
        self.disks: list[SourceDisk] = []
        self.files: list[SourceFile] = []
        self.consistency = "crash-consistent"
        self.warnings: list[str] = []
        self.extra: dict[str, Any] = {}
        self.token = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self.tempdir: str | None = None
        self.nbd_socket: str | None = None
        self._qmp: QmpClient | None = None
        self._plans: list[_Plan] = []
        self._images: list[NbdImage] = []
        self._fleece_added: list[str] = []
        self._jobs: list[str] = []
        self._frozen: list[tuple[str, str]] = []
        self._new: list[tuple[str, str]] = []
        self._exports: list[str] = []
        self._nbd_started = False
        self._guest_frozen = False
        self._completed = False
        self._closed = False
        #: QEMU went silent during the teardown: it may still write into the scratch folder
        self._qemu_holds_scratch = False

    # -- helpers ------------------------------------------------------------------------------
    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None or not self._qmp.connected:
            raise HypervisorError(f"{self.source.location}: the QMP connection is closed")
        return self._qmp

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def _named_nodes(self) -> dict[str, dict[str, Any]]:
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True})
        return {n["node-name"]: n for n in nodes}

    # -- opening ------------------------------------------------------------------------------
    def _open(self, previous: PreviousBackup | None) -> None:
        src = self.source
        self._qmp = QmpClient(src.socket_path, timeout=src.timeout).connect()
        self._sweep_leftover_objects()
        disks = self._discover()
        if not disks:
            raise HypervisorError(f"{src.location}: the VM has no disk with a medium to back up")
        self._plan(disks, previous)
        self.tempdir = make_scratch_folder(_TEMP_PREFIX, self.scratch_dir, self._other_qemu_ids())
        self._check_scratch_space(disks)
        for plan in self._plans:
            self._add_fleece_node(plan)
        self._freeze(self._freeze_actions())
        self._start_exports()
        self._open_disks()

    def _qemu_ids(self) -> tuple[int, int] | None:
        """The effective uid and gid QEMU runs as now (libvirt and ``-runas`` drop root after
        start-up, so the credentials of the socket are not the ones to trust)."""
        pid = self.vm.get("pid")
        if not isinstance(pid, int):
            return None
        ids: dict[str, int] = {}
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Uid", "Gid"):
                        ids[key] = int(rest.split()[1])  # real, effective, saved, fs
        except (OSError, ValueError, IndexError):
            return None
        return (ids["Uid"], ids["Gid"]) if len(ids) == 2 else None

    def _other_qemu_ids(self) -> tuple[int, int] | None:
        """QEMU's (uid, gid) when it runs as another user than vmvault (libvirt's qemu user)."""
        ids = self._qemu_ids()
        return None if ids is None or ids[0] == current_uid() else ids

    def _share_with_qemu(self, path: str) -> None:
        """Hand ``path`` (a scratch file vmvault just made in its own folder) to QEMU when it runs
        as another user (``hand_to_qemu``)."""
        ids = self._other_qemu_ids()
        if ids is None:
            return
        try:
            hand_to_qemu(path, ids)
        except OSError as exc:
            self._warn(f"QEMU runs as uid {ids[0]} and cannot use {path} ({exc.strerror}); run vmvault as root")

    def _check_scratch_space(self, disks: list[_Disk]) -> None:
        assert self.tempdir is not None
        warning = scratch_space_warning(self.tempdir, sum(d.size for d in disks))
        if warning:
            self._warn(warning)

    def _discover(self) -> list[_Disk]:
        qmp = self.qmp
        name = qmp.execute("query-name").get("name")
        uuid = qmp.execute("query-uuid").get("UUID")
        version = qmp.execute("query-version")
        machine = ""
        with contextlib.suppress(QmpError):
            machine = str(qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
            machine = machine.removesuffix("-machine")
        qv = version.get("qemu", {})
        if (qv.get("major", 0), qv.get("minor", 0)) < MIN_QEMU:
            # block-export-add with a list of bitmaps (and the rest of the sequence) needs 6.0
            raise HypervisorError(
                f"{self.source.location}: QEMU {qv.get('major')}.{qv.get('minor')} is too old for live "
                f"backup; vmvault needs QEMU {MIN_QEMU[0]}.{MIN_QEMU[1]} or newer (tested with 7.2)"
            )
        self.vm.update(
            {
                "name": name,
                "uuid": uuid,
                "qemu_version": f"{qv.get('major')}.{qv.get('minor')}.{qv.get('micro')}",
                "qemu_package": version.get("package", "").strip(),
                "machine": machine,
                "status": qmp.execute("query-status").get("status"),
            }
        )
        with contextlib.suppress(QmpError):
            self.vm["memory"] = int(qmp.execute("query-memory-size-summary")["base-memory"])
        with contextlib.suppress(QmpError):
            self.vm["cpus"] = len(qmp.execute("query-cpus-fast"))
        models = self._peripherals()
        pid = qmp.peer_pid()
        if pid is not None:
            self.vm["pid"] = pid
            # The command line is a cheap recipe to rebuild the VM (restore as a clone).
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                self.vm["cmdline"] = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        nodes = self._named_nodes()
        disks: list[_Disk] = []
        media: list[dict[str, Any]] = []
        for block in qmp.execute("query-block"):
            ins = block.get("inserted")
            device = _device_id(block)
            if not ins:
                continue  # an empty CD-ROM or floppy drive: nothing to back up
            image = ins.get("image", {})
            fmt = str(image.get("format") or ins.get("drv"))
            fileinfo = {"device": device, "file": ins.get("file"), "format": fmt, "size": image.get("virtual-size")}
            if ins.get("ro"):
                media.append(fileinfo)  # an installation ISO and the like: the guest cannot change it
                self._warn(f"{device}: read-only medium {ins.get('file')} is recorded but not backed up")
                continue
            node = str(ins["node-name"])
            specific = image.get("format-specific", {})
            disks.append(
                _Disk(
                    device=device,
                    qdev=str(block.get("qdev") or device),
                    node=node,
                    format=fmt,
                    file=str(ins.get("file") or image.get("filename")),
                    size=int(image["virtual-size"]),
                    qcow2_v3=fmt == "qcow2" and specific.get("data", {}).get("compat") == "1.1",
                    bitmaps=_bitmaps_of(nodes, node),
                )
            )
        names = [d.device for d in disks]
        if len(set(names)) != len(names):
            raise HypervisorError(f"{self.source.location}: two disks share a name in {names}; give each device an id")
        self.vm["disks"] = [
            {
                "device": d.device,
                "qdev": d.qdev,
                "node": d.node,
                "format": d.format,
                "file": d.file,
                "size": d.size,
                "model": models.get(d.device, ""),
            }
            for d in disks
        ]
        self.vm["media"] = media
        return disks

    def _peripherals(self) -> dict[str, str]:
        """Device id -> QOM type of every device with an id; records NICs and their MACs."""
        models: dict[str, str] = {}
        nics: list[dict[str, str]] = []
        try:
            children = self.qmp.execute("qom-list", {"path": "/machine/peripheral"})
        except QmpError:
            return models
        for child in children:
            kind = str(child.get("type", ""))
            if not kind.startswith("child<"):
                continue
            models[child["name"]] = kind[6:-1]
            try:
                mac = self.qmp.execute("qom-get", {"path": f"/machine/peripheral/{child['name']}", "property": "mac"})
            except QmpError:
                continue  # not a network card
            nics.append({"id": child["name"], "model": kind[6:-1], "mac": str(mac)})
        self.vm["nics"] = nics
        return models

    def _sweep_leftover_objects(self) -> None:
        """Remove exports, jobs and nodes a crashed vmvault run left in this QEMU."""
        qmp = self.qmp
        exports = [e["id"] for e in qmp.execute("query-block-exports") if e["id"].startswith(_OBJ_PREFIX)]
        jobs = [j["device"] for j in qmp.execute("query-block-jobs") if j["device"].startswith(_OBJ_PREFIX)]
        if not exports and not jobs and not any(n.startswith(_OBJ_PREFIX + "fl") for n in self._named_nodes()):
            return
        for exp in exports:
            self._warn(f"removing export {exp} left by an interrupted vmvault backup")
            self._del_export(exp)
        if exports and not [e for e in qmp.execute("query-block-exports")]:
            with contextlib.suppress(QmpError):
                qmp.execute("nbd-server-stop")
        for job in jobs:
            self._warn(f"cancelling block job {job} left by an interrupted vmvault backup")
            self._cancel_job(job)
        for name, node in self._named_nodes().items():
            if name.startswith(_OBJ_PREFIX + "fl"):
                self._warn(f"removing node {name} ({node.get('file')}) left by an interrupted vmvault backup")
                qmp.execute("blockdev-del", {"node-name": name})
                folder = os.path.dirname(_scratch_path(str(node.get("file") or "")))
                if self._is_own_scratch(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                elif folder:
                    self._warn(f"not removing {folder}, named by that node: not a scratch folder of this user's "
                               f"in {self._scratch_parent()} (remove it yourself if it is vmvault's)")  # fmt: skip

    def _scratch_parent(self) -> str:
        return self.scratch_dir or tempfile.gettempdir()

    def _is_own_scratch(self, folder: str) -> bool:
        """Whether ``folder`` is one this session could have made: a real folder of this user's
        named ``vmvault-qemu-*`` directly in the scratch folder. A node's file name is QEMU's
        word, and QEMU runs what the guest may have taken over: it could name any folder."""
        if not os.path.basename(folder).startswith(_TEMP_PREFIX):
            return False
        above = os.path.dirname(folder)
        if above != os.path.normpath(above) or os.path.realpath(above) != os.path.realpath(self._scratch_parent()):
            return False
        try:
            st = os.lstat(folder)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_uid == current_uid()

    def _plan(self, disks: list[_Disk], previous: PreviousBackup | None) -> None:
        uuid = self.vm.get("uuid")
        short = self.token[-6:]
        for i, disk in enumerate(disks):
            plan = _Plan(
                disk=disk,
                index=i,
                new_bitmap=f"{BITMAP_PREFIX}{self.token}",
                # qcow2 v3 stores bitmaps in the image; raw (and qcow2 v2) cannot, so the
                # bitmap lives in QEMU's memory only and a restart of QEMU loses it.
                persistent=disk.qcow2_v3,
                fleece_node=f"{_OBJ_PREFIX}fl{i}-{short}",
                cbw_node=f"{_OBJ_PREFIX}cbw{i}-{short}",
                job=f"{_OBJ_PREFIX}job{i}-{short}",
                export=f"{_OBJ_PREFIX}exp{i}-{short}",
            )
            record = previous.disks.get(disk.device) if previous is not None else None
            if record is not None and record.get("kind") == CBT_KIND:
                plan.previous_any = str(record.get("bitmap"))
            reason = self._unusable(disk, record, uuid, previous)
            if reason is None:
                plan.previous = plan.previous_any
                plan.frozen = f"{plan.new_bitmap}-frozen{i}"
            else:
                self._warn(f"{disk.device}: reading the whole disk: {reason}")
            for name in sorted(disk.bitmaps):
                if name.startswith(BITMAP_PREFIX) and name != plan.previous_any:
                    self._warn(f"{disk.device}: removing bitmap {name} left by an earlier, unfinished backup")
                    self.qmp.execute("block-dirty-bitmap-remove", {"node": disk.node, "name": name})
            self._plans.append(plan)

    @staticmethod
    def _unusable(disk: _Disk, record: dict[str, Any] | None, uuid: Any, previous: PreviousBackup | None) -> str | None:
        """Why the previous tracking bitmap cannot give a correct incremental, or None."""
        if previous is None:
            return "no previous snapshot"
        if record is None or record.get("kind") != CBT_KIND:
            return f"snapshot {previous.snapshot_id} recorded no dirty bitmap for this disk"
        name = record.get("bitmap")
        if record.get("vm_uuid") != uuid:
            return f"snapshot {previous.snapshot_id} is of VM {record.get('vm_uuid')}, this is {uuid}"
        if record.get("node") != disk.node:
            return f"the disk moved from node {record.get('node')} to {disk.node}"
        if record.get("disk_size") != disk.size:
            return f"the disk was resized from {record.get('disk_size')} to {disk.size} bytes"
        info = disk.bitmaps.get(str(name))
        if info is None:
            why = (
                "a bitmap kept only in QEMU's memory (raw disk) is lost when QEMU restarts"
                if not record.get("persistent")
                else "it was removed or renamed outside vmvault, or QEMU was killed before it could save it"
            )
            return f"tracking bitmap {name} is missing from node {disk.node} ({why})"
        if info.get("inconsistent"):
            return f"tracking bitmap {name} is inconsistent (QEMU stopped without saving it)"
        if not info.get("recording", False):
            return f"tracking bitmap {name} is disabled, so it missed writes"
        if info.get("busy"):
            return f"tracking bitmap {name} is in use by another operation"
        if info.get("granularity") != record.get("granularity"):
            return (
                f"tracking bitmap {name} has granularity {info.get('granularity')}, "
                f"recorded {record.get('granularity')}"
            )
        return None

    def _add_fleece_node(self, plan: _Plan) -> None:
        """A scratch qcow2 overlay whose backing is the live node: it reads as the disk did at
        the freeze, because the backup job copies every old block into it before a guest write."""
        assert self.tempdir is not None
        plan.scratch = os.path.join(self.tempdir, f"scratch-{plan.disk.device}.qcow2")
        try:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", plan.scratch, str(plan.disk.size)],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except FileNotFoundError as exc:
            raise HypervisorError("qemu-img is not installed (Debian package qemu-utils)") from exc
        except subprocess.CalledProcessError as exc:
            raise HypervisorError(f"{plan.scratch}: qemu-img create failed: {exc.stderr.strip()}") from exc
        self._share_with_qemu(plan.scratch)
        self.qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": plan.fleece_node,
                "backing": plan.disk.node,
                "file": {"driver": "file", "filename": plan.scratch},
            },
        )
        self._fleece_added.append(plan.fleece_node)

    def _freeze_actions(self) -> list[dict[str, Any]]:
        """The single transaction that freezes every disk at the same instant."""
        actions: list[dict[str, Any]] = []
        for plan in self._plans:
            node = plan.disk.node
            if plan.frozen is not None:
                gran = plan.disk.bitmaps[str(plan.previous)]["granularity"]
                actions.append(
                    {
                        "type": "block-dirty-bitmap-add",
                        "data": {
                            "node": node,
                            "name": plan.frozen,
                            "persistent": False,
                            "disabled": True,
                            "granularity": gran,
                        },
                    }
                )
                actions.append(
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {"node": node, "target": plan.frozen, "bitmaps": [plan.previous]},
                    }
                )
            new: dict[str, Any] = {"node": node, "name": plan.new_bitmap, "persistent": plan.persistent}
            if plan.previous is not None:
                new["granularity"] = plan.disk.bitmaps[plan.previous]["granularity"]
            actions.append({"type": "block-dirty-bitmap-add", "data": new})
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "device": node,
                        "target": plan.fleece_node,
                        "sync": "none",
                        "job-id": plan.job,
                        "filter-node-name": plan.cbw_node,
                    },
                }
            )
        return actions

    def _freeze(self, actions: list[dict[str, Any]]) -> None:
        agent: GuestAgentClient | None = None
        frozen_fs = 0
        if self.source.qga:
            try:
                agent = GuestAgentClient(self.source.qga).connect()
                frozen_fs = agent.execute("guest-fsfreeze-freeze", timeout=60)
                self._guest_frozen = True
            except HypervisorError as exc:
                self._warn(f"guest file systems not frozen, the backup is crash-consistent: {exc}")
                if agent is not None:
                    self._thaw(agent)  # a freeze that failed half-way may have frozen some
                    agent.close()
                agent = None
        try:
            self.qmp.execute("transaction", {"actions": actions})
        finally:
            if agent is not None:
                self._thaw(agent)
                agent.close()
        if agent is not None:
            # The freeze held while the transaction ran; a failed thaw is warned about (and
            # retried in close) but does not change what the snapshot is.
            if isinstance(frozen_fs, int) and frozen_fs > 0:
                self.consistency = "filesystem-consistent"
            else:
                self._warn("the guest agent froze no file system; the backup is crash-consistent")
        for plan in self._plans:
            self._jobs.append(plan.job)
            self._new.append((plan.disk.node, plan.new_bitmap))
            if plan.frozen is not None:
                self._frozen.append((plan.disk.node, plan.frozen))

    def _thaw(self, agent: GuestAgentClient | None = None) -> bool:
        """Thaw the guest's file systems; True when the agent confirmed it."""
        own = agent is None
        try:
            if agent is None:
                assert self.source.qga is not None
                agent = GuestAgentClient(self.source.qga).connect()
            agent.execute("guest-fsfreeze-thaw", timeout=60)
            self._guest_frozen = False
            return True
        except HypervisorError as exc:
            self._warn(f"could not thaw the guest's file systems (guest-fsfreeze-thaw): {exc}")
            return False
        finally:
            if own and agent is not None:
                agent.close()

    def _start_exports(self) -> None:
        assert self.tempdir is not None
        qmp = self.qmp
        self.nbd_socket = os.path.join(socket_folder(self.tempdir, self._other_qemu_ids()), "nbd.sock")
        addr = {"addr": {"type": "unix", "data": {"path": self.nbd_socket}}}
        try:
            qmp.execute("nbd-server-start", addr)
        except QmpError as exc:
            # One NBD server per QEMU. A server without any export serves nobody: it is what a
            # backup interrupted between nbd-server-start and block-export-add leaves behind.
            if "already running" not in exc.desc or qmp.execute("query-block-exports"):
                raise
            self._warn("stopping an NBD server without exports, left by an interrupted backup")
            qmp.execute("nbd-server-stop")
            qmp.execute("nbd-server-start", addr)
        self._nbd_started = True
        for plan in self._plans:
            args: dict[str, Any] = {
                "type": "nbd",
                "id": plan.export,
                "node-name": plan.fleece_node,
                "name": plan.disk.device,
                "writable": False,
            }
            if plan.frozen is not None:
                # The live bitmap cannot be exported read-only; the frozen copy is disabled.
                # QEMU finds it through the overlay's backing chain.
                args["bitmaps"] = [plan.frozen]
            qmp.execute("block-export-add", args)
            self._exports.append(plan.export)

    def _open_disks(self) -> None:
        assert self.nbd_socket is not None
        nodes = self._named_nodes()
        uuid = self.vm.get("uuid")
        for plan in self._plans:
            disk = plan.disk
            bitmaps = _bitmaps_of(nodes, disk.node)
            plan.granularity = int(bitmaps[plan.new_bitmap]["granularity"])
            image = NbdImage(self.nbd_socket, disk.device, bitmap=plan.frozen, backend=self.source.nbd_backend)
            self._images.append(image)
            if image.size != disk.size:
                raise HypervisorError(f"{disk.device}: NBD export has {image.size} bytes, the disk {disk.size}")
            changed = image.dirty_extents() if plan.frozen is not None else None
            self.disks.append(
                SourceDisk(
                    name=disk.device,
                    image=image,
                    format=disk.format,
                    changed=changed,
                    cbt={
                        "kind": CBT_KIND,
                        "bitmap": plan.new_bitmap,
                        "node": disk.node,
                        "persistent": plan.persistent,
                        "vm_uuid": uuid,
                        "disk_size": disk.size,
                        "granularity": plan.granularity,
                    },
                    meta={
                        "device": disk.device,
                        "qdev": disk.qdev,
                        "node": disk.node,
                        "file": disk.file,
                        "incremental_from": plan.previous,
                    },
                )
            )
        self.extra["qemu"] = {
            "method": "fleecing-nbd",
            "token": self.token,
            "bitmaps": {
                p.disk.device: {"new": p.new_bitmap, "previous": p.previous, "persistent": p.persistent}
                for p in self._plans
            },
        }

    # -- commit and teardown -----------------------------------------------------------------
    def complete(self, snapshot_id: str) -> None:
        """The snapshot is stored: the new bitmaps track from now on, the previous ones go."""
        if self._closed:
            raise HypervisorError(f"{self.source.location}: complete() after close()")
        self._completed = True
        self.extra.setdefault("qemu", {})["snapshot_id"] = snapshot_id
        nodes = self._named_nodes()
        for plan in self._plans:
            old = plan.previous_any
            present = _bitmaps_of(nodes, plan.disk.node)
            if old and old != plan.new_bitmap and old in present:
                try:
                    self.qmp.execute("block-dirty-bitmap-remove", {"node": plan.disk.node, "name": old})
                except QmpError as exc:
                    self._warn(f"{plan.disk.device}: old tracking bitmap {old} stays: {exc}")

    def _del_export(self, export: str) -> None:
        # mode=hard drops clients still connected (a reader that hung); the export is gone
        # only when BLOCK_EXPORT_DELETED arrives.
        self.qmp.execute("block-export-del", {"id": export, "mode": "hard"})
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == export)

    def _cancel_job(self, job: str) -> None:
        # A sync=none job never completes on its own: cancel it and wait until it is gone.
        self.qmp.execute("block-job-cancel", {"device": job, "force": True})
        self.qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d.get("device") == job)

    def close(self) -> None:
        """Remove everything the session added to the VM. Safe to call many times."""
        if self._closed:
            return
        failures: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            # A refused command or a file error is recorded and the teardown goes on; a lost
            # QMP connection propagates to _teardown_or_confirm_gone, which reconnects.
            try:
                fn()
            except (QmpError, SourceError, OSError) as exc:
                failures.append(f"{what}: {exc}")

        try:
            for image in self._images:
                step("closing NBD connections", image.close)
            if self._guest_frozen:
                self._thaw()
            if self._qmp is not None:  # None: the QMP connection never opened, nothing was added
                try:
                    self._teardown_or_confirm_gone(step)
                except HypervisorError as exc:
                    failures.append(str(exc))
            if self.tempdir is not None and os.path.exists(self.tempdir) and not self._qemu_holds_scratch:
                step("removing the scratch folder", lambda: shutil.rmtree(str(self.tempdir)))
        finally:
            # whatever went wrong above: QEMU serves one QMP client at a time, and a connection
            # left open would refuse every later backup of this VM by a daemon that lives on
            if self._qmp is not None:
                self._qmp.close()
            self._closed = True
        if failures:
            for f in failures:
                self._warn(f"cleanup: {f}")
            raise HypervisorError(
                f"{self.source.location}: the backup session left things behind: " + "; ".join(failures)
            )

    def _teardown_or_confirm_gone(self, step: Callable[[str, Callable[[], object]], None]) -> None:
        """Undo the session in QEMU; when the QMP connection dropped, reconnect once and retry.

        If QEMU cannot be reached again it has exited, and everything the session added
        lived in that process (a persistent bitmap QEMU stored on the way out is removed by
        the next session as a leftover). A QEMU that takes the connection but does not answer
        is still there (stopped, stuck on its storage, or another client holds its QMP
        socket): what the session added may remain, and the error says what. The teardown
        looks at what is present before each removal, so running it again after a partial run
        is safe.
        """
        assert self._qmp is not None
        for attempt in (1, 2):
            if attempt == 2 or not self._qmp.connected:
                self._qmp.close()
                try:
                    self._qmp = QmpClient(self.source.socket_path, timeout=self.source.timeout).connect()
                except NoAnswer as exc:
                    raise self._silent(exc) from exc
                except HypervisorError as exc:
                    self._warn(f"QEMU is no longer reachable, so nothing of this session remains in it ({exc})")
                    return
            try:
                self._teardown_qemu(step)
                return
            except QmpError:
                raise
            except NoAnswer as exc:
                if attempt == 2:
                    raise self._silent(exc) from exc
            except HypervisorError:
                if attempt == 2:
                    raise

    def _silent(self, exc: NoAnswer) -> HypervisorError:
        """The error of a teardown QEMU did not answer, naming what may remain in the VM. The
        scratch folder is kept: QEMU may still write into its files, and space used by a
        removed file it holds open would be seen nowhere."""
        self._qemu_holds_scratch = True
        added = [
            *(f"NBD export {e}" for e in self._exports),
            *(["its NBD server"] if self._nbd_started else []),
            *(f"block job {j}" for j in self._jobs),
            *(f"copy-before-write node {n} (the guest's writes are slower while it stays)" for n in self._fleece_added),
            *(f"dirty bitmap {name}" for _, name in [*self._frozen, *([] if self._completed else self._new)]),
        ]
        kept = f"; the scratch folder {self.tempdir} is kept, as QEMU may still write into it" if self.tempdir else ""
        return HypervisorError(
            f"{exc}: QEMU is still there (stopped, stuck or busy) but did not answer, so what this backup "
            f"added may remain in the VM: {', '.join(added) or 'nothing known'}{kept}. The next backup of this "
            "VM removes it once QEMU answers again."
        )

    def _teardown_qemu(self, step: Callable[[str, Callable[[], object]], None]) -> None:
        qmp = self.qmp
        present_exports = {e["id"] for e in qmp.execute("query-block-exports")}
        for exp in self._exports:
            if exp in present_exports:
                step(f"block-export-del {exp}", functools.partial(self._del_export, exp))
        if self._nbd_started:

            def stop() -> None:
                try:
                    qmp.execute("nbd-server-stop")
                except QmpError as exc:
                    if "not running" not in exc.desc:
                        raise

            step("nbd-server-stop", stop)
            self._nbd_started = False
        present_jobs = {j["device"] for j in qmp.execute("query-block-jobs")}
        for job in self._jobs:
            if job in present_jobs:
                step(f"block-job-cancel {job}", functools.partial(self._cancel_job, job))
        nodes = self._named_nodes()
        for node in self._fleece_added:
            if node in nodes:
                step(f"blockdev-del {node}", functools.partial(qmp.execute, "blockdev-del", {"node-name": node}))
        remove = list(self._frozen) + ([] if self._completed else list(self._new))
        for node, name in remove:
            present = _bitmaps_of(nodes, node)
            if name in present:
                cmd = "block-dirty-bitmap-remove"
                step(f"{cmd} {name}", functools.partial(qmp.execute, cmd, {"node": node, "name": name}))

"""The Hyper-V connector: a VM's live backup through a recovery checkpoint and RCT.

``HyperVSource`` / ``HyperVSession`` are the connector users run. They talk to the host only
through the steps of ``steps.HostClient``; the transport decides where the steps run
(``LocalPowerShell``, ``WinRmTransport``, or the lab host of ``vmvault.testing``, which does
the same on real VHDX files so this module is exercised end to end by the lab tests).

A backup (each line one or more steps):

1. ``resolve`` the VM name to exactly one VM ID (names are compared literally; several VMs of
   one name are refused, naming their IDs), then ``describe`` it by ID: drives, checkpoints,
   its own configuration files;
2. ``enable_merge``: disk merging left suspended (``Msvm_DiskMergeSettingData.EnabledState``
   0) is re-enabled, with a warning;
3. ``list_recovery`` + ``destroy_checkpoint``: recovery checkpoints of ours left by a crashed
   backup are removed; one of a backup still running stops this one (``recovery``);
   ``list_reference_points`` + ``destroy_reference_point``: our older reference points go;
4. ``create_recovery``: ``CreateSnapshot`` with SnapshotType 32768, ConsistencyLevel 1
   (application-consistent; 2 only when allowed and VSS failed) and GuestBackupType set
   explicitly; the checkpoint comes from the job and is named with our marker; a journal
   written before the call lets cleanup find it whatever happens;
5. ``checkpoint_disks``: the frozen virtual hard disks (DVD/floppy images excluded by
   ResourceSubType); every VM disk the checkpoint does not hold (pass-through, Fibre Channel)
   is named in the snapshot and the summary;
6. the frozen chains are read through ``path_map`` with our VHDX reader; changed ranges
   come from ``changes`` (``GetVirtualDiskChanges``), called until the whole disk is covered;
7. after the snapshot is stored: ``host_of`` (a live migration during the backup fails it),
   ``convert`` (``ConvertToReferencePoint``), and the new RCT ids are kept, paired with the
   disks through the reference point's ``VirtualDiskIdentifiers``.

Every failure removes the recovery checkpoint; if that fails too, the journal makes the
next backup remove it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from vmvault.disk import ParentRule, open_checked, open_image, real_path
from vmvault.disk.base import DiskImage
from vmvault.errors import ConfigError, HypervisorError, SourceError, VmvaultError
from vmvault.hypervisors.base import (
    DEFAULT_OPTIONS,
    BackupOptions,
    BackupSession,
    PreviousBackup,
    Source,
    SourceDisk,
    SourceFile,
)
from vmvault.hypervisors.hyperv.recovery import (
    STALE_AFTER,
    Journal,
    Marker,
    RctState,
    owner_alive,
    run_ended,
    run_started,
)
from vmvault.hypervisors.hyperv.steps import (
    SUBTYPE_HARD_DISK,
    CreatedCheckpoint,
    HostClient,
    ReferencePoint,
    SnapshotDisk,
    StepTransport,
    VmDescription,
    guid,
)
from vmvault.hypervisors.hyperv.transports import LocalPowerShell, WinRmOptions, WinRmTransport
from vmvault.hypervisors.openers import bytes_opener, checked_opener

__all__ = [
    "CONSISTENCY_APPLICATION",
    "CONSISTENCY_CRASH",
    "DEFAULT_TIMEOUT",
    "GUEST_BACKUP_COPY",
    "GUEST_BACKUP_FULL",
    "HyperVSession",
    "HyperVSource",
    "PathMap",
    "inventory",
    "register_restored",
]

CONSISTENCY_APPLICATION, CONSISTENCY_CRASH = 1, 2
#: Msvm_VirtualSystemSnapshotSettingData.GuestBackupType: Full lets the guest's VSS writers
#: truncate their logs (what a backup product should do); Copy leaves the guest's own backup
#: chain alone
GUEST_BACKUP_FULL, GUEST_BACKUP_COPY = 1, 2
DEFAULT_TIMEOUT = 900.0
#: the largest range asked of GetVirtualDiskChanges at once
CHANGES_WINDOW = 1 << 40
MAX_CONFIG_BYTES = 64 * 1024 * 1024


class PathMap:
    """Host paths (``C:\\Hyper-V\\web.vhdx``) as paths readable here.

    ``strict`` (a remote host): the host names its files, and a host taken over could name any
    path (``/etc/shadow``, ``C:\\Windows\\...`` of this machine) or put links on its share that
    lead here. Then every path must lie under a ``path_map`` prefix, and every file opened must
    really lie in the folder it is mapped to (the kernel's path of the open file, links
    resolved), its parents too. Without ``strict`` (the local host, the lab) paths open as they
    are.
    """

    def __init__(self, spec: str | None, *, strict: bool = False) -> None:
        self.strict = strict
        self.pairs: list[tuple[str, str]] = []
        for item in (spec or "").split(";"):
            if "=" in item:
                win, local = item.split("=", 1)
                self.pairs.append((win.replace("/", "\\").lower(), local))
        self.rule = ParentRule.inside(local for _win, local in self.pairs) if strict else ParentRule()

    def __call__(self, host_path: str) -> str:
        norm = host_path.replace("/", "\\")
        for win, local in self.pairs:
            if norm.lower().startswith(win):
                rest = norm[len(win) :].lstrip("\\")
                parts = [p for p in rest.split("\\") if p]
                if any(p in (".", "..") for p in parts):
                    raise SourceError(f"{host_path}: a host path with '.' or '..' is refused")
                return os.path.join(local, *parts)
        if self.strict:
            prefixes = ", ".join(win for win, _local in self.pairs) or "none given"
            raise SourceError(
                f"{host_path}: the host named a file under no path_map prefix ({prefixes}); a remote host's "
                "files are read only where path_map maps them"
            )
        return host_path  # on Windows, local and UNC paths open as they are

    def check_opened(self, host_path: str, local: str, fd: int) -> None:
        """Raise SourceError when ``strict`` and the file open on ``fd`` is outside every mapped folder."""
        if not self.strict:
            return
        real = real_path(fd, local)
        if not self.rule.allows(real):
            raise SourceError(
                f"{host_path} (read as {local}) is {real}, outside the path_map folders ({self.rule.describe()}): "
                "a link on the host's share leads out of it"
            )

    def open(self, host_path: str, *, what: str) -> tuple[str, int, os.stat_result]:
        """(local path, fd, fstat) of a host file (not a link, a regular file), checked as above."""
        local = self(host_path)
        try:
            fd, st = open_checked(local, block_devices=False, nofollow=True, what=what)
        except SourceError as exc:
            raise SourceError(f"{host_path} (read as {local}): {exc}; check path_map and share rights") from exc
        try:
            self.check_opened(host_path, local, fd)
        except BaseException:
            os.close(fd)
            raise
        return local, fd, st


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


class HyperVSource(Source):
    """``hyperv://[HOST]/VM[?options]``: a VM by name (or ID) on a Hyper-V host.

    Options: ``path_map``, ``allow_crash_consistent``, ``timeout`` (seconds per step),
    ``guest_backup=full|copy``, and for WinRM ``port``, ``scheme=http|https``,
    ``cert=validate|ignore|CAFILE``, ``auth=negotiate|kerberos|ntlm|credssp``.
    """

    kind = "hyperv"

    def __init__(
        self,
        spec: str,
        *,
        transport: StepTransport | None = None,
        kind: str | None = None,
        clock: Callable[[], float] = time.time,
        location: str | None = None,
    ) -> None:
        parts = urlsplit(spec)
        name = unquote(parts.path.strip("/"))
        if parts.scheme not in ("hyperv", "hyperv-lab") or not name or "/" in name:
            raise ConfigError(f"{spec!r}: expected hyperv://[HOST]/VMNAME")
        self.host = parts.netloc
        self.vm_name = name
        if kind is not None:
            self.kind = kind
        opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        # the lab's "host" is a folder here; a named host is another machine, which may be taken over
        self.path_map = PathMap(opts.get("path_map"), strict=bool(self.host) and parts.scheme == "hyperv")
        #: the location's own ``allow_crash_consistent=1``; ``BackupOptions.allow_crash_consistent``
        #: (``--allow-crash-consistent``) allows it for one session
        self.allow_crash = _flag(opts.get("allow_crash_consistent"))
        guest = opts.get("guest_backup", "full").lower()
        if guest not in ("full", "copy"):
            raise ConfigError(f"{spec!r}: guest_backup must be full or copy")
        self.guest_backup_type = GUEST_BACKUP_FULL if guest == "full" else GUEST_BACKUP_COPY
        try:
            self.timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
        except ValueError as exc:
            raise ConfigError(f"{spec!r}: timeout must be a number of seconds") from exc
        if not self.timeout > 0:
            raise ConfigError(f"{spec!r}: timeout must be positive")
        self.clock = clock
        self.location = location or f"{parts.scheme}://{self.host}/{self.vm_name}"
        if transport is None:
            transport = winrm_or_local(self.host, opts)
        self.transport = transport
        self.client = HostClient(transport, self.timeout)

    def open_session(self, previous: PreviousBackup | None, options: BackupOptions = DEFAULT_OPTIONS) -> BackupSession:
        return HyperVSession(self, previous, allow_crash=self.allow_crash or options.allow_crash_consistent)


def winrm_or_local(host: str, opts: dict[str, str]) -> StepTransport:
    """WinRM to ``host`` with the URL's options, or local PowerShell without a host."""
    if not host:
        return LocalPowerShell()
    try:
        port = int(opts["port"]) if "port" in opts else None
    except ValueError as exc:
        raise ConfigError(f"winrm port {opts['port']!r} is not a number") from exc
    options = WinRmOptions(
        port=port,
        scheme=opts.get("scheme", "https").lower(),
        cert=opts.get("cert", "validate"),
        auth=opts.get("auth", "negotiate").lower(),
        user=os.environ.get("VMVAULT_HYPERV_USER"),
        password=os.environ.get("VMVAULT_HYPERV_PASSWORD"),
    )
    if options.cert not in ("validate", "ignore") and not os.path.isfile(options.cert):
        raise ConfigError(f"winrm cert: {options.cert} is not a CA file")
    return WinRmTransport(host, options)


def _rel(host_path: str) -> str:
    """A stored name: the path below the VM's folder, or the drive path without the colon.
    A path the host named with ``.`` or ``..`` parts is refused: stored names become restore paths."""
    p = host_path.replace("\\", "/")
    if any(part in (".", "..") for part in p.split("/")):
        raise HypervisorError(f"{host_path}: a host path with '.' or '..' parts is refused")
    for marker in ("/Virtual Hard Disks/", "/Virtual Machines/", "/Snapshots/"):
        i = p.lower().find(marker.lower())
        if i >= 0:
            return p[i + 1 :]
    return p.replace(":", "").lstrip("/")


def _to_host(child_host: str, child_local: str, parent_local: str) -> str:
    """The host path of a parent found locally beside (or relative to) the child."""
    rel = os.path.relpath(parent_local, os.path.dirname(child_local))
    sep = "\\" if "\\" in child_host or ":" in child_host[:3] else "/"
    base = child_host.rsplit(sep, 1)[0]
    for part in rel.split(os.sep):
        if part == "..":
            base = base.rsplit(sep, 1)[0]
        elif part != ".":
            base += sep + part
    return base


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0].upper()


class HyperVSession(BackupSession):
    def __init__(self, source: HyperVSource, previous: PreviousBackup | None, *, allow_crash: bool = False) -> None:
        self.source = source
        self.client = source.client
        #: fall back to a crash-consistent checkpoint when the application-consistent one fails
        self.allow_crash = allow_crash
        self.vm = {}
        self.disks = []
        self.files = []
        self.warnings = []
        self.extra = {}
        self.consistency = "application-consistent"
        self._images: list[DiskImage] = []
        self._checkpoint: CreatedCheckpoint | None = None
        self._journal: Journal | None = None
        self._converted = False
        self._closed = False
        self._vm_id = ""
        self._host = ""
        self._previous = previous
        self._run = ""
        #: frozen disk host path (lower case) -> its leaf SourceDisk
        self._frozen: dict[str, SourceDisk] = {}
        try:
            self._open(previous)
        except BaseException:
            self.close()
            raise

    # ---- opening -----------------------------------------------------------------------

    def _resolve(self) -> str:
        name = self.source.vm_name
        try:
            return guid(name, "VM")
        except HypervisorError:
            pass
        matches = self.client.resolve(name)
        exact = [m for m in matches if m.name == name] or matches
        if not exact:
            raise HypervisorError(f"no VM named {name!r} on {self.client.host or 'this host'}")
        if len(exact) > 1:
            ids = ", ".join(m.id for m in exact)
            raise HypervisorError(
                f"{len(exact)} VMs are named {name!r} on {self.client.host or 'this host'} ({ids}); "
                "name the one to back up by its ID: hyperv://HOST/VM-ID"
            )
        return exact[0].id

    def _open(self, previous: PreviousBackup | None) -> None:
        client = self.client
        self._vm_id = self._resolve()
        desc = client.describe(self._vm_id)
        if desc.id != self._vm_id:
            raise HypervisorError(f"describe answered for VM {desc.id}, asked for {self._vm_id}")
        self._host = desc.host
        self.vm = {
            "hypervisor": "hyperv",
            "name": desc.name,
            "id": self._vm_id,
            "generation": desc.generation,
            "host": self._host,
            "state": desc.state,
        }
        merge = client.enable_merge(self._vm_id)
        if not merge.found:
            self.warnings.append("the VM's disk merge settings were not found; could not check that merging is enabled")
        elif not merge.was_enabled:
            self.warnings.append(
                f"disk merging was suspended on this VM (EnabledState {merge.state_before}, left by an export "
                "or another backup); vmvault re-enabled it"
            )
        if self._remove_stale_checkpoints():
            desc = client.describe(self._vm_id)  # the merges changed the VM's disks and files
        self._remove_old_reference_points(previous)
        if desc.state.lower() in ("off", "offcritical"):
            self.consistency = "offline"
        # Configurations are read now, before the checkpoint re-points the VM at a new .avhdx:
        # the stored configuration then names the frozen disks it is restored with.
        files = self._own_files(desc)
        configs = self._read_configs(files)
        self._checkpoint = self._create_checkpoint()
        frozen = self._checkpoint_disks(desc)
        rct_ids = RctState(self._vm_id).get(previous.snapshot_id) if previous is not None else {}
        if previous is not None and not rct_ids:
            self.warnings.append("no change-tracking reference from the previous backup; reading everything")
        seen: dict[str, SourceDisk] = {}
        by_path = {d.path.lower(): d.slot for d in desc.hard_disks}
        for disk in frozen:
            leaf = self._add_chain(disk.path, seen)
            leaf.meta.update({"host_path": disk.path, "slot": by_path.get(disk.path.lower(), "")})
            self._frozen[disk.path.lower()] = leaf
            rct = rct_ids.get(disk.path.lower())
            if rct:
                leaf.changed = self._changes(disk.path, rct, leaf.image.size)
            leaf.cbt = dict(leaf.cbt or {}) | {"vm_id": self._vm_id, "rct": bool(rct)}
        for cp in desc.checkpoints:
            for p in cp.disks:
                if p:
                    self._add_chain(p, seen)
        for f in files:
            local = self.source.path_map(f)
            if self.source.path_map.strict:  # it must lie in its mapped folder (raises if not)
                os.close(self.source.path_map.open(f, what="a VM file")[1])
            try:
                st = os.lstat(local)
            except OSError as exc:
                raise SourceError(f"{f} (read as {local}): {exc.strerror}; check path_map and share rights") from exc
            data = configs.get(f)
            if data is not None:
                self.files.append(SourceFile(_rel(f), len(data), 0o644, st.st_mtime_ns, bytes_opener(data)))
            else:
                # read later: it must still be this file (not a link, FIFO or replacement)
                opener = checked_opener(local, _rel(f), st, self.warnings)
                self.files.append(SourceFile(_rel(f), st.st_size, st.st_mode & 0o7777, st.st_mtime_ns, opener))
        self.extra = {
            "hyperv": {
                "vm_id": self._vm_id,
                "generation": desc.generation,
                "checkpoints": [c.record() for c in desc.checkpoints],
                "disks": [{"slot": d.slot, "kind": d.kind, "path": d.path} for d in desc.drives],
                "not_backed_up": self.extra.get("not_backed_up", []),
                "recovery_checkpoint": self._checkpoint.id,
                "guest_backup_type": "full" if self.source.guest_backup_type == GUEST_BACKUP_FULL else "copy",
            }
        }

    def _own_files(self, desc: VmDescription) -> list[str]:
        """The VM's and its checkpoints' configuration files; anything else in the reply is refused."""
        ids = {desc.id} | {c.id for c in desc.checkpoints}
        out = []
        for f in desc.files:
            if _stem(f) not in ids:
                raise HypervisorError(f"describe listed {f}, which is not a file of VM {desc.id} or its checkpoints")
            _rel(f)  # refuses '..' before anything is created
            out.append(f)
        if not any(_stem(f) == desc.id and f.lower().endswith((".vmcx", ".xml")) for f in out):
            raise HypervisorError(f"VM {desc.name}: no configuration file ({desc.id}.vmcx) was listed")
        return out

    def _read_configs(self, files: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for f in files:
            if not f.lower().endswith((".vmcx", ".xml")):
                continue  # .vmgs/.vmrs are read later: large, and not re-pointed by a checkpoint
            local, fd, _st = self.source.path_map.open(f, what="a VM configuration")
            try:
                with os.fdopen(fd, "rb") as fh:
                    data = fh.read(MAX_CONFIG_BYTES + 1)
            except OSError as exc:
                raise SourceError(f"{f} (read as {local}): {exc.strerror}; check path_map and share rights") from exc
            if len(data) > MAX_CONFIG_BYTES:
                raise SourceError(f"{f}: larger than 64 MiB; not a VM configuration")
            out[f] = data
        return out

    # ---- recovery checkpoints and reference points of earlier runs -------------------------

    def _remove_stale_checkpoints(self) -> bool:
        client, now = self.client, self.source.clock()
        journal = Journal.load(self._vm_id)
        if journal is not None and journal.alive:
            raise HypervisorError(
                f"another backup of VM {self.vm.get('name')} is running (pid {journal.pid} on {journal.host}); "
                "try again when it has finished"
            )
        removed = False
        for cp in client.list_recovery(self._vm_id):
            marker = Marker.parse(cp.name)
            claimed = journal is not None and journal.claims(cp.id, cp.created)
            if marker is None and not claimed:
                continue  # another product's recovery checkpoint
            if claimed and journal is not None:
                alive = journal.alive
                who = f"pid {journal.pid} on {journal.host}"
            elif marker is not None and marker.host == socket.gethostname():
                alive = owner_alive(marker.host, marker.pid, marker.run)
                who = f"pid {marker.pid} on {marker.host}"
            else:
                assert marker is not None
                alive = now - marker.time < STALE_AFTER
                who = f"a backup from {marker.host or 'an unknown host'} started {int(now - marker.time)} s ago"
            if alive:
                raise HypervisorError(
                    f"another backup of VM {self.vm.get('name')} is running ({who}; recovery checkpoint {cp.id}); "
                    "try again when it has finished"
                )
            client.destroy_checkpoint(self._vm_id, cp.id)
            removed = True
            self.warnings.append(f"removed recovery checkpoint {cp.name!r} ({cp.id}) left by an interrupted backup")
        if journal is not None and not journal.alive:
            journal.remove()
        return removed

    def _remove_old_reference_points(self, previous: PreviousBackup | None) -> None:
        """Our reference points other than the previous backup's and the newest are destroyed
        (each holds RCT tracking on the host); reference points of other products stay."""
        state = RctState(self._vm_id)
        ours = state.reference_points()
        if len(ours) <= 1:
            return
        keep = {ours[-1][1]}
        if previous is not None:
            keep |= {rp for snap, rp in ours if snap == previous.snapshot_id}
        existing = {rp.instance_id for rp in self.client.list_reference_points(self._vm_id)}
        for _snap, rp in ours:
            if rp in keep or not rp:
                continue
            if rp in existing:
                try:
                    self.client.destroy_reference_point(self._vm_id, rp)
                except HypervisorError as exc:
                    self.warnings.append(f"an old reference point {rp} could not be removed ({exc})")
                    continue
            state.forget_reference_point(rp)

    # ---- the recovery checkpoint -------------------------------------------------------------

    def _create_checkpoint(self) -> CreatedCheckpoint:
        client, clock = self.client, self.source.clock
        marker = Marker.new(clock)
        run_started(marker.run)
        self._run = marker.run
        before = [c.id for c in client.list_recovery(self._vm_id)]
        self._journal = Journal(
            self._vm_id, marker.run, marker.host, marker.pid, clock(), before, until=clock() + self.source.timeout
        )
        self._journal.save()
        level = CONSISTENCY_APPLICATION
        try:
            created = self._create(marker, level)
        except HypervisorError as exc:
            if not self.allow_crash:
                raise HypervisorError(
                    f"application-consistent checkpoint failed ({exc}); check VSS in the guest "
                    "(vssadmin list writers, Hyper-V Integration Services 'Backup'), or allow a "
                    "crash-consistent backup: --allow-crash-consistent (allow_crash_consistent = true in the "
                    "daemon's configuration, or allow_crash_consistent=1 in the location)"
                ) from exc
            # a create that failed late may have left a checkpoint: never keep two
            self._destroy_unclaimed(before)
            self.consistency = "crash-consistent"
            self.warnings.append(
                f"CRASH-CONSISTENT backup: the application-consistent checkpoint failed ({exc}); "
                "the guest's applications were not quiesced"
            )
            level = CONSISTENCY_CRASH
            self._journal.until = clock() + self.source.timeout
            self._journal.save()
            created = self._create(marker, level)
        if not created.renamed:
            self.warnings.append(
                f"the recovery checkpoint {created.id} could not be named ({created.rename_error}); "
                "it is tracked by its ID and removed as usual"
            )
        return created

    def _create(self, marker: Marker, level: int) -> CreatedCheckpoint:
        assert self._journal is not None
        created = self.client.create_recovery(
            self._vm_id,
            consistency_level=level,
            guest_backup_type=self.source.guest_backup_type,
            marker=str(marker),
        )
        self._journal.created = created.id
        self._journal.save()
        self._checkpoint = created
        return created

    def _destroy_unclaimed(self, before: list[str]) -> None:
        known = {b.upper() for b in before}
        for cp in self.client.list_recovery(self._vm_id):
            if cp.id.upper() not in known and (self._journal is None or self._journal.claims(cp.id, cp.created)):
                self.client.destroy_checkpoint(self._vm_id, cp.id)

    def _checkpoint_disks(self, desc: VmDescription) -> list[SnapshotDisk]:
        assert self._checkpoint is not None
        disks = self.client.checkpoint_disks(self._vm_id, self._checkpoint.id)
        hard = [d for d in disks if d.subtype == SUBTYPE_HARD_DISK]
        for d in hard:
            if not d.path:
                raise HypervisorError(f"checkpoint {self._checkpoint.id}: a virtual hard disk has no path")
        frozen = {d.path.lower() for d in hard}
        missing: list[dict[str, str]] = []
        for drive in desc.drives:
            if drive.kind in ("dvd", "floppy"):
                continue  # removable media are no part of a backup
            if drive.kind == "hard" and drive.path.lower() in frozen:
                continue
            missing.append({"slot": drive.slot, "kind": drive.kind, "path": drive.path})
            what = {"passthrough": "pass-through disk", "fc": "virtual Fibre Channel adapter"}.get(
                drive.kind, "virtual hard disk"
            )
            self.warnings.append(
                f"NOT BACKED UP: {what} {drive.path or drive.slot} at {drive.slot} is not in the checkpoint "
                "(Hyper-V cannot checkpoint it); back it up from inside the guest or from its storage"
            )
        self.extra["not_backed_up"] = missing
        return hard

    # ---- disks ----------------------------------------------------------------------------

    def _add_chain(self, host_path: str, seen: dict[str, SourceDisk]) -> SourceDisk:
        local, fd, _st = self.source.path_map.open(host_path, what="a virtual disk")
        key = real_path(fd, local)
        if key in seen:
            os.close(fd)
            return seen[key]
        try:
            img = open_image(local, fd=fd, rule=self.source.path_map.rule)  # owns fd from here
        except VmvaultError as exc:
            raise SourceError(f"{host_path} (read as {local}): {exc}; check path_map and share rights") from exc
        self._images.append(img)
        seen[key] = disk = SourceDisk(name=_rel(host_path), image=img, format=img.format)
        if img.parent is not None:
            parent_host = _to_host(host_path, local, img.parent.path)
            parent_disk = self._add_chain(parent_host, seen)
            disk.layer, disk.parent_name = True, parent_disk.name
        guid_ = str(getattr(img, "data_write_guid", ""))
        if guid_:
            # an unchanged DataWriteGuid means an unchanged file (a frozen checkpoint layer);
            # a leaf's ``changed`` is replaced by its RCT answer
            disk.cbt = {"vm_id": self._vm_id, "data_write_guid": guid_}
            prev = self._previous.disks.get(disk.name) if self._previous is not None else None
            if prev is not None and prev.get("data_write_guid") == guid_:
                disk.changed = []
        self.disks.append(disk)
        return disk

    def _changes(self, host_path: str, rct_id: str, size: int) -> list[tuple[int, int]] | None:
        """GetVirtualDiskChanges over the whole disk, call after call; None (full read, with a
        warning) when change tracking cannot answer."""
        ranges: list[tuple[int, int]] = []
        offset = 0
        try:
            while offset < size:
                length = min(size - offset, CHANGES_WINDOW)
                answer = self.client.changes(host_path, rct_id, offset, length)
                if answer.processed == 0:
                    raise HypervisorError(f"GetVirtualDiskChanges processed nothing at offset {offset:#x} of {size:#x}")
                if answer.processed > length:
                    raise HypervisorError(f"GetVirtualDiskChanges processed {answer.processed} of {length} bytes")
                end = offset + answer.processed
                for off, n in answer.ranges:
                    if n == 0:
                        continue
                    if off < offset or off + n > end or (ranges and off < ranges[-1][0] + ranges[-1][1]):
                        raise HypervisorError(
                            f"GetVirtualDiskChanges returned range {off:#x}+{n:#x} outside "
                            f"{offset:#x}..{end:#x} or out of order"
                        )
                    ranges.append((off, n))
                offset = end
        except HypervisorError as exc:
            self.warnings.append(
                f"{host_path}: change tracking unusable ({exc}); reading the whole disk, dedup keeps storage small"
            )
            return None
        return ranges

    # ---- completion ------------------------------------------------------------------------

    def _check_host(self) -> None:
        where = self.client.host_of(self._vm_id)
        if where.host.lower() != self._host.lower() or "migrat" in where.status.lower():
            raise HypervisorError(
                f"VM {self.vm.get('name')} moved from {self._host} to {where.host} during the backup "
                f"(live migration; status {where.status!r}); the snapshot is not trustworthy, run the backup again"
            )

    def complete(self, snapshot_id: str) -> None:
        if self._checkpoint is None or self._converted:
            return
        self._check_host()
        points_before: set[str] | None
        try:
            points_before = {p.instance_id for p in self.client.list_reference_points(self._vm_id)}
        except HypervisorError:
            points_before = None  # then a reference point a failed convert left cannot be told apart
        try:
            point = self.client.convert(self._vm_id, self._checkpoint.id)
        except HypervisorError as exc:
            still_there = any(c.id == self._checkpoint.id for c in self._safe_list_recovery())
            if still_there:
                raise HypervisorError(
                    f"snapshot {snapshot_id[:8]} is stored, but the reference point could not be made ({exc}); "
                    "the recovery checkpoint is removed and the next backup reads everything"
                ) from exc
            self._converted = True  # the checkpoint is gone: nothing to remove
            self._finish_journal()
            left = self._drop_new_reference_points(points_before)
            raise HypervisorError(
                f"snapshot {snapshot_id[:8]} is stored; converting the recovery checkpoint to a reference point "
                f"failed late ({exc}) and the checkpoint is gone; {left}the next backup reads everything"
            ) from exc
        self._converted = True
        self._finish_journal()
        RctState(self._vm_id).put(snapshot_id, point.instance_id, self._pair_rct(point))

    def _pair_rct(self, point: ReferencePoint) -> dict[str, str]:
        """Frozen disk path -> RCT id, through the reference point's parallel arrays
        ``VirtualDiskIdentifiers[i]`` / ``ResilientChangeTrackingIdentifiers[i]``."""
        if len(point.disk_ids) != len(point.rct_ids):
            raise HypervisorError(
                f"reference point {point.instance_id}: {len(point.disk_ids)} disk ids but "
                f"{len(point.rct_ids)} RCT ids; change tracking for the next backup is lost"
            )
        by_id = {iid.upper(): path for iid, path in point.disks}
        # a disk's instance id differs between the VM and its snapshots only before the first '\'
        by_device = {iid.split("\\", 1)[-1].upper(): path for iid, path in point.disks}
        out: dict[str, str] = {}
        lost: list[str] = []
        for disk_id, rct in zip(point.disk_ids, point.rct_ids, strict=True):
            path = by_id.get(disk_id.upper()) or by_device.get(disk_id.split("\\", 1)[-1].upper())
            if path is None:
                lost.append(disk_id)
                continue
            out[path.lower()] = rct
        if lost:
            raise HypervisorError(
                f"reference point {point.instance_id}: disks {', '.join(lost)} are not disks of the VM; "
                "change tracking for them is lost and the next backup reads them whole"
            )
        return out

    def _drop_new_reference_points(self, before: set[str] | None) -> str:
        """A convert that failed after it made the reference point left one nobody tracks:
        destroy it (the next backup reads everything anyway). Returns what stayed, for the message."""
        if before is None:
            return "a reference point it may have made is left on the host; "
        try:
            new = [p.instance_id for p in self.client.list_reference_points(self._vm_id) if p.instance_id not in before]
            for point in new:
                self.client.destroy_reference_point(self._vm_id, point)
        except HypervisorError as exc:
            return f"a reference point it may have made could not be removed ({exc}); "
        return ""

    def _safe_list_recovery(self) -> list[Any]:
        try:
            return self.client.list_recovery(self._vm_id)
        except HypervisorError:
            return [self._checkpoint] if self._checkpoint is not None else []

    def _finish_journal(self) -> None:
        if self._journal is not None:
            self._journal.remove()
            self._journal = None
        run_ended(self._run)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for img in self._images:
            img.close()
        self._images = []
        if self._converted or self._journal is None:
            run_ended(self._run)
            return
        try:
            if self._checkpoint is not None:
                self.client.destroy_checkpoint(self._vm_id, self._checkpoint.id)
            else:  # the create never returned: whatever it made is removed
                self._destroy_unclaimed(self._journal.before)
        except HypervisorError as exc:
            run_ended(self._run)  # the checkpoint is left to the next backup: it is no longer running
            which = self._checkpoint.id if self._checkpoint is not None else "being created"
            raise HypervisorError(
                f"the recovery checkpoint ({which}) could not be removed ({exc}); "
                "the next backup removes it, or remove it with Remove-VMSnapshot"
            ) from exc
        self._finish_journal()


def register_restored(source: HyperVSource, vmcx_host_path: str, dest_host_path: str) -> dict[str, Any]:
    """Import a restored VM folder on the host as a copy with a new ID (``Compare-VM -Copy
    -GenerateNewId -VhdSourcePath``); raises with every incompatibility ``Compare-VM`` reports."""
    sep = "\\" if "\\" in vmcx_host_path else "/"
    folder = vmcx_host_path.rsplit(sep, 2)[0]
    vhd_source = folder + sep + "Virtual Hard Disks"
    result = source.client.compare_import(vmcx_host_path, dest_host_path, dest_host_path, vhd_source)
    if not result.imported:
        problems = "; ".join(f"{i}: {m}" for i, m in result.incompatibilities) or "no reason given"
        raise HypervisorError(f"Import-VM refused {vmcx_host_path}: {problems}")
    return {"imported": True, "id": result.id, "name": result.name}


def inventory(spec: str, *, transport: StepTransport | None = None) -> dict[str, Any]:
    """Every VM of ``hyperv://[HOST]`` with its disk chains, checkpoints and recovery
    checkpoints, plus disk files under the host's VM paths that nothing references."""
    parts = urlsplit(spec)
    if parts.scheme != "hyperv":
        raise ConfigError(f"{spec!r}: expected hyperv://[HOST]")
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
    except ValueError as exc:
        raise ConfigError(f"{spec!r}: timeout must be a number of seconds") from exc
    if transport is None:
        transport = winrm_or_local(parts.netloc, opts)
    return HostClient(transport, timeout).inventory()

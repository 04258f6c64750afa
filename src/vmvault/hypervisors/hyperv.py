"""Hyper-V connector: a VM on a Windows host, through PowerShell and WMI (root\\virtualization\\v2).

NOT VERIFIED AGAINST A REAL HYPER-V HOST. Our side is tested against recorded responses
(tests/hypervisors/recorded/); the host behaviour is modelled by ``hyperv_lab``. See
docs/hyperv.md before relying on it.

Source: ``hyperv://[HOST]/VMNAME[?option=value&...]``. No HOST: this machine (``powershell.exe``);
a HOST: WinRM/PSRP through pypsrp (user/password from ``VMVAULT_HYPERV_USER`` /
``VMVAULT_HYPERV_PASSWORD``). Options: ``path_map=C:\\=/mnt/hv-c/`` (how a host path is read
here: an SMB/CIFS mount of the host's volume, or a UNC path on Windows), ``allow_crash_consistent=1``
(also ``VMVAULT_HYPERV_ALLOW_CRASH_CONSISTENT=1``), ``timeout=SECONDS``.

A backup (every step one script in ``SCRIPTS``):
1. ``describe``: the VM, its disks, checkpoints and configuration files, and the host it runs on;
2. ``enable_merge``: re-enable disk merging if an earlier export left it suspended
   (``Msvm_DiskMergeSettingData``), else recovery checkpoints would pile up;
3. ``list_recovery`` + ``destroy``: recovery checkpoints named ``vmvault-recovery ...`` left by a
   crashed run are removed;
4. ``create_recovery``: ``Msvm_VirtualSystemSnapshotService.CreateSnapshot`` with
   SnapshotType 32768 (recovery) and ``Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel``
   1 (application-consistent); when VSS in the guest fails, crash-consistent (2) only if the job
   allows it, recorded in the snapshot's ``consistency`` and ``warnings``;
5. the frozen disk chains are read through ``path_map`` with our VHDX reader; changed ranges come
   from ``Msvm_ImageManagementService.GetVirtualDiskChanges`` against the RCT id kept after the
   previous backup; an unknown/reset id means a full read (deduplicated) and a warning;
6. ``host_of``: the VM must still be on the same host (a live migration during the backup fails
   it clearly: the frozen files may have moved);
7. ``convert``: ``Msvm_VirtualSystemReferencePointService.ConvertToReferencePoint``; the new RCT
   ids are kept in a local state file keyed by snapshot id (Hyper-V only hands them out after the
   snapshot manifest is written).
Every failure path destroys the recovery checkpoint.

Restore registration: ``register_restored`` runs ``Compare-VM -Copy -GenerateNewId`` and
``Import-VM`` and reports every incompatibility.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from vmvault.disk import open_image
from vmvault.disk.base import DiskImage
from vmvault.errors import ChangeTrackingError, ConfigError, HypervisorError, SourceError
from vmvault.hypervisors.base import BackupSession, PreviousBackup, Source, SourceDisk, SourceFile

__all__ = [
    "SCRIPTS",
    "HyperVSession",
    "HyperVSource",
    "LocalPowerShell",
    "Transport",
    "WinRmTransport",
    "ps_quote",
    "register_restored",
]

RECOVERY_MARKER = "vmvault-recovery"
SNAPSHOT_TYPE_RECOVERY = 32768
CONSISTENCY_APPLICATION, CONSISTENCY_CRASH = 1, 2
DEFAULT_TIMEOUT = 900.0

# ---- every PowerShell script, in one place ---------------------------------------------
# Each body runs inside WRAPPER: errors become {"ok": false, "error": {...}} on stdout, so a
# failure is data, never a half-parsed stream. {name} fields are filled with ps_quote()d text.

WRAPPER = """$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
function Wait-VmvaultJob($r) {{
  if ($r.ReturnValue -eq 4096) {{
    $job = [wmi]$r.Job
    while ($job.JobState -in 3,4) {{ Start-Sleep -Milliseconds 250; $job = [wmi]$r.Job }}
    if ($job.JobState -ne 7) {{ throw "WMI job failed ($($job.ErrorCode)): $($job.ErrorDescription)" }}
  }} elseif ($r.ReturnValue -ne 0) {{ throw "WMI method failed with return value $($r.ReturnValue)" }}
}}
$ns = 'root\\virtualization\\v2'
try {{
  $result = & {{
{body}
  }}
  @{{ ok = $true; result = $result }} | ConvertTo-Json -Depth 8 -Compress
}} catch {{
  @{{ ok = $false; error = @{{ message = $_.Exception.Message; type = $_.Exception.GetType().FullName;
     category = "$($_.CategoryInfo.Category)" }} }} | ConvertTo-Json -Depth 4 -Compress
}}
"""

SCRIPTS: dict[str, str] = {
    "describe": """
    $vm = Get-VM -Name {vm}
    @{{ id = "$($vm.Id)"; name = $vm.Name; generation = $vm.Generation; state = "$($vm.State)";
       host = $vm.ComputerName; this_host = $env:COMPUTERNAME; path = $vm.Path;
       config_location = $vm.ConfigurationLocation; snapshot_location = $vm.SnapshotFileLocation;
       disks = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object {{
         @{{ slot = "$($_.ControllerType)$($_.ControllerNumber):$($_.ControllerLocation)"; path = $_.Path }} }});
       checkpoints = @(Get-VMSnapshot -VM $vm | ForEach-Object {{
         @{{ id = "$($_.Id)"; name = $_.Name; parent = "$($_.ParentSnapshotId)"; type = "$($_.SnapshotType)";
            created = $_.CreationTime.ToUniversalTime().ToString('o');
            disks = @($_.HardDrives | ForEach-Object {{ $_.Path }}) }} }});
       files = @(Get-ChildItem -LiteralPath (Join-Path $vm.ConfigurationLocation 'Virtual Machines'),
                 (Join-Path $vm.SnapshotFileLocation 'Snapshots') -File -ErrorAction SilentlyContinue |
                 Where-Object {{ $_.Name -match '\\.(vmcx|vmgs|vmrs|xml)$' }} | ForEach-Object {{ $_.FullName }}) }}
""",
    "host_of": """
    $vm = Get-VM -Id {vm_id}
    @{{ host = $vm.ComputerName; status = "$($vm.Status)"; this_host = $env:COMPUTERNAME }}
""",
    "enable_merge": """
    $filter = "VirtualSystemIdentifier='{vm_id_raw}' AND VirtualSystemType='Microsoft:Hyper-V:System:Realized'"
    $vssd = Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemSettingData -Filter $filter
    $msd = $vssd.GetRelated('Msvm_DiskMergeSettingData') | Select-Object -First 1
    $was = if ($msd) {{ [int]$msd.EnabledState }} else {{ 2 }}
    if ($msd -and $msd.EnabledState -ne 2) {{
      $msd.EnabledState = 2
      $svc = Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemManagementService
      Wait-VmvaultJob ($svc.ModifySystemComponentSettings(@($msd.GetText(2))))
    }}
    @{{ was_enabled = ($was -eq 2) }}
""",
    "list_recovery": """
    $filter = "VirtualSystemIdentifier='{vm_id_raw}' AND VirtualSystemType='Microsoft:Hyper-V:Snapshot:Recovery'"
    @(Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemSettingData -Filter $filter |
      ForEach-Object {{ @{{ instance_id = $_.InstanceID; name = $_.ElementName }} }})
""",
    "create_recovery": """
    $vm = Get-WmiObject -Namespace $ns -Class Msvm_ComputerSystem -Filter "Name='{vm_id_raw}'"
    $svc = Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemSnapshotService
    $set = ([wmiclass]"\\\\.\\$($ns):Msvm_VirtualSystemSnapshotSettingData").CreateInstance()
    $set.ConsistencyLevel = {consistency}
    $set.IgnoreNonSnapshottableDisks = $true
    $r = $svc.CreateSnapshot($vm, $set.GetText(2), {snapshot_type})
    Wait-VmvaultJob $r
    $snap = [wmi]$r.ResultingSnapshot
    if (-not $snap) {{
      $snap = $vm.GetRelated('Msvm_VirtualSystemSettingData', 'Msvm_MostCurrentSnapshotInBranch',
                             $null, $null, $null, $null, $false, $null) | Select-Object -First 1
    }}
    $snap.ElementName = {marker}
    $vsms = Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemManagementService
    Wait-VmvaultJob ($vsms.ModifySystemSettings($snap.GetText(2)))
    @{{ instance_id = $snap.InstanceID;
       disks = @($snap.GetRelated('Msvm_StorageAllocationSettingData') | Where-Object {{ $_.ResourceType -eq 31 }} |
                 ForEach-Object {{ @{{ path = $_.HostResource[0]; parent = $_.Parent }} }}) }}
""",
    "changes": """
    $ims = Get-WmiObject -Namespace $ns -Class Msvm_ImageManagementService
    $size = (Get-VHD -Path {path}).Size
    $offsets = @(); $lengths = @(); $done = [uint64]0
    while ($done -lt $size) {{
      $r = $ims.GetVirtualDiskChanges({path}, {rct_id}, $done, $size - $done)
      if ($r.ReturnValue -ne 0) {{ throw "GetVirtualDiskChanges failed with return value $($r.ReturnValue)" }}
      $offsets += $r.ChangedByteOffsets; $lengths += $r.ChangedByteLengths
      if ($r.ProcessedByteLength -eq 0) {{ break }}
      $done += $r.ProcessedByteLength
    }}
    @{{ size = $size; offsets = $offsets; lengths = $lengths }}
""",
    "convert": """
    $snap = [wmi]("\\\\.\\$($ns):Msvm_VirtualSystemSettingData.InstanceID=" + {instance_id_wmi})
    $svc = Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemReferencePointService
    $r = $svc.ConvertToReferencePoint($snap, $null)
    Wait-VmvaultJob $r
    $rp = [wmi]$r.ResultingReferencePoint
    @{{ reference_point = $rp.InstanceID; rct_ids = @($rp.ResilientChangeTrackingIdentifiers);
       disks = @($rp.GetRelated('Msvm_StorageAllocationSettingData') | ForEach-Object {{ $_.HostResource[0] }}) }}
""",
    "destroy": """
    $snap = [wmi]("\\\\.\\$($ns):Msvm_VirtualSystemSettingData.InstanceID=" + {instance_id_wmi})
    $svc = Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemSnapshotService
    Wait-VmvaultJob ($svc.DestroySnapshot($snap))
    @{{ destroyed = $true }}
""",
    "inventory": """
    $vhdRoot = (Get-VMHost).VirtualHardDiskPath
    $referenced = @{{}}
    $vms = @(Get-VM | ForEach-Object {{
      $vm = $_
      $chain = @()
      foreach ($d in (Get-VMHardDiskDrive -VM $vm)) {{
        $p = $d.Path
        while ($p) {{ $v = Get-VHD -Path $p; $referenced[$p.ToLower()] = 1
                     $chain += @{{ path = $p; size = $v.FileSize; parent = $v.ParentPath }}; $p = $v.ParentPath }}
      }}
      foreach ($s in (Get-VMSnapshot -VM $vm)) {{ foreach ($h in $s.HardDrives) {{
        $p = $h.Path; while ($p) {{ $referenced[$p.ToLower()] = 1; $p = (Get-VHD -Path $p).ParentPath }} }} }}
      $filter = "VirtualSystemIdentifier='$($vm.Id)' AND VirtualSystemType='Microsoft:Hyper-V:Snapshot:Recovery'"
      @{{ id = "$($vm.Id)"; name = $vm.Name; path = $vm.Path; disks = $chain;
         checkpoints = @(Get-VMSnapshot -VM $vm | ForEach-Object {{
           @{{ id = "$($_.Id)"; name = $_.Name; parent = "$($_.ParentSnapshotId)"; type = "$($_.SnapshotType)";
              created = $_.CreationTime.ToUniversalTime().ToString('o') }} }});
         recovery = @(Get-WmiObject -Namespace $ns -Class Msvm_VirtualSystemSettingData -Filter $filter |
                      ForEach-Object {{ $_.ElementName }}) }}
    }})
    $roots = @($vhdRoot) + @($vms | ForEach-Object {{ $_.path }}) | Sort-Object -Unique
    $orphans = @(foreach ($r in $roots) {{
      Get-ChildItem -LiteralPath $r -Recurse -File -Include *.vhdx,*.avhdx,*.vhd,*.avhd -ErrorAction SilentlyContinue |
        Where-Object {{ -not $referenced.ContainsKey($_.FullName.ToLower()) }} |
        ForEach-Object {{ @{{ path = $_.FullName; size = $_.Length }} }} }})
    @{{ host = $env:COMPUTERNAME; vms = $vms; orphans = $orphans }}
""",
    "compare_import": """
    $report = Compare-VM -Path {vmcx} -Copy -GenerateNewId -VirtualMachinePath {dest} -VhdDestinationPath {vhd_dest}
    $problems = @($report.Incompatibilities | ForEach-Object {{ @{{ id = $_.MessageId; message = $_.Message }} }})
    if ($problems.Count -gt 0) {{ return @{{ imported = $false; incompatibilities = $problems }} }}
    $vm = Import-VM -CompatibilityReport $report
    @{{ imported = $true; id = "$($vm.Id)"; name = $vm.Name; incompatibilities = @() }}
""",
}


def ps_quote(text: str) -> str:
    """A PowerShell single-quoted literal (nothing inside is expanded)."""
    return "'" + text.replace("'", "''").replace("\u2019", "\u2019\u2019").replace("\u2018", "\u2018\u2018") + "'"


def render(name: str, **params: str) -> str:
    """The full script for ``name``, parameters quoted."""
    quoted = {k: (v if k in ("consistency", "snapshot_type") else ps_quote(v)) for k, v in params.items()}
    if "instance_id" in params:
        # a WMI object path embeds the id in double quotes, backslashes doubled
        quoted["instance_id_wmi"] = ps_quote('"' + params["instance_id"].replace("\\", "\\\\") + '"')
    if "vm_id" in params:
        quoted["vm_id_raw"] = params["vm_id"].replace("'", "")
    return WRAPPER.format(body=SCRIPTS[name].format(**quoted))


# ---- transports ---------------------------------------------------------------------------


class Transport(Protocol):
    #: a name for messages (host)
    host: str

    def run(self, name: str, script: str, timeout: float) -> Any:
        """Run ``script`` (the ``name`` one of SCRIPTS); return the decoded JSON document."""
        ...


def decode_reply(name: str, text: str) -> Any:
    """The wrapper's JSON: the result, or HypervisorError carrying the PowerShell error."""
    text = text.strip()
    if not text:
        raise HypervisorError(f"{name}: PowerShell printed nothing")
    try:
        doc = json.loads(text.splitlines()[-1])
    except ValueError as exc:
        raise HypervisorError(f"{name}: PowerShell output is not JSON: {text[:200]!r}") from exc
    if not isinstance(doc, dict) or "ok" not in doc:
        raise HypervisorError(f"{name}: unexpected reply {text[:200]!r}")
    if not doc["ok"]:
        err = doc.get("error") or {}
        raise HypervisorError(f"{name}: {err.get('message', 'failed')} [{err.get('type', '?')}]")
    return doc.get("result")


class LocalPowerShell:
    """``powershell.exe -NoProfile -NonInteractive -Command -`` on this (Windows) machine."""

    def __init__(self, executable: str = "powershell.exe") -> None:
        self.executable = executable
        self.host = socket.gethostname()

    def run(self, name: str, script: str, timeout: float) -> Any:
        try:
            proc = subprocess.run(
                [self.executable, "-NoProfile", "-NonInteractive", "-Command", "-"],
                input=script,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise HypervisorError(f"{self.executable} not found: hyperv:// without a host needs Windows") from exc
        except subprocess.TimeoutExpired as exc:
            raise HypervisorError(f"{name}: no answer from PowerShell within {timeout:.0f} s") from exc
        if proc.returncode != 0 and not proc.stdout.strip():
            raise HypervisorError(f"{name}: powershell exited {proc.returncode}: {proc.stderr.strip()[:300]}")
        return decode_reply(name, proc.stdout)


class WinRmTransport:
    """PowerShell Remoting (PSRP over WinRM) through pypsrp."""

    def __init__(self, host: str, user: str | None, password: str | None, *, ssl: bool = True) -> None:
        self.host = host
        try:
            from pypsrp.client import Client
        except ImportError as exc:
            raise ConfigError("hyperv://HOST/... needs the pypsrp package (pip install pypsrp)") from exc
        self._client = Client(host, username=user, password=password, ssl=ssl)

    def run(self, name: str, script: str, timeout: float) -> Any:
        try:
            output, streams, had_errors = self._client.execute_ps(script)
        except Exception as exc:  # pypsrp raises many kinds: connection, auth, WinRM faults
            raise HypervisorError(f"{name} on {self.host}: {type(exc).__name__}: {exc}") from exc
        if had_errors and not output.strip():
            errors = "; ".join(str(e) for e in streams.error)
            raise HypervisorError(f"{name} on {self.host}: {errors[:300]}")
        return decode_reply(name, output)


# ---- the source -----------------------------------------------------------------------------


def _state_dir() -> str:
    base = os.environ.get("VMVAULT_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "vmvault"
    )
    return os.path.join(base, "hyperv")


class PathMap:
    """Host paths (``C:\\Hyper-V\\web.vhdx``) as paths readable here."""

    def __init__(self, spec: str | None) -> None:
        self.pairs: list[tuple[str, str]] = []
        for item in (spec or "").split(";"):
            if "=" in item:
                win, local = item.split("=", 1)
                self.pairs.append((win.replace("/", "\\").lower(), local))

    def __call__(self, host_path: str) -> str:
        norm = host_path.replace("/", "\\")
        for win, local in self.pairs:
            if norm.lower().startswith(win):
                rest = norm[len(win) :].lstrip("\\").replace("\\", "/")
                return os.path.join(local, rest)
        return host_path  # on Windows, local and UNC paths open as they are


class HyperVSource(Source):
    kind = "hyperv"

    def __init__(self, spec: str, *, transport: Transport | None = None) -> None:
        parts = urlsplit(spec)
        if parts.scheme != "hyperv" or not parts.path.strip("/"):
            raise ConfigError(f"{spec!r}: expected hyperv://[HOST]/VMNAME")
        self.host = parts.netloc
        self.vm_name = parts.path.strip("/")
        opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.path_map = PathMap(opts.get("path_map"))
        self.allow_crash = opts.get("allow_crash_consistent", "") in ("1", "true", "yes") or os.environ.get(
            "VMVAULT_HYPERV_ALLOW_CRASH_CONSISTENT", ""
        ) in ("1", "true", "yes")
        try:
            self.timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
        except ValueError as exc:
            raise ConfigError(f"{spec!r}: timeout must be a number of seconds") from exc
        self.location = f"hyperv://{self.host}/{self.vm_name}"
        if transport is None:
            transport = (
                WinRmTransport(
                    self.host, os.environ.get("VMVAULT_HYPERV_USER"), os.environ.get("VMVAULT_HYPERV_PASSWORD")
                )
                if self.host
                else LocalPowerShell()
            )
        self.transport = transport

    def call(self, name: str, **params: str) -> Any:
        return self.transport.run(name, render(name, **params), self.timeout)

    def open_session(self, previous: PreviousBackup | None) -> BackupSession:
        return HyperVSession(self, previous)


def _opener(path: str) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        try:
            return open(path, "rb")
        except OSError as exc:
            raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc

    return opener


class HyperVSession(BackupSession):
    def __init__(self, source: HyperVSource, previous: PreviousBackup | None) -> None:
        self.source = source
        self.vm = {}
        self.disks = []
        self.files = []
        self.warnings = []
        self.extra = {}
        self.consistency = "application-consistent"
        self._images: list[DiskImage] = []
        self._snapshot: str | None = None
        self._converted = False
        self._closed = False
        self._vm_id = ""
        self._host = ""
        self._leaves: dict[str, str] = {}
        self._previous = previous
        try:
            self._open(previous)
        except BaseException:
            self.close()
            raise

    def _open(self, previous: PreviousBackup | None) -> None:
        src = self.source
        desc = src.call("describe", vm=src.vm_name)
        self._vm_id, self._host = str(desc["id"]), str(desc.get("host") or "")
        self.vm = {
            "hypervisor": "hyperv",
            "name": desc["name"],
            "id": self._vm_id,
            "generation": desc.get("generation"),
            "host": self._host,
            "state": desc.get("state"),
        }
        merge = src.call("enable_merge", vm_id=self._vm_id)
        if not merge.get("was_enabled", True):
            self.warnings.append("disk merging was suspended on this VM (left by an export); vmvault re-enabled it")
        removed = 0
        for stale in src.call("list_recovery", vm_id=self._vm_id) or []:
            if str(stale.get("name", "")).startswith(RECOVERY_MARKER):
                src.call("destroy", instance_id=str(stale["instance_id"]))
                removed += 1
                self.warnings.append(f"removed recovery checkpoint {stale['name']!r} left by an interrupted backup")
        if removed:  # the merge changed the VM's disks and files: look again
            desc = src.call("describe", vm=src.vm_name)
        # Configurations are read now, before the checkpoint re-points the VM at a new .avhdx:
        # the stored configuration then names the frozen disks it is restored with.
        configs = self._read_configs(desc)
        marker = f"{RECOVERY_MARKER} host={socket.gethostname()} t={int(time.time())}"
        try:
            snap = src.call(
                "create_recovery",
                vm_id=self._vm_id,
                consistency=str(CONSISTENCY_APPLICATION),
                snapshot_type=str(SNAPSHOT_TYPE_RECOVERY),
                marker=marker,
            )
        except HypervisorError as exc:
            if not src.allow_crash:
                raise HypervisorError(
                    f"application-consistent checkpoint failed ({exc}); check VSS in the guest "
                    "(vssadmin list writers, Hyper-V Integration Services 'Backup'), or allow a "
                    "crash-consistent backup with allow_crash_consistent=1"
                ) from exc
            self.consistency = "crash-consistent"
            self.warnings.append(
                f"CRASH-CONSISTENT backup: the application-consistent checkpoint failed ({exc}); "
                "the guest's applications were not quiesced"
            )
            snap = src.call(
                "create_recovery",
                vm_id=self._vm_id,
                consistency=str(CONSISTENCY_CRASH),
                snapshot_type=str(SNAPSHOT_TYPE_RECOVERY),
                marker=marker,
            )
        self._snapshot = str(snap["instance_id"])
        rct_ids = _load_rct(self._vm_id, previous.snapshot_id) if previous is not None else {}
        if previous is not None and not rct_ids:
            self.warnings.append("no change-tracking reference from the previous backup; reading everything")
        seen: dict[str, SourceDisk] = {}
        frozen = [(f"disk{i}", str(d["path"])) for i, d in enumerate(snap.get("disks") or [])]
        by_path = {str(d["path"]).lower(): str(d["slot"]) for d in desc.get("disks") or []}
        for _idx, host_path in frozen:
            leaf = self._add_chain(host_path, seen)
            slot = by_path.get(host_path.lower(), "")
            leaf.meta.update({"host_path": host_path, "slot": slot})
            self._leaves[host_path] = leaf.name
            rct = rct_ids.get(host_path.lower())
            leaf.changed = self._changes(host_path, rct) if rct else None
        for cp in desc.get("checkpoints") or []:
            for p in cp.get("disks") or []:
                self._add_chain(str(p), seen)
        for f in desc.get("files") or []:
            local = src.path_map(str(f))
            try:
                st = os.stat(local)
            except OSError as exc:
                raise SourceError(f"{f} (read as {local}): {exc.strerror}; check path_map") from exc
            data = configs.get(str(f))
            if data is not None:
                self.files.append(SourceFile(_rel(str(f)), len(data), 0o644, st.st_mtime_ns, _bytes_opener(data)))
            else:
                self.files.append(
                    SourceFile(_rel(str(f)), st.st_size, st.st_mode & 0o7777, st.st_mtime_ns, _opener(local))
                )
        self.extra = {
            "hyperv": {"vm_id": self._vm_id, "checkpoints": desc.get("checkpoints") or [], "disks": desc.get("disks")}
        }

    def _read_configs(self, desc: dict[str, Any]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for f in desc.get("files") or []:
            if not str(f).lower().endswith((".vmcx", ".xml")):
                continue  # .vmgs/.vmrs are read later: large, and not re-pointed by a checkpoint
            local = self.source.path_map(str(f))
            try:
                with open(local, "rb") as fh:
                    out[str(f)] = fh.read(64 * 1024 * 1024)
            except OSError as exc:
                raise SourceError(f"{f} (read as {local}): {exc.strerror}; check path_map") from exc
        return out

    def _add_chain(self, host_path: str, seen: dict[str, SourceDisk]) -> SourceDisk:
        local = self.source.path_map(host_path)
        key = os.path.realpath(local)
        if key in seen:
            return seen[key]
        try:
            img = open_image(local)
        except SourceError as exc:
            raise SourceError(f"{host_path} (read as {local}): {exc}; check path_map and share rights") from exc
        self._images.append(img)
        parent_disk = None
        if img.parent is not None:
            parent_host = _to_host(host_path, local, img.parent.path)
            parent_disk = self._add_chain(parent_host, seen)
        disk = SourceDisk(
            name=_rel(host_path),
            image=img,
            format=img.format,
            layer=parent_disk is not None,
            parent_name=parent_disk.name if parent_disk is not None else None,
        )
        guid = str(getattr(img, "data_write_guid", ""))
        if guid:
            # an unchanged DataWriteGuid means an unchanged file (a frozen checkpoint layer);
            # a leaf's ``changed`` is replaced by its RCT answer
            disk.cbt = {"vm_id": self._vm_id, "data_write_guid": guid}
            prev = self._previous.disks.get(disk.name) if self._previous is not None else None
            if prev is not None and prev.get("data_write_guid") == guid:
                disk.changed = []
        seen[key] = disk
        self.disks.append(disk)
        return disk

    def _changes(self, host_path: str, rct_id: str) -> list[tuple[int, int]] | None:
        try:
            doc = self.source.call("changes", path=host_path, rct_id=rct_id)
        except HypervisorError as exc:
            self.warnings.append(
                f"{host_path}: change tracking unusable ({exc}); reading the whole disk, dedup keeps storage small"
            )
            return None
        offsets, lengths = doc.get("offsets") or [], doc.get("lengths") or []
        if len(offsets) != len(lengths):
            raise ChangeTrackingError(f"{host_path}: GetVirtualDiskChanges returned mismatched lists")
        return [(int(o), int(n)) for o, n in zip(offsets, lengths, strict=True)]

    def _check_host(self) -> None:
        where = self.source.call("host_of", vm_id=self._vm_id)
        status = str(where.get("status", ""))
        if str(where.get("host", "")).lower() != self._host.lower() or "migrat" in status.lower():
            raise HypervisorError(
                f"VM {self.vm.get('name')} moved from {self._host} to {where.get('host')} during the backup "
                f"(live migration; status {status!r}); the snapshot is not trustworthy, run the backup again"
            )

    def complete(self, snapshot_id: str) -> None:
        if self._snapshot is None or self._converted:
            return
        self._check_host()
        doc = self.source.call("convert", instance_id=self._snapshot)
        self._converted = True
        ids = [str(x) for x in doc.get("rct_ids") or []]
        disks = [str(x) for x in doc.get("disks") or []]
        if len(ids) == len(disks):
            _save_rct(self._vm_id, snapshot_id, {d.lower(): i for d, i in zip(disks, ids, strict=True)})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for img in self._images:
            img.close()
        self._images = []
        if self._snapshot is not None and not self._converted:
            try:
                self.source.call("destroy", instance_id=self._snapshot)
            except HypervisorError as exc:
                raise HypervisorError(
                    f"the recovery checkpoint {self._snapshot} could not be removed ({exc}); "
                    "the next backup removes it, or remove it with Remove-VMSnapshot"
                ) from exc


def _bytes_opener(data: bytes) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        # the engine fstat()s what it stores: an anonymous file, not a BytesIO
        f = tempfile.TemporaryFile()  # noqa: SIM115 - returned open to the caller
        f.write(data)
        f.seek(0)
        return f

    return opener


def _rel(host_path: str) -> str:
    """A stored name: the path below the VM's folder, or the drive path without the colon."""
    p = host_path.replace("\\", "/")
    for marker in ("/Virtual Hard Disks/", "/Virtual Machines/", "/Snapshots/"):
        i = p.lower().find(marker.lower())
        if i >= 0:
            return p[i + 1 :]
    return p.replace(":", "").lstrip("/")


def _to_host(child_host: str, child_local: str, parent_local: str) -> str:
    """The host path of a parent found locally beside (or relative to) the child."""
    rel = os.path.relpath(parent_local, os.path.dirname(child_local))
    base = child_host.replace("/", "\\").rsplit("\\", 1)[0]
    for part in rel.split(os.sep):
        if part == "..":
            base = base.rsplit("\\", 1)[0]
        elif part != ".":
            base += "\\" + part
    return base


def _state_path(vm_id: str) -> str:
    return os.path.join(_state_dir(), f"{vm_id}.json")


def _load_rct(vm_id: str, snapshot_id: str) -> dict[str, str]:
    try:
        with open(_state_path(vm_id), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    entry = doc.get(snapshot_id) if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in entry.items()} if isinstance(entry, dict) else {}


def _save_rct(vm_id: str, snapshot_id: str, ids: dict[str, str]) -> None:
    path = _state_path(vm_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {}
    doc = {k: v for k, v in doc.items() if isinstance(v, dict)}
    doc[snapshot_id] = ids
    while len(doc) > 8:
        doc.pop(next(iter(doc)))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def register_restored(source: HyperVSource, vmcx_host_path: str, dest_host_path: str) -> dict[str, Any]:
    """Import a restored VM folder on the host as a copy with a new ID; raises with every
    incompatibility ``Compare-VM`` reports."""
    doc = source.call("compare_import", vmcx=vmcx_host_path, dest=dest_host_path, vhd_dest=dest_host_path)
    if not doc.get("imported"):
        problems = "; ".join(f"{p.get('id')}: {p.get('message')}" for p in doc.get("incompatibilities") or [])
        raise HypervisorError(f"Import-VM refused {vmcx_host_path}: {problems}")
    return dict(doc)


def inventory(spec: str, *, transport: Transport | None = None) -> dict[str, Any]:
    """Every VM of ``hyperv://[HOST]`` with its disk chains, checkpoints and recovery
    checkpoints, plus disk files under the host's VM paths that nothing references."""
    parts = urlsplit(spec)
    if parts.scheme != "hyperv":
        raise ConfigError(f"{spec!r}: expected hyperv://[HOST]")
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if transport is None:
        transport = (
            WinRmTransport(
                parts.netloc, os.environ.get("VMVAULT_HYPERV_USER"), os.environ.get("VMVAULT_HYPERV_PASSWORD")
            )
            if parts.netloc
            else LocalPowerShell()
        )
    doc = transport.run("inventory", render("inventory"), float(opts.get("timeout", DEFAULT_TIMEOUT)))
    if not isinstance(doc, dict):
        raise HypervisorError(f"inventory on {parts.netloc or 'this host'}: unexpected reply")
    return doc

"""The PowerShell text of every step, in one place.

Each step is one script: a ``param()`` block with the step's parameters (``steps.STEPS``),
the shared ``PRELUDE`` and the step's body. Values are never written into the script text:
WinRM binds them as real parameters (``add_parameter``); the local transport runs the script
as a script block splatted with a hashtable decoded from a base64 JSON literal (base64 cannot
leave its quotes). IDs are ``[guid]`` parameters, so the only values ever placed into a WQL
filter are GUIDs printed by .NET; names and paths are compared with ``-eq`` (no wildcards).

Every script prints exactly one line: ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": {...}}``; bodies emit one hashtable and suppress every other output. Lists are built
with ``@(...)`` inside hashtables, which ``ConvertTo-Json`` keeps as arrays even with one
element; WMI array properties go through ``ConvertTo-VmvaultArray`` so that ``$null`` is ``[]``.

The WMI side follows Microsoft's documentation of root\\virtualization\\v2 (docs/hyperv.md has
the table: class, method, parameters, page). These scripts are parsed by tree-sitter in the
tests and run against scripted replies; they have not run on a Windows host.
"""

from __future__ import annotations

from vmvault.hypervisors.hyperv.steps import STEPS

__all__ = ["BODIES", "PRELUDE", "script"]

_PS_TYPES = {str: "[string]", int: "[int64]", bool: "[bool]"}
#: parameters that are GUIDs: typed so PowerShell refuses anything else before the body runs
_GUID_PARAMS = ("VmId", "CheckpointId")

PRELUDE = r"""
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
[Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false
$ns = 'root\virtualization\v2'

function ConvertTo-VmvaultArray($Value) {
  # a WMI array property may be $null; @($null) would be one null element
  if ($null -eq $Value) { return ,@() }
  return ,@($Value)
}

function ConvertTo-VmvaultTime($Value) {
  if ($null -eq $Value) { return '' }
  return ([datetime]$Value).ToUniversalTime().ToString('o')
}

function ConvertTo-VmvaultEmbedded($Instance) {
  # an embedded instance (the string form WMI methods take for settings)
  $serializer = [Microsoft.Management.Infrastructure.Serialization.CimSerializer]::Create()
  $options = [Microsoft.Management.Infrastructure.Serialization.InstanceSerializationOptions]::None
  return [System.Text.Encoding]::Unicode.GetString($serializer.Serialize($Instance, $options))
}

function Wait-VmvaultJob($Result, [string]$What, [int64]$Seconds) {
  # Msvm_ConcreteJob.JobState: 2 New, 3 Starting, 4 Running, 5 Suspended, 6 Shutting Down,
  # 7 Completed, 8 Terminated, 9 Killed, 10 Exception, 11 Service, 12 Query Pending,
  # 32768 Completed with Warnings
  $rv = [int64]$Result.ReturnValue
  if ($rv -eq 0) { return $null }
  if ($rv -ne 4096) { throw "$($What) failed with return value $($rv)" }
  if ($null -eq $Result.Job) { throw "$($What) returned 4096 (job started) without a job" }
  $deadline = (Get-Date).AddSeconds($Seconds)
  $job = Get-CimInstance -InputObject $Result.Job
  while (@(2, 3, 4, 5, 6, 11, 12) -contains [int]$job.JobState) {
    if ((Get-Date) -gt $deadline) {
      throw "$($What): the job is still in state $($job.JobState) after $($Seconds) s"
    }
    Start-Sleep -Milliseconds 500
    $job = Get-CimInstance -InputObject $job
  }
  if (@(7, 32768) -notcontains [int]$job.JobState) {
    throw "$($What) failed: job state $($job.JobState), error $($job.ErrorCode): $($job.ErrorDescription)"
  }
  return $job
}

function Get-VmvaultComputerSystem([guid]$Id) {
  $found = @(Get-CimInstance -Namespace $ns -ClassName Msvm_ComputerSystem -Filter "Name='$($Id)'")
  if ($found.Count -ne 1) { throw "no virtual machine with ID $($Id) on $($env:COMPUTERNAME)" }
  return $found[0]
}

function Get-VmvaultRealizedSettings([guid]$Id) {
  $filter = "VirtualSystemIdentifier='$($Id)' AND VirtualSystemType='Microsoft:Hyper-V:System:Realized'"
  $found = @(Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemSettingData -Filter $filter)
  if ($found.Count -ne 1) { throw "no settings of virtual machine $($Id)" }
  return $found[0]
}

function Get-VmvaultCheckpoint([guid]$Id, [guid]$Checkpoint) {
  $vm = Get-VmvaultComputerSystem $Id
  $wanted = "Microsoft:$($Checkpoint)"
  $found = @(Get-CimAssociatedInstance -InputObject $vm -Association Msvm_SnapshotOfVirtualSystem `
      -ResultClassName Msvm_VirtualSystemSettingData | Where-Object { $_.InstanceID -eq $wanted })
  if ($found.Count -gt 1) { throw "$($found.Count) checkpoints with ID $($Checkpoint)" }
  if ($found.Count -eq 0) { return $null }
  return $found[0]
}

function Get-VmvaultHardDisks($Settings) {
  # ResourceType 31 (logical disk) also covers DVD and floppy images: every entry is returned
  # with its ResourceSubType and the connector keeps the virtual hard disks
  $disks = @(Get-CimAssociatedInstance -InputObject $Settings -ResultClassName Msvm_StorageAllocationSettingData |
      Where-Object { $_.ResourceType -eq 31 })
  return ,@(foreach ($d in $disks) {
      $hostResource = ConvertTo-VmvaultArray $d.HostResource
      $path = if ($hostResource.Count -gt 0) { "$($hostResource[0])" } else { '' }
      @{ instance_id = "$($d.InstanceID)"; subtype = "$($d.ResourceSubType)"; path = $path }
    })
}
"""

_WRAPPER = """
try {{
  $result = & {{
{body}
  }}
  $out = @{{ ok = $true; result = $result }}
}} catch {{
  $out = @{{ ok = $false; error = @{{ message = "$($_.Exception.Message)"; type = $_.Exception.GetType().FullName;
    category = "$($_.CategoryInfo.Category)" }} }}
}}
ConvertTo-Json -InputObject $out -Depth 10 -Compress
"""

BODIES: dict[str, str] = {
    "resolve": r"""
    # -eq compares names literally (no wildcards); Hyper-V allows several VMs of one name
    $vms = @(Get-VM | Where-Object { $_.Name -eq $Name })
    @{ vms = @(foreach ($v in $vms) { @{ id = "$($v.Id)"; name = "$($v.Name)" } }) }
""",
    "describe": r"""
    $vm = Get-VM -Id $VmId
    $drives = @()
    foreach ($d in @(Get-VMHardDiskDrive -VM $vm)) {
      $slot = "$($d.ControllerType)$($d.ControllerNumber):$($d.ControllerLocation)"
      $kind = if ($null -ne $d.DiskNumber) { 'passthrough' } else { 'hard' }
      $drives += @{ slot = $slot; kind = $kind; path = "$($d.Path)" }
    }
    foreach ($d in @(Get-VMDvdDrive -VM $vm)) {
      $drives += @{ slot = "$($d.ControllerType)$($d.ControllerNumber):$($d.ControllerLocation)"; kind = 'dvd';
        path = "$($d.Path)" }
    }
    if ($vm.Generation -eq 1) {
      foreach ($d in @(Get-VMFloppyDiskDrive -VM $vm)) {
        $drives += @{ slot = 'floppy'; kind = 'floppy'; path = "$($d.Path)" }
      }
    }
    foreach ($h in @(Get-VMFibreChannelHba -VM $vm)) {
      $drives += @{ slot = "fc:$($h.SanName)"; kind = 'fc'; path = "$($h.SanName)" }
    }
    $checkpoints = @(Get-VMSnapshot -VM $vm)
    # only this VM's configuration and its checkpoints', by ID: the default location holds every VM's
    $files = @()
    $vmDir = Join-Path $vm.ConfigurationLocation 'Virtual Machines'
    $own = @(Get-ChildItem -LiteralPath $vmDir -File | Where-Object { $_.BaseName -eq "$($vm.Id)" })
    if (@($own | Where-Object { $_.Extension -eq '.vmcx' -or $_.Extension -eq '.xml' }).Count -eq 0) {
      throw "no configuration file $($vm.Id).vmcx in $($vmDir)"
    }
    # the running VM's .vmrs is its live runtime state, not part of a backup
    $files += @($own | Where-Object { $_.Extension -ne '.vmrs' } | ForEach-Object { $_.FullName })
    if ($checkpoints.Count -gt 0) {
      $cpDir = Join-Path $vm.SnapshotFileLocation 'Snapshots'
      $ids = @($checkpoints | ForEach-Object { "$($_.Id)" })
      $files += @(Get-ChildItem -LiteralPath $cpDir -File | Where-Object { $ids -contains $_.BaseName } |
          ForEach-Object { $_.FullName })
    }
    @{ id = "$($vm.Id)"; name = "$($vm.Name)"; generation = [int]$vm.Generation; state = "$($vm.State)";
      host = "$($vm.ComputerName)"; drives = $drives; files = $files;
      checkpoints = @(foreach ($c in $checkpoints) {
          @{ id = "$($c.Id)"; name = "$($c.Name)"; type = "$($c.SnapshotType)";
            parent = if ($null -ne $c.ParentSnapshotId) { "$($c.ParentSnapshotId)" } else { '' };
            created = (ConvertTo-VmvaultTime $c.CreationTime);
            disks = @(foreach ($h in @($c.HardDrives)) { "$($h.Path)" }) }
        }) }
""",
    "enable_merge": r"""
    # Msvm_DiskMergeSettingData.EnabledState: 0 temporarily disabled, 1 enabled
    $settings = Get-VmvaultRealizedSettings $VmId
    $merge = @(Get-CimAssociatedInstance -InputObject $settings -ResultClassName Msvm_DiskMergeSettingData)
    if ($merge.Count -eq 0) { return @{ found = $false; was_enabled = $true; state_before = $null } }
    $before = [int]$merge[0].EnabledState
    if ($before -ne 1) {
      $merge[0].EnabledState = [uint32]1
      $vsms = Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemManagementService
      $r = Invoke-CimMethod -InputObject $vsms -MethodName ModifyDiskMergeSettings `
        -Arguments @{ SettingData = (ConvertTo-VmvaultEmbedded $merge[0]) }
      $null = Wait-VmvaultJob $r 'ModifyDiskMergeSettings' $JobTimeout
    }
    @{ found = $true; was_enabled = ($before -eq 1); state_before = $before }
""",
    "list_recovery": r"""
    $vm = Get-VmvaultComputerSystem $VmId
    $snaps = @(Get-CimAssociatedInstance -InputObject $vm -Association Msvm_SnapshotOfVirtualSystem `
        -ResultClassName Msvm_VirtualSystemSettingData |
        Where-Object { $_.VirtualSystemType -eq 'Microsoft:Hyper-V:Snapshot:Recovery' })
    @{ checkpoints = @(foreach ($s in $snaps) {
          @{ instance_id = "$($s.InstanceID)"; name = "$($s.ElementName)";
            created = (ConvertTo-VmvaultTime $s.CreationTime) }
        }) }
""",
    "create_recovery": r"""
    $vm = Get-VmvaultComputerSystem $VmId
    $svc = Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemSnapshotService
    $class = Get-CimClass -Namespace $ns -ClassName Msvm_VirtualSystemSnapshotSettingData
    # ConsistencyLevel 1 application-consistent, 2 crash-consistent; GuestBackupType 1 Full, 2 Copy
    $settings = New-CimInstance -CimClass $class -ClientOnly -Property @{
      ConsistencyLevel = [byte]$ConsistencyLevel; IgnoreNonSnapshottableDisks = $true
      GuestBackupType = [byte]$GuestBackupType }
    $r = Invoke-CimMethod -InputObject $svc -MethodName CreateSnapshot -Arguments @{
      AffectedSystem = $vm; SnapshotSettings = (ConvertTo-VmvaultEmbedded $settings); SnapshotType = [uint16]32768 }
    $job = Wait-VmvaultJob $r 'CreateSnapshot' $JobTimeout
    # the new checkpoint is the one the job names (CIM_AffectedJobElement), never the VM's
    # most recent checkpoint, which may be a user's
    if ($null -ne $job) {
      $snap = @(Get-CimAssociatedInstance -InputObject $job -ResultClassName Msvm_VirtualSystemSettingData)
    } else {
      $snap = @(foreach ($s in @(ConvertTo-VmvaultArray $r.ResultingSnapshot)) { Get-CimInstance -InputObject $s })
    }
    if ($snap.Count -ne 1) { throw "CreateSnapshot: the job names $($snap.Count) checkpoints, expected one" }
    $snap = $snap[0]
    $renamed = $false
    $renameError = ''
    try {
      $snap.ElementName = $Marker
      $vsms = Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemManagementService
      $r2 = Invoke-CimMethod -InputObject $vsms -MethodName ModifySystemSettings `
        -Arguments @{ SystemSettings = (ConvertTo-VmvaultEmbedded $snap) }
      $null = Wait-VmvaultJob $r2 'ModifySystemSettings' $JobTimeout
      $renamed = $true
    } catch {
      # the checkpoint exists: report it, named or not, so the connector removes it
      $renameError = "$($_.Exception.Message)"
    }
    $name = if ($renamed) { $Marker } else { "$($snap.ElementName)" }
    @{ instance_id = "$($snap.InstanceID)"; name = $name; renamed = $renamed; rename_error = $renameError }
""",
    "checkpoint_disks": r"""
    $snap = Get-VmvaultCheckpoint $VmId $CheckpointId
    if ($null -eq $snap) { throw "checkpoint $($CheckpointId) of VM $($VmId) not found" }
    @{ disks = (Get-VmvaultHardDisks $snap) }
""",
    "changes": r"""
    # named arguments: Path, LimitId, ByteOffset, ByteLength (TargetSnapshotId is for VHD Sets only)
    $ims = Get-CimInstance -Namespace $ns -ClassName Msvm_ImageManagementService
    $r = Invoke-CimMethod -InputObject $ims -MethodName GetVirtualDiskChanges -Arguments @{
      Path = $Path; LimitId = $LimitId; ByteOffset = [uint64]$ByteOffset; ByteLength = [uint64]$ByteLength }
    $null = Wait-VmvaultJob $r 'GetVirtualDiskChanges' $JobTimeout
    @{ processed = $r.ProcessedByteLength; offsets = (ConvertTo-VmvaultArray $r.ChangedByteOffsets);
      lengths = (ConvertTo-VmvaultArray $r.ChangedByteLengths) }
""",
    "host_of": r"""
    $vm = Get-VM -Id $VmId
    @{ host = "$($vm.ComputerName)"; status = "$($vm.Status)"; state = "$($vm.State)" }
""",
    "convert": r"""
    $snap = Get-VmvaultCheckpoint $VmId $CheckpointId
    if ($null -eq $snap) { throw "checkpoint $($CheckpointId) of VM $($VmId) not found" }
    # ConvertToReferencePoint is a method of the snapshot service; the reference point comes from the job
    $svc = Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemSnapshotService
    $r = Invoke-CimMethod -InputObject $svc -MethodName ConvertToReferencePoint -Arguments @{ AffectedSnapshot = $snap }
    $job = Wait-VmvaultJob $r 'ConvertToReferencePoint' $JobTimeout
    if ($null -ne $job) {
      $rp = @(Get-CimAssociatedInstance -InputObject $job -ResultClassName Msvm_VirtualSystemReferencePoint)
    } else {
      $rp = @(foreach ($p in @(ConvertTo-VmvaultArray $r.ResultingReferencePoint)) { Get-CimInstance -InputObject $p })
    }
    if ($rp.Count -ne 1) { throw "ConvertToReferencePoint: the job names $($rp.Count) reference points, expected one" }
    $disks = @(Get-VmvaultHardDisks (Get-VmvaultRealizedSettings $VmId))
    @{ reference_point = "$($rp[0].InstanceID)"; disk_ids = (ConvertTo-VmvaultArray $rp[0].VirtualDiskIdentifiers);
      rct_ids = (ConvertTo-VmvaultArray $rp[0].ResilientChangeTrackingIdentifiers); disks = $disks }
""",
    "list_reference_points": r"""
    $vm = Get-VmvaultComputerSystem $VmId
    $points = @(Get-CimAssociatedInstance -InputObject $vm -Association Msvm_ReferencePointOfVirtualSystem `
        -ResultClassName Msvm_VirtualSystemReferencePoint)
    @{ reference_points = @(foreach ($p in $points) {
          @{ instance_id = "$($p.InstanceID)"; disk_ids = (ConvertTo-VmvaultArray $p.VirtualDiskIdentifiers);
            rct_ids = (ConvertTo-VmvaultArray $p.ResilientChangeTrackingIdentifiers) }
        }) }
""",
    "destroy_reference_point": r"""
    $vm = Get-VmvaultComputerSystem $VmId
    $points = @(Get-CimAssociatedInstance -InputObject $vm -Association Msvm_ReferencePointOfVirtualSystem `
        -ResultClassName Msvm_VirtualSystemReferencePoint | Where-Object { $_.InstanceID -eq $ReferencePointId })
    if ($points.Count -eq 0) { return @{ destroyed = $false } }
    $svc = Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemReferencePointService
    $r = Invoke-CimMethod -InputObject $svc -MethodName DestroyReferencePoint `
      -Arguments @{ AffectedReferencePoint = $points[0] }
    $null = Wait-VmvaultJob $r 'DestroyReferencePoint' $JobTimeout
    @{ destroyed = $true }
""",
    "destroy_checkpoint": r"""
    $snap = Get-VmvaultCheckpoint $VmId $CheckpointId
    if ($null -eq $snap) { return @{ destroyed = $false } }
    $svc = Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemSnapshotService
    $r = Invoke-CimMethod -InputObject $svc -MethodName DestroySnapshot -Arguments @{ AffectedSnapshot = $snap }
    $null = Wait-VmvaultJob $r 'DestroySnapshot' $JobTimeout
    @{ destroyed = $true }
""",
    "inventory": r"""
    $vhdRoot = (Get-VMHost).VirtualHardDiskPath
    $referenced = @{}
    $problems = @()
    $vms = @(foreach ($vm in @(Get-VM)) {
        $chain = @()
        $paths = @(Get-VMHardDiskDrive -VM $vm | Where-Object { $null -eq $_.DiskNumber } | ForEach-Object { $_.Path })
        $paths += @(Get-VMSnapshot -VM $vm | ForEach-Object { @($_.HardDrives) } |
            Where-Object { $null -eq $_.DiskNumber } | ForEach-Object { $_.Path })
        foreach ($p in $paths) {
          $depth = 0
          while ($p -and -not $referenced.ContainsKey($p.ToLowerInvariant()) -and $depth -lt 256) {
            $referenced[$p.ToLowerInvariant()] = 1
            $depth += 1
            try { $v = Get-VHD -Path $p } catch {
              # a disk Get-VHD cannot open is reported, not fatal to the audit
              $problems += "$($vm.Name): $($p): $($_.Exception.Message)"
              break
            }
            $chain += @{ path = "$($p)"; size = [int64]$v.FileSize; parent = "$($v.ParentPath)" }
            $p = $v.ParentPath
          }
        }
        $filter = "VirtualSystemIdentifier='$($vm.Id)' AND VirtualSystemType='Microsoft:Hyper-V:Snapshot:Recovery'"
        $recovery = @(Get-CimInstance -Namespace $ns -ClassName Msvm_VirtualSystemSettingData -Filter $filter)
        @{ id = "$($vm.Id)"; name = "$($vm.Name)"; path = "$($vm.Path)"; disks = $chain;
          checkpoints = @(foreach ($c in @(Get-VMSnapshot -VM $vm)) {
              @{ id = "$($c.Id)"; name = "$($c.Name)"; parent = "$($c.ParentSnapshotId)"; type = "$($c.SnapshotType)";
                created = (ConvertTo-VmvaultTime $c.CreationTime) }
            });
          recovery = @(foreach ($s in $recovery) { "$($s.ElementName)" }) }
      })
    $roots = @(@($vhdRoot) + @($vms | ForEach-Object { $_.path }) | Where-Object { $_ } | Sort-Object -Unique)
    $extensions = @('.vhdx', '.avhdx', '.vhd', '.avhd')
    $orphans = @(foreach ($root in $roots) {
        # -Include is ignored with -LiteralPath in Windows PowerShell 5: filter the extension here
        Get-ChildItem -LiteralPath $root -Recurse -File -ErrorAction SilentlyContinue -ErrorVariable listErrors |
          Where-Object { $extensions -contains $_.Extension.ToLowerInvariant() } |
          Where-Object { -not $referenced.ContainsKey($_.FullName.ToLowerInvariant()) } |
          ForEach-Object { @{ path = "$($_.FullName)"; size = [int64]$_.Length } }
        foreach ($e in @($listErrors)) { $problems += "cannot list $($root): $($e.Exception.Message)" }
      })
    @{ host = "$($env:COMPUTERNAME)"; vms = $vms; orphans = $orphans; problems = $problems }
""",
    "compare_import": r"""
    # -VhdSourcePath: the restored disks beside the configuration, not the original VM's
    $report = Compare-VM -Path $Path -Copy -GenerateNewId -VirtualMachinePath $VirtualMachinePath `
      -VhdDestinationPath $VhdDestinationPath -VhdSourcePath $VhdSourcePath
    $problems = @(foreach ($p in @($report.Incompatibilities)) {
        @{ id = "$($p.MessageId)"; message = "$($p.Message)" }
      })
    if ($problems.Count -gt 0) { return @{ imported = $false; id = ''; name = ''; incompatibilities = $problems } }
    $vm = Import-VM -CompatibilityReport $report
    @{ imported = $true; id = "$($vm.Id)"; name = "$($vm.Name)"; incompatibilities = @() }
""",
}

assert set(BODIES) == set(STEPS), "every step has a script"


def param_block(step: str) -> str:
    params = []
    for name, kind in STEPS[step].items():
        ps_type = "[guid]" if name in _GUID_PARAMS else _PS_TYPES[kind]
        params.append(f"{ps_type}${name}")
    return "param(" + ", ".join(params) + ")"


def script(step: str) -> str:
    """The whole script of ``step``: param block, prelude, body in the reply wrapper."""
    return param_block(step) + "\n" + PRELUDE + _WRAPPER.format(body=BODIES[step].rstrip())

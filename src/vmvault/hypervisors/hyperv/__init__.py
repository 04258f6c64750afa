"""Hyper-V: a VM on a Windows host, through the WMI classes of root\\virtualization\\v2.

NOT RUN AGAINST A REAL HYPER-V HOST. The connector (``session``) is exercised end to end by
the lab host (``vmvault.testing.hyperv_lab``: the same steps done on real VHDX files); the
PowerShell scripts (``scripts``) are parsed by tree-sitter and run against scripted replies
only. docs/hyperv.md says what has run where and which Microsoft page each name was checked
against.

Modules: ``steps`` (the step protocol and reply parsing), ``scripts`` (PowerShell text),
``transports`` (local PowerShell, WinRM), ``recovery`` (which checkpoints are ours; RCT
state), ``session`` (``HyperVSource``/``HyperVSession``).
"""

from vmvault.hypervisors.hyperv.recovery import RECOVERY_MARKER, Marker
from vmvault.hypervisors.hyperv.scripts import script
from vmvault.hypervisors.hyperv.session import (
    DEFAULT_TIMEOUT,
    HyperVSession,
    HyperVSource,
    PathMap,
    inventory,
    register_restored,
)
from vmvault.hypervisors.hyperv.steps import STEPS, HostClient, StepTransport
from vmvault.hypervisors.hyperv.transports import LocalPowerShell, WinRmOptions, WinRmTransport, decode_reply

__all__ = [
    "DEFAULT_TIMEOUT",
    "RECOVERY_MARKER",
    "STEPS",
    "HostClient",
    "HyperVSession",
    "HyperVSource",
    "LocalPowerShell",
    "Marker",
    "PathMap",
    "StepTransport",
    "WinRmOptions",
    "WinRmTransport",
    "decode_reply",
    "inventory",
    "register_restored",
    "script",
]

"""The PowerShell text itself: every script parses (tree-sitter-powershell), declares exactly
the step's parameters, builds the reply fields the connector reads, waits on WMI jobs with
every documented state, and puts nothing but GUID-typed values into a WQL filter."""

from __future__ import annotations

import base64
import functools
import re
from typing import Any

import pytest

from vmvault.hypervisors.hyperv.scripts import BODIES, PRELUDE, script
from vmvault.hypervisors.hyperv.steps import STEPS
from vmvault.hypervisors.hyperv.transports import encoded_command


@functools.cache
def _parser() -> Any:
    """tree-sitter's PowerShell parser; a test that parses is skipped without it (the tests
    that read the scripts as text still run)."""
    tree_sitter = pytest.importorskip("tree_sitter", reason="tree-sitter (dev extra) parses the scripts")
    powershell = pytest.importorskip("tree_sitter_powershell", reason="tree-sitter-powershell (dev extra)")
    return tree_sitter.Parser(tree_sitter.Language(powershell.language()))


def parse(text: str) -> Any:
    return _parser().parse(text.encode("utf-8")).root_node


def walk(node: Any) -> list[Any]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(reversed(n.children))
    return out


def errors(node: Any) -> list[str]:
    return [
        f"line {n.start_point[0] + 1}: {n.text.decode(errors='replace')[:60]!r}" if n.text else f"missing {n.type}"
        for n in walk(node)
        if n.type == "ERROR" or n.is_missing
    ]


def test_the_parser_finds_syntax_errors() -> None:
    assert errors(parse("function f { if ($x { 1 }"))
    assert errors(parse("@{ a = 1; b = }"))
    assert not errors(parse("param([guid]$VmId)\n@{ a = @(1, 2) }"))


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_script_parses(step: str) -> None:
    assert errors(parse(script(step))) == []
    # and as the local transport sends it: inside the script block splatted with the parameters
    sent = base64.b64decode(encoded_command(step, dict.fromkeys(STEPS[step], 1))).decode("utf-16-le")
    assert errors(parse(sent)) == []


@pytest.mark.parametrize("step", sorted(STEPS))
def test_each_script_declares_exactly_its_parameters(step: str) -> None:
    root = parse(script(step))
    (block,) = [n for n in walk(root) if n.type == "param_block"][:1]
    declared: dict[str, str] = {}
    for p in (n for n in walk(block) if n.type == "script_parameter"):
        variable = next(n for n in walk(p) if n.type == "variable").text.decode()
        types = [n.text.decode() for n in walk(p) if n.type == "type_name"]
        declared[variable.lstrip("$")] = types[0] if types else ""
    expected = {
        name: ("guid" if name in ("VmId", "CheckpointId") else {str: "string", int: "int64", bool: "bool"}[kind])
        for name, kind in STEPS[step].items()
    }
    assert declared == expected
    for name in STEPS[step]:  # every parameter is used by the body
        assert re.search(rf"\${name}\b", BODIES[step]), name


#: the reply fields the connector reads (steps.HostClient), per step
REPLY_FIELDS = {
    "resolve": {"vms", "id", "name"},
    "describe": {"id", "name", "generation", "state", "host", "drives", "slot", "kind", "path", "files", "checkpoints"}
    | {"parent", "type", "created", "disks"},
    "enable_merge": {"found", "was_enabled", "state_before"},
    "list_recovery": {"checkpoints", "instance_id", "name", "created"},
    "create_recovery": {"instance_id", "name", "renamed", "rename_error"},
    "checkpoint_disks": {"disks"},
    "changes": {"processed", "offsets", "lengths"},
    "host_of": {"host", "status", "state"},
    "convert": {"reference_point", "disk_ids", "rct_ids", "disks"},
    "list_reference_points": {"reference_points", "instance_id", "disk_ids", "rct_ids"},
    "destroy_reference_point": {"destroyed"},
    "destroy_checkpoint": {"destroyed"},
    "inventory": {"host", "vms", "orphans", "problems", "id", "name", "path", "disks", "checkpoints", "recovery"}
    | {"size", "parent", "type", "created"},
    "compare_import": {"imported", "id", "name", "incompatibilities", "message"},
}
#: hashtables built by prelude helpers
PRELUDE_FIELDS = {"instance_id", "subtype", "path"}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_each_script_builds_the_reply_the_connector_reads(step: str) -> None:
    keys = {n.text.decode() for n in walk(parse(script(step))) if n.type == "key_expression" and n.text is not None}
    missing = REPLY_FIELDS[step] - keys - (PRELUDE_FIELDS if step in ("checkpoint_disks", "convert") else set())
    assert not missing, f"{step} never sets {sorted(missing)}"


def test_job_waiting_follows_the_documented_states() -> None:
    """Msvm_ConcreteJob.JobState: 2 New, 3 Starting, 4 Running, 5 Suspended, 6 Shutting Down,
    11 Service, 12 Query Pending keep polling; 7 Completed and 32768 Completed with Warnings
    succeed; anything else (8 Terminated, 9 Killed, 10 Exception) fails with the error."""
    wait = PRELUDE[PRELUDE.index("function Wait-VmvaultJob") :]
    wait = wait[: wait.index("\n}\n")]
    arrays = re.findall(r"@\(([\d, ]+)\) -(contains|notcontains)", wait)
    assert {a.replace(" ", ""): op for a, op in arrays} == {"2,3,4,5,6,11,12": "contains", "7,32768": "notcontains"}
    assert "-ne 4096" in wait and "-eq 0" in wait and "$job.ErrorDescription" in wait and "$deadline" in wait
    for step in ("enable_merge", "create_recovery", "changes", "convert", "destroy_reference_point"):
        assert "Wait-VmvaultJob $r" in BODIES[step]


def test_only_guids_reach_a_wql_filter() -> None:
    """A WQL filter is the one place a value meets query text: only [guid]-typed values
    (and a VM's own Id) may be expanded into one."""
    allowed = {"$($Id)", "$($vm.Id)"}
    for text in [PRELUDE, *BODIES.values()]:
        for literal in re.findall(r'(?:-Filter|\$filter =) "([^"]*)"', text):
            assert set(re.findall(r"\$\([^)]*\)|\$\w+", literal)) <= allowed, literal
    for name, body in BODIES.items():
        assert "Invoke-Expression" not in body and "iex " not in body, name


def test_documented_names_are_the_ones_used() -> None:
    """The class and method names the issue found wrong are right now."""
    convert = BODIES["convert"]
    assert "Msvm_VirtualSystemSnapshotService" in convert and "ConvertToReferencePoint" in convert
    assert "Msvm_VirtualSystemReferencePoint" in convert and "GetRelated" not in convert
    assert "ModifyDiskMergeSettings" in BODIES["enable_merge"] and "EnabledState -ne 1" not in BODIES["enable_merge"]
    assert "$before -ne 1" in BODIES["enable_merge"] and "EnabledState = [uint32]1" in BODIES["enable_merge"]
    assert "MostCurrentSnapshotInBranch" not in BODIES["create_recovery"]
    create = BODIES["create_recovery"]
    assert "GuestBackupType" in create and "SnapshotType = [uint16]32768" in create
    changes = BODIES["changes"]
    for arg in ("Path = $Path", "LimitId = $LimitId", "ByteOffset = [uint64]$ByteOffset", "ByteLength = [uint64]"):
        assert arg in changes
    assert "-Include *" not in BODIES["inventory"] and "try { $v = Get-VHD" in BODIES["inventory"]
    assert "Where-Object { $extensions -contains $_.Extension.ToLowerInvariant() }" in BODIES["inventory"]
    assert "-VhdSourcePath $VhdSourcePath" in BODIES["compare_import"]

"""The audit beside the connectors: reports from folders, from a Hyper-V host's inventory,
and backup ages from a repository's snapshots."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmvault.errors import ConfigError, HypervisorError
from vmvault.hypervisors.audit import VmAudit, add_backup_ages, audit, format_age
from vmvault.hypervisors.hyperv import decode_reply
from vmvault.hypervisors.hyperv.connector import audit_inventory
from vmvault.hypervisors.hyperv.session import inventory
from vmvault.testing.hyperv_lab import LabHost

MIB = 1024 * 1024
RECORDED = json.loads((Path(__file__).parent / "scripted" / "hyperv_web.json").read_text())
NOW = 1795700000.0


class _Replies:
    """A transport answering ``inventory`` with ``doc``."""

    host = "HV01"

    def __init__(self, doc: Any) -> None:
        self.doc = doc

    def run(self, step: str, _params: Any, _timeout: float) -> Any:
        return decode_reply(step, json.dumps({"ok": True, "result": self.doc}))


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        (("vms", 0, "disks", 0, "size"), "4 GB", r"reply.vms\[0\].disks\[0\].size is"),
        (("vms", 0, "disks", 1), "C:\\x.vhdx", r"reply.vms\[0\].disks\[1\] is"),
        (("vms", 0, "checkpoints", 0, "created"), [1], r"reply.vms\[0\].checkpoints\[0\].created is"),
        (("orphans", 0, "size"), {"a": 1}, r"reply.orphans\[0\].size is"),
    ],
)
def test_an_inventory_field_of_another_type_is_named_not_a_traceback(
    where: tuple[Any, ...], value: Any, named: str
) -> None:
    """What ``audit`` reads of the host's inventory is checked field by field: a disk's size
    that was text made ``int()`` fail with a traceback."""
    doc = json.loads(RECORDED["replies"]["inventory"])["result"]
    inner = doc
    for key in where[:-1]:
        inner = inner[key]
    inner[where[-1]] = value
    with pytest.raises(HypervisorError, match=named):
        inventory("hyperv://HV01", transport=_Replies(doc))  # type: ignore[arg-type]


def test_hyperv_host_inventory() -> None:
    doc = decode_reply("inventory", RECORDED["replies"]["inventory"])
    web, dc, orphan_host = audit_inventory(doc, now=NOW)
    assert web.checkpoints.count == 1 and web.checkpoints.chain_depth == 1
    assert web.checkpoints.differencing_bytes == 4194304
    assert web.recovery_checkpoints_left and web.problems
    assert dc.problems == []
    assert orphan_host.host and orphan_host.orphans[0]["size"] == 52428800
    assert "52,428,800 bytes" in orphan_host.problems[0]
    # a disk Get-VHD could not open (a pass-through disk, a broken file) is a problem, not an abort
    doc["problems"] = ["web: C:\\Hyper-V\\web\\broken.vhdx: The file is corrupt"]
    doc["orphans"] = []
    (*_vms, host) = audit_inventory(doc, now=NOW)
    assert host.problems == doc["problems"] and host.name.startswith("(host")


def test_a_parent_loop_in_an_inventory_does_not_hang() -> None:
    doc = {
        "vms": [
            {
                "name": "loop",
                "disks": [{"path": "a", "parent": "b", "size": 1}, {"path": "b", "parent": "a", "size": 2}],
                "checkpoints": [],
            }
        ]
    }
    (vm,) = audit_inventory(doc, now=NOW)
    assert vm.checkpoints.chain_depth == 3 and vm.checkpoints.differencing_bytes == 3


def test_json_form_keeps_its_keys(tmp_path: Path) -> None:
    host = LabHost(str(tmp_path))
    host.create_vm("web", (4 * MIB,))
    host.checkpoint("web", "cp1")
    (vm,) = audit(f"hyperv-lab://{tmp_path}", NOW)
    doc = vm.to_dict()
    assert set(doc) == {"name", "id", "location", "checkpoints", "recovery_checkpoints_left", "orphans", "problems"}
    assert [c["name"] for c in doc["checkpoints"]["list"]] == ["cp1"] and "items" not in doc["checkpoints"]
    # the plain folder reads the same as the lab target
    assert [r.to_dict()["checkpoints"] for r in audit(str(tmp_path), NOW)] == [doc["checkpoints"]]


@dataclass
class Snap:
    time: str
    vm: dict[str, Any] = field(default_factory=dict)


def test_backup_ages_match_by_id_then_name() -> None:
    reports = [
        VmAudit(name="web", id="AAAA", location=""),
        VmAudit(name="db", id="", location=""),
        VmAudit(name="old", id="CCCC", location=""),
        VmAudit(name="(host x)", id="", location="", host=True),
    ]
    snaps = [
        Snap("2026-11-25T10:00:00+00:00", {"id": "aaaa", "name": "renamed"}),
        Snap("2026-11-25T11:00:00+00:00", {"name": "DB"}),
        Snap("2020-01-01T00:00:00+00:00", {"id": "CCCC"}),
        Snap("not a time", {"id": "CCCC"}),
    ]
    now = Snap("2026-11-25T12:00:00+00:00").time
    from vmvault.hypervisors.audit import iso_to_epoch

    at = iso_to_epoch(now)
    assert at is not None
    add_backup_ages(reports, snaps, max_age=26 * 3600, now=at)
    web, db, old, host = reports
    assert web.last_backup_age_seconds == 7200 and web.problems == []
    assert db.last_backup_age_seconds == 3600 and db.problems == []
    assert old.problems and "checkpoints are not backups" in old.problems[0]
    assert not host.backup_checked and "last_backup_age_seconds" not in host.to_dict()
    assert web.to_dict()["last_backup_age_seconds"] == 7200


def test_targets_no_connector_can_audit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        audit(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a target an audit can read"):
        audit("qemu+unix:///run/vm.qmp")
    with pytest.raises(ConfigError, match="not a target an audit can read"):
        audit("ftp://example.net/vm")


def test_ages_read_short() -> None:
    assert [format_age(s) for s in (5, 90, 7200, 3 * 86400)] == ["5s", "1.5m", "2.0h", "3.0d"]

"""The Hyper-V connector against scripted replies (no Hyper-V host here).

Replies (``scripted/hyperv_web.json``) are written from Microsoft's documentation, not
captured; see ``scripted/README.md``. Disks are real VHDX files where ``path_map`` maps the
host's paths, so the reading side runs for real; the host side answers step by step, each
call checked against the step table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from vmvault.disk.vhdx import create_vhdx
from vmvault.errors import HypervisorError, SourceError
from vmvault.hypervisors.base import PreviousBackup
from vmvault.hypervisors.hyperv import STEPS, HyperVSource, decode_reply, register_restored
from vmvault.hypervisors.hyperv.recovery import Journal, RctState
from vmvault.hypervisors.hyperv.steps import ParamValue

DOC = json.loads((Path(__file__).parent / "scripted" / "hyperv_web.json").read_text(encoding="utf-8"))
R: dict[str, str] = DOC["replies"]
VM: str = DOC["vm_id"]
REC: str = DOC["recovery_id"]
AVHDX: str = DOC["paths"]["avhdx"]
VHDX: str = DOC["paths"]["vhdx"]
ROOT: str = DOC["paths"]["root"]
MIB = 1024 * 1024
SIZE = 16 * MIB

Reply = str | Callable[[Mapping[str, ParamValue]], str] | Exception


def line(result: Any) -> str:
    """A reply line as the scripts print it (ConvertTo-Json -Compress)."""
    return json.dumps({"ok": True, "result": result}, separators=(",", ":"), ensure_ascii=False)


def failure(message: str) -> str:
    return json.dumps({"ok": False, "error": {"message": message, "type": "System.Exception"}})


def result_of(name: str) -> Any:
    return json.loads(R[name])["result"]


def created(params: Mapping[str, ParamValue]) -> str:
    return line({"instance_id": f"Microsoft:{REC}", "name": params["Marker"], "renamed": True, "rename_error": ""})


class Host:
    """Answers each step from a queue of scripted replies (else the step's default)."""

    host = "HV01"

    def __init__(self, **queues: list[Reply]) -> None:
        self.queues = {k: list(v) for k, v in queues.items()}
        self.calls: list[tuple[str, dict[str, ParamValue]]] = []
        self.defaults: dict[str, Reply] = {
            "resolve": R["resolve"],
            "describe": R["describe"],
            "enable_merge": R["enable_merge"],
            "list_recovery": R["list_recovery_none"],
            "list_reference_points": R["list_reference_points_none"],
            "create_recovery": created,
            "checkpoint_disks": R["checkpoint_disks"],
            "changes": lambda p: line({"processed": p["ByteLength"], "offsets": [], "lengths": []}),
            "host_of": R["host_of"],
            "convert": R["convert"],
            "destroy_checkpoint": R["destroy"],
            "destroy_reference_point": R["destroy"],
            "compare_import": R["compare_import_ok"],
            "inventory": R["inventory"],
        }

    def run(self, step: str, params: Mapping[str, ParamValue], timeout: float) -> Any:
        assert set(params) == set(STEPS[step]), step
        self.calls.append((step, dict(params)))
        queue = self.queues.get(step)
        reply = queue.pop(0) if queue else self.defaults[step]
        if isinstance(reply, Exception):
            raise reply
        text = reply(params) if callable(reply) else reply
        return decode_reply(step, text)

    def steps(self) -> list[str]:
        return [s for s, _p in self.calls]

    def params(self, step: str) -> list[dict[str, ParamValue]]:
        return [p for s, p in self.calls if s == step]


@pytest.fixture
def mnt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host's C:\\Hyper-V as an SMB mount would show it (non-ASCII names included)."""
    monkeypatch.setenv("VMVAULT_STATE_DIR", str(tmp_path / "state"))
    root = tmp_path / "mnt"
    vm = root / ROOT.rsplit("\\", 1)[1]
    (vm / "Virtual Hard Disks").mkdir(parents=True)
    (vm / "Virtual Machines").mkdir()
    (vm / "Snapshots").mkdir()
    vhdx = vm / "Virtual Hard Disks" / VHDX.rsplit("\\", 1)[1]
    w = create_vhdx(str(vhdx), SIZE)
    w.write(0, b"x" * MIB)
    w.close()
    c = create_vhdx(str(vm / "Virtual Hard Disks" / AVHDX.rsplit("\\", 1)[1]), 0, parent=str(vhdx), block_size=2 * MIB)
    c.write(MIB, b"y" * 4096)
    c.close()
    for ext in ("vmcx", "vmgs"):
        (vm / "Virtual Machines" / f"{VM}.{ext}").write_bytes(b"cfg" * 100)
    (vm / "Snapshots" / f"{DOC['checkpoint_id']}.vmcx").write_bytes(b"cp" * 100)
    # another VM's configuration in the same folder is no part of this VM
    (vm / "Virtual Machines" / "11111111-2222-3333-4444-555555555555.vmcx").write_bytes(b"other")
    return root


def source(mnt: Path, host: Host, query: str = "", name: str = "wéb-Ünïcode") -> HyperVSource:
    return HyperVSource(f"hyperv://HV01/{name}?path_map=C:\\Hyper-V\\={mnt}/{query}", transport=host)


BEFORE_CHECKPOINT = ["resolve", "describe", "enable_merge", "list_recovery", "list_recovery", "create_recovery"]


def test_full_backup_sequence(mnt: Path) -> None:
    host = Host()
    with source(mnt, host).open_session(None) as s:
        assert host.steps() == [*BEFORE_CHECKPOINT, "checkpoint_disks"]
        assert Journal.load(VM) is not None and Journal.load(VM).created == REC  # type: ignore[union-attr]
        (create,) = host.params("create_recovery")
        assert create["VmId"] == VM and create["ConsistencyLevel"] == 1 and create["GuestBackupType"] == 1
        marker = str(create["Marker"])
        assert re.fullmatch(rf"vmvault-recovery run=\w+ host={re.escape(socket.gethostname())} pid=\d+ t=\d+", marker)
        assert s.consistency == "application-consistent"
        names = {d.name: d for d in s.disks}
        leaf = names["Virtual Hard Disks/" + AVHDX.rsplit("\\", 1)[1]]
        assert leaf.layer and leaf.parent_name == "Virtual Hard Disks/wéb.vhdx"
        assert leaf.image.read(MIB, 4096) == b"y" * 4096 and leaf.image.read(0, 4) == b"xxxx"
        assert leaf.changed is None  # no previous backup
        assert not any("setup.iso" in n for n in names)  # the DVD image is not a disk of the VM
        assert sorted(f.name for f in s.files) == sorted(
            [f"Virtual Machines/{VM}.vmcx", f"Virtual Machines/{VM}.vmgs", f"Snapshots/{DOC['checkpoint_id']}.vmcx"]
        )
        record = s.extra["hyperv"]
        assert record["not_backed_up"] == [
            {"slot": "SCSI0:2", "kind": "passthrough", "path": "Disk 2 3.00 GB Bus 0 Lun 2 Target 0"}
        ]
        assert record["guest_backup_type"] == "full" and record["recovery_checkpoint"] == REC
        assert any(w.startswith("NOT BACKED UP: pass-through disk Disk 2") for w in s.warnings)
        s.complete("snap1")
        assert host.steps()[-3:] == ["host_of", "list_reference_points", "convert"]
    assert Journal.load(VM) is None
    assert "destroy_checkpoint" not in host.steps()
    assert RctState(VM).get("snap1") == {AVHDX.lower(): "rctX:4abc8f2e:1a2b:4c3d:9e8f:0123456789ab:00000012"}


def test_powershell_unwraps_one_element_arrays(mnt: Path) -> None:
    """A collection of one reaches JSON as the element itself, and an absent one as null."""
    desc = result_of("describe")
    desc["drives"] = desc["drives"][0]
    desc["files"] = next(f for f in desc["files"] if f.endswith(".vmcx") and VM in f)
    desc["checkpoints"] = dict(desc["checkpoints"][0], disks=VHDX)
    disks = result_of("checkpoint_disks")
    stale = {"instance_id": "Microsoft:9F1E2D3C-AAAA-4BBB-8CCC-DDDDEEEEFFFF", "name": "vmvault-recovery", "created": ""}
    host = Host(
        describe=[line(desc), line(desc)],
        list_recovery=[line({"checkpoints": stale}), line({"checkpoints": None})],
        checkpoint_disks=[line({"disks": disks["disks"][0]})],
    )
    with source(mnt, host).open_session(None) as s:
        assert len(s.files) == 1 and len(s.disks) == 2
        assert host.params("destroy_checkpoint")[0]["CheckpointId"] == "9F1E2D3C-AAAA-4BBB-8CCC-DDDDEEEEFFFF"
        assert any("interrupted backup" in w for w in s.warnings)


def previous(mnt: Path) -> PreviousBackup:
    RctState(VM).put("prev", "Microsoft:RP-OLD", {AVHDX: "rctX:1"})
    return PreviousBackup("prev", {})


def test_changes_are_asked_until_the_whole_disk_is_covered(mnt: Path) -> None:
    host = Host(
        changes=[
            # scalars where PowerShell unwrapped a one-element array
            line({"processed": 8 * MIB, "offsets": MIB, "lengths": 65536}),
            line({"processed": 4 * MIB, "offsets": [8 * MIB, 9 * MIB], "lengths": [4096, 0]}),
            line({"processed": 4 * MIB, "offsets": None, "lengths": None}),
        ]
    )
    with source(mnt, host).open_session(previous(mnt)) as s:
        (leaf,) = [d for d in s.disks if d.meta.get("host_path")]
        assert leaf.changed == [(MIB, 65536), (8 * MIB, 4096)]
    asked = [(p["LimitId"], p["ByteOffset"], p["ByteLength"]) for p in host.params("changes")]
    assert asked == [("rctX:1", 0, SIZE), ("rctX:1", 8 * MIB, 8 * MIB), ("rctX:1", 12 * MIB, 4 * MIB)]
    assert all(p["Path"] == AVHDX for p in host.params("changes"))


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (line({"processed": 0, "offsets": [], "lengths": []}), "processed nothing"),
        (line({"processed": SIZE + 1, "offsets": [], "lengths": []}), "processed"),
        (line({"processed": SIZE, "offsets": [0, 4096], "lengths": [4096]}), "2 ChangedByteOffsets but 1"),
        (line({"processed": 4096, "offsets": [8192], "lengths": [4096]}), "outside"),
        (line({"processed": SIZE, "offsets": [8192, 0], "lengths": [4096, 4096]}), "out of order"),
        (line({"processed": None, "offsets": [], "lengths": []}), "processed is missing"),
        (line({"processed": SIZE, "offsets": [None], "lengths": [1]}), "is null"),
        (R["changes_lost_rct"], "32779"),
    ],
)
def test_change_tracking_that_cannot_answer_means_a_full_read(mnt: Path, reply: str, why: str) -> None:
    host = Host(changes=[reply])
    with source(mnt, host).open_session(previous(mnt)) as s:
        (leaf,) = [d for d in s.disks if d.meta.get("host_path")]
        assert leaf.changed is None
        assert any("change tracking unusable" in w and why in w for w in s.warnings), s.warnings


def test_application_consistent_failure_is_an_error_unless_allowed(mnt: Path) -> None:
    host = Host(create_recovery=[R["create_recovery_vss_failed"]])
    with pytest.raises(HypervisorError, match="VSS") as exc:
        source(mnt, host).open_session(None)
    assert "allow_crash_consistent" in str(exc.value) and "job state 10" in str(exc.value)
    # nothing was created, and the create's journal is gone once nothing of it is left
    assert "destroy_checkpoint" not in host.steps() and host.steps()[-1] == "list_recovery"
    assert Journal.load(VM) is None


def test_crash_consistent_fallback_never_leaves_two(mnt: Path) -> None:
    """The first create failed after Hyper-V made a checkpoint: it is removed before the
    crash-consistent one is taken, and that one is removed when the session closes."""
    late = line(
        {"checkpoints": [{"instance_id": "Microsoft:77777777-0000-4000-8000-000000000001", "name": "x", "created": ""}]}
    )
    from datetime import UTC, datetime

    late = late.replace('"created":""', f'"created":"{datetime.now(UTC).isoformat()}"')
    host = Host(
        create_recovery=[HypervisorError("create_recovery: no answer from PowerShell within 900 s"), created],
        list_recovery=[line({"checkpoints": []}), line({"checkpoints": []}), late],
    )
    s = source(mnt, host, "&allow_crash_consistent=1").open_session(None)
    assert s.consistency == "crash-consistent"
    assert any(w.startswith("CRASH-CONSISTENT") for w in s.warnings)
    levels = [p["ConsistencyLevel"] for p in host.params("create_recovery")]
    assert levels == [1, 2]
    s.close()
    destroyed = [p["CheckpointId"] for p in host.params("destroy_checkpoint")]
    assert destroyed == ["77777777-0000-4000-8000-000000000001", REC]
    assert Journal.load(VM) is None


def recovery(name: str, cp_id: str = "9F1E2D3C-AAAA-4BBB-8CCC-DDDDEEEEFFFF") -> dict[str, str]:
    return {"instance_id": f"Microsoft:{cp_id}", "name": name, "created": "2026-11-20T10:00:00Z"}


def test_only_our_stale_checkpoints_are_removed(mnt: Path) -> None:
    import time

    now = time.time()
    other_product = recovery("Veeam recovery", "11112222-3333-4444-5555-666677778888")
    dead_local = recovery(f"vmvault-recovery run=a host={socket.gethostname()} pid=999999999 t={int(now)}")
    old_remote = recovery(
        f"vmvault-recovery run=b host=backup02 pid=1 t={int(now - 25 * 3600)}", "22223333-4444-4555-8666-777788889999"
    )
    host = Host(list_recovery=[line({"checkpoints": [other_product, dead_local, old_remote]})])
    with source(mnt, host).open_session(None) as s:
        destroyed = [p["CheckpointId"] for p in host.params("destroy_checkpoint")]
        assert destroyed == ["9F1E2D3C-AAAA-4BBB-8CCC-DDDDEEEEFFFF", "22223333-4444-4555-8666-777788889999"]
        assert len([w for w in s.warnings if "interrupted backup" in w]) == 2


@pytest.mark.parametrize(
    "name",
    [
        f"vmvault-recovery run=a host={socket.gethostname()} pid={os.getppid()} t=1",  # a live process here
        "vmvault-recovery run=b host=backup02 pid=1 t={now}",  # another machine, started just now
    ],
)
def test_a_running_backup_of_the_vm_is_left_alone(mnt: Path, name: str) -> None:
    import time

    host = Host(list_recovery=[line({"checkpoints": [recovery(name.format(now=int(time.time())))]})])
    with pytest.raises(HypervisorError, match=r"another backup of VM .* is running"):
        source(mnt, host).open_session(None)
    assert "destroy_checkpoint" not in host.steps() and "create_recovery" not in host.steps()


def test_names_are_resolved_to_exactly_one_vm(mnt: Path) -> None:
    twins = line({"vms": [{"id": VM, "name": "web"}, {"id": "66666666-7777-4888-9999-AAAAAAAAAAAA", "name": "web"}]})
    host = Host(resolve=[twins])
    with pytest.raises(HypervisorError, match=r"2 VMs are named 'web'.*66666666-7777-4888-9999-AAAAAAAAAAAA"):
        source(mnt, host, name="web").open_session(None)
    assert host.steps() == ["resolve"]
    host = Host(resolve=[line({"vms": []})])  # -eq takes "web*" literally: no VM of that name
    with pytest.raises(HypervisorError, match=r"no VM named 'web\*'"):
        source(mnt, host, name="web*").open_session(None)
    assert host.params("resolve") == [{"Name": "web*"}]
    host = Host()  # a VM ID is used as it is
    with source(mnt, host, name=VM.lower()).open_session(None):
        assert host.steps()[0] == "describe" and host.params("describe")[0]["VmId"] == VM


def test_files_of_other_vms_are_refused(mnt: Path) -> None:
    desc = result_of("describe")
    desc["files"].append(ROOT + "\\Virtual Machines\\11111111-2222-3333-4444-555555555555.vmcx")
    host = Host(describe=[line(desc)])
    with pytest.raises(HypervisorError, match="not a file of VM"):
        source(mnt, host).open_session(None)
    assert "create_recovery" not in host.steps()


def mutate(name: str, change: Callable[[Any], Any]) -> str:
    doc = result_of(name)
    return line(change(doc))


MALFORMED = [
    ("describe", mutate("describe", lambda d: dict(d, generation="2")), "generation"),
    ("describe", mutate("describe", lambda d: dict(d, id=None)), r"reply\.id is missing"),
    ("describe", mutate("describe", lambda d: dict(d, drives=[None])), r"drives\[0\] is null"),
    ("describe", mutate("describe", lambda d: dict(d, drives=[{"slot": "x", "kind": "tape"}])), "tape"),
    ("describe", mutate("describe", lambda d: dict(d, checkpoints=[{"id": "not-a-guid"}])), "not a GUID"),
    ("describe", line([result_of("describe")]), "an array of 1, expected an object"),
    ("describe", line(None), "missing or null, expected an object"),
    ("enable_merge", line({"found": True, "was_enabled": "yes"}), "was_enabled"),
    ("list_recovery", line({"checkpoints": [{"instance_id": "Garbage"}]}), "not 'Microsoft:GUID'"),
    ("create_recovery", line({"instance_id": f"Microsoft:{REC}"}), "renamed"),
    ("checkpoint_disks", line({"disks": [{"instance_id": 5}]}), "instance_id"),
    ("resolve", line({"vms": [{"id": "web", "name": "web"}]}), "not a GUID"),
]


@pytest.mark.parametrize(("step", "reply", "why"), MALFORMED)
def test_malformed_replies_are_clear_errors(mnt: Path, step: str, reply: str, why: str) -> None:
    host = Host(**{step: [reply]})
    with pytest.raises(HypervisorError, match=why):
        source(mnt, host).open_session(None)
    if "create_recovery" in host.steps() and step != "create_recovery":
        assert host.steps()[-1] == "destroy_checkpoint"


#: every step of a backup, in order, as a failure there must be handled
SEQUENCE = [
    "resolve",
    "describe",
    "enable_merge",
    "list_recovery",
    "create_recovery",
    "checkpoint_disks",
    "host_of",
    "convert",
]


@pytest.mark.parametrize("step", SEQUENCE)
def test_a_failure_at_every_step_leaves_nothing(mnt: Path, step: str) -> None:
    queues: dict[str, list[Reply]] = {step: [failure(f"{step} broke (0x80070005)")]}
    if step == "convert":  # the checkpoint is still there after the failed convert
        ours = {"instance_id": f"Microsoft:{REC}", "name": "vmvault-recovery", "created": ""}
        queues["list_recovery"] = [R["list_recovery_none"], R["list_recovery_none"], line({"checkpoints": [ours]})]
    host = Host(**queues)
    src = source(mnt, host)
    with pytest.raises(HypervisorError, match=r"broke \(0x80070005\)"), src.open_session(None) as s:
        s.complete("snap")
    made = host.params("create_recovery") and step != "create_recovery"
    if made and step not in ("convert",):
        assert host.steps()[-1] == "destroy_checkpoint"
        assert host.params("destroy_checkpoint")[-1]["CheckpointId"] == REC
    if step == "convert":  # still there after the failed convert: removed by close
        assert host.steps()[-2:] == ["list_recovery", "destroy_checkpoint"]
    assert Journal.load(VM) is None
    assert RctState(VM).get("snap") == {}


def test_a_failed_removal_is_left_to_the_next_backup(mnt: Path) -> None:
    host = Host(destroy_checkpoint=[failure("DestroySnapshot failed with return value 32775")])
    s = source(mnt, host).open_session(None)
    with pytest.raises(HypervisorError, match="the next backup removes it"):
        s.close()
    journal = Journal.load(VM)
    assert journal is not None and journal.created == REC and journal.pid == os.getpid()
    # the next backup in the same process (the daemon runs many): that run has ended, so its
    # journal and checkpoint are a leftover, not a running backup
    stale = {"instance_id": f"Microsoft:{REC}", "name": "wéb-Ünïcode - Backup - (11/20/2026)", "created": ""}
    host2 = Host(list_recovery=[line({"checkpoints": [stale]}), line({"checkpoints": []})])
    with source(mnt, host2).open_session(None) as s2:
        assert host2.params("destroy_checkpoint")[0]["CheckpointId"] == REC  # found by the journal, unnamed
        assert any("interrupted backup" in w for w in s2.warnings)


def test_convert_failing_late_is_reported_as_such(mnt: Path) -> None:
    points_after = line({"reference_points": [{"instance_id": "Microsoft:RP-NEW", "disk_ids": [], "rct_ids": []}]})
    host = Host(
        convert=[failure("ConvertToReferencePoint: the job is still in state 4 after 810 s")],
        list_recovery=[line({"checkpoints": []}), line({"checkpoints": []}), line({"checkpoints": []})],
        list_reference_points=[R["list_reference_points_none"], points_after],
    )
    s = source(mnt, host).open_session(None)
    with pytest.raises(HypervisorError, match=r"failed late .* the checkpoint is gone"):
        s.complete("snap")
    s.close()
    assert "destroy_checkpoint" not in host.steps()
    assert host.params("destroy_reference_point") == [
        {"VmId": VM, "ReferencePointId": "Microsoft:RP-NEW", "JobTimeout": 810}
    ]


def test_rct_ids_are_paired_by_disk_id(mnt: Path) -> None:
    point = result_of("convert")
    other = f"Microsoft:{VM}\\83F8638B-8DCA-4152-9EDA-2CA8B33039B4\\0\\1\\D"
    point["disks"] = [{"instance_id": other, "path": ROOT + "\\Virtual Hard Disks\\data.vhdx"}, *point["disks"]]
    point["disk_ids"] = [*point["disk_ids"], other]
    point["rct_ids"] = [*point["rct_ids"], "rctX:data"]
    host = Host(convert=[line(point)])
    with source(mnt, host).open_session(None) as s:
        s.complete("snap")
    assert RctState(VM).get("snap") == {
        AVHDX.lower(): "rctX:4abc8f2e:1a2b:4c3d:9e8f:0123456789ab:00000012",
        (ROOT + "\\Virtual Hard Disks\\data.vhdx").lower(): "rctX:data",
    }
    point["rct_ids"] = point["rct_ids"][:1]
    host = Host(convert=[line(point)])
    with source(mnt, host).open_session(None) as s, pytest.raises(HypervisorError, match="2 disk ids but 1 RCT ids"):
        s.complete("snap2")


def test_old_reference_points_of_ours_are_destroyed(mnt: Path) -> None:
    state = RctState(VM)
    for i in range(4):
        state.put(f"s{i}", f"Microsoft:RP-{i}", {AVHDX: f"rct{i}"})
    existing = line(
        {
            "reference_points": [{"instance_id": f"Microsoft:RP-{i}", "disk_ids": [], "rct_ids": []} for i in range(4)]
            + [{"instance_id": "Microsoft:RP-OTHER-PRODUCT", "disk_ids": [], "rct_ids": []}]
        }
    )
    host = Host(list_reference_points=[existing])
    with source(mnt, host).open_session(PreviousBackup("s1", {})):
        pass
    # kept: the newest (s3) and the previous backup's (s1); another product's is never touched
    assert [p["ReferencePointId"] for p in host.params("destroy_reference_point")] == [
        "Microsoft:RP-0",
        "Microsoft:RP-2",
    ]
    assert [rp for _s, rp in RctState(VM).reference_points()] == ["Microsoft:RP-1", "Microsoft:RP-3"]


def test_live_migration_fails_and_removes_the_checkpoint(mnt: Path) -> None:
    host = Host(host_of=[R["host_of_migrated"]])
    s = source(mnt, host).open_session(None)
    with pytest.raises(HypervisorError, match="moved from HV01 to HV02"):
        s.complete("snap")
    s.close()
    assert host.steps()[-1] == "destroy_checkpoint" and "convert" not in host.steps()


def test_merge_suspended_is_re_enabled_with_a_warning(mnt: Path) -> None:
    host = Host(enable_merge=[R["enable_merge_suspended"]])
    with source(mnt, host).open_session(None) as s:
        assert any("merging was suspended" in w and "EnabledState 0" in w for w in s.warnings)


def test_missing_share_fails_before_any_checkpoint(tmp_path: Path, mnt: Path) -> None:
    host = Host()
    with pytest.raises(SourceError, match="path_map"):
        HyperVSource(f"hyperv://HV01/x?path_map=C:\\Hyper-V\\={tmp_path}/not-mounted/", transport=host).open_session(
            None
        )
    assert "create_recovery" not in host.steps()


def test_unreadable_disk_after_the_checkpoint_removes_it(mnt: Path) -> None:
    for f in (mnt / ROOT.rsplit("\\", 1)[1] / "Virtual Hard Disks").iterdir():
        f.unlink()
    host = Host()
    with pytest.raises(SourceError, match="path_map"):
        source(mnt, host).open_session(None)
    assert host.steps()[-1] == "destroy_checkpoint"


def test_stored_configuration_is_the_one_from_before_the_checkpoint(mnt: Path) -> None:
    vmcx = mnt / ROOT.rsplit("\\", 1)[1] / "Virtual Machines" / f"{VM}.vmcx"
    original = vmcx.read_bytes()

    def repointing(params: Mapping[str, ParamValue]) -> str:
        vmcx.write_bytes(b"points at the recovery avhdx")  # Hyper-V re-points the VM
        return created(params)

    host = Host(create_recovery=[repointing])
    with source(mnt, host).open_session(None) as s:
        (cfg,) = [f for f in s.files if f.name == f"Virtual Machines/{VM}.vmcx"]
        with cfg.open() as fh:
            assert fh.read() == original and cfg.size == len(original)


def test_guest_backup_type_copy_is_asked_and_recorded(mnt: Path) -> None:
    host = Host()
    with source(mnt, host, "&guest_backup=copy").open_session(None) as s:
        assert host.params("create_recovery")[0]["GuestBackupType"] == 2
        assert s.extra["hyperv"]["guest_backup_type"] == "copy"
    with pytest.raises(Exception, match="guest_backup must be full or copy"):
        source(mnt, Host(), "&guest_backup=incremental")


def test_unnamed_checkpoint_is_tracked_by_id(mnt: Path) -> None:
    host = Host(
        create_recovery=[
            line({"instance_id": f"Microsoft:{REC}", "name": "w", "renamed": False, "rename_error": "access denied"})
        ]
    )
    with source(mnt, host).open_session(None) as s:
        assert any("could not be named (access denied)" in w for w in s.warnings)
    assert host.params("destroy_checkpoint")[0]["CheckpointId"] == REC


def test_import_passes_the_restored_disks_as_source(mnt: Path) -> None:
    host = Host(compare_import=[R["compare_import_incompatible"], R["compare_import_ok"]])
    src = source(mnt, host)
    vmcx = "D:\\Restore\\wéb\\Virtual Machines\\x.vmcx"
    with pytest.raises(HypervisorError, match=r"40010: Could not find Ethernet switch"):
        register_restored(src, vmcx, "D:\\VMs\\wéb")
    assert register_restored(src, vmcx, "D:\\VMs\\wéb")["id"].startswith("C0FFEE00")
    assert host.params("compare_import")[0] == {
        "Path": vmcx,
        "VirtualMachinePath": "D:\\VMs\\wéb",
        "VhdDestinationPath": "D:\\VMs\\wéb",
        "VhdSourcePath": "D:\\Restore\\wéb\\Virtual Hard Disks",
    }


def test_decode_reply() -> None:
    assert decode_reply("host_of", "WARNING: noise\r\n" + R["host_of"] + "\r\n\r\n")["host"] == "HV01"
    with pytest.raises(HypervisorError, match="not JSON"):
        decode_reply("describe", R["garbage"])
    with pytest.raises(HypervisorError, match="printed nothing"):
        decode_reply("describe", " \n ")
    with pytest.raises(HypervisorError, match="not JSON"):  # nested too deeply: was a RecursionError
        decode_reply("describe", "[" * 60000)
    with pytest.raises(HypervisorError, match="unexpected reply"):
        decode_reply("describe", '{"result": 1}')
    with pytest.raises(HypervisorError, match="line one line two"):
        decode_reply("describe", json.dumps({"ok": False, "error": {"message": "line one\r\nline two"}}))


def test_spec_parsing() -> None:
    with pytest.raises(Exception, match="VMNAME"):
        HyperVSource("hyperv://HV01/", transport=Host())
    s = HyperVSource("hyperv:///web", transport=Host())
    assert s.location == "hyperv:///web" and s.host == ""
    with pytest.raises(Exception, match="timeout must be positive"):
        HyperVSource("hyperv:///web?timeout=0", transport=Host())


def test_a_journal_of_a_running_backup_stops_the_next(mnt: Path) -> None:
    """Another backup of the VM is between writing its journal and creating its checkpoint."""
    Journal(VM, "otherrun", socket.gethostname(), os.getppid(), 0.0).save()
    host = Host()
    with pytest.raises(HypervisorError, match=r"another backup of VM .* is running \(pid"):
        source(mnt, host).open_session(None)
    assert "create_recovery" not in host.steps()
    assert Journal.load(VM) is not None  # not ours to remove


def test_listing_reference_points_failing_before_convert_is_harmless(mnt: Path) -> None:
    host = Host(list_reference_points=[failure("access denied")])
    with source(mnt, host).open_session(None) as s:
        s.complete("snap")
    assert "convert" in host.steps() and "destroy_checkpoint" not in host.steps()
    assert RctState(VM).get("snap")


def test_a_reference_point_naming_unknown_disks_is_loud(mnt: Path) -> None:
    point = result_of("convert")
    point["disk_ids"] = ["Microsoft:99999999-0000-4000-8000-000000000000\\OTHER\\9\\9\\D"]
    host = Host(convert=[line(point)])
    with source(mnt, host).open_session(None) as s, pytest.raises(HypervisorError, match="are not disks of the VM"):
        s.complete("snap")
    # the snapshot's checkpoint was converted: nothing is destroyed, nothing half-kept
    assert "destroy_checkpoint" not in host.steps() and RctState(VM).get("snap") == {}


def test_inventory_reply_is_validated() -> None:
    from vmvault.hypervisors.hyperv import inventory

    doc = inventory("hyperv://HV01", transport=Host(inventory=[R["inventory"]]))
    assert {vm["name"] for vm in doc["vms"]} and isinstance(doc["orphans"], list)
    broken = line(dict(result_of("inventory"), orphans=[{"size": 1}]))
    with pytest.raises(HypervisorError, match=r"orphans\[0\]\.path"):
        inventory("hyperv://HV01", transport=Host(inventory=[broken]))
    with pytest.raises(Exception, match="expected hyperv://"):
        inventory("hyperv-lab://x")


def test_host_paths_with_dot_parts_are_refused(mnt: Path) -> None:
    desc = result_of("describe")
    desc["files"].append(ROOT + f"\\Virtual Machines\\..\\..\\..\\Windows\\{VM}.vmgs")
    for src in (source(mnt, Host(describe=[line(desc)])), HyperVSource("hyperv:///wéb-Ünïcode", transport=Host())):
        src.transport.queues["describe"] = [line(desc)]  # type: ignore[attr-defined]
        with pytest.raises(HypervisorError, match=r"'\.\.' parts is refused"):
            src.open_session(None)
        assert "create_recovery" not in src.transport.steps()  # type: ignore[attr-defined]


def _checkpoint_disk_at(path: str) -> str:
    """The checkpoint_disks reply with its virtual hard disk at ``path``."""
    reply = result_of("checkpoint_disks")
    reply["disks"][0]["path"] = path
    return line(reply)


@pytest.mark.parametrize("named", ["/etc/passwd", "D:\\secret.vhdx", "\\\\HV02\\C$\\other.vhdx"])
def test_a_file_the_host_names_outside_path_map_is_never_read(mnt: Path, named: str) -> None:
    """A remote host taken over names a file of this machine as its disk: refused before it is
    opened (it was read as a raw disk and stored), and the checkpoint is removed."""
    host = Host(checkpoint_disks=[_checkpoint_disk_at(named)])
    with pytest.raises(SourceError, match=r"under no path_map prefix \(c:\\hyper-v\\\)"):
        source(mnt, host).open_session(None)
    assert host.steps()[-1] == "destroy_checkpoint"


def test_a_link_on_the_hosts_share_leading_here_is_never_followed(mnt: Path, tmp_path: Path) -> None:
    """The share shows links the host made: a disk, its parent and a configuration file (through
    a linked folder) that lead out of the mapped folder are refused; they were read before."""
    vm = mnt / ROOT.rsplit("\\", 1)[1]
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = create_vhdx(str(outside / "secret.vhdx"), SIZE)
    secret.write(0, b"a file of the backup host" * 100)
    secret.close()
    disks = vm / "Virtual Hard Disks"
    # the disk itself is a link to a file here
    avhdx = disks / AVHDX.rsplit("\\", 1)[1]
    kept = avhdx.read_bytes()
    avhdx.unlink()
    avhdx.symlink_to(outside / "secret.vhdx")
    host = Host()
    with pytest.raises(SourceError, match="is a link, not a virtual disk"):
        source(mnt, host).open_session(None)
    assert host.steps()[-1] == "destroy_checkpoint"
    # the folder holding the disks is a link to a folder here holding a disk of that name
    avhdx.unlink()
    avhdx.write_bytes(kept)
    disks.rename(vm / "real disks")
    (outside / AVHDX.rsplit("\\", 1)[1]).write_bytes(kept)
    (outside / VHDX.rsplit("\\", 1)[1]).write_bytes((vm / "real disks" / VHDX.rsplit("\\", 1)[1]).read_bytes())
    disks.symlink_to(outside, target_is_directory=True)
    host = Host()
    with pytest.raises(SourceError, match="outside the path_map folders"):
        source(mnt, host).open_session(None)
    assert host.steps()[-1] == "destroy_checkpoint"
    # the configuration folder is such a link
    disks.unlink()
    (vm / "real disks").rename(disks)
    configs = vm / "Virtual Machines"
    configs.rename(vm / "real configs")
    shutil.copytree(vm / "real configs", outside / "configs")
    configs.symlink_to(outside / "configs", target_is_directory=True)
    host = Host()
    with pytest.raises(SourceError, match="outside the path_map folders"):
        source(mnt, host).open_session(None)
    assert "create_recovery" not in host.steps()  # configurations are read before the checkpoint
    # with every link gone the same VM backs up
    configs.unlink()
    (vm / "real configs").rename(configs)
    with source(mnt, Host()).open_session(None) as s:
        assert s.disks


def test_the_lab_and_the_local_host_read_paths_as_named(mnt: Path) -> None:
    from vmvault.hypervisors.hyperv import PathMap

    assert PathMap(None)("/srv/vms/web.vhdx") == "/srv/vms/web.vhdx"  # the local host (Windows), the lab
    assert not PathMap(None).strict and PathMap(None, strict=True).strict
    with pytest.raises(SourceError, match="none given"):
        PathMap(None, strict=True)("C:\\Hyper-V\\web.vhdx")
    assert HyperVSource("hyperv://HV01/x", transport=Host()).path_map.strict
    assert not HyperVSource("hyperv:///x", transport=Host()).path_map.strict

"""The Hyper-V connector against recorded PowerShell replies (no Hyper-V host here).

Disks are real VHDX files at the place ``path_map`` maps the host's paths to, so the reading
side runs for real; the host side is a scripted sequence of replies, checked call by call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmvault.disk.vhdx import create_vhdx, open_vhdx
from vmvault.errors import HypervisorError, SourceError
from vmvault.hypervisors.base import PreviousBackup
from vmvault.hypervisors.hyperv import (
    SCRIPTS,
    HyperVSource,
    LocalPowerShell,
    _save_rct,
    decode_reply,
    ps_quote,
    register_restored,
    render,
)

RECORDED = json.loads((Path(__file__).parent / "recorded" / "hyperv_web.json").read_text())
R: dict[str, str] = RECORDED["replies"]
MIB = 1024 * 1024


class Replay:
    """Answers each call with the next recorded reply; fails on an unexpected call."""

    host = "HV01"

    def __init__(self, plan: list[tuple[str, str | None]]) -> None:
        self.plan = list(plan)
        self.calls: list[str] = []
        self.scripts: list[str] = []

    def run(self, name: str, script: str, timeout: float) -> Any:
        self.calls.append(name)
        self.scripts.append(script)
        assert self.plan, f"unexpected call {name}"
        expected, reply = self.plan.pop(0)
        assert name == expected, f"called {name}, expected {expected}"
        if reply is None:
            raise HypervisorError(f"{name}: no answer from PowerShell within {timeout:.0f} s")
        return decode_reply(name, reply)


@pytest.fixture
def host_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host's C:\\Hyper-V as an SMB mount would show it."""
    monkeypatch.setenv("VMVAULT_STATE_DIR", str(tmp_path / "state"))
    root = tmp_path / "mnt"
    vm = root / "web"
    (vm / "Virtual Hard Disks").mkdir(parents=True)
    (vm / "Virtual Machines").mkdir()
    vhdx = vm / "Virtual Hard Disks" / "web.vhdx"
    w = create_vhdx(str(vhdx), 16 * MIB)
    w.write(0, b"x" * MIB)
    w.close()
    avhdx = vm / "Virtual Hard Disks" / RECORDED["paths"]["avhdx"].rsplit("\\", 1)[1]
    c = create_vhdx(str(avhdx), 0, parent=str(vhdx), block_size=2 * MIB)
    c.write(MIB, b"y" * 4096)
    c.close()
    for ext in ("vmcx", "vmgs"):
        (vm / "Virtual Machines" / f"{RECORDED['vm_id']}.{ext}").write_bytes(b"cfg" * 100)
    return root


def source(root: Path, plan: list[tuple[str, str | None]], query: str = "") -> tuple[HyperVSource, Replay]:
    t = Replay(plan)
    spec = f"hyperv://HV01/web?path_map=C:\\Hyper-V\\={root}/" + query
    return HyperVSource(spec, transport=t), t


START = [("describe", R["describe"]), ("enable_merge", R["enable_merge"]), ("list_recovery", R["list_recovery_none"])]


def test_full_backup_sequence(host_files: Path) -> None:
    src, t = source(
        host_files,
        [*START, ("create_recovery", R["create_recovery"]), ("host_of", R["host_of"]), ("convert", R["convert"])],
    )
    with src.open_session(None) as s:
        assert s.consistency == "application-consistent"
        names = {d.name: d for d in s.disks}
        leaf = names["Virtual Hard Disks/" + RECORDED["paths"]["avhdx"].rsplit("\\", 1)[1]]
        assert leaf.layer and leaf.parent_name == "Virtual Hard Disks/web.vhdx"
        assert leaf.image.read(MIB, 4096) == b"y" * 4096 and leaf.image.read(0, 4) == b"xxxx"
        assert leaf.changed is None
        assert sorted(f.name for f in s.files) == sorted(
            f"Virtual Machines/{RECORDED['vm_id']}.{e}" for e in ("vmcx", "vmgs")
        )
        s.complete("snap1")
    assert t.calls[-1] == "convert" and not t.plan
    # the recovery snapshot request: type 32768, application-consistent first
    create = t.scripts[3]
    assert "CreateSnapshot" in create and "32768" in create and "ConsistencyLevel = 1" in create


def test_incremental_uses_rct_from_previous_backup(host_files: Path) -> None:
    _save_rct(RECORDED["vm_id"], "prev", {RECORDED["paths"]["avhdx"].lower(): "rctX:1"})
    src, t = source(
        host_files,
        [
            *START,
            ("create_recovery", R["create_recovery"]),
            ("changes", R["changes"]),
            ("host_of", R["host_of"]),
            ("convert", R["convert"]),
        ],
    )
    with open_vhdx(str(host_files / "web" / "Virtual Hard Disks" / "web.vhdx")) as base_img:
        base_guid = str(base_img.data_write_guid)
    prev = PreviousBackup("prev", {"Virtual Hard Disks/web.vhdx": {"data_write_guid": base_guid}})
    with src.open_session(prev) as s:
        (leaf,) = [d for d in s.disks if d.meta.get("host_path")]
        assert leaf.changed == [(MIB, 65536), (8 * MIB, 131072)]
        (base,) = [d for d in s.disks if d.name == "Virtual Hard Disks/web.vhdx"]
        assert base.changed == []  # the frozen parent is the same file as last time
        assert "'rctX:1'" in t.scripts[4]
        s.complete("snap2")
    state = json.loads(Path(os.environ["VMVAULT_STATE_DIR"], "hyperv", f"{RECORDED['vm_id']}.json").read_text())
    assert state["snap2"] == {RECORDED["paths"]["avhdx"].lower(): "rctX:4abc8f2e:1a2b:4c3d:9e8f:0123456789ab:00000012"}


def test_lost_rct_id_falls_back_to_full_read(host_files: Path) -> None:
    _save_rct(RECORDED["vm_id"], "prev", {RECORDED["paths"]["avhdx"].lower(): "rctX:gone"})
    src, _t = source(
        host_files,
        [
            *START,
            ("create_recovery", R["create_recovery"]),
            ("changes", R["changes_lost_rct"]),
            ("destroy", R["destroy"]),
        ],
    )
    s = src.open_session(PreviousBackup("prev", {}))
    (leaf,) = [d for d in s.disks if d.meta.get("host_path")]
    assert leaf.changed is None
    assert any("change tracking unusable" in w and "32779" in w for w in s.warnings)
    s.close()


def test_app_consistent_failure_is_an_error_unless_allowed(host_files: Path) -> None:
    src, t = source(host_files, [*START, ("create_recovery", R["create_recovery_vss_failed"])])
    with pytest.raises(HypervisorError, match="VSS") as exc:
        src.open_session(None)
    assert "allow_crash_consistent" in str(exc.value)
    assert t.calls.count("destroy") == 0  # nothing was created


def test_crash_consistent_fallback_is_loud(host_files: Path) -> None:
    src, t = source(
        host_files,
        [
            *START,
            ("create_recovery", R["create_recovery_vss_failed"]),
            ("create_recovery", R["create_recovery"]),
            ("destroy", R["destroy"]),
        ],
        "&allow_crash_consistent=1",
    )
    s = src.open_session(None)
    assert s.consistency == "crash-consistent"
    assert any(w.startswith("CRASH-CONSISTENT") for w in s.warnings)
    assert "ConsistencyLevel = 2" in t.scripts[4]
    s.close()  # not completed: the checkpoint is destroyed
    assert t.calls[-1] == "destroy" and not t.plan


def test_stale_recovery_checkpoints_of_ours_are_removed(host_files: Path) -> None:
    src, t = source(
        host_files,
        [
            ("describe", R["describe"]),
            ("enable_merge", R["enable_merge_suspended"]),
            ("list_recovery", R["list_recovery_stale"]),
            ("destroy", R["destroy"]),
            ("describe", R["describe"]),
            ("create_recovery", R["create_recovery"]),
            ("destroy", R["destroy"]),
        ],
    )
    s = src.open_session(None)
    assert "9F1E2D3C" in t.scripts[3] and "11112222" not in t.scripts[3]  # only ours
    assert any("merging was suspended" in w for w in s.warnings)
    assert any("interrupted backup" in w for w in s.warnings)
    s.close()
    assert not t.plan


def test_live_migration_fails_and_removes_the_checkpoint(host_files: Path) -> None:
    src, t = source(
        host_files,
        [
            *START,
            ("create_recovery", R["create_recovery"]),
            ("host_of", R["host_of_migrated"]),
            ("destroy", R["destroy"]),
        ],
    )
    s = src.open_session(None)
    with pytest.raises(HypervisorError, match="live migration"):
        s.complete("snap")
    s.close()
    assert t.calls[-1] == "destroy" and not t.plan


def test_timeout_at_convert_removes_the_checkpoint(host_files: Path) -> None:
    src, t = source(
        host_files,
        [
            *START,
            ("create_recovery", R["create_recovery"]),
            ("host_of", R["host_of"]),
            ("convert", None),
            ("destroy", R["destroy"]),
        ],
    )
    s = src.open_session(None)
    with pytest.raises(HypervisorError, match="within"):
        s.complete("snap")
    s.close()
    assert t.calls[-1] == "destroy" and not t.plan


def test_missing_share_fails_before_any_checkpoint(tmp_path: Path) -> None:
    src, t = source(tmp_path / "not-mounted", list(START))
    with pytest.raises(SourceError, match="path_map"):
        src.open_session(None)
    assert "create_recovery" not in t.calls


def test_unreadable_disk_after_the_checkpoint_removes_it(host_files: Path) -> None:
    for f in (host_files / "web" / "Virtual Hard Disks").iterdir():
        f.unlink()
    src, t = source(host_files, [*START, ("create_recovery", R["create_recovery"]), ("destroy", R["destroy"])])
    with pytest.raises(SourceError, match="path_map"):
        src.open_session(None)
    assert t.calls[-1] == "destroy" and not t.plan


def test_stored_configuration_is_the_one_from_before_the_checkpoint(host_files: Path) -> None:
    vmcx = host_files / "web" / "Virtual Machines" / f"{RECORDED['vm_id']}.vmcx"
    original = vmcx.read_bytes()

    class Repointing(Replay):
        def run(self, name: str, script: str, timeout: float) -> Any:
            if name == "create_recovery":  # Hyper-V re-points the VM at the new .avhdx
                vmcx.write_bytes(b"points at the recovery avhdx")
            return super().run(name, script, timeout)

    t = Repointing([*START, ("create_recovery", R["create_recovery"]), ("destroy", R["destroy"])])
    src = HyperVSource(f"hyperv://HV01/web?path_map=C:\\Hyper-V\\={host_files}/", transport=t)
    with src.open_session(None) as s:
        (cfg,) = [f for f in s.files if f.name.endswith(".vmcx")]
        with cfg.open() as fh:
            assert fh.read() == original and cfg.size == len(original)


def test_replies_that_are_not_ours() -> None:
    with pytest.raises(HypervisorError, match="not JSON"):
        decode_reply("describe", R["garbage"])
    with pytest.raises(HypervisorError, match="printed nothing"):
        decode_reply("describe", "  ")
    with pytest.raises(HypervisorError, match="VSS writers"):
        decode_reply("create_recovery", R["create_recovery_vss_failed"])


def test_import_reports_incompatibilities(host_files: Path) -> None:
    src, _t = source(
        host_files, [("compare_import", R["compare_import_incompatible"]), ("compare_import", R["compare_import_ok"])]
    )
    with pytest.raises(HypervisorError, match=r"40010.*Ethernet switch"):
        register_restored(src, "D:\\Restore\\web\\Virtual Machines\\x.vmcx", "D:\\Restore\\web")
    assert register_restored(src, "D:\\x.vmcx", "D:\\Restore")["id"].startswith("C0FFEE00")


def test_scripts_quote_their_parameters() -> None:
    assert ps_quote("it's") == "'it''s'"
    script = render("describe", vm="a'; Remove-Item C:\\ -Recurse; '")
    assert "Get-VM -Name 'a''; Remove-Item C:\\ -Recurse; '''" in script
    for name in SCRIPTS:  # every script renders with the parameters the connector passes
        assert "ConvertTo-Json" in render(
            name,
            vm="v",
            vm_id="id",
            consistency="1",
            snapshot_type="32768",
            marker="m",
            path="p",
            rct_id="r",
            instance_id="Microsoft:X",
            vmcx="x",
            dest="d",
            vhd_dest="d",
        )


def test_spec_parsing() -> None:
    with pytest.raises(Exception, match="VMNAME"):
        HyperVSource("hyperv://HV01/", transport=Replay([]))
    s = HyperVSource("hyperv:///web", transport=Replay([]))
    assert s.location == "hyperv:///web" and s.host == ""


# ---- the local transport, against a stand-in powershell.exe process ---------------------

FAKE_PS = """#!{python}
import os, sys, time
assert sys.argv[1:] == ["-NoProfile", "-NonInteractive", "-Command", "-"], sys.argv
script = sys.stdin.read()
assert "ConvertTo-Json" in script
mode = os.environ["FAKE_PS_MODE"]
if mode == "reply":
    sys.stdout.write("WARNING: noise before the reply\\n" + open(os.environ["FAKE_PS_REPLY"]).read())
elif mode == "sleep":
    time.sleep(30)
else:
    sys.stderr.write("powershell: access denied\\n")
    sys.exit(1)
"""


@pytest.fixture
def fake_ps(tmp_path: Path) -> Path:
    exe = tmp_path / "powershell.exe"
    exe.write_text(FAKE_PS.format(python=sys.executable))
    exe.chmod(0o755)
    return exe


@pytest.mark.integration
def test_local_powershell_process(fake_ps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reply = tmp_path / "reply.json"
    reply.write_text(R["host_of"])
    monkeypatch.setenv("FAKE_PS_REPLY", str(reply))
    ps = LocalPowerShell(str(fake_ps))
    monkeypatch.setenv("FAKE_PS_MODE", "reply")
    assert ps.run("host_of", render("host_of", vm_id="x"), 30)["host"] == "HV01"
    monkeypatch.setenv("FAKE_PS_MODE", "sleep")
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="within 1 s"):
        ps.run("host_of", render("host_of", vm_id="x"), 1)
    assert time.monotonic() - started < 10
    monkeypatch.setenv("FAKE_PS_MODE", "fail")
    with pytest.raises(HypervisorError, match="access denied"):
        ps.run("host_of", render("host_of", vm_id="x"), 30)
    with pytest.raises(HypervisorError, match="needs Windows"):
        LocalPowerShell(str(tmp_path / "nope.exe")).run("host_of", "", 5)

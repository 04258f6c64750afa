"""``vmvault backup``: several sources, a failed cleanup after the data is stored, --dry-run, --host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmvault.cli import EXIT
from vmvault.testing.hyperv_lab import LabHost

from .admin import env, make_vm, run, run_json

__all__ = ["env"]

MIB = 1 << 20


def snapshot_count(env: Path) -> int:
    folder = env / "repo" / "snapshots"
    return len(os.listdir(folder)) if folder.exists() else 0


def test_every_source_that_can_be_is_backed_up(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_vm(env / "vms", "a", seed=1)
    c = make_vm(env / "vms", "c", seed=3)
    missing = env / "vms" / "b"
    assert run(capsys, "init")[0] == 0
    code, out, err = run(capsys, "backup", str(a), str(missing), str(c))
    assert code == EXIT["incomplete"] == 3
    assert out.count(" saved (offline) of ") == 2 and str(a) in out and str(c) in out
    err_lines = err.strip().splitlines()
    assert err_lines[0].startswith(f"vmvault: error: {missing}: ")
    assert err_lines[-1] == f"vmvault: backup incomplete: 2 of 3 sources saved; {missing}: failed"
    assert snapshot_count(env) == 2

    code, doc, _err = run_json(capsys, "backup", str(a), str(missing), str(c))
    assert code == 3
    assert [d["status"] for d in doc] == ["saved", "failed", "saved"]
    assert doc[1]["source"] == {"location": str(missing)} and doc[1]["error"]


def test_one_missing_source_keeps_its_own_exit_code(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "init")[0] == 0
    code, out, err = run(capsys, "backup", str(env / "nope"))
    assert code == EXIT["source"] and out == ""
    assert err.count("\n") == 1 and err.startswith("vmvault: error:")


def test_a_usage_error_stops_before_anything_is_read(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_vm(env / "vms", "a")
    assert run(capsys, "init")[0] == 0
    # --scratch-dir is for live QEMU backups: a usage error for a folder, nothing backed up
    code, _out, err = run(capsys, "backup", str(a), str(env / "nope"), "--scratch-dir", str(env))
    assert code == EXIT["usage"] and "--scratch-dir" in err
    assert snapshot_count(env) == 0


def test_a_failed_repository_stops_and_names_what_was_not_tried(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_vm(env / "vms", "a", seed=1)
    b = make_vm(env / "vms", "b", seed=2)
    assert run(capsys, "init")[0] == 0
    from vmvault.cli import commands
    from vmvault.errors import StorageFullError

    real = commands.backup
    calls = []

    def full_after_first(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) > 1:
            raise StorageFullError("no space left on the storage")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(commands, "backup", full_after_first)
    c = make_vm(env / "vms", "c", seed=3)
    code, out, err = run(capsys, "backup", str(a), str(b), str(c))
    assert code == EXIT["storage_full"]
    assert "saved" in out
    assert f"vmvault: stopped at {b}; not tried: {c}; saved before: " in err
    assert snapshot_count(env) == 1


def test_cleanup_failure_after_the_data_is_stored_is_said_exactly(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: the recovery checkpoint could not be removed. The snapshot exists, so
    it is reported as saved, with what was left on the host, and the exit status is 3."""
    host = LabHost(str(env / "host"))
    host.create_vm("web", (8 * MIB,))
    host.write("web", "scsi0:0", 0, os.urandom(MIB))
    assert run(capsys, "init")[0] == 0
    monkeypatch.setenv("VMVAULT_LAB_FAULTS", "step:convert,step:destroy_checkpoint")
    code, out, err = run(capsys, "backup", f"hyperv-lab://{host.root}/web")
    assert code == EXIT["incomplete"]
    assert snapshot_count(env) == 1
    snap_id = os.listdir(env / "repo" / "snapshots")[0]
    assert f"snapshot {snap_id[:8]} saved" in out
    assert "cleanup on the source failed; left there:" in out and "could not be removed" in out
    assert "Remove-VMSnapshot" in out  # how to remove what was left
    assert "backup incomplete: 1 of 1 source saved" in err and "cleanup failed" in err
    assert [c for c in host.model("web").checkpoints if c.is_recovery]  # really left there

    host.create_vm("app", (4 * MIB,))
    code, doc, _err = run_json(capsys, "backup", f"hyperv-lab://{host.root}/app")
    assert code == 3 and doc["status"] == "cleanup failed" and doc["snapshot"] and len(doc["left"]) == 2
    monkeypatch.delenv("VMVAULT_LAB_FAULTS")
    # the next backup removes what was left (the connector's journal)
    code, out, _err = run(capsys, "backup", f"hyperv-lab://{host.root}/web")
    assert code == 0 and "interrupted backup" in out
    assert not [c for c in host.model("web").checkpoints if c.is_recovery]


def test_dry_run_lists_and_stores_nothing(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_vm(env / "vms", "a", size=8 * MIB)
    (a / "tools.iso").write_bytes(b"x" * 1000)
    assert run(capsys, "init")[0] == 0
    code, out, _err = run(capsys, "backup", str(a), "--dry-run", "--exclude", "*.iso")
    assert code == 0
    assert f"would back up {a} (files; no earlier snapshot: a full backup)" in out
    assert "disk a.raw  raw  8.0 MiB, " in out and "allocated" in out
    assert "file a.conf" in out and "excluded: tools.iso" in out
    assert out.rstrip().endswith("dry run: nothing was read or stored")
    assert snapshot_count(env) == 0 and not list((env / "repo").glob("data/*/*"))
    assert run(capsys, "backup", str(a))[0] == 0
    code, doc, _err = run_json(capsys, "backup", str(a), "--dry-run")
    assert code == 0 and doc["status"] == "would back up" and doc["parent"]
    assert doc["disks"][0]["name"] == "a.raw" and doc["disks"][0]["allocated"] > 0
    assert snapshot_count(env) == 1
    # a live source is not opened: no checkpoint is taken
    host = LabHost(str(env / "host"))
    host.create_vm("web", (4 * MIB,))
    code, out, _err = run(capsys, "backup", f"hyperv-lab://{host.root}/web", "--dry-run")
    assert code == 0 and "a live source" in out
    assert not host.model("web").checkpoints


def test_host_is_recorded(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_vm(env / "vms", "a")
    assert run(capsys, "init")[0] == 0
    assert run(capsys, "backup", str(a), "--host", "hv-07")[0] == 0
    code, doc, _err = run_json(capsys, "snapshots", "--host", "hv-07")
    assert code == 0 and len(doc) == 1 and doc[0]["hostname"] == "hv-07"

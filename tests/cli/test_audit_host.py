"""``vmvault audit`` and ``vmvault backup`` on a Hyper-V host folder (every VM's configuration
in one shared ``Virtual Machines``, disks in a shared ``Virtual Hard Disks``): the commands an
administrator types, their output and exit codes; a restored VM is a usable VM folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from vmvault.cli import EXIT, main
from vmvault.disk import open_image
from vmvault.hypervisors.hyperv_model import discover
from vmvault.testing.hyperv_host import KEY_TABLE_OFFSET, HostFolderBuilder

MIB = 1024 * 1024


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    for name in ("VMVAULT_REPO", "VMVAULT_PASSWORD_FILE", "VMVAULT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture()
def host(env: Path) -> HostFolderBuilder:
    """A host's default layout: configurations (VMCX) in Hyper-V/, disks in the sibling folder."""
    b = HostFolderBuilder(str(env / "ProgramData" / "Hyper-V"), disks_beside=True)
    web = b.create_vm("web", (8 * MIB, 4 * MIB))
    b.write(web, "scsi0:0", 0, b"w" * MIB)
    b.checkpoint(web, "before update")
    b.write(web, "scsi0:0", MIB, b"v" * MIB)
    b.write(web, "scsi0:1", 0, b"d" * 4096)
    b.create_vm("db")
    return b


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def id_of(b: HostFolderBuilder, name: str) -> str:
    return next(v.id for v in b.vms.values() if v.name == name)


def test_audit_reads_one_vm_per_configuration(host: HostFolderBuilder, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", host.root)
    assert code == EXIT["ok"], err
    assert "configuration files" not in out  # no longer "2 configuration files; expected one"
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert rows == ["db", "web"]
    assert "2 VMs, 0 problems" in out
    assert "give -r REPOSITORY (or set VMVAULT_REPO) to see last-backup ages" in out
    code, doc = run_json(capsys, "audit", host.root)
    web = next(v for v in doc["vms"] if v["name"] == "web")
    assert web["id"] == id_of(host, "web") and web["location"] == f"{host.root}#web"
    assert web["checkpoints"]["count"] == 1 and web["checkpoints"]["chain_depth"] == 1
    assert web["orphans"] == [] and "last_backup_age_seconds" not in web


def test_audit_names_orphans_also_beside_a_damaged_configuration(
    host: HostFolderBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    web = host.vms[id_of(host, "web")]
    stale = Path(host.disk_folder, "web_DEADBEEF-0000-0000-0000-000000000000.avhdx")
    shutil.copy(web.current["scsi0:0"], stale)
    cfg = Path(host.config_path(id_of(host, "db")))
    data = bytearray(cfg.read_bytes())
    data[KEY_TABLE_OFFSET] ^= 0xFF
    cfg.write_bytes(bytes(data))
    code, out, _ = run(capsys, "audit", host.root)
    assert code == EXIT["problems"]
    assert f"orphaned disk file {stale}" in out and "no configuration references it" in out
    assert "configuration unreadable" in out
    # db's disks are named legibly in its damaged configuration: not called orphans
    assert [line for line in out.splitlines() if "orphaned" in line and "db.vhdx" in line] == []
    code, doc = run_json(capsys, "audit", host.root)
    (host_row,) = [v for v in doc["vms"] if v["name"] == "(host folder)"]
    assert [o["path"] for o in host_row["orphans"]] == [str(stale)]
    assert host_row["location"] == host.root
    assert doc["problems"] == sum(len(v["problems"]) for v in doc["vms"])


def test_audit_of_one_vm_and_of_the_virtual_machines_folder(
    host: HostFolderBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(capsys, "audit", f"{host.root}#web")
    assert code == EXIT["ok"] and [v["name"] for v in doc["vms"]] == ["web"]
    code, doc = run_json(capsys, "audit", os.path.join(host.root, "Virtual Machines"))
    assert code == EXIT["ok"] and sorted(v["name"] for v in doc["vms"]) == ["db", "web"]
    code, _, err = run(capsys, "audit", f"{host.root}#nosuch")
    assert code == EXIT["source"] and "no VM named 'nosuch'" in err and "Traceback" not in err


def test_backup_of_one_vm_restores_as_a_usable_vm_folder(
    host: HostFolderBuilder, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = str(env / "repo")
    assert main(["-r", repo, "init", "-q"]) == 0
    code, out, err = run(capsys, "-r", repo, "backup", f"{host.root}#web")
    assert code == EXIT["ok"], err
    assert "snapshot" in out and "saved" in out
    code, doc = run_json(capsys, "-r", repo, "snapshots")
    (snap,) = doc["snapshots"] if isinstance(doc, dict) else doc
    assert json.dumps(snap).count("web") >= 1
    # audit with the repository: web is backed up (matched by VM ID), db is not
    code, doc = run_json(capsys, "audit", host.root, "-r", repo)
    by = {v["name"]: v for v in doc["vms"]}
    assert code == EXIT["problems"]
    assert by["web"]["problems"] == [] and by["web"]["last_backup_age_seconds"] is not None
    assert by["db"]["problems"] == ["no snapshot of this VM in the repository"]
    # the restore is a VM folder holding that VM alone, whose configuration finds its disks
    target = env / "restored"
    code, _, err = run(capsys, "-r", repo, "restore", "latest", "--target", str(target))
    assert code == EXIT["ok"], err
    vm = discover(str(target))
    assert vm.config_error is None and vm.name == "web" and vm.vm_id == id_of(host, "web")
    assert [c.name for c in vm.checkpoints] == ["before update"] and vm.missing == {}
    assert not any(id_of(host, "db") in f for f in vm.other_files)
    original = host.vms[id_of(host, "web")].current
    for slot, leaf in vm.current.items():
        assert os.path.basename(leaf) == os.path.basename(original[slot])
        with open_image(leaf) as a, open_image(original[slot]) as b:
            assert a.read(0, a.size) == b.read(0, b.size)
    code, out, _ = run(capsys, "audit", str(target))
    assert code == EXIT["ok"] and "1 VM, 0 problems" in out
    code, _, _ = run(capsys, "disk", "compare", vm.current["scsi0:0"], original["scsi0:0"])
    assert code == EXIT["ok"]


def test_backup_errors_are_one_line(host: HostFolderBuilder, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(env / "repo")
    assert main(["-r", repo, "init", "-q"]) == 0
    code, _, err = run(capsys, "-r", repo, "backup", "-q", f"{host.root}#nosuch")
    assert code == EXIT["source"] and "no VM named 'nosuch' (VMs: db, web)" in err
    host.create_vm("web")
    code, _, err = run(capsys, "-r", repo, "backup", "-q", f"{host.root}#web")
    assert code == EXIT["usage"] and "2 VMs are named 'web'" in err and "by its ID" in err
    code, _, err = run(capsys, "-r", repo, "backup", "-q", f"{host.root}#{id_of(host, 'db')}")
    assert code == EXIT["ok"], err
    os.unlink(host.vms[id_of(host, "db")].current["scsi0:0"])
    code, _, err = run(capsys, "-r", repo, "backup", "-q", f"{host.root}#db")
    assert code == EXIT["source"] and "named by the configuration is not among the files here" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

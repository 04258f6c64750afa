"""The libvirt connector through the command line: backup, restore as a clone that runs beside
the original, a Hyper-V lab VM restored as a libvirt domain that QEMU starts."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.libvirtd import Disk, Libvirtd, LibvirtVM, libvirtd, make_domain
from vmvault.cli import EXIT, main
from vmvault.testing.hyperv_lab import LabHost

__all__ = ["libvirtd", "make_domain"]

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    assert main(["init", "-q"]) == 0
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    capsys.readouterr()
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def raw_of(path: str, fmt: str, tmp: Path) -> bytes:
    out = tmp / "raw.bin"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def test_backup_restore_as_clone_defined_and_started_beside_the_original(
    make_domain: Callable[..., LibvirtVM], libvirtd: Libvirtd, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 48 * MiB), Disk("vdb", "raw", 16 * MiB)])
    vm.write("vda", 0, 2 * MiB, 0x11)
    vm.write("vdb", 3 * MiB, MiB, 0x22)
    code, doc, err = run(capsys, "backup", vm.location, "--tracking-sample", "4")
    assert code == EXIT["ok"], err
    assert doc["source"]["kind"] == "libvirt" and doc["consistency"] == "crash-consistent"
    model = vm.snapshot_model()
    vm.write("vda", 0, MiB, 0x33)  # the clone must show the backed-up state, not this

    target = env / "restore"
    code, doc, err = run(
        capsys, "restore", "latest", "--target", str(target), "--as-clone", "clone1", "--define", "--start"
    )
    assert code == EXIT["ok"], err
    assert doc["vm"]["started"] and doc["vm"]["name"] == "clone1"
    clone = libvirtd.conn.lookupByName("clone1")
    try:
        assert clone.isActive() and vm.dom.isActive()
        assert clone.UUIDString() != vm.dom.UUIDString() and clone.UUIDString() == doc["vm"]["uuid"]
        live = ET.fromstring(clone.XMLDesc(0))
        macs = [m.get("address") for m in live.findall("./devices/interface/mac")]
        assert macs == doc["vm"]["macs"] and vm.mac not in macs
        sources = {d.find("target").get("dev"): d.find("source").get("file") for d in live.findall("./devices/disk")}  # type: ignore[union-attr]
        assert all(str(p).startswith(str(target)) for p in sources.values())
        assert raw_of(sources["vda"], "qcow2", env) == model["vda"]
        assert raw_of(sources["vdb"], "raw", env) == model["vdb"]
        # the original identity is never overwritten
        code, _doc, err = run(capsys, "restore", "latest", "--target", str(env / "again"), "--define")
        assert code == EXIT["usage"] and "exists" in err
        assert (
            not (env / "again" / f"{vm.name}.xml").exists()
            or libvirtd.conn.lookupByName(vm.name).UUIDString() == vm.uuid
        )
    finally:
        clone.destroy()
        clone.undefine()


@pytest.mark.parametrize("generation", [1, 2])
def test_a_hyperv_lab_snapshot_restored_as_a_libvirt_domain_that_qemu_starts(
    libvirtd: Libvirtd, env: Path, capsys: pytest.CaptureFixture[str], generation: int
) -> None:
    if generation == 2 and not Path("/usr/share/qemu/firmware").is_dir():
        pytest.skip("OVMF firmware descriptors are missing (Debian package ovmf)")
    host_dir = env / "host"
    host_dir.mkdir()
    host = LabHost(str(host_dir))
    name = f"hv{generation}"
    host.create_vm(name, (16 * MiB, 8 * MiB), generation=generation)
    host.write(name, "scsi0:0" if generation == 2 else "ide0:0", 0, b"boot" * 1024)
    host.checkpoint(name, "cp1")
    host.write(name, "scsi0:0" if generation == 2 else "ide0:0", MiB, b"late" * 1024)
    code, doc, err = run(capsys, "backup", f"hyperv-lab://{host_dir}/{name}")
    assert code == EXIT["ok"], err
    target = env / "restored"
    code, doc, err = run(
        capsys,
        "restore",
        "latest",
        "--target",
        str(target),
        "--format",
        "qcow2",
        "--define",
        "--start",
        "--libvirt-uri",
        libvirtd.uri,
        "--domain-type",
        "qemu",
    )
    assert code == EXIT["ok"], err
    dom = libvirtd.conn.lookupByName(doc["vm"]["name"])
    try:
        assert dom.isActive()
        live = ET.fromstring(dom.XMLDesc(0))
        assert live.get("type") == "qemu"
        buses = {t.get("bus") for t in live.findall("./devices/disk/target")}
        assert buses == {"sata"} and len(live.findall("./devices/disk")) == 2
        assert [m.get("type") for m in live.findall("./devices/interface/model")] == ["e1000"]
        loader = live.find("./os/loader")
        if generation == 2:
            assert loader is not None and "OVMF" in (loader.text or "")
        else:
            assert loader is None or "OVMF" not in (loader.text or "")
        first = live.find("./devices/disk/source")
        assert first is not None
        data = raw_of(str(first.get("file")), "qcow2", env)
        assert data[:4096] == b"boot" * 1024 and data[MiB : MiB + 4096] == b"late" * 1024
    finally:
        dom.destroy()
        dom.undefineFlags(libvirt_nvram_flag())


def libvirt_nvram_flag() -> int:
    import libvirt

    return int(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def test_audit_lists_libvirt_snapshots_and_domains_without_a_recent_backup(
    make_domain: Callable[..., LibvirtVM],
    libvirtd: Libvirtd,
    env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 8 * MiB)])
    other = make_domain([Disk("vda", "qcow2", 8 * MiB)], start=False)
    vm.dom.snapshotCreateXML("<domainsnapshot><name>before-upgrade</name></domainsnapshot>", 0)
    try:
        code, doc, err = run(capsys, "backup", vm.location)
        assert code == EXIT["ok"], err
        target = f"libvirt:///?uri={quote(libvirtd.uri, safe='')}"
        monkeypatch.delenv("VMVAULT_REPO")  # first the domains alone
        code, doc, err = run(capsys, "audit", target)
        assert code == 3, err
        by_name = {r["name"]: r for r in doc["vms"]}
        mine, theirs = by_name[vm.name], by_name[other.name]
        assert mine["checkpoints"]["count"] == 1
        assert any(i["name"] == "before-upgrade" for i in mine["checkpoints"]["list"])
        assert any(i["type"] == "backup-checkpoint" and i["owner"] == "vmvault" for i in mine["checkpoints"]["list"])
        assert any("libvirt snapshot" in p for p in mine["problems"])
        assert theirs["problems"] == []
        # with the repository: the domain never backed up is named
        code, doc, err = run(capsys, "audit", target, "--repo", str(env / "repo"))
        by_name = {r["name"]: r for r in doc["vms"]}
        assert any("no snapshot of this VM" in p for p in by_name[other.name]["problems"])
        assert not any("no snapshot of this VM" in p for p in by_name[vm.name]["problems"])
    finally:
        for snap in vm.dom.listAllSnapshots(0):
            snap.delete(0)

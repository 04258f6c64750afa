"""Hyper-V host folders (every VM's configuration in one shared ``Virtual Machines``, disks in
a shared ``Virtual Hard Disks``): one VM per configuration, disks attributed by references and
parent locators, orphans, damaged configurations, and the files a ``HOSTFOLDER#VM`` backup takes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmvault.disk.vhdx import create_vhdx
from vmvault.errors import ConfigError, SourceError
from vmvault.hypervisors.files import FilesSource
from vmvault.hypervisors.folder_audit import HOST_REPORT, audit_folder
from vmvault.hypervisors.hyperv_model import (
    discover,
    discover_host,
    is_host_folder,
    salvage_disk_names,
    split_host_spec,
)
from vmvault.testing.hyperv_host import KEY_TABLE_OFFSET, HostFolderBuilder

MIB = 1024 * 1024
NOW = 1795700000.0


def names(paths: list[str] | set[str]) -> list[str]:
    return sorted(os.path.basename(p) for p in paths)


@pytest.fixture(params=["vmcx", "xml"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> HostFolderBuilder:
    """Two VMs on a host's default layout (disks in the sibling 'Virtual Hard Disks'): web with
    two disks and two checkpoints, db with one disk."""
    b = HostFolderBuilder(str(tmp_path / "Hyper-V"), disks_beside=True, config_format=request.param)
    web = b.create_vm("web", (8 * MIB, 4 * MIB))
    b.write(web, "scsi0:0", 0, b"w" * MIB)
    b.checkpoint(web, "before update")
    b.write(web, "scsi0:0", MIB, b"v" * MIB)
    b.checkpoint(web, "after update")
    b.create_vm("db")
    return b


def vm_id(b: HostFolderBuilder, name: str) -> str:
    return next(v.id for v in b.vms.values() if v.name == name)


def test_one_vm_per_configuration(host: HostFolderBuilder) -> None:
    assert is_host_folder(host.root)
    h = discover_host(host.root)
    assert [v.name for v in h.vms] == ["db", "web"]
    db, web = h.vms
    assert web.vm_id == vm_id(host, "web") and web.config_error is None
    assert [c.name for c in web.checkpoints] == ["before update", "after update"]
    # disks by reference and by parent locators: the current .avhdx leaves and their chains
    assert set(web.current.values()) == set(host.vms[web.vm_id].current.values())
    assert names(web.disks) == names(
        p for leaf in host.vms[web.vm_id].current.values() for p in discover_host(host.root).vms[1].chain(leaf)
    )
    assert len(web.disks) == 6 and web.chain_depth() == 2
    assert names(db.disks) == ["db.vhdx"] and db.checkpoints == []
    # files by the VM's ID (configuration, guest state, runtime state) and its checkpoints'
    assert sorted(Path(f).name for f in web.other_files if f.startswith("Virtual Machines/")) == sorted(
        f"{web.vm_id}{s}" for s in (".VMRS", f".{host.config_format}", ".vmgs")
    )
    assert sum(f.startswith("Snapshots/") for f in web.other_files) == 2
    assert not any(db.vm_id in f for f in web.other_files)
    assert h.orphans == [] and h.unattributed == [] and h.stray_files == [] and h.stray_checkpoints == []
    assert h.location(web) == f"{host.root}#web"


def test_orphans_are_disks_no_configuration_references(host: HostFolderBuilder) -> None:
    web = host.vms[vm_id(host, "web")]
    leaf = web.current["scsi0:0"]
    stale = os.path.join(host.disk_folder, "web_DEADBEEF-0000-0000-0000-000000000000.avhdx")
    shutil.copy(leaf, stale)  # a leftover checkpoint child: its parent is web's, nobody names it
    create_vhdx(os.path.join(host.disk_folder, "old-vm.vhdx"), MIB).close()
    Path(host.root, "Virtual Machines", "0A0A0A0A-0000-0000-0000-000000000000.VMRS").write_bytes(b"x" * 100)
    h = discover_host(host.root)
    assert names(h.orphans) == ["old-vm.vhdx", os.path.basename(stale)]
    assert h.stray_files == ["Virtual Machines/0A0A0A0A-0000-0000-0000-000000000000.VMRS"]
    reports = audit_folder(host.root, NOW)
    assert [r.name for r in reports] == ["db", "web", HOST_REPORT]
    assert all(r.problems == [] for r in reports[:2])
    (hr,) = [r for r in reports if r.host]
    assert hr.location == host.root and names([o["path"] for o in hr.orphans]) == names(h.orphans)
    assert any("orphaned disk file" in p and "old-vm.vhdx" in p for p in hr.problems)
    assert any("leftover file" in p and "100 bytes" in p for p in hr.problems)


def corrupt(path: str) -> None:
    """Damage a configuration so it no longer parses (the names in it stay legible)."""
    data = bytearray(Path(path).read_bytes())
    if data[:4] == b"\x14\x20\x28\x01":
        data[KEY_TABLE_OFFSET] ^= 0xFF  # the key table's signature
    else:
        data[len(data) // 2 :] = b"\0" * (len(data) - len(data) // 2)  # XML cut off halfway
        data[4:40] = b"<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<<"
    Path(path).write_bytes(bytes(data))


def test_an_unreadable_configuration_keeps_orphan_detection(host: HostFolderBuilder) -> None:
    web_id = vm_id(host, "web")
    stale = os.path.join(host.disk_folder, "db_DEADBEEF-0000-0000-0000-000000000000.avhdx")
    create_vhdx(stale, 0, parent=host.vms[vm_id(host, "db")].current["scsi0:0"]).close()
    corrupt(host.config_path(web_id))
    h = discover_host(host.root)
    db, web = sorted(h.vms, key=lambda v: v.config_error is not None)
    assert web.config_error is not None and web.vm_id == web_id and web.name == web_id
    if host.config_format == "vmcx":
        # the names still legible in the damaged VMCX are its disks: they are not orphans
        assert names(web.salvaged) == names(host.vms[web_id].current.values())
        assert names(h.orphans) == [os.path.basename(stale)]
        assert [c.name for c in web.checkpoints] == ["before update", "after update"]
    else:
        # nothing legible is left: what no readable configuration claims is unattributed, not orphaned
        assert web.salvaged == [] and h.orphans == []
        assert os.path.basename(stale) in names(h.unattributed)
        assert not set(db.disks) & set(h.unattributed)
    reports = {r.name: r for r in audit_folder(host.root, NOW)}
    assert any("configuration unreadable" in p for p in reports[web_id].problems)
    assert reports["db"].problems == []
    assert any(os.path.basename(stale) in p for p in reports[HOST_REPORT].problems)


def test_salvaged_names_come_from_utf16_and_text() -> None:
    assert salvage_disk_names("/nonexistent") == []


def test_salvage_reads_both_encodings(tmp_path: Path) -> None:
    path = tmp_path / "x.vmcx"
    path.write_bytes(
        b"\x01\x02" + "C:\\VMs\\a b.vhdx".encode("utf-16-le") + b"\x00\x07junk D:\\x\\c.AVHDX\x00" + b"\xff"
    )
    found = salvage_disk_names(str(path))
    # whatever precedes a path may stick to it; the file name is what counts
    assert any(n.endswith("C:\\VMs\\a b.vhdx") for n in found)
    assert any(n.endswith("D:\\x\\c.AVHDX") for n in found)


def test_a_checkpoint_without_its_vm_id_is_placed_by_its_disks(tmp_path: Path) -> None:
    b = HostFolderBuilder(str(tmp_path / "host"), config_format="xml")
    web = b.create_vm("web")
    cp = b.checkpoint(web, "cp1")
    b.create_vm("db")
    text = Path(b.checkpoint_path(cp)).read_bytes().decode("utf-16")
    text = text[: text.index("<vm_id")] + text[text.index("</vm_id>") + len("</vm_id>") :]
    Path(b.checkpoint_path(cp)).write_bytes(text.encode("utf-16"))
    h = discover_host(b.root)
    assert [c.name for c in next(v for v in h.vms if v.name == "web").checkpoints] == ["cp1"]


def test_checkpoints_of_a_vm_no_longer_here(tmp_path: Path) -> None:
    b = HostFolderBuilder(str(tmp_path / "host"))
    web = b.create_vm("web")
    b.checkpoint(web, "cp1")
    b.create_vm("db")
    # the VM's configuration is gone: its checkpoint is stray, the disks it names are referenced
    # (not orphans), and the folder is still a host folder although one configuration is left
    Path(b.config_path(web)).unlink()
    assert is_host_folder(b.root)
    h = discover_host(b.root)
    assert [c.name for c in h.stray_checkpoints] == ["cp1"]
    assert names(h.orphans) == [os.path.basename(b.vms[web].current["scsi0:0"])]
    reports = {r.name: r for r in audit_folder(b.root, NOW)}
    assert sorted(reports) == [HOST_REPORT, "db"] and reports["db"].problems == []
    assert any("belongs to no VM here" in p for p in reports[HOST_REPORT].problems)
    assert any("leftover file Virtual Machines/" in p for p in reports[HOST_REPORT].problems)  # its .vmgs


def test_disks_of_one_name_in_two_folders(tmp_path: Path) -> None:
    b = HostFolderBuilder(str(tmp_path / "host"))
    web = b.create_vm("web")
    b.create_vm("db")
    # the same file name in another folder below the host folder: the configuration's
    # trailing folders tell which one it means
    other = Path(b.root, "old", "Virtual Hard Disks")
    other.mkdir(parents=True)
    create_vhdx(str(other / "web.vhdx"), MIB).close()
    h = discover_host(b.root)
    vm = next(v for v in h.vms if v.name == "web")
    assert list(vm.current.values()) == [b.vms[web].current["scsi0:0"]]
    assert h.orphans == [str(other / "web.vhdx")]
    # a configuration path that matches both equally is taken as neither
    cfg = Path(b.config_path(web))
    cfg.write_bytes(
        cfg.read_bytes().replace(
            "Virtual Hard Disks\\web.vhdx".encode("utf-16-le"), b"w\0e\0b\0.\0v\0h\0d\0x\0" + b"\0\0" * 19
        )
    )
    h = discover_host(b.root)
    vm = next(v for v in h.vms if v.name == "web")
    assert vm.current == {} and "scsi0:0" in vm.missing
    assert any("matches several files" in w for w in h.warnings)


def test_hostile_locations_are_not_followed(tmp_path: Path) -> None:
    b = HostFolderBuilder(str(tmp_path / "host"), config_format="xml")
    web = b.create_vm("web")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    create_vhdx(str(outside / "secret.vhdx"), MIB).close()
    # a child whose parent locator leads out of the host folder, and a link to a disk outside
    child = Path(b.disk_folder, "evil.avhdx")
    create_vhdx(str(child), 0, parent=str(outside / "secret.vhdx")).close()
    os.symlink(outside / "secret.vhdx", Path(b.disk_folder, "link.vhdx"))
    # a configuration naming a path outside
    cfg = Path(b.config_path(web))
    cfg.write_bytes(
        cfg.read_bytes().decode("utf-16").replace("web.vhdx", "..\\..\\elsewhere\\secret.vhdx").encode("utf-16")
    )
    h = discover_host(b.root)
    vm = h.vms[0]
    assert vm.current == {} and next(iter(vm.missing.values())).endswith("secret.vhdx")
    assert names(h.disks) == ["evil.avhdx", "web.vhdx"]  # the link is no disk of the host
    assert h.disks[str(child)].error is not None and "inside" in h.disks[str(child)].error
    assert names(h.orphans) == ["evil.avhdx", "web.vhdx"]


def test_selecting_a_vm(host: HostFolderBuilder, tmp_path: Path) -> None:
    h = discover_host(host.root)
    web_id = vm_id(host, "web")
    assert h.select("web").vm_id == web_id
    assert h.select("WEB").vm_id == web_id
    assert h.select("{" + web_id.lower() + "}").name == "web"
    with pytest.raises(SourceError, match=r"no VM named 'nosuch'.*VMs: db, web"):
        h.select("nosuch")
    twin = host.create_vm("web")
    h = discover_host(host.root)
    with pytest.raises(ConfigError, match="2 VMs are named 'web'"):
        h.select("web")
    assert h.select(twin).vm_id == twin
    assert h.location(h.select(twin)) == f"{host.root}#{twin}"


def test_which_folders_are_host_folders(tmp_path: Path) -> None:
    one = HostFolderBuilder(str(tmp_path / "a" / "Hyper-V"), disks_beside=True)
    one.create_vm("solo")
    assert is_host_folder(one.root)  # one VM, disks in the sibling folder: a host's default layout
    vm_folder = HostFolderBuilder(str(tmp_path / "b" / "solo"))
    vm_folder.create_vm("solo")
    assert not is_host_folder(vm_folder.root)  # one VM with its disks inside: a VM folder
    assert [r.name for r in audit_folder(str(tmp_path / "b"), NOW)] == ["solo"]
    # the 'Virtual Machines' folder itself names its host folder
    assert [r.name for r in audit_folder(os.path.join(one.root, "Virtual Machines"), NOW)] == ["solo"]
    assert split_host_spec(f"{one.root}#solo") == (one.root, "solo")
    assert split_host_spec(f"{tmp_path}/nosuch#solo") is None
    odd = tmp_path / "odd#name"
    odd.mkdir()
    assert split_host_spec(str(odd)) is None  # a path that exists is a path
    # '#' in the folder's name and in the VM's
    hashed = HostFolderBuilder(str(tmp_path / "hv#1"))
    hashed.create_vm("a#b")
    hashed.create_vm("c")
    assert split_host_spec(f"{hashed.root}#a#b") == (hashed.root, "a#b")
    h = discover_host(hashed.root)
    vm = h.select("a#b")
    assert split_host_spec(h.location(vm)) == (hashed.root, "a#b")


def test_a_vm_folder_with_an_unreadable_configuration(tmp_path: Path) -> None:
    """The single-VM layout gets the same rule: legible names stand in for the configuration."""
    b = HostFolderBuilder(str(tmp_path / "web"))
    web = b.create_vm("web")
    b.checkpoint(web, "cp")
    stale = Path(b.disk_folder, "web_DEADBEEF.avhdx")
    shutil.copy(b.vms[web].current["scsi0:0"], stale)
    corrupt(b.config_path(web))
    vm = discover(b.root)
    assert vm.config_error is not None and names(vm.orphans()) == ["web_DEADBEEF.avhdx"]
    Path(b.config_path(web)).write_bytes(b"\0" * 100)  # nothing legible left
    vm = discover(b.root)
    assert vm.orphans() == [] and names(vm.unattributed()) == sorted(
        ["web_DEADBEEF.avhdx", os.path.basename(b.vms[web].current["scsi0:0"])]
    )
    (report,) = audit_folder(b.root, NOW)
    assert sum("unreadable configuration does not tell" in p for p in report.problems) == 2


# ---- what HOSTFOLDER#VM backs up -----------------------------------------------------------


def test_a_backup_takes_the_vm_files_laid_out_as_a_vm_folder(host: HostFolderBuilder) -> None:
    web_id = vm_id(host, "web")
    source = FilesSource(f"{host.root}#web")
    assert source.kind == "files" and source.location == f"{host.root}#web"
    with source.open_session(None) as session:
        assert session.vm == {"hypervisor": "files", "name": "web", "id": web_id, "generation": 2}
        stored = sorted(d.name for d in session.disks)
        assert stored == sorted(f"Virtual Hard Disks/{n}" for n in names(discover_host(host.root).vms[1].disks))
        layers = {d.name: d.parent_name for d in session.disks if d.layer}
        assert len(layers) == 4 and all(p is not None and p.startswith("Virtual Hard Disks/") for p in layers.values())
        files = sorted(f.name for f in session.files)
        assert f"Virtual Machines/{web_id}.{host.config_format}" in files
        assert sum(f.startswith("Snapshots/") for f in files) == 2
        assert not any(vm_id(host, "db") in f for f in files)
        assert session.warnings == []


def test_a_backup_refuses_what_it_cannot_attribute(host: HostFolderBuilder, tmp_path: Path) -> None:
    web_id = vm_id(host, "web")
    with pytest.raises(SourceError, match="no VM named 'nosuch'"):
        FilesSource(f"{host.root}#nosuch").open_session(None)
    with pytest.raises(SourceError, match="no 'Virtual Machines' folder"):
        FilesSource(f"{tmp_path}#web")
    with pytest.raises(SourceError, match="HOSTFOLDER#VM needs HOSTFOLDER to be a folder"):
        FilesSource(f"{tmp_path}/nosuch#web")
    # a disk the configuration names is gone
    db_disk = host.vms[vm_id(host, "db")].current["scsi0:0"]
    os.rename(db_disk, db_disk + ".moved")
    with pytest.raises(SourceError, match=r"disk .*db\.vhdx \(scsi0:0\) named by the configuration is not among"):
        FilesSource(f"{host.root}#db").open_session(None)
    # ... and --allow-parent-dir adds a folder to look in
    elsewhere = tmp_path / "D-drive"
    elsewhere.mkdir()
    os.rename(db_disk + ".moved", elsewhere / "db.vhdx")
    from vmvault.hypervisors.base import BackupOptions

    with FilesSource(f"{host.root}#db").open_session(None, BackupOptions(allow_parent_dirs=(str(elsewhere),))) as s:
        assert [d.name for d in s.disks] == ["Virtual Hard Disks/db.vhdx"]
    # an unreadable configuration
    corrupt(host.config_path(web_id))
    with pytest.raises(SourceError, match=r"configuration unreadable.*nothing is backed up"):
        FilesSource(f"{host.root}#{web_id}").open_session(None)


def test_salvage_is_bounded(tmp_path: Path) -> None:
    """A hostile configuration cannot make the salvage slow: each character is read once."""
    import time

    path = tmp_path / "x.vmcx"
    path.write_bytes(b"".join(b"n%d.vhd\0" % i for i in range(2_000_000)))  # 2 million names
    t = time.monotonic()
    found = salvage_disk_names(str(path))
    assert time.monotonic() - t < 20
    assert len(found) == 1000 and found[0] == "n0.vhd"
    path.write_bytes(b"A.vhd" * (4 * MIB))  # 20 MiB of suffixes that run into each other
    assert salvage_disk_names(str(path)) == []  # never a suffix followed by more of the name
    path.write_bytes((b"A" * 5000 + b".vhdx") * 3000)  # long runs, one name
    t = time.monotonic()
    assert len(salvage_disk_names(str(path))) == 1
    assert time.monotonic() - t < 20

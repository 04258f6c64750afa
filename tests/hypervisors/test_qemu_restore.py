"""Restore a live-backed-up VM as a clone that runs beside the original."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hypervisors.qemu_vm import DiskSpec, MiB, QemuVM, connect_when_listening, make_vm, read_disk
from vmvault.errors import ConfigError, HypervisorError
from vmvault.hypervisors._qmp import QmpClient
from vmvault.hypervisors.qemu import QemuSource
from vmvault.hypervisors.qemu_restore import write_restore_files

__all__ = ["make_vm"]

pytestmark = pytest.mark.integration

NIC = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,id=nic0"]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def start_script(script: str, sock: str, procs: list[subprocess.Popen[bytes]], *extra: str) -> QmpClient:
    log = open(os.path.join(os.path.dirname(script), "qemu.log"), "ab")  # noqa: SIM115 - the child's output
    proc = subprocess.Popen([script, *extra], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    procs.append(proc)
    try:
        return connect_when_listening(sock, proc)
    except HypervisorError:
        raise AssertionError(Path(os.path.dirname(script), "qemu.log").read_text()) from None


def test_restored_clone_runs_beside_the_original(
    make_vm: Callable[..., QemuVM], tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 16 * MiB)], extra_args=NIC)
    vm.write("vda", 0, 2 * MiB, 0x5A)
    vm.write("vdb", 3 * MiB, MiB, 0xA5)
    original_mac = vm.q("qom-get", path="/machine/peripheral/nic0", property="mac")
    (tmp_path / "scratch").mkdir()
    restored = tmp_path / "restored"
    restored.mkdir()
    with QemuSource(f"{vm.location}?scratch={tmp_path}/scratch").open_session(None) as s:
        at_backup = vm.snapshot_model()
        files = {}
        for disk in s.disks:
            files[disk.name] = str(restored / f"{disk.name}.raw")
            Path(files[disk.name]).write_bytes(read_disk(disk))
        record = s.vm
        s.complete("snap-1")
    assert record["nics"] == [{"id": "nic0", "model": "virtio-net-pci", "mac": original_mac}]

    out = tmp_path / "clone"
    rv = write_restore_files(record, files, str(out), as_clone="clone1", formats={"vda": "raw"})
    assert rv.name == "clone1" and rv.uuid != vm.uuid
    assert rv.macs["nic0"] != original_mac and rv.macs["nic0"].startswith("52:54:00:")
    assert rv.qmp_socket == str(out / "qmp-test.sock")
    assert not any(vm.paths["vda"] in a or vm.paths["vdb"] in a for a in rv.argv)

    clone = start_script(rv.script, rv.qmp_socket, processes)
    try:
        if clone.execute("query-status")["status"] == "prelaunch":
            clone.execute("cont")  # the original's command line had -S
        assert clone.execute("query-status")["status"] == "running"
        assert vm.q("query-status")["status"] == "running"  # both run at once
        assert clone.execute("query-name")["name"] == "clone1"
        assert clone.execute("query-uuid")["UUID"] == rv.uuid
        assert clone.execute("qom-get", {"path": "/machine/peripheral/nic0", "property": "mac"}) == rv.macs["nic0"]
        files_seen = {b["qdev"].split("/")[3]: b["inserted"]["file"] for b in clone.execute("query-block")}
        assert files_seen == files
        clone.execute("quit")
    finally:
        clone.close()
    processes[-1].wait(timeout=15)
    for dev, path in files.items():
        assert Path(path).read_bytes() == at_backup[dev]

    dom = ET.parse(rv.xml).getroot()
    assert dom.findtext("name") == "clone1" and dom.findtext("uuid") == rv.uuid
    assert [d.get("file") for d in dom.iterfind("devices/disk/source")] == [files["vda"], files["vdb"]]
    assert [d.get("type") for d in dom.iterfind("devices/disk/driver")] == ["raw", "raw"]
    assert [t.get("dev") for t in dom.iterfind("devices/disk/target")] == ["vda", "vdb"]
    assert dom.find("devices/interface/mac").get("address") == rv.macs["nic0"]  # type: ignore[union-attr]
    assert dom.findtext("memory") == str(64 * 1024) and dom.find("os/type").get("machine", "").startswith("pc-q35")  # type: ignore[union-attr]

    # a plain restore keeps the identity and pins the MAC QEMU had chosen
    same = write_restore_files(record, files, str(tmp_path / "same"), formats={"vda": "raw"})
    assert same.name == "testvm" and same.uuid == vm.uuid
    assert f"virtio-net-pci,netdev=n0,id=nic0,mac={original_mac}" in same.argv

    # without a recorded command line one is built from the facts, and it starts
    facts = {k: v for k, v in record.items() if k != "cmdline"}
    built = write_restore_files(facts, files, str(tmp_path / "built"), as_clone="clone2", formats={"vda": "raw"})
    sock = str(tmp_path / "built" / "qmp.sock")
    c2 = start_script(
        built.script, sock, processes, "-S", "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"
    )
    try:
        assert c2.execute("query-name")["name"] == "clone2"
        assert {b["inserted"]["file"] for b in c2.execute("query-block") if b.get("inserted")} == set(files.values())
        c2.execute("quit")
    finally:
        c2.close()

    with pytest.raises(ConfigError, match="no restored file"):
        write_restore_files(record, {"vda": files["vda"]}, str(tmp_path / "x"))


def test_command_line_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmvault.hypervisors.qemu_restore import main

    record = {
        "name": "web",
        "uuid": "5f0c1b3e-8a62-4c1e-9d7a-1a2b3c4d5e6f",
        "machine": "pc-q35-7.2",
        "memory": 256 * MiB,
        "cpus": 2,
        "disks": [
            {"device": "vda", "node": "disk0", "format": "qcow2", "file": "/vm/web.qcow2", "model": "virtio-blk-pci"}
        ],
        "nics": [{"id": "nic0", "model": "virtio-net-pci", "mac": "52:54:00:12:34:56"}],
        "cmdline": [
            "qemu-system-x86_64", "-name", "guest=web,debug-threads=on",
            "-uuid", "5f0c1b3e-8a62-4c1e-9d7a-1a2b3c4d5e6f",
            "-blockdev", '{"driver":"file","filename":"/vm/web.qcow2","node-name":"f0"}',
            "-blockdev", '{"driver":"qcow2","file":"f0","node-name":"disk0"}',
            "-device", "virtio-blk-pci,drive=disk0,id=vda",
            "-netdev", "tap,id=n0", "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56",
            "-chardev", "socket,id=mon,path=/run/web/qmp.sock,server=on,wait=off", "-mon", "chardev=mon,mode=control",
            "-vnc", ":1", "-incoming", "defer", "-S",
        ],
    }  # fmt: skip
    (tmp_path / "vm.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    assert main(["--vm", str(tmp_path / "vm.json"), "--disk", "vda=/restore/web.raw", "--format", "vda=raw",
                 "--as-clone", "web-copy", str(out)]) == 0  # fmt: skip
    assert "web-copy" in capsys.readouterr().out
    script = (out / "run-web-copy.sh").read_text()
    argv = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " "))[:-1]
    assert argv[argv.index("-name") + 1] == "guest=web-copy,debug-threads=on"
    assert argv[argv.index("-uuid") + 1] != record["uuid"]
    assert '{"driver":"file","filename":"/restore/web.raw","node-name":"f0"}' in argv
    assert '{"driver":"raw","file":"f0","node-name":"disk0"}' in argv
    nic = next(a for a in argv if a.startswith("virtio-net-pci"))
    assert "mac=52:54:00:12:34:56" not in nic and re.search(r"mac=52:54:00(:[0-9a-f]{2}){3}$", nic)
    assert f"socket,id=mon,path={out}/qmp.sock,server=on,wait=off" in argv
    assert argv[argv.index("-vnc") + 1] == f"unix:{out}/vnc.sock" and "-incoming" not in argv and "-S" in argv
    assert main(["--vm", str(tmp_path / "vm.json"), "--disk", "vda", str(out)]) == 2
    assert "DEVICE=VALUE" in capsys.readouterr().err
    assert main(["--vm", str(tmp_path / "absent.json"), "--disk", "vda=x", str(out)]) == 2
    assert "cannot read the VM record" in capsys.readouterr().err

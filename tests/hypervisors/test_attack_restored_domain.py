"""A restored libvirt domain references nothing on the host but the files the restore wrote.

Threat model: docs/design/repository-format.md, section 10 (the storage writes the snapshot,
and so the stored ``domain.xml`` and ``vm`` record). A hostile ``domain.xml`` names host files,
devices, programs, folders to share and QEMU options; ``restore --define --start`` hands the
result to libvirt, which opens, passes through or runs them with its rights. The rewritten
domain must keep none of them, say what it left out, and still be a domain libvirt defines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.libvirtd import Libvirtd, libvirtd
from vmvault.errors import ConfigError
from vmvault.hypervisors.base import Registration, RestoredVm
from vmvault.hypervisors.libvirt_restore import after_restore, domain_for

__all__ = ["libvirtd"]

HOSTILE = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web01</name>
  <uuid>7d1bd5bd-0c34-4f21-9a8e-6b0c1c0d2f11</uuid>
  <title>/etc/shadow is only a title</title>
  <memory unit='KiB'>131072</memory>
  <resource><partition>/machine/elsewhere</partition></resource>
  <sysinfo type='fwcfg'><entry name='opt/com.example/x' file='/etc/shadow'/></sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <smbios mode='host'/>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/../../../etc/shadow</loader>
    <nvram template='/etc/passwd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram>
    <kernel>/boot/vmlinuz</kernel>
    <initrd>/etc/shadow</initrd>
    <cmdline>console=ttyS0</cmdline>
    <acpi><table type='slic'>/etc/ssh/ssh_host_ed25519_key</table></acpi>
  </os>
  <features><acpi/></features>
  <seclabel type='none'/>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <devices>
    <emulator>/bin/sh</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'><seclabel model='dac' relabel='no'/></source>
      <backingStore type='file'><format type='raw'/><source file='/etc/shadow'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/etc/shadow'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/sda'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='/'/>
      <target dir='hostroot'/>
    </filesystem>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/></source>
    </hostdev>
    <serial type='file'><source path='/root/.bashrc' append='on'/><target port='0'/></serial>
    <console type='dev'><source path='/dev/tty1'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='/etc/cron.d/x'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='pty'><log file='/etc/profile.d/x.sh' append='on'/><target type='virtio' name='y'/></channel>
    <interface type='ethernet'>
      <mac address='52:54:00:12:34:56'/>
      <script path='/tmp/evil.sh'/>
      <target dev='tap9' managed='no'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:12:34:57'/>
      <source network='default'/>
      <backend tap='/dev/net/tun' vhost='/dev/vhost-net'/>
      <rom file='/etc/shadow'/>
      <model type='e1000'/>
    </interface>
    <graphics type='vnc' socket='/etc/passwd'/>
    <graphics type='spice' port='5930' listen='0.0.0.0'><listen type='address' address='0.0.0.0'/></graphics>
    <input type='evdev'><source dev='/dev/input/event0'/></input>
    <tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>
    <memory model='nvdimm'>
      <source><path>/etc/shadow</path></source><target><size unit='KiB'>524288</size></target>
    </memory>
    <audio id='1' type='file' path='/etc/motd'/>
    <panic model='isa'/>
    <futuredevice><source path='/etc/shadow'/></futuredevice>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file=/etc/shadow,addr=0x100000'/>
  </qemu:commandline>
  <metadata><app xmlns='urn:example'>/etc/only/a/note</app></metadata>
</domain>
"""

#: what a domain libvirt itself wrote looks like: nothing to leave out
ORDINARY = """<domain type='qemu'>
  <name>web02</name>
  <uuid>0b0a3d7c-2a0e-4d54-8a43-7b4ab2d7c001</uuid>
  <memory unit='KiB'>131072</memory>
  <vcpu placement='static'>1</vcpu>
  <resource><partition>/machine</partition></resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web02_VARS.fd</nvram>
  </os>
  <features><acpi/></features>
  <seclabel type='dynamic' model='dac' relabel='yes'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web02.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
    <controller type='usb' model='qemu-xhci'/>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='tablet' bus='usb'/>
    <graphics type='vnc' port='-1' autoport='yes'><listen type='address'/></graphics>
    <video><model type='virtio'/></video>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


def host_references(text: str) -> list[str]:
    """Every absolute path the domain names where libvirt or QEMU would open it."""
    found: list[str] = []

    def walk(el: ET.Element) -> None:
        if el.tag in ("metadata", "title", "description"):
            return
        for value in [*el.attrib.values(), (el.text or "").strip()]:
            if value.startswith("/"):
                found.append(value)
        for child in el:
            walk(child)

    walk(ET.fromstring(text))
    return found


#: attributes (and ``<path>``'s text) where libvirt or QEMU opens a file: a relative one
#: resolves in the service's folder
PATH_ATTRIBUTES = ("file", "path", "dir", "socket", "rendernode", "template", "logFile")


def relative_references(text: str) -> list[str]:
    """Every relative path the domain gives where a file, folder or socket goes (free text
    such as ``<metadata>`` aside)."""
    found: list[str] = []

    def walk(el: ET.Element) -> None:
        if el.tag in ("metadata", "title", "description"):
            return
        named = [v for k, v in el.attrib.items() if k in PATH_ATTRIBUTES]
        named += [(el.text or "").strip()] if el.tag == "path" else []
        found.extend(v for v in named if v[:1] not in ("", "/"))
        for child in el:
            walk(child)

    walk(ET.fromstring(text))
    return found


def restored_domain(tmp_path: Path, xml: str, **kw: str) -> tuple[str, list[str], set[str]]:
    disk = tmp_path / "vda.qcow2"
    nvram = tmp_path / "nvram" / "web_VARS.fd"
    nvram.parent.mkdir()
    disk.write_bytes(b"")
    nvram.write_bytes(b"")
    out = domain_for(
        {}, xml.encode(), {"vda": (str(disk), "qcow2")}, {"nvram/web_VARS.fd": str(nvram)}, str(tmp_path), **kw
    )
    return Path(out.xml).read_text(), out.warnings, {str(disk), str(nvram)}


@pytest.mark.parametrize("clone", [None, "web01-clone"])
def test_a_hostile_domain_xml_keeps_no_host_reference(tmp_path: Path, clone: str | None) -> None:
    text, warnings, ours = restored_domain(tmp_path, HOSTILE, **({"as_clone": clone} if clone else {}))
    assert set(host_references(text)) <= ours | {"/dev/urandom"}
    dom = ET.fromstring(text)
    assert not [el for el in dom.iter() if el.tag.startswith("{") and el.tag.endswith("commandline")]
    for gone in ("seclabel", "emulator", "hostdev", "filesystem", "kernel", "initrd", "resource", "futuredevice"):
        assert dom.find(f".//{gone}") is None, gone
    assert dom.find("./os").get("firmware") == "efi"  # type: ignore[union-attr]  # libvirt picks OVMF
    assert dom.find("./os/nvram").get("template") is None  # type: ignore[union-attr]
    # what stays is made harmless, not removed: the guest keeps its drives, cards and consoles
    assert dom.find("./devices/disk[@device='cdrom']/source") is None
    assert [i.get("type") for i in dom.findall("./devices/interface")] == ["user", "network"]
    assert dom.find("./devices/serial").get("type") == "pty"  # type: ignore[union-attr]
    assert dom.find("./devices/channel[@type='unix']/source") is None
    assert dom.find("./devices/rng/backend").text == "/dev/urandom"  # type: ignore[union-attr]
    assert dom.find("./devices/audio").get("type") == "none"  # type: ignore[union-attr]
    # the stored XML holds no display password: the console is offered on loopback only
    listens = [g.get("listen") for g in dom.findall("./devices/graphics")]
    listens += [a.get("address") for a in dom.findall("./devices/graphics/listen")]
    assert set(listens) == {"127.0.0.1"} and len(listens) == 4
    assert dom.find("./os/smbios").get("mode") == "emulate"  # type: ignore[union-attr]  # not the host's
    said = "\n".join(warnings)
    for named in ("/etc/shadow", "commandline", "security label", "<filesystem>", "<hostdev>", "<script>", "evdev",
                  "not 0.0.0.0", "SMBIOS"):  # fmt: skip
        assert named in said, named
    assert "/etc/only/a/note" in text  # free text is text


def test_a_relative_path_where_a_file_goes_is_a_host_path(tmp_path: Path) -> None:
    """libvirt runs as a service in "/": a persistent store, a TPM's state or a render node given
    as a relative path names the host's /etc/shadow or /dev/dri as an absolute one does."""
    xml = b"""<domain type='kvm'><name>w</name><devices>
      <disk type='file' device='disk'><source file='/vm/a.qcow2'/><target dev='vda'/></disk>
      <pstore backend='acpi-erst'><path>etc/shadow</path><size unit='KiB'>8</size></pstore>
      <video><model type='virtio'><acceleration accel3d='yes' rendernode='dev/dri/renderD128'/></model></video>
      <tpm model='tpm-crb'><backend type='emulator' version='2.0'><source type='file' path='etc/tpm'/></backend></tpm>
    </devices></domain>"""
    restored = domain_for({}, xml, {"vda": (str(tmp_path / "vda.qcow2"), "qcow2")}, {}, str(tmp_path / "out"))
    assert not relative_references(restored.text)
    said = "\n".join(restored.warnings)
    assert all(p in said for p in ("'etc/shadow'", "'dev/dri/renderD128'", "'etc/tpm'"))
    assert ET.fromstring(restored.text).find("./devices/tpm") is None


@pytest.mark.parametrize("tag", ["name", "uuid", "os", "devices"])
def test_an_element_a_domain_holds_once_given_twice_is_refused(tmp_path: Path, tag: str) -> None:
    """Found by a campaign: a second <os> held the <nvram> the first was searched for (a
    ValueError's traceback); one <os> read and another rewritten is no domain to define."""
    inner = "<nvram>/var/lib/libvirt/qemu/nvram/w_VARS.fd</nvram>" if tag == "os" else ""
    once = "<name>w</name><uuid>0b0a3d7c-2a0e-4d54-8a43-7b4ab2d7c001</uuid><os/><devices/>"
    xml = f"<domain type='kvm'>{once}<{tag}>{inner}</{tag}></domain>"
    with pytest.raises(ConfigError, match=f"2 <{tag}> elements"):
        domain_for({}, xml.encode(), {}, {}, str(tmp_path / "out"))


def test_an_ordinary_domain_loses_nothing(tmp_path: Path) -> None:
    text, warnings, ours = restored_domain(tmp_path, ORDINARY)
    assert [w for w in warnings if "emulated TPM" not in w] == []
    dom = ET.fromstring(text)
    assert dom.find("./os/loader").text == "/usr/share/OVMF/OVMF_CODE_4M.fd"  # type: ignore[union-attr]
    assert set(host_references(text)) == ours | {"/usr/share/OVMF/OVMF_CODE_4M.fd", "/dev/urandom"}
    assert [d.tag for d in dom.find("devices")] == [  # type: ignore[union-attr]
        "disk", "disk", "controller", "interface", "serial", "console", "channel", "input", "graphics", "video",
        "tpm", "rng", "memballoon",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["lxc", "xen", ""])
def test_only_kvm_and_qemu_domains_are_restored(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ConfigError, match="kvm and qemu"):
        restored_domain(tmp_path, ORDINARY.replace("type='qemu'", f"type='{kind}'", 1))


@pytest.mark.integration
def test_libvirt_defines_what_a_hostile_domain_became(libvirtd: Libvirtd, tmp_path: Path) -> None:
    text, _warnings, ours = restored_domain(tmp_path, HOSTILE)
    dom = libvirtd.conn.defineXML(text)
    try:
        defined = dom.XMLDesc(0)
    finally:
        dom.undefineFlags(4)  # VIR_DOMAIN_UNDEFINE_KEEP_NVRAM: the file is the restore's
    # libvirt adds its own emulator; nothing the snapshot named
    assert {p for p in host_references(defined) if not p.startswith("/usr/bin/qemu-system-")} <= ours | {"/dev/urandom"}


def test_a_connection_the_snapshot_names_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = tmp_path / "transport.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(stat.S_IRWXU)
    target = tmp_path / "restore"
    target.mkdir()
    xml = target / "domain.xml"
    xml.write_text(ORDINARY)
    disk = target / "vda.qcow2"
    disk.write_bytes(b"")
    for uri in (f"qemu+ext:///system?command={script}", "qemu+ssh://attacker.example/system"):
        restored = RestoredVm(
            kind="libvirt",
            vm={"name": "web02", "uri": uri},
            folder=str(target),
            disks={"vda": str(disk)},
            formats={"vda": "qcow2"},
            files={"domain.xml": str(xml)},
            register=Registration(),
        )
        with pytest.raises(ConfigError, match="--libvirt-uri"):
            after_restore(restored)
        assert not marker.exists()
        os.unlink(target / "web02.xml")


# -- the QEMU connector's run script -----------------------------------------------------------

FIRMWARE = "/usr/share/OVMF/OVMF_CODE.fd"

HOSTILE_CMDLINE = [
    "/bin/sh",
    "-machine", "q35,dumpdtb=/etc/motd", "-m", "64", "-name", "guest=web,debug-threads=on",
    "-uuid", "0b0a3d7c-2a0e-4d54-8a43-7b4ab2d7c001",
    "-kernel", "/boot/vmlinuz", "-initrd", "/etc/shadow", "-append", "console=ttyS0",
    "-fw_cfg", "name=opt/x,file=/etc/shadow", "-D", "/etc/passwd", "-s", "/etc/shadow",
    "-virtfs", "local,path=/,mount_tag=host,security_model=none",
    "-blockdev", '{"driver":"file","filename":"/vm/web.qcow2","node-name":"f0"}',
    "-blockdev", '{"driver":"qcow2","file":"f0","node-name":"disk0"}',
    "-device", "virtio-blk-pci,drive=disk0,id=vda",
    "-blockdev", '{"driver":"host_device","filename":"/dev/sda","node-name":"h0"}',
    "-device", "virtio-blk-pci,drive=h0,id=vdb",
    "-blockdev", "driver=file,filename=/etc/shadow,node-name=x0",
    "-blockdev", "driver=raw,file=x0,node-name=x1",
    "-device", "virtio-blk-pci,drive=x1,id=vdc",
    "-blockdev", '{"driver":"vvfat","dir":"/","node-name":"v0"}',
    "-drive", "file=/etc/shadow,if=none,id=d0,format=raw",
    "-device", "ide-cd,drive=d0,id=cd0",
    "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/../../../etc/shadow",
    "-blockdev", '{"driver":"file","filename":"/usr/share/OVMF/../../etc/shadow","read-only":true,"node-name":"p0"}',
    "-blockdev", f'{{"driver":"file","filename":"{FIRMWARE}","read-only":true,"node-name":"p1"}}',
    "-blockdev", "driver=raw,file=p1,node-name=p2,read-only=on",
    "-machine", "pflash0=p2",
    "-device", "loader,file=/etc/shadow,addr=0x100000",
    "-device", "vfio-pci,host=00:1f.2",
    "-netdev", "user,id=n0,smb=/,guestfwd=tcp:10.0.2.100:1234-cmd:/bin/sh,tftp=/,bootfile=/etc/shadow",
    "-device", "e1000,netdev=n0,id=nic0,romfile=/etc/shadow",
    "-netdev", "stream,id=n1,addr.type=unix,addr.path=/run/evil.sock",
    "-device", "virtio-net-pci,netdev=n1,id=nic1",
    "-global", "e1000.romfile=/etc/shadow",
    "-object", "memory-backend-file,id=m0,mem-path=/etc/shadow,size=64M",
    "-object", "rng-random,id=r0,filename=/etc/shadow",
    "-device", "virtio-rng-pci,rng=r0",
    "-object", "rng-random,id=r1,filename=/dev/urandom",
    "-device", "virtio-rng-pci,rng=r1",
    "-chardev", "file,id=c0,path=/root/.bashrc",
    "-serial", "chardev:c0",
    "-chardev", "socket,id=mon,path=/etc/shadow,server=on,wait=off,logfile=/etc/issue",
    "-mon", "chardev=mon,mode=control",
    "-qmp", "unix:/etc/passwd,server=on,wait=off",
    "-pidfile", "/etc/group",
    "-smbios", "file=/etc/shadow",
    "-bios", "/etc/shadow",
    "-plugin", "/tmp/evil.so",
    "-S",
]  # fmt: skip


def script_argv(script: str) -> list[str]:
    import shlex

    text = Path(script).read_text()
    # #!, a comment line, cd, umask, the command's last line
    assert text.count("\n") == text.count("\\\n") + 5
    return shlex.split(text.split("exec ", 1)[1].replace("\\\n", " "))[:-1]


def named_paths(argv: list[str]) -> set[str]:
    """Every absolute path in the command line, in any option value or JSON string."""
    import re

    return {m.group(1) for a in argv for m in re.finditer(r'(?:^|[=,:"])(/[^,"]*)', a)}


@contextlib.contextmanager
def running_script(argv: list[str], sock: Path) -> Iterator[Any]:
    """A restored VM's run script started, its QMP client once ``sock`` is there; QEMU is told
    to quit when the block ends (killed if it does not go)."""
    from vmvault.hypervisors._qmp import QmpClient

    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        with QmpClient(str(sock), timeout=10).connect() as qmp:
            yield qmp
            qmp.execute("quit")
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_a_hostile_qemu_command_line_keeps_no_host_reference_and_runs(tmp_path: Path) -> None:
    import json

    from vmvault.hypervisors.qemu_restore import write_restore_files

    if not Path(FIRMWARE).is_file():
        pytest.skip(f"{FIRMWARE} is missing (Debian package ovmf)")
    disk = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    record = {
        "name": "web\n; rm -rf ~",
        "uuid": "x)\nrm -rf ~\n#",
        "disks": [{"device": "vda", "node": "disk0", "format": "qcow2", "file": "/vm/web.qcow2"}],
        # a MAC QEMU picked is pinned on the card's option: this one would add options after it
        "nics": [{"id": "nic0", "model": "e1000", "mac": "52:54:00:12:34:56,romfile=/etc/shadow"}],
        "cmdline": HOSTILE_CMDLINE,
    }
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="control character"):
        write_restore_files(record, {"vda": str(disk)}, str(out), formats={"vda": "qcow2"})
    record["name"] = "web"
    rv = write_restore_files(record, {"vda": str(disk)}, str(out), formats={"vda": "qcow2"})
    argv = script_argv(rv.script)
    assert argv[0].endswith("/qemu-system-x86_64") and argv[0] != "/bin/sh"
    assert rv.uuid != record["uuid"] and argv[argv.index("-uuid") + 1] == rv.uuid
    paths = named_paths(argv[1:])
    assert {p for p in paths if not p.startswith(str(out))} == {str(disk), FIRMWARE, "/dev/urandom"}
    assert "/etc/shadow" not in Path(rv.xml).read_text() and "the recorded MAC is not one" in "\n".join(rv.warnings)
    said = "\n".join(rv.warnings)
    for named in ("-initrd", "-virtfs", "loader", "vfio-pci", "smb=", "guestfwd=", "romfile=", "host_device",
                  "vvfat", "mem-path", "'/bin/sh'", "-plugin", "'-s'", "/etc/shadow"):  # fmt: skip
        assert named in said, named
    # what is left is a command line QEMU runs: nothing refers to an option that was left out
    sock = out / "passwd"  # the -qmp socket, moved into the output folder under its own name
    with running_script([rv.script, "-display", "none", "-nodefaults"], sock) as qmp:
        assert qmp.execute("query-uuid")["UUID"] == rv.uuid
        opened = {b["inserted"]["file"] for b in qmp.execute("query-block") if b.get("inserted")}
        assert opened == {str(disk), FIRMWARE}
    assert json.loads(json.dumps(rv.warnings))  # plain text lines


@pytest.mark.integration
def test_a_restored_raw_disk_is_never_read_as_another_format(tmp_path: Path) -> None:
    """The guest wrote a qcow2 header, with a backing file on the host, into its raw disk: QEMU
    must open the restored file as raw, never probe it or keep a recorded qcow2 driver on it."""
    from vmvault.hypervisors.qemu_restore import write_restore_files

    header = tmp_path / "header.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(header), "16M"], check=True
    )
    disks = {}
    for dev in ("vda", "vdb"):
        disks[dev] = str(tmp_path / f"{dev}.raw")
        with open(disks[dev], "wb") as f:
            f.write(header.read_bytes())
            f.truncate(16 << 20)
    record = {
        "name": "web",
        "uuid": "0b0a3d7c-2a0e-4d54-8a43-7b4ab2d7c001",
        "disks": [
            {"device": "vda", "node": "d0", "format": "qcow2", "file": "/vm/a.qcow2"},
            {"device": "vdb", "node": "top1", "format": "qcow2", "file": "/vm/b.qcow2"},
        ],
        "nics": [],
        "cmdline": [
            "qemu-system-x86_64", "-machine", "q35", "-m", "64", "-S", "-nodefaults", "-display", "none",
            "-drive", "file=/vm/a.qcow2,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0,id=vda",
            "-blockdev", '{"driver":"file","filename":"/vm/b.qcow2","node-name":"f1"}',
            "-blockdev", '{"driver":"qcow2","file":"f1","node-name":"q1"}',
            "-blockdev", '{"driver":"copy-on-read","file":"q1","node-name":"top1"}',
            "-device", "virtio-blk-pci,drive=top1,id=vdb",
            "-qmp", "unix:/run/web/qmp.sock,server=on,wait=off",
        ],
    }  # fmt: skip
    out = tmp_path / "out"
    rv = write_restore_files(record, disks, str(out), formats={"vda": "raw", "vdb": "raw"})
    with running_script([rv.script], out / "qmp.sock") as qmp:
        nodes = qmp.execute("query-named-block-nodes")
    assert not [n for n in nodes if n.get("backing_file") or n["image"].get("backing-filename")]
    formats = {n["node-name"]: n["drv"] for n in nodes if n.get("file") in disks.values()}
    assert "qcow2" not in formats.values() and "raw" in formats.values(), formats


@pytest.mark.integration
def test_define_registers_what_was_written_not_what_the_target_holds_later(libvirtd: Libvirtd, tmp_path: Path) -> None:
    """The restore target may be written by others: the definition vmvault checked is the one it
    registers, even when the file beside the disks was swapped for another since."""
    from vmvault.hypervisors.libvirt_restore import define_domain

    disk = tmp_path / "vda.qcow2"
    disk.write_bytes(b"")
    xml = ORDINARY.replace("web02", "swapped").replace("<tpm model='tpm-crb'>", "<!-- ").replace("</tpm>", " -->")
    restored = domain_for({}, xml.encode(), {"vda": (str(disk), "qcow2")}, {}, str(tmp_path))
    Path(restored.xml).write_text(HOSTILE.replace("web01", "swapped").replace("7d1bd5bd", "0b0a3d7c"))
    define_domain(restored, libvirtd.uri)
    dom = libvirtd.conn.lookupByName("swapped")
    try:
        defined = dom.XMLDesc(0)
    finally:
        dom.undefineFlags(4)
    assert "/etc/shadow" not in defined and "qemu:commandline" not in defined


def test_a_restored_domain_xml_that_became_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "restore"
    target.mkdir()
    (target / "domain.xml").symlink_to("/etc/libvirt/qemu/some-other-domain.xml")
    restored = RestoredVm(
        kind="libvirt",
        vm={"name": "web02"},
        folder=str(target),
        disks={},
        formats={},
        files={"domain.xml": str(target / "domain.xml")},
    )
    with pytest.raises(ConfigError, match=r"domain\.xml cannot be read"):
        after_restore(restored)


_TAGS = [
    "disk",
    "source",
    "target",
    "interface",
    "serial",
    "channel",
    "graphics",
    "listen",
    "os",
    "loader",
    "kernel",
    "nvram",
    "rng",
    "backend",
    "tpm",
    "memory",
    "path",
    "sysinfo",
    "entry",
    "video",
    "model",
    "controller",
    "hostdev",
    "filesystem",
    "log",
    "rom",
    "script",
    "audio",
    "input",
    "blkiotune",
    "device",
    "newthing",
    "metadata",
    "smbios",
    "emulator",
]
_ATTRS = [
    "file",
    "dev",
    "path",
    "dir",
    "socket",
    "type",
    "address",
    "listen",
    "name",
    "template",
    "device",
    "model",
    "rendernode",
    "evdev",
    "mode",
    "x",
]
_VALUES = [
    *("/etc/shadow", "/dev/sda", "/usr/share/OVMF/../../etc/shadow", "/usr/share/OVMF/OVMF_CODE.fd", "/dev/urandom"),
    *("vda", "file", "unix", "pty", "network", "user", "0.0.0.0", "cdrom", "random", ""),
    *("etc/shadow", "../etc/shadow", "dev/dri/renderD128"),
]


def _elements() -> st.SearchStrategy[ET.Element]:
    def build(tag: str, attrs: dict[str, str], text: str | None, children: list[ET.Element]) -> ET.Element:
        el = ET.Element(tag, attrs)
        el.text = text
        el.extend(children)
        return el

    leaf = st.builds(
        build,
        st.sampled_from(_TAGS),
        st.dictionaries(st.sampled_from(_ATTRS), st.sampled_from(_VALUES), max_size=3),
        st.none() | st.sampled_from(_VALUES),
        st.just([]),
    )
    return st.recursive(
        leaf,
        lambda inner: st.builds(
            build,
            st.sampled_from(_TAGS),
            st.dictionaries(st.sampled_from(_ATTRS), st.sampled_from(_VALUES), max_size=3),
            st.none() | st.sampled_from(_VALUES),
            st.lists(inner, max_size=4),
        ),
        max_leaves=20,
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(top=st.lists(_elements(), max_size=4), devices=st.lists(_elements(), max_size=6))
def test_random_domains_keep_no_host_reference(
    tmp_path: Path, top: list[ET.Element], devices: list[ET.Element]
) -> None:
    """Whatever elements, attributes and paths a stored domain holds, the restored one names no
    absolute path but the restored files, installed firmware as the loader, and /dev/urandom."""
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = "random"
    dom.extend(top)
    ET.SubElement(dom, "devices").extend(devices)
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    disk = str(tmp_path / "vda.qcow2")
    try:
        restored = domain_for({}, ET.tostring(dom), {"vda": (disk, "qcow2")}, {}, str(out))
    except ConfigError:
        return  # refused as a whole (no <devices>, two of them, ...)
    assert not relative_references(restored.text)
    named = set(host_references(restored.text)) - {disk, "/dev/urandom"}
    assert named <= {"/usr/share/OVMF/OVMF_CODE.fd"}  # as a loader: installed firmware, read-only
    assert not named or {(el.text or "").strip() for el in ET.fromstring(restored.text).iter("loader")} >= named


_OPTIONS = ["-device", "-netdev", "-nic", "-chardev", "-object", "-machine", "-global", "-drive", "-blockdev",
            "-display", "-boot", "-smbios", "-audiodev", "-tpmdev", "-serial", "-qmp", "-vnc", "-name", "-numa",
            "-kernel", "-fsdev", "-add-fd", "-bios", "-pidfile", "-parallel", "-monitor", "-qmp-pretty",
            "-mon"]  # fmt: skip
_KINDS = ["virtio-blk-pci", "e1000", "usb-mtp", "u2f-passthru", "file", "socket", "user", "tap", "qcow2", "raw",
          "memory-backend-file", "rng-random", "loader", "vfio-pci", "none", "pa", "wav", "emulator",
          "unix:/x/y", "tcp:localhost:4444", "vc:80Cx24C", "file:/etc/shadow", "dbus"]  # fmt: skip
_KEYS = ["id", "node-name", "drive", "netdev", "chardev", "file", "filename", "path", "romfile", "rootdir", "hidraw",
         "script", "smb", "mem-path", "server", "model", "x", "backing", "format", "if", "readonly", "net",
         "logfile", "property", "value", "addr", "x509", "file.filename", "backing.file.filename"]  # fmt: skip
#: paths as they are, after a prefix (a D-Bus address, a json: filename) and climbing out with ..
_PATHS = ["/etc/shadow", "../etc/shadow", "./x", "~/.ssh/id_ed25519", "/vm/web.qcow2", FIRMWARE, "/dev/urandom",
          "unix:path=/run/dbus/system_bus_socket", 'json:{"filename":"/etc/shadow"}', "a/../../etc/shadow",
          "[/etc/shadow]"]  # fmt: skip
_WORDS = ["n0", "d0", "f0", "on", "off", "10.0.2.0/24", "pflash", "virtio"]


def _option_values() -> st.SearchStrategy[str]:
    pair = st.tuples(st.sampled_from(_KEYS), st.sampled_from(_PATHS + _WORDS)).map(lambda kv: f"{kv[0]}={kv[1]}")
    keyval = st.tuples(st.sampled_from(_KINDS), st.lists(pair, max_size=4)).map(lambda t: ",".join([t[0], *t[1]]))
    json_node = st.dictionaries(
        st.sampled_from(["driver", "filename", "file", "node-name", "backing", "dir", "read-only"]),
        st.sampled_from(_PATHS + _WORDS + ["file", "qcow2", "raw", "vvfat", "host_device"]) | st.booleans(),
        max_size=5,
    ).map(json_dumps)
    return keyval | json_node | st.sampled_from(_PATHS + _WORDS)


def json_dumps(value: object) -> str:
    import json

    return json.dumps(value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(options=st.lists(st.tuples(st.sampled_from(_OPTIONS), _option_values()), max_size=12))
# found by a run: -drive takes no JSON, and its "file" is not blockdev's node reference
@example(options=[("-drive", '{"driver": "file", "file": "/etc/shadow"}')])
@example(options=[("-blockdev", '{"driver": "qcow2", "file": "/etc/shadow"}')])
@example(options=[("-blockdev", '{"driver": "raw", "backing": "json:{\\"file.filename\\": \\"/etc/shadow\\"}"}')])
# a path after a prefix other than "kind:", or climbing out of a relative folder
@example(options=[("-display", "dbus,addr=unix:path=/run/dbus/system_bus_socket")])
@example(options=[("-device", 'virtio-blk-pci,drive=d0,x=json:{"filename":"/etc/shadow"}')])
@example(options=[("-blockdev", 'driver=file,node-name=f0,filename=/vm/web.qcow2,x=a"/etc/shadow')])
@example(options=[("-device", "virtio-net-pci,x=a/../../etc/shadow")])
# a parallel port's socket stayed where the recording put it (QEMU makes and unlinks it there)
@example(options=[("-parallel", "unix:/etc/x,server=on,wait=off")])
def test_random_command_lines_keep_no_host_reference(tmp_path: Path, options: list[tuple[str, str]]) -> None:
    """Whatever options and properties a recorded command line holds, the script names no path
    but the restored disk, installed firmware, /dev/urandom and files in its own folder."""
    import re

    from vmvault.hypervisors.qemu_restore import write_restore_files

    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    disk = str(tmp_path / "vda.raw")
    record = {
        "name": "web",
        "uuid": "0b0a3d7c-2a0e-4d54-8a43-7b4ab2d7c001",
        "disks": [{"device": "vda", "node": "d0", "format": "qcow2", "file": "/vm/web.qcow2"}],
        "nics": [],
        "cmdline": ["qemu-system-x86_64"] + [a for pair in options for a in pair],
    }
    rv = write_restore_files(record, {"vda": disk}, str(out), formats={"vda": "raw"})
    for arg in script_argv(rv.script)[1:]:
        for token in re.split(r"""[,=:;"'{}\[\]\s]+""", arg):
            assert ".." not in token.split("/"), (token, arg)
            if token.startswith(("/", "./", "../", "~")):
                assert token in (disk, FIRMWARE, "/dev/urandom") or token.startswith(f"{out}/"), (token, arg)


@pytest.mark.parametrize(
    ("option", "value", "host"),
    [
        # the property -global sets is named by property=, its value may be a bare relative path
        ("-global", "driver=virtio-net-pci,property=romfile,value=etc/shadow", "etc/shadow"),
        # a node under the disk is opened by its own driver: nbd reaches another host
        ("-drive", "file=/vm/web.qcow2,format=qcow2,file.driver=nbd,file.server.type=inet,file.server.host=10.9.9.9",
         "10.9.9.9"),
        ("-blockdev", "driver=file,node-name=f0,filename=/vm/web.qcow2,file.driver=nbd", "nbd"),
        # properties for a host folder, device or certificate folder, whatever their value looks like
        ("-device", "usb-mtp,rootdir=etc", "rootdir"),
        ("-device", "u2f-passthru,hidraw=hidraw0", "hidraw"),
        ("-vnc", ":0,x509=etc/pki,x509verify=pki", "x509"),
        # a D-Bus address names a socket after "path="
        ("-display", "dbus,addr=unix:path=/run/dbus/system_bus_socket", "system_bus_socket"),
    ],
)  # fmt: skip
def test_host_references_in_other_syntaxes_are_left_out(tmp_path: Path, option: str, value: str, host: str) -> None:
    from vmvault.hypervisors.qemu_restore import write_restore_files

    record = {
        "name": "web",
        "uuid": "0b0a3d7c-2a0e-4d54-8a43-7b4ab2d7c001",
        "disks": [{"device": "vda", "node": "d0", "format": "qcow2", "file": "/vm/web.qcow2"}],
        "nics": [],
        "cmdline": ["qemu-system-x86_64", option, value],
    }
    rv = write_restore_files(record, {"vda": str(tmp_path / "vda.raw")}, str(tmp_path / "out"), formats={"vda": "raw"})
    assert host not in " ".join(script_argv(rv.script))
    assert any(w.startswith(f"{option} ") for w in rv.warnings)  # said


PORT_FORWARD = ORDINARY.replace(
    "<interface type='network'>\n      <mac address='52:54:00:aa:bb:cc'/><source network='default'/>",
    "<interface type='user'>\n      <mac address='52:54:00:aa:bb:cc'/><backend type='passt'/>"
    "<portForward proto='tcp' address='0.0.0.0'><range start='2222' to='22'/></portForward>"
    "<portForward proto='udp'><range start='5353' end='5360' to='53'/></portForward>",
).replace("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>", "")  # (no swtpm in the tests)


@pytest.mark.parametrize("clone", [None, "web02-clone"])
def test_a_port_forward_of_a_user_interface_is_left_out(tmp_path: Path, clone: str | None) -> None:
    """passt's forwards listen on every host address (and clash beside the original); without
    <backend> (a host program, left out) libvirt uses slirp, which takes no <portForward>."""
    assert PORT_FORWARD != ORDINARY
    text, warnings, _ours = restored_domain(tmp_path, PORT_FORWARD, **({"as_clone": clone} if clone else {}))
    iface = ET.fromstring(text).find("./devices/interface")
    assert iface is not None and iface.get("type") == "user"
    assert iface.find("portForward") is None and iface.find("backend") is None
    assert len([w for w in warnings if "<portForward>" in w]) == 2


@pytest.mark.integration
def test_libvirt_defines_a_user_interface_that_had_port_forwards(libvirtd: Libvirtd, tmp_path: Path) -> None:
    text, _warnings, _ours = restored_domain(tmp_path, PORT_FORWARD)
    dom = libvirtd.conn.defineXML(text)
    try:
        defined = dom.XMLDesc(0)
    finally:
        dom.undefineFlags(4)
    assert "portForward" not in defined and "<interface type='user'>" in defined


def test_a_domain_is_not_defined_from_a_folder_others_can_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``restore --define --start`` into a folder another account may write: libvirtd chowns
    each restored disk to QEMU's user by its name and QEMU opens it by name, so a disk swapped
    for a link to a host file between the restore and the start would have been given to QEMU
    (and written by the guest). Nothing is defined from such a folder; from a sticky one (only
    the owner may rename what it holds) and from a private one it is."""
    if os.geteuid() != 0:
        pytest.skip("the check compares owners with root's and this user's ids")
    from vmvault.hypervisors import libvirt_restore

    defined: list[str] = []
    monkeypatch.setattr(libvirt_restore, "define_domain", lambda domain, uri, start: defined.append(domain.name))
    shared = tmp_path / "shared"
    shared.mkdir()
    vm = RestoredVm("libvirt", {"name": "web01"}, str(shared), {}, {}, {}, register=Registration(start=True))
    domain = libvirt_restore.RestoredDomain("web01", "6b0c6f4e-6d1e-4a4b-9a51-3f7c1c7c0a02", str(shared / "web01.xml"))
    for mode, ok in ((0o777, False), (0o775, False), (0o1777, True), (0o700, True)):
        shared.chmod(mode)
        if ok:
            libvirt_restore._register(domain, vm)
        else:
            with pytest.raises(ConfigError, match=rf"{shared} is writable by other users .*nothing was defined"):
                libvirt_restore._register(domain, vm)
    assert defined == ["web01", "web01"]
    shared.chmod(0o700)
    os.chown(shared, 4242, 4242)
    with pytest.raises(ConfigError, match="belongs to user id 4242"):
        libvirt_restore._register(domain, vm)

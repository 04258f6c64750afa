"""Rebuild a backed-up QEMU VM from its restored disks: a runnable script and a libvirt domain.

The QEMU connector records the VM's facts in the snapshot (``BackupSession.vm``): name,
UUID, machine type, memory, CPUs, disks (device id, node, format, file, model), network
cards with their MAC addresses, and, when the QMP peer's PID was known, the exact QEMU
command line. ``write_restore_files`` turns that into

* ``run-<name>.sh``: the QEMU command line with the disk paths pointing at the restored
  files (extra arguments given to the script are appended);
* ``<name>.xml``: a libvirt domain (``virsh define``) with the same disks and cards.

With ``as_clone=NAME`` the restored VM gets a new identity so that it can run beside the
original: new name, new UUID, new MAC addresses, new disk paths (the restored files), and
its own QMP/monitor/chardev sockets, pid file and VNC display in the output folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import sys
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmvault.errors import ConfigError, VmvaultError

__all__ = ["RestoredVM", "new_mac", "write_restore_files"]

#: QEMU options that take no argument (qemu-options.hx); every other option takes one
_FLAGS = frozenset(
    [
        "-S",
        "-nodefaults",
        "-no-user-config",
        "-daemonize",
        "-enable-kvm",
        "-no-reboot",
        "-no-shutdown",
        "-snapshot",
        "-nographic",
        "-no-hpet",
        "-full-screen",
        "-no-acpi",
        "-no-fd-bootchk",
        "-old-param",
        "-only-migratable",
        "-preconfig",
        "-enable-fips",
        "-win2k-hack",
        "-no-quit",
        "-alt-grab",
        "-ctrl-grab",
        "-s",
        "-h",
        "-version",
    ]
)
_NIC_MODELS = ("virtio-net", "e1000", "rtl8139", "vmxnet3", "ne2k", "pcnet", "i82551", "i82557", "i82559", "igb")
_DISK_NAME = re.compile(r"(vd|sd|hd|xvd)[a-z]+")


@dataclass
class RestoredVM:
    """What was written, and the identity the restored VM has."""

    name: str
    uuid: str
    argv: list[str]
    script: str
    xml: str
    #: NIC device id -> MAC address
    macs: dict[str, str] = field(default_factory=dict)
    #: the QMP socket of the restored VM, if its command line has one
    qmp_socket: str | None = None


def new_mac() -> str:
    """A random MAC in QEMU's locally administered range 52:54:00:xx:xx:xx."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


# -- QEMU's "keyval" option syntax: key=value pairs split by commas, ",," is a literal comma ----
def _split_keyval(text: str) -> list[str]:
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "," and text[i + 1 : i + 2] == ",":
            cur += ",,"
            i += 2
            continue
        if ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


def _esc(value: str) -> str:
    return value.replace(",", ",,")


def _unesc(value: str) -> str:
    return value.replace(",,", ",")


class _Rewriter:
    def __init__(
        self,
        vm: Mapping[str, Any],
        disks: Mapping[str, str],
        formats: Mapping[str, str],
        out_dir: str,
        clone: bool,
        name: str,
        uuid: str,
    ) -> None:
        self.clone = clone
        self.name = name
        self.uuid = uuid
        self.out_dir = out_dir
        recorded = {d["device"]: d for d in vm.get("disks", [])}
        self.path_map = {str(recorded[dev]["file"]): path for dev, path in disks.items() if dev in recorded}
        self.format_by_node = {str(recorded[dev]["node"]): fmt for dev, fmt in formats.items() if dev in recorded}
        self.macs: dict[str, str] = {}
        self.recorded_macs = {str(n["id"]): str(n["mac"]) for n in vm.get("nics", [])}
        self.qmp_socket: str | None = None
        self._nic_count = 0

    def _moved(self, path: str) -> str:
        """A socket/pid path of the clone: the same file name, in the output folder."""
        return os.path.join(self.out_dir, os.path.basename(path)) if self.clone else path

    def _nic_mac(self, nic_id: str) -> str:
        mac = new_mac()
        self.macs[nic_id or f"nic{self._nic_count}"] = mac
        self._nic_count += 1
        return mac

    def option(self, opt: str, value: str) -> list[str]:
        """The rewritten ``[opt, value]`` (or nothing, to drop the option)."""
        if opt == "-incoming":
            return []  # a restored VM starts from its disks, not from a migration stream
        if opt == "-name" and self.clone:
            parts = _split_keyval(value)
            if parts and "=" not in parts[0]:
                parts[0] = _esc(self.name)
            else:
                parts = [p if not p.startswith("guest=") else f"guest={_esc(self.name)}" for p in parts]
            return [opt, ",".join(parts)]
        if opt == "-uuid":
            return [opt, self.uuid]
        if opt == "-blockdev":
            return [opt, self._blockdev(value)]
        if opt == "-drive":
            return [opt, self._keyval_disk(value, file_key="file", format_key="format")]
        if opt in ("-device", "-nic") or (opt == "-net" and value.startswith("nic")):
            return [opt, self._nic(opt, value)]
        if opt in ("-qmp", "-monitor", "-serial", "-qmp-pretty") and value.startswith("unix:"):
            parts = _split_keyval(value[5:])
            parts[0] = _esc(self._moved(_unesc(parts[0])))
            if opt.startswith("-qmp") and self.qmp_socket is None:
                self.qmp_socket = _unesc(parts[0])
            return [opt, "unix:" + ",".join(parts)]
        if opt == "-chardev":
            parts = _split_keyval(value)
            parts = [f"path={_esc(self._moved(_unesc(p[5:])))}" if p.startswith("path=") else p for p in parts]
            return [opt, ",".join(parts)]
        if opt == "-pidfile":
            return [opt, self._moved(value)]
        if opt == "-vnc" and self.clone and value != "none":
            return [opt, f"unix:{_esc(os.path.join(self.out_dir, 'vnc.sock'))}"]
        return [opt, value]

    def _blockdev(self, value: str) -> str:
        if value.lstrip().startswith("{"):
            spec = json.loads(value)
            self._json_node(spec)
            return json.dumps(spec, separators=(",", ":"))
        return self._keyval_disk(value, file_key="filename", format_key="driver")

    def _json_node(self, spec: dict[str, Any]) -> None:
        if spec.get("filename") in self.path_map:
            spec["filename"] = self.path_map[spec["filename"]]
        if spec.get("node-name") in self.format_by_node:
            spec["driver"] = self.format_by_node[spec["node-name"]]
        for child in spec.values():
            if isinstance(child, dict):
                self._json_node(child)

    def _keyval_disk(self, value: str, *, file_key: str, format_key: str) -> str:
        parts = _split_keyval(value)
        keys = dict(p.split("=", 1) for p in parts if "=" in p)
        node = keys.get("node-name") or keys.get("id")
        out = []
        for p in parts:
            key, _, val = p.partition("=")
            if key == file_key and _unesc(val) in self.path_map:
                p = f"{key}={_esc(self.path_map[_unesc(val)])}"
            elif key == format_key and node in self.format_by_node and val in ("raw", "qcow2", "vhdx", "vpc"):
                p = f"{key}={self.format_by_node[node]}"
            out.append(p)
        return ",".join(out)

    def _nic(self, opt: str, value: str) -> str:
        parts = _split_keyval(value)
        keys = dict(p.split("=", 1) for p in parts if "=" in p)
        driver = parts[0] if parts and "=" not in parts[0] else keys.get("driver", "")
        is_nic = opt in ("-nic", "-net") or driver.startswith(_NIC_MODELS) or "mac" in keys
        if not is_nic:
            return value
        nic_id = keys.get("id", "")
        if self.clone:
            mac = self._nic_mac(nic_id)
        elif "mac" not in keys and nic_id in self.recorded_macs:
            mac = self.recorded_macs[nic_id]  # QEMU picked it; pin it so the restore keeps its identity
        else:
            return value
        parts = [p for p in parts if not p.startswith("mac=")]
        return ",".join([*parts, f"mac={mac}"])


def _split_argv(argv: list[str]) -> tuple[str, list[tuple[str, str | None]]]:
    if not argv:
        raise ConfigError("the recorded QEMU command line is empty")
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        opt = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        if not arg.startswith("-") or opt in _FLAGS or i + 1 >= len(argv):
            out.append((opt if arg.startswith("-") else arg, None))
            i += 1
        else:
            out.append((opt, argv[i + 1]))
            i += 2
    return argv[0], out


def _synthesized_argv(vm: Mapping[str, Any], emulator: str) -> list[str]:
    """A command line from the recorded facts, when the original one was not recorded."""
    argv = [emulator, "-accel", "kvm", "-accel", "tcg"]
    if vm.get("machine"):
        argv += ["-machine", str(vm["machine"])]
    argv += ["-m", f"{max(1, int(vm.get('memory', 1 << 30)) // (1 << 20))}M", "-smp", str(vm.get("cpus", 1))]
    argv += ["-name", str(vm.get("name") or "restored"), "-uuid", str(vm.get("uuid") or uuidlib.uuid4())]
    for d in vm.get("disks", []):
        node = str(d["node"])
        argv += [
            "-blockdev",
            f"driver=file,filename={_esc(str(d['file']))},node-name={node}-file",
            "-blockdev",
            f"driver={d['format']},file={node}-file,node-name={node}",
            "-device",
            f"{d.get('model') or 'virtio-blk-pci'},drive={node},id={d['device']}",
        ]
    for i, nic in enumerate(vm.get("nics", [])):
        argv += [
            "-netdev",
            f"user,id=net{i}",
            "-device",
            f"{nic['model']},netdev=net{i},id={nic['id']},mac={nic['mac']}",
        ]
    return argv


def _domain_xml(
    vm: Mapping[str, Any], name: str, uuid: str, disks: list[dict[str, str]], nics: list[dict[str, str]], emulator: str
) -> str:
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory", unit="KiB").text = str(int(vm.get("memory", 1 << 30)) // 1024)
    ET.SubElement(dom, "vcpu").text = str(vm.get("cpus", 1))
    os_el = ET.SubElement(dom, "os")
    type_attrs = {"arch": "x86_64"}
    if vm.get("machine"):
        type_attrs["machine"] = str(vm["machine"])
    ET.SubElement(os_el, "type", type_attrs).text = "hvm"
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = emulator
    used: set[str] = set()
    for d in disks:
        model = d.get("model", "")
        bus = "virtio" if model.startswith("virtio") else "scsi" if model.startswith("scsi") else "sata"
        prefix = {"virtio": "vd", "scsi": "sd", "sata": "sd"}[bus]
        dev = d["device"] if _DISK_NAME.fullmatch(d["device"]) else ""
        if not dev or dev in used:
            dev = next(f"{prefix}{c}" for c in "abcdefghijklmnopqrstuvwxyz" if f"{prefix}{c}" not in used)
        used.add(dev)
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=d["format"])
        ET.SubElement(disk, "source", file=d["file"])
        ET.SubElement(disk, "target", dev=dev, bus=bus)
        ET.SubElement(disk, "alias", name=f"ua-{d['device']}")
    for nic in nics:
        iface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(iface, "mac", address=nic["mac"])
        ET.SubElement(iface, "source", network="default")
        model = nic.get("model", "")
        ET.SubElement(iface, "model", type="virtio" if model.startswith("virtio") else model or "virtio")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def write_restore_files(
    vm: Mapping[str, Any],
    disks: Mapping[str, str],
    out_dir: str,
    *,
    as_clone: str | None = None,
    formats: Mapping[str, str] | None = None,
    emulator: str = "/usr/bin/qemu-system-x86_64",
) -> RestoredVM:
    """Write ``run-<name>.sh`` and ``<name>.xml`` into ``out_dir`` for the restored ``disks``.

    ``vm`` is the snapshot's ``vm`` record; ``disks`` maps each recorded device id to its
    restored file; ``formats`` gives a restored file's format where it differs from the
    recorded one. ``as_clone`` gives the VM a new name, UUID and MAC addresses.
    """
    recorded = [d["device"] for d in vm.get("disks", [])]
    missing = [dev for dev in recorded if dev not in disks]
    if missing:
        raise ConfigError(f"no restored file given for disk {', '.join(missing)} of VM {vm.get('name')!r}")
    unknown = [dev for dev in disks if dev not in recorded]
    if unknown:
        raise ConfigError(f"VM {vm.get('name')!r} has no disk {', '.join(unknown)} (it has {', '.join(recorded)})")
    formats = dict(formats or {})
    clone = as_clone is not None
    name = as_clone if as_clone is not None else str(vm.get("name") or "restored")
    uuid = str(uuidlib.uuid4()) if clone else str(vm.get("uuid") or uuidlib.uuid4())
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)

    rw = _Rewriter(vm, disks, formats, out_dir, clone, name, uuid)
    cmdline = list(vm.get("cmdline") or [])
    base = cmdline if cmdline else _synthesized_argv(vm, emulator)
    program, options = _split_argv(base)
    argv = [program]
    saw_uuid = False
    for opt, value in options:
        if value is None:
            argv.append(opt)
            continue
        saw_uuid = saw_uuid or opt == "-uuid"
        argv += rw.option(opt, value)
    if clone and not saw_uuid:
        argv += ["-uuid", uuid]

    nics = [dict(n) for n in vm.get("nics", [])]
    if clone:
        for n in nics:
            n["mac"] = rw.macs.get(n["id"]) or rw._nic_mac(n["id"])
    macs = {n["id"]: n["mac"] for n in nics} | rw.macs

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    script = os.path.join(out_dir, f"run-{safe}.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\n")
        f.write(f"# {'Clone' if clone else 'Restore'} of QEMU VM {vm.get('name')!r} ({vm.get('uuid')})\n")
        f.write("exec " + " \\\n    ".join(shlex.quote(a) for a in argv) + ' \\\n    "$@"\n')
    os.chmod(script, 0o755)
    disk_facts = [
        {
            "device": str(d["device"]),
            "model": str(d.get("model", "")),
            "format": formats.get(d["device"], str(d["format"])),
            "file": os.path.abspath(disks[d["device"]]),
        }
        for d in vm.get("disks", [])
    ]
    xml_path = os.path.join(out_dir, f"{safe}.xml")
    with open(xml_path, "w", encoding="utf-8") as f:
        f.write(_domain_xml(vm, name, uuid, disk_facts, nics, emulator))
    return RestoredVM(name, uuid, argv, script, xml_path, macs, rw.qmp_socket)


def main(argv: list[str] | None = None) -> int:
    """``python -m vmvault.hypervisors.qemu_restore --vm VM.json --disk vda=PATH [--as-clone NAME] OUT``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vmvault.hypervisors.qemu_restore",
        description="Write a QEMU script and a libvirt domain for restored disks of a QEMU VM.",
    )
    parser.add_argument("--vm", required=True, help="the snapshot's VM record (JSON file)")
    parser.add_argument("--disk", action="append", default=[], metavar="DEVICE=PATH", help="a restored disk")
    parser.add_argument("--format", action="append", default=[], metavar="DEVICE=FORMAT", help="its format")
    parser.add_argument("--as-clone", metavar="NAME", help="new name, UUID and MAC addresses")
    parser.add_argument("out", help="folder for the script and the XML")
    args = parser.parse_args(argv)

    def pairs(items: list[str], what: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"--{what} wants DEVICE=VALUE, not {item!r}")
            out[key] = value
        return out

    try:
        try:
            with open(args.vm, encoding="utf-8") as f:
                vm = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the VM record: {exc}", path=args.vm) from exc
        rv = write_restore_files(
            vm, pairs(args.disk, "disk"), args.out, as_clone=args.as_clone, formats=pairs(args.format, "format")
        )
    except (VmvaultError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{rv.name} ({rv.uuid})\n  run:     {rv.script}\n  libvirt: virsh define {rv.xml}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

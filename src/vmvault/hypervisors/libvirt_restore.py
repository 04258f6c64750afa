"""A restored snapshot as a libvirt domain: the recorded domain XML rewritten, or one built.

* A snapshot of a libvirt domain holds its inactive XML (``domain.xml``). ``domain_for``
  rewrites it for the restored files: each backed-up disk becomes a plain file of the
  restored format (backing chains are gone: every restored disk is whole), the UEFI variable
  store points at the restored copy, and disks that were not backed up are dropped (a
  read-only medium such as an ISO stays). ``as_clone`` gives a new name, UUID and MAC
  addresses, and lets libvirt choose display ports, so the clone runs beside the original.
* A Hyper-V snapshot gets a domain built from its facts (``qemu_restore.domain_xml``):
  generation 1 boots with BIOS, generation 2 with UEFI (OVMF); disks on SATA and network
  cards as e1000, which Windows and Linux guests drive without extra drivers.

``define_domain`` registers the XML with libvirt, refusing a name or UUID that exists, and
optionally starts the domain. The XML is written beside the disks either way, never over an
existing file. The snapshot comes from the repository, which is not trusted: its XML is
parsed (never executed or expanded), and every path in it that vmvault writes is replaced.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmvault import platform
from vmvault.disk import disk_format
from vmvault.disk.chain import open_chain
from vmvault.errors import ConfigError, HypervisorError, VmvaultError
from vmvault.hypervisors.base import RestoredVm, RestoreNote
from vmvault.hypervisors.libvirt import connect, default_uri, error_code, error_message, import_libvirt
from vmvault.hypervisors.qemu_restore import FIRMWARE_DIRS, RNG_DEVICES, domain_xml, new_mac
from vmvault.hypervisors.qemu_restore import restore_files as qemu_restore_files

__all__ = [
    "RestoredDomain",
    "after_restore",
    "define_domain",
    "define_hyperv",
    "define_qemu",
    "domain_for",
    "has_network",
    "hyperv_domain",
]

_ERR_NO_DOMAIN = 42
_MAX_XML = 4 << 20
_NAME = re.compile(r"[^\s/][^/]{0,199}")


@dataclass
class RestoredDomain:
    name: str
    uuid: str
    xml: str  # the file written
    macs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    defined: bool = False
    started: bool = False
    #: the definition as written: what ``define_domain`` registers (never read back from the
    #: restore target, which others may write)
    text: str = field(default="", repr=False)


def _write_new(path: str, text: str) -> None:
    """Write ``text`` to a file that must not exist yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists; restore into an empty folder (nothing was overwritten)") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "domain"


def domain_for(
    vm: Mapping[str, Any],
    recorded_xml: bytes,
    disks: Mapping[str, tuple[str, str]],
    files: Mapping[str, str],
    out_dir: str,
    *,
    as_clone: str | None = None,
) -> RestoredDomain:
    """Rewrite a libvirt snapshot's domain XML for the restored ``disks`` (target -> (path,
    format)) and ``files`` (stored name -> restored path); write ``<name>.xml`` in ``out_dir``."""
    if len(recorded_xml) > _MAX_XML:
        raise ConfigError("the snapshot's domain.xml is larger than 4 MiB; not a domain definition")
    try:
        dom = ET.fromstring(recorded_xml)
    except ET.ParseError as exc:
        raise ConfigError(f"the snapshot's domain.xml is not XML: {exc}") from exc
    if dom.tag != "domain":
        raise ConfigError(f"the snapshot's domain.xml holds <{dom.tag}>, not a <domain>")
    # what a domain holds once (libvirt's schema): a second one would be read in one place and
    # rewritten in another
    for tag in ("name", "uuid", "os", "devices"):
        count = len(dom.findall(tag))
        if count > 1:
            raise ConfigError(f"the snapshot's domain.xml has {count} <{tag}> elements; a domain has one")
    out = RestoredDomain(name="", uuid="", xml="")
    name = as_clone if as_clone is not None else (dom.findtext("name") or str(vm.get("name") or ""))
    if not _NAME.fullmatch(name):
        raise ConfigError(f"invalid domain name {name!r}")
    _set_text(dom, "name", name)
    if as_clone is not None:
        uuid = str(uuidlib.uuid4())
        for tag in ("title", "description"):
            el = dom.find(tag)
            if el is not None:
                dom.remove(el)
    else:
        uuid = (dom.findtext("uuid") or "").strip() or str(vm.get("uuid") or uuidlib.uuid4())
        try:
            uuid = str(uuidlib.UUID(uuid))
        except ValueError as exc:
            raise ConfigError(f"the snapshot's domain UUID {uuid!r} is not a UUID") from exc
    _set_text(dom, "uuid", uuid)
    devices = dom.find("devices")
    if devices is None:
        raise ConfigError("the snapshot's domain.xml has no <devices>")
    for el in list(devices.findall("disk")):
        target = el.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if dev in disks:
            path, fmt = disks[dev]
            _point_disk_at(el, os.path.abspath(path), fmt)
            continue
        if el.get("device") in ("cdrom", "floppy"):
            _eject(el, dev, out)  # the drive stays, without the host file the snapshot names
            continue
        devices.remove(el)
        out.warnings.append(f"disk {dev or '?'} was not backed up and is left out of the restored domain")
    _point_nvram(dom, files, out)
    ours = {os.path.abspath(path) for path, _fmt in disks.values()}
    ours.update(os.path.abspath(p) for n, p in files.items() if n.startswith("nvram/"))
    confine(dom, ours, out.warnings)
    if as_clone is not None:
        for mac in devices.findall("./interface/mac"):
            mac.set("address", new_mac())
        for graphics in devices.findall("graphics"):
            if graphics.get("port") not in (None, "-1"):
                graphics.attrib.pop("port", None)
                graphics.set("autoport", "yes")
            graphics.attrib.pop("websocket", None)
        for sec in dom.findall("seclabel"):
            if sec.get("type") == "static":
                dom.remove(sec)  # a fixed label would be shared with the original
    out.macs = [str(m.get("address")) for m in devices.findall("./interface/mac")]
    if any(t.find("backend") is not None for t in devices.findall("tpm")):
        out.warnings.append(
            "the domain has an emulated TPM: its state is restored under tpm/ beside the disks; copy it to "
            f"/var/lib/libvirt/swtpm/{uuid}/ before the first start to keep the guest's TPM secrets"
        )
    ET.indent(dom)
    text = ET.tostring(dom, encoding="unicode") + "\n"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), f"{_safe_name(name)}.xml")
    _write_new(path, text)
    out.name, out.uuid, out.xml, out.text = name, uuid, path, text
    return out


# -- what a restored domain may reference on this host -----------------------------------------
#
# The domain XML comes from the snapshot, which the storage gives (docs/design/repository-format.md,
# section 10): it may name any host file, device or program, and libvirt would open, pass through
# or run it with its own rights when the domain is defined and started. A restored domain keeps
# only what refers to files vmvault wrote for it; everything else that reaches the host is left
# out (or made the harmless default), each with a warning.

#: attributes that name a host file, folder, socket or device
_PATH_ATTRS = frozenset(["file", "dev", "path", "dir", "socket", "rendernode", "xauth", "evdev", "template"])
#: devices that pass the host through to the guest, or share its files, memory or programs
_HOST_DEVICES = {
    "hostdev": "a host device passed through",
    "filesystem": "a host folder shared with the guest",
    "shmem": "host shared memory",
    "lease": "a host lock space",
    "smartcard": "the host's smartcard",
}
#: character devices (serial, console, channel) that stay in QEMU or reach only libvirt's own places
_SAFE_CHARDEVS = frozenset(["pty", "null", "vc", "spicevmc", "spiceport", "qemu-vdagent", "dbus"])
#: network cards whose host side is a libvirt network, a host bridge or QEMU's user-mode stack
_SAFE_INTERFACES = frozenset(["network", "bridge", "user"])
#: elements whose text is free text for people, never a path libvirt opens
_FREE_TEXT = frozenset(["metadata", "title", "description"])
#: attributes (and the text of ``<path>``) that name a host file, folder or socket
_PATH_ATTRS = frozenset(["file", "path", "dir", "socket", "rendernode", "template", "logFile"])


def confine(dom: ET.Element, ours: set[str], warnings: list[str]) -> None:
    """Leave in ``dom`` no reference to the host but the files in ``ours`` (absolute paths):
    no other file, device, socket, program, folder share, passed-through device, QEMU command
    line passthrough or security label; each thing left out is a line in ``warnings``."""
    domain_type = dom.get("type", "")
    if domain_type not in ("kvm", "qemu"):
        raise ConfigError(f"the snapshot's domain is of type {domain_type!r}; vmvault restores kvm and qemu domains")
    for parent in [dom, *dom.iter()]:
        for child in list(parent):
            if child.tag.startswith("{") and parent.tag not in _FREE_TEXT:
                parent.remove(child)  # <qemu:commandline>, <qemu:override>, ...: options straight to QEMU
                warnings.append(f"the domain's <{_local(child.tag)}> (passed straight to the hypervisor) is left out")
    for parent in [dom, *dom.iter()]:
        for sec in parent.findall("seclabel"):
            parent.remove(sec)
            if sec.get("type") not in (None, "dynamic") or sec.get("relabel") == "no":
                warnings.append(
                    f"the domain's security label (type {sec.get('type')!r}) is left out: libvirt's default applies"
                )
    for tag in ("resource", "idmap"):
        for el in dom.findall(tag):
            dom.remove(el)
    _confine_os(dom, warnings)
    for sysinfo in dom.findall("sysinfo"):
        for holder in [sysinfo, *sysinfo.iter()]:
            for entry in list(holder):
                if entry.get("file") is not None:
                    holder.remove(entry)
                    warnings.append(
                        f"the firmware entry {entry.get('name')!r} from the host file {entry.get('file')!r} is left out"
                    )
    devices = dom.find("devices")
    if devices is not None:
        _confine_devices(devices, warnings)
    # what the rules above do not know: any other absolute path leaves its device (or element) out
    for parent in [dom] if devices is None else [dom, devices]:
        for el in list(parent):
            paths = [] if el is devices else _foreign_paths(el, ours, parent.tag)
            if paths:
                parent.remove(el)
                warnings.append(f"the domain's <{el.tag}> names the host path {paths[0]!r} and is left out")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _confine_os(dom: ET.Element, warnings: list[str]) -> None:
    os_el = dom.find("os")
    if os_el is None:
        return
    for tag in ("kernel", "initrd", "dtb", "cmdline", "acpi", "shim", "init", "initarg", "initdir", "initenv"):
        for el in os_el.findall(tag):
            os_el.remove(el)
            if tag != "cmdline":
                warnings.append(f"the domain's <os><{tag}> (a host file the guest would load) is left out")
    for smbios in os_el.findall("smbios"):
        if smbios.get("mode") == "host":
            smbios.set("mode", "emulate")  # the host's own SMBIOS (serial numbers) is not the guest's
            warnings.append("the domain's SMBIOS is emulated, not copied from this host")
    loader = os_el.find("loader")
    if loader is not None and loader.text and loader.text.strip():
        path = os.path.normpath(loader.text.strip())
        if not path.startswith(FIRMWARE_DIRS):
            os_el.remove(loader)
            if loader.get("type") == "pflash" or os_el.find("nvram") is not None:
                os_el.set("firmware", "efi")  # libvirt picks OVMF
            warnings.append(f"the firmware {path!r} is not in a firmware folder of this host and is left out")
        else:
            loader.text = path


def _confine_devices(devices: ET.Element, warnings: list[str]) -> None:
    for el in list(devices):
        what = _HOST_DEVICES.get(el.tag)
        if el.tag == "emulator":
            devices.remove(el)  # libvirt runs its own QEMU for the domain's type and machine
        elif what is not None:
            devices.remove(el)
            warnings.append(f"the domain's <{el.tag}> ({what}) is left out")
        elif el.tag in ("serial", "parallel", "console", "channel"):
            _confine_chardev(el, warnings)
        elif el.tag == "interface":
            _confine_interface(el, warnings)
        elif el.tag == "graphics":
            _confine_graphics(el, warnings)
        elif el.tag == "audio" and el.get("type") not in ("none", "spice", "pulseaudio", "pipewire", "dbus"):
            for attr in [a for a in el.attrib if a != "id"]:
                el.attrib.pop(attr)
            for child in list(el):
                el.remove(child)
            el.set("type", "none")
        elif el.tag == "input" and el.get("type") in ("evdev", "passthrough"):
            devices.remove(el)
            warnings.append(f"the domain's {el.get('type')} input (a host input device) is left out")
        elif el.tag == "tpm" and any(b.get("type") == "passthrough" for b in el.findall("backend")):
            devices.remove(el)
            warnings.append("the domain's passed-through TPM (the host's TPM) is left out")
        elif el.tag == "redirdev" and el.get("type") != "spicevmc":
            devices.remove(el)
            warnings.append(f"the domain's USB redirection of type {el.get('type')!r} is left out")
        elif el.tag == "rng" and el.find("./backend[@model='egd']") is not None:
            devices.remove(el)
            warnings.append("the domain's random number source from a character device is left out")
        elif el.tag == "rng":
            for backend in el.findall("./backend[@model='random']"):
                if (backend.text or "").strip() not in ("", *RNG_DEVICES):
                    backend.text = "/dev/urandom"
        elif el.tag == "memory" and el.find("./source/path") is not None:
            devices.remove(el)
            warnings.append(f"the domain's {el.get('model')} memory backed by a host file is left out")
        for rom in el.iter("rom"):
            if rom.attrib.pop("file", None) is not None:
                warnings.append(f"the option ROM file of the domain's <{el.tag}> (a host file) is left out")


def _confine_graphics(el: ET.Element, warnings: list[str]) -> None:
    """A display on this host's loopback only: the stored XML holds no password (libvirt leaves
    secrets out), so the recorded address (``0.0.0.0``, a network's) would offer the console,
    unlocked, to whoever reaches it."""
    for node in el.iter():
        for attr in ("socket", "xauth", "rendernode", "display"):
            node.attrib.pop(attr, None)
    listens = [(el, el.get("listen"))] + [(lst, lst.get("address")) for lst in el.findall("listen")]
    wide = sorted({str(a) for _n, a in listens if a not in (None, "127.0.0.1", "::1", "localhost")})
    for listen in el.findall("listen"):
        if listen.get("type") in ("socket", "network"):
            el.remove(listen)
    unheard = any(lst.get("type") == "none" for lst in el.findall("listen"))
    if el.get("type") in ("vnc", "spice", "rdp") and not unheard:
        el.set("listen", "127.0.0.1")
        for listen in el.findall("listen"):
            el.remove(listen)
        ET.SubElement(el, "listen", type="address", address="127.0.0.1")
    if wide:
        what = f"the {el.get('type')} display"
        warnings.append(f"{what} listens on 127.0.0.1, not {', '.join(wide)} (the backup holds no password)")


def _confine_chardev(el: ET.Element, warnings: list[str]) -> None:
    for log in el.findall("log"):
        el.remove(log)  # a log file anywhere on the host
    kind = el.get("type", "pty")
    if kind in _SAFE_CHARDEVS:
        return
    target = el.find("target")
    if el.tag == "channel" and kind == "unix" and target is not None and target.get("type") == "virtio":
        for source in el.findall("source"):
            el.remove(source)  # libvirt makes the socket in its own folder
        return
    for child in list(el):
        if child.tag in ("source", "protocol"):
            el.remove(child)
    el.set("type", "pty")
    warnings.append(f"the domain's {el.tag} of type {kind!r} (a host file, device or socket) is a pty instead")


def _confine_interface(el: ET.Element, warnings: list[str]) -> None:
    for child in list(el):
        if child.tag in ("script", "downscript", "backend"):
            el.remove(child)  # a program run on the host, host devices
            warnings.append(f"the network card's <{child.tag}> is left out")
    kind = el.get("type", "")
    if kind in _SAFE_INTERFACES:
        if kind == "user":
            for source in el.findall("source"):
                el.remove(source)
            # passt's forwards listen on host addresses the snapshot names (every one by
            # default), and a clone's clash with the original's (design/repository-format.md 10.8)
            for fwd in el.findall("portForward"):
                el.remove(fwd)
                warnings.append(
                    f"the network card's <portForward> {fwd.get('proto', 'tcp')} from "
                    f"{fwd.get('address') or 'every address'} is left out"
                )
        return
    for child in list(el):
        if child.tag in ("source", "target", "virtualport", "tune", "ip", "route", "portForward"):
            el.remove(child)
    el.set("type", "user")
    warnings.append(f"the network card of type {kind!r} (a host network device or socket) uses user-mode networking")


def _foreign_paths(el: ET.Element, ours: set[str], parent: str = "") -> list[str]:
    """The absolute paths ``el`` and what it holds name that are neither ours, nor the kernel's
    RNG, nor installed firmware as the text of ``<os><loader>``."""
    if el.tag in _FREE_TEXT:
        return []
    text = (el.text or "").strip()
    loader = (parent, el.tag) == ("os", "loader")
    firmware = text if loader and os.path.normpath(text).startswith(FIRMWARE_DIRS) else None
    found = []
    named = [(_local(k), v) for k, v in el.attrib.items()] + [("<text>" if el.tag != "path" else "path", text)]
    # a relative path where a file goes resolves in libvirt's or QEMU's folder ("/" as a service)
    found += [v for k, v in named if k in _PATH_ATTRS and v and not v.startswith("/")]
    for _key, value in named:
        path = os.path.normpath(value) if value.startswith("/") else None
        if path is None or path in ours or path in RNG_DEVICES or value == firmware:
            continue
        found.append(path)
    for child in el:
        found += _foreign_paths(child, ours, el.tag)
    return found


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.SubElement(root, tag)
    el.text = text


def _point_disk_at(el: ET.Element, path: str, fmt: str) -> None:
    el.set("type", "file")
    for child in list(el):
        if child.tag in ("source", "backingStore", "mirror", "auth", "encryption"):
            el.remove(child)
    driver = el.find("driver")
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        el.insert(0, driver)
    driver.set("type", disk_format(fmt).qemu_name)
    el.insert(list(el).index(driver) + 1, ET.Element("source", file=path))


def _eject(el: ET.Element, dev: str, out: RestoredDomain) -> None:
    """A CD-ROM or floppy drive without its medium (a host file or device the snapshot names)."""
    source = el.find("source")
    medium = None if source is None else next((v for k, v in source.attrib.items() if k in _PATH_ATTRS), None)
    for child in list(el):
        if child.tag in ("source", "backingStore", "mirror", "auth", "encryption", "reservations"):
            el.remove(child)
    el.set("type", "file")
    if medium:
        out.warnings.append(
            f"the {el.get('device')} drive {dev or '?'} is restored empty: its medium {medium!r} is a host file"
        )


def _point_nvram(dom: ET.Element, files: Mapping[str, str], out: RestoredDomain) -> None:
    nvram = dom.find("./os/nvram")
    if nvram is None:
        return
    restored = [p for n, p in files.items() if n.startswith("nvram/")]
    if restored:
        nvram.text = os.path.abspath(restored[0])
        for attr in ("type", "template", "templateFormat"):
            nvram.attrib.pop(attr, None)
        for child in list(nvram):
            nvram.remove(child)
        return
    # no stored variables: libvirt makes a fresh store from the template (settings are lost)
    os_el = dom.find("os")
    assert os_el is not None
    os_el.remove(nvram)
    out.warnings.append("the snapshot holds no UEFI variable store; libvirt starts the domain with a fresh one")


def hyperv_domain(
    vm: Mapping[str, Any],
    disks: list[tuple[str, str, str]],
    out_dir: str,
    *,
    as_clone: str | None = None,
    domain_type: str = "kvm",
    network: str | None = "default",
) -> RestoredDomain:
    """A domain for a restored Hyper-V VM: ``disks`` are (name, path, format) of the current
    state, in the order the VM had them (the first boots)."""
    name = as_clone or str(vm.get("name") or "restored")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"invalid domain name {name!r}")
    generation = int(vm.get("generation") or 1)
    uuid = str(uuidlib.uuid4())
    if as_clone is None and vm.get("id"):
        with contextlib.suppress(ValueError):
            uuid = str(uuidlib.UUID(str(vm["id"])))  # Hyper-V's VM ID is the SMBIOS UUID the guest sees
    out = RestoredDomain(name=name, uuid=uuid, xml="")
    nics = [dict(n) for n in vm.get("nics") or []] or [{"mac": new_mac(), "model": "e1000"}]
    for n in nics:
        mac = str(n.get("mac") or "")
        if as_clone is not None or not re.fullmatch(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
            n["mac"] = new_mac()
    facts = {"memory": int(vm.get("memory") or 2 << 30), "cpus": int(vm.get("cpus") or 2)}
    if not vm.get("memory"):
        out.warnings.append("the snapshot does not say how much memory the VM had; the domain gets 2 GiB")
    text = domain_xml(
        facts,
        name,
        uuid,
        [{"device": n, "format": fmt, "file": os.path.abspath(p), "model": ""} for n, p, fmt in disks],
        [{"mac": n["mac"], "model": "e1000"} for n in nics],
        "/usr/bin/qemu-system-x86_64",
        domain_type=domain_type,
        machine="q35",
        firmware="uefi" if generation == 2 else "bios",
        bus="sata",
        nic_model="e1000",
        network=network,
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), f"{_safe_name(name)}.xml")
    _write_new(path, text)
    out.xml, out.text = path, text
    out.macs = [n["mac"] for n in nics]
    return out


def define_domain(restored: RestoredDomain, uri: str | None, *, start: bool = False) -> RestoredDomain:
    """Register ``restored`` with libvirt (and start it); an existing name or UUID is refused."""
    lv = import_libvirt()
    uri = uri or default_uri()
    conn = connect(lv, uri)
    try:
        for what, lookup, key in (
            ("named", conn.lookupByName, restored.name),
            ("with UUID", conn.lookupByUUIDString, restored.uuid),
        ):
            try:
                lookup(key)
            except lv.libvirtError as exc:
                if error_code(exc) != _ERR_NO_DOMAIN:
                    raise HypervisorError(f"asking {uri} for domains failed: {error_message(exc)}") from exc
                continue
            raise ConfigError(
                f"a domain {what} {key} exists on {uri}; nothing was defined (the disks and {restored.xml} "
                "are restored: restore --as-clone NAME gives a new identity)"
            )
        try:
            dom = conn.defineXML(restored.text)
        except lv.libvirtError as exc:
            raise HypervisorError(f"libvirt refused the restored domain {restored.name}: {error_message(exc)}") from exc
        restored.defined = True
        if start:
            try:
                dom.create()
            except lv.libvirtError as exc:
                raise HypervisorError(
                    f"domain {restored.name} is defined but did not start: {error_message(exc)}"
                ) from exc
            restored.started = True
        return restored
    finally:
        conn.close()


def has_network(uri: str | None, network: str) -> bool:
    """Whether the libvirt connection has the (virtual) network ``network``."""
    lv = import_libvirt()
    conn = connect(lv, uri or default_uri())
    try:
        conn.networkLookupByName(network)
        return True
    except lv.libvirtError:
        return False
    finally:
        conn.close()


# -- the registry's steps (vmvault.hypervisors.registry) --------------------------------------


#: a connection the snapshot may name: this host's libvirt through its own socket. A URI from the
#: storage could otherwise run a program (``qemu+ext:///system?command=...``) or reach another host
_LOCAL_URI = re.compile(r"qemu(\+unix)?:///(system|session)(\?socket=/[^&#]+)?")


def _uri_of(restored: RestoredVm) -> str | None:
    """The connection to define on: ``--libvirt-uri``, else the snapshot's when it is this host's
    libvirt (``qemu:///system``, ``qemu:///session``, perhaps with ``?socket=``), else the default."""
    if restored.register is not None and restored.register.uri:
        return restored.register.uri
    uri = restored.vm.get("uri")
    if not isinstance(uri, str) or not uri:
        return None
    if not _LOCAL_URI.fullmatch(uri):
        raise ConfigError(
            f"the snapshot names the libvirt connection {uri!r}; vmvault takes only a local one "
            "(qemu:///system, qemu:///session) from a snapshot: give it with --libvirt-uri"
        )
    return uri


def _note(domain: RestoredDomain) -> RestoreNote:
    facts = {
        "vm": {
            "name": domain.name,
            "uuid": domain.uuid,
            "libvirt_xml": domain.xml,
            "macs": domain.macs,
            "defined": domain.defined,
            "started": domain.started,
            "warnings": domain.warnings,
        }
    }
    what = "started" if domain.started else "defined" if domain.defined else f"virsh define {domain.xml}"
    lines = [f"  warning: {w}" for w in domain.warnings]
    lines.append(f"  domain {domain.name} ({domain.uuid}): {what}")
    return RestoreNote(facts=facts, lines=lines)


def _register(domain: RestoredDomain, restored: RestoredVm) -> None:
    if restored.register is None:
        return
    # libvirtd, as root, chowns each disk to QEMU's user by its name (dynamic_ownership) and QEMU
    # opens it by name: in a folder another account can change, a disk swapped for a link to a
    # host file after the restore would be given to QEMU, and written by the guest
    why = platform.others_can_change(restored.folder, container=True)
    if why is not None:
        raise ConfigError(
            f"{restored.folder}: {why}; libvirt would take the restored disks there by their names: nothing was "
            f"defined (the disks and {domain.xml} are restored; restore into a folder only this user can change)"
        )
    define_domain(domain, _uri_of(restored), start=restored.register.start)


def after_restore(restored: RestoredVm) -> RestoreNote:
    """A libvirt snapshot restored: its domain XML rewritten beside the disks (``<name>.xml``),
    and registered with libvirt when the restore asks (``--define``, ``--start``)."""
    xml_file = restored.files.get("domain.xml")
    if restored.partial or xml_file is None:
        why = "only part of the VM was restored" if restored.partial else "the snapshot holds no domain.xml"
        return RestoreNote(lines=[f"  no libvirt domain written: {why}"])
    try:
        fd = platform.open_nofollow(xml_file, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"the restored domain.xml cannot be read: {exc.strerror}", path=xml_file) from exc
    with os.fdopen(fd, "rb") as f:
        recorded = f.read(_MAX_XML + 1)
    disks = {name: (path, restored.formats.get(name, "raw")) for name, path in restored.disks.items()}
    domain = domain_for(restored.vm, recorded, disks, restored.files, restored.folder, as_clone=restored.clone_name)
    _register(domain, restored)
    return _note(domain)


def define_qemu(restored: RestoredVm) -> RestoreNote:
    """A QEMU snapshot restored with ``--define``: the QEMU connector's script and domain XML,
    and that domain registered with libvirt."""
    written, note = qemu_restore_files(restored)
    vm = note.facts.get("vm")
    if written is None or not isinstance(vm, dict):
        raise ConfigError(
            "--define: no libvirt domain was written for this QEMU snapshot (" + " ".join(note.lines) + ")"
        )
    domain = RestoredDomain(written.name, written.uuid, written.xml, text=written.xml_text)
    _register(domain, restored)
    vm.update({"defined": domain.defined, "started": domain.started})
    note.lines.append(f"  domain {domain.name}: {'started' if domain.started else 'defined'}")
    return note


def define_hyperv(restored: RestoredVm) -> RestoreNote:
    """A Hyper-V snapshot restored with ``--define``: a libvirt domain built for its current
    disks (the leaves of its checkpoint chains), registered, and started with ``--start``."""
    paths = list(restored.disks.items())
    parents: set[str] = set()
    for _name, path in paths:
        try:
            chain = open_chain(path)
        except VmvaultError as exc:
            raise ConfigError(f"--define: the restored disk {path} cannot be opened: {exc}") from exc
        parents.update(os.path.abspath(layer.path) for layer in chain.layers[1:])  # leaf first
    leaves = [(n, p, restored.formats.get(n, "raw")) for n, p in paths if os.path.abspath(p) not in parents]
    uri = _uri_of(restored)
    reg = restored.register
    network = "default" if reg is not None and has_network(uri, "default") else None
    domain_type = (reg.domain_type if reg is not None else None) or (_offered_type(uri) if reg is not None else "kvm")
    domain = hyperv_domain(
        restored.vm, leaves, restored.folder, as_clone=restored.clone_name, domain_type=domain_type, network=network
    )
    if network is None:
        domain.warnings.append("the network card uses user-mode networking: the connection has no 'default' network")
    _register(domain, restored)
    return _note(domain)


def _offered_type(uri: str | None) -> str:
    """``kvm`` when the libvirt connection offers it, else ``qemu`` (plain emulation)."""
    lv = import_libvirt()
    conn = connect(lv, uri or default_uri())
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        return "kvm"
    except lv.libvirtError:
        return "qemu"
    finally:
        conn.close()

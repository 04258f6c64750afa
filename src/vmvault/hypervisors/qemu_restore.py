"""Rebuild a backed-up QEMU VM from its restored disks: a runnable script and a libvirt domain.

The QEMU connector records the VM's facts in the snapshot (``BackupSession.vm``): name,
UUID, machine type, memory, CPUs, disks (device id, node, format, file, model), network
cards with their MAC addresses, and, when the QMP peer's PID was known, the exact QEMU
command line. ``write_restore_files`` turns that into

* ``run-<name>.sh``: the QEMU command line with the disk paths pointing at the restored
  files, run in the output folder (extra arguments given to the script are appended, and a
  relative path among them is relative to that folder);
* ``<name>.xml``: a libvirt domain (``virsh define``) with the same disks and cards.

With ``as_clone=NAME`` the restored VM gets a new identity so that it can run beside the
original: new name, new UUID, new MAC addresses, new disk paths (the restored files), and
its own QMP/monitor/chardev sockets, pid file and VNC display in the output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import sys
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vmvault.disk import QEMU_FORMATS
from vmvault.errors import ConfigError, TargetError, VmvaultError
from vmvault.hypervisors.base import RestoredVm, RestoreNote

__all__ = [
    "FIRMWARE_DIRS",
    "RNG_DEVICES",
    "RestoredVM",
    "after_restore",
    "domain_xml",
    "new_mac",
    "restore_files",
    "write_restore_files",
]

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
        "-usb",
        "-mem-prealloc",
    ]
)
# -- what a restored VM's command line may reference on this host ------------------------------
#
# The recorded command line comes from the snapshot, which the storage gives (docs/design/
# repository-format.md, section 10). QEMU options can read any host file into the guest
# (``-initrd``, ``-fw_cfg``, ``romfile=``, ``-device loader``), share a host folder
# (``-virtfs``, ``smb=``), pass a host device through (``vfio-pci``, ``usb-host``), write or
# unlink host files (``-pidfile``, ``-D``, a chardev file, a socket path) or run programs
# (``script=``, ``guestfwd=...-cmd:``). The script vmvault writes keeps only options known to
# stay within the VM, the restored disks and the output folder; each option left out is a warning.

#: flags kept (-s would open a debugger on every address)
_SAFE_FLAGS = _FLAGS - {"-s", "-h", "-version"}
#: options kept (their values checked below); every other option is left out
_KEPT = frozenset(
    [
        "-machine", "-M", "-cpu", "-m", "-smp", "-name", "-uuid", "-rtc", "-boot", "-vga", "-display", "-vnc",
        "-accel", "-k", "-global", "-device", "-blockdev", "-drive", "-netdev", "-nic", "-net", "-chardev",
        "-serial", "-monitor", "-qmp", "-qmp-pretty", "-mon", "-pidfile", "-object", "-numa", "-overcommit",
        "-msg", "-action", "-watchdog-action", "-audiodev", "-sandbox", "-bios", "-smbios", "-tpmdev", "-parallel",
    ]
)  # fmt: skip
#: properties (of -device, -global, -machine, -display, -boot, -smbios ...) that name a host
#: file, device or program, or hand QEMU a host descriptor
_HOST_PROPS = frozenset(
    [
        "romfile", "file", "sysfsdev", "hostbus", "hostaddr", "hostport", "hostdevice", "kernel",
        "initrd", "dtb", "dumpdtb", "firmware", "append", "splash", "rendernode", "logfile", "fd", "fds",
        "vhostfd", "vhostfds", "vhostdevice", "script", "downscript", "helper", "smb", "tftp", "bootfile",
        "guestfwd", "x-igd-opregion", "mem-path", "path", "evdev", "wwpn", "filename", "dir", "x509-dir",
        "x509", "x509verify", "rootdir", "hidraw",
    ]
)  # fmt: skip
#: -device drivers that pass a host device through or load host files
_HOST_DEVICES = ("vfio", "usb-host", "pci-assign", "loader", "guest-loader", "vhost-scsi", "vhost-user", "ivshmem")
#: network backends kept: none of their properties may name a host program, file or remote
#: address once confined (``script=``, ``helper=``, ``smb=``, ``tftp=``, ``guestfwd=``, ``fd=``
#: are host properties; ``hostfwd=`` is rewritten, ``ifname=`` left out: ``_Rewriter._netdev``).
#: socket, stream, dgram, vde, l2tpv3, vhost-user, vhost-vdpa, netmap, af-xdp ... are left out.
_NETDEVS = frozenset(["user", "tap", "bridge", "hubport", "none", "nic"])
#: chardev backends kept; a socket on a network address and udp become unix sockets
_CHARDEVS = frozenset(
    ["socket", "udp", "pty", "null", "vc", "ringbuf", "memory", "spicevmc", "spiceport", "msmouse", "wctablet",
     "braille", "testdev", "qemu-vdagent", "stdio", "mux"]
)  # fmt: skip
#: -chardev properties that give a network address (socket: host, port, to, ipv4, ipv6; udp:
#: localaddr, localport; QEMU's qemu_chardev_opts)
_NET_CHARDEV_KEYS = frozenset(["host", "port", "to", "ipv4", "ipv6", "localaddr", "localport"])
#: -chardev socket properties a unix socket in the output folder keeps (``abstract=on`` would put
#: it in the abstract namespace, where any local user may connect: no file, no permissions)
_UNIX_CHARDEV_DROP = frozenset(["abstract", "tight"])
_OBJECTS = frozenset(
    ["memory-backend-ram", "memory-backend-memfd", "iothread", "rng-builtin", "rng-random", "throttle-group",
     "main-loop", "thread-context", "cryptodev-backend-builtin", "secret"]
)  # fmt: skip
_AUDIO = frozenset(["none", "pa", "pipewire", "spice", "sdl", "dbus"])
#: the key that names the backend of an option whose backends are allow-listed (when it is
#: not the first, key-less part)
_KIND_KEY = {"-netdev": "type", "-nic": "type", "-net": "type", "-chardev": "backend", "-object": "qom-type",
             "-audiodev": "driver", "-tpmdev": "type"}  # fmt: skip
#: options whose value is a character device target (``unix:PATH`` is moved to the output folder)
_CHAR_OPTIONS = ("-serial", "-monitor", "-qmp", "-qmp-pretty", "-parallel")
#: what may follow a socket's address in -serial, -monitor, -qmp (``logfile=`` would write anywhere)
_SOCKET_FLAG = re.compile(r"server|nowait|nodelay|(server|wait|nodelay|telnet)=(on|off)|reconnect=\d+")
#: character device targets of -serial, -monitor, -qmp, -parallel that stay in QEMU (after an
#: optional ``mon:``)
_SIMPLE_CHAR = re.compile(r"stdio|pty|null|none|vc(:\d+C?[xX]\d+C?)?|chardev:[A-Za-z0-9_.-]+")
#: the same targets' network forms (chardev/char.c, qemu_chr_parse_compat): each becomes a unix
#: socket in the output folder, whatever follows the prefix
_NET_CHAR = ("tcp:", "telnet:", "tn3270:", "websocket:", "udp:")
#: a property value in QEMU's socket address syntax (``tcp:HOST:PORT``, ``inet:``, ``vsock:``)
_NET_VALUE = re.compile(r"(mon:)?(tcp|udp|telnet|tn3270|websocket|inet|vsock|fd):", re.IGNORECASE)
#: a user network's port forward: ``[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport``
_HOSTFWD = re.compile(r"(tcp|udp)?:([0-9.]*):(\d{1,5})-([0-9.]*):(\d{1,5})")
#: -blockdev drivers for the restored files and the nodes above them
_BLOCK_DRIVERS = frozenset(["file", "qcow2", "raw", "throttle", "copy-on-read", "blkdebug"]) - {"blkdebug"}
#: firmware as distributions install it
FIRMWARE_DIRS = (
    "/usr/share/OVMF/",
    "/usr/share/AAVMF/",
    "/usr/share/edk2/",
    "/usr/share/qemu/",
    "/usr/share/seabios/",
)
RNG_DEVICES = frozenset(["/dev/urandom", "/dev/random"])
#: keys whose value names another option's id or node name
_REFERENCES = frozenset(
    ["drive", "netdev", "chardev", "fsdev", "memdev", "tpmdev", "rng", "audiodev", "iothread", "file", "backing"]
)
#: JSON -blockdev keys that stay within the node (anything else may open a host file or socket)
_JSON_BLOCK_KEYS = frozenset(
    ["driver", "node-name", "filename", "file", "backing", "read-only", "auto-read-only", "discard", "cache",
     "detect-zeroes", "force-share", "aio", "locking", "data-file", "lazy-refcounts", "throttle-group"]
)  # fmt: skip
#: a QEMU system emulator's program name
_EMULATOR = re.compile(r"qemu-system-[a-z0-9_]+|qemu-kvm|kvm")
#: a recorded name put into an option: QEMU's id syntax (no comma, no '=')
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")
_MAC = re.compile(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _kind(parts: list[str], key: str) -> str:
    """The backend or driver of a keyval option: its first, key-less part, else ``key=``."""
    if parts and "=" not in parts[0]:
        return _unesc(parts[0])
    return next((_unesc(p.split("=", 1)[1]) for p in parts if p.startswith(f"{key}=")), "")


def _without(parts: list[str], keys: frozenset[str] | set[str]) -> tuple[list[str], list[str]]:
    """``parts`` without those whose key is in ``keys`` (a ``driver.prop`` key counts by ``prop``)."""
    kept: list[str] = []
    dropped: list[str] = []
    for p in parts:
        key = p.split("=", 1)[0] if "=" in p else ""
        (dropped if key.rsplit(".", 1)[-1] in keys else kept).append(p)
    return kept, dropped


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
    #: what was left out of the recorded command line (it reached the host), one line each
    warnings: list[str] = field(default_factory=list)
    #: the libvirt domain as written to ``xml``
    xml_text: str = field(default="", repr=False)


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
        reserved: frozenset[str] = frozenset(),
    ) -> None:
        self.clone = clone
        self.name = name
        self.uuid = uuid
        self.out_dir = out_dir
        recorded = {d["device"]: d for d in vm.get("disks", [])}
        self.path_map = {str(recorded[dev]["file"]): path for dev, path in disks.items() if dev in recorded}
        #: each restored file's format: the driver of any format node on it, so that QEMU never
        #: reads a raw disk's guest-written bytes as a qcow2 header (with a backing file to open)
        self.format_of = {path: formats.get(dev, str(recorded[dev]["format"])) for dev, path in disks.items()}
        #: protocol nodes seen so far: node name -> the restored file they open
        self._file_nodes: dict[str, str] = {}
        self.macs: dict[str, str] = {}
        self.recorded_macs = {str(n["id"]): str(n["mac"]) for n in vm.get("nics", [])}
        self.qmp_socket: str | None = None
        self._nic_count = 0
        #: what was left out of the recorded command line, and why
        self.warnings: list[str] = []
        #: ids and node names of options left out: what uses them is left out too
        self._dropped: set[str] = set()
        #: names in the output folder that a socket or the pid file must not take
        self._taken = set(reserved) | {os.path.basename(p) for p in disks.values()}

    def _moved(self, path: str) -> str:
        """A socket or pid file: its file name, in the output folder (a recorded path could name
        any host file, which QEMU would replace or unlink). The name is made of ``[A-Za-z0-9._-]``,
        never hidden, and is one no restored disk, restore file, other socket or existing entry
        has: QEMU unlinks a socket's path before it binds and truncates the pid file, so
        ``-qmp unix:/x/disk.qcow2`` would otherwise delete the restored disk."""
        base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path)).lstrip(".")[:64] or "socket"
        stem, ext = os.path.splitext(base)
        name, n = base, 1
        while name in self._taken or os.path.lexists(os.path.join(self.out_dir, name)):
            n += 1
            name = f"{stem}-{n}{ext}"
        self._taken.add(name)
        return os.path.join(self.out_dir, name)

    def _leave(self, opt: str, value: str, why: str) -> None:
        self.warnings.append(f"{opt} {value[:120]!r} is left out: {why}")
        for p in _split_keyval(value):
            key, _, val = p.partition("=")
            if key in ("id", "node-name"):
                self._dropped.add(_unesc(val))
        if value.lstrip().startswith("{"):
            with contextlib.suppress(ValueError, RecursionError):
                spec = json.loads(value)
                self._dropped.update(_json_names(spec))
                if isinstance(spec, dict) and isinstance(spec.get("id"), str):
                    self._dropped.add(spec["id"])  # (-netdev {"type": ..., "id": ...})

    def confine(self, opt: str, value: str) -> str | None:
        """``value`` with what reaches the host taken out, or None: the option is left out."""
        if opt not in _KEPT:
            self._leave(opt, value, "it can reach host files, devices or programs")
            return None
        if opt in ("-blockdev", "-drive", "-pidfile", "-uuid"):
            return value  # checked once rewritten (``_disk_confined``), moved, replaced
        if opt == "-bios":
            if _firmware(value):
                return value
            self._leave(opt, value, "it is not firmware installed on this host")
            return None
        if opt in _CHAR_OPTIONS:
            return self._char_target(opt, value)
        spec = _json_option(value)
        if spec is False:
            self._leave(opt, value, "its JSON form holds nested values or paths vmvault does not check")
            return None
        # the JSON form (-device {"driver": ...}) is checked as the same key=value pairs
        parts = _split_keyval(value) if spec is None else [f"{k}={_esc(_json_text(v))}" for k, v in spec.items()]
        pairs = [(key, _unesc(val)) for key, sep, val in (p.partition("=") for p in parts) if sep]
        gone = [v for k, v in pairs if k in _REFERENCES and v in self._dropped]
        if gone:
            self._leave(opt, value, f"it uses {gone[0]!r}, which is left out")
            return None
        keys: frozenset[str] = _HOST_PROPS
        kinds = {v for k, v in pairs if k in ("driver", "type", "backend", "qom-type")}
        if parts and "=" not in parts[0]:
            kinds.add(_unesc(parts[0]))
        if (
            parts
            and "=" not in parts[0]
            and _is_path(_unesc(parts[0]))
            and not (opt == "-vnc" and value.startswith("unix:"))
        ):
            self._leave(opt, value, "it names a host file")
            return None
        # -global driver=D,property=P,value=V sets P as -global D.P=V does
        named_props = {v.rsplit(".", 1)[-1] for k, v in pairs if k == "property"} if opt == "-global" else set()
        if named_props & _HOST_PROPS:
            self._leave(opt, value, "it sets a property that names a host file, device or program")
            return None
        if opt == "-device" and any(k.startswith(_HOST_DEVICES) for k in kinds):
            self._leave(opt, value, "it passes a host device through or loads host files")
            return None
        # each kind of backend named, and only known ones (none named is no known one either)
        allowed = {"-netdev": _NETDEVS, "-nic": _NETDEVS, "-net": _NETDEVS, "-chardev": _CHARDEVS,
                   "-object": _OBJECTS, "-audiodev": _AUDIO, "-tpmdev": frozenset(["emulator"])}.get(opt)  # fmt: skip
        if allowed is not None and not (kinds and kinds <= allowed):
            self._leave(opt, value, "its backend can reach host files, devices, sockets or programs")
            return None
        if allowed is not None and not _kind(parts, _KIND_KEY[opt]):
            # (named under another option's key only: QEMU would not know which backend)
            self._leave(opt, value, f"it names no backend (no {_KIND_KEY[opt]}=)")
            return None
        if opt == "-chardev":
            keys = frozenset(["logfile", "fd"])  # a socket's path is moved to the output folder
        if opt == "-audiodev":
            keys = _HOST_PROPS | {"server"}  # a sound server elsewhere (pa: server=tcp:HOST)
        if opt == "-object":
            named = {v for k, v in pairs if k == "filename"}
            if (kinds & {"secret"} and any(k == "file" for k, _v in pairs)) or not named <= RNG_DEVICES:
                self._leave(opt, value, "it reads a host file")
                return None
            keys = _HOST_PROPS - {"filename"}  # the kernel's random source, checked above
        kept, dropped = _without(parts, keys)
        if opt in ("-netdev", "-nic", "-net"):
            # a tap's script=no runs nothing (without it, QEMU runs this host's /etc/qemu-ifup)
            kept += [d for d in dropped if d in ("script=no", "downscript=no")]
            dropped = [d for d in dropped if d not in kept]
        # what the lists above do not know (a driver's own property for a host file): any
        # other property whose value is a path (a chardev socket's path= is moved, not dropped)
        moved = {"path"} if opt == "-chardev" else set()

        def host_path(part: str) -> bool:
            key, _, val = part.partition("=")
            return _is_path(val) and key not in moved and _unesc(val) not in RNG_DEVICES

        pathlike = [p for p in kept if host_path(p)]
        kept = [p for p in kept if p not in pathlike]
        dropped += pathlike
        for d in dropped:
            self.warnings.append(f"{opt} {value[:60]!r}: {d.split('=', 1)[0]}= is left out (a host file or program)")
        # likewise any property whose value is a network address in QEMU's socket syntax (a
        # port forward is rewritten: ``_netdev``)
        netlike = [p for p in kept if _NET_VALUE.match(p.partition("=")[2]) and p.partition("=")[0] != "hostfwd"]
        kept = [p for p in kept if p not in netlike]
        for d in netlike:
            self.warnings.append(f"{opt} {value[:60]!r}: {d.split('=', 1)[0]}= is left out (a network address)")
        if opt in ("-netdev", "-nic", "-net"):
            kept = self._netdev(opt, value, kept)
        if not kept:
            self._leave(opt, value, "nothing is left of it")
            return None
        if spec is not None and opt != "-chardev":  # (QEMU reads -chardev as key=value pairs only)
            out: dict[str, Any] = {}
            for p in kept:
                key, _, val = p.partition("=")
                out[key] = spec[key] if p == f"{key}={_esc(_json_text(spec[key]))}" else _unesc(val)
            return json.dumps(out, separators=(",", ":"))
        return ",".join(kept)

    def _char_target(self, opt: str, value: str) -> str | None:
        """A -serial, -monitor, -qmp or -parallel target, rewritten, or None (left out). A
        network one (``tcp:``, ``telnet:``, ``tn3270:``, ``websocket:``, ``udp:``) becomes a
        listening unix socket in the output folder: a monitor or QMP on a TCP port is host
        command execution for whoever connects, a client connects to a host the snapshot
        chose. A ``unix:`` one moves to the output folder; host files and devices go."""
        prefix, target = ("mon:", value[4:]) if value.startswith("mon:") else ("", value)
        if target.startswith("chardev:") and target[8:] in self._dropped:
            self._leave(opt, value, f"it uses {target[8:]!r}, which is left out")
            return None
        if target.startswith(_NET_CHAR):
            sock = self._moved(f"{opt.lstrip('-')}.sock")
            self.warnings.append(
                f"{opt} {value[:120]!r} opens or connects a network socket: it is the unix socket {sock} instead"
            )
            rewritten = f"unix:{_esc(sock)},server=on,wait=off"
        elif target.startswith("unix:") and all(_SOCKET_FLAG.fullmatch(p) for p in _split_keyval(target[5:])[1:]):
            parts = _split_keyval(target[5:])
            sock = self._moved(_unesc(parts[0]))
            rewritten = "unix:" + ",".join([_esc(sock), *parts[1:]])
        elif _SIMPLE_CHAR.fullmatch(target):
            return value
        else:
            self._leave(opt, value, "it names a host file or device")
            return None
        if opt.startswith("-qmp") and self.qmp_socket is None:
            self.qmp_socket = sock
        return prefix + rewritten

    def _chardev(self, value: str, recorded: str) -> str:
        """A confined -chardev (``recorded``, as the snapshot gave it, is what warnings name): a
        socket on a network address, or a udp one, becomes a listening unix socket in the
        output folder (keeping only its id and mux); a unix socket's path moves there, outside
        the abstract namespace."""
        parts = _split_keyval(value)
        keys = {p.partition("=")[0] for p in parts}
        backend = _kind(parts, "backend")
        if backend == "udp" or (backend == "socket" and (keys & _NET_CHARDEV_KEYS or "path" not in keys)):
            ident = next((_unesc(p[3:]) for p in parts if p.startswith("id=")), "")
            sock = self._moved(f"{ident if _ID.fullmatch(ident) else 'chardev'}.sock")
            # (no address at all: libvirt's fd=N, left out as a host descriptor)
            net = backend == "udp" or keys & _NET_CHARDEV_KEYS
            what = "opens or connects a network socket" if net else "has no path"
            self.warnings.append(f"-chardev {recorded[:120]!r} {what}: it is the unix socket {sock} instead")
            kept = [p for p in parts if p.partition("=")[0] in ("id", "mux")]
            return ",".join(["socket", *kept, f"path={_esc(sock)}", "server=on", "wait=off"])
        out = []
        for p in parts:
            key, _, val = p.partition("=")
            if key == "path":
                p = f"path={_esc(self._moved(_unesc(val)))}"
            elif key in _UNIX_CHARDEV_DROP | _NET_CHARDEV_KEYS:  # (unused by other backends: gone too)
                self.warnings.append(f"-chardev {recorded[:60]!r}: {key}= is left out (a socket outside the folder)")
                continue
            out.append(p)
        return ",".join(out)

    def _netdev(self, opt: str, value: str, parts: list[str]) -> list[str]:
        """A confined network backend's properties: a user network's ``hostfwd=`` listens on
        127.0.0.1 only (in a plain restore; a clone beside the original leaves it out: the
        original holds the port), and a tap's ``ifname=`` is left out (it could join another
        VM's multiqueue tap; QEMU picks a new one)."""
        out = []
        for p in parts:
            key, _, val = p.partition("=")
            if key == "ifname":
                self.warnings.append(f"{opt} {value[:60]!r}: ifname= is left out (QEMU names a new host interface)")
                continue
            if key != "hostfwd":
                out.append(p)
                continue
            fwd = _HOSTFWD.fullmatch(_unesc(val))
            if fwd is None:
                self.warnings.append(f"{opt} {value[:60]!r}: hostfwd={val[:60]!r} is left out (not a port forward)")
            elif self.clone:
                self.warnings.append(
                    f"{opt} {value[:60]!r}: hostfwd={val[:60]!r} is left out (a clone runs beside the original, "
                    "which holds that port)"
                )
            else:
                proto, host, port, guest, guest_port = fwd.groups()
                if host != "127.0.0.1":
                    self.warnings.append(
                        f"{opt} {value[:60]!r}: hostfwd={val[:60]!r} listens on 127.0.0.1 only (it listened on "
                        f"{host or 'every address'})"
                    )
                out.append(f"hostfwd={proto or 'tcp'}:127.0.0.1:{port}-{guest}:{guest_port}")
        return out

    def _disk_confined(self, opt: str, value: str) -> str | None:
        """A rewritten disk option, kept when every file it names is a restored disk (or firmware,
        read-only) and every driver reads a file of the restored formats."""
        ours = set(self.path_map.values())
        if value.lstrip().startswith("{") and opt == "-drive":
            ok = False  # -drive takes no JSON: the keys it would be read with are not blockdev's
        elif value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except (ValueError, RecursionError):
                spec = None
            ok = isinstance(spec, dict) and _json_confined(spec, ours, self._dropped)
        else:
            parts = _split_keyval(value)
            pairs = [(key, _unesc(val)) for key, sep, val in (p.partition("=") for p in parts) if sep]
            file_key = "file" if opt == "-drive" else "filename"
            # the nodes under it too (file.driver=nbd would reach another host)
            drivers = [v for k, v in pairs if k.rsplit(".", 1)[-1] in ("driver", "format")]
            files = [v for k, v in pairs if k == file_key]
            refs = [v for k, v in pairs if k in ("file", "backing")]
            # firmware code, read-only: OVMF for a UEFI VM (its variables are a disk of the VM)
            pflash = ("if=pflash" in parts and "readonly=on" in parts) or "read-only=on" in parts
            ok = (
                all(d in _BLOCK_DRIVERS for d in drivers)
                and all(f in ours or (pflash and _firmware(f)) for f in files)
                and not (opt == "-blockdev" and any(r in self._dropped for r in refs))
                and not _without(parts, _HOST_PROPS - {"file", "filename"})[1]
                and not any(_is_path(v) for k, v in pairs if k != file_key)
                and not any(_is_path(_unesc(p)) for p in parts if "=" not in p)
            )
        if ok:
            return value
        self._leave(opt, value, "it names a host file or device that is not a restored disk")
        return None

    def _nic_mac(self, nic_id: str) -> str:
        mac = new_mac()
        self.macs[nic_id or f"nic{self._nic_count}"] = mac
        self._nic_count += 1
        return mac

    def option(self, opt: str, value: str) -> list[str]:
        """The rewritten ``[opt, value]`` (or nothing, to drop the option)."""
        if opt == "-incoming":
            return []  # a restored VM starts from its disks, not from a migration stream
        recorded = value
        confined = self.confine(opt, value)
        if confined is None:
            return []
        value = confined
        if opt in ("-blockdev", "-drive"):
            rewritten = (
                self._blockdev(value)
                if opt == "-blockdev"
                else self._keyval_disk(value, file_key="file", format_key="format")
            )
            kept = self._disk_confined(opt, rewritten)
            return [] if kept is None else [opt, kept]
        if opt == "-name" and self.clone:
            parts = _split_keyval(value)
            if parts and "=" not in parts[0]:
                parts[0] = _esc(self.name)
            else:
                parts = [p if not p.startswith("guest=") else f"guest={_esc(self.name)}" for p in parts]
            return [opt, ",".join(parts)]
        if opt == "-uuid":
            return [opt, self.uuid]
        if opt in ("-device", "-nic") or (opt == "-net" and value.startswith("nic")):
            return [opt, self._nic(opt, value)]
        if opt in _CHAR_OPTIONS:
            return [opt, value]  # rewritten by confine (``_char_target``)
        if opt == "-chardev":
            return [opt, self._chardev(value, recorded)]
        if opt == "-pidfile":
            return [opt, self._moved(value)]
        if (opt == "-vnc" and value != "none") or (opt == "-display" and value.startswith("vnc")):
            # a VNC server on a network port hands the console to whoever connects (no password
            # is recorded); reverse=on connects out to a host the snapshot chose
            sock = self._moved("vnc.sock")
            if not value.startswith("unix:"):
                self.warnings.append(f"{opt} {value[:120]!r} listens or connects on the network: the display is "
                                     f"the unix socket {sock} instead")  # fmt: skip
            return ["-vnc", f"unix:{_esc(sock)}"]
        return [opt, value]

    def _blockdev(self, value: str) -> str:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except (ValueError, RecursionError):
                return value  # left out by _disk_confined
            if not isinstance(spec, dict):
                return value
            self._json_node(spec)
            return json.dumps(spec, separators=(",", ":"))
        return self._keyval_disk(value, file_key="filename", format_key="driver")

    def _json_node(self, spec: dict[str, Any]) -> None:
        for child in spec.values():
            if isinstance(child, dict):
                self._json_node(child)
        if spec.get("filename") in self.path_map:
            spec["filename"] = self.path_map[spec["filename"]]
            if "node-name" in spec:
                self._file_nodes[str(spec["node-name"])] = spec["filename"]
        under = spec.get("file")
        path = under.get("filename") if isinstance(under, dict) else self._file_nodes.get(str(under))
        if spec.get("driver") in QEMU_FORMATS and path in self.format_of:
            spec["driver"] = self.format_of[path]

    def _keyval_disk(self, value: str, *, file_key: str, format_key: str) -> str:
        parts = _split_keyval(value)
        keys = {k: _unesc(v) for k, sep, v in (p.partition("=") for p in parts) if sep}
        path = self.path_map.get(keys.get(file_key, ""))
        if file_key == "file":  # -drive: the file and its format in one option
            fmt = self.format_of.get(path or "")
        else:  # -blockdev: a protocol node, or a format node on one seen before
            fmt = self.format_of.get(self._file_nodes.get(keys.get("file", ""), ""))
            if path is not None and "node-name" in keys:
                self._file_nodes[keys["node-name"]] = path
        out = []
        for p in parts:
            key, _, val = p.partition("=")
            if key == file_key and path is not None:
                p = f"{key}={_esc(path)}"
            elif key == format_key and fmt is not None and _unesc(val) in QEMU_FORMATS:
                p = f"{key}={fmt}"
            out.append(p)
        if file_key == "file" and fmt is not None and format_key not in keys:
            out.append(f"{format_key}={fmt}")  # never probed: the guest wrote those bytes
        return ",".join(out)

    def _nic(self, opt: str, value: str) -> str:
        spec = _json_option(value)
        parts = _split_keyval(value) if spec is None else []
        if spec is False:
            return value
        keys = {str(k): str(v) for k, v in spec.items()} if spec else dict(p.split("=", 1) for p in parts if "=" in p)
        driver = parts[0] if parts and "=" not in parts[0] else keys.get("driver", "")
        is_nic = opt in ("-nic", "-net") or driver.startswith(_NIC_MODELS) or "mac" in keys
        if not is_nic:
            return value
        nic_id = keys.get("id", "")
        recorded = self.recorded_macs.get(nic_id, "")
        if self.clone:
            mac = self._nic_mac(nic_id)
        elif "mac" not in keys and _MAC.fullmatch(recorded):
            mac = recorded  # QEMU picked it; pin it so the restore keeps its identity
        else:
            return value  # (a recorded MAC that is not one would add options after the comma)
        if spec:
            return json.dumps(spec | {"mac": mac}, separators=(",", ":"))
        parts = [p for p in parts if not p.startswith("mac=")]
        return ",".join([*parts, f"mac={mac}"])


def _json_option(value: str) -> dict[str, Any] | Literal[False] | None:
    """An option given as JSON (``-device {"driver": ...}``): its flat object; None when the
    value is not JSON; False when it cannot be checked as pairs (not an object, nested values)."""
    if not value.lstrip().startswith("{"):
        return None
    try:
        spec = json.loads(value)
    except (ValueError, RecursionError):
        return False
    if not isinstance(spec, dict) or any(isinstance(v, (dict, list)) or v is None for v in spec.values()):
        return False
    if any("=" in k or "," in k for k in spec):
        return False  # no key=value pair could say it
    return spec


def _json_text(value: object) -> str:
    """A JSON option's value as QEMU's key=value syntax writes it (``true`` is ``on``)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


#: what may stand before a path inside a property's value: ``unix:/run/x``, a D-Bus address's
#: ``unix:path=/run/x``, a ``json:{"filename": "/x"}`` filename, a list, an escaped comma
_BEFORE_PATH = re.compile(r"""[:=,;"'{}\[\]\s]+""")


def _is_path(value: str) -> bool:
    """A property value that names a file: absolute, relative to the folder QEMU starts in, or
    the home folder, or climbing out with ``..``, also after a prefix (``unix:/run/x``,
    ``unix:path=/run/x``, ``json:{"filename": "/x"}``; ``net=10.0.2.0/24`` is not one)."""
    return any(
        p.startswith(("/", "./", "../", "~")) or ".." in p.split("/") or p == "." for p in _BEFORE_PATH.split(value)
    )


def _firmware(path: str) -> bool:
    return os.path.normpath(path).startswith(FIRMWARE_DIRS) and os.path.isabs(path)


def _json_names(spec: Any) -> set[str]:
    """The node names a JSON -blockdev defines."""
    if not isinstance(spec, dict):
        return set()
    names = {str(spec["node-name"])} if "node-name" in spec else set()
    for child in spec.values():
        names |= _json_names(child)
    return names


#: a QEMU node name: a letter, then letters, digits, '-', '.' and '_' (block/block-backend
#: rules; QEMU refuses longer ones than 31 characters)
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")


def _json_confined(spec: dict[str, Any], ours: set[str], dropped: set[str]) -> bool:
    """A JSON -blockdev node (and the nodes in it) reads restored disks only."""
    if str(spec.get("driver")) not in _BLOCK_DRIVERS or not set(spec) <= _JSON_BLOCK_KEYS:
        return False
    firmware = spec.get("read-only") is True and _firmware(str(spec.get("filename")))
    if "filename" in spec and spec["filename"] not in ours and not firmware:
        return False
    for key in ("file", "backing", "data-file"):
        child = spec.get(key)
        if isinstance(child, dict):
            if not _json_confined(child, ours, dropped):
                return False
        elif child is not None and (not isinstance(child, str) or child in dropped or not _NODE_NAME.fullmatch(child)):
            return False  # a string names another node: never a path, a URL or a json: filename
    return True


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


def _program(recorded: str, emulator: str, warnings: list[str]) -> str:
    """The emulator the script runs: this host's program of the recorded name, never a path
    the snapshot gives (it could name any program, or a file the restore wrote)."""
    name = os.path.basename(recorded)
    if _EMULATOR.fullmatch(name):
        found = shutil.which(name)  # (a relative PATH entry would find a file the restore wrote)
        return found if found and os.path.isabs(found) else os.path.join(os.path.dirname(emulator), name)
    warnings.append(f"the recorded program {recorded[:120]!r} is not a QEMU system emulator; {emulator} runs the VM")
    return emulator


def _word(value: object, what: str, pattern: re.Pattern[str] = _ID) -> str:
    """A recorded name that goes into a QEMU option: only letters, digits and ``_.-``."""
    text = str(value)
    if not pattern.fullmatch(text):
        raise ConfigError(f"the snapshot's {what} {text[:80]!r} is not a QEMU name")
    return text


def _synthesized_argv(vm: Mapping[str, Any], emulator: str, formats: Mapping[str, str]) -> list[str]:
    """A command line from the recorded facts, when the original one was not recorded; every
    recorded value is checked before it goes into an option (commas would add options)."""
    argv = [emulator, "-accel", "kvm", "-accel", "tcg"]
    if vm.get("machine"):
        argv += ["-machine", _word(vm["machine"], "machine type")]
    try:
        memory, cpus = int(vm.get("memory", 1 << 30)), int(vm.get("cpus", 1))
    except (TypeError, ValueError) as exc:
        raise ConfigError("the snapshot's memory or CPU count is not a number") from exc
    argv += ["-m", f"{max(1, memory // (1 << 20))}M", "-smp", str(max(1, cpus))]
    argv += ["-name", _esc(str(vm.get("name") or "restored")), "-uuid", str(vm.get("uuid") or uuidlib.uuid4())]
    for d in vm.get("disks", []):
        node, device = _word(d["node"], "disk node name"), _word(d["device"], "disk device name")
        fmt = formats.get(d["device"]) or _word(d["format"], "disk format")
        model = _word(d.get("model") or "virtio-blk-pci", "disk model")
        argv += [
            "-blockdev",
            f"driver=file,filename={_esc(str(d['file']))},node-name={node}-file",
            "-blockdev",
            f"driver={fmt},file={node}-file,node-name={node}",
            "-device",
            f"{model},drive={node},id={device}",
        ]
    for i, nic in enumerate(vm.get("nics", [])):
        mac = _word(nic["mac"], "MAC address", _MAC)
        argv += [
            "-netdev",
            f"user,id=net{i}",
            "-device",
            f"{_word(nic['model'], 'network card model')},netdev=net{i},id={_word(nic['id'], 'network card id')},"
            f"mac={mac}",
        ]
    return argv


def domain_xml(
    vm: Mapping[str, Any],
    name: str,
    uuid: str,
    disks: list[dict[str, str]],
    nics: list[dict[str, str]],
    emulator: str,
    *,
    domain_type: str = "kvm",
    machine: str | None = None,
    firmware: str = "bios",
    bus: str | None = None,
    nic_model: str | None = None,
    network: str | None = "default",
) -> str:
    """A libvirt domain for restored disks from a VM's recorded facts.

    ``disks``: ``device``, ``format``, ``file`` and the QEMU device ``model`` (the bus follows
    it unless ``bus`` is given); ``nics``: ``mac`` and ``model``. ``firmware="uefi"`` lets
    libvirt pick OVMF (``<os firmware='efi'>``); ``network=None`` gives user-mode networking.
    """
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory", unit="KiB").text = str(int(vm.get("memory", 1 << 30)) // 1024)
    ET.SubElement(dom, "vcpu").text = str(vm.get("cpus", 1))
    os_el = ET.SubElement(dom, "os", {"firmware": "efi"} if firmware == "uefi" else {})
    type_attrs = {"arch": "x86_64"}
    machine = machine or (str(vm["machine"]) if vm.get("machine") else None)
    if machine:
        type_attrs["machine"] = machine
    ET.SubElement(os_el, "type", type_attrs).text = "hvm"
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = emulator
    used: set[str] = set()
    for d in disks:
        model = d.get("model", "")
        disk_bus = bus or ("virtio" if model.startswith("virtio") else "scsi" if model.startswith("scsi") else "sata")
        prefix = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}.get(disk_bus, "sd")
        dev = d["device"] if _DISK_NAME.fullmatch(d["device"]) and d["device"].startswith(prefix) else ""
        if not dev or dev in used:
            dev = next(f"{prefix}{c}" for c in "abcdefghijklmnopqrstuvwxyz" if f"{prefix}{c}" not in used)
        used.add(dev)
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=d["format"])
        ET.SubElement(disk, "source", file=d["file"])
        ET.SubElement(disk, "target", dev=dev, bus=disk_bus)
        ET.SubElement(disk, "alias", name=f"ua-{re.sub(r'[^A-Za-z0-9-]', '-', d['device'])}")
    for nic in nics:
        iface = ET.SubElement(devices, "interface", type="network" if network else "user")
        ET.SubElement(iface, "mac", address=nic["mac"])
        if network:
            ET.SubElement(iface, "source", network=network)
        model = nic_model or nic.get("model", "")
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
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise ConfigError(f"the VM name {name!r} holds a control character")
    uuid = str(uuidlib.uuid4()) if clone else str(vm.get("uuid") or uuidlib.uuid4())
    warnings = []
    try:
        uuid = str(uuidlib.UUID(uuid))
    except ValueError:
        warnings.append(f"the snapshot's VM UUID {uuid[:80]!r} is not a UUID; the restored VM gets a new one")
        uuid = str(uuidlib.uuid4())
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    script = os.path.join(out_dir, f"run-{safe}.sh")
    xml_path = os.path.join(out_dir, f"{safe}.xml")
    reserved = frozenset([os.path.basename(script), os.path.basename(xml_path)])
    rw = _Rewriter(vm, disks, formats, out_dir, clone, name, uuid, reserved)
    rw.warnings += warnings
    cmdline = vm.get("cmdline") or []
    if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
        raise ConfigError("the snapshot's QEMU command line is not a list of strings")
    base = cmdline if cmdline else _synthesized_argv(vm, emulator, formats)
    recorded_program, options = _split_argv(base)
    argv = [_program(recorded_program, emulator, rw.warnings)]
    saw_uuid = False
    for opt, value in options:
        if value is None:
            if opt in _SAFE_FLAGS:
                argv.append(opt)
            else:  # a bare word is a disk image to QEMU (-hda), a host path
                rw.warnings.append(f"{opt!r} is left out of the command line: it can reach host files or ports")
            continue
        saw_uuid = saw_uuid or opt == "-uuid"
        argv += rw.option(opt, value)
    if clone and not saw_uuid:
        argv += ["-uuid", uuid]

    nics = [dict(n) for n in vm.get("nics", [])]
    for n in nics:
        if clone:
            n["mac"] = rw.macs.get(n["id"]) or rw._nic_mac(n["id"])
        elif not _MAC.fullmatch(str(n.get("mac"))):
            rw.warnings.append(f"network card {str(n['id'])[:40]!r}: the recorded MAC is not one; it gets a new one")
            n["mac"] = new_mac()
    macs = {n["id"]: n["mac"] for n in nics} | rw.macs

    _write_new(
        script,
        "#!/bin/sh\n"
        f"# {'Clone' if clone else 'Restore'} of QEMU VM {_PRINTABLE.sub('?', str(vm.get('name')))[:200]!r}\n"
        # a relative name QEMU opens resolves in the output folder, never where the script is
        # started from (the folder the recorded options were checked for)
        + f"cd -- {shlex.quote(out_dir)} || exit 1\n"
        # the sockets and the pid file QEMU creates there (the monitor, QMP, serial ports,
        # VNC) are its owner's alone: connecting to a unix socket needs write permission on it
        + "umask 077\n"
        + "exec "
        + " \\\n    ".join(shlex.quote(a) for a in argv)
        + ' \\\n    "$@"\n',
        0o755,
    )
    disk_facts = [
        {
            "device": str(d["device"]),
            "model": str(d.get("model", "")),
            "format": formats.get(d["device"], str(d["format"])),
            "file": os.path.abspath(disks[d["device"]]),
        }
        for d in vm.get("disks", [])
    ]
    xml_text = domain_xml(vm, name, uuid, disk_facts, nics, emulator)
    _write_new(xml_path, xml_text, 0o644)
    return RestoredVM(name, uuid, argv, script, xml_path, macs, rw.qmp_socket, rw.warnings, xml_text)


def after_restore(restored: RestoredVm) -> RestoreNote:
    """The QEMU connector's step after a restore (its registry entry): a runnable script and a
    libvirt domain beside the disks, when every disk of the VM was restored."""
    return restore_files(restored)[1]


def restore_files(restored: RestoredVm) -> tuple[RestoredVM | None, RestoreNote]:
    """:func:`after_restore`, with what was written (None when nothing was)."""
    recorded = [str(d.get("device")) for d in restored.vm.get("disks", []) if isinstance(d, Mapping)]
    missing = [dev for dev in recorded if dev not in restored.disks]
    if not recorded or missing:
        what = f"disk(s) {', '.join(missing)} were not restored" if missing else "the snapshot records no disk devices"
        return None, RestoreNote(lines=[f"  no QEMU script or libvirt domain written: {what}"])
    vm = write_restore_files(
        restored.vm,
        {dev: restored.disks[dev] for dev in recorded},
        restored.folder,
        as_clone=restored.clone_name,
        formats={dev: restored.formats[dev] for dev in recorded if dev in restored.formats},
    )
    facts = {"name": vm.name, "uuid": vm.uuid, "script": vm.script, "libvirt_xml": vm.xml, "macs": vm.macs}
    return vm, RestoreNote(
        facts={"vm": facts | {"warnings": vm.warnings}},
        lines=[
            *(f"  warning: {w}" for w in vm.warnings),
            f"  start it with {vm.script} (or virsh define {vm.xml}); uuid {vm.uuid}",
        ],
    )


def _write_new(path: str, text: str, mode: int) -> None:
    """Create ``path`` with ``text``: never over an existing name, never through a link (the
    folder is a restore target, which others may have written; see ``vmvault.engine.target``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise TargetError("exists; nothing was overwritten (restore into an empty folder)", path=path) from exc
    except OSError as exc:
        raise TargetError(f"cannot create: {exc.strerror}", path=path) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise TargetError(f"cannot write: {exc.strerror}", path=path) from exc


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

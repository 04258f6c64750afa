"""Boot disks in an isolated, throw-away QEMU and wait for a sign of life (boot verification).

:func:`boot_check` starts ``qemu-system-x86_64`` on qcow2 overlays over read-only base
images (a file or an NBD export: whatever :class:`BootDisk` names), so nothing the guest
writes reaches the base, and watches it until one of the heartbeats it was asked for holds
or a failure is certain:

* **agent**: the QEMU guest agent answers ``guest-ping`` on its virtio-serial port
  (``org.qemu.guest_agent.0``), reached through :class:`~vmvault.hypervisors._qmp.GuestAgentClient`;
* **marker**: a configured text appears on the first serial port;
* **screen**: the screen (QMP ``screendump``) is not blank and has not changed for
  ``screen_stable`` seconds (a blinking cursor is tolerated).

It fails, naming the reason, when the firmware finds nothing to boot ("No bootable device"
from SeaBIOS on its debug port or the serial console; OVMF's "No bootable option or device
was found", or OVMF starting its shell after every boot option failed), when the kernel
panics (its text on the serial console, or the ``pvpanic`` device's ``GUEST_PANICKED``
event), when the guest powers itself off, when QEMU dies, and when no heartbeat came within
the timeout, and when the guest writes more to its overlays than ``max_writes`` allows.

Isolation: ``-nodefaults -no-user-config``, no network card (``-nic none``) or a user-mode one
with ``restrict=on``, ``-sandbox on`` with every optional restriction when QEMU has seccomp, no
host file but the overlays and the base images (read-only), every socket and the overlays in a
private folder that is removed afterwards. When vmvault runs as root, QEMU does not: it runs
under ids of its own (``run_as``; :func:`vmvault.platform.transient_ids` picks an unused pair
for each run; in a container's user namespace that maps none, QEMU keeps root's) without
supplementary groups (but /dev/kvm's when it uses KVM) or capabilities, so a guest that broke
out of QEMU's device emulation holds no right over the host's files, the repository or its key.
It then reaches only what it is given: its sockets are bound by vmvault and handed over as open
descriptors, the work folder is root's (open to QEMU's group to look up names in, not to list or
change), and only the overlays, the variable store and the screen dump's file, made beforehand,
are QEMU's own. Names in that folder are given to it relative to its working folder, so that no
folder above needs to be open to it. QEMU runs in its own session (a Ctrl-C on the terminal
reaches vmvault, which stops it) with the parent-death signal set (``setpriv --pdeathsig KILL``,
set after the change of ids, which clears it), so it dies with the thread that started it even
when vmvault is killed with SIGKILL, and under ``prlimit`` (no file it writes past
``max_writes`` plus :data:`FILE_SLACK`, no core dump).

The guest is untrusted: what it prints is kept bounded (the last :data:`SERIAL_KEEP`
bytes are searched and reported), screen dumps are size-checked before they are parsed,
and nothing it sends is executed or written anywhere but the folder above.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmvault.errors import ConfigError, HypervisorError
from vmvault.hypervisors._qmp import GuestAgentClient, QmpClient

__all__ = [
    "AGENT_PORT",
    "BUSES",
    "FAILURE_REASONS",
    "SANDBOX",
    "BootDisk",
    "BootMachine",
    "BootOutcome",
    "Heartbeats",
    "Screen",
    "boot_check",
    "kvm_usable",
    "open_to_qemu",
    "ovmf_code",
    "parse_ppm",
    "png",
    "run_as_ids",
    "supports_sandbox",
]

#: the virtio-serial port name qemu-ga listens on
AGENT_PORT = "org.qemu.guest_agent.0"
#: disk buses a verification VM offers
BUSES = ("virtio", "sata", "ide", "scsi")
#: how a boot that did not pass is classified
FAILURE_REASONS = ("no-bootable-disk", "kernel-panic", "guest-stopped", "qemu-exited", "timeout", "too-many-writes")
#: bytes of serial console (and firmware log) kept and searched
SERIAL_KEEP = 256 * 1024
#: the largest screen accepted from ``screendump`` (pixels)
MAX_PIXELS = 16 << 20
#: what a file QEMU writes may take beyond ``max_writes``: qcow2 metadata, a screen dump
#: (``MAX_PIXELS`` * 3 bytes), a 4 MiB variable store
FILE_SLACK = 64 << 20
#: QEMU's seccomp filter with every optional restriction: no obsolete system calls, no change
#: of user or session, no new process or program, no change of priorities or CPU affinity
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: the sockets QEMU serves, bound by vmvault in the work folder
_SOCKETS = ("qmp", "serial", "firmware", "agent")
#: the screen dump's file in the work folder
_SCREEN = "screen.ppm"

#: firmware texts that mean "nothing to boot" (SeaBIOS, OVMF)
_NO_BOOT = ("No bootable device", "No bootable option or device was found", "Boot failed: not a bootable disk")
#: OVMF starts its shell when no boot option booted
_UEFI_SHELL = "UEFI Interactive Shell"
_PRINTABLE = re.compile(r"[^\x20-\x7e]")
#: kernel texts that mean the guest's kernel gave up
_PANIC = ("Kernel panic - not syncing", "---[ end Kernel panic")

#: OVMF firmware images as Debian installs them (package ovmf), most preferred first
_OVMF = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
_OVMF_VARS = {"/usr/share/OVMF/OVMF_CODE_4M.fd": "/usr/share/OVMF/OVMF_VARS_4M.fd"}
_OVMF_VARS_FALLBACK = "/usr/share/OVMF/OVMF_VARS.fd"


# ---- what to boot ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BootDisk:
    """One disk of the verification VM: ``base`` is a QEMU ``-blockdev`` protocol node (a
    ``file`` node, an ``nbd`` node, ...) read-only, holding ``format`` data of ``size`` bytes."""

    name: str
    base: dict[str, Any]
    size: int
    format: str = "raw"
    bus: str = "sata"


@dataclass(frozen=True)
class BootMachine:
    disks: tuple[BootDisk, ...]
    firmware: str = "bios"  # bios | uefi
    memory: int = 1 << 30  # bytes
    cpus: int = 1
    machine: str = "q35"  # q35 | pc
    network: str = "none"  # none | restricted
    accel: str = "tcg"  # tcg | kvm
    #: the most the throw-away overlays may take on the host's disk (the guest's writes and
    #: their qcow2 metadata): a guest writing without end cannot fill the work folder's disk
    max_writes: int = 8 << 30


@dataclass(frozen=True)
class Heartbeats:
    agent: bool = True
    marker: str | None = None
    screen: bool = False
    #: seconds a non-blank screen must stay unchanged to count as a heartbeat
    screen_stable: float = 20.0

    def describe(self) -> str:
        parts = []
        if self.agent:
            parts.append("the guest agent answering guest-ping")
        if self.marker is not None:
            parts.append(f"{self.marker!r} on the serial console")
        if self.screen:
            parts.append(f"a non-blank screen unchanged for {self.screen_stable:g} s")
        return " or ".join(parts)


@dataclass
class BootOutcome:
    passed: bool
    #: the heartbeat that passed (agent, marker, screen) or the failure (FAILURE_REASONS)
    reason: str
    message: str
    #: from QEMU's start to the heartbeat or the failure
    seconds: float
    serial: str = ""
    firmware_log: str = ""
    #: the last screen as PNG, if one could be taken
    screenshot: bytes | None = field(default=None, repr=False)
    command: list[str] = field(default_factory=list)
    sandbox: bool = False
    #: the user id QEMU ran as, when it was not vmvault's (``boot_check``'s ``run_as``)
    uid: int | None = None


# ---- host facilities ------------------------------------------------------------------------


def kvm_usable() -> bool:
    """KVM is used only where it can run a guest: /dev/kvm opens read-write and the CPU has
    hardware virtualisation (vmx/svm). Nested set-ups without those flags expose a /dev/kvm
    that cannot run stock kernels; TCG is used there."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        return False
    return False


def ovmf_code() -> tuple[str, str] | None:
    """(code, variables template) of an installed OVMF, or None."""
    for code in _OVMF:
        if os.path.isfile(code):
            vars_ = _OVMF_VARS.get(code, _OVMF_VARS_FALLBACK)
            if os.path.isfile(vars_):
                return code, vars_
    return None


def _qemu_binary(qemu: str | None) -> str:
    found = qemu or shutil.which("qemu-system-x86_64")
    if not found:
        raise ConfigError(
            "boot verification needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86 qemu-utils)"
        )
    return found


# ---- screens --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Screen:
    width: int
    height: int
    #: RGB, 3 bytes a pixel, row after row
    pixels: bytes

    @property
    def blank(self) -> bool:
        """One colour everywhere (a black screen, a cleared one)."""
        first = self.pixels[:3]
        return self.pixels == first * (self.width * self.height)

    def changed_rows(self, other: Screen) -> float:
        """The fraction of rows that differ from ``other`` (1.0 for another size)."""
        if (self.width, self.height) != (other.width, other.height):
            return 1.0
        stride = self.width * 3
        differ = sum(
            1
            for y in range(self.height)
            if self.pixels[y * stride : (y + 1) * stride] != other.pixels[y * stride : (y + 1) * stride]
        )
        return differ / max(1, self.height)


def _ppm_token(data: bytes, pos: int) -> tuple[bytes, int]:
    while pos < len(data):
        ch = data[pos : pos + 1]
        if ch == b"#":
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
        elif ch.isspace():
            pos += 1
        else:
            break
    start = pos
    while pos < len(data) and not data[pos : pos + 1].isspace() and data[pos : pos + 1] != b"#":
        pos += 1
    if start == pos or pos - start > 10:
        raise HypervisorError("the screen dump is not a PPM image (bad header)")
    return data[start:pos], pos


def parse_ppm(data: bytes) -> Screen:
    """A binary PPM (P6, maxval 255) as QEMU's ``screendump`` writes it; anything else, or a
    size beyond :data:`MAX_PIXELS`, is a ``HypervisorError``."""
    magic, pos = _ppm_token(data, 0)
    if magic != b"P6":
        raise HypervisorError("the screen dump is not a binary PPM image")
    values = []
    for _ in range(3):
        token, pos = _ppm_token(data, pos)
        if not token.isdigit():
            raise HypervisorError("the screen dump is not a PPM image (bad header)")
        values.append(int(token))
    width, height, maxval = values
    if maxval != 255 or not (0 < width * height <= MAX_PIXELS) or width == 0 or height == 0:
        raise HypervisorError(f"the screen dump has an unusable size or depth ({width}x{height}, max {maxval})")
    pos += 1  # the single whitespace after maxval
    pixels = data[pos : pos + width * height * 3]
    if len(pixels) != width * height * 3:
        raise HypervisorError("the screen dump is truncated")
    return Screen(width, height, pixels)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png(screen: Screen) -> bytes:
    """``screen`` as a PNG file (8-bit RGB, no filter, zlib): PNG specification, sections
    5 (signature, chunks), 11.2 (IHDR, IDAT, IEND)."""
    stride = screen.width * 3
    raw = b"".join(b"\x00" + screen.pixels[y * stride : (y + 1) * stride] for y in range(screen.height))
    header = struct.pack(">IIBBBBB", screen.width, screen.height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


# ---- a bounded text stream from QEMU ----------------------------------------------------------


class _Console:
    """Reads a chardev socket QEMU serves in a thread, keeping the last ``SERIAL_KEEP`` bytes."""

    def __init__(self, path: str, what: str) -> None:
        self.what = what
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(10)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise HypervisorError(f"cannot connect to the {what} of the verification VM: {exc}") from exc
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, name=f"vmvault-boot-{what}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._buf += data
                if len(self._buf) > SERIAL_KEEP:
                    del self._buf[: len(self._buf) - SERIAL_KEEP]

    def text(self) -> str:
        with self._lock:
            return self._buf.decode("utf-8", "replace")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


# ---- the command line -----------------------------------------------------------------------


def _esc(value: str) -> str:
    return value.replace(",", ",,")


def _drive_args(index: int, disk: BootDisk) -> list[str]:
    base = f"base{index}"
    overlay = f"overlay{index}.qcow2"  # in QEMU's working folder
    base_node = {**disk.base, "node-name": base, "read-only": True}
    fmt_node = {"driver": disk.format, "file": base, "node-name": f"{base}-fmt", "read-only": True}
    file_node = {"driver": "file", "filename": overlay, "node-name": f"overlay{index}-file"}
    top = {"driver": "qcow2", "file": f"overlay{index}-file", "backing": f"{base}-fmt", "node-name": f"disk{index}"}
    args = []
    for node in (base_node, fmt_node, file_node, top):
        args += ["-blockdev", json.dumps(node, separators=(",", ":"))]
    boot = f",bootindex={index}"
    if disk.bus == "virtio":
        args += ["-device", f"virtio-blk-pci,drive=disk{index},id=vd{index}{boot}"]
    elif disk.bus == "scsi":
        args += ["-device", f"scsi-hd,drive=disk{index},bus=scsi0.0,id=sd{index}{boot}"]
    else:  # sata on q35's AHCI, ide on pc's PIIX: ide-hd either way
        args += ["-device", f"ide-hd,drive=disk{index},id=hd{index}{boot}"]
    return args


def _command(qemu: str, machine: BootMachine, sockets: dict[str, int], *, sandbox: bool) -> list[str]:
    """QEMU's command line; ``sockets`` holds the descriptors of the listening sockets it
    serves. Files are named relative to its working folder (the work folder)."""
    cmd = [qemu, "-name", "vmvault-verify-boot", "-nodefaults", "-no-user-config", "-S"]
    cmd += ["-accel", machine.accel, "-machine", machine.machine, "-m", f"{max(64, machine.memory >> 20)}M"]
    cmd += ["-smp", str(machine.cpus), "-display", "none", "-vga", "std"]
    cmd += ["-no-shutdown", "-action", "panic=pause", "-device", "pvpanic"]
    if machine.network == "restricted":
        cmd += ["-nic", "user,model=virtio-net-pci,restrict=on"]
    else:
        cmd += ["-nic", "none"]
    if sandbox:
        cmd += ["-sandbox", SANDBOX]
    for name in _SOCKETS:
        cmd += ["-chardev", f"socket,id={name},fd={sockets[name]},server=on,wait=off"]
    cmd += ["-mon", "chardev=qmp,mode=control", "-serial", "chardev:serial"]
    cmd += ["-device", "isa-debugcon,iobase=0x402,chardev=firmware"]
    cmd += ["-device", "virtio-serial-pci,id=vser0", "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}"]
    if machine.firmware == "uefi":
        found = ovmf_code()
        if found is None:
            raise ConfigError(
                "the snapshot's VM boots with UEFI, which needs OVMF (Debian: apt-get install ovmf); "
                "or give --firmware bios"
            )
        code, _ = found
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_esc(code)}"]
        cmd += ["-drive", "if=pflash,format=raw,unit=1,file=vars.fd"]
    if any(d.bus == "scsi" for d in machine.disks):
        cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
    for i, disk in enumerate(machine.disks):
        cmd += _drive_args(i, disk)
    return cmd


def _prepare(qemu: str, machine: BootMachine, work: str) -> None:
    """The overlays (no backing file named inside: QEMU gets the base node on its command line)
    and, for UEFI, a private copy of the variable store template."""
    qemu_img = shutil.which("qemu-img", path=os.path.dirname(qemu)) or shutil.which("qemu-img")
    if qemu_img is None:
        raise ConfigError("boot verification needs qemu-img (Debian: apt-get install qemu-utils)")
    for i, disk in enumerate(machine.disks):
        overlay = os.path.join(work, f"overlay{i}.qcow2")
        proc = subprocess.run(
            [qemu_img, "create", "-q", "-f", "qcow2", overlay, str(max(disk.size, 512))],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise HypervisorError(f"qemu-img could not create an overlay: {proc.stderr.strip()[:500]}")
    if machine.firmware == "uefi":
        found = ovmf_code()
        if found is not None:
            shutil.copyfile(found[1], os.path.join(work, "vars.fd"))
    os.close(os.open(os.path.join(work, _SCREEN), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def open_to_qemu(folder: str, ids: tuple[int, int], *, give: Sequence[str] = (), connect: Sequence[str] = ()) -> None:
    """Open ``folder`` (root's, no one else's to change) to a QEMU running as ``ids``: the folder
    stays root's and QEMU's group may look names up in it (0710: not list, add or remove them);
    the files named in ``give`` become QEMU's own, the sockets named in ``connect`` its group's
    (0660). Raises ``OSError`` (a file system that keeps root from giving files away)."""
    uid, gid = ids
    for name in give:
        os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)
    for name in connect:
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):  # (an export not serving yet makes it later)
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.chown(path, 0, gid, follow_symlinks=False)
                os.chmod(path, 0o660)
    os.chown(folder, 0, gid)
    os.chmod(folder, 0o710)


def _give(work: str, run_as: tuple[int, int]) -> None:
    """The work folder opened to QEMU running as ``run_as``: what it writes becomes its own."""
    try:
        own = [n for n in os.listdir(work) if n.endswith(".qcow2") or n in ("vars.fd", _SCREEN)]
        open_to_qemu(work, run_as, give=own)
    except OSError as exc:  # a file system that keeps root from giving files away (NFS's root_squash)
        raise ConfigError(
            f"{work}: cannot give QEMU's files to the user it runs as ({exc.strerror}); "
            "give a --work-dir on a local file system"
        ) from exc


def run_as_ids(argv: list[str], ids: tuple[int, int], *, kvm: bool, pdeathsig: bool) -> list[str]:
    """``argv`` run under the user and group ids ``ids`` (vmvault running as root): no
    supplementary group but /dev/kvm's when ``kvm``, no capability, no new privileges (util-linux
    ``setpriv``); with ``pdeathsig``, killed when the thread that started it ends (set after the
    change of ids, which clears it)."""
    wrapper = shutil.which("setpriv")
    if wrapper is None:
        raise ConfigError("running QEMU under ids of its own needs setpriv (Debian: apt-get install util-linux)")
    groups = ["--clear-groups"]
    if kvm:
        with contextlib.suppress(OSError):
            groups = ["--groups", str(os.stat("/dev/kvm").st_gid)]
    options = ["--reuid", str(ids[0]), "--regid", str(ids[1]), *groups, "--inh-caps=-all", "--no-new-privs"]
    if pdeathsig:
        options += ["--pdeathsig", "KILL"]
    return [wrapper, *options, "--", *argv]


def supports_sandbox(qemu: str) -> bool:
    """QEMU built with seccomp lists ``-sandbox`` (asked of QEMU itself, without a guest)."""
    try:
        proc = subprocess.run(
            [qemu, "-sandbox", "on", "-machine", "none", "-nodefaults", "-display", "none", "-S", "-no-user-config",
             "-qmp", "stdio"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


# ---- running ----------------------------------------------------------------------------------


class _Run:
    """One verification VM; :meth:`close` always leaves nothing running and nothing on disk."""

    def __init__(
        self, qemu: str, machine: BootMachine, work_dir: str | None, run_as: tuple[int, int] | None = None
    ) -> None:
        self.qemu = qemu
        self.machine = machine
        #: (uid, gid) QEMU runs as, if not vmvault's own
        self.run_as = run_as
        base = work_dir or tempfile.gettempdir()
        self.work = tempfile.mkdtemp(prefix="vmvault-boot-", dir=base)
        os.chmod(self.work, 0o700)
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self.serial: _Console | None = None
        self.firmware: _Console | None = None
        self.stderr = b""
        self.command: list[str] = []
        self.sandbox = False
        self._dir_fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        #: the most any one file QEMU writes may take (RLIMIT_FSIZE): an overlay's bound plus its
        #: qcow2 metadata, and never below what a screen dump or a variable store takes
        self.file_limit = max(machine.max_writes, 0) + FILE_SLACK

    def path(self, name: str) -> str:
        """A short path to ``name`` in the work folder, for sockets (their paths are limited to
        108 bytes; the folder's descriptor keeps this one short wherever the folder is)."""
        return f"/proc/self/fd/{self._dir_fd}/{name}"

    def start(self) -> None:
        _prepare(self.qemu, self.machine, self.work)
        self.sandbox = supports_sandbox(self.qemu)
        with contextlib.ExitStack() as listening:
            sockets = {}
            for name in _SOCKETS:
                sock = listening.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                sock.bind(self.path(f"{name}.sock"))
                sock.listen(1)
                sockets[name] = sock.fileno()
            if self.run_as is not None:
                _give(self.work, self.run_as)
            self.command = _command(self.qemu, self.machine, sockets, sandbox=self.sandbox)
            self.proc = self._spawn(tuple(sockets.values()))
        # only QEMU listens now: when it ends, a connection to its sockets fails at once
        try:
            self.qmp = QmpClient(self.path("qmp.sock"), timeout=30).connect()
        except HypervisorError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            if self.proc.poll() is not None:
                raise HypervisorError(f"QEMU could not start the verification VM: {self._stderr_line()}") from None
            raise
        try:
            self.serial = _Console(self.path("serial.sock"), "serial console")
            self.firmware = _Console(self.path("firmware.sock"), "firmware log")
            self.qmp.execute("cont")
        except HypervisorError:
            if self.proc.poll() is not None:
                raise HypervisorError(f"QEMU could not start the verification VM: {self._stderr_line()}") from None
            raise

    def _spawn(self, fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        """QEMU started with the listening sockets ``fds``: as ``run_as`` if given, with the
        parent-death signal, under the file size limit."""
        if self.run_as is not None:
            argv = run_as_ids(self.command, self.run_as, kvm=self.machine.accel == "kvm", pdeathsig=True)
        else:
            wrapper = shutil.which("setpriv")
            argv = [wrapper, "--pdeathsig", "KILL", "--", *self.command] if wrapper else self.command
        limits = shutil.which("prlimit")
        if limits:
            # a hard bound below the polled one: no file QEMU writes (an overlay above all) grows
            # past it between two looks, and no core dump spills the guest's memory
            argv = [limits, f"--fsize={self.file_limit}", "--core=0", "--", *argv]
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                cwd=self.work,
                pass_fds=fds,
            )
        except OSError as exc:
            raise HypervisorError(f"cannot start {self.qemu}: {exc}") from exc

    def _stderr_line(self) -> str:
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stderr += self.proc.stderr.read(65536)
        lines = [line for line in self.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1][:500] if lines else f"exit status {self.proc.returncode if self.proc else '?'}"

    def screen(self) -> Screen | None:
        """The screen now, or None: its dump's file (made before QEMU started, and QEMU's
        when it runs under ids of its own) is emptied, dumped into by QEMU, then read."""
        if self.qmp is None:
            return None
        try:
            fd = os.open(_SCREEN, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except OSError:
            return None
        try:
            os.ftruncate(fd, 0)  # a dump that failed must not show the screen before it
            self.qmp.execute("screendump", {"filename": _SCREEN}, timeout=15)  # in QEMU's working folder
            size = os.fstat(fd).st_size
            if size > MAX_PIXELS * 3 + 64:
                raise HypervisorError("the screen dump is larger than any screen vmvault accepts")
            return parse_ppm(os.pread(fd, size, 0))
        except (HypervisorError, OSError):
            return None
        finally:
            os.close(fd)

    def ping_agent(self, timeout: float) -> bool:
        try:
            with GuestAgentClient(self.path("agent.sock"), timeout=timeout) as agent:
                agent.connect()
                agent.execute("guest-ping", timeout=timeout)
                return True
        except HypervisorError:
            return False

    def overlay_bytes(self) -> int:
        """What the overlays take on disk now."""
        total = 0
        for i in range(len(self.machine.disks)):
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(self.work, f"overlay{i}.qcow2")).st_blocks * 512
        return total

    def status(self) -> str:
        assert self.qmp is not None
        return str(self.qmp.execute("query-status", timeout=15).get("status", ""))

    def close(self) -> None:
        """Stop QEMU (quit, then kill), close every connection, remove the folder."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.qmp is not None and self.qmp.connected:
                    with contextlib.suppress(HypervisorError):
                        self.qmp.execute("quit", timeout=5)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if self.proc is not None and self.proc.poll() is None:  # an interrupt during the wait above
                self.proc.kill()
                self.proc.wait()
            for console in (self.serial, self.firmware):
                if console is not None:
                    console.close()
            if self.qmp is not None:
                self.qmp.close()
            if self.proc is not None and self.proc.stderr is not None:
                self.proc.stderr.close()
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1
            shutil.rmtree(self.work, ignore_errors=True)


def _found(text: str, needles: Sequence[str]) -> str | None:
    """The line from the first needle found on, printable characters only (the guest wrote it,
    and it is quoted in messages, mails and terminals)."""
    for needle in needles:
        at = text.find(needle)
        if at >= 0:
            end = text.find("\n", at)
            return _PRINTABLE.sub("", text[at : end if end >= 0 else len(text)]).strip()
    return None


def boot_check(
    machine: BootMachine,
    heartbeats: Heartbeats,
    *,
    timeout: float,
    work_dir: str | None = None,
    qemu: str | None = None,
    on_started: Callable[[int], None] | None = None,
    run_as: tuple[int, int] | None = None,
) -> BootOutcome:
    """Boot ``machine`` and wait for a heartbeat (see the module documentation). Never leaves
    QEMU running or a file behind, also when interrupted. ``on_started`` hears QEMU's PID.
    ``run_as`` (uid, gid; vmvault running as root) has QEMU run under those ids: a base image
    it reads must then be open to them (``work_dir``, where a base's socket may lie, is made
    open to the group for name lookups by the caller)."""
    if not machine.disks:
        raise ConfigError("there is no disk to boot")
    if not (heartbeats.agent or heartbeats.marker or heartbeats.screen):
        raise ConfigError("no heartbeat to wait for: give the guest agent, a marker or the screen")
    for disk in machine.disks:
        if disk.bus not in BUSES:
            raise ConfigError(f"disk {disk.name}: unknown bus {disk.bus!r} (one of {', '.join(BUSES)})")
    binary = _qemu_binary(qemu)
    run = _Run(binary, machine, work_dir, run_as)
    try:
        started = time.monotonic()
        run.start()
        assert run.proc is not None and run.serial is not None and run.firmware is not None
        if on_started is not None:
            on_started(run.proc.pid)
        return _watch(run, heartbeats, started, timeout)
    finally:
        run.close()


def _watch(run: _Run, hb: Heartbeats, started: float, timeout: float) -> BootOutcome:
    assert run.proc is not None and run.serial is not None and run.firmware is not None and run.qmp is not None
    deadline = started + timeout
    last_screen: Screen | None = None
    stable_since: float | None = None
    next_screen = next_agent = time.monotonic()

    def outcome(passed: bool, reason: str, message: str, screen: Screen | None = None) -> BootOutcome:
        assert run.serial is not None and run.firmware is not None
        shot = screen or (run.screen() if run.proc is not None and run.proc.poll() is None else None) or last_screen
        return BootOutcome(
            passed=passed,
            reason=reason,
            message=message,
            seconds=round(time.monotonic() - started, 2),
            serial=run.serial.text(),
            firmware_log=run.firmware.text(),
            screenshot=png(shot) if shot is not None else None,
            command=run.command,
            sandbox=run.sandbox,
            uid=None if run.run_as is None else run.run_as[0],
        )

    while True:
        now = time.monotonic()
        serial, firmware = run.serial.text(), run.firmware.text()
        if hb.marker is not None and hb.marker in serial:
            return outcome(True, "marker", f"the marker {hb.marker!r} appeared on the serial console")
        panic = _found(serial, _PANIC)
        if panic is not None:
            return outcome(False, "kernel-panic", f"the guest's kernel panicked: {panic[:300]}")
        no_boot = _found(firmware, _NO_BOOT) or _found(serial, _NO_BOOT)
        if no_boot is not None:
            return outcome(False, "no-bootable-disk", f"no bootable disk: the firmware says {no_boot[:200]!r}")
        if _UEFI_SHELL in serial:
            # OVMF tries every boot option and then starts its shell: nothing on the disks booted
            failed = _found(serial, ("BdsDxe: failed to load",))
            why = f" ({failed[:200]})" if failed else ""
            return outcome(False, "no-bootable-disk", f"no bootable disk: the UEFI firmware found nothing to boot{why}")
        if run.proc.poll() is not None:
            if run.proc.returncode == -signal.SIGXFSZ:
                return outcome(
                    False,
                    "too-many-writes",
                    f"the guest wrote past {run.file_limit >> 20} MiB on one throw-away overlay (more than the "
                    f"{run.machine.max_writes >> 20} MiB allowed); the kernel stopped QEMU",
                )
            return outcome(False, "qemu-exited", f"QEMU stopped during the boot: {run._stderr_line()}")
        try:
            status = run.status()
        except HypervisorError as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(5)  # a QEMU that is ending drops QMP a moment before it exits
            if run.proc.poll() is not None:
                continue  # reported as QEMU's exit on the next turn
            raise HypervisorError(f"the verification VM's QMP connection failed: {exc}") from exc
        if status == "guest-panicked" or any(e.get("event") == "GUEST_PANICKED" for e in run.qmp.events):
            return outcome(False, "kernel-panic", "the guest's kernel panicked (reported by the pvpanic device)")
        if status == "shutdown":
            return outcome(False, "guest-stopped", "the guest powered itself off before any heartbeat")
        if status in ("internal-error", "io-error"):
            return outcome(False, "guest-stopped", f"the verification VM stopped: {status}")
        written = run.overlay_bytes()
        if written > run.machine.max_writes:
            return outcome(
                False,
                "too-many-writes",
                f"the guest wrote {written >> 20} MiB to its throw-away overlays, more than the "
                f"{run.machine.max_writes >> 20} MiB allowed; it was stopped",
            )
        if hb.agent and now >= next_agent:
            if run.ping_agent(timeout=min(2.0, max(0.5, deadline - now))):
                return outcome(True, "agent", "the guest agent answered guest-ping")
            next_agent = time.monotonic() + 2.0
        if now >= next_screen:
            screen = run.screen()
            next_screen = time.monotonic() + 2.0
            if screen is not None:
                if last_screen is not None and not screen.blank and screen.changed_rows(last_screen) <= 0.02:
                    stable_since = stable_since if stable_since is not None else now
                else:
                    stable_since = None
                last_screen = screen
                if hb.screen and stable_since is not None and now - stable_since >= hb.screen_stable:
                    return outcome(
                        True,
                        "screen",
                        f"the screen has shown the same non-blank picture for {now - stable_since:.0f} s",
                        screen,
                    )
        if time.monotonic() >= deadline:
            return outcome(False, "timeout", f"no heartbeat within {timeout:g} s (waited for {hb.describe()})")
        time.sleep(0.25)

"""A real bootable guest for boot verification, built from Debian packages without mounts.

The disk (``guest.raw``, 64 MiB) holds an MBR with SYSLINUX's boot code and one bootable
FAT16 partition with SYSLINUX, Debian's kernel (``linux-image-amd64``) and an initramfs made
here: ``busybox-static``, the virtio modules of that kernel, and ``qemu-guest-agent`` with the
libraries it links. Its ``/init`` prints :data:`MARKER` on the serial console and runs the
guest agent on the ``org.qemu.guest_agent.0`` virtio-serial port, so a verifier can wait for
either heartbeat.

SYSLINUX rather than EXTLINUX: both are the same boot loader (Debian's ``syslinux-common``),
but ``extlinux --install`` writes into a *mounted* filesystem, while ``syslinux --install``
writes into an unmounted FAT image through mtools, which is what a test may do.

The disk is built once into a cache folder keyed by the versions of the packages it is made
from (``VMVAULT_TEST_CACHE``, default ``~/.cache/vmvault-tests``), so a session pays for it only
when a package changed; concurrent sessions build under a lock and share the result.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fsimages import MiB, run

#: printed on the serial console by the guest's /init once userspace runs
MARKER = "VMVAULT-GUEST-BOOTED"
#: bump when what is built changes, to leave old cache entries behind
BUILDER_VERSION = 1
#: the Debian packages the guest is made from (their versions key the cache)
PACKAGES = ("linux-image-amd64", "busybox-static", "syslinux", "syslinux-common", "mtools", "qemu-guest-agent")
_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_console")

_INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /var/run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
for m in {" ".join(_MODULES)}; do insmod /lib/modules/$m.ko 2>/dev/null; done
echo "{MARKER}" > /dev/console
for p in /sys/class/virtio-ports/*; do
  if [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p /dev/$(basename $p) -t /run -f /run/qemu-ga.pid &
  fi
done
while true; do sleep 3600; done
"""

_SYSLINUX_CFG = """DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 quiet panic=0
"""


@dataclass(frozen=True)
class Guest:
    disk: Path
    marker: str
    kernel: str
    versions: dict[str, str]


def package_versions() -> dict[str, str]:
    """The installed versions of :data:`PACKAGES`; skips the test when one is missing."""
    versions = {}
    for package in PACKAGES:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
        if proc.returncode != 0 or not proc.stdout:
            pytest.skip(f"Debian package {package} is not installed (scripts/setup.sh installs it)")
        versions[package] = proc.stdout
    return versions


def _kernel_release() -> str:
    depends = run("dpkg-query", "-W", "-f=${Depends}", "linux-image-amd64")
    # "linux-image-6.1.0-57-amd64 (= 6.1.192-3)": the release is the package name's tail
    name = depends.split()[0]
    return name.removeprefix("linux-image-")


def cache_root() -> Path:
    return Path(os.environ.get("VMVAULT_TEST_CACHE") or Path.home() / ".cache" / "vmvault-tests")


def guest(root: Path | None = None) -> Guest:
    """The bootable guest, built into the cache if it is not there yet."""
    versions = package_versions()
    release = _kernel_release()
    key_doc = {"builder": BUILDER_VERSION, "packages": versions, "kernel": release}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    base = (root or cache_root()) / "guests"
    base.mkdir(parents=True, exist_ok=True)
    final = base / key
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "guest.raw").exists():
            work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
            try:
                _build(work, release)
                (work / "key.json").write_text(json.dumps(key_doc, indent=1, sort_keys=True))
                os.rename(work, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return Guest(final / "guest.raw", MARKER, release, versions)


# ------------------------------------------------------------------------------------ building


class _Cpio:
    """An initramfs archive in the kernel's "newc" cpio format (no root needed for devices)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(bytes(-self.out.tell() % 4))
        self.out.write(data)
        self.out.write(bytes(-self.out.tell() % 4))

    def folder(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.seen:
                self.seen.add(path)
                self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self.folder(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.folder(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int) -> None:
        self.folder(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def _libraries(binary: str) -> list[str]:
    """The shared libraries ``binary`` loads (ldd), the dynamic loader included."""
    libs = []
    for line in run("ldd", binary).splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                libs.append(part)
                break
    return libs


def _initramfs(release: str) -> bytes:
    cpio = _Cpio()
    for folder in ("dev", "proc", "sys", "run", "tmp", "var/run", "sbin", "usr/bin", "usr/sbin", "lib/modules"):
        cpio.folder(folder)
    cpio.device("dev/console", 5, 1)
    cpio.device("dev/null", 1, 3)
    cpio.file("bin/busybox", Path("/bin/busybox").read_bytes())
    cpio.file("init", _INIT.encode())
    agent = "/usr/sbin/qemu-ga"
    cpio.file(agent, Path(agent).read_bytes())
    for lib in _libraries(agent):
        real = os.path.realpath(lib)
        cpio.file(real, Path(real).read_bytes())
        if real != lib:
            cpio.symlink(lib, real)
    moddir = Path("/lib/modules") / release
    for module in _MODULES:
        found = list(moddir.rglob(f"{module}.ko"))
        assert len(found) == 1, f"kernel module {module}.ko of {release}: {found}"
        cpio.file(f"lib/modules/{module}.ko", found[0].read_bytes(), 0o644)
    return gzip.compress(cpio.finish(), 6)


def _build(work: Path, release: str) -> None:
    kernel = Path("/boot") / f"vmlinuz-{release}"
    assert kernel.exists(), f"{kernel} is missing (linux-image-amd64)"
    (work / "initrd.gz").write_bytes(_initramfs(release))
    (work / "vmlinuz").write_bytes(kernel.read_bytes())
    (work / "syslinux.cfg").write_text(_SYSLINUX_CFG)
    part_offset, part_size, disk_size = MiB, 63 * MiB, 64 * MiB
    fat = work / "boot.fat"
    with open(fat, "wb") as f:
        f.truncate(part_size)
    run("mkfs.vfat", "-F", "16", "-n", "GUESTBOOT", fat)
    run("syslinux", "--install", fat)  # ldlinux.sys and ldlinux.c32 in the root, via mtools
    for name in ("vmlinuz", "initrd.gz", "syslinux.cfg"):
        run("mcopy", "-i", fat, work / name, f"::/{name}")
    disk = work / "guest.raw"
    with open(disk, "wb") as f:
        f.truncate(disk_size)
    script = f"label: dos\nstart={part_offset // 512}, size={part_size // 512}, type=6, bootable\n"
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk, stdin=script.encode())
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    assert len(mbr) <= 440
    with open(disk, "r+b") as f:
        f.seek(0)
        f.write(mbr)  # boot code only: the partition table from byte 446 stays
        f.seek(part_offset)
        f.write(fat.read_bytes())
    for name in ("vmlinuz", "initrd.gz", "syslinux.cfg", "boot.fat"):
        (work / name).unlink()


# ------------------------------------------------------------------------------------ booting


@dataclass
class BootResult:
    booted: bool
    seconds: float
    serial: str
    firmware: str
    agent_replied: bool


def boot(disk: Path, work: Path, *, timeout: float = 240.0, ping_agent: bool = True) -> BootResult:
    """Boot ``disk`` (read-only) under TCG with no network; wait for the marker on the serial
    console (and the guest agent's reply to ``guest-ping``); stop QEMU."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    work.mkdir(parents=True, exist_ok=True)
    serial, firmware, agent = work / "serial.log", work / "firmware.log", work / "qga.sock"
    for path in (serial, firmware, agent):
        path.unlink(missing_ok=True)
    cmd = [
        qemu, "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
        "-nic", "none", "-serial", f"file:{serial}",
        "-drive", f"file={disk},format=raw,if=virtio,readonly=on",
        "-chardev", f"file,id=firmware,path={firmware}", "-device", "isa-debugcon,iobase=0x402,chardev=firmware",
        "-device", "virtio-serial",
        "-chardev", f"socket,id=qga0,path={agent},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    booted = replied = False
    seconds = 0.0
    try:
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AssertionError(f"QEMU exited with {proc.returncode}: {out[-2000:]}")
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if MARKER in text:
                booted = True
                seconds = time.monotonic() - started
                break
            if "No bootable device" in (firmware.read_text(errors="replace") if firmware.exists() else ""):
                break
            time.sleep(0.2)
        if booted and ping_agent:
            replied = _ping(agent, deadline=started + timeout)
    finally:
        proc.kill()
        proc.wait()
    return BootResult(
        booted,
        seconds if booted else time.monotonic() - started,
        serial.read_text(errors="replace") if serial.exists() else "",
        firmware.read_text(errors="replace") if firmware.exists() else "",
        replied,
    )


def _ping(path: Path, *, deadline: float) -> bool:
    """``guest-ping`` through the agent's socket, after a ``guest-sync`` to skip stale replies."""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(os.fspath(path))
                s.sendall(b'{"execute": "guest-sync", "arguments": {"id": 4711}}\n')
                buf = b""
                while b'"return": 4711' not in buf.replace(b'"return":4711', b'"return": 4711'):
                    chunk = s.recv(4096)
                    if not chunk:
                        raise OSError("closed")
                    buf += chunk
                s.sendall(b'{"execute": "guest-ping"}\n')
                reply = s.recv(4096)
                if json.loads(reply.splitlines()[0]) == {"return": {}}:
                    return True
        except (OSError, ValueError):
            time.sleep(1)
    return False

"""A real libvirtd for the test session, kept apart from any libvirt of the host.

libvirtd runs as root (the privileged ``qemu:///system`` driver, the one users run) inside a
private mount namespace: ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt`` and ``/var/log/libvirt`` are bind mounts of folders in a temporary
root that only this namespace sees. A host's own libvirt (if any) keeps its configuration,
domains, sockets and state; the tests talk to theirs through
``qemu+unix:///system?socket=<root>/run/libvirt-sock``. ``qemu.conf`` runs QEMU as root
(``/dev/kvm`` is root-only here and libvirt would otherwise re-probe QEMU's capabilities for
a minute), without cgroups or per-domain namespaces, which a container may not offer. Files
are labelled as on a stock host (``dynamic_ownership``): a domain made with ``run_as`` runs
its QEMU as that user (a per-domain DAC label, as Debian's default ``libvirt-qemu`` does) and
libvirtd hands it the disks and backup scratch files.

A holder process (``sleep``) keeps the namespace alive, so libvirtd can be restarted in it
(``restart``) while QEMU processes keep running, as after a host's ``systemctl restart``.
The daemon is started once per test session (the first connection takes ~10 s while
libvirt probes QEMU) and stopped, with every domain, at the end.

Domains are TCG (``type='qemu'``) with no guest OS; ``LibvirtVM.write`` makes guest-like
writes through the disk's device (HMP ``qemu-io -d <QOM path>``), as ``qemu_vm.py`` does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

MiB = 1024 * 1024
_MOUNTS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    (
        "cache",
        "/var/cache/libvirt",
    ),
    ("log", "/var/log/libvirt"),
)

_LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
_QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 1
remember_owner = 0
namespaces = []
cgroup_controllers = []
"""


def _binding() -> Any:
    try:
        import libvirt

        return libvirt
    except ImportError:
        return None


def libvirt_missing() -> str | None:
    """Why the libvirt tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the libvirt tests run libvirtd as root in a private mount namespace; run them as root"
    for tool in ("libvirtd", "virtlogd", "unshare", "nsenter", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs libvirt-daemon-system and qemu)"
    if _binding() is None:
        return "the libvirt Python binding is not installed (pip install libvirt-python)"
    return None


class Libvirtd:
    """libvirtd and virtlogd in their own mount namespace under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"qemu+unix:///system?socket={root / 'run' / 'libvirt-sock'}"
        self.holder: subprocess.Popen[bytes] | None = None
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        self._conn: Any = None

    # -- processes ----------------------------------------------------------------------------
    def start(self) -> Libvirtd:
        for sub, target in _MOUNTS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            if not os.path.isdir(target):
                os.makedirs(target, exist_ok=True)  # the mount point (empty on a host without libvirt)
        (self.root / "etc" / "libvirtd.conf").write_text(_LIBVIRTD_CONF)
        (self.root / "etc" / "qemu.conf").write_text(_QEMU_CONF)
        (self.root / "etc" / "virtlogd.conf").write_text('log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n')
        (self.root / "owner").write_text(f"{os.getpid()}\n")
        script = " && ".join(f"mount --bind {self.root / sub} {target}" for sub, target in _MOUNTS)
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{script} && echo ready && exec sleep infinity"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"ready":
            err = self.holder.stderr.read().decode() if self.holder.stderr else ""
            raise RuntimeError(f"cannot make the private mount namespace: {err}")
        self.virtlogd = self._spawn("virtlogd", "--pid-file", str(self.root / "virtlogd.pid"))
        self.start_libvirtd()
        return self

    def in_namespace(self, *argv: str) -> list[str]:
        """``argv`` run in the daemon's mount namespace, where ``qemu:///system`` is this libvirtd
        (for tools that accept no other URI without a password, such as virtnbdbackup)."""
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", *argv]

    def _spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        """A daemon in the foreground, in the namespace, that gets SIGTERM when the test
        process dies (so a killed test session leaves no daemon behind)."""
        log = open(self.root / f"{argv[0]}.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                self.in_namespace(*argv), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        finally:
            log.close()

    def start_libvirtd(self) -> None:
        sock = self.root / "run" / "libvirt-sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self.libvirtd = self._spawn(
            "libvirtd",
            "--pid-file",
            str(self.root / "libvirtd.pid"),
            "--config",
            str(self.root / "etc" / "libvirtd.conf"),
        )
        deadline = time.monotonic() + 60
        while not sock.exists():
            if self.libvirtd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start: {self.log()[-3000:]}")
            time.sleep(0.05)
        self._conn = None
        self.conn.getVersion()  # the first call waits for QEMU's capabilities

    def stop_libvirtd(self) -> None:
        """Stop libvirtd (running domains keep running, as with a daemon restart)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self.libvirtd is not None:
            _end(self.libvirtd)
            self.libvirtd = None

    def restart(self) -> None:
        self.stop_libvirtd()
        self.start_libvirtd()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            conn = self.conn
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(Exception):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(Exception):
                    dom.undefineFlags(
                        _binding().VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | _binding().VIR_DOMAIN_UNDEFINE_NVRAM
                    )
        self.stop_libvirtd()
        if self.virtlogd is not None:
            _end(self.virtlogd)
            self.virtlogd = None
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
            self.holder = None

    # -- talking to it ------------------------------------------------------------------------
    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = _binding().open(self.uri)
        return self._conn

    def virsh(self, *args: str) -> str:
        out = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def log(self) -> str:
        try:
            return (self.root / "log" / "libvirtd.log").read_text(errors="replace")
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_ROOT_PREFIX = "vmvault-test-libvirtd-"


def reap_stale_roots() -> None:
    """Remove what a killed test session left: every process still living in the private
    namespace of one of its roots (QEMU keeps running when libvirtd goes), and the root."""
    for root in Path(tempfile.gettempdir()).glob(_ROOT_PREFIX + "*"):
        try:
            owner = int((root / "owner").read_text().split()[0])
            os.kill(owner, 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError, IndexError):
            if time.time() - root.stat().st_mtime < 3600:
                continue  # being made right now, or not one of ours
        mark = f" {root}/"
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mark in (proc / "mountinfo").read_text():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    reason = libvirt_missing()
    if reason:
        pytest.skip(reason)
    reap_stale_roots()
    root = Path(tempfile.mkdtemp(prefix=_ROOT_PREFIX))
    daemon = Libvirtd(root)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- domains --------------------------------------------------------------------------------------


@dataclass
class Disk:
    target: str  # vda, vdb, sda
    format: str  # qcow2, raw
    size: int
    bus: str = "virtio"


class LibvirtVM:
    """A TCG domain with no guest OS; a Python model of every disk records each write."""

    def __init__(
        self,
        daemon: Libvirtd,
        workdir: Path,
        name: str,
        disks: list[Disk],
        *,
        agent: bool = False,
        transient: bool = False,
        extra_devices: str = "",
        os_xml: str = "",
        memory_mib: int = 64,
        run_as: tuple[int, int] | None = None,
    ) -> None:
        self.daemon = daemon
        self.workdir = workdir
        self.name = name
        self.specs = list(disks)
        self.agent = agent
        self.transient = transient
        self.extra_devices = extra_devices
        self.os_xml = os_xml
        self.memory_mib = memory_mib
        self.run_as = run_as
        self.uuid = str(uuidlib.uuid4())
        self.paths: dict[str, str] = {}
        self.model: dict[str, bytearray] = {}
        self.mac = "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
        for d in disks:
            self._make_disk(d)

    def _make_disk(self, d: Disk) -> None:
        path = str(self.workdir / f"{self.name}-{d.target}.{d.format}")
        if d.format == "qcow2":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(d.size)], check=True)
        else:
            with open(path, "wb") as f:
                f.truncate(d.size)
        self.paths[d.target] = path
        self.model[d.target] = bytearray(d.size)

    @property
    def location(self) -> str:
        return f"libvirt:///{self.name}?uri={quote(self.daemon.uri, safe='')}"

    def xml(self) -> str:
        disks = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='{d.format}'/>"
            f"<source file='{self.paths[d.target]}'/><target dev='{d.target}' bus='{d.bus}'/></disk>"
            for d in self.specs
        )
        agent = (
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>" if self.agent else ""
        )
        os_xml = self.os_xml or "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
        return (
            f"<domain type='qemu'><name>{self.name}</name><uuid>{self.uuid}</uuid>"
            f"<memory unit='MiB'>{self.memory_mib}</memory><vcpu>1</vcpu>{os_xml}"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"{disks}<interface type='user'><mac address='{self.mac}'/><model type='e1000'/></interface>"
            f"{agent}<controller type='usb' model='none'/><memballoon model='none'/>"
            f"<video><model type='none'/></video>{self.extra_devices}</devices>{self._seclabel()}</domain>"
        )

    def _seclabel(self) -> str:
        """QEMU's user when ``run_as`` is given (the images' folder must let it pass)."""
        if self.run_as is None:
            return ""
        uid, gid = self.run_as
        return f"<seclabel type='static' model='dac' relabel='yes'><label>+{uid}:+{gid}</label></seclabel>"

    @property
    def dom(self) -> Any:
        return self.daemon.conn.lookupByName(self.name)

    def define(self) -> LibvirtVM:
        if self.transient:
            self.daemon.conn.createXML(self.xml(), 0)
        else:
            self.daemon.conn.defineXML(self.xml())
        return self

    def start(self) -> LibvirtVM:
        if self.transient:
            self.daemon.conn.createXML(self.xml(), 0)
        else:
            self.dom.create()
        return self

    def shutdown(self) -> None:
        """Power off (destroy): QEMU quits and saves persistent bitmaps into the qcow2 files."""
        if self.dom.isActive():
            self.dom.destroyFlags(_binding().VIR_DOMAIN_DESTROY_GRACEFUL)

    def restart(self) -> None:
        self.shutdown()
        self.start()

    def agent_command(self, command: str, timeout: int = 10) -> Any:
        """A guest agent command through libvirt (``virDomainQemuAgentCommand``), its ``return``."""
        import json

        import libvirt_qemu

        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, json.dumps({"execute": command}), timeout, 0))[
            "return"
        ]

    def hmp(self, command: str) -> str:
        import libvirt_qemu

        return str(libvirt_qemu.qemuMonitorCommand(self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))

    def qdev(self, target: str) -> str:
        """The QOM path of a disk's block backend (``/machine/peripheral/virtio-disk0/virtio-backend``)."""
        live = ET.fromstring(self.dom.XMLDesc(0))
        for el in live.findall("./devices/disk"):
            t = el.find("target")
            if t is not None and t.get("dev") == target:
                alias = el.find("alias")
                assert alias is not None
                name = alias.get("name", "")
                return (
                    f"/machine/peripheral/{name}/virtio-backend"
                    if t.get("bus") == "virtio"
                    else f"/machine/peripheral/{name}"
                )
        raise KeyError(target)

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        reply = self.hmp(f'qemu-io -d {self.qdev(target)} "write -P {pattern:#x} {offset} {length}"')
        assert reply.strip() == "", f"qemu-io refused the write: {reply}"
        self.model[target][offset : offset + length] = bytes([pattern]) * length

    def attach_disk(self, d: Disk) -> None:
        self._make_disk(d)
        self.specs.append(d)
        xml = (
            f"<disk type='file' device='disk'><driver name='qemu' type='{d.format}'/>"
            f"<source file='{self.paths[d.target]}'/><target dev='{d.target}' bus='{d.bus}'/></disk>"
        )
        lv = _binding()
        flags = lv.VIR_DOMAIN_AFFECT_CONFIG | (lv.VIR_DOMAIN_AFFECT_LIVE if self.dom.isActive() else 0)
        self.dom.attachDeviceFlags(xml, flags)

    def snapshot_model(self) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in self.model.items()}

    def checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.dom.listAllCheckpoints(0))

    def qemu_pid(self) -> int:
        """The PID of the domain's QEMU process (found by its ``-name guest=`` argument)."""
        wanted = f"guest={self.name},".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and b"qemu-system" in argv[0] and any(a.startswith(wanted) for a in argv):
                return int(entry)
        raise LookupError(f"no QEMU process runs domain {self.name}")

    def has_job(self) -> bool:
        try:
            return bool(self.dom.jobStats().get("operation") == 9)
        except Exception:
            return False

    def bitmaps(self, target: str) -> list[str]:
        """Bitmaps in a disk's image: live from QEMU, or from the file when shut off."""
        import json

        if self.dom.isActive():
            import libvirt_qemu

            out = json.loads(
                libvirt_qemu.qemuMonitorCommand(
                    self.dom, json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}}), 0
                )
            )
            names: list[str] = []
            for node in out["return"]:
                if node.get("file") == self.paths[target] and node.get("drv") != "file":
                    names += [b["name"] for b in node.get("dirty-bitmaps") or []]
            return sorted(set(names))
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", self.paths[target]], check=True, capture_output=True
            ).stdout
        )
        return sorted(b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", []))

    def remove(self) -> None:
        lv = _binding()
        with contextlib.suppress(lv.libvirtError):
            dom = self.dom
            if dom.isActive():
                dom.destroy()
            with contextlib.suppress(lv.libvirtError):
                dom.undefineFlags(lv.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | lv.VIR_DOMAIN_UNDEFINE_NVRAM)


@pytest.fixture
def make_domain(libvirtd: Libvirtd, tmp_path: Path) -> Iterator[Callable[..., LibvirtVM]]:
    """Define and start domains in ``tmp_path`` (or ``workdir``); each is destroyed and undefined
    afterwards."""
    made: list[LibvirtVM] = []

    def make(
        disks: list[Disk], *, start: bool = True, name: str | None = None, workdir: Path | None = None, **kw: Any
    ) -> LibvirtVM:
        name = name or f"vmvault-test-{len(made)}-{os.urandom(2).hex()}"
        vm = LibvirtVM(libvirtd, workdir or tmp_path, name, disks, **kw)
        made.append(vm)
        if vm.transient:
            vm.start()
            return vm
        vm.define()
        if start:
            vm.start()
        return vm

    yield make
    for vm in made:
        vm.remove()

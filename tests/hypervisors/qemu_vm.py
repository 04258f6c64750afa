"""A real QEMU VM with no guest OS, for live-backup tests.

QEMU runs under TCG (``-accel tcg``: idles at ~2 % CPU, where KVM with no boot disk spins)
with two QMP sockets: one for the test (guest writes, assertions) and one for vmvault,
because a QMP socket serves one client at a time. Guest writes are injected through the
device's block backend with HMP ``qemu-io -d <QOM path>``, so they take the same path a
guest write takes (through the copy-before-write filter during a backup). A Python model
of every disk records each write; ``verify_model`` checks it against the real image.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmvault.disk.base import ExtentKind
from vmvault.errors import HypervisorError
from vmvault.hypervisors._qmp import QmpClient
from vmvault.hypervisors.base import BackupSession, PreviousBackup, SourceDisk

MiB = 1024 * 1024
#: a Python that another user may run (this one may live in root's home)
SYSTEM_PYTHON = "/usr/bin/python3"


def other_user() -> pwd.struct_passwd:
    """``nobody``: the user to run QEMU as, as libvirt's qemu user or ``-runas`` do, and what a
    QEMU taken over by its guest would do. Skips when this test session cannot switch users."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run QEMU as another user and to hand files to it")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run QEMU as")


@dataclass
class DiskSpec:
    device: str  # qdev id, also vmvault's disk name
    format: str  # "qcow2" or "raw"
    size: int


class QemuVM:
    def __init__(
        self,
        workdir: Path,
        disks: list[DiskSpec],
        *,
        name: str = "testvm",
        uuid: str = "5f0c1b3e-8a62-4c1e-9d7a-1a2b3c4d5e6f",
        extra_args: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.specs = disks
        self.name = name
        self.uuid = uuid
        self.extra_args = extra_args or []
        self.test_sock = str(workdir / "qmp-test.sock")
        self.vmvault_sock = str(workdir / "qmp.sock")
        self.paths = {d.device: str(workdir / f"{d.device}.{d.format}") for d in disks}
        self.model = {d.device: bytearray(d.size) for d in disks}
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self.writes = 0
        for d in disks:
            if d.format == "qcow2":
                subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", self.paths[d.device], str(d.size)], check=True
                )
            else:
                with open(self.paths[d.device], "wb") as f:
                    f.truncate(d.size)

    @property
    def location(self) -> str:
        return f"qemu+unix://{self.vmvault_sock}"

    def command_line(self) -> list[str]:
        args = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-S",
            "-name",
            self.name,
            "-uuid",
            self.uuid,
            "-qmp",
            f"unix:{self.test_sock},server=on,wait=off",
            "-qmp",
            f"unix:{self.vmvault_sock},server=on,wait=off",
        ]
        for i, d in enumerate(self.specs):
            args += [
                "-blockdev",
                f"driver=file,filename={self.paths[d.device]},node-name=file{i}",
                "-blockdev",
                f"driver={d.format},file=file{i},node-name=disk{i}",
                "-device",
                f"virtio-blk-pci,drive=disk{i},id={d.device}",
            ]
        return args + self.extra_args

    def start(self) -> QemuVM:
        for sock in (self.test_sock, self.vmvault_sock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)
        log = open(self.workdir / "qemu.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.command_line(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.test_sock) and os.path.exists(self.vmvault_sock)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {(self.workdir / 'qemu.log').read_text()[-2000:]}")
            time.sleep(0.01)
        self.qmp = connect_when_listening(self.test_sock, self.proc)
        self.qmp.execute("cont")
        return self

    def q(self, command: str, **args: Any) -> Any:
        assert self.qmp is not None
        return self.qmp.execute(command, args or None)

    def write(self, device: str, offset: int, length: int, pattern: int) -> None:
        """A guest-like write of ``length`` bytes of ``pattern`` through the device."""
        reply = self.q(
            "human-monitor-command",
            **{
                "command-line": f"qemu-io -d /machine/peripheral/{device}/virtio-backend "
                f'"write -P {pattern:#x} {offset} {length}"'
            },
        )
        assert reply == "", f"qemu-io refused the write: {reply}"
        self.model[device][offset : offset + length] = bytes([pattern]) * length
        self.writes += 1

    def wait_export_gone(self, export: str) -> None:
        assert self.qmp is not None
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == export, timeout=10)

    def snapshot_model(self) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in self.model.items()}

    # -- state for "nothing left behind" ----------------------------------------------------
    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.q("query-named-block-nodes", flat=True)}

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        for n in self.q("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps") or []}
        raise KeyError(node)

    def vmvault_bitmaps(self, node: str) -> list[str]:
        return sorted(b for b in self.bitmaps(node) if b.startswith("vmvault-"))

    def root_nodes(self) -> dict[str, str]:
        return {b["qdev"].split("/")[3]: b["inserted"]["node-name"] for b in self.q("query-block") if b.get("inserted")}

    def quit(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.q("quit")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
        self.proc = None
        self.qmp = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def restart(self) -> None:
        self.quit()
        self.start()

    def verify_model(self) -> None:
        """Quit QEMU, then check that the images hold exactly the modelled writes.

        (Reading a live qcow2 from outside may see metadata QEMU has not written back yet.)
        """
        self.quit()
        for d in self.specs:
            out = self.workdir / f"verify-{d.device}.raw"
            subprocess.run(
                ["qemu-img", "convert", "-f", d.format, "-O", "raw", self.paths[d.device], str(out)], check=True
            )
            assert out.read_bytes() == self.model[d.device], f"{d.device}: disk differs from the model"
            out.unlink()

    def image_bitmaps(self, device: str) -> list[str]:
        """Bitmaps stored in a qcow2 file (``qemu-img info``)."""
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", self.paths[device]], check=True, capture_output=True
            ).stdout
        )
        return [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]


def connect_when_listening(sock: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> QmpClient:
    """A QMP client for ``sock`` once QEMU listens on it (the file appears just before listen())."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpClient(sock).connect()
        except HypervisorError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None and shutil.which("qemu-img") is not None


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[Callable[..., QemuVM]]:
    """Start VMs in ``tmp_path``; every one is quit (or killed) at the end of the test."""
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 / qemu-img are not installed (Debian: qemu-system-x86 qemu-utils)")
    vms: list[QemuVM] = []

    def make(disks: list[DiskSpec], **kw: Any) -> QemuVM:
        sub = tmp_path / f"vm{len(vms)}"
        sub.mkdir()
        vm = QemuVM(sub, disks, **kw)
        vms.append(vm)
        return vm.start()

    yield make
    for vm in vms:
        vm.quit()


# -- checks shared by the tests ------------------------------------------------------------------


def read_disk(disk: SourceDisk, between: Callable[[int], None] | None = None, step: int = 4 * MiB) -> bytes:
    """The whole disk as the engine reads it: DATA extents read, ZERO extents never read.

    ``between(pos)`` runs after every piece read, so a test can write to the VM meanwhile.
    """
    out = bytearray(disk.image.size)
    for ext in disk.image.extents():
        if ext.kind is not ExtentKind.DATA:
            continue
        pos = ext.offset
        while pos < ext.end:
            n = min(step, ext.end - pos)
            out[pos : pos + n] = disk.image.read(pos, n)
            pos += n
            if between is not None:
                between(pos)
    return bytes(out)


def previous_of(session: BackupSession, snapshot_id: str) -> PreviousBackup:
    return PreviousBackup(snapshot_id, {d.name: dict(d.cbt or {}) for d in session.disks})


def assert_nothing_left(vm: QemuVM, baseline_nodes: set[str], scratch: Path) -> None:
    """Only the VM's own nodes, no job, no export, no scratch file; device roots unchanged."""
    assert vm.node_names() == baseline_nodes
    assert vm.q("query-block-jobs") == []
    assert vm.q("query-block-exports") == []
    assert vm.root_nodes() == {d.device: f"disk{i}" for i, d in enumerate(vm.specs)}
    assert list(scratch.iterdir()) == [], f"left in the scratch folder: {list(scratch.iterdir())}"
    for i, _ in enumerate(vm.specs):
        bitmaps = vm.bitmaps(f"disk{i}")
        assert len([b for b in bitmaps if b.startswith("vmvault-")]) <= 1, bitmaps
        assert all(b["recording"] for b in bitmaps.values()), bitmaps


def covers(changed: list[tuple[int, int]], offset: int, length: int) -> bool:
    """Whether the ranges in ``changed`` cover ``[offset, offset + length)`` completely."""
    pos, end = offset, offset + length
    for off, n in sorted(changed):
        if off <= pos < off + n:
            pos = off + n
        if pos >= end:
            return True
    return pos >= end

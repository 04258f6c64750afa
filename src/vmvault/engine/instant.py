"""Instant recovery: run a snapshot's VM at once from the repository, then move it to local disks.

``start`` makes, in a new target folder DIR:

* an NBD export of every disk the VM runs on (:class:`~vmvault.engine.export.ServeProcess`: a
  process of its own, so that the command ending, a Ctrl-C or a ``kill -9`` of vmvault leaves
  the VM's disks in place);
* a qcow2 overlay per disk whose backing file is that export (``nbd+unix:///?socket=...``):
  the guest's writes stay local, its reads of what it has not written go to the repository;
* the VM running from the overlays: a QEMU process (detached, its own session, in QEMU's
  seccomp sandbox where it has one, and, when vmvault runs as root, under transient ids of its
  own, handed its QMP socket and overlays as descriptors: :meth:`_QemuRunner.launch`), or with
  ``libvirt_uri`` a transient libvirt domain; every disk with ``werror=stop,rerror=stop``: an
  I/O error (the repository unreadable, the export gone for longer than the NBD client's 30 s
  reconnect delay) *pauses* the VM instead of handing the guest an error, so nothing the guest
  wrote is lost or corrupted;
* a QEMU ``block-stream`` job per disk (``on-error=stop``: a read error pauses the job; under
  libvirt ``virDomainBlockPull``, which ends on an error and is started again) that copies
  every block the guest has not written from the export into the overlay. When a job ends
  QEMU drops the overlay's backing (in the image header too): the VM then runs from local
  disks only, and the export is stopped.

The state is one JSON file, ``DIR/instant-restore.json``, replaced atomically (written beside,
fsync'd, renamed) at every change of phase, so ``status``, ``resume`` and ``abort`` work from
another process after any interruption. ``resume`` restarts the export if it is gone, the VM
(rebuilt from the recorded settings, never from a command line read back) if it is gone,
resumes paused jobs and a VM paused on an I/O error, restarts a copy that is not running, and
watches it to the end.

Processes are recognised by PID *and* start time (``/proc/PID/stat``), never by name.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault import platform
from vmvault.engine.export import ServeProcess, process_start_time, running_disks
from vmvault.engine.nbd import nbd_uri
from vmvault.errors import ConfigError, HypervisorError, TargetError, VmvaultError
from vmvault.hypervisors.libvirt import call_within, connect, error_message, import_libvirt
from vmvault.hypervisors.qemu import QmpClient, QmpError
from vmvault.hypervisors.qemu_boot import SANDBOX, open_to_qemu, run_as_ids, supports_sandbox
from vmvault.repo.snapshot import Snapshot

__all__ = [
    "PHASES",
    "STATE_FILE",
    "InstantOptions",
    "abort",
    "load_state",
    "resume",
    "start",
    "status",
    "watch",
]

STATE_FILE = "instant-restore.json"
STATE_VERSION = 1
#: starting: being set up; copying: the VM runs, blocks are being copied; paused: the copy (and
#: perhaps the VM) stopped on an error; done: the VM runs from local disks only; aborted
PHASES = ("starting", "copying", "paused", "done", "aborted")
#: seconds the NBD client waits for a vanished export before an I/O error (then the VM pauses)
RECONNECT_DELAY = 30
#: a unix socket path is at most 107 bytes on Linux
_MAX_SOCKET_PATH = 107
#: the guest's serial console (QEMU runner): a ring buffer of this many bytes inside QEMU (a
#: power of two), moved into DIR/serial.log whenever the VM is looked at (``_QemuRunner.console``)
SERIAL_DEVICE = "serial0"
SERIAL_RING = 1 << 20
#: DIR/serial.log's size at most: past it, it becomes serial.log.1 (replacing the one before)
#: and a new one starts, so a guest printing without end costs the host two of these
SERIAL_LOG_BYTES = 1 << 20
#: what QEMU prints while it starts, kept in DIR/qemu.log (at most this much a start)
QEMU_LOG_BYTES = 1 << 16
#: seconds QEMU may take to answer on its QMP socket
LAUNCH_TIMEOUT = 120
#: the first of QEMU's descriptor sets (``-add-fd``) that hold the overlays, one set a disk
FDSET_BASE = 100
#: the starter of QEMU: a new session (``start_new_session``), a fork, the parent gone at once,
#: so that QEMU is nobody's child but init's (as ``-daemonize`` leaves it); the child's PID
#: written on the descriptor named first (then closed in the child)
_DETACH = (
    "import os, sys\n"
    "report = int(sys.argv[1])\n"
    "pid = os.fork()\n"
    "if pid:\n    os.write(report, str(pid).encode())\n    os._exit(0)\n"
    "os.close(report)\n"
    "try:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as exc:\n    sys.stderr.write(f'{sys.argv[2]}: {exc}\\n')\n    os._exit(127)\n"
)

ProgressFn = Callable[[int, int], None]


class InstantOptions:
    """How to run the VM: accelerator, memory, CPUs, extra QEMU arguments, copy speed limit."""

    def __init__(
        self,
        *,
        accel: str = "tcg",
        memory_mb: int | None = None,
        cpus: int | None = None,
        qemu_args: list[str] | None = None,
        speed: int = 0,
        cache_bytes: int | None = None,
        qemu: str = "qemu-system-x86_64",
        libvirt_uri: str | None = None,
        qemu_as_root: bool = False,
    ) -> None:
        if accel not in ("tcg", "kvm"):
            raise ConfigError(f"--accel is tcg or kvm, not {accel!r}")
        self.accel = accel
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.qemu_args = list(qemu_args or [])
        self.speed = speed
        self.cache_bytes = cache_bytes
        self.qemu = qemu
        self.libvirt_uri = libvirt_uri
        #: run QEMU as root (vmvault running as root) rather than under transient ids of its own
        self.qemu_as_root = qemu_as_root


# ---------------------------------------------------------------------------- state file


def _state_path(target: Path) -> Path:
    return target / STATE_FILE


def save_state(target: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically: a crash leaves the old state or the new, never a mix."""
    state["updated"] = time.time()
    tmp = target / f".{STATE_FILE}.tmp"
    data = json.dumps(state, indent=2).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, _state_path(target))
    dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_state(target: Path) -> dict[str, Any]:
    path = _state_path(target)
    try:
        _private(target)
    except FileNotFoundError as exc:
        raise ConfigError(f"{target}: no instant restore here (no such folder)") from exc
    except TargetError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as exc:
        raise ConfigError(f"{target}: no instant restore here (no {STATE_FILE})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the instant-restore state: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        raw = f.read(1 << 20)
    try:
        state = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: the instant-restore state is not valid JSON") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("phase") not in PHASES:
        raise ConfigError(f"{path}: not an instant-restore state this vmvault understands")
    disks = state.get("disks")
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
        raise ConfigError(f"{path}: the instant-restore state lists no disks")
    for disk in disks:
        for key in ("overlay", "socket"):
            value = disk.get(key)
            # every file the state names is in DIR: a forged state cannot make abort remove another file
            if not isinstance(value, str) or Path(value).parent != target:
                raise ConfigError(f"{path}: disk entry {key} {value!r} is not in {target}")
    return state


# ---------------------------------------------------------------------------- the VM


def _serve(state: dict[str, Any]) -> ServeProcess | None:
    doc = state.get("serve")
    return ServeProcess.from_doc(doc) if isinstance(doc, dict) else None


def _vm_config(snap: Snapshot, options: InstantOptions) -> dict[str, Any]:
    """What the VM runs with: the options given, else what the snapshot recorded, within bounds."""
    vm = snap.vm if isinstance(snap.vm, dict) else {}
    memory = options.memory_mb
    if memory is None:
        recorded = vm.get("memory")
        memory = int(recorded) >> 20 if isinstance(recorded, int) and recorded > 0 else 1024
    cpus = options.cpus
    if cpus is None:
        recorded_cpus = vm.get("cpus")
        cpus = recorded_cpus if isinstance(recorded_cpus, int) and recorded_cpus > 0 else 1
    return {
        # a libvirt domain's name must be unique on its host: one instant restore per name
        "name": f"vmvault-instant-{snap.short_id}-{secrets.token_hex(3)}",
        "accel": options.accel,
        "memory_mb": min(max(memory, 64), 1 << 16),
        "cpus": min(max(cpus, 1), 64),
        "qemu_args": list(options.qemu_args),
        "libvirt_uri": options.libvirt_uri,
    }


def _checked_config(target: Path, config: Any) -> tuple[str, str, int, int, list[str]]:
    """The state's VM settings, checked: the VM is always rebuilt from them, never taken as is."""
    try:
        name, accel = str(config["name"]), str(config["accel"])
        memory, cpus = int(config["memory_mb"]), int(config["cpus"])
        extra = [str(a) for a in config["qemu_args"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{target}: the state's VM settings are malformed") from exc
    if accel not in ("tcg", "kvm") or not 64 <= memory <= 1 << 16 or not 1 <= cpus <= 64:
        raise ConfigError(f"{target}: the state's VM settings are out of range")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{target}: the state's VM name is malformed")
    return name, accel, memory, cpus, extra


@dataclass
class _Poll:
    """One look at the VM and its copy."""

    vm: str  # QEMU's run state: running, io-error, paused, ...
    copied: int
    total: int
    #: disks whose copy job exists, and of those the ones paused on an error
    active: set[int] = field(default_factory=set)
    paused: set[int] = field(default_factory=set)
    #: disks whose overlay still has its backing (the export)
    backed: set[int] = field(default_factory=set)
    #: a job that ended on an error: its disk and the error
    failed: dict[int, str] = field(default_factory=dict)


class _Runner:
    """Runs the VM from the overlays and its copy jobs: plain QEMU (QMP) or a libvirt domain."""

    def __init__(self, target: Path, state: dict[str, Any]) -> None:
        self.target = target
        self.state = state
        self.disks: list[dict[str, Any]] = state["disks"]

    def alive(self) -> bool:
        raise NotImplementedError

    def launch(self) -> str:
        """Start the VM from the overlays (their backing the export); says what was started."""
        raise NotImplementedError

    def poll(self) -> _Poll:
        raise NotImplementedError

    def start_copy(self, speed: int) -> None:
        """A copy job for every disk that is still backed and has none."""
        raise NotImplementedError

    def resume_copy(self) -> None:
        """Resume paused jobs, and the VM when it is paused on an I/O error."""
        raise NotImplementedError

    def finish(self) -> None:
        """After every copy: let go of the export."""

    def stop(self, timeout: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _QemuRunner(_Runner):
    """QEMU started by vmvault (detached, sandboxed: :meth:`launch`), driven over its QMP socket in DIR."""

    def __init__(self, target: Path, state: dict[str, Any], *, qemu: str = "qemu-system-x86_64") -> None:
        super().__init__(target, state)
        self.qemu = qemu
        self._client: QmpClient | None = None

    @property
    def qmp(self) -> QmpClient:
        if self._client is None:
            self._client = QmpClient(str(self.target / "qmp.sock"), timeout=10.0).connect()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def alive(self) -> bool:
        qemu = self.state.get("qemu") or {}
        pid, start = qemu.get("pid"), qemu.get("start_time")
        return isinstance(pid, int) and isinstance(start, int) and process_start_time(pid) == start

    def ids(self) -> tuple[int, int] | None:
        return _recorded_ids(self.target, self.state)

    def argv(self, qmp: int, overlays: list[tuple[int, int]]) -> list[str]:
        """QEMU's command line. It serves QMP on the listening socket ``qmp`` and reads and
        writes each overlay through the descriptors of ``overlays`` (read-write, read-only), so
        that it needs no right on DIR's files; it reaches the exports by their names, relative
        to its working folder (DIR), and needs no right on the folders above DIR."""
        name, accel, memory, cpus, extra = _checked_config(self.target, self.state.get("vm_config"))
        argv = [
            self.qemu,
            "-name", name,
            "-machine", "q35",
            "-accel", accel,
            "-m", str(memory),
            "-smp", str(cpus),
            "-nodefaults",
            "-display", "none",
            "-chardev", f"socket,id=vmvault-qmp,fd={qmp},server=on,wait=off",
            "-mon", "chardev=vmvault-qmp,mode=control",
            "-chardev", f"ringbuf,id={SERIAL_DEVICE},size={SERIAL_RING}",
            "-serial", f"chardev:{SERIAL_DEVICE}",
        ]  # fmt: skip
        for i, disk in enumerate(self.disks):
            fdset = FDSET_BASE + i
            for fd in overlays[i]:
                argv += ["-add-fd", f"fd={fd},set={fdset}"]
            nbd = {
                "driver": "nbd",
                "node-name": f"vmvault-nbd{i}",
                "server": {"type": "unix", "path": os.path.basename(disk["socket"])},
                "read-only": True,
                "reconnect-delay": RECONNECT_DELAY,
            }
            overlay = {
                "driver": "qcow2",
                "node-name": f"vmvault-disk{i}",
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"},
                "backing": f"vmvault-nbd{i}",
            }
            argv += ["-blockdev", json.dumps(nbd), "-blockdev", json.dumps(overlay)]
            argv += [
                "-device",
                f"virtio-blk-pci,drive=vmvault-disk{i},id=vmvault-vd{i},werror=stop,rerror=stop,bootindex={i}",
            ]
        return argv + extra

    def launch(self) -> str:
        self.close()
        ids = self.ids()
        accel = _checked_config(self.target, self.state.get("vm_config"))[1]
        for name in ("qemu.pid", "qmp.sock"):  # (qemu.pid: what an earlier version had QEMU write)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.target / name)
        _open_exports(self.target, self.state)
        with contextlib.ExitStack() as held:  # vmvault's copies of what QEMU is handed
            qmp = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            try:
                qmp.bind(str(self.target / "qmp.sock"))
                qmp.listen(1)
            except OSError as exc:
                raise HypervisorError(f"cannot make QEMU's QMP socket in {self.target}: {exc.strerror}") from exc
            overlays = []
            for disk in self.disks:
                pair = (_open_overlay(disk["overlay"], os.O_RDWR), _open_overlay(disk["overlay"], os.O_RDONLY))
                for fd in pair:
                    held.callback(os.close, fd)
                overlays.append(pair)
            argv = self.argv(qmp.fileno(), overlays)
            sandbox = "-sandbox" not in argv and supports_sandbox(self.qemu)
            if sandbox:
                argv[1:1] = ["-sandbox", SANDBOX]
            if ids is not None:
                argv = run_as_ids(argv, ids, kvm=accel == "kvm", pdeathsig=False)
            fds = (qmp.fileno(), *(fd for pair in overlays for fd in pair))
            pid, output, outcome = self._start_detached(argv, fds)
        with contextlib.suppress(OSError):  # (its words are in the error below, if it failed)
            append_bounded(self.target / "qemu.log", output, QEMU_LOG_BYTES)
        start_time = None if pid is None else process_start_time(pid)
        if outcome != "ready":
            if outcome == "timeout" and pid is not None:  # still holding its output pipe: stuck
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            lines = output.decode("utf-8", "replace").strip().splitlines()[-3:]
            why = " / ".join(lines) or f"its QMP socket did not answer within {LAUNCH_TIMEOUT} s"
            if ids is not None and b"Permission denied" in output:
                why += (
                    f" (QEMU runs as user id {ids[0]}, not root: a file named in --qemu-arg must be readable by "
                    "others, or give --qemu-as-root)"
                )
            raise HypervisorError(f"QEMU could not be started: {why}")
        if pid is None or start_time is None:
            raise HypervisorError("QEMU answered, then ended at once (see qemu.log)")
        self.state["qemu"] = {"pid": pid, "start_time": start_time, "qmp": str(self.target / "qmp.sock")}
        who = "" if ids is None else f" as user id {ids[0]}"
        return f"QEMU PID {pid}{who}, " + ("in a seccomp sandbox" if sandbox else "not sandboxed (see qemu.log)")

    def _start_detached(self, argv: list[str], fds: tuple[int, ...] = ()) -> tuple[int | None, bytes, str]:
        """Start QEMU as a daemon of its own session (not vmvault's child) and wait until its QMP
        socket answers ("ready"), or it ends ("ended"), or LAUNCH_TIMEOUT passes ("timeout"):
        its PID (None if it was never started), what it printed meanwhile (at most
        QEMU_LOG_BYTES), and which of the three. QEMU inherits the descriptors ``fds``; it
        runs in DIR.

        Not QEMU's ``-daemonize``: its sandbox's ``spawn=deny`` and ``elevateprivileges=deny``
        forbid the fork and setsid that needs (QEMU 7.2 is killed or exits). A short-lived
        Python process starts a new session, forks QEMU and exits. QEMU's output goes into a
        pipe read here until it answers; the pipe is closed then, so what it prints later
        fails to be written (QEMU ignores SIGPIPE) instead of growing a file without bound."""
        read_end, write_end = os.pipe()
        pid_read, pid_write = os.pipe()
        try:
            try:
                starter = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _DETACH, str(pid_write), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=write_end,
                    stderr=write_end,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(pid_write, *fds),
                    cwd=self.target,
                )
            except OSError as exc:
                raise HypervisorError(f"QEMU could not be started: {exc}") from exc
            finally:
                os.close(write_end)
                os.close(pid_write)
            starter.wait()
            reported = os.read(pid_read, 32)
            pid = int(reported) if reported.isdigit() else None
            output = bytearray()
            ended = False
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            while time.monotonic() < deadline:
                if not ended and platform.wait_readable(read_end, 0.1):
                    part = os.read(read_end, 65536)
                    ended = not part
                    output += part[: max(0, QEMU_LOG_BYTES - len(output))]
                    continue
                if ended:  # every writer gone: QEMU ended, or never started (its pipe closes with it)
                    return pid, bytes(output), "ended"
                if (self.target / "qmp.sock").exists():
                    try:
                        self._client = QmpClient(str(self.target / "qmp.sock"), timeout=2.0).connect()
                        return pid, bytes(output), "ready"
                    except HypervisorError:
                        pass  # not serving yet (it answers once it is set up)
            return pid, bytes(output), "timeout"
        finally:
            os.close(read_end)
            os.close(pid_read)

    def _backed(self) -> set[int]:
        """Overlays that still have a backing file (query-block; not query-named-block-nodes,
        which QEMU 7.2 crashes on after a stream job dropped a backing node)."""
        nodes = set()
        for dev in self.qmp.execute("query-block"):
            inserted = dev.get("inserted") or {}
            if inserted.get("image", {}).get("backing-image") is not None:
                nodes.add(str(inserted.get("node-name")))
        return {i for i in range(len(self.disks)) if f"vmvault-disk{i}" in nodes}

    def _jobs(self) -> dict[int, dict[str, Any]]:
        ids = {f"vmvault-stream{i}": i for i in range(len(self.disks))}
        return {ids[j["device"]]: j for j in self.qmp.execute("query-block-jobs") if j.get("device") in ids}

    def console(self) -> None:
        """Move what the guest printed on its serial console out of QEMU's ring buffer into
        DIR/serial.log (``append_bounded``). A QEMU started by an earlier version (its console a
        file of its own) has no ring: nothing to move."""
        for _ in range(64):  # a guest printing faster than this reads is cut, never followed
            try:
                text = self.qmp.execute(
                    "ringbuf-read", {"device": SERIAL_DEVICE, "size": SERIAL_RING, "format": "base64"}
                )
            except QmpError:
                return
            data = base64.b64decode(str(text or ""))
            if not data:
                return
            try:
                append_bounded(self.target / "serial.log", data, SERIAL_LOG_BYTES)
            except OSError:
                return  # DIR full or unwritable: the console's text is lost, the VM and its copy go on
            if len(data) < SERIAL_RING:
                return

    def poll(self) -> _Poll:
        self.console()
        jobs = self._jobs()
        p = _Poll(vm=str(self.qmp.execute("query-status").get("status")), copied=0, total=0, backed=self._backed())
        for i, disk in enumerate(self.disks):
            job = jobs.get(i)
            if job is not None and job.get("status") == "concluded":
                # auto-dismiss is off so that an end seen by nobody (vmvault killed) is still seen
                if job.get("error"):
                    p.failed[i] = str(job["error"])
                self.qmp.execute("job-dismiss", {"id": job["device"]})
                job = None
            if job is not None:
                p.active.add(i)
                if job.get("status") == "paused":
                    p.paused.add(i)
                p.copied += int(job.get("offset", 0))
                p.total += max(int(job.get("len", 0)), 1)
            else:
                p.total += int(disk["size"])
                if i not in p.backed:
                    p.copied += int(disk["size"])
        return p

    def start_copy(self, speed: int) -> None:
        jobs, backed = self._jobs(), self._backed()
        for i in range(len(self.disks)):
            if i in jobs or i not in backed:
                continue
            args: dict[str, Any] = {
                "job-id": f"vmvault-stream{i}",
                "device": f"vmvault-disk{i}",
                "on-error": "stop",
                "auto-dismiss": False,
            }
            if speed:
                args["speed"] = speed
            self.qmp.execute("block-stream", args)

    def resume_copy(self) -> None:
        for i, job in self._jobs().items():
            if job.get("status") == "paused":
                with contextlib.suppress(QmpError):
                    self.qmp.execute("block-job-resume", {"device": f"vmvault-stream{i}"})
        if self.qmp.execute("query-status").get("status") == "io-error":
            self.qmp.execute("cont")

    def finish(self) -> None:
        for i in range(len(self.disks)):
            with contextlib.suppress(QmpError):
                self.qmp.execute("blockdev-del", {"node-name": f"vmvault-nbd{i}"})

    def stop(self, timeout: float) -> None:
        if not self.alive():
            return
        pid = int(self.state["qemu"]["pid"])
        with contextlib.suppress(HypervisorError):
            self.console()  # its last words
        try:
            self.qmp.execute("quit")
        except HypervisorError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.close()
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class _LibvirtRunner(_Runner):
    """A transient libvirt domain (gone when it stops; made again from the settings on resume),
    its copy through ``virDomainBlockPull`` (QEMU's block-stream)."""

    def __init__(self, target: Path, state: dict[str, Any]) -> None:
        super().__init__(target, state)
        self.lv = import_libvirt()
        config = state.get("vm_config") or {}
        self.uri = str(config.get("libvirt_uri") or "")
        self.name = _checked_config(target, config)[0]
        self._conn: Any = None
        #: polls in a row that found a backed disk without a job (a pull that ended on an error)
        self._orphaned: dict[int, int] = {}

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = connect(self.lv, self.uri).unbounded  # ``_call`` bounds the calls that matter
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:  # bounded: libvirt waits for a stopped or stuck QEMU without a limit
            return call_within(None, f"libvirt: {what} of {self.name}", lambda: fn(*args))
        except self.lv.libvirtError as exc:
            raise HypervisorError(f"libvirt: {what} of {self.name} failed: {error_message(exc)}") from exc

    def _domain(self) -> Any:
        try:
            return self.conn.lookupByName(self.name)
        except self.lv.libvirtError:
            return None

    def alive(self) -> bool:
        dom = self._domain()
        return bool(dom is not None and dom.isActive())

    def domain_xml(self) -> str:
        name, accel, memory, cpus, extra = _checked_config(self.target, self.state.get("vm_config"))
        if extra:
            raise ConfigError("--qemu-arg is for plain QEMU; a libvirt domain takes its devices from libvirt")
        root = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "memory", unit="MiB").text = str(memory)
        ET.SubElement(root, "vcpu").text = str(cpus)
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
        devices = ET.SubElement(root, "devices")
        for i, disk in enumerate(self.disks):
            d = ET.SubElement(devices, "disk", type="file", device="disk")
            ET.SubElement(d, "driver", name="qemu", type="qcow2", error_policy="stop", rerror_policy="stop")
            ET.SubElement(d, "source", file=disk["overlay"])
            backing = ET.SubElement(d, "backingStore", type="network")
            ET.SubElement(backing, "format", type="raw")
            src = ET.SubElement(backing, "source", protocol="nbd")
            ET.SubElement(src, "host", transport="unix", socket=disk["socket"])
            ET.SubElement(src, "reconnect", delay=str(RECONNECT_DELAY))
            ET.SubElement(backing, "backingStore")
            ET.SubElement(d, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
            ET.SubElement(d, "boot", order=str(i + 1))
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(self.target / "serial.log"))
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", type="none")
        return ET.tostring(root, encoding="unicode")

    def launch(self) -> str:
        if len(self.disks) > 26:
            raise ConfigError("a libvirt instant restore takes at most 26 disks (vda to vdz)")
        xml = self.domain_xml()
        dom = self._call("starting the domain", self.conn.createXML, xml, 0)
        self.state["libvirt"] = {"uri": self.uri, "name": self.name, "uuid": dom.UUIDString()}
        return f"libvirt domain {self.name}"

    def _targets(self) -> list[str]:
        return [f"vd{chr(ord('a') + i)}" for i in range(len(self.disks))]

    def _backed(self, dom: Any) -> set[int]:
        root = ET.fromstring(self._call("reading the definition", dom.XMLDesc, 0))
        out = set()
        for disk in root.findall("./devices/disk"):
            dev = disk.find("target")
            backing = disk.find("backingStore")
            if dev is None or backing is None or backing.find("source") is None:
                continue
            with contextlib.suppress(ValueError):
                out.add(self._targets().index(dev.get("dev", "")))
        return out

    def poll(self) -> _Poll:
        dom = self._domain()
        if dom is None or not dom.isActive():
            raise HypervisorError(f"the libvirt domain {self.name} is not running")
        state, reason = self._call("reading the state", dom.state, 0)
        vm = {1: "running", 3: "paused"}.get(state, "other")
        if state == 3 and reason == 5:  # VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_IOERROR
            vm = "io-error"
        p = _Poll(vm=vm, copied=0, total=0, backed=self._backed(dom))
        for i, (dev, disk) in enumerate(zip(self._targets(), self.disks, strict=True)):
            info = self._call("reading the copy's progress", dom.blockJobInfo, dev, 0)
            if info:
                self._orphaned.pop(i, None)
                p.active.add(i)
                p.copied += int(info.get("cur", 0))
                p.total += max(int(info.get("end", 0)), 1)
                continue
            p.total += int(disk["size"])
            if i not in p.backed:
                p.copied += int(disk["size"])
            else:
                # libvirt forgets a pull that failed; its backing left in place says so (asked
                # three times, since the definition follows the job's end a moment later)
                self._orphaned[i] = self._orphaned.get(i, 0) + 1
                if self._orphaned[i] >= 3:
                    p.failed[i] = "the copy ended before every block was copied (a read error)"
        return p

    def start_copy(self, speed: int) -> None:
        dom = self._domain()
        if dom is None:
            raise HypervisorError(f"the libvirt domain {self.name} is not running")
        backed = self._backed(dom)
        for i, dev in enumerate(self._targets()):
            if i not in backed or self._call("reading the copy's progress", dom.blockJobInfo, dev, 0):
                continue
            # bandwidth in MiB/s (0: no limit)
            self._call("starting the copy", dom.blockPull, dev, -(-speed >> 20) if speed else 0, 0)
            self._orphaned.pop(i, None)

    def resume_copy(self) -> None:
        dom = self._domain()
        if dom is not None and dom.state(0) == [3, 5]:
            self._call("resuming the domain", dom.resume)

    def stop(self, timeout: float) -> None:
        dom = self._domain()
        if dom is not None and dom.isActive():
            self._call("stopping the domain", dom.destroy)


def append_bounded(path: Path, data: bytes, limit: int) -> None:
    """Append ``data`` to the log ``path``, which stays under ``limit`` bytes: past it the log
    becomes ``<path>.1`` (replacing the one before) and a new one starts; of ``data`` longer
    than ``limit`` the end is kept. No link is followed (the folder is this user's, checked)."""
    data = data[-limit:]
    try:
        size = os.lstat(path).st_size
    except FileNotFoundError:
        size = 0
    if size and size + len(data) > limit:
        platform.replace(str(path), f"{path}.1")
    fd = platform.open_nofollow(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | platform.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _open_overlay(path: str, flags: int) -> int:
    try:
        return platform.open_nofollow(path, flags | platform.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"cannot open the overlay {path}: {exc.strerror or exc}") from exc


def _recorded_ids(target: Path, state: dict[str, Any]) -> tuple[int, int] | None:
    """The user and group ids QEMU runs under (``qemu_ids`` in the state), or None: as vmvault
    (a state of an earlier version, ``--qemu-as-root``, vmvault not root, libvirt)."""
    ids = state.get("qemu_ids")
    if ids is None:
        return None
    # (type, not isinstance: a bool is not an id)
    if not (
        isinstance(ids, list) and len(ids) == 2 and all(type(n) is int and n in platform.TRANSIENT_IDS for n in ids)
    ):
        raise ConfigError(f"{target}: the state's QEMU ids are malformed")
    return ids[0], ids[1]


def _open_exports(target: Path, state: dict[str, Any]) -> None:
    """For a QEMU under ids of its own (``qemu_ids``): DIR stays root's, and its group may look
    names up in it (not list, add or remove them) and connect to the exports' sockets; no one
    else may. Again whenever the export starts (it makes its sockets anew)."""
    ids = _recorded_ids(target, state)
    if ids is None:
        return
    try:  # (every socket the state names is in DIR: load_state)
        open_to_qemu(str(target), ids, connect=[os.path.basename(d["socket"]) for d in state["disks"]])
    except OSError as exc:  # a file system that keeps root from giving files away (NFS's root_squash)
        raise TargetError(
            f"{target}: cannot open the exports to QEMU's user ({exc.strerror}); use a folder on a local "
            "file system, or --qemu-as-root"
        ) from exc


def _runner(target: Path, state: dict[str, Any]) -> _Runner:
    config = state.get("vm_config") or {}
    if isinstance(config, dict) and config.get("libvirt_uri"):
        return _LibvirtRunner(target, state)
    return _QemuRunner(target, state)


# ---------------------------------------------------------------------------- operations


def _private(target: Path, *, exists: bool = True) -> None:
    """Refuse a folder another account owns, or one in a folder others can write (not sticky),
    where they could rename it away and put theirs: they could swap the overlays (the guest's
    decrypted disks) for links, read them, or forge the state vmvault acts on (PIDs it stops)."""
    uid = platform.current_uid()
    why = platform.others_can_change(str(target.parent), container=True)
    if why is not None:
        raise TargetError(f"{target}: {why}; give a folder only this user can change")
    st = os.lstat(target) if exists else None
    if st is not None and uid is not None and st.st_uid != uid:
        raise TargetError(f"{target} belongs to user id {st.st_uid}, not to this user; give a folder of your own")


def _prepare_target(target: Path) -> None:
    if target.is_symlink():
        raise TargetError(f"{target} is a symbolic link; give a real folder")
    _private(target, exists=target.exists())
    if target.exists():
        if not target.is_dir():
            raise TargetError(f"{target} exists and is not a folder")
        if (target / STATE_FILE).exists():
            raise TargetError(f"{target} holds an instant restore already: use --status, --resume or --abort")
        if any(target.iterdir()):
            raise TargetError(f"{target} is not empty; instant restore needs a new or empty folder")
        try:
            os.chmod(target, 0o700)  # QEMU's QMP socket and the overlays are for this user only
        except OSError as exc:
            raise TargetError(f"{target}: cannot make the folder private: {exc.strerror or exc}") from exc
    else:
        try:
            target.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise TargetError(f"{target}: cannot create the folder: {exc.strerror or exc}") from exc
    if len(str(target / "qmp.sock")) > _MAX_SOCKET_PATH or len(str(target / "nbd-99.sock")) > _MAX_SOCKET_PATH:
        raise TargetError(f"{target}: the path is too long for the sockets it must hold; choose a shorter one")


COPYING = "the VM runs; its disks are being copied to local overlays"


def start(
    location: str,
    secret: bytes | None,
    snap: Snapshot,
    target: Path,
    options: InstantOptions,
    *,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Set up and start the VM and the copy; returns the state (phase ``copying``)."""
    say = on_event or (lambda _text: None)
    if options.libvirt_uri is None and shutil.which(options.qemu) is None:
        raise ConfigError(f"{options.qemu} is not installed (Debian package qemu-system-x86)")
    if shutil.which("qemu-img") is None:
        raise ConfigError("qemu-img is not installed (Debian package qemu-utils)")
    if options.libvirt_uri is not None:
        import_libvirt()  # a missing binding is said before anything is made
        if options.qemu_args:
            raise ConfigError("--qemu-arg is for plain QEMU; a libvirt domain takes its devices from libvirt")
    target = target.absolute()
    _prepare_target(target)
    records = running_disks(snap)
    if not records:
        raise ConfigError(f"snapshot {snap.short_id} has no disks to run a VM from")
    disks: list[dict[str, Any]] = [
        {
            "name": record.name,
            "size": record.size,
            "socket": str(target / f"nbd-{i}.sock"),
            "overlay": str(target / f"disk{i}.qcow2"),
        }
        for i, record in enumerate(records)
    ]
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "phase": "starting",
        "message": "setting up",
        "snapshot": snap.id,
        "vm": snap.vm.get("name") if isinstance(snap.vm, dict) else None,
        "created": time.time(),
        "speed": options.speed,
        "cache_bytes": options.cache_bytes,
        "disks": disks,
        "vm_config": _vm_config(snap, options),
    }
    if options.libvirt_uri is None and not options.qemu_as_root and platform.current_uid() == 0:
        # the VM is untrusted: a guest that takes QEMU over must not hold root's rights
        ids = platform.transient_ids()
        if ids is None:
            say("QEMU runs as root: this user namespace maps no unused id for it (a container's?)")
        else:
            state["qemu_ids"] = list(ids)
    save_state(target, state)
    try:
        serve = ServeProcess.start(
            location,
            secret,
            snap.id,
            {d["name"]: d["socket"] for d in disks},
            lease=str(target / "serve.lease"),
            log=str(target / "serve.log"),
            cache_bytes=options.cache_bytes,
        )
    except VmvaultError:
        state["phase"], state["message"] = "aborted", "the NBD export could not be started (see serve.log)"
        save_state(target, state)
        raise
    state["serve"] = serve.to_doc()
    save_state(target, state)
    _open_exports(target, state)
    say(f"serving {len(disks)} disk(s) of snapshot {snap.short_id} from the repository")
    runner = _QemuRunner(target, state, qemu=options.qemu) if options.libvirt_uri is None else _runner(target, state)
    with runner:
        try:
            for disk in disks:
                r = subprocess.run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", nbd_uri(disk["socket"]),
                     disk["overlay"], str(disk["size"])],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                if r.returncode != 0:
                    raise HypervisorError(
                        f"qemu-img could not create the overlay {disk['overlay']}: {r.stderr.strip()}"
                    )
            what = runner.launch()
        except VmvaultError:
            serve.stop()
            state["phase"], state["message"] = "aborted", "the VM could not be started"
            save_state(target, state)
            raise
        save_state(target, state)
        say(f"VM started ({what}), its disks read from the repository")
        runner.start_copy(options.speed)
    state["phase"], state["message"] = "copying", COPYING
    save_state(target, state)
    return state


def _finish(state: dict[str, Any], target: Path, runner: _Runner) -> dict[str, Any]:
    runner.finish()
    serve = _serve(state)
    if serve is not None:
        serve.stop()
    state["phase"] = "done"
    state["message"] = "the VM runs from local disks only; the repository is no longer needed"
    state["finished"] = time.time()
    save_state(target, state)
    return state


def watch(
    target: Path, *, on_progress: ProgressFn | None = None, poll: float = 0.5, timeout: float | None = None
) -> dict[str, Any]:
    """Follow the copy until it is done, or stops on an error (phase ``paused``, with a message
    naming it); ``timeout`` returns the state as it is."""
    target = target.absolute()
    state = load_state(target)
    if state["phase"] != "copying":
        return state
    deadline = None if timeout is None else time.monotonic() + timeout
    runner = _runner(target, state)
    try:
        with runner:
            return _watch(target, state, runner, on_progress=on_progress, poll=poll, deadline=deadline)
    except HypervisorError:
        if runner.alive():
            raise
        current = load_state(target)
        if current["phase"] != "copying":
            return current  # ended by another command (--abort) meanwhile
        state["phase"] = "paused"
        state["message"] = (
            "the VM is not running (the guest shut down, or it was stopped); the overlays hold the guest's "
            "writes: `vmvault instant-restore --resume DIR` starts it again from them"
        )
        save_state(target, state)
        return state


def _watch(
    target: Path,
    state: dict[str, Any],
    runner: _Runner,
    *,
    on_progress: ProgressFn | None,
    poll: float,
    deadline: float | None,
) -> dict[str, Any]:
    while True:
        p = runner.poll()
        if on_progress is not None:
            on_progress(p.copied, p.total)
        if p.failed:
            i, error = next(iter(p.failed.items()))
            state["phase"] = "paused"
            state["message"] = (
                f"the copy of disk {state['disks'][i]['name']} stopped: {error} (see serve.log); nothing the guest "
                "wrote is lost. Fix the repository or its storage, then run `vmvault instant-restore --resume DIR`"
            )
            save_state(target, state)
            return state
        if p.vm == "io-error" or p.paused:
            what = "the VM is paused on an I/O error" if p.vm == "io-error" else "the copy is paused on an error"
            state["phase"] = "paused"
            state["message"] = (
                f"{what} reading the repository (see serve.log); nothing the guest wrote is lost. "
                "Fix the repository or its storage, then run `vmvault instant-restore --resume DIR`"
            )
            save_state(target, state)
            return state
        if not p.backed and not p.active:
            return _finish(state, target, runner)
        if deadline is not None and time.monotonic() > deadline:
            return state
        time.sleep(poll)


def resume(
    location: str,
    secret: bytes | None,
    target: Path,
    *,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Bring a stopped or interrupted instant restore back to copying (then ``watch`` it)."""
    say = on_event or (lambda _text: None)
    target = target.absolute()
    state = load_state(target)
    if state["phase"] in ("done", "aborted"):
        return state
    if "serve" not in state or "vm_config" not in state:
        raise ConfigError(
            f"{target}: the instant restore was interrupted before its VM started; "
            "run `vmvault instant-restore --abort DIR --remove-disks` and start again"
        )
    serve = _serve(state)
    if serve is None or not serve.alive():
        sockets = {d["name"]: d["socket"] for d in state["disks"]}
        for path in sockets.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a socket left by a killed export
        serve = ServeProcess.start(
            location,
            secret,
            str(state["snapshot"]),
            sockets,
            lease=str(target / "serve.lease"),
            log=str(target / "serve.log"),
            cache_bytes=None if state.get("cache_bytes") is None else int(state["cache_bytes"]),
        )
        state["serve"] = serve.to_doc()
        save_state(target, state)
        _open_exports(target, state)
        say("the NBD export was not running; restarted it")
    with _runner(target, state) as runner:
        if not runner.alive():
            what = runner.launch()
            save_state(target, state)
            say(f"the VM was not running; started it again from its overlays ({what})")
        # the NBD client reconnects on its next request: retry until jobs and VM stay running
        for _ in range(30):
            runner.resume_copy()
            runner.start_copy(int(state.get("speed", 0)))
            time.sleep(1.0)
            p = runner.poll()
            if p.vm != "io-error" and not p.paused and not p.failed:
                break
        else:
            raise VmvaultError(
                f"{target}: the copy stops again at once: the repository is still unreadable (see serve.log)"
            )
    state["phase"], state["message"] = "copying", COPYING
    save_state(target, state)
    return state


def status(target: Path) -> dict[str, Any]:
    """The state, with what is running now: the VM, the export, the VM's status and the copy."""
    target = target.absolute()
    state = load_state(target)
    serve = _serve(state)
    live: dict[str, Any] = {"export": bool(serve and serve.alive())}
    try:
        with _runner(target, state) as runner:
            live["qemu"] = runner.alive()
            if live["qemu"]:
                p = runner.poll()
                live["vm"], live["copied"], live["total"] = p.vm, p.copied, p.total
    except (HypervisorError, ConfigError) as exc:
        live.setdefault("qemu", False)
        live["error"] = str(exc)
    state["live"] = live
    return state


def abort(target: Path, *, remove_disks: bool = False, timeout: float = 30.0) -> dict[str, Any]:
    """Stop the VM and the export; remove the overlays only when asked."""
    target = target.absolute()
    state = load_state(target)
    if "vm_config" in state:
        with _runner(target, state) as runner:
            runner.stop(timeout)
    serve = _serve(state)
    if serve is not None:
        serve.stop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target / "serve.lease")
    if _recorded_ids(target, state) is not None:  # QEMU is gone: DIR is this user's alone again
        with contextlib.suppress(OSError):
            os.chown(target, -1, os.getgid())
            os.chmod(target, 0o700)
    removed = []
    if remove_disks:
        for disk in state["disks"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk["overlay"])
                removed.append(disk["overlay"])
    was_done = state["phase"] == "done"
    state["phase"] = "aborted"
    if remove_disks:
        state["message"] = "stopped; the VM and its overlays (with the guest's writes) were removed"
    elif was_done:
        state["message"] = "stopped; the VM's local disks are kept (complete, no backing)"
    else:
        state["message"] = (
            "stopped; the overlays are kept (they hold the guest's writes but need the repository for the rest: "
            "--abort --remove-disks removes them)"
        )
    state["removed"] = removed
    save_state(target, state)
    return state

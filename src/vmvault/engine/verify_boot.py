"""Boot verification: prove that a snapshot boots, without restoring it and without writing to
the repository.

:func:`verify_boot` serves the snapshot's disks (the current state of each: the leaves of
checkpoint chains) read-only, puts throw-away qcow2 overlays on them and boots them in an
isolated QEMU (:mod:`vmvault.hypervisors.qemu_boot`): no network card (or a restricted
user-mode one), sandboxed, hardware taken from what the snapshot records of the VM
(:func:`plan_machine`). It passes on a heartbeat (the guest agent, a marker on the serial
console, a stable screen) and fails naming the reason (no bootable disk, kernel panic, the
guest stopping, a timeout). A screenshot of the last screen comes back with the result.

Nothing is written to the repository: no lock is taken, chunks are only read (and verified)
through :class:`~vmvault.engine.reader.DiskReader`. Nothing stays behind: QEMU is stopped,
the overlays, sockets and served images are removed, also when the caller is interrupted.

How the disks are served is one function, :func:`served_disks`: it gives each disk as a QEMU
block node to put an overlay on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmvault import platform
from vmvault.errors import ConfigError, TargetError
from vmvault.hypervisors.qemu_boot import (
    BUSES,
    FAILURE_REASONS,
    BootDisk,
    BootMachine,
    BootOutcome,
    Heartbeats,
    boot_check,
    kvm_usable,
    open_to_qemu,
)
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot

from .export import process_start_time, running_disks, serve_disk
from .nbd import NbdServer
from .reader import ChunkCache, cache_bytes_for
from .target import write_all

__all__ = [
    "HEARTBEATS",
    "REASONS",
    "MachinePlan",
    "ServedDisk",
    "VerifyBootOptions",
    "VerifyBootResult",
    "plan_machine",
    "served_disks",
    "verify_boot",
    "write_screenshot",
]

log = logging.getLogger(__name__)

#: the heartbeats a verification can wait for
HEARTBEATS = ("agent", "marker", "screen")
#: why a verification did not pass: the VM's (qemu_boot.FAILURE_REASONS), or the repository's
REASONS = (*FAILURE_REASONS, "damaged-backup")
#: memory bounds for the verification VM (bytes): what the snapshot says, within these
MIN_MEMORY = 128 << 20
MAX_MEMORY = 16 << 30
DEFAULT_MEMORY = 1 << 30
#: at most this many disks are attached
MAX_DISKS = 16


@dataclass(frozen=True)
class VerifyBootOptions:
    timeout: float = 300.0
    #: a text the guest prints on its serial console once it is up
    marker: str | None = None
    #: which heartbeats count (None: the agent, the marker when given, and the screen for a VM
    #: the snapshot records without a guest agent channel)
    heartbeats: tuple[str, ...] | None = None
    #: seconds a non-blank screen must stay unchanged to count
    screen_stable: float = 20.0
    network: str = "none"  # none | restricted
    accel: str = "auto"  # auto | tcg | kvm
    #: overrides of what the snapshot records
    firmware: str | None = None  # bios | uefi
    memory: int | None = None
    disk_bus: str | None = None
    boot_disk: str | None = None
    #: where the private work folder (overlays, sockets) is made (default: the temp folder)
    work_dir: str | None = None
    #: the most the throw-away overlays may take (the guest's writes), bytes
    max_writes: int = 8 << 30


@dataclass(frozen=True)
class MachinePlan:
    """The hardware chosen for a snapshot, and where each choice came from."""

    firmware: str
    memory: int
    cpus: int
    machine: str
    bus: str
    disks: tuple[DiskRecord, ...]
    #: "firmware": "uefi (libvirt record)" and the like, for the result
    sources: dict[str, str] = field(default_factory=dict)
    #: whether the snapshot says the VM had a guest agent channel (None: it does not say)
    agent_channel: bool | None = None


@dataclass
class VerifyBootResult:
    snapshot: str
    passed: bool
    reason: str
    message: str
    #: the whole verification (serving the disks included), and from QEMU's start to the verdict
    seconds: float
    boot_seconds: float
    heartbeats: tuple[str, ...]
    plan: MachinePlan
    accel: str
    network: str
    sandbox: bool
    serial_tail: str
    #: the user id QEMU ran as when vmvault, running as root, gave it ids of its own
    qemu_uid: int | None = None
    screenshot: bytes | None = field(default=None, repr=False)
    #: where the screenshot was written, if it was
    screenshot_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "passed": self.passed,
            "reason": self.reason,
            "message": self.message,
            "seconds": self.seconds,
            "boot_seconds": self.boot_seconds,
            "heartbeats": list(self.heartbeats),
            "vm": {
                "firmware": self.plan.firmware,
                "memory": self.plan.memory,
                "cpus": self.plan.cpus,
                "machine": self.plan.machine,
                "disk_bus": self.plan.bus,
                "disks": [d.name for d in self.plan.disks],
                "from": dict(self.plan.sources),
                "accel": self.accel,
                "network": self.network,
                "sandbox": self.sandbox,
                "qemu_uid": self.qemu_uid,
            },
            "serial_tail": self.serial_tail,
            "screenshot": self.screenshot_path,
        }


# ---- the hardware ---------------------------------------------------------------------------


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return None


def _bus_of_model(model: str) -> str | None:
    """A QEMU device model or libvirt bus as one of :data:`BUSES`."""
    model = model.lower()
    if model.startswith("virtio-blk") or model == "virtio":
        return "virtio"
    if model.startswith(("scsi", "virtio-scsi")) or model == "scsi":
        return "scsi"
    if model in ("ide-hd", "ide-drive", "ide"):
        return "ide"
    if model in ("sata", "ahci"):
        return "sata"
    return None


def plan_machine(snap: Snapshot, options: VerifyBootOptions) -> MachinePlan:
    """The verification VM's hardware from the snapshot's record of the VM (``snap.vm``, which
    the storage gives and is checked here: only known values are taken, numbers are bounded),
    with the options' overrides."""
    vm: Mapping[str, Any] = snap.vm if isinstance(snap.vm, dict) else {}
    hypervisor = str(vm.get("hypervisor") or snap.source.get("kind") or "")
    sources: dict[str, str] = {}

    firmware = "bios"
    recorded_fw = str(vm.get("firmware") or "").lower()
    generation = _int(vm.get("generation"))
    raw_cmdline = vm.get("cmdline")
    cmdline: list[Any] = raw_cmdline if isinstance(raw_cmdline, list) else []
    if options.firmware is not None:
        firmware, sources["firmware"] = options.firmware, "option"
    elif recorded_fw in ("uefi", "efi"):
        firmware, sources["firmware"] = "uefi", f"{hypervisor} record"
    elif recorded_fw == "bios":
        sources["firmware"] = f"{hypervisor} record"
    elif generation is not None:
        firmware = "uefi" if generation == 2 else "bios"
        sources["firmware"] = f"Hyper-V generation {generation}"
    elif any(isinstance(a, str) and ("pflash" in a or "OVMF" in a) for a in cmdline):
        firmware, sources["firmware"] = "uefi", "QEMU command line"
    else:
        sources["firmware"] = "default"

    memory = DEFAULT_MEMORY
    recorded_mem = _int(vm.get("memory"))
    if options.memory is not None:
        memory, sources["memory"] = options.memory, "option"
    elif recorded_mem is not None and recorded_mem > 0:
        memory, sources["memory"] = recorded_mem, f"{hypervisor} record"
    else:
        sources["memory"] = "default"
    if not MIN_MEMORY <= memory <= MAX_MEMORY:
        clamped = min(max(memory, MIN_MEMORY), MAX_MEMORY)
        sources["memory"] += f", bounded from {memory} bytes"
        memory = clamped
    cpus = min(max(_int(vm.get("cpus")) or 1, 1), os.cpu_count() or 1, 8)

    bus: str | None = None
    raw_disks = vm.get("disks")
    recorded: list[Any] = raw_disks if isinstance(raw_disks, list) else []
    for d in recorded:
        if isinstance(d, dict):
            found = _bus_of_model(str(d.get("bus") or d.get("model") or ""))
            if found is not None:
                bus = found
                sources["disk_bus"] = f"{hypervisor} record"
                break
    if options.disk_bus is not None:
        bus, sources["disk_bus"] = options.disk_bus, "option"
    elif bus is None:
        bus = "sata"  # AHCI: drivers in Windows since Vista and in every Linux initramfs
        sources["disk_bus"] = "default (Hyper-V VMs boot from SATA here)" if generation else "default"
    if bus not in BUSES:
        raise ConfigError(f"unknown disk bus {bus!r}: one of {', '.join(BUSES)}")

    recorded_machine = str(vm.get("machine") or "")
    machine = "pc" if bus == "ide" and firmware == "bios" else "q35"
    if bus == "ide" and firmware == "uefi":
        bus = "sata"  # q35 has no PIIX IDE; its AHCI takes the same disks
    sources["machine"] = f"{'i440fx' if machine == 'pc' else 'q35'} for {bus}" + (
        f" (recorded: {recorded_machine[:40]})" if recorded_machine else ""
    )

    disks = running_disks(snap)
    if not disks:
        raise ConfigError(f"snapshot {snap.short_id} holds no disk to boot")
    if options.boot_disk is not None:
        first = [d for d in disks if d.name == options.boot_disk]
        if not first:
            names = ", ".join(repr(d.name) for d in disks)
            raise ConfigError(f"snapshot {snap.short_id} has no disk {options.boot_disk!r} to boot; its disks: {names}")
        disks = first + [d for d in disks if d.name != options.boot_disk]
    if len(disks) > MAX_DISKS:
        raise ConfigError(f"snapshot {snap.short_id} has {len(disks)} disks; a boot verification takes {MAX_DISKS}")

    agent: bool | None = None
    if isinstance(vm.get("guest_agent"), bool):
        agent = bool(vm["guest_agent"])
    elif cmdline and hypervisor == "qemu":
        agent = any(isinstance(a, str) and "org.qemu.guest_agent.0" in a for a in cmdline)
    return MachinePlan(firmware, memory, cpus, machine, bus, tuple(disks), sources, agent)


def _heartbeats(plan: MachinePlan, options: VerifyBootOptions) -> Heartbeats:
    if options.heartbeats is not None:
        chosen = set(options.heartbeats)
        unknown = chosen - set(HEARTBEATS)
        if unknown or not chosen:
            raise ConfigError(f"heartbeats are {', '.join(HEARTBEATS)}, not {', '.join(sorted(unknown)) or 'none'}")
        if "marker" in chosen and not options.marker:
            raise ConfigError("the marker heartbeat needs the text to wait for (--marker TEXT)")
    else:
        chosen = {"agent"}
        if options.marker:
            chosen.add("marker")
        elif plan.agent_channel is False:
            chosen.add("screen")  # the VM had no agent and nothing else tells that it is up
    return Heartbeats(
        agent="agent" in chosen,
        marker=options.marker if "marker" in chosen else None,
        screen="screen" in chosen,
        screen_stable=options.screen_stable,
    )


# ---- serving the disks ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServedDisk:
    name: str
    #: a ``-blockdev`` protocol node (a dict) QEMU reads the disk through
    node: dict[str, Any]
    #: the export, whose ``stats`` count the reads the repository could not serve
    server: NbdServer


@contextlib.contextmanager
def served_disks(
    repo: Repository,
    snap: Snapshot,
    disks: Sequence[DiskRecord],
    folder: str,
    *,
    run_as: tuple[int, int] | None = None,
) -> Iterator[list[ServedDisk]]:
    """Each disk of ``disks`` (the merged view of its chain) as a read-only QEMU block node
    (a ``-blockdev`` protocol node as a dict), for as long as the block runs.

    Each disk is exported read-only over NBD straight from the repository
    (:func:`~vmvault.engine.export.serve_disk`, one shared chunk cache): nothing is copied, only
    what the guest reads is fetched, and every chunk is verified as it is. The sockets are made in
    ``folder`` (private), reached through its descriptor so that a deep folder cannot pass the
    108-byte limit of a socket's path; QEMU, which runs in a folder inside it
    (:func:`~vmvault.hypervisors.qemu_boot.boot_check`), is given them as ``../diskN.sock``.
    This is the one place that decides how a verification VM reaches the repository's data.

    ``run_as``: the ids of a QEMU that runs under ids of its own (vmvault running as root). Its
    group may then look names up in ``folder`` (not list or change it) and connect to the
    sockets; no one else may (:func:`~vmvault.hypervisors.qemu_boot.open_to_qemu`).
    """
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    cache = ChunkCache(max_bytes=cache_bytes_for(repo))
    try:
        with contextlib.ExitStack() as stack:
            served = []
            for i, record in enumerate(disks):
                socket_path = f"/proc/self/fd/{dir_fd}/disk{i}.sock"
                server = stack.enter_context(serve_disk(repo, snap, record.name, socket_path, cache=cache))
                node = {"driver": "nbd", "server": {"type": "unix", "path": f"../disk{i}.sock"}, "export": ""}
                served.append(ServedDisk(record.name, node, server))
            if run_as is not None:
                try:
                    open_to_qemu(folder, run_as, connect=[f"disk{i}.sock" for i in range(len(served))])
                except OSError as exc:  # a file system that keeps root from giving files away
                    raise ConfigError(
                        f"{folder}: cannot open the exports to QEMU's user ({exc.strerror}); "
                        "give a --work-dir on a local file system"
                    ) from exc
            yield served
    finally:
        cache.close()
        os.close(dir_fd)


# ---- verification ---------------------------------------------------------------------------

_SAFE_TEXT = re.compile(r"[^\t\n\x20-\x7e\u00a0-\uffff]")


_WORK_PREFIX = "vmvault-verify-"
#: in each work folder: the PID and start time of the process that made it
_OWNER = "owner"


def _claim(folder: str) -> None:
    pid = os.getpid()
    fd = os.open(os.path.join(folder, _OWNER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid} {process_start_time(pid)}\n")


def _remove_left_behind(base: str) -> None:
    """Remove the work folders of verifications whose process is gone (killed with SIGKILL, the
    host rebooted): their overlays hold what those guests wrote, up to ``max_writes`` each.
    Only this user's real folders are touched, and only when their owner file names a process
    that no longer runs (PID and start time: a reused PID is not the same process)."""
    uid = platform.current_uid()
    try:
        names = [n for n in os.listdir(base) if n.startswith(_WORK_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
                continue
            fd = platform.open_nofollow(os.path.join(path, _OWNER), os.O_RDONLY)
            with os.fdopen(fd) as f:
                pid_text, start_text = f.read(100).split()[:2]
        except (OSError, ValueError):
            continue  # being made right now, or not ours to judge
        if not pid_text.isdigit() or process_start_time(int(pid_text)) == _int(start_text):
            continue
        shutil.rmtree(path, ignore_errors=True)


def verify_boot(
    repo: Repository,
    snap: Snapshot,
    options: VerifyBootOptions = VerifyBootOptions(),
    *,
    qemu: str | None = None,
    on_started: Callable[[int], None] | None = None,
) -> VerifyBootResult:
    """Boot ``snap`` from the repository and wait for a heartbeat (see the module documentation).
    A boot that fails is a result with ``passed`` false and its ``reason``; errors that stop the
    verification itself (no QEMU, OVMF missing for a UEFI VM, a damaged chunk) raise."""
    if options.timeout <= 0:
        raise ConfigError("the boot verification timeout must be positive")
    if options.network not in ("none", "restricted"):
        raise ConfigError(f"network is none or restricted, not {options.network!r}")
    plan = plan_machine(snap, options)
    heartbeats = _heartbeats(plan, options)
    if options.accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
    elif options.accel in ("tcg", "kvm"):
        accel = options.accel
    else:
        raise ConfigError(f"accel is auto, tcg or kvm, not {options.accel!r}")
    base = options.work_dir or tempfile.gettempdir()
    uid = platform.current_uid()
    why = platform.others_can_change(base, container=True)
    if why is not None:
        # whoever can rename the private folder away can put links where the overlays go
        raise ConfigError(f"the work folder {base}: {why}; give a folder only this user can change (--work-dir)")
    _remove_left_behind(base)
    started = time.monotonic()
    folder = tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=base)
    try:
        os.chmod(folder, 0o700)
        _claim(folder)
        run_as = platform.transient_ids() if uid == 0 else None
        if uid == 0 and run_as is None:
            log.warning("QEMU runs as root: this user namespace maps no unused id for it (a container's?)")
        outcome = _boot(repo, snap, plan, heartbeats, options, accel, folder, qemu, on_started, run_as)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    flags = (("agent", heartbeats.agent), ("marker", heartbeats.marker is not None), ("screen", heartbeats.screen))
    chosen = tuple(name for name, on in flags if on)
    tail = _SAFE_TEXT.sub("?", outcome.serial[-4000:])
    return VerifyBootResult(
        snapshot=snap.id,
        passed=outcome.passed,
        reason=outcome.reason,
        message=outcome.message,
        seconds=round(time.monotonic() - started, 2),
        boot_seconds=outcome.seconds,
        heartbeats=chosen,
        plan=plan,
        accel=accel,
        network=options.network,
        sandbox=outcome.sandbox,
        qemu_uid=outcome.uid,
        serial_tail=tail,
        screenshot=outcome.screenshot,
    )


def _boot(
    repo: Repository,
    snap: Snapshot,
    plan: MachinePlan,
    heartbeats: Heartbeats,
    options: VerifyBootOptions,
    accel: str,
    folder: str,
    qemu: str | None,
    on_started: Callable[[int], None] | None,
    run_as: tuple[int, int] | None,
) -> BootOutcome:
    with served_disks(repo, snap, plan.disks, folder, run_as=run_as) as served:
        machine = BootMachine(
            disks=tuple(
                BootDisk(name=d.name, base=disk.node, size=d.size, format="raw", bus=plan.bus)
                for d, disk in zip(plan.disks, served, strict=True)
            ),
            firmware=plan.firmware,
            memory=plan.memory,
            cpus=plan.cpus,
            machine=plan.machine,
            network=options.network,
            accel=accel,
            max_writes=options.max_writes,
        )
        outcome = boot_check(
            machine,
            heartbeats,
            timeout=options.timeout,
            work_dir=folder,
            qemu=qemu,
            on_started=on_started,
            run_as=run_as,
        )
        failed = {d.name: d.server.stats.errors.get("EIO", 0) for d in served}
    if any(failed.values()):
        # the backup itself is damaged where the guest read it: whatever the guest made of that,
        # the verification says so (the export logged each read with its snapshot, disk and offset)
        which = ", ".join(f"{n} read{'s' if n != 1 else ''} of disk {name}" for name, n in failed.items() if n)
        verdict = "booted anyway" if outcome.passed else f"then failed ({outcome.reason}: {outcome.message})"
        outcome.passed = False
        outcome.reason = "damaged-backup"
        outcome.message = (
            f"the repository could not serve {which} (damaged or missing data; `vmvault check --read-data` "
            f"names it); the guest {verdict}"
        )
    return outcome


def write_screenshot(data: bytes, path: str) -> str:
    """Write a PNG to ``path`` (created new: an existing file is never replaced); its absolute path."""
    path = os.path.abspath(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise TargetError("a file of that name exists; the screenshot is never written over it", path=path) from exc
    except OSError as exc:
        raise TargetError(f"cannot create the screenshot: {exc.strerror}", path=path) from exc
    try:
        write_all(fd, data, path)  # a full file system is TargetFullError
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path

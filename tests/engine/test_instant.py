"""Instant recovery (engine/instant.py) with real QEMU under TCG: guest writes during the copy,
the repository unreadable mid-copy, a damaged boot sector pausing the VM, vmvault and the export
killed mid-copy, abort."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmvault import platform
from vmvault.backends.local import LocalBackend
from vmvault.engine import instant
from vmvault.engine.backup import backup
from vmvault.engine.export import ServeProcess, process_start_time
from vmvault.engine.restore import ChunkResolver
from vmvault.errors import ConfigError, HypervisorError, TargetError
from vmvault.hypervisors import open_source
from vmvault.hypervisors.qemu import QmpClient
from vmvault.platform import TRANSIENT_IDS
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="QEMU is not installed (qemu-system-x86, qemu-utils)",
    ),
]

CS = 64 * 1024
SIZE = 24 << 20
PASS = b"passphrase"
OPTIONS = {"accel": "tcg", "memory_mb": 64}


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.disk = root / "vm.raw"
        rng = random.Random(7)
        with open(self.disk, "wb") as f:
            f.truncate(SIZE)
            for off in range(0, SIZE, 4 << 20):  # 3 MiB of data in every 4 MiB: holes between
                f.seek(off)
                f.write(rng.randbytes(3 << 20))
        self.data = bytearray(self.disk.read_bytes())
        self.repo_dir = root / "repo"
        self.repo_dir.mkdir()
        self.repo = Repository.init(LocalBackend(str(self.repo_dir)), PASS, chunk_size=CS)
        self.snap: Snapshot = backup(self.repo, open_source(str(self.disk))).snapshot
        self.target = root / "instant"

    def start(self, **kw: object) -> dict[str, object]:
        options = instant.InstantOptions(**{**OPTIONS, **kw})  # type: ignore[arg-type]
        return instant.start(str(self.repo_dir), PASS, self.snap, self.target, options)

    def qmp(self) -> QmpClient:
        return QmpClient(str(self.target / "qmp.sock")).connect()

    def guest_write(self, offset: int, length: int, byte: int) -> None:
        """A write by the guest's disk device (HMP qemu-io on the device's block backend)."""
        with self.qmp() as qmp:
            cmd = f'qemu-io -d /machine/peripheral/vmvault-vd0/virtio-backend "write -P {byte} {offset} {length}"'
            assert qmp.execute("human-monitor-command", {"command-line": cmd}) == ""
        self.data[offset : offset + length] = bytes([byte]) * length

    def local_disk(self) -> bytes:
        """The overlay's content, after QEMU stopped; it must need no backing."""
        overlay = self.target / "disk0.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], capture_output=True,
                                         text=True, check=True).stdout)  # fmt: skip
        assert "backing-filename" not in info, info
        out = self.root / "out.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(out)], check=True)
        return out.read_bytes()

    def damage_chunk(self, chunk: int) -> tuple[Path, bytes]:
        chunk_id = ChunkResolver(self.repo, self.snap, self.snap.disks[0]).chunk_id(chunk)
        assert chunk_id is not None
        loc = self.repo.index.lookup(chunk_id)
        assert loc is not None
        path = self.repo_dir / pack_name(loc.pack_id)
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[loc.entry.offset + loc.entry.length // 2] ^= 0x40
        path.write_bytes(bytes(damaged))
        return path, original


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    if (s.target / instant.STATE_FILE).exists():
        instant.abort(s.target)  # nothing left running, whatever the test did


def _wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _confinement(state: dict[str, Any], target: Path) -> tuple[int, int]:
    """QEMU, started by vmvault as root, runs under the state's transient ids with no group or
    capability; DIR and the overlays stay root's (DIR open to QEMU's group for name lookups
    only; the overlays reach QEMU as descriptors). Its ids."""
    uid, gid = state["qemu_ids"]
    assert uid in TRANSIENT_IDS and gid == uid
    status = _proc_status(int(state["qemu"]["pid"]))
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4, status
    assert status["Groups"] == "" and int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1"
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o710)
    overlays = list(target.glob("disk*.qcow2"))
    assert overlays and all(o.stat().st_uid == 0 and not o.stat().st_mode & 0o022 for o in overlays)
    for name in ("serve.log", "serve.lease", instant.STATE_FILE):  # nothing else of DIR is open to it
        assert not (target / name).stat().st_mode & 0o077, name
    for sock in target.glob("nbd-*.sock"):
        assert (sock.stat().st_uid, sock.stat().st_gid, sock.stat().st_mode & 0o777) == (0, gid, 0o660)
    return uid, gid


def test_guest_writes_during_the_copy_are_kept_and_the_vm_ends_on_local_disks(setup: Setup) -> None:
    state = setup.start(speed=4 << 20)
    assert state["phase"] == "copying"
    if os.geteuid() == 0:
        _confinement(state, setup.target)  # type: ignore[arg-type]
    serve = ServeProcess.from_doc(state["serve"])  # type: ignore[arg-type]
    assert serve.alive()
    setup.guest_write(0, 4096, 0xBB)  # where the copy has been
    setup.guest_write(20 << 20, 3 * CS, 0xAA)  # where it has not been yet
    setup.guest_write(SIZE - 8192, 8192, 0xCC)  # in a hole
    progress: list[tuple[int, int]] = []
    done = instant.watch(setup.target, on_progress=lambda d, t: progress.append((d, t)), timeout=120)
    assert done["phase"] == "done", done
    assert progress and progress[-1][0] == progress[-1][1] == SIZE
    assert not serve.alive(), "the export stops once the VM needs it no more"
    assert not (setup.target / "nbd-0.sock").exists()
    live = instant.status(setup.target)["live"]
    assert live["qemu"] and live["vm"] == "running" and not live["export"]
    setup.guest_write(8 << 20, 4096, 0xDD)  # the VM goes on writing to its local disk
    aborted = instant.abort(setup.target)
    assert "local disks are kept" in aborted["message"]
    st = setup.target.stat()  # QEMU gone, DIR is open to its group no more
    assert (st.st_gid, st.st_mode & 0o777) == (os.getgid(), 0o700)
    assert setup.local_disk() == bytes(setup.data)


def test_an_unreadable_repository_pauses_the_copy_and_resume_finishes_it(setup: Setup) -> None:
    setup.start(speed=2 << 20, cache_bytes=0)
    setup.guest_write(18 << 20, CS, 0xAA)
    time.sleep(1.0)
    data_dir = setup.repo_dir / "data"
    data_dir.rename(setup.repo_dir / "data.away")  # the storage is gone mid-copy
    state = instant.watch(setup.target, timeout=120)
    assert state["phase"] == "paused", state
    assert "--resume" in state["message"]
    assert instant.load_state(setup.target.absolute())["phase"] == "paused", "the pause is on disk"
    live = instant.status(setup.target)["live"]
    assert live["qemu"] and live["export"] and 0 < live["copied"] < live["total"]
    (setup.repo_dir / "data.away").rename(data_dir)  # repaired
    assert instant.resume(str(setup.repo_dir), PASS, setup.target)["phase"] == "copying"
    assert instant.watch(setup.target, timeout=120)["phase"] == "done"
    instant.abort(setup.target)
    assert setup.local_disk() == bytes(setup.data)


def test_a_damaged_chunk_the_guest_reads_pauses_the_vm_and_resume_after_repair(setup: Setup) -> None:
    pack, original = setup.damage_chunk(0)  # the boot sector the firmware reads first
    setup.start(cache_bytes=0)
    state = instant.watch(setup.target, timeout=120)
    assert state["phase"] == "paused", state

    def vm_status() -> str:
        with setup.qmp() as qmp:
            return str(qmp.execute("query-status")["status"])

    # the firmware's read of the boot sector fails: the VM is paused, not handed an error (the copy,
    # which meets the chunk too, may stop first)
    _wait_for(lambda: vm_status() == "io-error", 60)
    assert instant.status(setup.target)["live"]["vm"] == "io-error"
    assert "disk vm.raw" in (setup.target / "serve.log").read_text()
    pack.write_bytes(original)  # repaired
    assert instant.resume(str(setup.repo_dir), PASS, setup.target)["phase"] == "copying"
    assert instant.watch(setup.target, timeout=120)["phase"] == "done"
    with setup.qmp() as qmp:
        assert qmp.execute("query-status")["status"] == "running"
    instant.abort(setup.target)
    assert setup.local_disk() == bytes(setup.data)


def _vmvault(root: Path, *argv: str) -> subprocess.Popen[bytes]:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "VMVAULT_PASSWORD": PASS.decode(), "VMVAULT_REPO": str(root / "repo")}
    cmd = [sys.executable, "-m", "vmvault", *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_vmvault_and_then_the_export_killed_mid_copy_resume_finishes(setup: Setup) -> None:
    proc = _vmvault(
        setup.root, "instant-restore", setup.snap.id[:8], "--target", str(setup.target), "--accel", "tcg",
        "--memory", "64", "--speed", "2M",
    )  # fmt: skip

    def copying() -> bool:
        try:
            return instant.load_state(setup.target.absolute())["phase"] == "copying"
        except ConfigError:
            return False

    try:
        _wait_for(copying, 60)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    setup.guest_write(22 << 20, CS, 0x5A)
    state = instant.status(setup.target)
    assert state["phase"] == "copying" and state["live"]["qemu"] and state["live"]["export"]
    assert state["live"]["vm"] == "running", "killing vmvault stops neither the VM nor the export"
    # now the export dies too (an OOM kill, a reboot of the export alone)
    serve = ServeProcess.from_doc(state["serve"])
    os.kill(serve.pid, signal.SIGKILL)
    _wait_for(lambda: not serve.alive(), 10)
    resumed = _vmvault(setup.root, "instant-restore", "--resume", str(setup.target))
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err.decode()
    assert b"restarted" in out and b"done" in out, out
    assert instant.load_state(setup.target.absolute())["phase"] == "done"
    instant.abort(setup.target)
    assert setup.local_disk() == bytes(setup.data)


def test_qemu_ended_mid_copy_is_started_again_from_the_overlays(setup: Setup) -> None:
    state = setup.start(speed=2 << 20)
    setup.guest_write(23 << 20, CS, 0x3C)
    pid = int(state["qemu"]["pid"])  # type: ignore[index]
    with setup.qmp() as qmp:
        qmp.execute("quit")  # the guest shut down, or someone stopped QEMU
    _wait_for(lambda: process_start_time(pid) is None, 30)
    paused = instant.watch(setup.target, timeout=60)
    assert paused["phase"] == "paused" and "the VM is not running" in paused["message"]
    resumed = instant.resume(str(setup.repo_dir), PASS, setup.target)
    assert resumed["phase"] == "copying" and resumed["qemu"]["pid"] != pid
    assert instant.watch(setup.target, timeout=120)["phase"] == "done"
    instant.abort(setup.target)
    assert setup.local_disk() == bytes(setup.data)


def test_a_copy_that_ended_while_nobody_watched_is_finished_by_resume(setup: Setup) -> None:
    state = setup.start()
    serve = ServeProcess.from_doc(state["serve"])  # type: ignore[arg-type]

    def concluded() -> bool:
        with setup.qmp() as qmp:
            return [j["status"] for j in qmp.execute("query-block-jobs")] == ["concluded"]

    _wait_for(concluded, 120)  # vmvault was not there to see it (killed, or --no-wait)
    assert instant.load_state(setup.target.absolute())["phase"] == "copying" and serve.alive()
    assert instant.resume(str(setup.repo_dir), PASS, setup.target)["phase"] == "copying"
    assert instant.watch(setup.target, timeout=60)["phase"] == "done"
    assert not serve.alive()
    instant.abort(setup.target)
    assert setup.local_disk() == bytes(setup.data)


def test_abort_stops_everything_and_removes_overlays_only_when_asked(setup: Setup) -> None:
    state = setup.start(speed=1 << 20)
    qemu_pid = int(state["qemu"]["pid"])  # type: ignore[index]
    serve = ServeProcess.from_doc(state["serve"])  # type: ignore[arg-type]
    aborted = instant.abort(setup.target)
    assert aborted["phase"] == "aborted" and "--remove-disks" in aborted["message"]
    assert process_start_time(qemu_pid) is None and not serve.alive()
    assert (setup.target / "disk0.qcow2").exists()
    aborted = instant.abort(setup.target, remove_disks=True)
    assert not (setup.target / "disk0.qcow2").exists()
    assert instant.resume(str(setup.repo_dir), PASS, setup.target)["phase"] == "aborted"


def test_a_used_target_or_a_forged_state_is_refused(setup: Setup, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("x")
    with pytest.raises(TargetError, match="not empty"):
        instant.start(str(setup.repo_dir), PASS, setup.snap, busy, instant.InstantOptions(accel="tcg"))
    assert sorted(p.name for p in busy.iterdir()) == ["keep"]
    with pytest.raises(ConfigError, match="no instant restore"):
        instant.status(busy)
    forged = {"version": 1, "phase": "copying", "disks": [{"overlay": str(busy / "keep"), "socket": "/etc/passwd"}]}
    (busy / instant.STATE_FILE).write_text(json.dumps(forged))
    with pytest.raises(ConfigError, match="not in"):
        instant.abort(busy, remove_disks=True)
    assert (busy / "keep").read_text() == "x"


def test_the_test_guest_boots_from_the_repository_while_it_is_copied(tmp_path: Path) -> None:
    from tests.guests import MARKER, guest

    g = guest()
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    repo = Repository.init(LocalBackend(str(repo_dir)), PASS)
    snap = backup(repo, open_source(str(g.disk))).snapshot
    target = tmp_path / "instant"
    instant.start(str(repo_dir), PASS, snap, target, instant.InstantOptions(accel="tcg", memory_mb=256, speed=8 << 20))
    try:
        serial = target / "serial.log"
        # the console is moved out of QEMU's ring into serial.log whenever the VM is looked at
        _wait_for(lambda: instant.status(target) and MARKER in _text(serial), 240)
        assert instant.status(target)["live"]["vm"] == "running"
        assert instant.watch(target, timeout=240)["phase"] == "done"
        assert "first read served" in (target / "serve.log").read_text()
    finally:
        instant.abort(target)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(g.disk), str(target / "disk0.qcow2")])
    assert r.returncode == 0, "the guest wrote nothing to its disk: the local copy is the backed-up disk"


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_guest_printing_without_end_costs_the_host_two_megabytes(setup: Setup) -> None:
    """The serial console is a ring buffer inside QEMU, moved into DIR/serial.log when the VM
    is looked at; past 1 MiB the log becomes serial.log.1. What the guest prints is written
    into that ring (QMP ringbuf-write: the bytes the guest's serial port would put there)."""
    setup.start()
    log, older = setup.target / "serial.log", setup.target / "serial.log.1"
    written = b""

    def guest_prints(data: bytes) -> None:
        with setup.qmp() as qmp:  # one QMP client at a time: closed before the VM is looked at
            qmp.execute("ringbuf-write", {"device": instant.SERIAL_DEVICE, "data": base64.b64encode(data).decode(),
                                          "format": "base64"})  # fmt: skip

    for n in range(12):  # 5.5 MiB in all, the VM looked at after each part
        piece = (f"line {n:04d} ".encode() + os.urandom(96).hex().encode() + b"\n") * 2300
        guest_prints(piece)
        written += piece
        assert instant.status(setup.target)["live"]["vm"] == "running"
        assert log.stat().st_size <= instant.SERIAL_LOG_BYTES
        assert not older.exists() or older.stat().st_size <= instant.SERIAL_LOG_BYTES
    kept = older.read_bytes() + log.read_bytes()
    assert len(kept) <= 2 * instant.SERIAL_LOG_BYTES and written.endswith(kept)  # the newest, whole
    assert len(kept) >= instant.SERIAL_LOG_BYTES
    # more between two looks than the ring holds: the oldest is lost, never the host's disk
    for _ in range(3):
        guest_prints(b"x" * (instant.SERIAL_RING - 1) + b"\n")
    instant.abort(setup.target)  # takes the console's last words before QEMU quits
    assert log.stat().st_size <= instant.SERIAL_LOG_BYTES and log.read_bytes().endswith(b"x\n")
    assert older.stat().st_size <= instant.SERIAL_LOG_BYTES


def test_every_disk_of_a_two_disk_vm_ends_local(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    rng = random.Random(3)
    originals = {}
    for name, size in (("a.raw", 6 << 20), ("b.raw", 3 << 20)):
        data = rng.randbytes(size // 2) + bytes(size - size // 2)
        (folder / name).write_bytes(data)
        originals[name] = data
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    repo = Repository.init(LocalBackend(str(repo_dir)), PASS, chunk_size=CS)
    snap = backup(repo, open_source(str(folder))).snapshot
    target = tmp_path / "instant"
    state = instant.start(str(repo_dir), PASS, snap, target, instant.InstantOptions(**OPTIONS))  # type: ignore[arg-type]
    try:
        assert [d["name"] for d in state["disks"]] == ["a.raw", "b.raw"]
        assert instant.watch(target, timeout=120)["phase"] == "done"
    finally:
        instant.abort(target)
    for i, name in enumerate(("a.raw", "b.raw")):
        out = tmp_path / f"out{i}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(target / f"disk{i}.qcow2"), str(out)], check=True)
        assert out.read_bytes() == originals[name], name


# -- the target folder and the state are this user's ---------------------------------------------


def test_a_folder_of_another_user_is_refused_for_every_operation(tmp_path: Path) -> None:
    """Its owner could swap the overlays for links or read them, and forge the state that
    --abort acts on (the PIDs it stops)."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(TargetError, match="belongs to user id 4242"):
        instant._prepare_target(theirs)
    assert list(theirs.iterdir()) == []
    (theirs / instant.STATE_FILE).write_text(json.dumps({"version": 1, "phase": "copying", "disks": []}))
    for operation in (instant.status, instant.abort):
        with pytest.raises(ConfigError, match="belongs to user id 4242"):
            operation(theirs)
    with pytest.raises(ConfigError, match="belongs to user id 4242"):
        instant.resume("unused", None, theirs)
    # a folder others can write above DIR: they could rename DIR away and put theirs
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(TargetError, match=r"writable by other users \(mode 0777\)"):
        instant._prepare_target(shared / "vm")
    assert list(shared.iterdir()) == []
    shared.chmod(0o1777)  # sticky, as /tmp: fine
    instant._prepare_target(shared / "vm")
    assert (shared / "vm").stat().st_mode & 0o777 == 0o700


@pytest.mark.integration
def test_a_comma_in_the_target_is_part_of_the_path(tmp_path: Path) -> None:
    """QEMU's option syntax: ``unix:PATH,server=on`` with a comma in PATH would end the path
    there and start another key. (DIR's path is in no option now: QEMU is handed descriptors
    and names relative to DIR; this keeps it so.)"""
    target = tmp_path / "vm,server=off,x=y"
    instant._prepare_target(target)
    state: dict[str, Any] = {
        "disks": [],
        "vm_config": {"name": "comma", "accel": "tcg", "memory_mb": 64, "cpus": 1, "qemu_args": []},
    }
    runner = instant._QemuRunner(target, state)
    try:
        assert runner.launch().startswith("QEMU PID")
        assert runner.alive() and runner.qmp.execute("query-status")["status"] in ("running", "prelaunch")
        assert (target / "qmp.sock").exists()
    finally:
        runner.stop(10)
        runner.close()
    assert not runner.alive()


def _bare_runner(target: Path, qemu_args: list[str]) -> instant._QemuRunner:
    instant._prepare_target(target)
    state: dict[str, Any] = {
        "disks": [],
        "vm_config": {"name": "bare", "accel": "tcg", "memory_mb": 64, "cpus": 1, "qemu_args": qemu_args},
    }
    return instant._QemuRunner(target, state)


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_qemu_runs_in_a_seccomp_sandbox_detached_and_what_it_prints_later_goes_nowhere(tmp_path: Path) -> None:
    """The VM is untrusted: QEMU gets its seccomp filter (no new programs, no change of user);
    it is nobody's child but init's, in a session of its own; its output after it started
    (here TCG's log of every block it runs, on stderr, while the firmware starts again)
    neither grows qemu.log nor stops it: the writes fail (EPIPE; QEMU ignores SIGPIPE)."""
    runner = _bare_runner(tmp_path / "vm", [])
    try:
        assert runner.launch().endswith("in a seccomp sandbox")
        pid = int(runner.state["qemu"]["pid"])
        status = _proc_status(pid)
        assert status["Seccomp"] == "2" and int(status["Seccomp_filters"]) >= 1, status
        assert int(status["PPid"]) != os.getpid()
        assert os.getsid(pid) != os.getsid(0)
        log = tmp_path / "vm" / "qemu.log"
        before = log.stat().st_size if log.exists() else 0
        runner.qmp.execute("human-monitor-command", {"command-line": "log in_asm,exec"})
        runner.qmp.execute("system_reset")
        time.sleep(2.0)
        assert runner.alive() and runner.qmp.execute("query-status")["status"] == "running"
        assert (log.stat().st_size if log.exists() else 0) == before
    finally:
        runner.stop(10)
        runner.close()
    assert not runner.alive()


def test_qemu_that_cannot_start_says_why_and_leaves_nothing_running(tmp_path: Path) -> None:
    runner = _bare_runner(tmp_path / "vm", ["-no-such-option"])
    with pytest.raises(HypervisorError, match=r"QEMU could not be started: .*no-such-option"):
        runner.launch()
    assert "qemu" not in runner.state
    mine = str(tmp_path / "vm")
    for entry in Path("/proc").iterdir():  # no QEMU of this folder (it runs in DIR), nor its starter, left
        with contextlib.suppress(OSError):
            assert os.readlink(entry / "cwd") != mine, (entry / "cmdline").read_bytes()
    assert b"no-such-option" in (tmp_path / "vm" / "qemu.log").read_bytes()


def test_qemu_that_never_answers_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Deaf(QmpClient):
        def connect(self) -> Deaf:
            raise HypervisorError("no answer")

    started: list[int] = []
    real = instant._QemuRunner._start_detached

    def watched(self: instant._QemuRunner, argv: list[str], fds: tuple[int, ...]) -> tuple[int | None, bytes, str]:
        pid, output, outcome = real(self, argv, fds)
        started.append(pid or 0)
        return pid, output, outcome

    monkeypatch.setattr(instant, "QmpClient", Deaf)
    monkeypatch.setattr(instant, "LAUNCH_TIMEOUT", 3)
    monkeypatch.setattr(instant._QemuRunner, "_start_detached", watched)
    runner = _bare_runner(tmp_path / "vm", [])
    with pytest.raises(HypervisorError, match="did not answer within 3 s"):
        runner.launch()
    assert started and started[0] > 0
    _wait_for(lambda: process_start_time(started[0]) is None, timeout=10)  # killed, not left running


def test_a_sandbox_option_of_the_user_replaces_vmvaults(tmp_path: Path) -> None:
    """A network whose helper QEMU must run (``-netdev bridge``, ``tap`` with ``script=``)
    needs QEMU to start programs: ``--qemu-arg=-sandbox --qemu-arg=off`` says so."""
    runner = _bare_runner(tmp_path / "vm", ["-sandbox", "off"])
    try:
        assert runner.launch().endswith("not sandboxed (see qemu.log)")
        assert _proc_status(int(runner.state["qemu"]["pid"]))["Seccomp"] == "0"
    finally:
        runner.stop(10)
        runner.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving QEMU other ids needs root")
def test_qemu_under_ids_of_its_own_cannot_open_roots_files(tmp_path: Path) -> None:
    """A file a --qemu-arg names that only root may read is refused to QEMU by the kernel, and
    the error says what to do; readable by others, it is opened; ``--qemu-as-root`` keeps root."""
    folder = Path(tempfile.mkdtemp(prefix="vmvault-instant-ids-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        image = folder / "extra.raw"
        image.write_bytes(bytes(1 << 20))
        image.chmod(0o600)
        runner = _bare_runner(tmp_path / "vm", ["-drive", f"file={image},format=raw,if=virtio,readonly=on"])
        ids = platform.transient_ids()
        assert ids is not None
        runner.state["qemu_ids"] = list(ids)
        with pytest.raises(HypervisorError, match=r"Permission denied.*not root.*--qemu-as-root"):
            runner.launch()
        image.chmod(0o644)
        try:
            assert " as user id " in runner.launch()
            uid = runner.state["qemu_ids"][0]
            assert _proc_status(int(runner.state["qemu"]["pid"]))["Uid"].split() == [str(uid)] * 4
            assert runner.qmp.execute("query-status")["status"] in ("running", "prelaunch")
        finally:
            runner.stop(10)
            runner.close()
        forged = _bare_runner(tmp_path / "forged", [])
        forged.state["qemu_ids"] = [0, 0]  # a state naming root's ids (or any outside the range) is refused
        with pytest.raises(ConfigError, match="QEMU ids are malformed"):
            forged.launch()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="vmvault as root")
def test_qemu_as_root_when_asked(setup: Setup) -> None:
    state = setup.start(qemu_as_root=True)
    assert "qemu_ids" not in state
    assert _proc_status(int(state["qemu"]["pid"]))["Uid"].split() == ["0"] * 4  # type: ignore[index]


@pytest.mark.skipif(os.geteuid() != 0, reason="vmvault as root")
def test_in_a_namespace_that_maps_no_unused_id_qemu_keeps_root_and_says_so(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rootless container maps a few thousand ids: none of the transient range exists there."""
    mapping = tmp_path / "map"
    mapping.write_text("         0     100000      65536\n")
    monkeypatch.setattr(platform, "_ID_MAPS", (str(mapping), str(mapping)))
    said: list[str] = []
    options = instant.InstantOptions(**OPTIONS)  # type: ignore[arg-type]
    state = instant.start(str(setup.repo_dir), PASS, setup.snap, setup.target, options, on_event=said.append)
    assert "qemu_ids" not in state
    assert any("QEMU runs as root: this user namespace maps no unused id" in line for line in said), said
    assert _proc_status(int(state["qemu"]["pid"]))["Uid"].split() == ["0"] * 4

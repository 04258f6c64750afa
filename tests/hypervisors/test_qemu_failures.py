"""Failures at every step of a live backup leave nothing behind and keep change tracking right."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import small_tmpfs
from tests.hypervisors.qemu_vm import (
    DiskSpec,
    MiB,
    QemuVM,
    assert_nothing_left,
    covers,
    make_vm,
    previous_of,
    read_disk,
)
from vmvault.errors import HypervisorError, SourceError
from vmvault.hypervisors import qemu as qemu_mod
from vmvault.hypervisors._qmp import QmpClient, QmpError
from vmvault.hypervisors.base import PreviousBackup
from vmvault.hypervisors.qemu import QemuBackupSession, QemuSource

__all__ = ["make_vm"]

pytestmark = pytest.mark.integration

KiB = 1024


class Tracked:
    """A VM with a completed first backup and writes made since, for checking the next incremental."""

    def __init__(self, vm: QemuVM, scratch: Path) -> None:
        self.vm = vm
        self.scratch = scratch
        scratch.mkdir(exist_ok=True)
        self.source = QemuSource(f"{vm.location}?scratch={scratch}")
        vm.write("vda", 0, 2 * MiB, 0x10)
        vm.write("vdb", 0, 2 * MiB, 0x20)
        with self.source.open_session(None) as s:
            s.complete("snap-1")
            self.prev: PreviousBackup = previous_of(s, "snap-1")
        self.baseline = vm.node_names()
        self.since: dict[str, list[tuple[int, int]]] = {"vda": [], "vdb": []}
        self.write("vda", 3 * MiB, 4 * KiB, 0x11)
        self.write("vdb", 7 * MiB, 100 * KiB, 0x21)

    def write(self, dev: str, off: int, n: int, pattern: int) -> None:
        self.vm.write(dev, off, n, pattern)
        self.since[dev].append((off, n))

    def assert_clean_and_tracking(self) -> None:
        """Nothing left, the first backup's bitmaps still track, and the next incremental is right."""
        assert_nothing_left(self.vm, self.baseline, self.scratch)
        for i, dev in enumerate(("vda", "vdb")):
            assert self.vm.vmvault_bitmaps(f"disk{i}") == [self.prev.disks[dev]["bitmap"]]
        with self.source.open_session(self.prev) as s:
            at_start = self.vm.snapshot_model()
            for disk in s.disks:
                assert disk.changed is not None, s.warnings
                for off, n in self.since[disk.name]:
                    assert covers(disk.changed, off, n), (disk.name, off, n, disk.changed)
                for off, n in disk.changed:
                    assert disk.image.read(off, n) == at_start[disk.name][off : off + n]
        assert_nothing_left(self.vm, self.baseline, self.scratch)


@pytest.fixture
def tracked(make_vm: Callable[..., QemuVM], tmp_path: Path) -> Tracked:
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 16 * MiB)])
    return Tracked(vm, tmp_path / "scratch")


def fail_on(monkeypatch: pytest.MonkeyPatch, sock: str, command: str, nth: int) -> list[str]:
    """Make vmvault's QMP connection fail the ``nth`` ``command`` (the test's own is untouched)."""
    real = QmpClient.execute
    seen: list[str] = []

    def execute(self: QmpClient, cmd: str, arguments: Any = None, **kw: Any) -> Any:
        if self.path == sock:
            seen.append(cmd)
            if cmd == command and seen.count(cmd) == nth:
                raise HypervisorError(f"injected failure of {cmd}")
        return real(self, cmd, arguments, **kw)

    monkeypatch.setattr(QmpClient, "execute", execute)
    return seen


@pytest.mark.parametrize(
    ("command", "nth"),
    [
        ("blockdev-add", 2),  # the second disk's scratch overlay
        ("transaction", 1),
        ("nbd-server-start", 1),
        ("block-export-add", 2),  # after the first export exists
    ],
)
def test_qmp_failure_during_setup(tracked: Tracked, monkeypatch: pytest.MonkeyPatch, command: str, nth: int) -> None:
    seen = fail_on(monkeypatch, tracked.vm.vmvault_sock, command, nth)
    with pytest.raises(HypervisorError, match=f"injected failure of {command}"):
        tracked.source.open_session(tracked.prev)
    assert seen.count(command) == nth
    monkeypatch.undo()
    tracked.write("vda", 9 * MiB, 4 * KiB, 0x12)
    tracked.assert_clean_and_tracking()


def test_failing_action_inside_the_transaction(tracked: Tracked, monkeypatch: pytest.MonkeyPatch) -> None:
    real = QemuBackupSession._freeze_actions

    def with_bogus(self: QemuBackupSession) -> list[dict[str, Any]]:
        actions = real(self)
        # a second action that QEMU rejects: the whole transaction must roll back
        actions.insert(1, {"type": "block-dirty-bitmap-add", "data": {"node": "no-such-node", "name": "x"}})
        return actions

    monkeypatch.setattr(QemuBackupSession, "_freeze_actions", with_bogus)
    with pytest.raises(QmpError) as info:
        tracked.source.open_session(tracked.prev)
    assert info.value.command == "transaction" and "no-such-node" in info.value.desc
    monkeypatch.undo()
    tracked.assert_clean_and_tracking()


def test_nbd_failure_while_opening_disks(tracked: Tracked, monkeypatch: pytest.MonkeyPatch) -> None:
    real = qemu_mod.NbdImage
    opened: list[Any] = []

    def second_fails(*args: Any, **kw: Any) -> Any:
        if opened:
            raise SourceError("injected: NBD connect failed")
        opened.append(real(*args, **kw))
        return opened[-1]

    monkeypatch.setattr(qemu_mod, "NbdImage", second_fails)
    with pytest.raises(SourceError, match="injected"):
        tracked.source.open_session(tracked.prev)
    monkeypatch.undo()
    tracked.assert_clean_and_tracking()


def test_exception_while_reading(tracked: Tracked) -> None:
    with pytest.raises(RuntimeError, match="engine failed"), tracked.source.open_session(tracked.prev) as s:
        tracked.write("vda", 12 * MiB, 4 * KiB, 0x13)  # after this session's freeze
        s.disks[0].image.read(0, MiB)
        raise RuntimeError("engine failed")
    tracked.assert_clean_and_tracking()


def test_nbd_connection_dropped_reconnects(tracked: Tracked) -> None:
    with tracked.source.open_session(tracked.prev) as s:
        at_start = tracked.vm.snapshot_model()
        image = s.disks[0].image
        assert image.read(0, MiB) == at_start["vda"][:MiB]
        for conn in image._idle:  # type: ignore[attr-defined]
            conn._sock.shutdown(socket.SHUT_RDWR)  # the connection dies under the reader
        assert image.read(0, 2 * MiB) == at_start["vda"][: 2 * MiB]
    tracked.assert_clean_and_tracking()


def test_export_removed_under_the_reader(tracked: Tracked) -> None:
    with tracked.source.open_session(tracked.prev) as s:
        read_disk(s.disks[0])
        for export in tracked.vm.q("query-block-exports"):  # QEMU drops the export and its clients
            tracked.vm.q("block-export-del", id=export["id"], mode="hard")
        with pytest.raises(SourceError):
            read_disk(s.disks[0])
    tracked.assert_clean_and_tracking()


def test_vmvault_crash_leftovers_are_swept(tracked: Tracked) -> None:
    s = tracked.source.open_session(tracked.prev)
    crashed_dir = s.tempdir
    assert crashed_dir is not None and os.path.isdir(crashed_dir)
    # the process dies: no close(); its QMP and NBD connections drop
    for d in s.disks:
        d.image.close()
    assert s._qmp is not None
    s._qmp.close()
    tracked.write("vda", 14 * MiB, 4 * KiB, 0x14)
    with tracked.source.open_session(tracked.prev) as s2:
        assert any("interrupted vmvault backup" in w for w in s2.warnings)
        assert any("left by an earlier, unfinished backup" in w for w in s2.warnings)
    assert not os.path.exists(crashed_dir)
    tracked.assert_clean_and_tracking()


def test_a_teardown_that_fails_unforeseen_still_lets_go_of_qmp(
    tracked: Tracked, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU serves one QMP client at a time: a teardown failing with what no handler foresaw
    had left the connection open, and every later backup of the VM in a daemon that lives on
    was refused ("no answer from QMP"). The next session sweeps what the teardown left."""

    def broken(self: QemuBackupSession, step: Any) -> None:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(QemuBackupSession, "_teardown_qemu", broken)
    session = tracked.source.open_session(tracked.prev)
    with pytest.raises(RuntimeError, match="unforeseen"):
        session.close()
    monkeypatch.undo()
    with QmpClient(tracked.vm.vmvault_sock, timeout=5).connect() as qmp:
        assert qmp.execute("query-status")["status"] == "running"
    with tracked.source.open_session(tracked.prev) as s:
        assert any("interrupted vmvault backup" in w for w in s.warnings)
    tracked.assert_clean_and_tracking()


def test_a_qemu_silent_in_the_teardown_is_not_taken_for_gone(tracked: Tracked) -> None:
    """A QEMU that takes the connection but does not answer (stopped here; stuck on its storage
    or busy elsewhere) is still running the session's copy-before-write filter and exports. The
    teardown had taken it for gone: a warning that nothing remained, the scratch folder removed
    under QEMU's open files, and the backup reported clean. Now an error names what may remain,
    the folder is kept, and the next session removes both once QEMU answers."""
    source = QemuSource(tracked.source.location + f"?scratch={tracked.scratch}", timeout=30.0)
    session = source.open_session(tracked.prev)
    read_disk(session.disks[0])
    assert session._qmp is not None and session.tempdir is not None
    source.timeout = session._qmp.timeout = 1.0
    pid = tracked.vm.proc.pid if tracked.vm.proc is not None else 0
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(HypervisorError) as caught:
            session.close()
        assert time.monotonic() - started < 15
    finally:
        os.kill(pid, signal.SIGCONT)
    message = str(caught.value)
    assert "did not answer" in message and "copy-before-write node vmvault-fl0-" in message, message
    assert f"the scratch folder {session.tempdir} is kept" in message
    assert not any("nothing of this session remains" in w for w in session.warnings)
    assert os.path.isdir(session.tempdir)
    assert any(n.startswith("vmvault-fl") for n in tracked.vm.node_names())  # the error told the truth
    with tracked.source.open_session(tracked.prev) as s:
        assert any("interrupted vmvault backup" in w for w in s.warnings)
    assert not os.path.exists(session.tempdir)
    tracked.assert_clean_and_tracking()


def test_a_node_cannot_get_a_folder_elsewhere_removed(tracked: Tracked, tmp_path: Path) -> None:
    """The sweep takes a node's file name from QEMU, which runs what a guest may have taken over
    (as does anyone holding its QMP socket): nodes named like vmvault's scratch nodes, with files
    in folders named like scratch folders but elsewhere, or another user's, keep those folders."""
    elsewhere = tmp_path / "elsewhere" / "vmvault-qemu-precious"
    theirs = tracked.scratch / "vmvault-qemu-theirs"
    for i, folder in enumerate((elsewhere, theirs)):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text("mine")
        image = folder / "x.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
        tracked.vm.q(
            "blockdev-add",
            **{
                "node-name": f"vmvault-fl{7 + i}-evil",
                "driver": "qcow2",
                "file": {"driver": "file", "filename": str(image)},
            },
        )
    os.chown(theirs, 65534, 65534)
    with tracked.source.open_session(tracked.prev) as s:
        for folder in (elsewhere, theirs):
            assert any(f"not removing {folder}" in w for w in s.warnings), s.warnings
    assert (elsewhere / "keep.txt").read_text() == (theirs / "keep.txt").read_text() == "mine"
    shutil.rmtree(theirs)
    tracked.assert_clean_and_tracking()


def test_qemu_killed_during_session_then_restarted(tracked: Tracked) -> None:
    vm = tracked.vm
    s = tracked.source.open_session(tracked.prev)
    tempdir = s.tempdir
    vm.kill()
    with pytest.raises(SourceError):
        read_disk(s.disks[0])
    s.close()  # QEMU is gone: nothing remains in it; the scratch folder goes
    assert any("no longer reachable" in w for w in s.warnings)
    assert tempdir is not None and not os.path.exists(tempdir)
    assert list(tracked.scratch.iterdir()) == []
    vm.start()
    # QEMU stores persistent bitmaps only when it closes the image: killed, it never did, so
    # the qcow2 bitmap is gone as well and both disks are read whole
    with tracked.source.open_session(tracked.prev) as s2:
        vda, vdb = s2.disks
        assert vda.changed is None and vdb.changed is None
        assert any("vda:" in w and "QEMU was killed" in w for w in s2.warnings), s2.warnings
        assert any("vdb:" in w and "lost when QEMU restarts" in w for w in s2.warnings), s2.warnings
        s2.complete("snap-2")
    # one tracking bitmap per disk remains
    assert vda.cbt is not None and vdb.cbt is not None
    assert vm.vmvault_bitmaps("disk0") == [vda.cbt["bitmap"]]
    assert vm.vmvault_bitmaps("disk1") == [vdb.cbt["bitmap"]]


# -- guest agent ----------------------------------------------------------------------------------


class FakeAgent:
    """A unix socket speaking the guest agent's JSON protocol, like qemu-ga behind virtio-serial."""

    def __init__(
        self, path: str, vm: QemuVM, fail_freeze: bool = False, fail_thaw: bool = False, frozen: int = 2
    ) -> None:
        self.path = path
        self.vm = vm
        self.fail_freeze = fail_freeze
        self.fail_thaw = fail_thaw
        self.frozen = frozen
        self.log: list[tuple[str, int]] = []  # (command, number of block jobs at that moment)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    req = json.loads(line)
                    cmd = req["execute"]
                    jobs = len(self.vm.q("query-block-jobs"))
                    self.log.append((cmd, jobs))
                    reply: dict[str, Any]
                    if cmd == "guest-sync":
                        reply = {"return": req["arguments"]["id"]}
                    elif cmd == "guest-fsfreeze-freeze" and self.fail_freeze:
                        reply = {"error": {"class": "GenericError", "desc": "failed to freeze /: busy"}}
                    elif cmd == "guest-fsfreeze-thaw" and self.fail_thaw:
                        reply = {"error": {"class": "GenericError", "desc": "thaw failed"}}
                    elif cmd in ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw"):
                        reply = {"return": self.frozen}
                    else:
                        reply = {"error": {"class": "CommandNotFound", "desc": f"{cmd} not found"}}
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def agent_vm(make_vm: Callable[..., QemuVM], tmp_path: Path) -> Iterator[tuple[QemuVM, Path]]:
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    yield vm, tmp_path


def test_guest_agent_freezes_around_the_transaction(agent_vm: tuple[QemuVM, Path]) -> None:
    vm, tmp = agent_vm
    agent = FakeAgent(str(tmp / "qga.sock"), vm)
    try:
        with QemuSource(f"{vm.location}?qga={tmp}/qga.sock").open_session(None) as s:
            assert s.consistency == "filesystem-consistent"
        cmds = [c for c, _ in agent.log if c != "guest-sync"]
        assert cmds == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
        jobs = dict((c, j) for c, j in agent.log if c != "guest-sync")
        # frozen before the backup job existed, thawed once it did
        assert jobs["guest-fsfreeze-freeze"] == 0 and jobs["guest-fsfreeze-thaw"] == 1
    finally:
        agent.close()


def test_failing_freeze_falls_back_to_crash_consistent(agent_vm: tuple[QemuVM, Path]) -> None:
    vm, tmp = agent_vm
    agent = FakeAgent(str(tmp / "qga.sock"), vm, fail_freeze=True)
    try:
        with QemuSource(f"{vm.location}?qga={tmp}/qga.sock").open_session(None) as s:
            assert s.consistency == "crash-consistent"
            assert any("crash-consistent" in w and "busy" in w for w in s.warnings)
        # a freeze that failed half-way is thawed anyway
        assert [c for c, _ in agent.log if c != "guest-sync"] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    finally:
        agent.close()
    # no agent listening at all: same fallback
    with QemuSource(f"{vm.location}?qga={tmp}/absent.sock").open_session(None) as s:
        assert s.consistency == "crash-consistent"
        assert any("cannot connect to guest agent" in w for w in s.warnings)


def test_thaw_after_failed_transaction(agent_vm: tuple[QemuVM, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    vm, tmp = agent_vm
    agent = FakeAgent(str(tmp / "qga.sock"), vm)
    fail_on(monkeypatch, vm.vmvault_sock, "transaction", 1)
    try:
        with pytest.raises(HypervisorError, match="injected"):
            QemuSource(f"{vm.location}?qga={tmp}/qga.sock").open_session(None)
        assert [c for c, _ in agent.log if c != "guest-sync"] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    finally:
        agent.close()


@pytest.fixture
def tiny_scratch(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs as scratch folder (needs root to mount; skipped otherwise)."""
    with small_tmpfs(tmp_path / "tiny", "3M") as mnt:
        yield mnt


def test_scratch_folder_too_small(make_vm: Callable[..., QemuVM], tiny_scratch: Path) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 32 * MiB)])
    baseline = vm.node_names()
    vm.write("vda", 0, 8 * MiB, 0x11)
    with QemuSource(f"{vm.location}?scratch={tiny_scratch}").open_session(None) as s:
        assert any("guest writes fail once it is full" in w for w in s.warnings)
        at_start = vm.snapshot_model()
        # QEMU 7.2 cannot copy 8 MiB out into 3 MiB: it fails the guest's write (documented)
        vm.q(
            "human-monitor-command",
            **{"command-line": 'qemu-io -d /machine/peripheral/vda/virtio-backend "write -P 0x22 0 8M"'},
        )
        assert "write failed: No space left on device" in (vm.workdir / "qemu.log").read_text()
        assert read_disk(s.disks[0]) == at_start["vda"]  # the frozen view is still right
    assert_nothing_left(vm, baseline, tiny_scratch)
    vm.verify_model()  # the failed guest write changed nothing


def test_idle_nbd_server_of_an_interrupted_run_is_replaced(tracked: Tracked, tmp_path: Path) -> None:
    stale = str(tmp_path / "stale-nbd.sock")
    tracked.vm.q("nbd-server-start", addr={"type": "unix", "data": {"path": stale}})
    with tracked.source.open_session(tracked.prev) as s:
        assert any("NBD server without exports" in w for w in s.warnings)
        assert s.disks[0].changed is not None
    # no NBD server is left: a new one can start
    tracked.vm.q("nbd-server-start", addr={"type": "unix", "data": {"path": stale}})
    tracked.vm.q("nbd-server-stop")
    tracked.assert_clean_and_tracking()


def test_busy_nbd_server_of_another_tool_is_left_alone(tracked: Tracked, tmp_path: Path) -> None:
    other = str(tmp_path / "other-nbd.sock")
    tracked.vm.q("nbd-server-start", addr={"type": "unix", "data": {"path": other}})
    tracked.vm.q("block-export-add", type="nbd", id="theirs", **{"node-name": "disk0"}, writable=False)
    with pytest.raises(QmpError, match="already running"):
        tracked.source.open_session(tracked.prev)
    assert [e["id"] for e in tracked.vm.q("query-block-exports")] == ["theirs"]
    tracked.vm.q("block-export-del", id="theirs")
    tracked.vm.wait_export_gone("theirs")
    tracked.vm.q("nbd-server-stop")
    tracked.assert_clean_and_tracking()


def test_failed_thaw_is_retried_and_reported(agent_vm: tuple[QemuVM, Path]) -> None:
    vm, tmp = agent_vm
    agent = FakeAgent(str(tmp / "qga.sock"), vm, fail_thaw=True)
    try:
        with QemuSource(f"{vm.location}?qga={tmp}/qga.sock").open_session(None) as s:
            # frozen while the transaction ran: the snapshot is file-system consistent
            assert s.consistency == "filesystem-consistent"
            assert any("could not thaw" in w for w in s.warnings)
        cmds = [c for c, _ in agent.log if c != "guest-sync"]
        assert cmds == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-thaw"]  # again in close
    finally:
        agent.close()


def test_agent_that_freezes_nothing(agent_vm: tuple[QemuVM, Path]) -> None:
    vm, tmp = agent_vm
    agent = FakeAgent(str(tmp / "qga.sock"), vm, frozen=0)
    try:
        with QemuSource(f"{vm.location}?qga={tmp}/qga.sock").open_session(None) as s:
            assert s.consistency == "crash-consistent"
            assert any("froze no file system" in w for w in s.warnings)
    finally:
        agent.close()

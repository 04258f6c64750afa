"""The QMP client against a real QEMU and against sockets that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hypervisors.qemu_vm import DiskSpec, MiB, QemuVM, make_vm
from vmvault.errors import HypervisorError
from vmvault.hypervisors._qmp import QmpClient, QmpError

__all__ = ["make_vm"]


@pytest.mark.integration
def test_commands_errors_and_events(make_vm: Callable[..., QemuVM]) -> None:
    vm = make_vm([DiskSpec("vda", "raw", MiB)])
    with QmpClient(vm.vmvault_sock).connect() as qmp:
        assert qmp.greeting["version"]["qemu"]["major"] >= 7
        assert qmp.peer_pid() == (vm.proc.pid if vm.proc else None)
        assert qmp.execute("query-status")["status"] == "running"
        with pytest.raises(HypervisorError, match="one client at a time"):
            QmpClient(vm.vmvault_sock, timeout=0.3).connect()  # the socket is busy with ``qmp``
        with pytest.raises(QmpError) as info:
            qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound" and info.value.command == "no-such-command"
        with pytest.raises(QmpError) as info:
            qmp.execute("block-dirty-bitmap-add", {"node": "nowhere", "name": "x"})
        assert info.value.error_class == "GenericError" and "nowhere" in info.value.desc
        # events are queued while waiting for replies, and found later
        qmp.execute("stop")
        qmp.execute("query-status")
        assert qmp.wait_event("STOP", timeout=5)["event"] == "STOP"
        qmp.execute("cont")
        assert qmp.wait_event("RESUME", timeout=5)["event"] == "RESUME"
        with pytest.raises(HypervisorError, match="no answer"):
            qmp.wait_event("SHUTDOWN", timeout=0.2)
    assert not qmp.connected
    with pytest.raises(HypervisorError, match="closed"):
        qmp.execute("query-status")


def serve_once(path: str, replies: list[bytes], hold: float = 0.0) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        with conn:
            for r in replies:
                conn.sendall(r)
            time.sleep(hold)
        server.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_not_qmp_silent_and_dropped_sockets(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="cannot connect to QMP"):
        QmpClient(str(tmp_path / "absent.sock")).connect()
    t = serve_once(str(tmp_path / "a.sock"), [b'{"hello": 1}\n'])
    with pytest.raises(HypervisorError, match="not a QMP socket"):
        QmpClient(str(tmp_path / "a.sock"), timeout=2).connect()
    t.join()
    t = serve_once(str(tmp_path / "b.sock"), [], hold=1.0)
    started = time.monotonic()
    with pytest.raises(HypervisorError, match=r"no answer from QMP within 0\.3 s"):
        QmpClient(str(tmp_path / "b.sock"), timeout=0.3).connect()
    assert time.monotonic() - started < 0.9
    t.join()
    t = serve_once(str(tmp_path / "c.sock"), [b'{"QMP": {"version": {}}}\n'])
    with pytest.raises(HypervisorError, match=r"closed the connection|connection lost"):
        QmpClient(str(tmp_path / "c.sock"), timeout=2).connect()
    t.join()
    t = serve_once(str(tmp_path / "d.sock"), [b"not json\n"])
    with pytest.raises(HypervisorError, match="not JSON"):
        QmpClient(str(tmp_path / "d.sock"), timeout=2).connect()
    t.join()


def _scripted(path: str, *messages: dict[str, object]) -> threading.Thread:
    """A QMP peer: the greeting, ``qmp_capabilities`` answered, then ``messages`` sent ahead of
    the commands (each reply's ``id`` that of the next command; events as they are)."""
    lines = [b'{"QMP": {"version": {}, "capabilities": []}}\n', b'{"return": {}, "id": "vmvault-1"}\n']
    replies = itertools.count(2)
    for message in messages:
        doc = message if "event" in message else message | {"id": f"vmvault-{next(replies)}"}
        lines.append(json.dumps(doc).encode() + b"\n")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"".join(lines))
            while conn.recv(65536):  # the commands, until the client hangs up (no reset)
                pass
        server.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    ("command", "reply", "named"),
    [
        ("query-block-jobs", [{"device": 5}], "query-block-jobs with list"),
        ("query-block-exports", [{"type": "nbd"}], "query-block-exports with list"),
        ("query-version", {"qemu": {"major": "7", "minor": 2}}, "query-version with dict"),
        ("query-status", {"running": True}, "query-status with dict"),
        ("query-memory-size-summary", {"base-memory": -1}, "query-memory-size-summary with dict"),
        ("query-block", [{"device": "vda", "inserted": {"node-name": "n"}}], "query-block with list"),
        (
            "query-named-block-nodes",
            [{"node-name": "n", "dirty-bitmaps": [{"name": "b", "granularity": "64K"}]}],
            "query-named-block-nodes with list",
        ),
        ("qom-list", {"name": "x"}, "qom-list with dict"),
    ],
)
def test_a_reply_of_another_shape_is_refused_naming_the_command(
    tmp_path: Path, command: str, reply: object, named: str
) -> None:
    """What QEMU answers is read as its QAPI schema documents (``_qmp.REPLIES``): a QEMU taken
    over by its guest answering otherwise had a backup fail with a KeyError or TypeError (one
    in the teardown left the QMP connection open, refusing every later backup of the VM)."""
    t = _scripted(str(tmp_path / "q.sock"), {"return": reply})
    with (
        QmpClient(str(tmp_path / "q.sock"), timeout=2).connect() as qmp,
        pytest.raises(HypervisorError, match=f"QEMU answered {named}"),
    ):
        qmp.execute(command)
    t.join()


def test_an_error_or_an_event_of_another_shape_is_read_as_what_it_holds(tmp_path: Path) -> None:
    t = _scripted(
        str(tmp_path / "q.sock"),
        {"error": "text where an object belongs"},
        {"event": "BLOCK_JOB_CANCELLED", "data": ["a", "list"]},
        {"event": "BLOCK_JOB_CANCELLED", "data": {"device": "vmvault-job"}},
        {"return": []},
    )
    with QmpClient(str(tmp_path / "q.sock"), timeout=2).connect() as qmp:
        with pytest.raises(QmpError) as info:
            qmp.execute("block-job-cancel")
        assert info.value.error_class == "?"
        # the event whose data is a list is queued, not handed to the matcher as one
        event = qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d.get("device") == "vmvault-job")
        assert event["data"] == {"device": "vmvault-job"}
        assert qmp.execute("query-block-jobs") == []
    t.join()


#: answers that do not change while a stopped VM sits still
_STABLE_QUERIES = ("query-version", "query-status", "query-block", "query-named-block-nodes", "query-commands")


@pytest.mark.integration
def test_replies_agree_with_qemu_qmp(make_vm: Callable[..., QemuVM]) -> None:
    """qemu.qmp (QEMU's own Python client) is the oracle for our synchronous client: the same
    commands on the same VM give the same replies, and the same errors (see _qmp.py)."""
    qemu_qmp = pytest.importorskip("qemu.qmp", reason="qemu.qmp is the oracle for our QMP client")
    vm = make_vm([DiskSpec("vda", "raw", MiB), DiskSpec("vdb", "qcow2", 2 * MiB)])
    bad_calls: list[tuple[str, dict[str, object] | None]] = [
        ("no-such-command", None),
        ("block-dirty-bitmap-add", {"node": "nowhere", "name": "x"}),
        ("query-status", {"unexpected": 1}),
    ]

    with QmpClient(vm.vmvault_sock).connect() as qmp:
        qmp.execute("stop")
        ours = {command: qmp.execute(command) for command in _STABLE_QUERIES}
        our_errors = []
        for command, arguments in bad_calls:
            with pytest.raises(QmpError) as info:
                qmp.execute(command, arguments)
            our_errors.append((info.value.error_class, info.value.desc))

    async def oracle() -> tuple[dict[str, object], list[tuple[str, str]]]:
        client = qemu_qmp.QMPClient("vmvault-oracle")
        await client.connect(vm.vmvault_sock)
        try:
            replies = {command: await client.execute(command) for command in _STABLE_QUERIES}
            errors = []
            for command, arguments in bad_calls:
                try:
                    await client.execute(command, arguments)
                except qemu_qmp.ExecuteError as exc:
                    errors.append((exc.error.error.class_, exc.error.error.desc))
            return replies, errors
        finally:
            await client.disconnect()

    theirs, their_errors = asyncio.run(oracle())
    assert ours == theirs
    assert our_errors == their_errors and len(our_errors) == len(bad_calls)


def test_a_hostile_guest_agent_cannot_crash_or_flood_the_client(tmp_path: Path) -> None:
    """The guest agent's socket carries what the guest sends (boot verification pings it): JSON
    nested past the parser's depth and a line without end are errors, not a crash or a heap
    that grows as long as the guest writes."""
    from vmvault.hypervisors._qmp import MAX_LINE, GuestAgentClient

    # the connection stays open a moment: closed at once, the client's guest-sync could meet a
    # closed socket before it reads the line
    t = serve_once(str(tmp_path / "deep.sock"), [b"[" * 200_000 + b"\n"], hold=1.0)
    with pytest.raises(HypervisorError, match="not JSON"):
        GuestAgentClient(str(tmp_path / "deep.sock"), timeout=5).connect()
    t.join()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "long.sock"))
    server.listen(1)

    def flood() -> None:  # a line without end, until the client hangs up
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):
            while True:
                conn.sendall(b"x" * (1 << 20))

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    started = time.monotonic()
    with pytest.raises(HypervisorError, match=f"longer than {MAX_LINE >> 20} MiB"):
        GuestAgentClient(str(tmp_path / "long.sock"), timeout=10).connect()
    assert time.monotonic() - started < 5
    t.join(5)
    server.close()

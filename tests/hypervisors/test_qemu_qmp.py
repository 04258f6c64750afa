"""The QMP client against a real QEMU and against sockets that misbehave."""

from __future__ import annotations

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

"""A failure injected at every libvirt call of a backup, and libvirtd restarted mid-backup:
one clear error (or a warning), and nothing left behind: no backup job, no scratch file, no
vmvault checkpoint but the one bound to the newest snapshot; the next backup is right."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.hypervisors.qemu_vm import read_disk
from tests.libvirtd import Disk, Libvirtd, LibvirtVM, libvirtd, make_domain
from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import HypervisorError, VmvaultError
from vmvault.hypervisors import libvirt as connector
from vmvault.hypervisors.libvirt import LibvirtSource
from vmvault.repo.repository import Repository

__all__ = ["libvirtd", "make_domain"]

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


class Faults:
    """Counts every call vmvault makes into libvirt; the ``fail_at``-th raises libvirtError."""

    def __init__(self, real: Any, fail_at: int = 0) -> None:
        self.real = real
        self.fail_at = fail_at
        self.calls: list[str] = []

    def tick(self, name: str) -> None:
        self.calls.append(name)
        if len(self.calls) == self.fail_at:
            raise self.real.libvirtError(f"injected failure at libvirt call {self.fail_at} ({name})")

    def wrap(self, value: Any) -> Any:
        real = self.real
        if isinstance(value, real.virConnect | real.virDomain | real.virDomainCheckpoint):
            return _Proxy(value, self)
        if isinstance(value, list):
            return [self.wrap(v) for v in value]
        return value


class _Proxy:
    def __init__(self, obj: Any, faults: Faults) -> None:
        self._obj = obj
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._faults.tick(name)
            return self._faults.wrap(attr(*args, **kwargs))

        return call


class FaultyLibvirt:
    """The libvirt module, with every connection (and what it hands out) counted."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._faults.real, name)

    def open(self, uri: str) -> Any:
        self._faults.tick("open")
        return self._faults.wrap(self._faults.real.open(uri))


def _vmvault_checkpoints(vm: LibvirtVM) -> list[str]:
    return [c for c in vm.checkpoints() if c.startswith("vmvault-")]


def test_a_failure_at_every_libvirt_call_leaves_nothing_behind(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import libvirt

    vm = make_domain([Disk("vda", "qcow2", 16 * MiB), Disk("vdb", "raw", 8 * MiB)])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    source = LibvirtSource(f"{vm.location}&scratch={quote(str(scratch), safe='')}")
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=64 * 1024)
    faults = Faults(libvirt)
    monkeypatch.setattr(connector, "import_libvirt", lambda: FaultyLibvirt(faults))
    vm.write("vda", 0, MiB, 0x01)
    backup(repo, source)  # a clean full backup: what an incremental builds on
    faults.calls.clear()
    vm.write("vda", 2 * MiB, 64 * 1024, 0x02)
    backup(repo, source)  # a clean incremental: count its calls
    total = len(faults.calls)
    assert total > 20, faults.calls
    failed = 0
    for n in range(1, total + 1):
        vm.write("vda", (3 + n % 8) * MiB, 4096, n % 256)
        faults.calls.clear()
        faults.fail_at = n
        tidy = False
        try:
            result = backup(repo, source)
        except VmvaultError as exc:
            failed += 1
            assert "\n" not in str(exc)
        else:
            # a failure the session survives (tidying checkpoints after the snapshot is stored)
            # is a warning; otherwise exactly the new snapshot's checkpoint is left
            untidy = [w for w in result.warnings if "not tidied" in w or "stays" in w or "not be bound" in w]
            assert untidy or "injected" not in " ".join(result.warnings)
            tidy = not untidy
        faults.fail_at = 0
        assert not vm.has_job(), f"a backup job stayed after a failure at call {n} ({faults.calls[n - 1]})"
        assert list(scratch.iterdir()) == [], f"scratch files stayed after a failure at call {n}"
        newest = repo.list_snapshots()[-1]
        bound = newest.extra.get("libvirt", {}).get("checkpoint")
        assert bound in _vmvault_checkpoints(vm), f"call {n}: the newest snapshot's checkpoint is gone"
        if tidy:
            assert _vmvault_checkpoints(vm) == [bound], f"call {n}: {_vmvault_checkpoints(vm)}"
    assert failed >= total // 2
    # a clean backup afterwards is complete and leaves one checkpoint
    result = backup(repo, source)
    assert _vmvault_checkpoints(vm) == [result.snapshot.extra["libvirt"]["checkpoint"]]
    model = vm.snapshot_model()
    out = tmp_path / "out"
    restore(repo, result.snapshot, str(out))
    assert (out / "vda.qcow2").exists()
    vm.shutdown()
    import subprocess

    for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        raw = tmp_path / f"{target}.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", fmt, "-O", "raw", str(out / f"{target}.{fmt}"), str(raw)], check=True
        )
        assert raw.read_bytes() == model[target], target


def test_libvirtd_restarted_during_a_backup(
    make_domain: Callable[..., LibvirtVM], libvirtd: Libvirtd, tmp_path: Path
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB)])
    vm.write("vda", 0, MiB, 0x31)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    source = LibvirtSource(f"{vm.location}&scratch={quote(str(scratch), safe='')}")
    session = source.open_session(None)
    assert vm.has_job()
    libvirtd.restart()
    try:
        session.close()
    except VmvaultError as exc:  # allowed: it names what stayed; the next run cleans it
        assert "\n" not in str(exc)
    # the next backup works and leaves only its own checkpoint
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=64 * 1024)
    result = backup(repo, source)
    assert not vm.has_job() and list(scratch.iterdir()) == []
    assert _vmvault_checkpoints(vm) == [result.snapshot.extra["libvirt"]["checkpoint"]]


def test_a_qemu_that_stops_answering_costs_a_bounded_wait_and_says_what_remains(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvirt waits for QEMU's monitor without a limit: with the domain's QEMU stopped (as one
    stuck on its storage is), the teardown's first question about the job never returned, and a
    backup (a daemon's whole schedule with it) hung for good. Now each call is bounded: the
    session ends with an error naming what may remain, keeps the scratch folder QEMU may still
    write into, and the next backup, once QEMU answers, ends the job and removes the folder."""
    monkeypatch.setattr(connector, "CALL_LIMIT", 3.0)
    monkeypatch.setattr(connector, "QUICK_LIMIT", 1.0)
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB)])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    source = LibvirtSource(f"{vm.location}&scratch={quote(str(scratch), safe='')}")
    session = source.open_session(None)
    read_disk(session.disks[0])
    folder = session.tempdir
    assert folder is not None
    pid = vm.qemu_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(HypervisorError) as caught:
            session.close()
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    message = str(caught.value)
    assert "libvirt did not answer within 3 s" in message, message
    assert f"the backup job (virsh domjobabort {vm.name})" in message and f"{folder} is kept" in message
    assert waited < 10, waited  # the first unanswered call, then nothing asked again at length
    assert os.path.isdir(folder) and vm.has_job()  # the error told the truth
    with source.open_session(None) as s:
        assert any("interrupted vmvault run" in w for w in s.warnings), s.warnings
        assert not os.path.exists(folder)
        s.complete("3" * 64)
    assert not vm.has_job() and list(scratch.iterdir()) == []
    assert _vmvault_checkpoints(vm) == [s.checkpoint]


def test_a_libvirtd_that_stops_answering_costs_a_bounded_wait(
    libvirtd: Libvirtd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A libvirtd stopped or stuck accepts a connection and answers nothing: opening one, and a
    restore's define (a dashboard's restore thread with it), waited without end. Now opening
    and every call on the connection are bounded."""
    from vmvault.hypervisors import libvirt_restore

    monkeypatch.setattr(connector, "OPEN_LIMIT", 2.0)
    monkeypatch.setattr(connector, "CALL_LIMIT", 2.0)
    monkeypatch.setattr(connector, "QUICK_LIMIT", 1.0)
    pid = int((libvirtd.root / "libvirtd.pid").read_text())
    stopped = []

    def connect_then_stop(lv: Any, uri: str) -> Any:
        conn = connector.connect(lv, uri)
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        return conn

    monkeypatch.setattr(libvirt_restore, "connect", connect_then_stop)
    uuid = "0b0a3d7c-0000-4000-8000-000000000001"
    restored = libvirt_restore.RestoredDomain("never", uuid, str(tmp_path / "never.xml"), text="<domain/>")
    try:
        started = time.monotonic()
        with pytest.raises(HypervisorError, match="libvirt did not answer within 2 s"):
            libvirt_restore.define_domain(restored, libvirtd.uri)
        assert time.monotonic() - started < 8 and not restored.defined
        started = time.monotonic()
        with pytest.raises(HypervisorError, match=r"connecting to .*: libvirt did not answer within 2 s"):
            connector.connect(connector.import_libvirt(), libvirtd.uri)
        assert time.monotonic() - started < 5
    finally:
        for p in stopped:
            os.kill(p, signal.SIGCONT)
    assert "never" not in [d.name() for d in libvirtd.conn.listAllDomains(0)]

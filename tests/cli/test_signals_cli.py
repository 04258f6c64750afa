"""A command stopped by SIGTERM (``kill``, ``systemctl stop``, ``timeout``) undoes what it began,
as after Ctrl-C, before it exits 130; a second signal quits at once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hypervisors.qemu_vm import DiskSpec, MiB, QemuVM, assert_nothing_left, qemu_available
from vmvault.backends.local import LocalBackend
from vmvault.cli._common import STOP_SIGNALS, signals_interrupt
from vmvault.repo.repository import Repository

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def wait_until(what: str, ready: Callable[[], object], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what}: not within {seconds} s")


@pytest.fixture
def running_vm(tmp_path: Path) -> Iterator[QemuVM]:
    """A running QEMU guest with 1 GiB of random data on its disk: seconds of live backup."""
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 / qemu-img are not installed (Debian: qemu-system-x86 qemu-utils)")
    (tmp_path / "vm").mkdir()
    vm = QemuVM(tmp_path / "vm", [DiskSpec("vda", "raw", 1024 * MiB)])
    rng = random.Random(7)
    with open(vm.paths["vda"], "r+b") as f:
        for _ in range(32):
            f.write(rng.randbytes(32 * MiB))
    vm.start()
    yield vm
    vm.quit()


def test_a_live_backup_stopped_by_sigterm_leaves_the_vm_as_it_was(running_vm: QemuVM, tmp_path: Path) -> None:
    vm = running_vm
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    repo = tmp_path / "repo"
    Repository.init(LocalBackend(str(repo)), b"correct horse battery").close()
    baseline = vm.node_names()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), VMVAULT_PASSWORD="correct horse battery")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmvault", "backup", f"{vm.location}?scratch={scratch}", "-r", str(repo), "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until("the backup's NBD export", lambda: vm.q("query-block-exports") or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "SIGTERM: stopping, undoing what was begun" in err and "Traceback" not in err
    assert_nothing_left(vm, baseline, scratch)
    r = Repository.open(LocalBackend(str(repo)), b"correct horse battery")
    try:
        assert r.snapshot_ids() == []
    finally:
        r.close()


def test_a_stop_signal_interrupts_and_the_next_would_end_the_process() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with signals_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler raises here)
            raise AssertionError("SIGTERM did not interrupt")
        except KeyboardInterrupt:
            assert all(signal.getsignal(s) == signal.SIG_DFL for s in STOP_SIGNALS)
    assert signal.getsignal(signal.SIGTERM) == before

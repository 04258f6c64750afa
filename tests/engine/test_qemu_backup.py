"""End to end: a running QEMU VM backed up live through the engine, incrementally, and restored.

The guest keeps writing while the backup reads (writes are injected from the progress
callback, i.e. between reads); the restored disks must equal the disks at backup start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hypervisors.qemu_vm import DiskSpec, QemuVM, make_vm  # noqa: F401 - fixture
from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.engine.progress import NullReporter
from vmvault.engine.restore import restore
from vmvault.hypervisors import open_source
from vmvault.repo.check import check
from vmvault.repo.repository import Repository

MiB = 1 << 20

pytestmark = pytest.mark.integration


class WritingProgress(NullReporter):
    """Injects a guest write every few advances, i.e. while the backup is reading."""

    def __init__(self, vm: QemuVM, device: str, size: int) -> None:
        super().__init__()
        self.vm, self.device, self.size = vm, device, size
        self.calls = 0

    def advance(self, n: int) -> None:
        self.calls += 1
        if self.calls % 3 == 0:
            off = (self.calls * 7 * MiB) % (self.size - MiB)
            self.vm.write(self.device, off // 65536 * 65536, 65536, 0x40 + self.calls % 64)


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")


def test_live_full_then_incremental_then_restore(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:  # noqa: F811
    size = 64 * MiB
    vm = make_vm([DiskSpec("vda", "qcow2", size), DiskSpec("vdb", "raw", 32 * MiB)])
    for i in range(0, size, 4 * MiB):
        vm.write("vda", i, MiB, 0x10 + i // (4 * MiB))
    vm.write("vdb", 0, 8 * MiB, 0x77)
    repo = Repository.init(MemoryBackend(), b"pw", chunk_size=256 * 1024)
    source = open_source(vm.location)

    at_start = vm.snapshot_model()
    first = backup(repo, source, progress=WritingProgress(vm, "vda", size))
    assert first.snapshot.consistency == "crash-consistent"
    assert all(d.stats["incremental"] == 0 for d in first.snapshot.disks)
    out1 = tmp_path / "r1"
    restore(repo, first.snapshot, str(out1), format="raw")
    assert (out1 / "vda.raw").read_bytes() == at_start["vda"]
    assert (out1 / "vdb.raw").read_bytes() == at_start["vdb"]

    # ~1 % of vda changes; the incremental reads only the dirty chunks
    vm.write("vda", 10 * MiB, 65536, 0xEE)
    vm.write("vda", 50 * MiB + 4096, 4096, 0xEF)
    at_second = vm.snapshot_model()
    second = backup(repo, source)
    vda = next(d for d in second.snapshot.disks if d.name == "vda")
    assert vda.stats["incremental"] == 1
    # the writes made during the first backup are dirty too; all of it stays far below a full read
    assert vda.stats["bytes_read"] <= 16 * 256 * 1024, vda.stats
    out2 = tmp_path / "r2"
    restore(repo, second.snapshot, str(out2), format="raw")
    assert (out2 / "vda.raw").read_bytes() == at_second["vda"]
    assert (out2 / "vdb.raw").read_bytes() == at_second["vdb"]
    assert check(repo, read_data=True).ok
    # nothing is left behind in QEMU but one tracking bitmap per disk
    assert vm.q("query-block-jobs") == []
    assert vm.q("query-block-exports") == []
    assert len(vm.vmvault_bitmaps("disk0")) == 1


def test_failed_backup_keeps_tracking_for_the_next_incremental(
    make_vm: Callable[..., QemuVM],  # noqa: F811
    tmp_path: Path,
) -> None:
    size = 32 * MiB
    vm = make_vm([DiskSpec("vda", "qcow2", size)])
    vm.write("vda", 0, 4 * MiB, 0x11)
    repo = Repository.init(MemoryBackend(), b"pw", chunk_size=256 * 1024)
    source = open_source(vm.location)
    backup(repo, source)
    vm.write("vda", 20 * MiB, 65536, 0x22)

    class Boom(NullReporter):
        def advance(self, n: int) -> None:
            raise OSError(5, "injected read failure")

    with pytest.raises(OSError):
        backup(repo, source, progress=Boom())
    assert vm.q("query-block-jobs") == [] and vm.q("query-block-exports") == []
    vm.write("vda", 30 * MiB, 4096, 0x33)
    at_start = vm.snapshot_model()
    third = backup(repo, source)
    assert third.snapshot.disks[0].stats["incremental"] == 1
    out = tmp_path / "r"
    restore(repo, third.snapshot, str(out), format="raw")
    assert (out / "vda.raw").read_bytes() == at_start["vda"]
    assert os.path.getsize(out / "vda.raw") == size


def test_cli_restore_writes_a_runnable_clone_definition(
    make_vm: Callable[..., QemuVM],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from vmvault.cli import main

    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    vm.write("vda", 0, MiB, 0x5A)
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.setenv("VMVAULT_PASSWORD", "pw for the test")
    assert main(["init", "-q"]) == 0
    assert main(["backup", vm.location, "-q"]) == 0
    capsys.readouterr()
    assert main(["restore", "latest", "--target", str(tmp_path / "out"), "--as-clone", "clone1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["vm"]["name"] == "clone1" and doc["vm"]["uuid"] != vm.uuid
    script = Path(doc["vm"]["script"])
    assert script.exists() and os.access(script, os.X_OK)
    assert Path(doc["vm"]["libvirt_xml"]).read_text().count("clone1") >= 1
    restored = Path(doc["disks"][0]["path"])
    assert restored.exists() and str(restored) in script.read_text()

"""QEMU under ids of its own (``qemu_boot.boot_check``'s ``run_as``): QEMU holds them with no
group or capability, and a file only root may read stays closed to it while the same file,
once readable by others, is booted. (How the ids are drawn: tests/test_platform.py.)"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmvault import platform
from vmvault.errors import ConfigError, HypervisorError
from vmvault.hypervisors import qemu_boot
from vmvault.hypervisors.qemu_boot import BootDisk, BootMachine, Heartbeats, boot_check


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder anyone may look into (pytest's own are root's alone), for an image QEMU reads
    by its path."""
    folder = Path(tempfile.mkdtemp(prefix="vmvault-qemu-ids-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
def test_qemu_under_ids_of_its_own_cannot_read_roots_files(open_folder: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving QEMU other ids needs root")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.skip("qemu-system-x86_64 or qemu-img is not installed (Debian: qemu-system-x86 qemu-utils)")
    image = open_folder / "blank.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    disk = BootDisk(name="blank", base={"driver": "file", "filename": str(image)}, size=1 << 20)
    machine = BootMachine(disks=(disk,), memory=128 << 20, machine="pc", max_writes=64 << 20)
    ids = platform.transient_ids()
    assert ids is not None
    seen: dict[str, str] = {}

    def started(pid: int) -> None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            seen[key] = " ".join(value.split())

    image.chmod(0o644)  # others may read it: QEMU boots it, and SeaBIOS finds nothing on it
    outcome = boot_check(
        machine, Heartbeats(agent=False, marker="never"), timeout=120, work_dir=str(tmp_path), on_started=started,
        run_as=ids,
    )  # fmt: skip
    assert outcome.reason == "no-bootable-disk", (outcome.reason, outcome.message)
    assert outcome.uid == ids[0]
    assert seen["Uid"] == " ".join([str(ids[0])] * 4) and seen["Gid"] == " ".join([str(ids[1])] * 4)
    assert seen["Groups"] == "" and seen["CapEff"] == "0000000000000000" and seen["CapPrm"] == "0000000000000000"
    assert seen["NoNewPrivs"] == "1"
    assert list(tmp_path.iterdir()) == []

    image.chmod(0o600)  # root's alone: QEMU, which is not root, cannot open it
    with pytest.raises(HypervisorError, match=r"could not start the verification VM: .*Permission denied"):
        boot_check(machine, Heartbeats(agent=False, marker="never"), timeout=120, work_dir=str(tmp_path), run_as=ids)
    assert list(tmp_path.iterdir()) == []
    # as root (no ids given) the same file is opened
    outcome = boot_check(machine, Heartbeats(agent=False, marker="never"), timeout=120, work_dir=str(tmp_path))
    assert outcome.reason == "no-bootable-disk" and outcome.uid is None


def test_a_work_folder_that_cannot_be_given_away_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS with root_squash keeps root from giving files to another user: one line, no traceback."""
    (tmp_path / "overlay0.qcow2").write_bytes(b"")

    def refused(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(qemu_boot.os, "chown", refused)
    with pytest.raises(ConfigError, match=r"cannot give QEMU's files to the user .*local file system"):
        qemu_boot._give(str(tmp_path), (2_100_000_001, 2_100_000_001))

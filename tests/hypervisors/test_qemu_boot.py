"""QEMU under ids of its own (``qemu_boot.boot_check``'s ``run_as``): the ids are unused ones,
QEMU holds them with no group or capability, and a file only root may read stays closed to it
while the same file, once readable by others, is booted."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmvault.errors import HypervisorError
from vmvault.hypervisors import qemu_boot
from vmvault.hypervisors.qemu_boot import (
    TRANSIENT_IDS,
    BootDisk,
    BootMachine,
    Heartbeats,
    boot_check,
    transient_ids,
)


def test_transient_ids_are_named_nowhere_and_held_by_no_process() -> None:
    uid, gid = transient_ids()
    assert uid == gid and uid in TRANSIENT_IDS
    held = {os.stat(f"/proc/{p}").st_uid for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}")}
    assert uid not in held


def test_ids_named_in_the_user_database_or_held_by_a_process_are_never_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_boot, "TRANSIENT_IDS", range(0, 1))  # root: in /etc/passwd, and running
    with pytest.raises(HypervisorError, match="no unused user id between 0 and 0"):
        transient_ids()
    me = os.getpid()
    monkeypatch.setattr(
        qemu_boot, "TRANSIENT_IDS", range(os.stat(f"/proc/{me}").st_uid, os.stat(f"/proc/{me}").st_uid + 1)
    )
    with pytest.raises(HypervisorError, match="no unused user id"):
        transient_ids()


def test_subordinate_id_ranges_are_left_to_user_namespaces(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A container runtime's mappings (/etc/subuid, /etc/subgid) cover most of the range: only
    the ids outside both are given."""
    start = 2_100_000_000
    monkeypatch.setattr(qemu_boot, "TRANSIENT_IDS", range(start, start + 64))
    (tmp_path / "subuid").write_text(f"lxd:{start}:40\nbroken line\n")
    (tmp_path / "subgid").write_text(f"lxd:{start + 48}:16\n")
    monkeypatch.setattr(qemu_boot, "_SUBORDINATE_IDS", (str(tmp_path / "subuid"), str(tmp_path / "subgid")))
    given = {transient_ids()[0] for _ in range(200)}
    assert given <= set(range(start + 40, start + 48)) and len(given) > 1


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
    ids = transient_ids()
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

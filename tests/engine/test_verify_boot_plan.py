"""The verification VM's hardware from what a snapshot records (which the storage gives, so it
is bounded and checked), the heartbeats chosen, and the screen and PPM checks (no QEMU)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from vmvault import platform
from vmvault.backends.memory import MemoryBackend
from vmvault.engine.verify_boot import MAX_MEMORY, MIN_MEMORY, VerifyBootOptions, _heartbeats, plan_machine, verify_boot
from vmvault.errors import ConfigError, HypervisorError, VmvaultError
from vmvault.hypervisors.qemu_boot import MAX_PIXELS, Screen, parse_ppm
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import DiskRecord, Snapshot


def _disk(name: str, *, layer: bool = False, parent: str | None = None) -> DiskRecord:
    return DiskRecord(name, "raw", 1 << 20, 1 << 16, 4096, [None], layer=layer, parent=parent)


def _snap(vm: dict[str, Any], disks: list[DiskRecord] | None = None) -> Snapshot:
    records = [_disk("a.raw")] if disks is None else disks
    snap = Snapshot("2026-11-25T10:00:00Z", "h", "u", {"location": "/x"}, vm=vm, disks=records)
    snap.id = "ab" * 32
    return snap


def test_a_libvirt_record_gives_firmware_memory_bus_and_agent() -> None:
    vm = {
        "hypervisor": "libvirt",
        "firmware": "uefi",
        "memory": 2 << 30,
        "cpus": 64,
        "disks": [{"target": "vda", "bus": "virtio"}],
        "guest_agent": False,
    }
    plan = plan_machine(_snap(vm), VerifyBootOptions())
    assert (plan.firmware, plan.memory, plan.bus, plan.machine) == ("uefi", 2 << 30, "virtio", "q35")
    assert 1 <= plan.cpus <= 8
    assert plan.sources["firmware"] == "libvirt record" and plan.sources["disk_bus"] == "libvirt record"
    assert plan.agent_channel is False
    # a VM recorded without an agent and given no marker is watched by its screen too
    hb = _heartbeats(plan, VerifyBootOptions())
    assert (hb.agent, hb.marker, hb.screen) == (True, None, True)


def test_hyperv_generations_and_qemu_models() -> None:
    gen1 = plan_machine(_snap({"hypervisor": "hyperv", "generation": 1}), VerifyBootOptions())
    gen2 = plan_machine(_snap({"hypervisor": "hyperv", "generation": 2}), VerifyBootOptions())
    assert (gen1.firmware, gen1.bus) == ("bios", "sata")
    assert (gen2.firmware, gen2.bus) == ("uefi", "sata")
    qemu = {
        "hypervisor": "qemu",
        "disks": [{"device": "hd0", "model": "ide-hd"}],
        "cmdline": ["qemu-system-x86_64", "-chardev", "socket,id=qga0,path=/run/qga.sock"],
    }
    plan = plan_machine(_snap(qemu), VerifyBootOptions())
    assert (plan.bus, plan.machine, plan.firmware) == ("ide", "pc", "bios")
    assert plan.agent_channel is False
    with_ovmf = {"hypervisor": "qemu", "cmdline": ["qemu", "-drive", "if=pflash,file=/usr/share/OVMF/OVMF_CODE.fd"]}
    assert plan_machine(_snap(with_ovmf), VerifyBootOptions()).firmware == "uefi"


def test_untrusted_records_are_bounded_and_options_win() -> None:
    hostile = {"memory": 1 << 60, "cpus": "lots", "firmware": "coreboot", "disks": "nope", "cmdline": {"x": 1}}
    plan = plan_machine(_snap(hostile), VerifyBootOptions())
    assert plan.memory == MAX_MEMORY and "bounded" in plan.sources["memory"]
    assert (plan.firmware, plan.bus, plan.cpus) == ("bios", "sata", 1)
    tiny = plan_machine(_snap({"memory": 4096}), VerifyBootOptions())
    assert tiny.memory == MIN_MEMORY
    forced = plan_machine(
        _snap({"firmware": "uefi", "memory": 1 << 30}),
        VerifyBootOptions(firmware="bios", memory=512 << 20, disk_bus="ide"),
    )
    assert (forced.firmware, forced.memory, forced.bus, forced.machine) == ("bios", 512 << 20, "ide", "pc")
    assert forced.sources["firmware"] == forced.sources["memory"] == forced.sources["disk_bus"] == "option"


def test_the_disks_booted_are_the_leaves_and_the_boot_disk_comes_first() -> None:
    disks = [_disk("base.vhdx"), _disk("data.raw"), _disk("cp.avhdx", layer=True, parent="base.vhdx")]
    plan = plan_machine(_snap({}, disks), VerifyBootOptions())
    assert [d.name for d in plan.disks] == ["data.raw", "cp.avhdx"]
    plan = plan_machine(_snap({}, disks), VerifyBootOptions(boot_disk="cp.avhdx"))
    assert [d.name for d in plan.disks] == ["cp.avhdx", "data.raw"]
    with pytest.raises(ConfigError, match=r"no disk 'base\.vhdx' to boot"):
        plan_machine(_snap({}, disks), VerifyBootOptions(boot_disk="base.vhdx"))
    with pytest.raises(ConfigError, match="holds no disk to boot"):
        plan_machine(_snap({}, []), VerifyBootOptions())


def test_heartbeats_chosen() -> None:
    plan = plan_machine(_snap({}), VerifyBootOptions())
    hb = _heartbeats(plan, VerifyBootOptions(marker="UP"))
    assert (hb.agent, hb.marker, hb.screen) == (True, "UP", False)
    hb = _heartbeats(plan, VerifyBootOptions(heartbeats=("screen",)))
    assert (hb.agent, hb.marker, hb.screen) == (False, None, True)
    with pytest.raises(ConfigError, match="needs the text"):
        _heartbeats(plan, VerifyBootOptions(heartbeats=("marker",)))
    with pytest.raises(ConfigError, match="not ping"):
        _heartbeats(plan, VerifyBootOptions(heartbeats=("ping",)))


def test_blank_and_stable_screens() -> None:
    black = Screen(4, 4, bytes(48))
    assert black.blank
    text = Screen(4, 4, bytes(12) + b"\xff" * 12 + bytes(24))
    assert not text.blank
    cursor = Screen(4, 4, bytes(12) + b"\xff" * 12 + bytes(12) + b"\xff" * 3 + bytes(9))
    assert text.changed_rows(cursor) == 0.25
    assert text.changed_rows(Screen(2, 2, bytes(12))) == 1.0


@pytest.mark.parametrize(
    "data",
    [
        b"P3\n1 1\n255\n0 0 0",  # text PPM
        b"P6\n1 1\n65535\n" + bytes(6),  # 16-bit
        b"P6\n0 1\n255\n",  # empty
        b"P6\n100000 100000\n255\n",  # beyond the limit
        b"P6\n2 2\n255\n" + bytes(5),  # truncated
        b"P6\n99999999999 1\n255\n",  # a number too long
        b"",
    ],
)
def test_bad_screen_dumps_are_refused(data: bytes) -> None:
    with pytest.raises(HypervisorError):
        parse_ppm(data)
    assert MAX_PIXELS < 100000 * 100000


def test_quoted_guest_text_keeps_printable_characters_only() -> None:
    from vmvault.hypervisors.qemu_boot import _PANIC, _found

    serial = "boot\n[ 1.0] Kernel panic - not syncing: VFS\x1b[31m: bad\x07 root\r\nmore"
    assert _found(serial, _PANIC) == "Kernel panic - not syncing: VFS[31m: bad root"
    assert _found("nothing here", _PANIC) is None


def test_a_work_folder_others_can_change_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can rename the private folder vmvault makes in it can put links where the
    overlays, sockets and screen dumps go (QEMU and qemu-img follow them, as root)."""
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    repo = Repository.init(MemoryBackend(), b"passphrase")
    snap = _snap({}, [_disk("d.raw")])
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=r"writable by other users \(mode 0777\)"):
        verify_boot(repo, snap, VerifyBootOptions(work_dir=str(shared)))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(ConfigError, match="belongs to user id 4242"):
        verify_boot(repo, snap, VerifyBootOptions(work_dir=str(theirs)))
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", None)  # the default is asked again
    with pytest.raises(ConfigError, match="--work-dir"):
        verify_boot(repo, snap, VerifyBootOptions())
    assert list(shared.iterdir()) == [] and list(theirs.iterdir()) == []
    # a sticky shared folder (/tmp) is fine: nobody can rename the private folder made in it
    shared.chmod(0o1777)
    assert platform.others_can_change(str(shared), {0}, container=True) is None
    assert "mode 1777" in str(platform.others_can_change(str(shared), {0}))  # but not to hold files it reads


def test_work_folders_of_verifications_that_are_gone_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verification killed with SIGKILL leaves its work folder (the guest's throw-away writes,
    up to --max-writes); the next one removes it, and only it."""
    import subprocess

    from vmvault.engine.export import process_start_time

    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    dead = subprocess.Popen(["true"])
    dead.wait()

    def folder(name: str, owner: str | None, uid: int = 0) -> Path:
        f = tmp_path / name
        (f / "vmvault-boot-x").mkdir(parents=True)
        (f / "vmvault-boot-x" / "overlay0.qcow2").write_bytes(b"guest writes")
        if owner is not None:
            (f / "owner").write_text(owner)
        os.chown(f, uid, uid)
        return f

    gone = folder("vmvault-verify-gone", f"{dead.pid} 1\n")
    alive = folder("vmvault-verify-alive", f"{os.getpid()} {process_start_time(os.getpid())}\n")
    reused = folder("vmvault-verify-reused", f"{os.getpid()} 1\n")  # this PID, another start time: gone
    making = folder("vmvault-verify-making", None)
    theirs = folder("vmvault-verify-theirs", f"{dead.pid} 1\n", uid=4242)
    (tmp_path / "vmvault-verify-link").symlink_to(gone.parent)
    other = folder("unrelated", f"{dead.pid} 1\n")
    repo = Repository.init(MemoryBackend(), b"passphrase")
    with pytest.raises(VmvaultError, match="could not start"):  # after the cleanup, before any guest runs
        verify_boot(
            repo, _snap({}, [_disk("d.raw")]), VerifyBootOptions(work_dir=str(tmp_path)), qemu=str(tmp_path / "no-qemu")
        )
    assert not gone.exists() and not reused.exists()
    assert alive.exists() and making.exists() and theirs.exists() and other.exists()
    assert (tmp_path / "vmvault-verify-link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["vmvault-verify-alive", "vmvault-verify-making", "vmvault-verify-theirs", "vmvault-verify-link", "unrelated"]
    )

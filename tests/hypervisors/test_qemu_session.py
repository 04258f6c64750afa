"""Live backup sessions against a real QEMU (TCG), with guest writes during the backup."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hypervisors.qemu_vm import (
    SYSTEM_PYTHON,
    DiskSpec,
    MiB,
    QemuVM,
    assert_nothing_left,
    covers,
    make_vm,
    other_user,
    previous_of,
    read_disk,
)
from vmvault.hypervisors import open_source
from vmvault.hypervisors._nbd import import_libnbd
from vmvault.hypervisors.qemu import QemuSource

__all__ = ["make_vm"]

pytestmark = pytest.mark.integration

KiB = 1024


def source_for(vm: QemuVM, scratch: Path, **kw: object) -> QemuSource:
    scratch.mkdir(exist_ok=True)
    return QemuSource(f"{vm.location}?scratch={scratch}", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fmt", "size"), [("qcow2", 128 * MiB), ("raw", 64 * MiB)])
def test_full_session_is_point_in_time(make_vm: Callable[..., QemuVM], tmp_path: Path, fmt: str, size: int) -> None:
    vm = make_vm([DiskSpec("vda", fmt, size)])
    baseline = vm.node_names()
    vm.write("vda", 0, 3 * MiB, 0xA1)
    vm.write("vda", 20 * MiB + 512, 700 * KiB, 0xA2)
    vm.write("vda", size - MiB, MiB, 0xA3)
    vm.write("vda", 40 * MiB, 5 * MiB, 0xA4)
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    assert source.kind == "qemu" and source.location == vm.location

    with source.open_session(None) as session:
        at_start = vm.snapshot_model()
        (disk,) = session.disks
        assert disk.name == "vda" and disk.format == fmt and disk.image.format == "nbd"
        assert disk.image.size == size
        assert disk.changed is None
        assert session.consistency == "crash-consistent"
        assert any("no previous snapshot" in w for w in session.warnings)
        assert disk.cbt is not None and disk.cbt["persistent"] is (fmt == "qcow2")
        assert disk.cbt["bitmap"].startswith("vmvault-") and disk.cbt["granularity"] == 64 * KiB
        # holes are reported, so only the written areas are read
        data_bytes = sum(e.length for e in disk.image.extents() if e.kind.value == "data")
        assert 9 * MiB <= data_bytes <= 11 * MiB

        written: list[int] = []

        def guest_writes(pos: int) -> None:
            # behind the reader (already read), ahead of it (data not yet read), and into a hole
            if len(written) < 6:
                vm.write("vda", max(0, pos - MiB), 64 * KiB, 0xB0 + len(written))
                vm.write("vda", 40 * MiB + len(written) * MiB, 4 * KiB, 0xC0)
                vm.write("vda", 60 * MiB + len(written) * 128 * KiB, 8 * KiB, 0xD0)
                written.append(pos)

        got = read_disk(disk, guest_writes, step=MiB)
        assert written, "no guest write happened during the read"
        assert vm.snapshot_model()["vda"] != at_start["vda"], "the guest writes changed nothing"
        assert got == at_start["vda"]
        # one read larger than the 32 MiB NBD limit, split inside the reader
        assert disk.image.read(0, 48 * MiB) == at_start["vda"][: 48 * MiB]
        assert disk.image.read(size - 100, 4096) == at_start["vda"][size - 100 :]
        # the VM facts
        assert session.vm["name"] == "testvm" and session.vm["uuid"] == vm.uuid
        assert session.vm["hypervisor"] == "qemu" and session.vm["qemu_version"].startswith("7.")
        assert session.vm["machine"].startswith("pc-q35")
        assert session.vm["disks"] == [
            {
                "device": "vda",
                "qdev": "/machine/peripheral/vda/virtio-backend",
                "node": "disk0",
                "format": fmt,
                "file": vm.paths["vda"],
                "size": size,
                "model": "virtio-blk-pci",
            }
        ]
        assert session.vm["memory"] == 64 * MiB and session.vm["cpus"] == 1 and session.vm["nics"] == []
        assert "-uuid" in session.vm["cmdline"]
        assert vm.node_names() != baseline  # the fleecing node exists while the session is open
    assert_nothing_left(vm, baseline, scratch)
    # the new bitmap stays only when the backup completed; this one did not call complete()
    assert vm.vmvault_bitmaps("disk0") == []
    vm.verify_model()


@pytest.mark.parametrize("backend", ["python", "libnbd"])
def test_reads_from_two_threads(make_vm: Callable[..., QemuVM], tmp_path: Path, backend: str) -> None:
    if backend == "libnbd" and import_libnbd() is None:
        pytest.skip("libnbd's Python bindings do not load for this Python (Debian: python3-libnbd)")
    vm = make_vm([DiskSpec("vda", "qcow2", 64 * MiB)])
    for i in range(8):
        vm.write("vda", i * 8 * MiB, 6 * MiB, 0x10 + i)
    at_start = vm.snapshot_model()["vda"]
    with source_for(vm, tmp_path / "scratch", nbd_backend=backend).open_session(None) as session:
        assert session.disks[0].image.info()["backend"] == backend
        image = session.disks[0].image
        results: dict[int, bytes] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def reader(half: int) -> None:
            try:
                barrier.wait()
                lo = half * 32 * MiB
                results[half] = b"".join(image.read(lo + k * MiB, MiB) for k in range(32))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(h,)) for h in (0, 1)]
        for t in threads:
            t.start()
        vm.write("vda", 0, 16 * MiB, 0xEE)  # writes while both threads read
        for t in threads:
            t.join()
        assert not errors
        assert results[0] + results[1] == at_start
        assert image.connections >= 2  # type: ignore[attr-defined]


def test_incremental_and_complete(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 32 * MiB)])
    baseline = vm.node_names()
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    vm.write("vda", 0, 8 * MiB, 0x11)
    vm.write("vdb", 0, 8 * MiB, 0x22)
    with source.open_session(None) as s1:
        vm.write("vda", 30 * MiB, 4 * KiB, 0x33)  # after the freeze: belongs to the next backup
        read_disk(s1.disks[0])
        s1.complete("snap-1")
        prev = previous_of(s1, "snap-1")
    assert_nothing_left(vm, baseline, scratch)
    assert vm.vmvault_bitmaps("disk0") == [prev.disks["vda"]["bitmap"]]
    assert vm.vmvault_bitmaps("disk1") == [prev.disks["vdb"]["bitmap"]]

    writes = {
        "vda": [(30 * MiB, 4 * KiB), (5 * MiB + 100, 300), (63 * MiB, MiB), (17 * MiB, 200 * KiB)],
        "vdb": [(31 * MiB, 512), (MiB, 64 * KiB)],
    }
    for dev, ranges in writes.items():
        for off, n in ranges:
            if (dev, off) != ("vda", 30 * MiB):
                vm.write(dev, off, n, 0x44)
    with source.open_session(prev) as s2:
        at_start = vm.snapshot_model()
        vm.write("vda", 5 * MiB, MiB, 0x55)  # after the freeze: must not show
        assert not [w for w in s2.warnings if "whole disk" in w]
        for disk in s2.disks:
            assert disk.changed is not None
            gran = disk.cbt["granularity"] if disk.cbt else 0
            for off, n in writes[disk.name]:
                assert covers(disk.changed, off, n), (disk.name, off, n, disk.changed)
            # not much more than the writes rounded out to the granularity
            rounded = {(k * gran) for off, n in writes[disk.name] for k in range(off // gran, -(-(off + n) // gran))}
            assert sum(n for _, n in disk.changed) == len(rounded) * gran
            for off, n in disk.changed:
                assert disk.image.read(off, n) == at_start[disk.name][off : off + n]
        s2.complete("snap-2")
        prev2 = previous_of(s2, "snap-2")
    assert_nothing_left(vm, baseline, scratch)
    # the previous bitmap is gone, the new one tracks
    assert vm.vmvault_bitmaps("disk0") == [prev2.disks["vda"]["bitmap"]]
    assert vm.vmvault_bitmaps("disk1") == [prev2.disks["vdb"]["bitmap"]]
    with source.open_session(prev2) as s3:
        assert s3.disks[0].changed == [(5 * MiB, MiB)]
        assert s3.disks[1].changed == []
    vm.verify_model()


def test_qemu_restart_qcow2_keeps_tracking_raw_loses_it(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 32 * MiB)])
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    with source.open_session(None) as s1:
        s1.complete("snap-1")
        prev = previous_of(s1, "snap-1")
    vm.write("vda", 2 * MiB, 4 * KiB, 0x61)
    vm.write("vdb", 2 * MiB, 4 * KiB, 0x61)
    vm.restart()
    assert vm.image_bitmaps("vda") == [prev.disks["vda"]["bitmap"]]  # persisted by QEMU on quit
    vm.write("vda", 9 * MiB, 4 * KiB, 0x62)
    vm.write("vdb", 9 * MiB, 4 * KiB, 0x62)
    with source.open_session(prev) as s2:
        at_start = vm.snapshot_model()
        vda, vdb = s2.disks
        assert vda.changed == [(2 * MiB, 64 * KiB), (9 * MiB, 64 * KiB)]
        assert vdb.changed is None
        (warning,) = [w for w in s2.warnings if w.startswith("vdb:")]
        assert "missing" in warning and "lost when QEMU restarts" in warning
        assert read_disk(vdb) == at_start["vdb"]
        s2.complete("snap-2")
    assert_nothing_left(vm, vm.node_names(), scratch)
    vm.verify_model()


def test_disks_freeze_at_the_same_instant(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 16 * MiB)])
    vm.write("vda", 0, 4 * KiB, 0x01)
    vm.write("vdb", 0, 4 * KiB, 0x01)
    source = source_for(vm, tmp_path / "scratch")
    stop = threading.Event()
    counter = [1]

    def writer() -> None:
        # a "transaction" in the guest: marker i goes to vda, then to vdb
        while not stop.is_set() and counter[0] < 250:
            i = counter[0] + 1
            vm.write("vda", 0, 4 * KiB, i)
            vm.write("vdb", 0, 4 * KiB, i)
            counter[0] = i

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while counter[0] < 5:
            threading.Event().wait(0.005)
        with source.open_session(None) as session:
            before = counter[0]
            threading.Event().wait(0.05)
            vda, vdb = (d.image.read(0, 4 * KiB) for d in session.disks)
    finally:
        stop.set()
        thread.join()
    assert len(set(vda)) == 1 and len(set(vdb)) == 1
    a, b = vda[0], vdb[0]
    # one instant: either both have marker i, or vda has i and vdb still i-1
    assert a - b in (0, 1), (a, b)
    assert counter[0] > before, "the writes did not continue during the session"
    assert a <= before + 1
    vm.verify_model()


def test_guards_against_wrong_incrementals(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "qcow2", 16 * MiB)])
    source = source_for(vm, tmp_path / "scratch")
    with source.open_session(None) as s1:
        s1.complete("snap-1")
        prev = previous_of(s1, "snap-1")
    # another tool renames vdb's bitmap away; vda is resized; a stale vmvault bitmap appears
    vm.q("block-dirty-bitmap-remove", node="disk1", name=prev.disks["vdb"]["bitmap"])
    vm.q("block_resize", **{"node-name": "disk0", "size": 32 * MiB})
    vm.q("block-dirty-bitmap-add", node="disk1", name="vmvault-stale", persistent=True)
    vm.q("block-dirty-bitmap-add", node="disk1", name="other-tool")
    with source.open_session(prev) as s2:
        vda, vdb = s2.disks
        assert vda.changed is None and vdb.changed is None
        assert any("vda:" in w and "resized" in w for w in s2.warnings)
        assert any("vdb:" in w and "missing" in w and "outside vmvault" in w for w in s2.warnings)
        assert any("vmvault-stale" in w for w in s2.warnings)
        assert vda.image.size == 32 * MiB
        s2.complete("snap-2")
        prev2 = previous_of(s2, "snap-2")
    assert sorted(vm.bitmaps("disk1")) == sorted(["other-tool", prev2.disks["vdb"]["bitmap"]])
    # a snapshot of another VM (same socket path, new VM) is never used as a base
    foreign = previous_of(s2, "snap-x")
    for rec in foreign.disks.values():
        rec["vm_uuid"] = "00000000-0000-0000-0000-000000000001"
    with source.open_session(foreign) as s3:
        assert all(d.changed is None for d in s3.disks)
        assert any("is of VM" in w for w in s3.warnings)


def test_open_source_dispatch_and_location_errors(tmp_path: Path) -> None:
    from vmvault.errors import ConfigError, HypervisorError

    src = open_source(f"qemu+unix://{tmp_path}/absent.sock?qga={tmp_path}/qga.sock")
    assert isinstance(src, QemuSource) and src.qga == f"{tmp_path}/qga.sock"
    assert src.location == f"qemu+unix://{tmp_path}/absent.sock"
    with pytest.raises(HypervisorError, match="cannot connect to QMP"):
        src.open_session(None)
    with pytest.raises(ConfigError):
        QemuSource("qemu+unix://host/x.sock")
    with pytest.raises(ConfigError, match="unknown option"):
        QemuSource("qemu+unix:///x.sock?bogus=1")


def test_inconsistent_bitmap_after_qemu_was_killed(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB)])
    source = source_for(vm, tmp_path / "scratch")
    with source.open_session(None) as s1:
        s1.complete("snap-1")
        prev = previous_of(s1, "snap-1")
    vm.restart()  # QEMU stores the bitmap in the image on quit and marks it in use on open
    vm.write("vda", 0, 4 * KiB, 0x71)
    vm.kill()  # QEMU dies with the bitmap marked in use: writes may be missing from it
    vm.start()
    assert vm.bitmaps("disk0")[prev.disks["vda"]["bitmap"]]["inconsistent"] is True
    with source.open_session(prev) as s2:
        assert s2.disks[0].changed is None
        assert any("inconsistent" in w for w in s2.warnings), s2.warnings
        s2.complete("snap-2")
        new = s2.disks[0].cbt["bitmap"] if s2.disks[0].cbt else None
    assert vm.vmvault_bitmaps("disk0") == [new]  # the inconsistent one is removed on complete


def test_legacy_drive_and_empty_cdrom(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    image = tmp_path / "legacy.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(8 * MiB)], check=True)
    drives = [
        *("-drive", f"file={image},if=none,id=drive0,format=qcow2", "-device", "virtio-blk-pci,drive=drive0,id=vda"),
        *("-drive", "if=none,id=cd,media=cdrom", "-device", "ide-cd,drive=cd,id=cd0"),
    ]
    vm = make_vm([], extra_args=drives)
    hmp = 'qemu-io -d /machine/peripheral/vda/virtio-backend "write -P 0x42 {} 65536"'
    vm.q("human-monitor-command", **{"command-line": hmp.format(0)})
    source = source_for(vm, tmp_path / "scratch")
    with source.open_session(None) as s1:
        (disk,) = s1.disks  # the empty CD-ROM is skipped
        assert disk.name == "vda" and disk.format == "qcow2"
        assert disk.cbt is not None and disk.cbt["node"].startswith("#block")  # QEMU-generated node name
        assert disk.image.read(0, 65536) == b"\x42" * 65536
        s1.complete("snap-1")
        prev = previous_of(s1, "snap-1")
    vm.q("human-monitor-command", **{"command-line": hmp.format(MiB)})
    with source.open_session(prev) as s2:
        assert s2.disks[0].changed == [(MiB, 65536)]


def test_qemu_running_as_another_user(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    """Like libvirt's qemu user: the scratch folder and files are handed to QEMU's uid."""
    other_user()
    vm = make_vm([DiskSpec("vda", "qcow2", 16 * MiB)], extra_args=["-runas", "nobody"])
    vm.write("vda", 0, MiB, 0x31)
    # a scratch folder QEMU can reach (pytest's tmp_path is private to root)
    scratch = Path(tempfile.mkdtemp(prefix="vmvault-test-scratch-"))
    try:
        scratch.chmod(0o755)
        with QemuSource(f"{vm.location}?scratch={scratch}").open_session(None) as s:
            assert s.vm["pid"] == (vm.proc.pid if vm.proc else None)
            at_start = vm.snapshot_model()
            vm.write("vda", 0, 4096, 0x32)
            assert read_disk(s.disks[0]) == at_start["vda"]
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


#: run as QEMU's user: plant a link to VICTIM under each scratch file's name in every vmvault
#: scratch folder that appears in SCRATCH, as a QEMU taken over by its guest could
_PLANTER = """
import os, sys, time
scratch, victim = sys.argv[1], sys.argv[2]
planted = set()
until = time.monotonic() + 60
while time.monotonic() < until and not os.path.exists(os.path.join(scratch, "stop")):
    for entry in os.listdir(scratch):
        if entry.startswith("vmvault-qemu-"):
            for name in ("scratch-vda.qcow2", "scratch-vdb.qcow2", "nbd.sock"):
                try:
                    os.symlink(victim, os.path.join(scratch, entry, name))
                    planted.add(name)
                except OSError:
                    pass
print(" ".join(sorted(planted)) or "nothing", flush=True)
"""


def test_a_qemu_taken_over_cannot_get_a_host_file_changed(make_vm: Callable[..., QemuVM]) -> None:
    """QEMU runs as another user (libvirt's qemu user; nobody here) and what runs in it is the
    guest's: it must not be able to put a link where vmvault, as root, makes or hands over a
    file. The scratch folder was QEMU's, and vmvault then created ``scratch-vdb.qcow2`` in it
    and chowned it, following a link QEMU had put there: the host file it named was truncated
    and given to QEMU's user (its root, in effect). Now the folder stays root's (0711): QEMU
    reaches the files handed to it and makes its NBD socket in a folder of its own."""
    nobody = other_user()
    vm = make_vm(
        [DiskSpec("vda", "qcow2", 16 * MiB), DiskSpec("vdb", "raw", 16 * MiB)], extra_args=["-runas", "nobody"]
    )
    scratch = Path(tempfile.mkdtemp(prefix="vmvault-test-scratch-"))
    victims = Path(tempfile.mkdtemp(prefix="vmvault-test-victim-"))
    victim = victims / "root-only"
    try:
        scratch.chmod(0o755)
        victims.chmod(0o755)
        victim.write_bytes(b"root's own file\n")
        victim.chmod(0o600)
        planter = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", _PLANTER, str(scratch), str(victim)],
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            with QemuSource(f"{vm.location}?scratch={scratch}").open_session(None) as s:
                assert s.tempdir is not None
                folder = os.stat(s.tempdir)
                assert (folder.st_uid, folder.st_mode & 0o777) == (0, 0o711)
                handed = {name: os.lstat(os.path.join(s.tempdir, name)).st_uid for name in os.listdir(s.tempdir)}
                assert handed == {"scratch-vda.qcow2": nobody.pw_uid, "scratch-vdb.qcow2": nobody.pw_uid,
                                  "nbd": nobody.pw_uid}  # fmt: skip
                assert len(s.disks) == 2 and all(len(read_disk(d)) == 16 * MiB for d in s.disks)
        finally:
            (scratch / "stop").touch()
            out, _ = planter.communicate(timeout=30)
        assert out.strip() == "nothing"
        assert victim.read_bytes() == b"root's own file\n" and victim.stat().st_uid == 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(victims, ignore_errors=True)


def test_disk_on_a_backing_chain(make_vm: Callable[..., QemuVM], tmp_path: Path) -> None:
    """A linked clone (qcow2 overlay on a base image): the backup is the merged disk."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(16 * MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 2M", str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True)
    args = ["-blockdev", f"driver=qcow2,node-name=top0,file.driver=file,file.filename={top}"]
    vm = make_vm([], extra_args=[*args, "-device", "virtio-blk-pci,drive=top0,id=vda"])
    baseline = vm.node_names()
    hmp = 'qemu-io -d /machine/peripheral/vda/virtio-backend "write -P 0x{:x} {} 65536"'
    vm.q("human-monitor-command", **{"command-line": hmp.format(0xCD, MiB)})
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    expected = bytearray(16 * MiB)
    expected[: 2 * MiB] = b"\xab" * (2 * MiB)
    expected[MiB : MiB + 65536] = b"\xcd" * 65536
    with source.open_session(None) as s1:
        (disk,) = s1.disks
        assert disk.cbt is not None and disk.cbt["node"] == "top0" and disk.cbt["persistent"] is True
        vm.q("human-monitor-command", **{"command-line": hmp.format(0xEF, 0)})  # after the freeze
        assert read_disk(disk) == bytes(expected)
        data = sum(e.length for e in disk.image.extents() if e.kind.value == "data")
        assert data == 2 * MiB  # the base's data is seen through the chain; the rest is a hole
        s1.complete("snap-1")
        prev = previous_of(s1, "snap-1")
    assert vm.node_names() == baseline and list(scratch.iterdir()) == []
    with source.open_session(prev) as s2:
        assert s2.disks[0].changed == [(0, 65536)]
        assert s2.disks[0].image.read(0, 65536) == b"\xef" * 65536


def test_firmware_variables_are_a_disk_and_firmware_code_is_media(
    make_vm: Callable[..., QemuVM], tmp_path: Path
) -> None:
    code, nvram = tmp_path / "code.fd", tmp_path / "vars.fd"
    code.write_bytes(b"\x90" * (2 * MiB))
    nvram.write_bytes(b"VARS" * (128 * KiB // 4))
    flash = [
        *("-drive", f"if=pflash,format=raw,unit=0,file={code},readonly=on"),
        *("-drive", f"if=pflash,format=raw,unit=1,file={nvram}"),
    ]
    vm = make_vm([DiskSpec("vda", "raw", MiB)], extra_args=flash)
    with source_for(vm, tmp_path / "scratch").open_session(None) as s:
        disks = {d.name: d for d in s.disks}
        assert sorted(disks) == ["pflash1", "vda"]
        assert disks["pflash1"].image.read(0, 128 * KiB) == nvram.read_bytes()
        assert s.vm["media"] == [{"device": "pflash0", "file": str(code), "format": "raw", "size": 2 * MiB}]
        assert any("pflash0: read-only medium" in w for w in s.warnings)

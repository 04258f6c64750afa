"""Live and offline backup sessions against a real libvirtd (tests/libvirtd.py), TCG domains."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.hypervisors.qemu_vm import SYSTEM_PYTHON, covers, other_user, read_disk
from tests.libvirtd import Disk, Libvirtd, LibvirtVM, libvirtd, make_domain
from vmvault.errors import HypervisorError, ParentError, SourceError
from vmvault.hypervisors.base import BackupOptions, PreviousBackup
from vmvault.hypervisors.libvirt import LibvirtSession, LibvirtSource

__all__ = ["libvirtd", "make_domain"]

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
KiB = 1024


def source_for(vm: LibvirtVM, scratch: Path) -> LibvirtSource:
    scratch.mkdir(exist_ok=True)
    return LibvirtSource(f"{vm.location}&scratch={quote(str(scratch), safe='')}")


def previous_of(session: LibvirtSession, snapshot_id: str) -> PreviousBackup:
    return PreviousBackup(snapshot_id, {d.name: dict(d.cbt) for d in session.disks if d.cbt})


def assert_nothing_left(vm: LibvirtVM, scratch: Path, keep: str | None) -> None:
    assert not vm.has_job()
    assert [c for c in vm.checkpoints() if c.startswith("vmvault-")] == ([keep] if keep else [])
    assert list(scratch.iterdir()) == [], list(scratch.iterdir())


def test_two_disks_frozen_at_one_instant_and_incremental(make_domain: Callable[..., LibvirtVM], tmp_path: Path) -> None:
    vm = make_domain([Disk("vda", "qcow2", 64 * MiB), Disk("vdb", "qcow2", 32 * MiB)])
    vm.write("vda", 0, 3 * MiB, 0xA1)
    vm.write("vda", 40 * MiB, 2 * MiB, 0xA2)
    vm.write("vdb", MiB, MiB, 0xB1)
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    assert source.kind == "libvirt" and source.location.startswith(f"libvirt:///{vm.name}?uri=")
    with source.open_session(None) as session:
        at_start = vm.snapshot_model()
        assert [d.name for d in session.disks] == ["vda", "vdb"]
        assert all(d.changed is None and d.image.format == "nbd" for d in session.disks)
        assert session.consistency == "crash-consistent"
        assert vm.has_job() and vm.checkpoints() == [session.checkpoint]
        writes = 0

        def guest(pos: int) -> None:
            nonlocal writes
            if writes < 6:
                vm.write("vda", max(0, pos - MiB), 64 * KiB, 0xC0 + writes)
                vm.write("vdb", (writes * 3) * MiB, 128 * KiB, 0xD0 + writes)
                writes += 1

        got = {d.name: read_disk(d, guest, step=MiB) for d in session.disks}
        assert writes, "no guest write happened during the read"
        assert got == at_start, "the disks read are not the disks at the instant the backup began"
        session.complete("a" * 64)
        first = previous_of(session, "a" * 64)
    assert_nothing_left(vm, scratch, session.checkpoint)
    assert "vmvault snapshot " + "a" * 64 in vm.dom.checkpointLookupByName(session.checkpoint).getXMLDesc(0)

    vm.write("vda", 10 * MiB, 4 * KiB, 0xE1)
    vm.write("vdb", 20 * MiB, 70 * KiB, 0xE2)
    with source.open_session(first) as session2:
        at_start = vm.snapshot_model()
        changed = {d.name: d.changed for d in session2.disks}
        assert changed["vda"] is not None and changed["vdb"] is not None
        assert covers(changed["vda"], 10 * MiB, 4 * KiB) and covers(changed["vdb"], 20 * MiB, 70 * KiB)
        # every write made during the first session is in it too (they came after its instant)
        assert covers(changed["vdb"], 0, 128 * KiB)
        assert sum(n for _, n in changed["vda"]) < 2 * MiB
        for d in session2.disks:
            for off, n in d.changed or []:
                assert d.image.read(off, n) == at_start[d.name][off : off + n]
        session2.complete("b" * 64)
    assert_nothing_left(vm, scratch, session2.checkpoint)


def _first_and_previous(vm: LibvirtVM, source: LibvirtSource) -> tuple[str, PreviousBackup]:
    with source.open_session(None) as session:
        session.complete("c" * 64)
        return session.checkpoint, previous_of(session, "c" * 64)


def test_incremental_after_a_restart_a_deleted_checkpoint_and_an_added_disk(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 32 * MiB)])
    vm.write("vda", 0, MiB, 0x10)
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    cp, prev = _first_and_previous(vm, source)
    # a restart of a persistent domain keeps the checkpoint and its bitmap (saved in the qcow2)
    vm.restart()
    vm.write("vda", 5 * MiB, 64 * KiB, 0x11)
    with source.open_session(prev) as s:
        (d,) = s.disks
        assert d.changed is not None and covers(d.changed, 5 * MiB, 64 * KiB)
        assert sum(n for _, n in d.changed) <= MiB
        s.complete("d" * 64)
        cp, prev = s.checkpoint, previous_of(s, "d" * 64)
    assert_nothing_left(vm, scratch, cp)
    # a checkpoint deleted by an administrator: a full read with a warning
    vm.dom.checkpointLookupByName(cp).delete(0)
    with source.open_session(prev) as s:
        assert s.disks[0].changed is None
        assert any("is gone" in w for w in s.warnings)
        s.complete("e" * 64)
        cp, prev = s.checkpoint, previous_of(s, "e" * 64)
    # a disk added: it is read whole, the others stay incremental
    vm.attach_disk(Disk("vdb", "qcow2", 16 * MiB))
    vm.write("vdb", 0, MiB, 0x12)
    vm.write("vda", 7 * MiB, 4 * KiB, 0x13)
    with source.open_session(prev) as s:
        changed = {d.name: d.changed for d in s.disks}
        assert changed["vdb"] is None and changed["vda"] is not None and covers(changed["vda"], 7 * MiB, 4 * KiB)
        assert any("vdb: reading the whole disk: the disk is new" in w for w in s.warnings)
        assert read_disk(s.disks[1]) == vm.snapshot_model()["vdb"]
        s.complete("f" * 64)
        cp = s.checkpoint
    assert_nothing_left(vm, scratch, cp)


def test_a_transient_domain_restarted_loses_its_checkpoints_and_reads_whole(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB)], transient=True)
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    _cp, prev = _first_and_previous(vm, source)
    vm.shutdown()  # a transient domain is gone with its checkpoint metadata
    vm.start()
    with source.open_session(prev) as s:
        assert s.disks[0].changed is None and any("is gone" in w for w in s.warnings)
        s.complete("1" * 64)
        cp = s.checkpoint
    assert_nothing_left(vm, scratch, cp)


def test_failed_freeze_fails_unless_crash_consistent_is_allowed(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB)], agent=True)  # a channel, but no agent answers
    scratch = tmp_path / "scratch"
    with pytest.raises(HypervisorError, match="allow-crash-consistent"):
        source_for(vm, scratch).open_session(None)
    assert_nothing_left(vm, scratch, None)
    with source_for(vm, scratch).open_session(None, BackupOptions(allow_crash_consistent=True)) as s:
        assert s.consistency == "crash-consistent"
        assert any("could not freeze" in w for w in s.warnings)
    assert_nothing_left(vm, scratch, None)  # never completed: its checkpoint is deleted


def test_offline_backup_reads_the_files_and_refuses_a_domain_started_meanwhile(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB), Disk("vdb", "raw", 8 * MiB)])
    vm.write("vda", MiB, MiB, 0x21)
    vm.write("vdb", 0, 64 * KiB, 0x22)
    vm.shutdown()
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    with source.open_session(None) as s:
        assert s.consistency == "offline" and [d.name for d in s.disks] == ["vda", "vdb"]
        assert {d.name: read_disk(d) for d in s.disks} == vm.snapshot_model()
        assert [f.name for f in s.files] == ["domain.xml"]
        s.before_snapshot()  # nothing changed
    with source.open_session(None) as s:
        vm.start()
        with pytest.raises(SourceError, match="was started"):
            s.before_snapshot()
    assert vm.checkpoints() == []


@pytest.fixture(params=["root", "another user"])
def placed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A folder for a domain's images and scratch folder, and ``make_domain``'s arguments, with
    QEMU run as root or as another user (whom the folders must let through)."""
    if request.param == "root":
        yield tmp_path, {}
        return
    nobody = other_user()
    base = Path(tempfile.mkdtemp(prefix="vmvault-test-libvirt-runas-"))
    try:
        base.chmod(0o755)
        yield base, {"workdir": base, "run_as": (nobody.pw_uid, nobody.pw_gid)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_killed_run_is_cleaned_up_by_the_next(
    placed: tuple[Path, dict[str, Any]], make_domain: Callable[..., LibvirtVM]
) -> None:
    folder, how = placed
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB)], **how)
    scratch = folder / "scratch"
    scratch.mkdir()
    script = (
        "import sys, time\n"
        "from vmvault.hypervisors.libvirt import LibvirtSource\n"
        f"s = LibvirtSource({source_for(vm, scratch).location!r} + '&scratch=' + {quote(str(scratch), safe='')!r})"
        ".open_session(None)\n"
        "print('open', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"open"
    assert vm.has_job() and len(list(scratch.iterdir())) == 1
    proc.kill()
    proc.wait()
    assert vm.has_job()  # libvirt keeps the job of a killed client
    with source_for(vm, scratch).open_session(None) as s:
        assert any("interrupted vmvault run" in w for w in s.warnings)
        s.complete("2" * 64)
        cp = s.checkpoint
    assert_nothing_left(vm, scratch, cp)


def test_a_second_run_while_one_is_open_is_refused(
    placed: tuple[Path, dict[str, Any]], make_domain: Callable[..., LibvirtVM]
) -> None:
    folder, how = placed
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB)], **how)
    scratch = folder / "scratch"
    with source_for(vm, scratch).open_session(None):
        with pytest.raises(HypervisorError, match="another vmvault backup"):
            source_for(vm, scratch).open_session(None)
        assert vm.has_job()
    assert_nothing_left(vm, scratch, None)


def test_a_bitmap_missing_from_an_image_reads_whole_instead_of_failing(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    vm = make_domain([Disk("vda", "qcow2", 16 * MiB)])
    vm.write("vda", 0, MiB, 0x41)
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    cp, prev = _first_and_previous(vm, source)
    vm.shutdown()
    # the checkpoint's metadata stays in libvirt, its bitmap is gone from the image
    subprocess.run(["qemu-img", "bitmap", "--remove", vm.paths["vda"], cp], check=True)
    vm.start()
    vm.write("vda", 4 * MiB, 64 * KiB, 0x42)
    with source.open_session(prev) as s:
        assert s.disks[0].changed is None
        assert any("inconsistent" in w for w in s.warnings), s.warnings
        assert read_disk(s.disks[0]) == vm.snapshot_model()["vda"]
        s.complete("3" * 64)
        cp = s.checkpoint
    assert_nothing_left(vm, scratch, cp)


def test_a_tracking_that_lost_writes_is_caught_by_the_sample(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    from vmvault.backends.memory import MemoryBackend
    from vmvault.engine.backup import backup
    from vmvault.repo.repository import Repository

    vm = make_domain([Disk("vda", "qcow2", 8 * MiB)])
    for i in range(8):
        vm.write("vda", i * MiB, MiB, 0x50 + i)
    scratch = tmp_path / "scratch"
    source = source_for(vm, scratch)
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=64 * KiB)
    first = backup(repo, source)
    cp = first.snapshot.extra["libvirt"]["checkpoint"]
    for i in range(8):  # every chunk changes ...
        vm.write("vda", i * MiB, MiB, 0x60 + i)
    vm.shutdown()
    subprocess.run(["qemu-img", "bitmap", "--clear", vm.paths["vda"], cp], check=True)  # ... and the bitmap forgets
    vm.start()
    result = backup(repo, source, BackupOptions(tracking_sample=16))
    disk = result.snapshot.disks[0]
    assert any("change tracking is wrong" in w for w in result.warnings), result.warnings
    assert disk.stats["incremental"] == 0 and disk.cbt is None
    # the next backup reads the disk whole too, and the data is right
    again = backup(repo, source, BackupOptions(tracking_sample=16))
    assert again.snapshot.disks[0].stats["incremental"] == 0
    assert any("recorded no libvirt checkpoint" in w or "the disk is new" in w for w in again.warnings)


def test_uefi_variables_are_stored_and_excluded_disks_listed_with_the_reason(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    nvram = tmp_path / "nvram" / "VARS.fd"
    nvram.parent.mkdir()
    os_xml = (
        f"<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><nvram>{nvram}</nvram></os>"
        "<features><acpi/></features>"
    )
    cdrom = "<disk type='file' device='cdrom'><target dev='sdc' bus='sata'/><readonly/></disk>"
    vm = make_domain([Disk("vda", "qcow2", 8 * MiB), Disk("vdb", "qcow2", 8 * MiB)], os_xml=os_xml, extra_devices=cdrom)
    assert nvram.exists()
    scratch = tmp_path / "scratch"
    with source_for(vm, scratch).open_session(None, BackupOptions(exclude=("vd[b]",))) as s:
        assert [d.name for d in s.disks] == ["vda"]
        assert sorted(f.name for f in s.files) == ["domain.xml", "nvram/VARS.fd"]
        skipped = {d["target"]: d["reason"] for d in s.vm["skipped_disks"]}
        assert skipped == {"vdb": "excluded (--exclude)", "sdc": "removable medium (cdrom)"}
        assert s.vm["firmware"] in ("efi", "uefi")
        xml = next(f for f in s.files if f.name == "domain.xml").open()
        assert xml is not None and b"<nvram" in xml.read()


def test_offline_qcow2_with_a_backing_chain_is_one_disk(make_domain: Callable[..., LibvirtVM], tmp_path: Path) -> None:
    vm = make_domain([Disk("vda", "qcow2", 8 * MiB)], start=False)
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(8 * MiB)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x71 0 1M", str(base)], check=True, capture_output=True)
    os.unlink(vm.paths["vda"])
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", vm.paths["vda"]], check=True
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x72 4M 64k", vm.paths["vda"]], check=True, capture_output=True
    )
    expected = bytearray(8 * MiB)
    expected[:MiB] = b"\x71" * MiB
    expected[4 * MiB : 4 * MiB + 64 * KiB] = b"\x72" * 64 * KiB
    with source_for(vm, tmp_path / "scratch").open_session(None) as s:
        assert s.consistency == "offline" and len(s.disks) == 1
        image = s.disks[0].image
        # the engine stores the merged view of a disk that is not a layer: backing data included
        assert image.read(0, image.size) == bytes(expected)
        assert sum(e.length for e in image.merged_extents() if e.kind.value == "data") >= MiB + 64 * KiB


def test_offline_backing_file_on_a_host_file_is_refused(make_domain: Callable[..., LibvirtVM], tmp_path: Path) -> None:
    """QEMU writes its image's header, so whatever runs in it (the guest, taken over) can make
    the image name any host file as its backing file. The offline backup, reading as root,
    stored that file as the disk's unwritten part. Now a backing file must lie in the image's
    folder or an ``--allow-parent-dir`` folder (as for VM folders)."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    vm = make_domain([Disk("vda", "qcow2", 8 * MiB)], start=False, workdir=images)
    secret = outside / "shadow"
    secret.write_bytes(b"root:$y$j9T$secret\n".ljust(8 * MiB, b"\0"))
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-b", str(secret), "-F", "raw", vm.paths["vda"]], check=True)
    with pytest.raises(ParentError, match=rf"parent {secret} .*inside {images}"):
        source_for(vm, tmp_path / "scratch").open_session(None)
    allowed = BackupOptions(allow_parent_dirs=(str(outside),))
    with source_for(vm, tmp_path / "scratch").open_session(None, allowed) as s:
        assert s.disks[0].image.read(0, 18) == b"root:$y$j9T$secret"


#: run as QEMU's user: put a link to VICTIM under each NAME in FOLDER (moving a file there
#: aside first), as a QEMU taken over by its guest could; prints what it planted
_PLANT = """
import os, sys
folder, victim, names = sys.argv[1], sys.argv[2], sys.argv[3:]
planted = []
for name in names:
    path = os.path.join(folder, name)
    try:
        if os.path.lexists(path):
            os.rename(path, path + ".moved")
        os.symlink(victim, path)
        planted.append(name)
    except OSError:
        pass
print(" ".join(planted) or "nothing", flush=True)
"""


def test_a_qemu_taken_over_cannot_get_a_host_file_changed(libvirtd: Libvirtd, monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt runs QEMU as its own user (Debian's ``libvirt-qemu``; ``nobody`` here) and what
    runs in QEMU is the guest's. libvirtd, as root, creates each backup scratch file by name
    (following a link, with O_TRUNC) and chowns it to QEMU's user by name. The scratch folder
    was handed to QEMU's user, so a link it planted there had libvirtd make a file where QEMU
    may not (a root-only folder here; ``/etc/ld.so.preload`` would do) and give it to QEMU's
    user. Now the folder stays root's (0711), QEMU makes its NBD socket in a folder of its own,
    and nothing can be planted or swapped in, before the job or while it runs."""
    nobody = other_user()
    base = Path(tempfile.mkdtemp(prefix="vmvault-test-libvirt-runas-"))
    images, scratch, victims = base / "images", base / "scratch", base / "victims"
    made, theirs = victims / "made-by-root", victims / "someone-elses"
    planted: list[str] = []

    def plant(folder: str, victim: Path) -> str:
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", _PLANT, folder, str(victim), "scratch-vda.qcow2"],
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    begin = LibvirtSession._quiesce_and_begin

    def plant_then_begin(self: LibvirtSession, *args: Any) -> None:
        # between the scratch folder's making and libvirtd's creating the scratch file in it
        assert self.tempdir is not None
        planted.append(plant(self.tempdir, made))
        begin(self, *args)

    monkeypatch.setattr(LibvirtSession, "_quiesce_and_begin", plant_then_begin)
    vm: LibvirtVM | None = None
    try:
        base.chmod(0o755)
        for folder in (images, scratch, victims):
            folder.mkdir(mode=0o755)
        theirs.write_bytes(b"another user's file\n")
        os.chown(theirs, 4242, 4242)
        name, ids = f"vmvault-test-runas-{os.urandom(2).hex()}", (nobody.pw_uid, nobody.pw_gid)
        vm = LibvirtVM(libvirtd, images, name, [Disk("vda", "qcow2", 16 * MiB)], run_as=ids).define().start()
        pid = int((libvirtd.root / "run" / "qemu" / f"{vm.name}.pid").read_text())
        assert os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid
        vm.write("vda", 0, MiB, 0x31)
        with LibvirtSource(f"{vm.location}&scratch={quote(str(scratch), safe='')}").open_session(None) as s:
            assert s.tempdir is not None
            folder = os.stat(s.tempdir)
            assert (folder.st_uid, folder.st_mode & 0o777) == (0, 0o711)
            owners = {name: os.lstat(os.path.join(s.tempdir, name)).st_uid for name in os.listdir(s.tempdir)}
            assert owners == {"owner": 0, "nbd": nobody.pw_uid, "scratch-vda.qcow2": nobody.pw_uid}
            # during the backup: swap the scratch file for a link to another user's file
            planted.append(plant(s.tempdir, theirs))
            assert read_disk(s.disks[0])[:MiB] == b"\x31" * MiB
        assert planted == ["nothing", "nothing"]
        assert not os.path.lexists(made)
        assert theirs.read_bytes() == b"another user's file\n" and theirs.stat().st_uid == 4242
        assert list(scratch.iterdir()) == []
    finally:
        if vm is not None:
            vm.remove()
        shutil.rmtree(base, ignore_errors=True)

"""Boot verification with the real guest of tests/guests.py, backed up into a repository: it
passes on guest-ping and on its serial marker; the same disk with its boot sector wiped fails
with "no bootable disk"; a kernel whose root cannot be mounted fails with its panic; a guest
that never gives the awaited heartbeat times out; SIGTERM stops it with nothing left behind;
nothing is written to the repository."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fsimages import MiB, run
from tests.guests import MARKER, guest
from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.verify_boot import VerifyBootOptions, verify_boot
from vmvault.hypervisors.files import FilesSource
from vmvault.hypervisors.qemu_boot import ovmf_code
from vmvault.platform import TRANSIENT_IDS
from vmvault.repo.format import ChunkResolver
from vmvault.repo.pack import pack_name
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "correct horse"
ROOT = Path(__file__).resolve().parents[2]

_PANIC_CFG = """DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0,115200 rdinit=/nonexistent root=/dev/nonexistent panic=0
"""


@dataclass
class Guests:
    repo_dir: Path
    good: str
    wiped: str
    panics: str


def _vm(base: Path, name: str, source: Path) -> Path:
    folder = base / name
    folder.mkdir()
    shutil.copyfile(source, folder / "guest.raw")
    return folder / "guest.raw"


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Guests:
    """One repository holding the good guest, the guest with its boot sector wiped, and the
    guest whose kernel is told to mount a root that does not exist (it panics)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    os.environ["VMVAULT_TEST_CHEAP_KDF"] = "1"
    g = guest()
    base = tmp_path_factory.mktemp("verify-boot")
    _vm(base, "good", g.disk)
    wiped = _vm(base, "wiped", g.disk)
    with open(wiped, "r+b") as f:
        f.write(bytes(512))
    panics = _vm(base, "panics", g.disk)
    cfg = base / "syslinux.cfg"
    cfg.write_text(_PANIC_CFG)
    run("mcopy", "-o", "-i", f"{panics}@@{MiB}", cfg, "::/syslinux.cfg")  # the FAT partition starts at 1 MiB
    repo_dir = base / "repo"
    repo = Repository.init(LocalBackend(str(repo_dir)), PASSWORD.encode())
    ids = {name: backup(repo, FilesSource(str(base / name))).snapshot.id for name in ("good", "wiped", "panics")}
    repo.close()
    return Guests(repo_dir, ids["good"], ids["wiped"], ids["panics"])


def _open(g: Guests) -> Repository:
    return Repository.open(LocalBackend(str(g.repo_dir)), PASSWORD.encode())


def _storage(g: Guests) -> dict[str, tuple[int, int]]:
    """Every file of the repository's storage with its size and mtime."""
    out = {}
    for path in sorted(g.repo_dir.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(g.repo_dir))] = (st.st_size, st.st_mtime_ns)
    return out


def _snap(repo: Repository, snap_id: str) -> Snapshot:
    return repo.find_snapshot(snap_id)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _qemu_processes(folder: str) -> list[int]:
    """PIDs of QEMU processes working in ``folder`` or below (QEMU is given the names of its
    files relative to its working folder, the verification's private one)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"qemu-system" in cmdline and (cwd + "/").startswith(folder.rstrip("/") + "/"):
            found.append(int(entry))
    return found


def test_the_guest_passes_on_guest_ping_with_a_screenshot_and_nothing_left(guests: Guests, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    before = _storage(guests)
    repo = _open(guests)
    result = verify_boot(repo, _snap(repo, guests.good), VerifyBootOptions(timeout=240, work_dir=str(work)))
    assert result.passed, (result.reason, result.message, result.serial_tail[-2000:])
    assert result.reason == "agent"
    assert result.heartbeats == ("agent",)
    assert result.accel == "tcg"  # /dev/kvm here cannot run a stock kernel (no vmx/svm)
    assert result.sandbox
    if os.geteuid() == 0:  # QEMU ran under ids of its own, not as root
        assert result.qemu_uid in TRANSIENT_IDS
        assert result.to_dict()["vm"]["qemu_uid"] == result.qemu_uid
    assert MARKER in result.serial_tail  # the guest did boot to its /init
    assert result.screenshot is not None
    assert _png_size(result.screenshot) == (720, 400)  # VGA text mode
    print(f"\nverify-boot (guest-ping) passed after {result.seconds:.1f} s")
    assert list(work.iterdir()) == [], "overlays, sockets or served images were left behind"
    assert not _qemu_processes(str(work))
    assert _storage(guests) == before, "the repository was written to"


def test_the_guest_passes_on_its_serial_marker(guests: Guests, tmp_path: Path) -> None:
    repo = _open(guests)
    options = VerifyBootOptions(timeout=240, marker=MARKER, heartbeats=("marker",), work_dir=str(tmp_path))
    result = verify_boot(repo, _snap(repo, guests.good), options)
    assert result.passed, (result.reason, result.message, result.serial_tail[-2000:])
    assert result.reason == "marker"
    assert MARKER in result.message
    print(f"\nverify-boot (marker) passed after {result.seconds:.1f} s")
    assert list(tmp_path.iterdir()) == []


def test_a_wiped_boot_sector_fails_with_no_bootable_disk(guests: Guests, tmp_path: Path) -> None:
    repo = _open(guests)
    result = verify_boot(repo, _snap(repo, guests.wiped), VerifyBootOptions(timeout=240, work_dir=str(tmp_path)))
    assert not result.passed
    assert result.reason == "no-bootable-disk", result.message
    assert "No bootable device" in result.message or "not a bootable disk" in result.message
    assert result.seconds < 60, "the firmware gives up at once; no timeout is waited for"
    assert result.screenshot is not None
    assert list(tmp_path.iterdir()) == []


def test_uefi_finds_nothing_to_boot_on_a_bios_only_disk(guests: Guests, tmp_path: Path) -> None:
    """The guest boots through an MBR boot sector only: OVMF finds no EFI loader and starts its shell."""
    if ovmf_code() is None:
        pytest.skip("OVMF is not installed (Debian package ovmf)")
    repo = _open(guests)
    options = VerifyBootOptions(timeout=240, firmware="uefi", work_dir=str(tmp_path))
    result = verify_boot(repo, _snap(repo, guests.good), options)
    assert not result.passed
    assert result.reason == "no-bootable-disk", (result.message, result.serial_tail[-2000:])
    assert "UEFI firmware found nothing to boot" in result.message and "Not Found" in result.message
    assert result.plan.firmware == "uefi" and result.plan.machine == "q35"
    assert list(tmp_path.iterdir()) == []


def test_a_kernel_that_cannot_mount_its_root_fails_with_the_panic(guests: Guests, tmp_path: Path) -> None:
    repo = _open(guests)
    result = verify_boot(repo, _snap(repo, guests.panics), VerifyBootOptions(timeout=240, work_dir=str(tmp_path)))
    assert not result.passed
    assert result.reason == "kernel-panic", (result.message, result.serial_tail[-2000:])
    assert "Kernel panic - not syncing" in result.message
    assert "VFS" in result.message  # the kernel's own reason is quoted
    assert list(tmp_path.iterdir()) == []


def test_a_stable_screen_is_a_heartbeat_when_asked_for(guests: Guests, tmp_path: Path) -> None:
    """The guest's console goes to the serial port: its screen keeps the boot loader's banner,
    stable and not blank."""
    repo = _open(guests)
    options = VerifyBootOptions(timeout=240, heartbeats=("screen",), screen_stable=4, work_dir=str(tmp_path))
    result = verify_boot(repo, _snap(repo, guests.good), options)
    assert result.passed, (result.reason, result.message)
    assert result.reason == "screen" and "same non-blank picture" in result.message
    assert result.heartbeats == ("screen",)
    assert list(tmp_path.iterdir()) == []


def test_damaged_data_in_the_repository_fails_the_verification(tmp_path: Path) -> None:
    """The pack holding the boot sector is damaged: the export answers EIO, the firmware cannot
    read the disk, and the verdict says the backup is damaged (not only that nothing booted)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    g = guest()
    _vm(tmp_path, "vm", g.disk)
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")), PASSWORD.encode())
    snap = backup(repo, FilesSource(str(tmp_path / "vm"))).snapshot
    chunk_id = ChunkResolver(repo, snap, snap.disks[0]).chunk_id(0)
    assert chunk_id is not None
    loc = repo.index.lookup(chunk_id)
    assert loc is not None
    pack = tmp_path / "repo" / pack_name(loc.pack_id)
    data = bytearray(pack.read_bytes())
    data[loc.entry.offset + loc.entry.length // 2] ^= 0x40
    pack.write_bytes(bytes(data))
    work = tmp_path / "work"
    work.mkdir()
    result = verify_boot(repo, snap, VerifyBootOptions(timeout=120, work_dir=str(work)))
    assert not result.passed
    assert result.reason == "damaged-backup", result.message
    assert "could not serve" in result.message and "of disk guest.raw" in result.message
    assert "check --read-data" in result.message
    assert list(work.iterdir()) == []


def test_overlays_beyond_their_bound_stop_the_guest(guests: Guests, tmp_path: Path) -> None:
    """A guest writing without end cannot fill the host's disk: past ``max_writes`` it is stopped
    (here the bound is below what a fresh overlay's metadata takes, so it trips at once)."""
    repo = _open(guests)
    options = VerifyBootOptions(timeout=240, max_writes=16 << 10, work_dir=str(tmp_path))
    result = verify_boot(repo, _snap(repo, guests.good), options)
    assert not result.passed
    assert result.reason == "too-many-writes", result.message
    assert "throw-away overlays" in result.message
    assert result.seconds < 60
    assert list(tmp_path.iterdir()) == []


def test_the_kernel_bounds_every_file_qemu_writes(guests: Guests, tmp_path: Path) -> None:
    """Between two looks at the overlays a fast guest could write gigabytes: QEMU runs with a
    file size limit (RLIMIT_FSIZE) of the bound plus metadata and no core dump; past it the
    kernel sends SIGXFSZ, which ends QEMU, and the verification names too-many-writes."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is missing (util-linux)")
    repo = _open(guests)
    seen: dict[str, str] = {}

    def started(pid: int) -> None:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith(("Max file size", "Max core file size")):
                seen[line[:26].strip()] = line[26:].split()[0]
        os.kill(pid, signal.SIGXFSZ)  # what the kernel sends when a write passes the limit

    options = VerifyBootOptions(timeout=120, max_writes=256 * MiB, work_dir=str(tmp_path))
    result = verify_boot(repo, _snap(repo, guests.good), options, on_started=started)
    assert seen == {"Max file size": str(256 * MiB + 64 * MiB), "Max core file size": "0"}
    assert not result.passed and result.reason == "too-many-writes", result.message
    assert "the kernel stopped QEMU" in result.message
    assert list(tmp_path.iterdir()) == []


def test_no_heartbeat_within_the_timeout_fails_with_timeout(guests: Guests, tmp_path: Path) -> None:
    repo = _open(guests)
    options = VerifyBootOptions(timeout=6, marker="NEVER-PRINTED", heartbeats=("marker",), work_dir=str(tmp_path))
    started = time.monotonic()
    result = verify_boot(repo, _snap(repo, guests.good), options)
    assert not result.passed
    assert result.reason == "timeout"
    assert "within 6 s" in result.message and "NEVER-PRINTED" in result.message
    assert time.monotonic() - started < 60
    assert result.screenshot is not None
    assert list(tmp_path.iterdir()) == []
    assert not _qemu_processes(str(tmp_path))


def _cli(guests: Guests, *argv: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.update(
        VMVAULT_REPO=str(guests.repo_dir),
        VMVAULT_PASSWORD=PASSWORD,
        VMVAULT_TEST_CHEAP_KDF="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "vmvault", "verify-boot", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_vm_and_removes_everything(guests: Guests, tmp_path: Path, signum: int) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shot = tmp_path / "shot.png"
    proc = _cli(guests, guests.good[:8], "--work-dir", str(work), "--screenshot", str(shot), "--timeout", "240")
    try:
        deadline = time.monotonic() + 120
        while not _qemu_processes(str(work)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "QEMU never started"
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while _qemu_processes(str(work)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _qemu_processes(str(work)), "QEMU was left running"
    assert list(work.iterdir()) == [], "files were left behind"
    assert not shot.exists()


def test_the_command_line_passes_fails_and_keeps_the_screenshot(guests: Guests, tmp_path: Path) -> None:
    shot = tmp_path / "wiped.png"
    proc = _cli(guests, guests.wiped[:8], "--screenshot", str(shot), "--timeout", "120", "--work-dir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, (out, err)
    assert "did NOT boot (no-bootable-disk)" in out
    assert f"screenshot: {shot}" in out
    width, height = _png_size(shot.read_bytes())
    assert width > 0 and height > 0
    # an existing screenshot file is never written over, and nothing is booted for it
    proc = _cli(guests, guests.wiped[:8], "--screenshot", str(shot))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "never written over" in err
    assert [p.name for p in tmp_path.iterdir()] == ["wiped.png"]


def test_png_from_a_screen_dump_decodes_to_the_same_pixels() -> None:
    from vmvault.hypervisors.qemu_boot import parse_ppm, png

    pixels = bytes((x * 7 + y * 3) % 256 for y in range(5) for x in range(4 * 3))
    screen = parse_ppm(b"P6\n# a comment\n4 5\n255\n" + pixels)
    data = png(screen)
    assert _png_size(data) == (4, 5)
    idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert raw == b"".join(b"\x00" + pixels[y * 12 : (y + 1) * 12] for y in range(5))

"""``vmvault mount`` through the real FUSE device: disks read back equal to their sources
(``qemu-img compare``), holes seen as holes, many readers at once, a damaged chunk as EIO and
a log line while the rest reads, SIGTERM and SIGINT unmount, a killed mount's leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fsimages import GuestImages
from vmvault.cli import EXIT, main
from vmvault.cli import mount as mount_cli
from vmvault.repo.format import ChunkResolver
from vmvault.repo.pack import pack_name

MiB = 1 << 20

if not os.path.exists("/dev/fuse"):
    pytest.skip("/dev/fuse is absent: the mount is tested through the real FUSE device", allow_module_level=True)
if shutil.which("fusermount3") is None:
    pytest.skip("fusermount3 is absent (Debian package fuse3: scripts/setup.sh)", allow_module_level=True)
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
pytest.importorskip("mfusepy", reason="mfusepy is vmvault's mount extra (pyproject.toml: vmvault[mount])")


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    assert main(["init", "-q", "--chunk-size", "64K"]) == 0
    return tmp_path


def backed_up(capsys: pytest.CaptureFixture[str], source: Path) -> str:
    capsys.readouterr()
    assert main(["backup", str(source), "--json"]) == 0
    return str(json.loads(capsys.readouterr().out)["snapshot"])


class Mount:
    def __init__(self, proc: subprocess.Popen[bytes], point: Path, log: Path) -> None:
        self.proc, self.point, self.log = proc, point, log

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


@contextmanager
def mounted(point: Path, *args: str) -> Iterator[Mount]:
    point.mkdir(exist_ok=True)
    log = point.parent / f"{point.name}.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmvault", "mount", str(point), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
    mount = Mount(proc, point, log)
    try:
        deadline = time.monotonic() + 60
        while not _serving(point):
            if proc.poll() is not None:
                raise AssertionError(f"vmvault mount ended ({proc.returncode}): {mount.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not mounted after 60 s: {mount.stderr()}")
            time.sleep(0.05)
        yield mount
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if os.path.ismount(point):
            subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False)


def _serving(point: Path) -> bool:
    if not os.path.ismount(point):
        return False
    try:
        os.listdir(point)  # a killed mount's leftover is a mount point too, but answers ENOTCONN
    except OSError:
        return False
    return True


def snapshot_folder(point: Path, vm: str) -> Path:
    latest = point / "by-vm" / vm / "latest"
    assert latest.is_symlink()
    return latest.resolve()


def qemu_img(*args: str) -> str:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is absent (Debian package qemu-utils: scripts/setup.sh)")
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_disks_read_back_equal_their_sources_layers_resolved_holes_as_holes(
    env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]
) -> None:
    chain, _ = guest_images.chain()
    qcow2 = guest_images.container("mbr", "qcow2")
    backed_up(capsys, chain)
    backed_up(capsys, qcow2.parent)
    with mounted(env / "mnt") as m:
        assert sorted(os.listdir(m.point / "by-vm")) == sorted([chain.name, qcow2.parent.name])
        layers = snapshot_folder(m.point, chain.name)
        assert sorted(os.listdir(layers)) == ["guest.vhdx.raw", "guest_ckpt.avhdx.raw"]
        # each layer as the guest saw it: the base when the checkpoint was taken, the top at the backup
        qemu_img("compare", "-f", "raw", "-F", "raw", str(layers / "guest.vhdx.raw"), str(guest_images.disk("gpt")))
        after = guest_images.root / "chain-work" / "after.raw"
        qemu_img("compare", "-f", "raw", "-F", "raw", str(layers / "guest_ckpt.avhdx.raw"), str(after))
        disk = snapshot_folder(m.point, qcow2.parent.name) / "mbr.qcow2.raw"
        qemu_img("compare", "-f", "raw", "-F", "qcow2", str(disk), str(qcow2))
        extents = json.loads(qemu_img("map", "-f", "raw", "--output=json", str(disk)))
        holes = [e for e in extents if not e["data"]]
        assert holes and sum(e["length"] for e in holes) > disk.stat().st_size // 4, "holes come through SEEK_HOLE"
        with pytest.raises(OSError):
            open(disk, "r+b")  # noqa: SIM115 - the open itself is refused
        assert m.stop() == 0
    assert not os.path.ismount(env / "mnt")


def test_many_readers_at_once(env: Path, guest_images: GuestImages, capsys: pytest.CaptureFixture[str]) -> None:
    source = guest_images.container("gpt", "vhdx")
    backed_up(capsys, source.parent)
    want = hashlib.sha256(guest_images.disk("gpt").read_bytes()).hexdigest()
    with mounted(env / "mnt", "--cache-size", "2M") as m:
        disk = snapshot_folder(m.point, source.parent.name) / "gpt.vhdx.raw"
        results: list[str] = []

        def read(piece: int, start: int) -> None:
            h = hashlib.sha256()
            fd = os.open(disk, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                chunks = {}
                for offset in [*range(start, size, piece), *range(0, start, piece)]:
                    chunks[offset] = os.pread(fd, min(piece, size - offset), offset)
                for offset in sorted(chunks):
                    h.update(chunks[offset])
            finally:
                os.close(fd)
            results.append(h.hexdigest())

        threads = [threading.Thread(target=read, args=(4096 << (i % 7), i * 3 * MiB)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert results == [want] * 8
        assert m.proc.poll() is None


def _damage_one_chunk(repo_dir: Path, snap_id: str, chunk: int) -> None:
    from vmvault.backends.local import LocalBackend
    from vmvault.repo.repository import Repository

    repo = Repository.open(LocalBackend(str(repo_dir)), b"correct horse")
    snap = repo.find_snapshot(snap_id)
    chunk_id = ChunkResolver(repo, snap, snap.disks[0]).chunk_id(chunk)
    assert chunk_id is not None
    loc = repo.index.lookup(chunk_id)
    assert loc is not None
    pack = repo_dir / pack_name(loc.pack_id)
    data = bytearray(pack.read_bytes())
    data[loc.entry.offset + loc.entry.length // 2] ^= 0x08
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))


def test_a_damaged_chunk_is_eio_and_a_log_line_and_the_mount_goes_on(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = env / "vm01"
    vm.mkdir()
    content = random.Random(3).randbytes(4 * MiB)
    (vm / "disk.raw").write_bytes(content)
    snap = backed_up(capsys, vm)
    damaged = 17  # the chunk of 64 KiB at 0x110000
    _damage_one_chunk(env / "repo", snap, damaged)
    with mounted(env / "mnt") as m:
        disk = snapshot_folder(m.point, "vm01") / "disk.raw"
        fd = os.open(disk, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as err:
                os.pread(fd, 4096, damaged * 64 * 1024 + 4096)
            assert err.value.errno == 5  # EIO
            for offset in (0, (damaged - 1) * 64 * 1024, (damaged + 1) * 64 * 1024, 4 * MiB - 4096):
                assert os.pread(fd, 4096, offset) == content[offset : offset + 4096]
        finally:
            os.close(fd)
        assert m.proc.poll() is None, "the mount is still serving"
        time.sleep(0.2)
        log = m.stderr()
        assert f"read error (EIO) in snapshot {snap[:8]}, disk disk.raw, offset" in log, log
        assert f"needed by disk disk.raw at offset {damaged * 64 * 1024:#x} of snapshot {snap[:8]}" in log
        assert "Traceback" not in log
        assert m.stop() == 0


def read_in_mebibytes(path: Path, size: int, *, times: int = 1) -> bytes:
    """``path`` read ``times`` times through one descriptor in reads of 1 MiB; what the last
    read gave (each must be the same)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        reads = [b"".join(os.pread(fd, MiB, pos) for pos in range(0, size, MiB)) for _ in range(times)]
    finally:
        os.close(fd)
    assert all(r == reads[0] for r in reads)
    return reads[-1]


def stop_and_count(m: Mount) -> tuple[int, str]:
    """Unmount; how many reads the command says it answered, and how much."""
    assert m.stop() == 0
    assert m.proc.stdout is not None
    out = m.proc.stdout.read().decode()
    found = re.search(r"unmounted .* \(([\d,]+) reads? answered, ([\d.]+ \w+)\)", out)
    assert found, out
    return int(found.group(1).replace(",", "")), found.group(2)


def test_direct_io_brings_every_read_to_the_mount(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--direct-io``: every read of a mounted file comes to the mount, past the kernel's page
    cache (FUSE direct_io): a 4 MiB disk read twice through one descriptor is answered twice, 8 MiB,
    where the default mount, whose pages the kernel keeps, answers it once; both read back equal,
    a VM file's short reads too. The counts are the ones the command prints when it is unmounted."""
    vm = env / "vm01"
    vm.mkdir()
    data = os.urandom(4 * MiB)
    (vm / "disk.raw").write_bytes(data)
    notes = os.urandom(230_000)  # a VM file of several chunks, the last one short
    (vm / "notes.bin").write_bytes(notes)
    backed_up(capsys, vm)
    answered = {}
    for args in ((), ("--direct-io",)):
        with mounted(env / f"mnt{len(args)}", *args) as m:
            assert read_in_mebibytes(snapshot_folder(m.point, "vm01") / "disk.raw", len(data), times=2) == data
            answered[args] = stop_and_count(m)[1]
    assert answered[("--direct-io",)] == "8.0 MiB", answered
    assert answered[()] == "4.0 MiB", answered
    for args in ((), ("--direct-io",)):
        with mounted(env / f"mnt{len(args)}", *args) as m:
            fd = os.open(snapshot_folder(m.point, "vm01") / "notes.bin", os.O_RDONLY)
            try:
                for pos, size in ((0, 300_000), (65_000, 1_000), (229_990, 100), (230_000, 10)):
                    assert os.pread(fd, size, pos) == notes[pos : pos + size], (pos, size)
            finally:
                os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel's read-ahead of a mount is raised through /sys by root only")
def test_a_sequential_reader_is_answered_in_requests_of_a_mebibyte(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kernel reads ahead of a FUSE mount's readers 128 KiB at a time, whatever libfuse
    asks for; the mount raises its device's ``read_ahead_kb`` to 1 MiB: an 8 MiB disk read
    through the page cache in 1 MiB reads is answered in about 8 requests, not 64."""
    vm = env / "vm01"
    vm.mkdir()
    data = os.urandom(8 * MiB)
    (vm / "disk.raw").write_bytes(data)
    backed_up(capsys, vm)
    with mounted(env / "mnt", "--cache-size", "16M") as m:
        device = os.stat(m.point).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        assert bdi.read_text().strip() == "1024"
        assert read_in_mebibytes(snapshot_folder(m.point, "vm01") / "disk.raw", len(data)) == data
        reads, amount = stop_and_count(m)
    assert amount == "8.0 MiB"
    assert reads <= 12


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_cleanly(env: Path, capsys: pytest.CaptureFixture[str], sig: int) -> None:
    vm = env / "vm01"
    vm.mkdir()
    (vm / "notes.txt").write_text("hello\n")
    backed_up(capsys, vm)
    with mounted(env / "mnt") as m:
        assert (snapshot_folder(m.point, "vm01") / "notes.txt").read_text() == "hello\n"
        fd = os.open(snapshot_folder(m.point, "vm01") / "notes.txt", os.O_RDONLY)  # a reader still open
        try:
            assert m.stop(sig) == 0
        finally:
            os.close(fd)
        assert m.proc.stdout is not None
        out = m.proc.stdout.read().decode()
        assert "mounted 1 snapshots of 1 VMs read-only" in out and f"unmounted {env / 'mnt'}" in out
        assert not os.path.ismount(m.point)
        assert "Traceback" not in m.stderr()


def test_a_killed_mounts_leftover_is_cleared_by_the_next_mount(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vm = env / "vm01"
    vm.mkdir()
    (vm / "notes.txt").write_text("hello\n")
    backed_up(capsys, vm)
    with mounted(env / "mnt") as first:
        first.stop(signal.SIGKILL)
        assert os.path.ismount(first.point), "a killed FUSE process leaves its mount behind"
        with pytest.raises(OSError):
            os.listdir(first.point)
        with mounted(env / "mnt") as again:
            assert (snapshot_folder(again.point, "vm01") / "notes.txt").read_text() == "hello\n"
            assert "unmounted the stale vmvault mount at" in again.stderr()
            assert again.stop() == 0
    assert not os.path.ismount(env / "mnt")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("missing", "does not exist; create an empty folder to mount on"),
        ("file", "is not a folder"),
        ("full", "is not empty; mount on an empty folder"),
    ],
)
def test_an_unusable_mount_point_is_one_line(
    env: Path, capsys: pytest.CaptureFixture[str], make: str, message: str
) -> None:
    point = env / "mnt"
    if make == "file":
        point.write_text("x")
    elif make == "full":
        point.mkdir()
        (point / "mine").write_text("x")
    capsys.readouterr()
    assert main(["mount", str(point)]) == EXIT["usage"]
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_no_snapshot_to_mount_is_one_line(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (env / "mnt").mkdir()
    capsys.readouterr()
    code = main(["mount", str(env / "mnt")])
    err = capsys.readouterr().err
    assert code == EXIT["error"] and "no snapshot matches; nothing to mount" in err and err.count("\n") == 1


def test_the_mount_asks_for_one_heap_before_it_opens_the_repository(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmvault import platform
    from vmvault.cli import _common

    calls: list[str] = []
    monkeypatch.setattr(platform, "one_malloc_arena", lambda: calls.append("one heap") or True)
    opened = _common.open_repository
    monkeypatch.setattr(mount_cli, "open_repository", lambda args: calls.append("open") or opened(args))
    (env / "mnt").mkdir()
    capsys.readouterr()
    assert main(["mount", str(env / "mnt")]) == EXIT["error"]  # nothing to mount; the order is what counts
    assert calls == ["one heap", "open"]


def test_the_snapshot_filters_choose_what_is_mounted(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("vm01", "vm02"):
        (env / name).mkdir()
        (env / name / "notes.txt").write_text(name)
        backed_up(capsys, env / name)
    first = backed_up(capsys, env / "vm01")
    with mounted(env / "mnt", "--vm", "vm02") as m:
        assert os.listdir(m.point / "by-vm") == ["vm02"]
    with mounted(env / "mnt", first[:8]) as m:
        assert os.listdir(m.point / "by-vm") == ["vm01"]
        assert [n for n in os.listdir(m.point / "by-vm" / "vm01") if n != "latest"] == [
            os.readlink(m.point / "by-vm" / "vm01" / "latest")
        ]
        assert os.readlink(m.point / "by-vm" / "vm01" / "latest").endswith(first[:8])
    capsys.readouterr()
    (env / "mnt").mkdir(exist_ok=True)
    assert main(["mount", str(env / "mnt"), first[:8], "--vm", "vm02"]) != 0
    assert "vm02" in capsys.readouterr().err


def _read_as_nobody(path: Path, *groups: int) -> subprocess.CompletedProcess[bytes]:
    """``head -c 16 path`` as the user ``nobody`` (another local user), in ``groups`` too."""
    return subprocess.run(
        ["head", "-c", "16", str(path)], capture_output=True, timeout=60,
        user=65534, group=65534, extra_groups=list(groups),
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root")
def test_other_users_read_the_decrypted_disks_only_when_let_in(
    env: Path, capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    (env / "vm").mkdir()
    (env / "vm" / "disk.raw").write_bytes(b"secret guest data" * 4096)
    backed_up(capsys, env / "vm")
    # a mount point every user can reach (the test's own folders are 0700)
    public = Path(tempfile.mkdtemp(prefix="vmvault-mount-"))
    public.chmod(0o755)
    group = 4242  # a group nobody is not in unless given it
    try:
        for args in ((), ("--allow-group", str(group)), ("--allow-other",)):  # (): FUSE's default, the owner only
            with mounted(public / "mnt", *args) as m:
                disk = snapshot_folder(m.point, "vm") / "disk.raw"
                assert disk.read_bytes()[:16] == b"secret guest dat"
                for groups in ((), (group,)):
                    done = _read_as_nobody(disk, *groups)
                    allowed = bool(args) and (args[0] == "--allow-other" or group in groups)
                    assert (done.returncode == 0) == allowed, (args, groups, done.stderr)
                    if allowed:
                        assert done.stdout == b"secret guest dat"
                if args == ("--allow-other",):
                    assert "every user of this host can read the decrypted disks" in m.stderr()
    finally:
        shutil.rmtree(public, ignore_errors=True)


@pytest.mark.integration
def test_a_repository_on_s3_mounts_with_the_remote_defaults_and_reads_back_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mount of a repository on S3 (moto): the cache and read-ahead are remote storage's
    (128 MiB; ranged reads at once in a pool the mount's readers share), and a disk read
    through the real FUSE device, in two files at once, is the disk."""
    from tests.servers import S3Server, running_s3, s3_client_environment

    with s3_client_environment(), running_s3(tmp_path / "moto", buckets=("mount",)) as s3:
        for key, value in S3Server.client_env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
        monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
        monkeypatch.setenv("VMVAULT_REPO", s3.url("mount", "repo"))
        assert main(["init", "-q", "--chunk-size", "64K"]) == 0
        vm = tmp_path / "vm01"
        vm.mkdir()
        disks = {"a.raw": os.urandom(12 * MiB), "b.raw": os.urandom(8 * MiB)}
        for name, data in disks.items():
            (vm / name).write_bytes(data)
        backed_up(capsys, vm)
        with mounted(tmp_path / "mnt") as m:
            folder = snapshot_folder(m.point, "vm01")
            got: dict[str, bytes] = {}
            readers = [
                threading.Thread(target=lambda n=n: got.__setitem__(n, read_in_mebibytes(folder / n, len(disks[n]))))
                for n in disks
            ]
            for t in readers:
                t.start()
            for t in readers:
                t.join(120)
            assert got == disks
            assert m.stop() == 0
            assert m.proc.stdout is not None
            assert "(cache 128.0 MiB)" in m.proc.stdout.read().decode()

"""kill -9 at every storage write of a backup (and at random times of the real CLI):
the repository stays consistent, no snapshot loses data, and the next backup reuses what
was stored."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.check import check
from vmvault.repo.repository import Repository

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, str]:
    """A repository holding one snapshot, and a second image to back up (6 MiB, mostly new)."""
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    repo_dir = tmp_path / "template"
    repo = Repository.init(LocalBackend(str(repo_dir)), b"pw", chunk_size=64 * 1024, pack_size=1 << 20)
    first = tmp_path / "first.raw"
    first.write_bytes(os.urandom(2 << 20))
    snap = backup(repo, FilesSource(str(first))).snapshot
    second = tmp_path / "second.raw"
    second.write_bytes(first.read_bytes()[: 1 << 20] + os.urandom(5 << 20))
    return repo_dir, second, snap.id


def run_child(repo_dir: Path, image: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMVAULT_TEST_CHEAP_KDF="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "tests.engine._backup_child", str(repo_dir), str(image), str(kill_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )


def assert_consistent(repo_dir: Path, keep_id: str, tmp: Path) -> Repository:
    repo = Repository.open(LocalBackend(str(repo_dir)), b"pw")
    report = check(repo, read_data=True)
    assert report.ok, [p.to_dict() for p in report.errors]
    ids = [s.id for s in repo.list_snapshots()]
    assert keep_id in ids
    out = tmp / "restore"
    shutil.rmtree(out, ignore_errors=True)
    restore(repo, repo.find_snapshot(keep_id), str(out))
    return repo


@pytest.mark.slow
def test_kill_at_every_storage_write_of_a_backup(template: tuple[Path, Path, str], tmp_path: Path) -> None:
    repo_dir, image, keep_id = template
    full = tmp_path / "full"
    shutil.copytree(repo_dir, full)
    done = run_child(full, image, 0)
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.strip())
    assert total >= 6
    base_blobs = len(Repository.open(LocalBackend(str(repo_dir)), b"pw").index)
    needed = len(Repository.open(LocalBackend(str(full)), b"pw").index) - base_blobs
    for n in range(1, total + 1):
        work = tmp_path / f"kill{n}"
        shutil.copytree(repo_dir, work)
        res = run_child(work, image, n)
        assert res.returncode == -signal.SIGKILL, (n, res.returncode, res.stderr)
        repo = assert_consistent(work, keep_id, tmp_path)
        salvaged = len(repo.index) - base_blobs
        # the next backup completes and stores only what the killed one had not indexed
        result = backup(repo, FilesSource(str(image)))
        assert result.chunks_new == needed - salvaged, (n, result.chunks_new, needed, salvaged)
        assert check(repo, read_data=True).ok
        shutil.rmtree(work)


@pytest.mark.slow
def test_kill_the_real_cli_at_random_times(tmp_path: Path) -> None:
    env = dict(os.environ, VMVAULT_TEST_CHEAP_KDF="1", VMVAULT_PASSWORD="pw-for-test", VMVAULT_REPO=str(tmp_path / "r"))
    subprocess.run([sys.executable, "-m", "vmvault", "init"], env=env, check=True, capture_output=True)
    vm = tmp_path / "vm"
    vm.mkdir()
    from vmvault.sample_vm import make_disk

    make_disk(str(vm / "disk.raw"), 192 << 20, seed=11, fill=0.8)
    subprocess.run([sys.executable, "-m", "vmvault", "backup", str(vm)], env=env, check=True, capture_output=True)
    from vmvault.sample_vm import guest_writes

    for i, delay in enumerate((0.05, 0.2, 0.4, 0.7, 1.0, 1.5)):
        guest_writes(str(vm / "disk.raw"), percent=5, seed=i)
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmvault", "backup", str(vm)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        res = subprocess.run(
            [sys.executable, "-m", "vmvault", "check", "--read-data", "--json"], env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "vmvault", "backup", str(vm)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "vmvault", "restore", "latest", "--target", str(out)], env=env, check=True)
    assert (out / "disk.raw").read_bytes() == (vm / "disk.raw").read_bytes()

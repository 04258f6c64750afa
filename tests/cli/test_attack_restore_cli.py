"""`vmvault restore` against an untrusted or unusable target, and killed mid-way.

Every foreseeable failure is one clear line and its exit code (README, "Exit codes"); a
``kill -9`` never leaves a disk under its final name, and a rerun finishes the job.
Threat model: docs/design/repository-format.md, section 10.5.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import small_tmpfs as mount_tmpfs
from vmvault.cli import EXIT, main
from vmvault.disk import create_image
from vmvault.disk.chain import checkpoint
from vmvault.engine.target import WORK_PREFIX

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    assert main(["init", "-q"]) == 0
    return tmp_path


@pytest.fixture()
def vm(env: Path) -> Path:
    folder = env / "vm"
    (folder / "sub").mkdir(parents=True)
    with create_image(str(folder / "disk.qcow2"), "qcow2", 4 * MIB) as w:
        w.write(MIB, os.urandom(64 * 1024))
    (folder / "vm.conf").write_text("name = vm\n")
    (folder / "sub" / "nvram.bin").write_bytes(b"nv")
    assert main(["backup", str(folder), "-q"]) == 0
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refuses some values itself (an empty one), exit 2
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("where", ["a-file", "/dev/null", "/proc/vmvault-nonexistent/x", "link-in-path"])
def test_an_unusable_target_is_one_line_and_exit_2(
    vm: Path, env: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    (env / "a-file").write_text("x")
    (env / "dir").mkdir()
    (env / "dir" / "sub").symlink_to(env / "elsewhere")
    target = {"a-file": str(env / "a-file"), "link-in-path": str(env / "dir")}.get(where, where)
    code, err = run(capsys, "restore", "latest", "--target", target)
    assert code == EXIT["usage"], err
    assert err.startswith("vmvault: error: ") and len(err.strip().splitlines()) == 1
    assert not (env / "elsewhere").exists()


@pytest.mark.parametrize("name", ["", "c" * 300, "a/b"])
def test_a_bad_clone_name_is_a_usage_error(vm: Path, env: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, err = run(capsys, "restore", "latest", "--target", str(env / "t"), "--as-clone", name)
    assert code == EXIT["usage"], err
    assert "clone" in err and not (env / "t").exists()


def test_include_that_matches_nothing_is_a_usage_error(vm: Path, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "restore", "latest", "--target", str(env / "t"), "--include", "typo")
    assert code == EXIT["usage"] and "matches no disk or file" in err and "disk.qcow2" in err
    assert not (env / "t").exists()
    code, _ = run(capsys, "restore", "latest", "--target", str(env / "t"), "--include", "*.conf", "--include", "sub")
    assert code == 0
    assert sorted(os.listdir(env / "t")) == ["sub", "vm.conf"]


def test_include_of_a_layer_without_its_parent_names_the_parent(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = env / "chain"
    folder.mkdir()
    with create_image(str(folder / "base.vhdx"), "vhdx", 8 * MIB) as w:
        w.write(0, b"b" * 4096)
    child = os.path.basename(checkpoint(str(folder / "base.vhdx")))
    assert main(["backup", str(folder), "-q"]) == 0
    code, err = run(capsys, "restore", "latest", "--target", str(env / "t"), "--include", child)
    assert code == EXIT["usage"]
    assert "base.vhdx" in err and "--flatten" in err and "check --read-data" not in err
    code, _ = run(capsys, "restore", "latest", "--target", str(env / "t"), "--include", child, "--flatten", "-q")
    assert code == 0


def test_as_clone_with_include_restores_only_what_is_asked(
    vm: Path, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, "restore", "latest", "--target", str(env / "t"), "--as-clone", "vm2", "--include", "sub")
    assert code == 0, err
    assert sorted(os.listdir(env / "t" / "vm2")) == ["sub"]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mount_tmpfs(tmp_path / "tmpfs", "6m") as mnt:
        yield mnt


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vhdx", "vhd"])
def test_a_full_target_has_its_own_exit_code_and_hint(
    env: Path, small_tmpfs: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    folder = env / "big"
    folder.mkdir()
    (folder / "disk.raw").write_bytes(os.urandom(12 * MIB))
    assert main(["backup", str(folder), "-q"]) == 0
    code, err = run(capsys, "restore", "latest", "--target", str(small_tmpfs / "t"), "--format", fmt)
    assert code == EXIT["target_full"] == 15, err
    assert "No space left on the file system being written" in err
    assert "repository" not in err, "the repository is not what is full"
    assert os.listdir(small_tmpfs / "t") == []


# ---- kill -9 mid-restore, then a rerun ----------------------------------------------------


def cli(env: Path, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
    child_env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        VMVAULT_TEST_CHEAP_KDF="1",
        VMVAULT_PASSWORD="correct horse",
        VMVAULT_REPO=str(env / "repo"),
    )
    return subprocess.Popen([sys.executable, "-m", "vmvault", *argv], env=child_env, **kw)  # type: ignore[call-overload,no-any-return]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def partial_bytes(target: Path) -> int:
    """Bytes written so far into the partial files of the running restore."""
    total = 0
    for work in target.glob(f"{WORK_PREFIX}*"):
        for p in work.glob("*.partial"):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_blocks * 512
    return total


def kill_when(proc: subprocess.Popen[bytes], ready: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, "the restore ended before it could be killed"
        assert time.monotonic() < deadline, "the restore made no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_mid_disk_leaves_no_final_name_and_a_rerun_restores_it(env: Path) -> None:
    folder = env / "big"
    folder.mkdir()
    size = 160 * MIB
    with open(folder / "disk.raw", "wb") as f:
        for _ in range(size // (8 * MIB)):
            f.write(os.urandom(8 * MIB))
    (folder / "vm.conf").write_text("x\n")
    assert cli(env, "backup", str(folder), "-q").wait() == 0
    target = env / "r"
    proc = cli(env, "restore", "latest", "--target", str(target), "-q")
    kill_when(proc, lambda: partial_bytes(target) > size // 3)
    # a half-written disk under its final name is what must never be seen
    assert not (target / "disk.raw").exists() and not (target / "vm.conf").exists()
    (work,) = [p for p in target.iterdir() if p.name.startswith(WORK_PREFIX)]
    assert any(p.name.endswith(".partial") for p in work.iterdir())

    rerun = cli(env, "restore", "latest", "--target", str(target), "--json", stdout=subprocess.PIPE)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0
    doc = json.loads(out)
    assert any("removed the partial files of an interrupted restore" in n for n in doc["notes"])
    assert sha256(target / "disk.raw") == sha256(folder / "disk.raw")
    assert (target / "vm.conf").read_text() == "x\n"
    assert sorted(os.listdir(target)) == ["disk.raw", "vm.conf"], "no partial file or work folder is left"


@pytest.mark.slow
def test_kill_9_after_one_disk_resumes_keeping_that_disk(env: Path) -> None:
    folder = env / "two"
    folder.mkdir()
    (folder / "a.raw").write_bytes(os.urandom(8 * MIB))
    with open(folder / "b.raw", "wb") as f:
        for _ in range(16):
            f.write(os.urandom(8 * MIB))
    assert cli(env, "backup", str(folder), "-q").wait() == 0
    target = env / "r"
    proc = cli(env, "restore", "latest", "--target", str(target), "-q")
    kill_when(proc, lambda: (target / "a.raw").exists() and partial_bytes(target) > 16 * MIB)
    assert not (target / "b.raw").exists()
    inode = (target / "a.raw").stat().st_ino

    rerun = cli(env, "restore", "latest", "--target", str(target), "--json", stdout=subprocess.PIPE)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0
    doc = json.loads(out)
    assert doc["kept"] == [str(target / "a.raw")]
    assert (target / "a.raw").stat().st_ino == inode, "the completed disk was kept, not rewritten"
    for name in ("a.raw", "b.raw"):
        assert sha256(target / name) == sha256(folder / name)
    assert sorted(os.listdir(target)) == ["a.raw", "b.raw"]

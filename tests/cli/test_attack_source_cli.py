"""Hostile VM folders and images through the command line: one-line errors, exit codes, options.

Threat model: ``docs/design/repository-format.md`` section 10.4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from vmvault.cli import EXIT, main
from vmvault.disk import create_image

MIB = 1024 * 1024
SECRET = b"HOST-SECRET:" + os.urandom(8192)
ROOT = Path(__file__).resolve().parents[2]


def qemu_img(*args: str) -> None:
    subprocess.run([require_tool("qemu-img"), *args], check=True, capture_output=True)


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct-horse-1")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "shadow").write_bytes(SECRET)
    (tmp_path / "vm" / "sub").mkdir(parents=True)
    (tmp_path / "vm" / "vm.conf").write_text("name=vm1\n")
    (tmp_path / "vm" / "sub" / "nvram.bin").write_text("nv\n")
    assert main(["init", "-q"]) == 0
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_backup_of_a_backing_file_outside_is_refused_then_allowed(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vm, shadow = env / "vm", env / "outside" / "shadow"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(shadow), "-F", "raw", str(vm / "disk.qcow2"), "1M")
    code, out, err = run(capsys, "backup", str(vm), "-q")
    assert code == EXIT["source"] and out == ""
    line = err.splitlines()[0]
    assert line.startswith("vmvault: error: ") and str(vm / "disk.qcow2") in line and str(shadow) in line
    assert "--allow-parent-dir" in line and len(err.splitlines()) == 1
    code, out, _err = run(capsys, "snapshots", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, err = run(capsys, "backup", str(vm), "--allow-parent-dir", str(env / "outside"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert any("outside the VM folder" in w for w in doc["warnings"])


def test_backup_of_a_symlinked_disk_folder_warns_and_follows_on_request(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9, item 11: the link and the missing disk are said, in the summary and the snapshot."""
    disks = env / "data" / "disks"
    disks.mkdir(parents=True)
    with create_image(str(disks / "web.qcow2"), "qcow2", MIB) as w:
        w.write(0, b"w" * 4096)
    vm2 = env / "vm2"
    vm2.mkdir()
    (vm2 / "vm2.conf").write_text("name=vm2\n")
    os.symlink(disks, vm2 / "Virtual Hard Disks")
    code, out, _err = run(capsys, "backup", str(vm2))
    assert code == 0
    assert "warning: Virtual Hard Disks: not backed up: it is a link" in out
    assert f"warning: no disk image found in {vm2}" in out
    code, out, _err = run(capsys, "show", "latest", "--json")
    shown = json.loads(out)
    assert shown["disks"] == [] and any("Virtual Hard Disks" in w for w in shown["warnings"])
    code, out, err = run(
        capsys, "backup", str(vm2), "--follow-links", "--allow-parent-dir", str(env / "data"), "--json"
    )
    assert code == 0, err
    assert [d["name"] for d in json.loads(out)["disks"]] == ["Virtual Hard Disks/web.qcow2"]


def test_disk_commands_keep_parents_in_the_image_folder(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vm, shadow = env / "vm", env / "outside" / "shadow"
    disk = vm / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "../outside/shadow", "-F", "raw", str(disk), "1M")
    for argv in (
        ["disk", "info", str(disk)],
        ["disk", "map", str(disk)],
        ["disk", "check", str(disk)],
        ["disk", "compare", str(disk), str(disk)],
        ["disk", "checkpoint", str(disk)],
        ["disk", "convert", str(disk), str(env / "flat.raw"), "--to", "raw"],
    ):
        code, _out, err = run(capsys, *argv)
        assert code in (EXIT["source"], EXIT["problems"]), (argv, code, err)
        assert "outside the folders parents may be in" in (err + _out), argv
    assert not (env / "flat.raw").exists() and sorted(os.listdir(vm)) == ["disk.qcow2", "sub", "vm.conf"]
    allow = ["--allow-parent-dir", str(env / "outside")]
    code, _out, err = run(capsys, "disk", "convert", str(disk), str(env / "flat.raw"), "--to", "raw", *allow)
    assert code == 0, err
    assert (env / "flat.raw").read_bytes()[: len(SECRET)] == SECRET
    code, out, _err = run(capsys, "disk", "info", str(disk), "--json", *allow)
    assert code == 0 and json.loads(out)["depth"] == 2
    # a parent the user names with --parent may be anywhere
    code, _out, err = run(capsys, "disk", "info", str(disk), "--parent", str(shadow))
    assert code == 0, err


def test_disk_info_on_a_fifo_backing_file_returns_at_once(env: Path) -> None:
    """Issue 9, item 7: ``mkfifo vm/base.img`` as a backing file hung ``disk info`` and ``backup``.

    Run as the real command in a child process, which a hang would keep alive past the timeout.
    """
    vm = env / "vm"
    os.mkfifo(vm / "base.img")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.img", "-F", "raw", str(vm / "disk.qcow2"), "1M")
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for argv in (["disk", "info", str(vm / "disk.qcow2")], ["backup", str(vm)], ["disk", "info", str(vm / "base.img")]):
        proc = subprocess.run(
            [sys.executable, "-m", "vmvault", *argv], capture_output=True, text=True, timeout=60, env=environ
        )
        assert proc.returncode == EXIT["source"], (argv, proc.stderr)
        assert "FIFO" in proc.stderr and "Traceback" not in proc.stderr
    assert not (env / "repo" / "snapshots").exists() or os.listdir(env / "repo" / "snapshots") == []


def test_allow_parent_dir_is_refused_for_sources_it_cannot_apply_to(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = run(capsys, "backup", "qemu+unix:///run/none.qmp", "--allow-parent-dir", str(env))
    assert code == EXIT["usage"]
    assert "applies to VM folders and image files, and libvirt domains, not to running QEMU VMs" in err
    code, _out, err = run(capsys, "backup", str(env / "vm"), "--allow-parent-dir", str(env / "missing"))
    assert code == EXIT["usage"] and "is not a folder" in err

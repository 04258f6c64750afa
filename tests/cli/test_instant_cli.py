"""``vmvault instant-restore`` as a user meets it: a run to the end, --status, --abort, usage errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.engine.test_nbd import make_disk
from tests.libvirtd import Libvirtd, libvirtd
from vmvault.cli import EXIT, main

__all__ = ["libvirtd"]


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    assert main(["init", "-q"]) == 0
    make_disk(tmp_path / "disk.raw")
    assert main(["backup", str(tmp_path / "disk.raw"), "-q"]) == 0
    return tmp_path


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed (qemu-system-x86)")
def test_instant_restore_runs_to_local_disks_then_status_and_abort(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = env / "vm"
    try:
        code = main(["instant-restore", "latest", "--target", str(target), "--accel", "tcg", "--memory", "64"])
        out = capsys.readouterr().out
        assert code == EXIT["ok"], out
        assert "VM started" in out and "done: the VM runs from local disks only" in out
        assert main(["instant-restore", "--status", str(target), "--json"]) == EXIT["ok"]
        doc = json.loads(capsys.readouterr().out)
        assert doc["phase"] == "done" and doc["live"]["qemu"] and doc["live"]["vm"] == "running"
        assert not doc["live"]["export"]
    finally:
        assert main(["instant-restore", "--abort", str(target), "--remove-disks"]) == EXIT["ok"]
    assert "removed" in capsys.readouterr().out
    assert not (target / "disk0.qcow2").exists()


def test_usage_errors_are_one_line_with_exit_2(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ["instant-restore", "latest"],
        ["instant-restore", "--target", str(env / "t")],
        ["instant-restore", "latest", "--target", str(env / "t"), "--libvirt-uri", "qemu:///x", "--qemu-arg=-S"],
        ["instant-restore", "--status", str(env), "--abort", str(env)],
        ["instant-restore", "--status", str(env), "--remove-disks"],
        ["instant-restore", "--status", str(env / "nothing")],
        ["instant-restore", "--abort", str(env)],
        ["instant-restore", "latest", "--target", str(env)],  # not empty
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == EXIT["usage"], argv
        err = capsys.readouterr().err
        assert err.startswith("vmvault: error: ") and err.count("\n") == 1, (argv, err)
    assert not (env / "t").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_instant_restore_into_a_libvirt_domain(
    libvirtd: Libvirtd, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = env / "vm"
    try:
        argv = ["instant-restore", "latest", "--target", str(target), "--accel", "tcg", "--memory", "64"]
        assert main([*argv, "--libvirt-uri", libvirtd.uri]) == EXIT["ok"]
        out = capsys.readouterr().out
        assert "libvirt domain vmvault-instant-" in out and "done: the VM runs from local disks only" in out
        assert main(["instant-restore", "--status", str(target), "--json"]) == EXIT["ok"]
        doc = json.loads(capsys.readouterr().out)
        assert doc["live"]["vm"] == "running" and doc["libvirt"]["name"].startswith("vmvault-instant-")
    finally:
        assert main(["instant-restore", "--abort", str(target)]) == EXIT["ok"]
    assert doc["libvirt"]["name"] not in [d.name() for d in libvirtd.conn.listAllDomains()]

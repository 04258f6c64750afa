"""A scheduled backup job of a libvirt domain, run as the daemon runs it, against a real
libvirtd: full, then incremental through libvirt's changed-block tracking, each recorded in
the history, the domain left running as it was, the latest snapshot restored byte for byte."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.automation.conftest import make_config
from tests.libvirtd import Disk, Libvirtd, LibvirtVM, libvirtd, make_domain
from vmvault.automation.history import WARNING, History
from vmvault.backends.local import LocalBackend
from vmvault.cli import EXIT, main
from vmvault.repo.repository import Repository

__all__ = ["libvirtd", "make_domain"]

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def test_a_backup_job_of_a_libvirt_domain_runs_full_then_incremental(
    make_domain: Callable[..., LibvirtVM],
    libvirtd: Libvirtd,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_TEST_REPO_PW", "repo pass")
    Repository.init(LocalBackend(str(tmp_path / "repo")), b"repo pass")
    vm = make_domain([Disk("vda", "qcow2", 32 * MiB), Disk("vdb", "qcow2", 8 * MiB)])
    vm.write("vda", 0, 2 * MiB, 0x11)
    vm.write("vdb", MiB, MiB, 0x22)
    config = make_config(
        tmp_path,
        f"""
        [sources.web]
        location = "{vm.location}"

        [jobs.web-nightly]
        type = "backup"
        source = "web"
        repository = "r"
        schedule = "30 1 * * *"
        """,
    )
    argv = ["run", "web-nightly", "--config", str(config.path), "--json"]
    assert main(argv) == EXIT["ok"]
    first = json.loads(capsys.readouterr().out)
    vm.write("vda", 8 * MiB, MiB, 0x33)
    assert main(argv) == EXIT["ok"]
    second = json.loads(capsys.readouterr().out)
    # crash-consistent (the test domain has no guest agent): a warning, said in the run
    assert first["status"] == second["status"] == WARNING
    assert any("guest agent" in w for w in second["details"]["warnings"])
    assert vm.dom.isActive()  # the job leaves the domain running, as it found it

    runs = History(config.daemon.history).runs(job="web-nightly")
    assert [r.status for r in runs] == [WARNING, WARNING]
    assert [r.snapshot for r in runs] == [second["snapshot"], first["snapshot"]]
    # the second run read what changed (libvirt's checkpoint bitmaps), not the disks again
    assert [d["incremental"] for d in first["details"]["backup"]["disks"]] == [0, 0]
    disks = {d["name"]: d for d in second["details"]["backup"]["disks"]}
    assert all(d["incremental"] for d in disks.values())
    assert disks["vda"]["bytes_read"] < 4 * MiB and 0 < second["bytes"] < first["bytes"]

    model = vm.snapshot_model()
    target = tmp_path / "restore"
    monkeypatch.setenv("VMVAULT_PASSWORD", "repo pass")
    assert main(["-r", str(tmp_path / "repo"), "restore", second["snapshot"], "--target", str(target), "-q"]) == 0
    for dev, fmt in (("vda", "qcow2"), ("vdb", "qcow2")):
        (restored,) = target.rglob(f"*{dev}*")
        raw = tmp_path / f"{dev}.bin"
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(restored), str(raw)], check=True)
        assert raw.read_bytes() == model[dev], dev

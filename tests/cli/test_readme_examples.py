"""The README's usage examples run as written.

Every command line of the README's usage blocks (``## Usage``) is run in order, in-process,
against a repository and VM folders made for the purpose. Absolute paths are taken below a
temporary root (``/srv/vms/web01`` is ``ROOT/srv/vms/web01``), and the snapshot id the README
writes as ``1a2b3c4d`` is the first snapshot's. A line that needs what a test machine does not
have (a running hypervisor, an S3 bucket, a daemon running for ever) is skipped with its reason
in :data:`SKIPPED`; every other line must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from vmvault.backends.local import LocalBackend
from vmvault.cli import main
from vmvault.repo.repository import Repository
from vmvault.sample_vm import make_disk
from vmvault.testing.hyperv_lab import LabHost

ROOT = Path(__file__).resolve().parents[2]

#: lines not run, by their first words, and why
SKIPPED = {
    "vmvault backup qemu+unix://": "needs a running QEMU with a QMP socket (tests/engine/test_qemu_backup.py runs it)",
    "vmvault backup libvirt://": "needs libvirtd and a domain (tests/hypervisors/test_libvirt*.py run it)",
    "vmvault restore latest --target /srv/vms --as-clone web01-test --define": "needs libvirtd (docs/libvirt.md)",
    "vmvault files ": "needs a guest filesystem inside the disk (tests/cli/test_files_cli.py builds them)",
    "vmvault copy --from /mnt/backup/vmvault --to s3://": "needs an S3 bucket (tests/backends run a local S3 server)",
    "vmvault repair locks": "needs an S3 bucket with Object Lock (tests/repo/test_immutability.py runs it on moto)",
    "vmvault repair undelete": "needs an S3 bucket with Object Lock (tests/repo/test_immutability.py runs it on moto)",
    "vmvault serve ": "runs until stopped (tests/engine/test_nbd.py, tests/cli/test_serve_cli.py)",
    "vmvault mount ": "runs until unmounted and needs /dev/fuse (the mount tests mount through it)",
    "vmvault instant-restore ": "starts a VM (the instant-recovery tests run one under QEMU)",
    "vmvault verify-boot ": "boots a guest (the boot-verification tests build and boot one)",
    "vmvault daemon ": "runs until stopped (tests/automation run the daemon under a controllable clock)",
    "vmvault cancel ": "stops a job running elsewhere (tests/automation/test_cancel.py, test_cli_automation.py)",
    "vmvault user add": "asks for a password on a terminal and serves a dashboard (tests/web)",
    "vmvault service install": "writes a systemd unit and starts it (tests/automation/test_service.py, scripted)",
}

#: lines whose documented exit status is not 0 here, and why
EXPECTED = {
    "vmvault audit /srv/hyperv                     # checkpoint sprawl, orphaned disks, VMs without a recent backup": (
        3,
        "the lab VM was never backed up: audit reports it",
    ),
}

PASSWORD = "correct horse battery"


def usage_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return lines


def skipped(line: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if line.startswith(start)), None)


def rooted(word: str, root: Path) -> str:
    """An absolute path (alone or after ``--opt=``) moved below ``root``; URLs stay."""
    if word.startswith("/") and not word.startswith("//"):
        return str(root) + word
    return word


def world(root: Path) -> None:
    """What the README's commands expect to find."""
    qemu_img = require_tool("qemu-img")
    vms = root / "srv" / "vms"
    for name, seed in (("web01", 1), ("web03", 3)):
        (vms / name).mkdir(parents=True)
        make_disk(str(vms / name / f"{name}.raw"), 8 << 20, seed=seed)
        (vms / name / f"{name}.conf").write_text(f"name = {name}\n")
    (vms / "web03" / "tools.iso").write_bytes(b"iso" * 1000)
    images = root / "var" / "lib" / "libvirt" / "images"
    images.mkdir(parents=True)
    make_disk(str(root / "db.raw"), 4 << 20, seed=4)
    subprocess.run(
        [qemu_img, "convert", "-q", "-O", "qcow2", str(root / "db.raw"), str(images / "db.qcow2")], check=True
    )
    # web02's disk is an overlay on a template outside its folder
    templates = root / "srv" / "templates"
    templates.mkdir(parents=True)
    subprocess.run(
        [qemu_img, "convert", "-q", "-O", "qcow2", str(root / "db.raw"), str(templates / "base.qcow2")], check=True
    )
    (vms / "web02").mkdir()
    subprocess.run(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(templates / "base.qcow2"),
            str(vms / "web02" / "web02.qcow2"),
        ],
        check=True,
    )
    # a Hyper-V host folder with one VM, and a checkpoint chain in the current folder
    LabHost(str(root / "srv" / "hyperv")).create_vm("sql01", (4 << 20,))
    make_disk(str(root / "web01.img"), 4 << 20, seed=6)
    assert main(["disk", "convert", str(root / "web01.img"), str(root / "web01.vhdx"), "--to", "vhdx"]) == 0
    assert main(["disk", "checkpoint", str(root / "web01.vhdx"), "--name", "web01.avhdx"]) == 0
    for folder in ("mnt/backup", "root", "tmp", "etc"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "root" / "second.pass").write_text("another long passphrase\n")


def oldest_snapshot(repo: str) -> str | None:
    """The id prefix the README writes as 1a2b3c4d: the oldest snapshot's, looked up afresh
    (a retag gives a snapshot a new id)."""
    if not (Path(repo) / "config").exists():
        return None
    snaps = Repository.open(LocalBackend(repo), PASSWORD.encode()).list_snapshots()
    return snaps[0].id[:8] if snaps else None


def test_every_usage_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    world(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", PASSWORD)
    for name in ("VMVAULT_REPO", "VMVAULT_PASSWORD_FILE", "VMVAULT_KEY_FILE", "VMVAULT_PASSWORD_COMMAND"):
        monkeypatch.delenv(name, raising=False)
    lines = usage_lines()
    assert any(line.startswith("vmvault backup") for line in lines)  # the parse found the examples
    ran, skips = 0, []
    for line in lines:
        why = skipped(line)
        if why:
            skips.append(f"{line}: {why}")
            continue
        for command in line.split(" && "):
            words = [rooted(w, root) for w in shlex.split(command, comments=True)]
            if words[0] == "export":
                for assignment in words[1:]:
                    key, _, value = assignment.partition("=")
                    monkeypatch.setenv(key, rooted(value, root))
                continue
            assert words[0] == "vmvault", line
            argv = words[1:]
            redirect = None
            if ">" in argv:
                at = argv.index(">")
                argv, redirect = argv[:at], argv[at + 1]
            if "1a2b3c4d" in argv:
                oldest = oldest_snapshot(os.environ["VMVAULT_REPO"])
                assert oldest is not None, line
                argv = [oldest if w == "1a2b3c4d" else w for w in argv]
            try:
                if redirect is not None:
                    with open(redirect, "wb") as sink, _stdout_to(sink):
                        code = main(argv)
                else:
                    code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            expected, _why = EXPECTED.get(line, (0, ""))
            assert code == expected, f"{line!r} exited {code}"
            ran += 1
    assert ran >= 25, (ran, skips)
    # every skip is one of SKIPPED's prefixes (one may stand for several lines: files, instant-restore);
    # most examples must still run
    assert len(skips) < ran, skips


class _stdout_to:
    """``sys.stdout`` writing to a binary file for the duration (``vmvault dump ... > FILE``)."""

    def __init__(self, sink: object) -> None:
        import io
        import sys

        self.sys = sys
        self.sink = sink
        self.text = io.TextIOWrapper(sink, write_through=True)  # type: ignore[arg-type]

    def __enter__(self) -> None:
        self.saved = self.sys.stdout
        self.sys.stdout = self.text

    def __exit__(self, *exc: object) -> None:
        self.text.flush()
        self.text.detach()
        self.sys.stdout = self.saved

"""Instant recovery against a plain restore followed by a boot.

The bootable test guest (tests/guests.py: Debian's kernel, a busybox initramfs, SYSLINUX) is
grown to ``--size`` MiB with ``--data`` MiB of random data after its own 64 MiB (so there is
something to restore), backed up into a local repository, then brought back two ways:

* ``vmvault instant-restore latest --target T --accel tcg --memory 256``: the time until the
  export served the guest's first disk read (``serve.log``), until the VM runs (state file
  ``copying``), until the guest printed its marker on the serial console, and until the VM runs
  from local disks only (the command returns: phase ``done``);
* ``vmvault restore latest --target R`` then QEMU booting the restored disk (same machine,
  TCG, 256 MiB): the time until the restore ends (the first disk read can only follow it) and
  until the marker.

Usage: ``python bench/instant_restore.py [--size 2048] [--data 1024]``; prints a Markdown
section for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine

sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.guests import MARKER, guest  # noqa: E402

MiB = 1 << 20


def vmvault(*argv: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmvault", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, timeout: float = 600.0) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    raise SystemExit("timed out")


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2048, help="disk size in MiB")
    ap.add_argument("--data", type=int, default=1024, help="MiB of random data after the guest's 64 MiB")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="instant-", dir=args.work))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "VMVAULT_REPO": str(work / "repo"),
        "VMVAULT_PASSWORD": "bench passphrase",
    }
    try:
        disk = work / "vm.raw"
        shutil.copyfile(guest().disk, disk)
        rng = random.Random(1)
        with open(disk, "r+b") as f:
            f.truncate(args.size * MiB)
            f.seek(64 * MiB)
            for _ in range(args.data):
                f.write(rng.randbytes(MiB))
        for argv in (["init", "-q"], ["backup", str(disk), "-q"]):
            p = vmvault(*argv, env=env)
            _, err = p.communicate()
            assert p.returncode == 0, err

        # -- instant recovery
        target = work / "instant"
        state_file = target / "instant-restore.json"
        t0, wall0 = time.monotonic(), time.time()
        proc = vmvault("instant-restore", "latest", "--target", str(target), "--accel", "tcg", "--memory", "256",
                       env=env)  # fmt: skip
        running = wait_for(lambda: '"phase": "copying"' in text(state_file)) - t0
        marker = wait_for(lambda: MARKER in text(target / "serial.log")) - t0
        out, err = proc.communicate(timeout=1800)
        done = time.monotonic() - t0
        assert proc.returncode == 0, err
        m = re.search(r"first read served \(at ([0-9.]+)\)", text(target / "serve.log"))
        assert m, text(target / "serve.log")
        first_read = float(m.group(1)) - wall0
        state = json.loads(state_file.read_text())
        assert state["phase"] == "done"
        p = vmvault("instant-restore", "--abort", str(target), "--remove-disks", env=env)
        p.communicate()

        # -- plain restore, then a boot
        restored = work / "restored"
        t0 = time.monotonic()
        p = vmvault("restore", "latest", "--target", str(restored), "-q", env=env)
        _, err = p.communicate()
        assert p.returncode == 0, err
        restore_end = time.monotonic() - t0
        rdisk = next(restored.rglob("vm.raw"))
        serial = work / "plain-serial.log"
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none",
             "-serial", f"file:{serial}", "-drive", f"file={rdisk},format=raw,if=virtio"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            plain_marker = wait_for(lambda: MARKER in text(serial)) - t0
        finally:
            qemu.kill()
            qemu.wait()

        print("<!-- bench:instant-restore -->")
        print(f"Command: `python bench/instant_restore.py --size {args.size} --data {args.data}`\n")
        print(f"Machine: {machine()}\n")
        print(
            f"Disk: the test guest (tests/guests.py) grown to {args.size} MiB, with {args.data} MiB of random data "
            f"after its 64 MiB ({args.data + 64} MiB at most to copy); local repository, default chunk size; "
            "QEMU under TCG, 256 MiB; times from the command's start.\n"
        )
        print("| | first disk read served | VM running | guest booted (marker) | VM independent of the repository |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| `vmvault instant-restore` | {first_read:.1f} s | {running:.1f} s | {marker:.1f} s | {done:.1f} s |")
        print(
            f"| `vmvault restore` + boot | {restore_end:.1f} s (after the restore) | {restore_end:.1f} s "
            f"| {plain_marker:.1f} s | {restore_end:.1f} s |"
        )
        print("<!-- /bench:instant-restore -->")
        print(out.strip().splitlines()[-1] if out.strip() else "", file=sys.stderr)
    finally:
        for leftover in (work / "instant",):
            if (leftover / "instant-restore.json").exists():
                vmvault("instant-restore", "--abort", str(leftover), env=env).communicate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

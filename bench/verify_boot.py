"""How long a boot verification takes: the test guest (tests/guests.py) booted from a repository.

    python bench/verify_boot.py --runs 3 --write docs/benchmarks.md

Backs up the bootable guest of the test suite (64 MiB disk: SYSLINUX, Debian's kernel, a
busybox initramfs with qemu-guest-agent) and the same disk with its boot sector wiped into a
local repository, then runs ``verify_boot`` ``--runs`` times for each heartbeat and for the
wiped disk, and reports the whole verification's time (serving the disk included) and the
time from QEMU's start to the verdict, under the accelerator the machine allows (TCG here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _common import ROOT, machine

sys.path.insert(0, str(ROOT))
os.environ.setdefault("VMVAULT_TEST_CHEAP_KDF", "1")

from tests.guests import MARKER, guest

from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.verify_boot import VerifyBootOptions, verify_boot
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", help="write the result section into this markdown file")
    args = ap.parse_args()
    g = guest()
    work = Path(tempfile.mkdtemp(prefix="vmvault-bench-boot-"))
    try:
        for name in ("good", "wiped"):
            (work / name).mkdir()
            shutil.copyfile(g.disk, work / name / "guest.raw")
        with open(work / "wiped" / "guest.raw", "r+b") as f:
            f.write(bytes(512))
        repo = Repository.init(LocalBackend(str(work / "repo")), b"bench passphrase")
        snaps = {n: backup(repo, FilesSource(str(work / n))).snapshot for n in ("good", "wiped")}
        cases = [
            ("guest-ping (agent)", "good", VerifyBootOptions(timeout=600)),
            ("serial marker", "good", VerifyBootOptions(timeout=600, marker=MARKER, heartbeats=("marker",))),
            ("wiped boot sector (fails: no-bootable-disk)", "wiped", VerifyBootOptions(timeout=600)),
        ]
        rows = []
        accel = "?"
        for label, snap, options in cases:
            totals, boots = [], []
            for _ in range(args.runs):
                result = verify_boot(repo, snaps[snap], options)
                expected = snap == "good"
                if result.passed != expected:
                    raise SystemExit(f"{label}: unexpected result {result.reason}: {result.message}")
                totals.append(result.seconds)
                boots.append(result.boot_seconds)
                accel = result.accel.upper()
            rows.append(
                f"| {label} | {statistics.median(totals):.1f} | {min(totals):.1f}–{max(totals):.1f} "
                f"| {statistics.median(boots):.1f} |"
            )
        text = "\n".join(
            [
                f"Command: `python bench/verify_boot.py --runs {args.runs}`",
                "",
                f"Machine: {machine()}",
                "",
                f"Guest: the test suite's bootable guest (64 MiB raw disk, kernel {g.kernel}), {accel}, "
                f"1 GiB, SATA, no network, sandboxed; {args.runs} runs each.",
                "",
                "| verification | total (s), median | total, range | QEMU start to verdict (s), median |",
                "| --- | --- | --- | --- |",
                *rows,
            ]
        )
        print(text)
        if args.write:
            from compare import write_section

            write_section(Path(args.write), "verify-boot", text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

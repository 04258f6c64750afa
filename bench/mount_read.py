#!/usr/bin/env python3
"""Reading a disk through ``vmvault mount`` against restoring it.

Backs up the benchmark test image (``--size``, the developers' generator when it is there)
into a local repository, then, each from a cold start (a new process, an empty chunk cache):
restores the snapshot with ``vmvault restore``; mounts it with ``vmvault mount`` and reads
the disk sequentially in 1 MiB reads, through the page cache, then with ``O_DIRECT``, then with
plain reads from ``vmvault mount --direct-io`` (FUSE's ``direct_io``); reads
it again with four readers at once, each a quarter; copies it out with ``qemu-img convert``
(which skips holes through SEEK_DATA), through the page cache and with ``-T none`` (the source
read with ``O_DIRECT``). Beside each mount row: the CPU seconds (user + system) of the
``vmvault mount`` process, from ``/proc``.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import OUT, ROOT, machine, make_image, run, serving, timed_child

MiB = 1 << 20


def vmvault(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmvault", *args]


def mount(point: Path, env: dict[str, str], cache: str, *options: str) -> subprocess.Popen[bytes]:
    point.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        vmvault("mount", str(point), "--cache-size", cache, *options),
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not serving(point):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("vmvault mount did not come up")
        time.sleep(0.05)
    return proc


def unmount(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def read_range(path: Path, start: int, end: int, piece: int = MiB, *, direct: bool = False) -> bytes:
    """The SHA-256 of ``path``'s bytes from ``start`` to ``end``, read ``piece`` bytes a call
    (``direct``: with ``O_DIRECT``, into a page-aligned buffer)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buffer = mmap.mmap(-1, piece)
    try:
        pos = start
        while pos < end:
            n = os.preadv(fd, [buffer], pos)
            if not n:
                break
            n = min(n, end - pos)
            h.update(memoryview(buffer)[:n])
            pos += n
    finally:
        os.close(fd)
        buffer.close()
    return h.digest()


def cpu_seconds(pid: int) -> float:
    """User + system seconds of the process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G", help="size of the test image (default 2G)")
    ap.add_argument("--cache", default="64M", help="vmvault mount --cache-size (default 64M)")
    ap.add_argument("--write", help="write the result section into this markdown file")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mount-read-", dir=OUT))
    env = {
        "VMVAULT_REPO": str(work / "repo"),
        "VMVAULT_PASSWORD": "benchmark passphrase",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        image = OUT / f"test-{args.size}.raw"
        make_image(image, args.size)
        vm = work / "vm"
        vm.mkdir()
        os.link(image, vm / "disk.raw") if os.stat(image).st_dev == os.stat(vm).st_dev else shutil.copy(image, vm)
        size = image.stat().st_size
        allocated = image.stat().st_blocks * 512
        run(vmvault("init", "-q"), env=env)
        run(vmvault("backup", "-q", str(vm)), env=env)
        rows: list[tuple[str, float, float | None]] = []
        load_before = os.getloadavg()[0]

        restored = timed_child(vmvault("restore", "-q", "latest", "--target", str(work / "restored")), env=env)
        rows.append(("`vmvault restore` (written and synced)", restored.seconds, restored.cpu_s or None))
        shutil.rmtree(work / "restored")

        point = work / "mnt"
        whole = read_range(image, 0, size)

        def through_mount(what: str, read: Callable[[Path], bytes | None], *options: str) -> None:
            """Mount (with ``options``), time ``read`` of the mounted disk, note the mount's CPU,
            unmount, and compare what was read (its SHA-256, if it returns one) with the image."""
            proc = mount(point, env, args.cache, *options)
            disk = next((point / "by-vm").glob("*/latest")).resolve() / "disk.raw"
            started = time.monotonic()
            digest = read(disk)
            rows.append((what, time.monotonic() - started, cpu_seconds(proc.pid)))
            unmount(proc)
            assert digest in (None, whole), f"{what}: the mounted disk differs from the image"

        through_mount("mount: one sequential reader, 1 MiB reads", lambda disk: read_range(disk, 0, size))
        through_mount(
            "mount: one sequential reader, 1 MiB reads with `O_DIRECT`",
            lambda disk: read_range(disk, 0, size, direct=True),
        )
        through_mount(
            "`mount --direct-io`: one sequential reader, 1 MiB plain reads (as `cp` makes them)",
            lambda disk: read_range(disk, 0, size),
            "--direct-io",
        )

        def quarters(disk: Path) -> None:
            bounds = [(i * size // 4, (i + 1) * size // 4) for i in range(4)]
            threads = [threading.Thread(target=read_range, args=(disk, a, b)) for a, b in bounds]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        through_mount("mount: four readers at once, a quarter each", quarters)

        if shutil.which("qemu-img"):
            copy = work / "copy.raw"
            for cache, what in (
                ("writeback", "holes skipped, synced"),
                ("none", "the same, `-T none`: read with `O_DIRECT`"),
            ):

                def convert(disk: Path, cache: str = cache) -> None:
                    run(["qemu-img", "convert", "-T", cache, "-f", "raw", "-O", "raw", str(disk), str(copy)])
                    os.sync()

                through_mount(f"mount: `qemu-img convert` to a local raw file ({what})", convert)
                assert read_range(copy, 0, size) == whole, (
                    f"qemu-img convert -T {cache}: the copy differs from the image"
                )
                copy.unlink()

        text = "\n".join(
            [
                f"Command: `python bench/mount_read.py --size {args.size} --cache {args.cache}`",
                "",
                f"Machine: {machine()}; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
                "the end (other work on the machine: compare rows of one run, not runs)",
                "",
                f"Disk: the {args.size} test image ({allocated / MiB:.0f} MiB allocated) in a local repository "
                "(256 KiB chunks, default settings). Each row starts a new process with an empty chunk cache; "
                "MiB/s is over the disk's whole size (holes read as zeros without fetching anything).",
                "",
                "| operation | seconds | MiB/s | CPU (s): restore, or the mount process |",
                "| --- | --- | --- | --- |",
                *[
                    f"| {what} | {seconds:.1f} | {size / MiB / seconds:.0f} | {'' if cpu is None else f'{cpu:.1f}'} |"
                    for what, seconds, cpu in rows
                ],
            ]
        )
        print(text)
        if args.write:
            from compare import write_section

            write_section(Path(args.write), "mount-read", text)
    finally:
        for leftover in (work / "mnt",):
            if os.path.ismount(leftover):
                subprocess.run(["fusermount3", "-u", "-z", str(leftover)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

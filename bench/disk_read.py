"""Read throughput of vmvault's image readers against the raw file and ``qemu-img``.

    python bench/disk_read.py --size 4G --write docs/benchmarks.md

The 4 GiB test image is converted with ``qemu-img convert`` to a dynamic VHDX and to a
qcow2 (one at a time, deleted afterwards). Each image is then read the way a backup reads
it: ``vmvault.disk.open_image``, ``merged_extents()``, and ``read`` of every DATA extent in
4 MiB pieces from the backup's thread pool (2 workers). The same is done with the raw file,
and ``qemu-img convert -O raw`` of each image to ``/dev/null`` gives the reference reader.
The page cache is dropped before every timed read (as root).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import OUT, drop_caches, machine, make_image

from vmvault.disk import open_image
from vmvault.disk.base import ExtentKind

PIECE = 4 << 20
WORKERS = 2


def engine_read(path: Path) -> tuple[float, int]:
    """Seconds and bytes to read every DATA extent through vmvault's reader."""
    drop_caches()
    start = time.monotonic()
    image = open_image(str(path))
    try:
        pieces = [
            (off, min(PIECE, e.end - off))
            for e in image.merged_extents()
            if e.kind is ExtentKind.DATA
            for off in range(e.offset, e.end, PIECE)
        ]
        total = 0
        with ThreadPoolExecutor(WORKERS) as pool:
            for data in pool.map(lambda p: image.read(*p), pieces):
                total += len(data)
    finally:
        image.close()
    return time.monotonic() - start, total


def qemu_img_read(path: Path, fmt: str, size: int) -> float:
    """``qemu-img convert`` into QEMU's null block driver: qemu-img's reading alone, nothing written."""
    drop_caches()
    start = time.monotonic()
    target = f"driver=null-co,size={size}"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-n", "--target-image-opts", str(path), target], check=True)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per reader (the best is kept)")
    ap.add_argument("--scratch", default=str(OUT / "disk_read"))
    ap.add_argument("--write")
    args = ap.parse_args()
    base = OUT / f"vm-{args.size}.raw"
    make_image(base, args.size, seed=1)
    size = base.stat().st_size
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    raw_s, raw_bytes = min([engine_read(base) for _ in range(args.repeat)])
    raw_rate = raw_bytes / raw_s
    raw_qemu = min(qemu_img_read(base, "raw", size) for _ in range(args.repeat))
    rows.append(
        f"| raw | {raw_bytes / 2**20:,.0f} | {raw_s:.2f} | {raw_rate / 2**20:,.0f} | 100 % | {raw_qemu:.2f} "
        f"| {raw_qemu / raw_s:.2f}× |"
    )
    print(rows[-1], flush=True)
    for fmt, opts in (("vhdx", ["-o", "subformat=dynamic"]), ("qcow2", [])):
        image = scratch / f"vm-{args.size}.{fmt}"
        image.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(base), str(image)], check=True)
        try:
            secs, nbytes = min([engine_read(image) for _ in range(args.repeat)])
            qemu = min(qemu_img_read(image, fmt, size) for _ in range(args.repeat))
        finally:
            image.unlink(missing_ok=True)
        rate = nbytes / secs
        rows.append(
            f"| {fmt} | {nbytes / 2**20:,.0f} | {secs:.2f} | {rate / 2**20:,.0f} | {100 * rate / raw_rate:.0f} % "
            f"| {qemu:.2f} | {qemu / secs:.2f}× |"
        )
        print(rows[-1], flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(
        [
            f"Command: `python bench/disk_read.py --size {args.size} --repeat {args.repeat}`",
            "",
            f"Machine: {machine()}",
            "",
            f"Image: the {args.size} test image (raw), converted with `qemu-img convert` to a dynamic VHDX "
            "and to qcow2. vmvault reads every DATA extent of `merged_extents()` in 4 MiB pieces from 2 threads "
            "(as a backup does); `qemu-img` is `convert -n --target-image-opts IMAGE driver=null-co,size=N` "
            f"(reading only). Cold page cache before each run; best of {args.repeat}. Throughput is bytes read "
            "per second.",
            "",
            "| image | bytes read (MiB) | vmvault (s) | vmvault (MiB/s) | of raw throughput | qemu-img (s) "
            "| qemu-img time / vmvault time |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    print(text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "disk-read", text)


if __name__ == "__main__":
    main()

"""Hyper-V lab host: full backup, then incremental after ~1 % guest writes.

    python bench/hyperv_incremental.py --size 4G --write docs/benchmarks.md

A lab VM (``vmvault.testing.hyperv_lab``: Hyper-V's file operations done on real VHDX
files, change tracking at 64 KiB granularity) gets one dynamic VHDX of the test image's
size, filled with the test image's allocated data. vmvault backs it up the way it backs up
a Hyper-V VM (recovery checkpoint, read the frozen layer, convert to a reference point);
the guest then writes ~1 % of the disk in runs of 4–256 KiB, and the second backup reads
only the ranges change tracking reports. Both are timed to durability (a final ``sync``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

from _common import OUT, drop_caches, machine, make_image, mib

os.environ.setdefault("VMVAULT_TEST_CHEAP_KDF", "1")  # key derivation is not what is measured here

from vmvault.backends.local import LocalBackend
from vmvault.disk import open_image
from vmvault.disk.base import ExtentKind
from vmvault.engine.backup import BackupResult, backup
from vmvault.hypervisors import open_source
from vmvault.repo.repository import DEFAULT_CHUNK_SIZE, Repository
from vmvault.testing.hyperv_lab import LabHost

FILL_PIECE = 32 << 20
SLOT = "scsi0:0"


def fill(host: LabHost, name: str, image: Path) -> int:
    """Copy the image's allocated data into the VM's disk; returns bytes written."""
    written = 0
    with open_image(str(image)) as src:
        for e in src.merged_extents():
            if e.kind is not ExtentKind.DATA:
                continue
            for off in range(e.offset, e.end, FILL_PIECE):
                data = src.read(off, min(FILL_PIECE, e.end - off))
                host.write(name, SLOT, off, data)
                written += len(data)
    return written


def guest_writes(host: LabHost, name: str, size: int, percent: float, seed: int) -> tuple[int, int, int]:
    rng = random.Random(seed)
    target = int(size * percent / 100)
    written = count = 0
    chunks: set[int] = set()
    while written < target:
        length = rng.randrange(1, 65) * 4096
        offset = rng.randrange(0, (size - length) // 4096) * 4096
        host.write(name, SLOT, offset, rng.randbytes(length))
        chunks.update(range(offset // DEFAULT_CHUNK_SIZE, (offset + length - 1) // DEFAULT_CHUNK_SIZE + 1))
        written += length
        count += 1
    return written, count, len(chunks)


def timed_backup(repo: Repository, location: str) -> tuple[float, BackupResult]:
    drop_caches()
    start = time.monotonic()
    result = backup(repo, open_source(location))
    os.sync()
    return time.monotonic() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--scratch", default=str(OUT / "hyperv"))
    ap.add_argument("--write")
    args = ap.parse_args()
    base = OUT / f"vm-{args.size}.raw"
    make_image(base, args.size, seed=1)
    size = base.stat().st_size
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "lab").mkdir(parents=True)
    host = LabHost(str(scratch / "lab"))
    name = "benchvm"
    try:
        host.create_vm(name, (size,))
        filled = fill(host, name, base)
        vhdx = host.model(name).current[SLOT]
        allocated = os.stat(vhdx).st_blocks * 512
        repo = Repository.init(LocalBackend(str(scratch / "repo")), b"benchmark passphrase")
        location = f"hyperv-lab://{scratch / 'lab'}/{name}"
        full_s, full = timed_backup(repo, location)
        print(f"full: {full_s:.1f} s, read {mib(full.bytes_read)}", file=sys.stderr, flush=True)
        dirty, writes, chunks = guest_writes(host, name, size, args.percent, seed=2)
        incr_s, incr = timed_backup(repo, location)
        print(f"incremental: {incr_s:.1f} s, read {mib(incr.bytes_read)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    disk = incr.snapshot.disks[0]
    cs = DEFAULT_CHUNK_SIZE
    text = "\n".join(
        [
            f"Command: `python bench/hyperv_incremental.py --size {args.size} --percent {args.percent}`",
            "",
            f"Machine: {machine()}",
            "",
            f"VM: a Hyper-V lab VM (`hyperv_lab`, no Windows host) with one {size / 2**30:g} GiB dynamic VHDX "
            f"holding the test image's {mib(filled)} of data ({mib(allocated)} allocated in the file). The guest "
            f"then wrote {mib(dirty)} ({args.percent} %) of random data in {writes} writes of 4–256 KiB at random "
            f"offsets, touching {chunks} chunks of {cs >> 10} KiB ({mib(chunks * cs)}).",
            "",
            "| backup | time (s) | bytes read | new data stored |",
            "| --- | --- | --- | --- |",
            f"| full | {full_s:.1f} | {mib(full.bytes_read)} | {mib(full.bytes_new)} |",
            f"| incremental (change tracking) | {incr_s:.1f} | {mib(incr.bytes_read)} | {mib(incr.bytes_new)} |",
            "",
            f"Full / incremental time: {full_s / incr_s:.1f}× (target ≥ 10×). The incremental was "
            f"{'incremental' if disk.stats.get('incremental') else 'NOT incremental'} and read "
            f"{incr.bytes_read / max(1, dirty):.2f}× the bytes written, "
            f"{incr.bytes_read / max(1, chunks * cs):.2f}× the chunks those writes touched (vmvault reads whole "
            "chunks).",
        ]
    )
    print(text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "hyperv-incremental", text)


if __name__ == "__main__":
    main()

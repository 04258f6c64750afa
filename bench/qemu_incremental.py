"""Live backup of a running QEMU VM: full, then incremental after ~1 % guest writes.

    python bench/qemu_incremental.py --size 4G --write docs/benchmarks.md

QEMU runs under TCG with one virtio disk, a qcow2 made with ``qemu-img convert`` from the
test image (the VM helper of ``tests/hypervisors/qemu_vm.py``). vmvault backs it up live
(QMP + NBD export of a fleecing view; the first backup adds a dirty bitmap). The guest
then writes ~1 % of the disk in runs of 4–256 KiB, through the device (HMP ``qemu-io -d``),
and the second backup reads only what the bitmap says changed. Both are timed to
durability (a final ``sync``); bytes read are vmvault's own count.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import OUT, ROOT, drop_caches, machine, make_image, mib

sys.path.insert(0, str(ROOT))
os.environ.setdefault("VMVAULT_TEST_CHEAP_KDF", "1")  # key derivation is not what is measured here

from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import BackupResult, backup
from vmvault.hypervisors import open_source
from vmvault.repo.repository import DEFAULT_CHUNK_SIZE, Repository


def guest_writes(vm: object, device: str, size: int, percent: float, seed: int) -> tuple[int, int, int]:
    """Write ``percent`` of the disk in runs of 4-256 KiB; returns (bytes, writes, distinct chunks)."""
    rng = random.Random(seed)
    target = int(size * percent / 100)
    written = count = 0
    chunks: set[int] = set()
    while written < target:
        length = rng.randrange(1, 65) * 4096
        offset = rng.randrange(0, (size - length) // 4096) * 4096
        vm.write(device, offset, length, rng.randrange(1, 256))  # type: ignore[attr-defined]
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
    ap.add_argument("--scratch", default=str(OUT / "qemu"))
    ap.add_argument("--write")
    args = ap.parse_args()
    from tests.hypervisors.qemu_vm import DiskSpec, QemuVM

    base = OUT / f"vm-{args.size}.raw"
    make_image(base, args.size, seed=1)
    size = base.stat().st_size
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    vm = QemuVM(scratch, [DiskSpec("vda", "qcow2", size)], name="benchvm")
    disk = vm.paths["vda"]
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), disk], check=True)
    allocated = os.stat(disk).st_blocks * 512
    repo = Repository.init(LocalBackend(str(scratch / "repo")), b"benchmark passphrase")
    try:
        vm.start()
        full_s, full = timed_backup(repo, vm.location)
        print(f"full: {full_s:.1f} s, read {mib(full.bytes_read)}", file=sys.stderr, flush=True)
        dirty, writes, chunks = guest_writes(vm, "vda", size, args.percent, seed=2)
        incr_s, incr = timed_backup(repo, vm.location)
        print(f"incremental: {incr_s:.1f} s, read {mib(incr.bytes_read)}", file=sys.stderr, flush=True)
    finally:
        vm.quit()
        shutil.rmtree(scratch, ignore_errors=True)
    assert incr.snapshot.disks[0].stats["incremental"] == 1, "the second backup was not incremental"
    cs = DEFAULT_CHUNK_SIZE
    text = "\n".join(
        [
            f"Command: `python bench/qemu_incremental.py --size {args.size} --percent {args.percent}`",
            "",
            f"Machine: {machine()}",
            "",
            f"VM: QEMU {qemu_version()} under TCG, one virtio disk: a {size / 2**30:g} GiB qcow2 "
            f"({mib(allocated)} allocated) converted from the test image. The guest then wrote {mib(dirty)} "
            f"({args.percent} %) in {writes} writes of 4–256 KiB at random offsets, touching {chunks} chunks "
            f"of {cs >> 10} KiB ({mib(chunks * cs)}).",
            "",
            "| backup | time (s) | bytes read | new data stored |",
            "| --- | --- | --- | --- |",
            f"| full (live) | {full_s:.1f} | {mib(full.bytes_read)} | {mib(full.bytes_new)} |",
            f"| incremental (dirty bitmap) | {incr_s:.1f} | {mib(incr.bytes_read)} | {mib(incr.bytes_new)} |",
            "",
            f"Incremental / full time: {incr_s / full_s:.3f} (target ≤ 0.1). Bytes read by the incremental: "
            f"{incr.bytes_read / max(1, dirty):.2f}× the bytes the guest wrote, "
            f"{incr.bytes_read / max(1, chunks * cs):.2f}× the chunks those writes touched "
            "(vmvault reads whole chunks).",
            "",
            "virtnbdbackup (the libvirt-based tool) is not compared here: " + VIRTNBD_NOTE,
        ]
    )
    print(text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "qemu-incremental", text)


VIRTNBD_NOTE = (
    "it backs up only libvirt-managed domains, while this benchmark drives QEMU directly over QMP as "
    "vmvault's qemu+unix:// connector does; bench/libvirt_compare.py compares the two on libvirt domains "
    "(the libvirt-compare section)."
)


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return out.split("version", 1)[1].split()[0] if "version" in out else "?"


if __name__ == "__main__":
    main()

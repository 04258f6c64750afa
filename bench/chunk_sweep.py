"""Choose the chunk size by measurement.

    python bench/chunk_sweep.py --size 4G --write docs/benchmarks.md

For each chunk size: full backup time of the image, repository growth after the guest
changed ~1 % of it (backed up without change tracking, so dedup alone decides what is
new), the number of objects in the repository and of chunks in its index, and the size of
one snapshot's disk index.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from _common import OUT, count_files, drop_caches, du, machine, make_image, mib, mutate

os.environ.setdefault("VMVAULT_TEST_CHEAP_KDF", "1")  # key derivation is not what is measured here

from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository

SIZES = [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--scratch", default=str(OUT / "sweep"))
    ap.add_argument("--write")
    args = ap.parse_args()
    base = OUT / f"vm-{args.size}.raw"
    make_image(base, args.size, seed=1)
    changed = OUT / f"vm-{args.size}-changed.raw"
    if not changed.exists():
        subprocess.run(["cp", "--sparse=always", str(base), str(changed)], check=True)
        (OUT / f"vm-{args.size}-changed.bytes").write_text(str(mutate(changed, args.percent, seed=2)))
    changed_bytes = int((OUT / f"vm-{args.size}-changed.bytes").read_text())
    scratch = Path(args.scratch)
    rows = []
    for cs in SIZES:
        repo_dir = scratch / f"cs{cs >> 10}k"
        shutil.rmtree(repo_dir, ignore_errors=True)
        work = scratch / "src" / "disk.raw"
        work.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "--sparse=always", str(base), str(work)], check=True)
        repo = Repository.init(LocalBackend(str(repo_dir)), b"pw", chunk_size=cs)
        drop_caches()
        start = time.monotonic()
        first = backup(repo, FilesSource(str(work)))
        full_s = time.monotonic() - start
        size1 = du(repo_dir)
        work.unlink()
        subprocess.run(["cp", "--sparse=always", str(changed), str(work)], check=True)
        drop_caches()
        start = time.monotonic()
        backup(repo, FilesSource(str(work)))
        incr_s = time.monotonic() - start
        growth = du(repo_dir) - size1
        rows.append(
            f"| {cs >> 10} KiB | {full_s:.1f} | {incr_s:.1f} | {mib(growth)} | {growth / changed_bytes:.2f}× "
            f"| {count_files(repo_dir / 'data')} | {len(repo.index)} | {len(first.snapshot.disks[0].index)} |"
        )
        print(rows[-1], flush=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
    text = "\n".join(
        [
            f"Command: `python bench/chunk_sweep.py --size {args.size} --percent {args.percent}`",
            "",
            f"Machine: {machine()}",
            "",
            f"Image: {args.size} virtual, {mib(du(base))} allocated; the guest overwrote {mib(changed_bytes)} "
            f"({args.percent} %) in runs of 4–256 KiB.",
            "",
            "| chunk size | full backup (s) | backup after change (s) | growth | growth / changed | pack files "
            "| chunks in index | index blocks per snapshot |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    print(text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "chunk-sweep", text)


if __name__ == "__main__":
    main()

"""Where a restore's time goes: the restore against its parts, on the same disk, in one run.

    python bench/restore_limits.py --size 4G --write docs/benchmarks.md

A full backup of the test image into a repository beside it, then each step from a cold
page cache, the fastest of ``--runs``:

* restore: ``vmvault restore latest`` into an empty folder, what the user waits for;
* check: ``vmvault check --read-data``: every pack read, its SHA-256 and header checked, every
  blob decrypted, decompressed and re-hashed against its id, nothing written (more work per
  byte than a restore's reading, in another order; the nearest command without writes);
* start: ``vmvault snapshots``: starting, unlocking the key, one listing: what every command
  pays before its work;
* reads: the repository's packs read as a restore reads them (``O_DIRECT`` where the file
  system takes it, 8 MiB a read, 4 at once), nothing decrypted;
* writes: as many bytes as the restore wrote, written as it writes them (``O_DIRECT``, 8 MiB a
  write, one writer) into a new file, then fsync;
* reads and writes: both at once, the disk's share of a restore whose repository shares its
  disk (``docs/storage.md`` recommends other storage).

A restore can be no faster than the slowest of these, nor than its CPU time over the cores;
"restore / step" says how far above each one it stayed.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import OUT, drop_caches, du, fresh, machine, make_image, report, timed_child

PASSWORD = "benchmark passphrase"
#: a restore's reads and writes (repo/fetch.py DEFAULT_MAX_RANGE, disk/_direct.py STAGE_BYTES)
PIECE = 8 << 20
#: a restore's reads at once from a local repository (backends/base.py DEFAULT_READS_AT_ONCE)
READS_AT_ONCE = 4

_buffers = threading.local()


def _buffer() -> mmap.mmap:
    """This thread's page-aligned buffer of one piece (``O_DIRECT`` wants aligned memory)."""
    buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = mmap.mmap(-1, PIECE)
    return buffer


def _open_direct(path: Path, flags: int) -> int:
    """``path`` opened with ``O_DIRECT`` where the file system takes it, else without."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o600)


def read_files(paths: list[Path]) -> int:
    """Read every byte of ``paths`` in pieces, ``READS_AT_ONCE`` at a time; the bytes read."""

    def read(item: tuple[Path, int]) -> int:
        path, offset = item
        fd = _open_direct(path, os.O_RDONLY)
        try:
            return os.preadv(fd, [_buffer()], offset)
        finally:
            os.close(fd)

    pieces = [(p, offset) for p in paths for offset in range(0, p.stat().st_size, PIECE)]
    with ThreadPoolExecutor(READS_AT_ONCE) as pool:
        return sum(pool.map(read, pieces))


def write_file(path: Path, nbytes: int) -> int:
    """Write ``nbytes`` of incompressible data into the new file ``path`` in pieces, then fsync."""
    piece = _buffer()
    piece[:] = os.urandom(PIECE)
    fd = _open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        done = 0
        while done < nbytes:
            done += os.pwrite(fd, piece, done)  # whole pieces: O_DIRECT wants whole blocks
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return done


def timed_io(packs: list[Path], scratch: Path, nbytes: int, *, reads: bool, writes: bool) -> float:
    """Seconds until the reads of ``packs`` and/or the writes of ``nbytes`` are done, cold cache."""
    drop_caches()
    start = time.monotonic()
    reader = threading.Thread(target=read_files, args=(packs,), daemon=True) if reads else None
    if reader is not None:
        reader.start()
    if writes:
        write_file(scratch / "restore-limits-writes.tmp", nbytes)
    if reader is not None:
        reader.join()
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="size of the test image (bench/_common.py make_image)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per step (the fastest counts)")
    ap.add_argument("--scratch", default=str(OUT / "restore_limits"), help="work folder (emptied, then removed)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write", help="put the result into this markdown file")
    args = ap.parse_args()
    image = OUT / f"vm-{args.size}.raw"
    make_image(image, args.size, seed=1)
    scratch = fresh(Path(args.scratch))
    repo, target = scratch / "repo", scratch / "restored"
    env = {"VMVAULT_PASSWORD": PASSWORD}
    vmvault = [sys.executable, "-m", "vmvault", "-r", str(repo), "-q"]
    try:
        timed_child([*vmvault, "init"], env=env)
        timed_child([*vmvault, "backup", str(image)], env=env)
        packs = sorted(p for p in (repo / "data").rglob("*") if p.is_file())
        steps: dict[str, tuple[float, float]] = {}

        def best(name: str, cmd: list[str], *, empty_target: bool = False) -> None:
            runs = []
            for _ in range(args.runs):
                if empty_target:
                    shutil.rmtree(target, ignore_errors=True)
                drop_caches()
                r = timed_child(cmd, env=env)
                runs.append((r.seconds, r.cpu_s))
            steps[name] = min(runs)

        best("restore", [*vmvault, "restore", "latest", "--target", str(target)], empty_target=True)
        restored = du(target)
        shutil.rmtree(target, ignore_errors=True)
        best("check", [*vmvault, "check", "--read-data"])
        best("start", [*vmvault, "snapshots"])
        for name, reads, writes in (("reads", True, False), ("writes", False, True), ("reads and writes", True, True)):
            times = [timed_io(packs, scratch, restored, reads=reads, writes=writes) for _ in range(args.runs)]
            steps[name] = (min(times), 0.0)
        repo_bytes = du(repo)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cores = os.cpu_count() or 1
    restore_s, restore_cpu = steps["restore"]
    what = {
        "restore": "`vmvault restore latest --target EMPTY`",
        "check": "`vmvault check --read-data`: every pack read and hashed, every blob opened; nothing written",
        "start": "`vmvault snapshots`: start, unlock the key, one listing",
        "reads": f"the {len(packs)} pack files read, {PIECE >> 20} MiB a read, {READS_AT_ONCE} at once, O_DIRECT",
        "writes": f"{restored / 2**30:.2f} GiB written, {PIECE >> 20} MiB a write, O_DIRECT, then fsync",
        "reads and writes": "both at once",
    }
    rows = [
        f"| {name} | {what[name]} | {secs:.2f} | {f'{cpu:.2f}' if cpu else '-'} | {restore_s / secs:.2f}× |"
        for name, (secs, cpu) in steps.items()
    ]
    rows.append(
        f"| CPU floor | the restore's CPU time / {cores} cores | {restore_cpu / cores:.2f} | - "
        f"| {restore_s / (restore_cpu / cores):.2f}× |"
    )
    text = "\n".join(
        [
            f"Command: `python bench/restore_limits.py --size {args.size} --runs {args.runs}`",
            "",
            f"Machine: {machine()}",
            "",
            f"The {args.size} test image backed up once ({repo_bytes / 2**30:.2f} GiB of repository beside it on "
            f"the same disk), then each step from a cold page cache, the fastest of {args.runs} (module docstring "
            "of bench/restore_limits.py). Time includes a sync after each command.",
            "",
            "| step | what | time (s) | CPU (s) | restore / step |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    result = {"size": args.size, "runs": args.runs, "cores": cores, "restored_bytes": restored}
    result.update({name.replace(" ", "_"): {"s": s, "cpu_s": c} for name, (s, c) in steps.items()})
    report(result, text, as_json=args.json, write=args.write, section="restore-limits")


if __name__ == "__main__":
    main()

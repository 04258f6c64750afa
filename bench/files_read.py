"""What file-level browsing reads from the repository: a 4 GiB disk, NTFS and ext4.

    python bench/files_read.py --data 256 --write docs/benchmarks.md

Builds (with the test suite's image builders, Debian tools, no mounts) a 4 GiB raw disk with a
GPT: a 2 GiB NTFS and a 2 GiB ext4 partition, each holding ``--data`` MiB of random files in
16 folders. Backs it up into a local repository (256 KiB chunks, the default), then, each on a
cold cache, lists one folder of each filesystem, searches both for a name and restores one
folder from each, and reports the chunk bytes fetched (decrypted and verified) from the
repository against the disk's size, and the time (the filesystem library runs in its worker
process, as for a user).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import OUT, ROOT, machine

sys.path.insert(0, str(ROOT))

from tests.fsimages import MiB, Part, ext_image, ntfs_image, partitioned_disk

from vmvault.backends.local import LocalBackend
from vmvault.engine.backup import backup
from vmvault.engine.file_restore import restore_files
from vmvault.engine.files import Location, SnapshotFiles
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository

NTFS_TYPE = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"


def populate(root: Path, megabytes: int, seed: int) -> None:
    rng = random.Random(seed)
    for d in range(16):
        folder = root / f"folder{d:02d}"
        folder.mkdir(parents=True)
        for f in range(max(1, megabytes // 16)):
            (folder / f"file{f:03d}.bin").write_bytes(rng.randbytes(MiB))
        for f in range(6):
            (folder / f"small{f:03d}.txt").write_text(f"note {d} {f}\n" * 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=int, default=256, help="MiB of files in each filesystem")
    ap.add_argument("--write", help="write the result section into this markdown file")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="files-read-", dir=OUT))
    try:
        for name, seed in (("ntfs", 1), ("ext4", 2)):
            populate(work / f"src-{name}", args.data, seed)
        half = 2048 * MiB - 2 * MiB
        ntfs = ntfs_image(work / "ntfs.img", work / "src-ntfs", half)
        ext4 = ext_image(work / "ext4.img", work / "src-ext4", half)
        vm = work / "vm"
        vm.mkdir()
        partitioned_disk(vm / "big.raw", 4096 * MiB, "gpt", [Part(ntfs, NTFS_TYPE), Part(ext4, "linux")])
        for path in (ntfs, ext4):
            path.unlink()
        os.environ.setdefault("VMVAULT_TEST_CHEAP_KDF", "1")
        repo = Repository.init(LocalBackend(str(work / "repo")), b"benchmark passphrase")
        snap = backup(repo, FilesSource(str(vm))).snapshot
        size = snap.disks[0].size
        stored = sum(snap.disks[0].stats.get(k, 0) for k in ("bytes_read",))
        rows = []
        entries = max(1, args.data // 16) + 6
        for what, action in (
            (f"list /folder07 (NTFS, {entries} entries)", lambda f: f.ls(Location("big.raw", 1, "/folder07"))),
            (f"list /folder07 (ext4, {entries} entries)", lambda f: f.ls(Location("big.raw", 2, "/folder07"))),
            ("find small003.txt (both filesystems, every folder)", lambda f: list(f.find("small003.txt"))),
        ):
            with SnapshotFiles(repo, snap) as files:
                started = time.monotonic()
                action(files)
                seconds = time.monotonic() - started
                fetched = files.bytes_fetched
                chunks = files.cache.stats.fetched_chunks
            rows.append(
                f"| {what} | {fetched / MiB:.2f} MiB | {chunks} | {100 * fetched / size:.3f} % | {seconds:.2f} |"
            )
        folder_bytes = max(1, args.data // 16) * MiB
        for part, kind in ((1, "NTFS"), (2, "ext4")):
            target = work / f"restored-{kind}"
            with SnapshotFiles(repo, snap) as files:
                started = time.monotonic()
                restore_files(files, [Location("big.raw", part, "/folder07")], str(target))
                seconds = time.monotonic() - started
                fetched = files.bytes_fetched
                chunks = files.cache.stats.fetched_chunks
            rate = folder_bytes / MiB / seconds
            rows.append(
                f"| restore /folder07 ({kind}, {folder_bytes // MiB} MiB of files; {rate:.0f} MiB/s) "
                f"| {fetched / MiB:.2f} MiB | {chunks} | {100 * fetched / size:.3f} % | {seconds:.2f} |"
            )
            shutil.rmtree(target)
        text = "\n".join(
            [
                f"Command: `python bench/files_read.py --data {args.data}`",
                "",
                f"Machine: {machine()}",
                "",
                f"Disk: 4 GiB raw, GPT: 2 GiB NTFS + 2 GiB ext4, {args.data} MiB of files in each "
                f"({stored / MiB:.0f} MiB read by the backup); 256 KiB chunks; each row starts with an "
                "empty cache.",
                "",
                "| operation | chunk bytes fetched | chunks | share of the disk | seconds |",
                "| --- | --- | --- | --- | --- |",
                *rows,
            ]
        )
        print(text)
        if args.write:
            from compare import write_section

            write_section(Path(args.write), "files-read", text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""How vmvault's commands scale with the size of the repository's index.

    python bench/scale.py --chunks N [--json] [--work DIR] [--disk-size 4G] [--keep] [--base DIR]
                          [--ops backup,backup_changed,...] [--repeat K]

Builds a repository whose index holds N chunks besides a real 4 GiB disk, then measures,
each command in a process of its own (wall time, its own peak RSS): ``open`` (open the
repository, bring this host's index cache up to date, read the first chunk of the newest
snapshot), ``backup`` (the 4 GiB disk), ``backup_changed`` (again after a 1 % change),
``restore``, ``snapshots``, ``check``, ``prune`` (after forgetting the first backup) and
``repair`` (``repair index``: every index file read, every pack's size compared with it, the
index written again as one set of new files superseding the old ones), ``repair_snapshots``
(``repair snapshots``: every snapshot and index block read, every chunk looked up; nothing is
damaged, so nothing is written), and
the commands that read one snapshot: ``show`` (of the newest backup of the 4 GiB disk), ``copy``
(that backup into a new, empty local repository; the measured process is the copy), ``files``
(``files ls`` of a folder, then ``files restore`` of a 64 MiB file from it, compared with its
source: two processes, the op's time and CPU their sums, its peak RSS the larger; each is that
command's process or its filesystem worker, whichever peaked higher) and ``mount`` (``vmvault
mount`` of the whole repository through the real FUSE device; the 4 GiB disk of that backup read
whole through the mount in 1 MiB reads and compared with its source, then ``fusermount3 -u``,
which ends the command; its peak RSS is that process's).
With ``--json`` the last line is one JSON object:
``{"chunks": N, "ops": {"backup": {"seconds": ..., "peak_rss_mib": ..., "cpu_seconds": ...}, ...},
"setup": {...}}`` (with ``--repeat K``, ``ops`` holds the means and ``runs`` each run's figures;
each figure comes with the 1-minute load average at the command's end). CPU seconds (user +
system, from wait4) are given beside the wall time: on a machine shared with other work the
wall time is not the command's alone.

What is synthetic, and what is not:

* The N chunks are not stored. Their ids are random; they are listed in real, encrypted
  index files (version 2, 131,072 chunks each, about 6 MiB: the size prune folds small
  files into, so prune leaves them alone as it would after earlier prunes) in packs of 64
  chunks of 160,000 sealed bytes (256 KiB chunks, 16 MiB packs). Each pack is a sparse file
  of its recorded length: listing, sizes and presence checks see a real pack, but its bytes
  are zeros, so ``check --read-data`` would fail on them (it is not measured).
* Snapshots name every synthetic chunk: one per 4 M chunks (a 1 TiB disk), through real,
  encrypted index blocks in real packs (128 KiB of ids per 4,096 chunks). So check and
  prune read and account for every chunk, as at that size for real.
* The 4 GiB disk, its backups, the restore and the pruned data are real. So is the disk that
  ``files`` reads: make_vm_disk.py's disk holds no filesystem, so, when ``files`` is measured, a
  raw disk of 160 MiB with an ext4 filesystem (``mke2fs -d``, as the tests build theirs: one
  folder of a 64 MiB file, 15 files of 1 MiB and 16 small ones, random bytes) is backed up too,
  unmeasured, after the 4 GiB disk's backups.
* The synthetic index files are stored without going through this host's index cache (added
  to a growing cache one by one, they cost 89 GB of database writes before 10 M chunks); the
  cache the commands use is then built from scratch by one sync: ``setup.cache_rebuild``,
  the time a host that has never seen the repository needs, not part of any command.

With ``--base DIR`` the synthetic repository and its cache, once built, are kept in DIR, and a
later run with the same ``--chunks`` and ``--work`` starts from a copy of them (the build of
4 M chunks takes minutes; 40 M, about 20). ``--ops`` measures only the commands named;
``--repeat K`` runs them K times, each time from a fresh copy of the built state (with
``--base``; else built again) and of the pristine disk image, so every full backup is one of
new data into the same repository. The copy's objects are hard links, whose new ctimes a local
listing reports as changed objects: one sync, not part of any command, reads the index files
again (``setup.resync_seconds``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from _common import OUT, fresh, machine, make_image, mutate, serving

PASSWORD = "benchmark passphrase"
CHUNK = 256 << 10
PER_PACK = 64
SEALED = 160_000
#: chunks per synthetic index file (131,072 x 45 bytes: about 6 MiB, above prune's 4 MiB fold)
PER_FILE = 2048 * PER_PACK
#: chunks per synthetic snapshot (a 1 TiB disk)
PER_SNAPSHOT = 4 << 20


def _env(work: Path) -> dict[str, str]:
    return {
        "VMVAULT_PASSWORD": PASSWORD,
        "VMVAULT_CACHE_DIR": str(work / "cache"),
        "VMVAULT_STATE_DIR": str(work / "state"),
        "VMVAULT_TEST_CHEAP_KDF": "",
    }


def timed(
    cmd: list[str], env: dict[str, str], during: Callable[[subprocess.Popen[bytes]], None] | None = None
) -> tuple[float, float, float, str]:
    """Run ``cmd``: (wall seconds, CPU seconds, peak RSS in MiB, stdout); CPU from wait4 (the
    command and the small helper that starts it), peak RSS the command's own. CPU time is
    given because the wall time of a machine shared with other work is not the command's alone.
    ``during``, when given, is called with the helper's process once the command started and
    must make it end (``mount``: read through it, then unmount); if it fails, the command is
    stopped and the failure raised."""
    # through bench/_rss.py, a small process that forks the command and reports its peak RSS:
    # exec folds the old address space's peak into the new program's, so a command started
    # from this (large) process directly counted this one's RSS as its own (a floor of ~100 MiB)
    helper = [sys.executable, str(Path(__file__).with_name("_rss.py")), *cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(helper, env={**os.environ, **env}, stdout=out, stderr=err)
        if during is not None:
            try:
                during(proc)
            except BaseException:
                _stop(proc)
                raise
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
        last = stderr.strip().splitlines()[-1:] or [""]
        if not last[0].startswith("max_rss_mib"):
            raise SystemExit(f"{' '.join(cmd)}: no peak RSS reported by bench/_rss.py")
        return seconds, usage.ru_utime + usage.ru_stime, float(last[0].split()[-1]), out.read().decode()


def _stop(helper: subprocess.Popen[bytes]) -> None:
    """End a command started through bench/_rss.py: SIGTERM to the command (the helper's
    children), then the helper reaped."""
    try:
        children = Path(f"/proc/{helper.pid}/task/{helper.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    try:
        helper.wait(60)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()


def _cli(repo: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmvault", "-r", str(repo), "-q", *args]


# ---- the synthetic part (run in a child: python scale.py --build-synthetic ...) ---------------


def build_synthetic(repo_path: Path, chunks: int) -> None:
    from vmvault.backends.local import LocalBackend
    from vmvault.repo.crypto import seal_envelope
    from vmvault.repo.format import INDEX_SPAN, BlobType, IndexBlockBuilder
    from vmvault.repo.index import IndexFile
    from vmvault.repo.pack import BlobEntry, expected_pack_size, pack_name
    from vmvault.repo.repository import Repository
    from vmvault.repo.snapshot import DiskRecord, Snapshot

    repo = Repository.open(LocalBackend(str(repo_path)), PASSWORD.encode())

    def store_index_file(index_file: IndexFile) -> None:
        # sealed and named as Repository.write_index_file does, but not added to this host's
        # cache: the cache is deleted after the build and built again from the stored files
        payload = index_file.encode()
        name = f"index/{hashlib.sha256(payload).hexdigest()}"
        repo.backend.put(name, seal_envelope(repo.key, payload, name.encode()))

    packs_done = 0
    snap_no = 0
    pending: list[bytes] = []  # chunk ids of the snapshot being built
    current = IndexFile(version=2)
    in_file = 0

    def flush_snapshot() -> None:
        nonlocal pending, snap_no
        if not pending:
            return
        writer = repo.writer(upload_threads=2)
        index: list[str | None] = []
        try:
            for b in range(0, len(pending), INDEX_SPAN):
                refs = pending[b : b + INDEX_SPAN]
                builder = IndexBlockBuilder(len(refs))
                builder.set(0, refs)
                index.append(writer.add_index_block(builder.build()))
        finally:
            writer.close()
        disk = DiskRecord(
            name="synthetic.raw",
            format="raw",
            size=len(pending) * CHUNK,
            chunk_size=CHUNK,
            index_span=INDEX_SPAN,
            index=index,
        )
        repo.save_snapshot(
            Snapshot(
                time=f"2026-01-01T00:00:{snap_no:02d}.000000+00:00",
                hostname="synthetic",
                username="bench",
                source={"kind": "files", "location": f"synthetic-{snap_no}"},
                tags=["synthetic"],
                disks=[disk],
            )
        )
        snap_no += 1
        pending = []

    left = chunks
    with repo.lock(exclusive=False, operation="backup"):
        while left:
            n = min(PER_PACK, left)
            ids = os.urandom(32 * n)
            entries = [BlobEntry(BlobType.DATA, ids[i * 32 : i * 32 + 32], i * SEALED, SEALED, CHUNK) for i in range(n)]
            pack_id = os.urandom(32)
            path = repo_path / pack_name(pack_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            # the length the writer gives a pack of these entries (the sealed header's size
            # depends on how zstd takes it): repair index compares a pack's size with it
            length = expected_pack_size(entries)
            with open(path, "wb") as f:
                f.truncate(length)
            current.packs[pack_id] = entries
            current.lengths[pack_id] = length
            in_file += n
            pending.extend(e.id for e in entries)
            left -= n
            packs_done += 1
            if in_file >= PER_FILE or not left:
                store_index_file(current)
                current, in_file = IndexFile(version=2), 0
            if len(pending) >= PER_SNAPSHOT:
                flush_snapshot()
        flush_snapshot()
    repo.close()


def open_and_read_first(repo_path: Path, *, read: bool = True) -> None:
    """What every reading command does first: open, sync the cache, read a chunk."""
    from vmvault.backends.local import LocalBackend
    from vmvault.repo.format import BlobType, is_chunk
    from vmvault.repo.repository import Repository

    started = time.monotonic()
    repo = Repository.open(LocalBackend(str(repo_path)), PASSWORD.encode())
    repo.load_index()
    if not read:
        print(json.dumps({"sync_seconds": time.monotonic() - started}))
        repo.close()
        return
    snaps = [repo.load_snapshot(s) for s in repo.snapshot_ids()]
    newest = max((s for s in snaps if "synthetic" not in s.tags), key=lambda s: s.time)
    disk = newest.disks[0]
    block_id = next(b for b in disk.index if b is not None)
    block = repo.read_index_block(block_id)
    chunk = next(c for c in block.chunk_ids() if is_chunk(c))
    data = repo.get_blob(BlobType.DATA, chunk)
    print(json.dumps({"first_chunk_seconds": time.monotonic() - started, "bytes": len(data)}))
    repo.close()


# ---- the measured run ---------------------------------------------------------------------------


def _build(chunks: int, work: Path, env: dict[str, str]) -> dict[str, float]:
    """Init the repository, write the synthetic part, build this host's cache from nothing."""
    repo = work / "repo"
    setup: dict[str, float] = {}
    timed(_cli(repo, "init"), env)
    t = time.monotonic()
    timed([sys.executable, __file__, "--build-synthetic", str(repo), "--chunks", str(chunks)], env)
    setup["synthetic_build_seconds"] = time.monotonic() - t
    shutil.rmtree(work / "cache", ignore_errors=True)
    wall, cpu, rss, _ = timed([sys.executable, __file__, "--sync", str(repo)], env)
    setup["cache_rebuild_seconds"] = wall
    setup["cache_rebuild_cpu_seconds"] = cpu
    setup["cache_rebuild_peak_rss_mib"] = rss
    return setup


def _copy_base(src: Path, dst: Path) -> None:
    """Copy a built repository and its host's cache and state. The repository's objects are
    never changed in place (written under a temporary name, renamed, deleted), so hard links
    share them; the cache's database is changed in place and is copied."""
    subprocess.run(["cp", "-al", str(src / "repo"), str(dst / "repo")], check=True)
    for folder in ("cache", "state"):
        if (src / folder).exists():
            subprocess.run(["cp", "-a", "--sparse=always", str(src / folder), str(dst / folder)], check=True)


#: every command measured, in the order they run
OPS = (
    "backup",
    "backup_changed",
    "open",
    "snapshots",
    "show",
    "copy",
    "files",
    "mount",
    "restore",
    "check",
    "prune",
    "repair",
    "repair_snapshots",
)
#: the commands that need the first (full) backup of the real disk: it runs before them, measured
#: only when chosen
_NEED_BACKUP = frozenset(
    {"backup_changed", "open", "show", "copy", "mount", "restore", "prune", "repair", "repair_snapshots"}
)
#: the disk with a filesystem that ``files`` reads (see the docstring), and the file it restores
FS_DISK = "fs-disk.raw"
FS_FOLDER = "data"
FS_FILE = "big.bin"
MiB = 1 << 20


def make_fs_disk(path: Path, seed: int = 21) -> Path:
    """A raw disk of 160 MiB holding one ext4 filesystem (no partition table) built with
    ``mke2fs -d`` from a folder of random files: /data/big.bin (64 MiB), 15 files of 1 MiB and 16
    small text files. Returns the source of big.bin, to compare the restored file with."""
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin")
    if mke2fs is None:
        raise SystemExit("files needs mke2fs (Debian: e2fsprogs) to build its disk")
    src = fresh(path.parent / "fs-src")
    folder = src / FS_FOLDER
    folder.mkdir()
    rng = random.Random(seed)
    (folder / FS_FILE).write_bytes(rng.randbytes(64 * MiB))
    for i in range(15):
        (folder / f"file{i:02d}.bin").write_bytes(rng.randbytes(MiB))
    for i in range(16):
        (folder / f"note{i:02d}.txt").write_text(f"note {i}\n" * 50)
    path.unlink(missing_ok=True)
    # the same options as the tests' ext images (tests/fsimages.py): files owned by root
    subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-d", str(src), "-L", "guest", "-E", "root_owner=0:0", str(path), "160M"],
        check=True,
        capture_output=True,
    )
    return folder / FS_FILE


def _sha256_file(path: Path, piece: int = MiB) -> str:
    """The digest of a file read in ``piece``-byte preads, in order (through a mount: as a
    sequential reader)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while data := os.pread(fd, piece, pos):
            h.update(data)
            pos += len(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def parse_ops(text: str) -> tuple[str, ...]:
    """``--ops``: command names separated by commas, in any order (they run in ``OPS`` order);
    empty for none (only the build)."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(OPS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown commands {', '.join(sorted(unknown))}; known: {', '.join(OPS)}")
    return tuple(n for n in OPS if n in names)


def _prepare(chunks: int, work: Path, env: dict[str, str], base: Path | None) -> dict[str, float]:
    """The repository of ``chunks`` synthetic chunks and this host's cache in ``work``: a copy
    of ``base`` when it holds one, else built (and kept in ``base`` when given)."""
    setup: dict[str, float] = {}
    for name in ("repo", "cache", "state", "restore", "copy-target", "files-restore"):
        shutil.rmtree(work / name, ignore_errors=True)
    if base is not None and (base / f"built-{chunks}").exists():
        _copy_base(base, work)
        # a link changes each object's ctime, part of its stamp in a local listing: one sync
        # takes the new stamps (reading every index file again, keeping its rows)
        setup["resync_seconds"] = timed([sys.executable, __file__, "--sync", str(work / "repo")], env)[0]
    else:
        setup.update(_build(chunks, work, env))
        if base is not None:
            fresh(base)
            _copy_base(work, base)
            (base / f"built-{chunks}").write_text(json.dumps(setup))
    cache_bytes = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file())
    setup["cache_mib"] = cache_bytes / 2**20
    return setup


def _run_ops(
    work: Path, env: dict[str, str], ops: tuple[str, ...], pristine: Path, fs_disk: Path | None = None
) -> dict[str, dict[str, float]]:
    """One run of ``ops`` (and of the first backup when they need it) on the prepared ``work``;
    ``fs_disk``, the disk with a filesystem that ``files`` reads (backed up here, unmeasured)."""
    repo = work / "repo"
    src = work / "src" / "vm-disk.raw"
    target = work / "restore"
    results: dict[str, dict[str, float]] = {}

    def record(name: str, wall: float, cpu: float, rss: float) -> None:
        load = os.getloadavg()[0]
        if name in ops:
            results[name] = {
                "seconds": round(wall, 2),
                "peak_rss_mib": round(rss, 1),
                "cpu_seconds": round(cpu, 2),
                "load": round(load, 2),
            }
        measured = "" if name in ops else " (not measured)"
        print(
            f"  {name}: {wall:.1f} s ({cpu:.1f} s CPU), {rss:.1f} MiB, load {load:.1f}{measured}",
            file=sys.stderr,
            flush=True,
        )

    def op(name: str, cmd: list[str]) -> str:
        wall, cpu, rss, out = timed(cmd, env)
        record(name, wall, cpu, rss)
        return out

    def newest_backup() -> str:
        """The id of the newest backup of the 4 GiB disk."""
        mine = [s for s in _real_snapshots(repo, env) if _location(s) == str(src)]
        if not mine:
            raise SystemExit(f"no backup of {src} in the repository")
        return str(mine[-1]["id"])

    real_backup = bool(set(ops) & (_NEED_BACKUP | {"backup"}))
    if real_backup:
        shutil.rmtree(src.parent, ignore_errors=True)
        src.parent.mkdir(parents=True)
        # the pristine image is copied (sparse): the 1 % change is made to the copy
        subprocess.run(["cp", "--sparse=always", str(pristine), str(src)], check=True)
        op("backup", _cli(repo, "backup", str(src)))
    if "backup_changed" in ops:
        mutate(src, 1.0, seed=12)
        op("backup_changed", _cli(repo, "backup", str(src)))
    if "open" in ops:
        out = op("open", [sys.executable, __file__, "--open", str(repo)])
        first = json.loads(out.strip().splitlines()[-1])["first_chunk_seconds"]
        results["open"]["first_chunk_seconds"] = round(first, 2)
    if "snapshots" in ops:
        op("snapshots", _cli(repo, "snapshots"))
    if "show" in ops:
        snap = newest_backup()
        if snap[:8] not in op("show", _cli(repo, "show", snap)):
            raise SystemExit(f"show {snap} did not name the snapshot")
    if "copy" in ops:
        _copy(work, env, newest_backup(), record)
    if "files" in ops:
        if fs_disk is None:
            raise SystemExit("files needs the disk with a filesystem")
        figures = _files(work, env, fs_disk, record)
        results["files"].update(figures)
    if "mount" in ops:
        results["mount"]["read_seconds"] = round(_mount(work, env, newest_backup(), src, record), 2)
    if "restore" in ops:
        fresh(target)
        # by id: after ``files``, the newest snapshot is the disk with a filesystem's
        op("restore", _cli(repo, "restore", newest_backup(), "--target", str(target)))
        restored = next(p for p in target.rglob("vm-disk.raw"))
        if subprocess.run(["cmp", "-s", str(restored), str(src)]).returncode != 0:
            raise SystemExit("the restored disk differs from the source")
        shutil.rmtree(target)
    if "check" in ops:
        op("check", _cli(repo, "check"))
    if "prune" in ops:
        real = _real_snapshots(repo, env)
        subprocess.run(
            _cli(repo, "forget", str(real[0]["id"])), env={**os.environ, **env}, check=True, capture_output=True
        )
        op("prune", _cli(repo, "prune"))
    if "repair" in ops:
        op("repair", _cli(repo, "repair", "index"))
    if "repair_snapshots" in ops:
        op("repair_snapshots", _cli(repo, "repair", "snapshots"))
    return results


def _real_snapshots(repo: Path, env: dict[str, str]) -> list[dict[str, object]]:
    """The repository's snapshots that are not synthetic, oldest first."""
    listing = json.loads(
        subprocess.run(
            _cli(repo, "snapshots", "--json"), env={**os.environ, **env}, capture_output=True, text=True, check=True
        ).stdout
    )
    real = [s for s in _snapshot_list(listing) if "synthetic" not in _tags(s)]
    return sorted(real, key=lambda s: str(s["time"]))


def _tags(snapshot: dict[str, object]) -> list[object]:
    tags = snapshot.get("tags")
    return tags if isinstance(tags, list) else []


def _location(snapshot: dict[str, object]) -> str:
    source = snapshot.get("source")
    return str(source.get("location", "")) if isinstance(source, dict) else ""


#: what an op reports: (name, wall seconds, CPU seconds, peak RSS in MiB)
Record = Callable[[str, float, float, float], None]


def _copy(work: Path, env: dict[str, str], snap: str, record: Record) -> None:
    """``copy``: the snapshot ``snap`` into a new, empty local repository (made unmeasured);
    the target must then hold one snapshot of the same size."""
    into = work / "copy-target"
    shutil.rmtree(into, ignore_errors=True)
    timed(_cli(into, "init"), env)
    copy_env = {**env, "VMVAULT_FROM_PASSWORD": PASSWORD}
    wall, cpu, rss, _ = timed(_cli(into, "copy", "--from", str(work / "repo"), "--snapshot", snap), copy_env)
    record("copy", wall, cpu, rss)
    copied = _real_snapshots(into, env)
    source = [s for s in _real_snapshots(work / "repo", env) if s["id"] == snap]
    if len(copied) != 1 or not source or copied[0].get("size") != source[0].get("size"):
        raise SystemExit(f"the copy of {snap} is not the one snapshot of the target")
    shutil.rmtree(into)


def _files(work: Path, env: dict[str, str], fs_disk: Path, record: Record) -> dict[str, float]:
    """``files``: the disk with a filesystem backed up (unmeasured), then ``files ls`` of its
    folder and ``files restore`` of its 64 MiB file, compared with the file's source. Returns
    each command's own figures (the op's are their sums and the larger peak)."""
    repo = work / "repo"
    timed(_cli(repo, "backup", str(fs_disk)), env)
    print("  files: the disk with a filesystem backed up (not measured)", file=sys.stderr, flush=True)
    snap = next((s for s in reversed(_real_snapshots(repo, env)) if _location(s) == str(fs_disk)), None)
    if snap is None:
        raise SystemExit(f"no backup of {fs_disk} in the repository")
    snap_id = str(snap["id"])
    ls_wall, ls_cpu, ls_rss, listing = timed(_cli(repo, "files", "ls", snap_id, f"{FS_DISK}:/{FS_FOLDER}"), env)
    if FS_FILE not in listing:
        raise SystemExit(f"files ls did not list {FS_FILE}:\n{listing[:2000]}")
    into = fresh(work / "files-restore")
    where = f"{FS_DISK}:/{FS_FOLDER}/{FS_FILE}"
    r_wall, r_cpu, r_rss, _ = timed(_cli(repo, "files", "restore", snap_id, where, "--target", str(into)), env)
    restored = list(into.rglob(FS_FILE))
    source = fs_disk.parent / "fs-src" / FS_FOLDER / FS_FILE
    if len(restored) != 1 or _sha256_file(restored[0]) != _sha256_file(source):
        raise SystemExit(f"files restore of {where} did not give back the file")
    shutil.rmtree(into)
    record("files", ls_wall + r_wall, ls_cpu + r_cpu, max(ls_rss, r_rss))
    return {
        "ls_seconds": round(ls_wall, 2),
        "ls_peak_rss_mib": round(ls_rss, 1),
        "restore_seconds": round(r_wall, 2),
        "restore_peak_rss_mib": round(r_rss, 1),
    }


def _mount(work: Path, env: dict[str, str], snap: str, src: Path, record: Record) -> float:
    """``mount``: ``vmvault mount`` of the whole repository (every snapshot, as a user mounts
    it); once it serves, the 4 GiB disk of ``snap`` is read whole through it (1 MiB reads, one
    reader) and compared with ``src``, then ``fusermount3 -u`` ends the command. Returns the
    seconds of the read alone."""
    point = fresh(work / "mnt")
    expected = _sha256_file(src)
    read_seconds = 0.0

    def read_through(helper: subprocess.Popen[bytes]) -> None:
        nonlocal read_seconds
        deadline = time.monotonic() + 300
        while not serving(point):
            if helper.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("vmvault mount did not come up")
            time.sleep(0.05)
        found = list((point / "by-vm").glob(f"*/*_{snap[:8]}/{src.name}"))
        if len(found) != 1:
            raise SystemExit(f"the mount does not show {src.name} of snapshot {snap[:8]} once: {found}")
        started = time.monotonic()
        digest = _sha256_file(found[0])
        read_seconds = time.monotonic() - started
        if digest != expected:
            raise SystemExit("the disk read through the mount differs from the source")
        subprocess.run(["fusermount3", "-u", str(point)], check=True, capture_output=True)

    try:
        wall, cpu, rss, _ = timed(_cli(work / "repo", "mount", str(point)), env, during=read_through)
    finally:
        if os.path.ismount(point):
            subprocess.run(["fusermount3", "-u", "-z", str(point)], check=False, capture_output=True)
    point.rmdir()
    record("mount", wall, cpu, rss)
    return read_seconds


def _mean(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in OPS:
        mine = [r[name] for r in runs if name in r]
        if mine:
            out[name] = {k: round(sum(m[k] for m in mine) / len(mine), 2) for k in mine[0]}
    return out


def measure(
    chunks: int,
    work: Path,
    disk_size: str,
    *,
    keep: bool = False,
    base: Path | None = None,
    ops: tuple[str, ...] = OPS,
    repeat: int = 1,
) -> dict[str, object]:
    """``repeat`` runs of ``ops``, each from the same state: the built repository (copied from
    ``base`` when given, else built again) and the pristine disk image."""
    env = _env(work)
    fresh(work)
    pristine = work / "image" / "vm-disk.raw"
    setup: dict[str, float] = {}
    if set(ops) & (_NEED_BACKUP | {"backup"}):
        t = time.monotonic()
        make_image(pristine, disk_size, seed=11)  # made in place (no second copy on a full disk)
        setup["image_seconds"] = time.monotonic() - t
    fs_disk = None
    if "files" in ops:
        fs_disk = work / "image" / FS_DISK
        make_fs_disk(fs_disk)
    runs: list[dict[str, dict[str, float]]] = []
    for k in range(repeat):
        if repeat > 1:
            print(f" run {k + 1} of {repeat}", file=sys.stderr, flush=True)
        prepared = _prepare(chunks, work, env, base)
        if k == 0:
            setup.update(prepared)
        elif "resync_seconds" in prepared:
            setup[f"resync_seconds_{k + 1}"] = prepared["resync_seconds"]
        runs.append(_run_ops(work, env, ops, pristine, fs_disk))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, object] = {
        "chunks": chunks,
        "ops": _mean(runs),
        "setup": {k: round(v, 2) for k, v in setup.items()},
    }
    if repeat > 1:
        result["runs"] = runs
    return result


def _snapshot_list(doc: object) -> list[dict[str, object]]:
    if isinstance(doc, dict):
        for key in ("snapshots", "items"):
            if isinstance(doc.get(key), list):
                return doc[key]  # type: ignore[no-any-return]
    if isinstance(doc, list):
        return doc
    raise SystemExit(f"cannot read the snapshot list: {str(doc)[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=0, help="synthetic chunks in the index (default 0)")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--work", type=Path, default=OUT / "scale", help="scratch folder (emptied)")
    ap.add_argument("--disk-size", default="4G", help="the real disk backed up (default 4G)")
    ap.add_argument("--keep", action="store_true", help="leave the scratch folder (repository, cache) behind")
    ap.add_argument(
        "--base",
        type=Path,
        help="keep the built synthetic repository and its cache here, and start later runs with the "
        "same --chunks and --work from a copy of them (hard links: on the file system of --work)",
    )
    ap.add_argument(
        "--ops",
        type=parse_ops,
        default=OPS,
        help=f"the commands to measure, separated by commas (default all: {','.join(OPS)}); "
        "backup_changed, open, restore and prune need the first backup, which then runs unmeasured "
        "when backup is not chosen",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of the commands, each from the same built state (with --base, a fresh copy of it); "
        "each run and the mean are reported",
    )
    ap.add_argument("--build-synthetic", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--open", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--sync", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_synthetic:
        build_synthetic(args.build_synthetic, args.chunks)
        return
    if args.open or args.sync:
        open_and_read_first(args.open or args.sync, read=bool(args.open))
        return
    print(f"machine: {machine()}", file=sys.stderr)
    print(f"{args.chunks:,} synthetic chunks, a {args.disk_size} disk", file=sys.stderr, flush=True)
    started = time.monotonic()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    result = measure(
        args.chunks, args.work, args.disk_size, keep=args.keep, base=args.base, ops=args.ops, repeat=args.repeat
    )
    cast(dict[str, float], result["setup"])["total_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
    else:
        means = cast(dict[str, dict[str, float]], result["ops"])
        for k, run in enumerate(cast(list[dict[str, dict[str, float]]], result.get("runs", [means]))):
            for name, r in run.items():
                cpu, rss = r["cpu_seconds"], r["peak_rss_mib"]
                print(f"{k + 1:4} {name:15} {r['seconds']:8.1f} s {cpu:8.1f} s CPU {rss:8.1f} MiB")
        for name, r in means.items():
            print(f"mean {name:15} {r['seconds']:8.1f} s {r['cpu_seconds']:8.1f} s CPU {r['peak_rss_mib']:8.1f} MiB")
        print(json.dumps(result["setup"]))


if __name__ == "__main__":
    main()

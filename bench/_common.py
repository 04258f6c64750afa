"""Shared pieces of the benchmarks: test images, timing child processes, machine facts.

Benchmarks run on demand (never as timed tests). Images come from the developers'
``../shared/bench/make_vm_disk.py`` when it is there (so numbers are comparable across
runs and machines), else from vmvault's own sample generator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_MAKER = ROOT.parent / "shared" / "bench" / "make_vm_disk.py"
OUT = ROOT / "bench" / "out"


@dataclass
class Run:
    seconds: float
    max_rss_mib: float
    returncode: int
    stdout: str
    stderr: str
    #: user + system CPU seconds of the command's process tree (``timed_child`` only)
    cpu_s: float = 0.0


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a timed command: this one, ``extra``, and Python's compiled modules kept.

    An installed vmvault runs from modules compiled once (pip compiles them at install). With
    ``PYTHONDONTWRITEBYTECODE`` set and a source tree without ``__pycache__``, every timed
    command compiled all of vmvault first (0.35 s of CPU a command, measured on the 2-core
    machine); the compiled modules go to ``bench/out/pycache`` instead, made by the first command.
    """
    env = {**os.environ, **(extra or {})}
    if env.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        env.setdefault("PYTHONPYCACHEPREFIX", str(OUT / "pycache"))
    return env


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None, check: bool = True) -> Run:
    """Run a command; wall time and the child's peak RSS (from wait4, so only that process tree's)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        env=child_env(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate()
    seconds = time.monotonic() - start
    # the peak RSS of the largest child waited for so far: measure one command per process tree
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = Run(seconds, rss, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    return result


#: GNU time (Debian's ``time`` package): a small C program, so measuring a command adds no
#: interpreter's start to its time and warms none of its files (bench/_rss.py where it is missing)
GNU_TIME = "/usr/bin/time"


def timed_child(cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> Run:
    """Like ``run`` but in a fresh helper process, so wall time, peak RSS and CPU time belong
    to this command alone: the time runs from the command's start to its exit (GNU time's
    ``%e``; until 4 Dec 2026 it also held the start of a Python helper, 0.1-0.2 s with a cold
    page cache), CPU and peak RSS come from ``wait4``.

    The time includes a ``sync`` after the command: a backup (or restore) counts as done when
    its data is durable, whether the tool fsyncs as it goes or leaves dirty pages behind.
    """
    if os.access(GNU_TIME, os.X_OK):
        helper = [GNU_TIME, "-f", "bench-usage %e %U %S %M", *cmd]
    else:
        helper = [sys.executable, str(Path(__file__).with_name("_rss.py")), *cmd]
    r = run(helper, env=env, check=check)
    start = time.monotonic()
    os.sync()
    synced = time.monotonic() - start
    lines = r.stderr.strip().splitlines()
    wall, rss, cpu = r.seconds, r.max_rss_mib, 0.0
    if lines and lines[-1].startswith("bench-usage "):
        fields = lines.pop().split()
        wall, cpu, rss = float(fields[1]), float(fields[2]) + float(fields[3]), float(fields[4]) / 1024
    else:
        if lines and lines[-1].startswith("max_rss_mib"):
            rss = float(lines.pop().split()[-1])
        if lines and lines[-1].startswith("cpu_s"):
            cpu = float(lines.pop().split()[-1])
        if lines and lines[-1].startswith("wall_s"):
            wall = float(lines.pop().split()[-1])
    return Run(wall + synced, rss, r.returncode, r.stdout, "\n".join(lines), cpu)


#: the most ``fsync_write_seconds`` writes; a larger volume is timed from this much, scaled
FLOOR_SAMPLE = 1 << 30


#: times ``fsync_write_seconds`` measures; the fastest counts
FLOOR_SAMPLES = 3


def fsync_write_seconds(folder: Path, nbytes: int, *, reading: list[Path] | None = None, read_bytes: int = 0) -> float:
    """The time to write ``nbytes`` of incompressible data into a new file in ``folder`` and
    fsync it, like ``dd conv=fsync`` (4 MiB writes): the disk's floor for storing that much.
    At most ``FLOOR_SAMPLE`` bytes are written (the development machines' disks are shared and
    nearly full) and the time scaled to ``nbytes``. The shared virtual disk's speed changes
    from one moment to the next (back to back, the same 2.5 GiB took 1.3 s and 2.6 s): the
    fastest of ``FLOOR_SAMPLES`` measurements is the floor, the strictest reading of it.

    With ``reading``, the same disk also reads ``read_bytes`` of those files' data (cold, in
    the same proportion to the sample) while it writes, and the time is until both are done:
    the floor of a step that reads its input from the disk it writes to (a restore reads the
    repository's packs; a backup, the image)."""
    return min(_fsync_write_once(folder, nbytes, reading, read_bytes) for _ in range(FLOOR_SAMPLES))


def _fsync_write_once(folder: Path, nbytes: int, reading: list[Path] | None, read_bytes: int) -> float:
    drop_caches()
    block = os.urandom(4 << 20)
    path = folder / "fsync-floor.tmp"
    size = min(nbytes, FLOOR_SAMPLE)
    scale = nbytes / max(1, size)
    reader: threading.Thread | None = None
    if reading:
        reader = threading.Thread(target=read_data, args=(reading, int(read_bytes / scale)), daemon=True)
    start = time.monotonic()
    if reader is not None:
        reader.start()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, memoryview(block)[: min(left, len(block))])
        os.fsync(fd)
        if reader is not None:
            reader.join()
    finally:
        os.close(fd)
        seconds = time.monotonic() - start
        path.unlink(missing_ok=True)
    return seconds * scale


def read_data(paths: list[Path], limit: int) -> int:
    """Read up to ``limit`` bytes of the data (not the holes) of ``paths``, in order, in 8 MiB
    reads; the bytes read."""
    done = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            end = os.fstat(fd).st_size
            offset = 0
            while offset < end and done < limit:
                try:
                    offset = os.lseek(fd, offset, os.SEEK_DATA)
                    hole = os.lseek(fd, offset, os.SEEK_HOLE)
                except OSError:  # no data past offset
                    break
                while offset < hole and done < limit:
                    got = len(os.pread(fd, min(8 << 20, hole - offset, limit - done), offset))
                    if not got:
                        break
                    offset += got
                    done += got
        finally:
            os.close(fd)
        if done >= limit:
            break
    return done


def serving(point: Path) -> bool:
    """Whether a FUSE file system is mounted at ``point`` and answers (a mount benchmark waits for it)."""
    if not os.path.ismount(point):
        return False
    try:
        os.listdir(point)
    except OSError:
        return False
    return True


def make_image(path: Path, size: str, seed: int = 1) -> None:
    """The test image at ``path``, made once and kept: made under a temporary name and renamed
    when complete, so that a run killed while making it leaves no half-written image that
    later runs would take for the whole one."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    if SHARED_MAKER.exists():
        subprocess.run(
            [sys.executable, str(SHARED_MAKER), "create", str(partial), "--size", size, "--seed", str(seed)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    else:
        from vmvault.sample_vm import make_disk

        units = {"M": 1 << 20, "G": 1 << 30}
        make_disk(str(partial), int(float(size[:-1]) * units[size[-1].upper()]), seed=seed, fill=0.6)
    partial.rename(path)


def mutate(path: Path, percent: float, seed: int = 2) -> int:
    if SHARED_MAKER.exists():
        out = subprocess.run(
            [sys.executable, str(SHARED_MAKER), "mutate", str(path), "--percent", str(percent), "--seed", str(seed)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return int(out.split("overwrote")[1].split()[0])
    from vmvault.sample_vm import guest_writes

    return guest_writes(str(path), percent=percent, seed=seed)


def du(path: Path) -> int:
    """Bytes allocated on disk (holes not counted), for a file or a whole folder."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def count_files(path: Path) -> int:
    return sum(len(files) for _d, _s, files in os.walk(path))


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def drop_caches() -> None:
    """Drop the page cache when allowed (root), so every tool reads from disk alike."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}"
    )


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def revision(src: Path) -> str:
    """``src`` (a vmvault source folder) with the short commit of the checkout holding it."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return f"{rev} ({src})"


def report(result: dict[str, object], text: str, *, as_json: bool, write: str | None, section: str) -> None:
    """Print a benchmark's result (one JSON line, or its markdown ``text``) and, with ``write``,
    put ``text`` into that markdown file's ``section``."""
    import json

    print(json.dumps(result) if as_json else text)
    if write:
        from compare import write_section

        write_section(Path(write), section, text)


@contextlib.contextmanager
def far_sftp(workdir: Path, rtt_ms: float) -> Iterator[tuple[str, dict[str, str]]]:
    """A repository location on OpenSSH's ``sshd`` (internal-sftp: no login shell runs per
    session) on 127.0.0.1 with its own keys (``tests/servers.py``), reached through a relay
    that delays every byte by half of ``rtt_ms`` each way (``tests/latency.py``); yields the
    location and the environment a client needs (its key and known_hosts)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from latency import relay
    from servers import SshServer

    ssh = SshServer(workdir)
    config = ssh.config.read_text().splitlines()
    ssh.config.write_text(
        "\n".join("Subsystem sftp internal-sftp" if c.startswith("Subsystem sftp") else c for c in config) + "\n"
    )
    ssh.start()
    try:
        with relay(ssh.port, rtt_ms) as (port, _pid):
            # the host key, known for the port clients connect to
            known = ssh.known_hosts.read_text()
            ssh.known_hosts.write_text(known + known.replace(f":{ssh.port} ", f":{port} "))
            yield ssh.url("repo").replace(f":{ssh.port}/", f":{port}/"), dict(ssh.env)
    finally:
        ssh.stop()


@contextlib.contextmanager
def far_s3(workdir: Path, rtt_ms: float) -> Iterator[tuple[str, str, dict[str, str]]]:
    """A repository location in a bucket of a moto S3 server on 127.0.0.1 (``tests/servers.py``),
    reached through a relay that delays every byte by half of ``rtt_ms`` each way
    (``tests/latency.py``); yields the location near (the server's own port, for writing what
    is not measured), the location far away, and the environment a client needs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from latency import relay
    from servers import S3Server

    server = S3Server(workdir, buckets=("bench",))
    server.start()
    try:
        with relay(server.port, rtt_ms) as (port, _pid):
            near = server.url("bench", "repo")
            yield near, near.replace(f":{server.port}/", f":{port}/"), S3Server.client_env()
    finally:
        server.stop()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read 8 MiB at a time."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def far_arguments(
    description: str | None,
    work: str,
    section: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line of a benchmark against a repository far away (``far_sftp``), each
    ``--code`` timed in turn ``--runs`` times on a disk of ``--blocks`` index blocks;
    ``extra`` adds the benchmark's own options."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(ap)
    ap.add_argument("--rtt-ms", type=float, default=30.0, help="round trip added to every exchange with the server")
    ap.add_argument("--blocks", type=int, default=256, help="index blocks of the disk (16 MiB each)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--code", action="append", default=[], help="a vmvault src folder to time (repeatable)")
    ap.add_argument("--work", default=str(OUT / work), help="scratch folder (emptied, then removed)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--write", help=f"write the table into this markdown file (section {section})")
    args = ap.parse_args()
    if args.blocks < 1 or args.runs < 1 or args.rtt_ms <= 0:
        ap.error("--blocks and --runs must be at least 1, --rtt-ms above 0")
    return args


def far_header(script: str, result: dict[str, object]) -> list[str]:
    """The first lines of a far benchmark's table: the command that made it and the machine."""
    options = f" {result['options']}" if result.get("options") else ""
    return [
        f"Command: `python bench/{script} --rtt-ms {result['rtt_ms']} --blocks {result['blocks']}{options}`"
        " (with `--code` once per version compared)",
        "",
        f"Machine: {machine()}",
        "",
    ]

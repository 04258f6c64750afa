"""Backup and restore of the test image with a local repository, over SFTP and to S3, on one machine.

    python bench/remote_backends.py --size 4G --write docs/benchmarks.md
    python bench/remote_backends.py --size 1G --backends local,sftp-openssh,sftp-paramiko
    python bench/remote_backends.py --size 1G --backends local,sftp,s3 --rtt-ms 30

``sftp`` takes the transport vmvault chooses by itself; ``sftp-openssh`` and ``sftp-paramiko``
force one (``?transport=`` in the location).

SFTP goes to an OpenSSH server on 127.0.0.1 (``tests/servers.py`` starts one with its own
keys); S3 goes to a moto server on 127.0.0.1, ``s3-rgw`` to a single-node Ceph cluster's RADOS
Gateway over https (``tests/ceph.py``: one monitor, one OSD holding the objects in memory,
a few seconds to start; root and Debian's ceph packages). The servers run on the same machine, so
their CPU time competes with vmvault's: these figures are the protocol's and the client's
overhead, not a network's. Each backup is a full backup with the ``vmvault`` command (default
settings, encryption on); each restore restores that snapshot into an empty folder (cold page
cache, default settings) through ``vmvault.engine.restore`` (what ``vmvault restore`` runs, with the
malloc settings the command sets), in
a child process that reports the storage operations it sent (``Backend.requests``). Both are
timed to durability like ``compare.py``; the repository is deleted afterwards.

Then the disk is read from start to end through a :class:`~vmvault.engine.reader.DiskReader`
(what ``vmvault mount``, ``serve`` and ``files`` read with), 1 MiB at a time as a kernel reads
through a mount, in a child process from a cold page cache and a new cache of chunks: the time
from the reader's opening to its last byte, and the storage operations it sent. The first MiB of
every 64 is kept and compared with the image afterwards.

``--rtt-ms N`` puts each server N ms away: vmvault reaches it through a relay process that
delays every byte by half of N each way (tests/latency.py: latency only, no bandwidth limit,
no loss; its CPU is shown apart). The local repository stays where it is.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from _common import OUT, ROOT, drop_caches, machine, make_image, timed_child

sys.path.insert(0, str(ROOT / "tests"))
from latency import relay

PASSWORD = "benchmark passphrase"


def restore_child(url: str, target: str) -> None:
    """In the child: restore the latest snapshot of ``url`` into ``target``; print one JSON line
    with the storage operations the restore sent."""
    from vmvault import platform
    from vmvault.backends import open_backend
    from vmvault.engine.restore import restore
    from vmvault.repo.repository import Repository

    # as the command line does (cli.main) for every command
    platform.keep_freed_memory()
    platform.one_malloc_arena()
    backend = open_backend(url)
    backend.warm_up()  # as `vmvault restore` does (cli/_common.py open_repository)
    repo = Repository.open(backend, PASSWORD.encode())
    snap = repo.find_snapshot("latest")
    before = backend.requests.to_dict()
    result = restore(repo, snap, target)
    after = backend.requests.to_dict()
    chunks = sum(1 for d in snap.disks for _ in _stored_chunks(repo, snap, d))
    repo.close()  # ends and reaps the backend's ssh processes, if any
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "requests": {k: after[k] - before[k] for k in after},
                "chunks": chunks,
                "bytes_written": result.bytes_written,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "ssh_cpu_s": children.ru_utime + children.ru_stime,
            }
        )
    )


def read_child(url: str, source: str) -> None:
    """In the child: read the latest snapshot's disk of ``url`` through a ``DiskReader``, 1 MiB
    at a time; print one JSON line with the time, the storage operations and the CPU."""
    from vmvault import platform
    from vmvault.backends import open_backend
    from vmvault.engine.reader import DiskReader
    from vmvault.repo.repository import Repository

    platform.keep_freed_memory()
    platform.one_malloc_arena()
    backend = open_backend(url)
    backend.warm_up()
    repo = Repository.open(backend, PASSWORD.encode())
    snap = repo.find_snapshot("latest")
    before = backend.requests.to_dict()
    buf = bytearray(1 << 20)
    samples: dict[int, bytes] = {}
    start = time.monotonic()
    with DiskReader(repo, snap, snap.disks[0]) as reader:
        for offset in range(0, reader.size, len(buf)):
            n = reader.read_into(offset, buf)
            if offset % (64 << 20) == 0:
                samples[offset] = bytes(buf[:n])
    seconds = time.monotonic() - start
    after = backend.requests.to_dict()
    repo.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(source, "rb") as image:
        for offset, data in samples.items():
            if os.pread(image.fileno(), len(data), offset) != data:
                raise SystemExit(f"{url}: the disk read differs from the image at offset {offset:#x}")
    print(
        json.dumps(
            {
                "seconds": seconds,
                "requests": {k: after[k] - before[k] for k in after},
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )


def tree_cpu(pid: int | None) -> float:
    """CPU seconds a server process has used, with its children (ended ones included once it
    reaped them, as sshd does its sessions; live ones read from /proc)."""
    if pid is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime (fields 14-17 of stat; 11-14 after the name)
        total += sum(int(f) for f in fields[11:15]) / tick
        todo.extend(children.get(current, []))
    return total


def _stored_chunks(repo: object, snap: object, record: object) -> list[bytes]:
    from vmvault.repo.format import ChunkResolver, is_chunk

    resolver = ChunkResolver(repo, snap, record)  # type: ignore[arg-type]
    return [e for _c, e in resolver.entries(flatten=True) if is_chunk(e)]


@contextlib.contextmanager
def far(port: int, rtt_ms: float) -> Iterator[tuple[int, list[int]]]:
    """The port to reach the server on ``port`` by, ``rtt_ms`` away (the same port for 0), and
    the relay's process id to count its CPU (none for 0)."""
    if rtt_ms <= 0:
        yield port, []
        return
    with relay(port, rtt_ms) as (relay_port, pid):
        yield relay_port, [pid]


def vmvault_run(
    url: str,
    src: Path,
    target: Path,
    env: dict[str, str],
    server: int | None = None,
    servers: list[int] | None = None,
    relays: list[int] | None = None,
) -> dict[str, float]:
    base = [sys.executable, "-m", "vmvault", "-r", url, "-q"]
    env = {**env, "VMVAULT_PASSWORD": PASSWORD}
    timed_child([*base, "init"], env=env)
    drop_caches()
    pids = servers if servers is not None else [server] if server is not None else []
    server_cpu = sum(tree_cpu(pid) for pid in pids)
    backup = timed_child([*base, "backup", str(src)], env=env)
    backup_server_cpu = sum(tree_cpu(pid) for pid in pids) - server_cpu
    drop_caches()
    server_cpu = sum(tree_cpu(pid) for pid in pids)
    relay_cpu = sum(tree_cpu(pid) for pid in relays or [])
    restore = timed_child([sys.executable, __file__, "--restore-child", url, str(target)], env=env)
    server_cpu = sum(tree_cpu(pid) for pid in pids) - server_cpu
    relay_cpu = sum(tree_cpu(pid) for pid in relays or []) - relay_cpu
    report = json.loads(restore.stdout.strip().splitlines()[-1])
    (restored,) = list(target.iterdir())
    if not filecmp.cmp(restored, src, shallow=False):
        raise SystemExit(f"{url}: the restored disk differs from the image")
    shutil.rmtree(target, ignore_errors=True)
    drop_caches()
    reading = timed_child([sys.executable, __file__, "--read-child", url, str(src)], env=env)
    read = json.loads(reading.stdout.strip().splitlines()[-1])
    return {
        "backup_s": backup.seconds,
        "backup_rss": backup.max_rss_mib,
        "backup_cpu": backup.cpu_s,
        "backup_server_cpu": backup_server_cpu,
        "restore_s": restore.seconds,
        "restore_rss": restore.max_rss_mib,
        "gets": report["requests"]["get"],
        "bytes_read": report["requests"]["bytes_read"],
        "retries": report["requests"]["retries"],
        "chunks": report["chunks"],
        "restore_cpu": report["cpu_s"],
        "ssh_cpu": report["ssh_cpu_s"],
        "server_cpu": server_cpu,
        "relay_cpu": relay_cpu,
        "read_s": read["seconds"],
        "read_gets": read["requests"]["get"],
        "read_rss": reading.max_rss_mib,
    }


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--restore-child":
        restore_child(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--read-child":
        read_child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--backends", default="local,sftp,s3")
    ap.add_argument("--scratch", default=str(OUT / "remote"))
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="put each server this far away (tests/latency.py)")
    ap.add_argument("--write")
    args = ap.parse_args()
    src = OUT / f"vm-{args.size}.raw"
    make_image(src, args.size, seed=1)
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    # moto spools large objects to temporary files: keep them with the other benchmark files
    tmp = scratch / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)
    target = scratch / "restore"
    results: dict[str, dict[str, float]] = {}
    load = os.getloadavg()[0]
    try:
        for name in args.backends.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            if name == "local":
                results[name] = vmvault_run(str(scratch / "local-repo"), src, target, {})
                shutil.rmtree(scratch / "local-repo", ignore_errors=True)
            elif name in ("sftp", "sftp-openssh", "sftp-paramiko"):
                from servers import SshServer

                ssh = SshServer(scratch / "sshd")
                # sshd's built-in SFTP server (the same code as sftp-server): no login shell
                # runs per session, so a slow shell start-up file is not timed as SFTP
                config = ssh.config.read_text().splitlines()
                ssh.config.write_text(
                    "\n".join("Subsystem sftp internal-sftp" if c.startswith("Subsystem sftp") else c for c in config)
                    + "\n"
                )
                ssh.start()
                try:
                    pid = ssh.process.pid if ssh.process else None
                    with far(ssh.port, args.rtt_ms) as (port, relays):
                        # the host key, known for the port vmvault connects to
                        known = ssh.known_hosts.read_text()
                        ssh.known_hosts.write_text(known + known.replace(f":{ssh.port} ", f":{port} "))
                        url = ssh.url("repo").replace(f":{ssh.port}/", f":{port}/")
                        url += f"?transport={name[5:]}" if name != "sftp" else ""
                        results[name] = vmvault_run(url, src, target, ssh.env, pid, relays=relays)
                finally:
                    ssh.stop()
                    shutil.rmtree(scratch / "sshd", ignore_errors=True)
            elif name == "s3-rgw":
                sys.path.insert(0, str(ROOT))  # tests/ceph.py imports tests.servers
                import pytest

                from ceph import running_ceph

                try:
                    with running_ceph() as cluster:
                        cluster.create_bucket("bench")
                        # the gateway and the OSD that holds the objects (in memory: memstore)
                        pids = [cluster.processes[n].pid for n in cluster.processes if n in ("rgw", "osd.0")]
                        env = cluster.client_env()
                        endpoint = env["VMVAULT_S3_ENDPOINT"]
                        gateway = int(endpoint.rpartition(":")[2].rstrip("/"))
                        with far(gateway, args.rtt_ms) as (port, relays):
                            env["VMVAULT_S3_ENDPOINT"] = endpoint.replace(f":{gateway}", f":{port}")
                            results[name] = vmvault_run(
                                cluster.url("bench", "repo"), src, target, env, servers=pids, relays=relays
                            )
                except pytest.skip.Exception as exc:  # not root, or Ceph not installed: say why
                    raise SystemExit(f"s3-rgw: {exc}") from None
            elif name == "s3":
                from servers import S3Server

                s3 = S3Server(scratch / "moto", buckets=("bench",))
                s3.start()
                try:
                    pid = s3.process.pid if s3.process else None
                    with far(s3.port, args.rtt_ms) as (port, relays):
                        url = s3.url("bench", "repo").replace(f":{s3.port}/", f":{port}/")
                        results[name] = vmvault_run(url, src, target, S3Server.client_env(), pid, relays=relays)
                finally:
                    s3.stop()
                    shutil.rmtree(scratch / "moto", ignore_errors=True)
            else:
                raise SystemExit(f"unknown backend {name}")
            print(name, results[name], file=sys.stderr, flush=True)
            time.sleep(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load = max(load, os.getloadavg()[0])
    text = render(args, src, results, load)
    print(text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "remote-backends-far" if args.rtt_ms else "remote-backends", text)


def render(args: argparse.Namespace, src: Path, results: dict[str, dict[str, float]], load: float) -> str:
    local = results.get("local")
    rows = []
    for name, r in results.items():
        backup_ratio = f"{r['backup_s'] / local['backup_s']:.2f}×" if local else "–"
        restore_ratio = f"{r['restore_s'] / local['restore_s']:.2f}×" if local else "–"
        rows.append(
            f"| {name} | {r['backup_s']:.1f} | {backup_ratio} | {r['backup_cpu']:.1f} | {r['backup_server_cpu']:.1f} | "
            f"{r['restore_s']:.1f} | {restore_ratio} | "
            f"{r['gets']:,.0f} | {r['chunks']:,.0f} | {r['bytes_read'] / 2**20:,.0f} | "
            f"{r['restore_cpu']:.1f} | {r['ssh_cpu']:.1f} | {r['server_cpu']:.1f} | "
            + (f"{r['relay_cpu']:.1f} | " if args.rtt_ms else "")
            + f"{max(r['backup_rss'], r['restore_rss']):.0f} | "
            f"{r['read_s']:.1f} | {r['read_s'] / r['restore_s']:.2f}× | {r['read_gets']:,.0f} | {r['read_rss']:.0f} |"
        )
    return "\n".join(
        [
            f"Command: `python bench/remote_backends.py --size {args.size} --backends {args.backends}"
            + (f" --rtt-ms {args.rtt_ms:g}`" if args.rtt_ms else "`"),
            "",
            f"Machine: {machine()}; load average {load:.1f} during the run (other work shares the 2 cores)",
            "",
            f"Full backup of the {args.size} test image ({src.stat().st_blocks * 512 / 2**30:.1f} GiB allocated) "
            "with `vmvault backup`, then a restore of that snapshot into an empty folder (cold page cache, "
            "byte-compared with the image afterwards), default settings. SFTP: OpenSSH `sshd` (internal-sftp) "
            "on 127.0.0.1, reached through `ssh` child processes (`sftp`, `sftp-openssh`) or paramiko's SSH in "
            "Python (`sftp-paramiko`); S3: moto server on 127.0.0.1, `s3-rgw`: Ceph's RADOS Gateway over https "
            "with one memstore OSD (tests/ceph.py; its server CPU is the gateway's and the OSD's) "
            "(the servers share the 2 cores with vmvault). "
            "Reads: the storage operations the restore sent (`Backend.requests`: ranged GETs of packs, index and "
            "snapshot reads), against the chunks it restored. CPU: seconds (user + system) of the backup's "
            "`vmvault` process with its ssh child processes, and of the server with its session processes during "
            "the backup; of the restoring process, of its ssh child processes (the OpenSSH transport's encryption), "
            "and of the server during the restore. Peak RSS is vmvault's (backup and restore). "
            "Disk read: the disk read from start to end through a `DiskReader` (what `mount`, `serve` and "
            "`files` read with), 1 MiB at a time, cold page cache, a new cache of chunks (default size); its storage "
            "operations and the peak RSS of its process."
            + (
                f" Every server is {args.rtt_ms:g} ms (round trip) away: reached through a relay process that delays "
                "each byte by half of that each way (tests/latency.py: latency only, no bandwidth limit or loss); "
                "the relay's CPU during the restore is its own column. The local repository is not delayed."
                if args.rtt_ms
                else ""
            ),
            "",
            "| repository | full backup (s) | backup / local | backup CPU (s) | server CPU, backup (s) "
            "| restore (s) | restore / local | restore reads "
            "| chunks restored | MiB read | restore CPU (s) | its ssh CPU (s) | server CPU (s) | "
            + ("relay CPU (s) | " if args.rtt_ms else "")
            + "peak RSS (MiB) | disk read (s) | read / restore | read requests | read peak RSS (MiB) |",
            "| --- " * (19 if args.rtt_ms else 18) + "|",
            *rows,
        ]
    )


if __name__ == "__main__":
    main()

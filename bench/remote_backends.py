"""Backup of the test image to a local repository, over SFTP and to S3, on one machine.

    python bench/remote_backends.py --size 4G --write docs/benchmarks.md

SFTP goes to an OpenSSH server on 127.0.0.1 (``tests/servers.py`` starts one with its own
keys); S3 goes to a moto server on 127.0.0.1. Both servers run on the same machine, so
their CPU time competes with the backup's: these figures are the protocol's and the
client's overhead, not a network's. Each run is a full backup with the ``vmvault`` command
(default settings, encryption on), timed to durability like ``compare.py``, and the
repository is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from _common import OUT, ROOT, drop_caches, machine, make_image, timed_child

sys.path.insert(0, str(ROOT / "tests"))

PASSWORD = "benchmark passphrase"


def vmvault_backup(url: str, src: Path, env: dict[str, str]) -> tuple[float, float]:
    base = [sys.executable, "-m", "vmvault", "-r", url, "-q"]
    env = {**env, "VMVAULT_PASSWORD": PASSWORD}
    timed_child([*base, "init"], env=env)
    drop_caches()
    run = timed_child([*base, "backup", str(src)], env=env)
    return run.seconds, run.max_rss_mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--backends", default="local,sftp,s3")
    ap.add_argument("--scratch", default=str(OUT / "remote"))
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
    results: dict[str, tuple[float, float]] = {}
    try:
        for name in args.backends.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            if name == "local":
                results[name] = vmvault_backup(str(scratch / "local-repo"), src, {})
                shutil.rmtree(scratch / "local-repo", ignore_errors=True)
            elif name == "sftp":
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
                    results[name] = vmvault_backup(ssh.url("repo"), src, ssh.env)
                finally:
                    ssh.stop()
                    shutil.rmtree(scratch / "sshd", ignore_errors=True)
            elif name == "s3":
                from servers import S3Server

                s3 = S3Server(scratch / "moto", buckets=("bench",))
                s3.start()
                try:
                    results[name] = vmvault_backup(s3.url("bench", "repo"), src, S3Server.client_env())
                finally:
                    s3.stop()
                    shutil.rmtree(scratch / "moto", ignore_errors=True)
            else:
                raise SystemExit(f"unknown backend {name}")
            print(name, results[name], file=sys.stderr, flush=True)
            time.sleep(1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    local = results.get("local")
    rows = []
    for name, (secs, rss) in results.items():
        ratio = f"{secs / local[0]:.2f}×" if local else "–"
        rows.append(f"| {name} | {secs:.1f} | {ratio} | {rss:.0f} |")
    text = "\n".join(
        [
            f"Command: `python bench/remote_backends.py --size {args.size} --backends {args.backends}`",
            "",
            f"Machine: {machine()}",
            "",
            f"Full backup of the {args.size} test image ({src.stat().st_blocks * 512 / 2**30:.1f} GiB allocated) "
            "with `vmvault backup`, default settings. SFTP: OpenSSH `sshd` (internal-sftp) on 127.0.0.1; "
            "S3: moto server on 127.0.0.1 (both servers share the 2 cores with the backup). Peak RSS is vmvault's.",
            "",
            "| repository | full backup (s) | time / local | peak RSS (MiB) |",
            "| --- | --- | --- | --- |",
            *rows,
        ]
    )
    print(text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "remote-backends", text)


if __name__ == "__main__":
    main()

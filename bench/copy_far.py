"""``vmvault copy`` into an SFTP target far away, of a snapshot whose index blocks are mostly
taken over from the earlier copy.

    python bench/copy_far.py [--rtt-ms 30] [--blocks 256] [--runs 3] [--code SRC ...]
                             [--json] [--write docs/benchmarks.md]

A sparse disk of ``--blocks`` index blocks (4 KiB chunks, so an index block spans 16 MiB: 64
KiB of random data at the start of each, the rest a hole) is backed up into a local repository
and copied into an SFTP target: OpenSSH's ``sshd`` (internal-sftp) on 127.0.0.1 with its own
keys (``tests/servers.py``), reached through a relay that delays every byte by half of
``--rtt-ms`` each way (``tests/latency.py``: latency only, no bandwidth limit). Then, ``--runs``
times for each ``--code`` in turn (a vmvault ``src`` folder; default this checkout's, so
versions alternate on the same machine minutes apart): the guest overwrites 4 KiB in three
blocks, the disk is backed up, and ``vmvault copy`` of that snapshot is timed (the command's
whole life, start-up and unlocking both keys included).

What this measures is the round trips a copy spends per index block it does not copy: it
reads each such block from the target to confirm that every chunk it names is still there.
The data moved is tiny and synthetic (three changed chunks a run); a real disk adds its
changed chunks' downloads and uploads, made several at once already. The last copy is
restored from the target and compared with the disk (not timed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import OUT, ROOT, fresh, machine

sys.path.insert(0, str(ROOT / "tests"))
from latency import relay

PASSWORD = "benchmark passphrase"
#: chunk size and chunks per index block (vmvault's INDEX_SPAN): the span of one block
CHUNK = 4096
BLOCK = 4096 * CHUNK


def _revision(src: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return f"{rev} ({src})"


def _cli(code: Path, repo: str, env: dict[str, str], *args: str) -> tuple[float, str]:
    """``vmvault -r REPO ARGS`` with ``code`` first on the path: its seconds and stdout."""
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "vmvault", "-r", repo, *args],
        env={**env, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
    )
    if run.returncode:
        raise SystemExit(f"vmvault {' '.join(args[:2])} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    return time.monotonic() - started, run.stdout


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def measure(args: argparse.Namespace) -> dict[str, object]:
    from servers import SshServer

    codes = [Path(c).resolve() for c in args.code] or [ROOT / "src"]
    work = fresh(Path(args.work))
    disk = work / "disk.img"
    rnd = random.Random(1)
    with disk.open("wb") as f:
        f.truncate(args.blocks * BLOCK)
        for block in range(args.blocks):
            f.seek(block * BLOCK)
            f.write(rnd.randbytes(64 << 10))
    env = {
        **os.environ,
        "VMVAULT_PASSWORD": PASSWORD,
        "VMVAULT_FROM_PASSWORD": PASSWORD,
        "VMVAULT_CACHE_DIR": str(work / "cache"),
        "VMVAULT_STATE_DIR": str(work / "state"),
    }
    src = str(work / "src")
    here = codes[0]
    _cli(here, src, env, "-q", "init", "--chunk-size", str(CHUNK))
    ssh = SshServer(work / "sshd")
    # sshd's built-in SFTP server: no login shell runs per session
    config = ssh.config.read_text().splitlines()
    ssh.config.write_text(
        "\n".join("Subsystem sftp internal-sftp" if c.startswith("Subsystem sftp") else c for c in config) + "\n"
    )
    ssh.start()
    runs: dict[str, list[dict[str, float]]] = {_revision(c): [] for c in codes}
    try:
        with relay(ssh.port, args.rtt_ms) as (port, _pid):
            known = ssh.known_hosts.read_text()
            ssh.known_hosts.write_text(known + known.replace(f":{ssh.port} ", f":{port} "))
            url = ssh.url("repo").replace(f":{ssh.port}/", f":{port}/")
            env.update(ssh.env)
            _cli(here, url, env, "-q", "init", "--chunk-size", str(CHUNK))
            _cli(here, src, env, "-q", "backup", str(disk))
            seconds, _ = _cli(here, url, env, "-q", "copy", "--from", src)
            print(f"  first copy: {seconds:.1f} s", file=sys.stderr, flush=True)
            for _ in range(args.runs):
                for code in codes:
                    with disk.open("r+b") as f:
                        for block in rnd.sample(range(args.blocks), min(3, args.blocks)):
                            f.seek(block * BLOCK + 8192)
                            f.write(rnd.randbytes(4096))
                    _cli(here, src, env, "-q", "backup", str(disk))
                    seconds, out = _cli(code, url, env, "--json", "copy", "--from", src)
                    report = json.loads(out)
                    run = {
                        "seconds": round(seconds, 2),
                        "index_blocks_reused": report["index_blocks_reused"],
                        "chunks_read": report["chunks_read"],
                    }
                    runs[_revision(code)].append(run)
                    print(f"  {_revision(code)}: {run}", file=sys.stderr, flush=True)
            restored = work / "restored"
            _cli(here, url, env, "-q", "restore", "latest", "--target", str(restored))
            found = [p for p in restored.rglob("*") if p.is_file() and p.stat().st_size == disk.stat().st_size]
            if len(found) != 1 or _sha256(found[0]) != _sha256(disk):
                raise SystemExit("the last copy does not restore the disk")
    finally:
        ssh.stop()
    shutil.rmtree(work)
    return {"rtt_ms": args.rtt_ms, "blocks": args.blocks, "runs": runs}


def render(result: dict[str, object]) -> str:
    runs = result["runs"]
    assert isinstance(runs, dict)
    lines = [
        f"Command: `python bench/copy_far.py --rtt-ms {result['rtt_ms']} --blocks {result['blocks']}`"
        " (with `--code` once per version compared)",
        "",
        f"Machine: {machine()}",
        "",
        "| code | copy (s), each run | index blocks taken over | chunks downloaded |",
        "| --- | --- | --- | --- |",
    ]
    for code, done in runs.items():
        times = ", ".join(f"{r['seconds']:.2f}" for r in done)
        reused = ", ".join(sorted({str(r["index_blocks_reused"]) for r in done}))
        read = ", ".join(sorted({str(r["chunks_read"]) for r in done}))
        lines.append(f"| {code} | {times} | {reused} | {read} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=30.0, help="round trip added to every SFTP exchange")
    ap.add_argument("--blocks", type=int, default=256, help="index blocks of the disk (16 MiB each)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--code", action="append", default=[], help="a vmvault src folder to time (repeatable)")
    ap.add_argument("--work", default=str(OUT / "copy-far"), help="scratch folder (emptied, then removed)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--write", help="write the table into this markdown file (section copy-far)")
    args = ap.parse_args()
    if args.blocks < 1 or args.runs < 1 or args.rtt_ms <= 0:
        ap.error("--blocks and --runs must be at least 1, --rtt-ms above 0")
    result = measure(args)
    text = render(result)
    print(json.dumps(result) if args.json else text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "copy-far", text)


if __name__ == "__main__":
    main()

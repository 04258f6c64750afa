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
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, far_arguments, far_header, far_sftp, fresh, report, revision, sha256_file

PASSWORD = "benchmark passphrase"
#: chunk size and chunks per index block (vmvault's INDEX_SPAN): the span of one block
CHUNK = 4096
BLOCK = 4096 * CHUNK


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


def measure(args: argparse.Namespace) -> dict[str, object]:
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
    runs: dict[str, list[dict[str, float]]] = {revision(c): [] for c in codes}
    with far_sftp(work / "sshd", args.rtt_ms) as (url, client_env):
        env.update(client_env)
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
                summary = json.loads(out)
                run = {
                    "seconds": round(seconds, 2),
                    "index_blocks_reused": summary["index_blocks_reused"],
                    "chunks_read": summary["chunks_read"],
                }
                runs[revision(code)].append(run)
                print(f"  {revision(code)}: {run}", file=sys.stderr, flush=True)
        restored = work / "restored"
        _cli(here, url, env, "-q", "restore", "latest", "--target", str(restored))
        found = [p for p in restored.rglob("*") if p.is_file() and p.stat().st_size == disk.stat().st_size]
        if len(found) != 1 or sha256_file(found[0]) != sha256_file(disk):
            raise SystemExit("the last copy does not restore the disk")
    shutil.rmtree(work)
    return {"rtt_ms": args.rtt_ms, "blocks": args.blocks, "runs": runs}


def render(result: dict[str, object]) -> str:
    runs = result["runs"]
    assert isinstance(runs, dict)
    lines = [
        *far_header("copy_far.py", result),
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
    args = far_arguments(__doc__, "copy-far", "copy-far")
    result = measure(args)
    report(result, render(result), as_json=args.json, write=args.write, section="copy-far")


if __name__ == "__main__":
    main()

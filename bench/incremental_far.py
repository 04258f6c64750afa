"""An incremental backup into an SFTP repository far away, of a disk changed in every index
block.

    python bench/incremental_far.py [--rtt-ms 30] [--blocks 256] [--runs 3] [--code SRC ...]
                                    [--json] [--write docs/benchmarks.md]

The source is a synthetic sparse disk of ``--blocks`` index blocks (4 KiB chunks, so a block
spans 16 MiB: 8 KiB of random data at the start of each, the rest a hole) handed to the backup
engine with scripted change tracking (``tests/engine/helpers.py``: the change tracking a
hypervisor reports, without one). The repository is on OpenSSH's ``sshd`` (internal-sftp) on
127.0.0.1 (``tests/servers.py``), reached through a relay that delays every byte by half of
``--rtt-ms`` each way (``tests/latency.py``). After a full backup, ``--runs`` times for each
``--code`` in turn (a vmvault ``src`` folder; default this checkout's): 4 KiB of every block
changes, and an incremental backup of it is timed in a process of its own, from opening the
repository to the snapshot written.

What this measures is the round trips an incremental spends per index block: it reads each of
the parent's blocks to confirm that the chunks it names are still stored, and reads each block
it changes again to change it. The data is tiny (one chunk a block); a real disk adds its
changed data's reads and uploads.
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

from _common import OUT, ROOT, fresh, machine

sys.path.insert(0, str(ROOT / "tests"))
from latency import relay

PASSWORD = b"benchmark passphrase"


def _revision(src: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return f"{rev} ({src})"


def child(url: str, run: int, blocks: int) -> None:
    """In a child: backup number ``run`` (0: the first, full) of the disk as it is after ``run``
    changes; print one JSON line with its seconds."""
    sys.path.insert(0, str(ROOT))
    from tests.engine.helpers import ScriptedSource, SparseDisk

    from vmvault.backends import open_backend
    from vmvault.engine.backup import backup
    from vmvault.repo.index_block import INDEX_SPAN
    from vmvault.repo.repository import Repository

    chunk = 4096
    span = INDEX_SPAN * chunk
    first = random.Random(1)
    pieces = {b * span: first.randbytes(2 * chunk) for b in range(blocks)}
    for done in range(1, run + 1):
        change = random.Random(100 + done)
        for b in range(blocks):
            pieces[b * span] = pieces[b * span][:chunk] + change.randbytes(chunk)
    source = ScriptedSource(SparseDisk(blocks * span, pieces))  # type: ignore[arg-type]
    source.changed = [(b * span + chunk, chunk) for b in range(blocks)] if run else None
    started = time.monotonic()
    storage = open_backend(url)
    repo = Repository.init(storage, PASSWORD, chunk_size=chunk) if run == 0 else Repository.open(storage, PASSWORD)
    result = backup(repo, source)
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": round(seconds, 2), "incremental": result.snapshot.disks[0].stats["incremental"]}))


def measure(args: argparse.Namespace) -> dict[str, object]:
    from servers import SshServer

    codes = [Path(c).resolve() for c in args.code] or [ROOT / "src"]
    work = fresh(Path(args.work))
    ssh = SshServer(work / "sshd")
    config = ssh.config.read_text().splitlines()
    ssh.config.write_text(
        "\n".join("Subsystem sftp internal-sftp" if c.startswith("Subsystem sftp") else c for c in config) + "\n"
    )
    ssh.start()
    runs: dict[str, list[float]] = {_revision(c): [] for c in codes}
    try:
        with relay(ssh.port, args.rtt_ms) as (port, _pid):
            known = ssh.known_hosts.read_text()
            ssh.known_hosts.write_text(known + known.replace(f":{ssh.port} ", f":{port} "))
            url = ssh.url("repo").replace(f":{ssh.port}/", f":{port}/")
            env = {
                **os.environ,
                **ssh.env,
                # cheap passphrase derivation: the unlocking is not what is measured
                "VMVAULT_TEST_CHEAP_KDF": "1",
                "VMVAULT_CACHE_DIR": str(work / "cache"),
                "VMVAULT_STATE_DIR": str(work / "state"),
            }

            def backup_with(code: Path, run: int) -> dict[str, float]:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", url, str(run), str(args.blocks)],
                    env={**env, "PYTHONPATH": str(code)},
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    raise SystemExit(f"backup {run} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
                result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
                if bool(result["incremental"]) != bool(run):
                    raise SystemExit(f"backup {run} was {'not ' if run else ''}an incremental")
                return result

            print(f"  full backup: {backup_with(codes[0], 0)['seconds']} s", file=sys.stderr, flush=True)
            run = 1
            for _ in range(args.runs):
                for code in codes:
                    seconds = backup_with(code, run)["seconds"]
                    runs[_revision(code)].append(seconds)
                    print(f"  {_revision(code)}: {seconds} s", file=sys.stderr, flush=True)
                    run += 1
    finally:
        ssh.stop()
    shutil.rmtree(work)
    return {"rtt_ms": args.rtt_ms, "blocks": args.blocks, "runs": runs}


def render(result: dict[str, object]) -> str:
    runs = result["runs"]
    assert isinstance(runs, dict)
    lines = [
        f"Command: `python bench/incremental_far.py --rtt-ms {result['rtt_ms']} --blocks {result['blocks']}`"
        " (with `--code` once per version compared)",
        "",
        f"Machine: {machine()}",
        "",
        "| code | incremental backup (s), each run |",
        "| --- | --- |",
    ]
    for code, times in runs.items():
        lines.append(f"| {code} | {', '.join(f'{t:.2f}' for t in times)} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=30.0, help="round trip added to every SFTP exchange")
    ap.add_argument("--blocks", type=int, default=256, help="index blocks of the disk (16 MiB each)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--code", action="append", default=[], help="a vmvault src folder to time (repeatable)")
    ap.add_argument("--work", default=str(OUT / "incremental-far"), help="scratch folder (emptied, then removed)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--write", help="write the table into this markdown file (section incremental-far)")
    args = ap.parse_args()
    if args.blocks < 1 or args.runs < 1 or args.rtt_ms <= 0:
        ap.error("--blocks and --runs must be at least 1, --rtt-ms above 0")
    result = measure(args)
    text = render(result)
    print(json.dumps(result) if args.json else text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "incremental-far", text)


if __name__ == "__main__":
    main()

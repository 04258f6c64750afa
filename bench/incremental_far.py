"""An incremental backup into a repository far away (SFTP, or S3 with ``--backend s3``), of a
disk changed in every index block.

    python bench/incremental_far.py [--backend sftp|s3] [--rtt-ms 30] [--blocks 256] [--packs N]
                                    [--runs 3] [--code SRC ...] [--json] [--write docs/benchmarks.md]

The source is a synthetic sparse disk of ``--blocks`` index blocks (4 KiB chunks, so a block
spans 16 MiB: 8 KiB of random data at the start of each, the rest a hole) handed to the backup
engine with scripted change tracking (``tests/engine/helpers.py``: the change tracking a
hypervisor reports, without one). The repository is on OpenSSH's ``sshd`` (internal-sftp) on
127.0.0.1 (``tests/servers.py``), or with ``--backend s3`` in a bucket of a moto S3 server on
127.0.0.1, reached through a relay that delays every byte by half of ``--rtt-ms`` each way
(``tests/latency.py``). After a full backup, ``--runs`` times for each
``--code`` in turn (a vmvault ``src`` folder; default this checkout's): 4 KiB of every block
changes, and an incremental backup of it is timed in a process of its own, from opening the
repository to the snapshot written.

What this measures is the round trips an incremental spends per index block: it reads each of
the parent's blocks to confirm that the chunks it names are still stored, and reads each block
it changes again to change it. The data is tiny (one chunk a block); a real disk adds its
changed data's reads and uploads.

``--packs N`` (2 or more) measures the packs' confirmations besides: each block starts with N
chunks of random data and the repository's packs hold one chunk each (a pack size of 4 KiB),
so the parent's chunks are in ``--blocks`` × N packs, each confirmed present once per backup,
as the 16 MiB packs of a disk of ``--blocks`` × N × 16 MiB would be. The full backup is then
written straight into the server's folder (uploading thousands of packs 30 ms away is not
what is measured; into S3 through the server's own port, without the relay) and the index
synced from far away once, untimed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from _common import ROOT, far_arguments, far_header, far_s3, far_sftp, fresh, report, revision

PASSWORD = b"benchmark passphrase"


def child(url: str, run: int, blocks: int, packs: int) -> None:
    """In a child: backup number ``run`` (0: the first, full) of the disk as it is after ``run``
    changes; print one JSON line with its seconds. ``run`` -1: sync the index, nothing else."""
    sys.path.insert(0, str(ROOT))
    from tests.engine.helpers import ScriptedSource, SparseDisk

    from vmvault.backends import open_backend
    from vmvault.engine.backup import backup
    from vmvault.repo.index_block import INDEX_SPAN
    from vmvault.repo.repository import Repository

    if run < 0:
        Repository.open(open_backend(url), PASSWORD).load_index()
        return
    chunk = 4096
    span = INDEX_SPAN * chunk
    first = random.Random(1)
    pieces = {b * span: first.randbytes(max(2, packs) * chunk) for b in range(blocks)}
    for done in range(1, run + 1):
        change = random.Random(100 + done)
        for b in range(blocks):
            old = pieces[b * span]
            pieces[b * span] = old[:chunk] + change.randbytes(chunk) + old[2 * chunk :]
    source = ScriptedSource(SparseDisk(blocks * span, pieces))  # type: ignore[arg-type]
    source.changed = [(b * span + chunk, chunk) for b in range(blocks)] if run else None
    started = time.monotonic()
    storage = open_backend(url)
    if run == 0:
        repo = Repository.init(storage, PASSWORD, chunk_size=chunk, **({"pack_size": chunk} if packs > 1 else {}))
    else:
        repo = Repository.open(storage, PASSWORD)
    result = backup(repo, source)
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": round(seconds, 2), "incremental": result.snapshot.disks[0].stats["incremental"]}))


def measure(args: argparse.Namespace) -> dict[str, object]:
    codes = [Path(c).resolve() for c in args.code] or [ROOT / "src"]
    work = fresh(Path(args.work))
    runs: dict[str, list[float]] = {revision(c): [] for c in codes}
    with _far(args.backend, work, args.rtt_ms) as (near, url, client_env):
        env = {
            **os.environ,
            **client_env,
            # cheap passphrase derivation: the unlocking is not what is measured
            "VMVAULT_TEST_CHEAP_KDF": "1",
            "VMVAULT_CACHE_DIR": str(work / "cache"),
            "VMVAULT_STATE_DIR": str(work / "state"),
        }

        def backup_with(code: Path, run: int, where: str = url) -> dict[str, float]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", where, str(run), str(args.blocks), str(args.packs)],
                env={**env, "PYTHONPATH": str(code)},
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise SystemExit(f"backup {run} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
            if run < 0:
                return {}
            result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
            if bool(result["incremental"]) != bool(run):
                raise SystemExit(f"backup {run} was {'not ' if run else ''}an incremental")
            return result

        if args.packs > 1:
            # thousands of one-chunk packs: written where the server keeps them, then synced
            print(f"  full backup: {backup_with(codes[0], 0, near)['seconds']} s", file=sys.stderr)
            backup_with(codes[0], -1)
        else:
            print(f"  full backup: {backup_with(codes[0], 0)['seconds']} s", file=sys.stderr, flush=True)
        run = 1
        for _ in range(args.runs):
            for code in codes:
                seconds = backup_with(code, run)["seconds"]
                runs[revision(code)].append(seconds)
                print(f"  {revision(code)}: {seconds} s", file=sys.stderr, flush=True)
                run += 1
    shutil.rmtree(work)
    options = " ".join(
        [f"--backend {args.backend}"] * (args.backend != "sftp") + [f"--packs {args.packs}"] * (args.packs > 1)
    )
    return {
        "backend": args.backend,
        "rtt_ms": args.rtt_ms,
        "blocks": args.blocks,
        "packs": args.packs,
        "options": options,
        "runs": runs,
    }


@contextlib.contextmanager
def _far(backend: str, work: Path, rtt_ms: float) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The repository far away: (where the untimed full backup of ``--packs`` writes, where the
    incrementals go, the client's environment)."""
    if backend == "s3":
        with far_s3(work / "moto", rtt_ms) as found:
            yield found
    else:
        with far_sftp(work / "sshd", rtt_ms) as (url, env):
            yield urlparse(url).path, url, env


def render(result: dict[str, object]) -> str:
    runs = result["runs"]
    assert isinstance(runs, dict)
    lines = [
        *far_header("incremental_far.py", result),
        "| code | incremental backup (s), each run |",
        "| --- | --- |",
    ]
    for code, times in runs.items():
        lines.append(f"| {code} | {', '.join(f'{t:.2f}' for t in times)} |")
    return "\n".join(lines)


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--packs", type=int, default=0, help="chunks of random data per block, a pack each (module docstring)"
    )
    ap.add_argument("--backend", choices=("sftp", "s3"), default="sftp", help="the repository's storage")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    args = far_arguments(__doc__, "incremental-far", "incremental-far", _options)
    if not 0 <= args.packs <= 4096:
        raise SystemExit("--packs must be from 0 to 4096 (the chunks of one index block)")
    result = measure(args)
    report(result, render(result), as_json=args.json, write=args.write, section="incremental-far")


if __name__ == "__main__":
    main()

"""``vmvault copy`` of a disk of many chunks: a first copy, then one after a change.

    python bench/copy_scale.py [--size 4G] [--chunk-size 16K] [--percent 1.0] [--work DIR]
                               [--image-dir DIR] [--json] [--write docs/benchmarks.md]

A disk image (make_vm_disk.py, seed 1) is backed up into a local repository cut in
``--chunk-size`` chunks (small chunks stand in for a larger disk: 4 GiB in 16 KiB chunks
has as many chunks as 1 TiB in the default 256 KiB ones, a quarter of a million). Measured,
each in a process of its own: ``copy`` of that backup into a second local repository with
its own key, then, after the guest overwrote ``--percent`` of the disk and a second backup,
``copy`` again. For each: wall time (with a final sync), CPU seconds, the command's peak
RSS, and what its ``--json`` report says it read (chunks downloaded, index blocks taken over).
The copy of the second backup is then restored from the target and compared with the image
(not measured).

What a copy holds in memory per chunk is what this measures: a copy that pairs source and
target chunk ids in a dict grows by about 140 bytes a chunk (35 MiB here), one that keeps
them on disk does not. Run it once per version (``PYTHONPATH=OTHER/src``) to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from _common import OUT, fresh, machine, make_image, mutate, report, revision, sha256_file, timed_child

PASSWORD = "benchmark passphrase"


def _cli(repo: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmvault", "-r", str(repo), *args]


def _revision() -> str:
    import vmvault

    return revision(Path(vmvault.__file__).resolve().parents[2])


def measure(args: argparse.Namespace) -> dict[str, object]:
    work = fresh(Path(args.work))
    image = Path(args.image_dir) / f"copy-scale-{args.size}.img"
    make_image(image, args.size)
    disk = work / "disk.img"
    shutil.copyfile(image, disk)
    env = {
        "VMVAULT_PASSWORD": PASSWORD,
        "VMVAULT_FROM_PASSWORD": PASSWORD,
        "VMVAULT_CACHE_DIR": str(work / "cache"),
        "VMVAULT_STATE_DIR": str(work / "state"),
    }
    src, dst = work / "src", work / "dst"
    for repo in (src, dst):
        timed_child(_cli(repo, "-q", "init", "--chunk-size", args.chunk_size), env=env)
    steps: dict[str, dict[str, float]] = {}
    for step in ("first copy", "copy after change"):
        if step != "first copy":
            mutate(disk, args.percent)
        backup = timed_child(_cli(src, "-q", "backup", str(disk)), env=env)
        print(f"  backup before the {step}: {backup.seconds:.1f} s", file=sys.stderr, flush=True)
        run = timed_child(_cli(dst, "--json", "copy", "--from", str(src)), env=env)
        report = json.loads(run.stdout)
        steps[step] = {
            "seconds": round(run.seconds, 2),
            "cpu_seconds": round(run.cpu_s, 2),
            "peak_rss_mib": round(run.max_rss_mib, 1),
            "chunks_read": report["chunks_read"],
            "index_blocks_reused": report["index_blocks_reused"],
        }
        print(f"  {step}: {steps[step]}", file=sys.stderr, flush=True)
    out = work / "restored"
    timed_child(_cli(dst, "-q", "restore", "latest", "--target", str(out)), env=env)
    restored = [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == disk.stat().st_size]
    if len(restored) != 1 or sha256_file(restored[0]) != sha256_file(disk):
        raise SystemExit("the copy of the second backup does not restore the changed disk")
    shutil.rmtree(work)
    return {
        "size": args.size,
        "chunk_size": args.chunk_size,
        "percent": args.percent,
        "code": _revision(),
        "steps": steps,
    }


def render(result: dict[str, object]) -> str:
    steps = result["steps"]
    assert isinstance(steps, dict)
    lines = [
        f"Command: `python bench/copy_scale.py --size {result['size']} --chunk-size {result['chunk_size']}"
        f" --percent {result['percent']}`",
        "",
        f"Machine: {machine()}; code: {result['code']}",
        "",
        "| step | time (s) | CPU (s) | peak RSS (MiB) | chunks downloaded | index blocks taken over |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in steps.items():
        lines.append(
            f"| {name} | {s['seconds']} | {s['cpu_seconds']} | {s['peak_rss_mib']} | {s['chunks_read']:,} |"
            f" {s['index_blocks_reused']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--chunk-size", default="16K")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--work", default=str(OUT / "copy-scale"), help="scratch folder (emptied, then removed)")
    ap.add_argument("--image-dir", default=str(OUT), help="where the pristine image is made once and kept")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--write", help="write the table into this markdown file (section copy-scale)")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    result = measure(args)
    report(result, render(result), as_json=args.json, write=args.write, section="copy-scale")


if __name__ == "__main__":
    main()

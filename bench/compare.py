"""vmvault against borg and restic on the same VM disk image, in one run.

    python bench/compare.py --size 4G --write docs/benchmarks.md

For each tool, with its default settings and encryption on: full backup of the image, a
second backup after the guest changed ~1 % of it (no change tracking: every tool sees a
file whose content changed), restore, repository size and growth, peak RSS. The image
lives at one path for all tools; the page cache is dropped before every timed step (when
run as root) so each tool reads from disk alike.

The floors, measured in the same run for each tool: a full backup can be no faster than
writing its repository's bytes to this disk with fsync (the disk floor: the same number of
bytes written with ``fsync_write_seconds`` into the same folder right after the backup; at most
1 GiB of it, scaled; the fastest of three), nor
than the CPU time it used divided by the cores (the CPU floor: user + system seconds of the
backup's processes / ``os.cpu_count()``); a restore no faster than writing the restored
disk's data with fsync, nor than its CPU time / cores. The floor is the larger of the two,
and "time / floor" says how close each step came to this machine's limit.

A step also reads from the same disk what it works on: a cold restore the repository's packs,
a backup the image. The second disk floor ("reading too") times the same writes while a thread
reads, at the same moment and in the same proportion to the sample, the image's data (for the
backup) or the repository's files (for the restore: nearly all of them are the snapshot's);
"floor 2" is the larger of it and the CPU floor. It is an estimate of what the disk can do for
both at once, not part of the issue's definition of the floor.

``--repo-dir DIR`` puts the repositories on other storage than the image and the restore
target (``/dev/shm``: memory, the one other file system of a one-disk machine): a repository
belongs on separate storage, and there a restore's reads no longer share the target disk's
bandwidth. The backup's disk floor is then the repository's bytes written with fsync into DIR;
the restore's stays the restored data written into the scratch folder. Dropping the page
cache does not empty a tmpfs: there the repository is read from memory, the most a separate
storage can give.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _common import OUT, drop_caches, du, fresh, fsync_write_seconds, machine, make_image, mib, mutate, timed_child

PASSWORD = "benchmark passphrase"


def tool_commands(tool: str, repo: Path, src: Path, target: Path) -> dict[str, list[str]]:
    if tool == "vmvault":
        base = [sys.executable, "-m", "vmvault", "-r", str(repo), "-q"]
        return {
            "init": [*base, "init"],
            "backup": [*base, "backup", str(src)],
            "restore": [*base, "restore", "latest", "--target", str(target)],
        }
    if tool == "borg":
        return {
            "init": ["borg", "init", "--encryption=repokey", str(repo)],
            "backup": ["borg", "create", f"{repo}::{{now:%Y%m%dT%H%M%S.%f}}", str(src)],
            "restore": ["sh", "-c", f"cd {target} && borg extract {repo}::$(borg list --last 1 --short {repo})"],
        }
    if tool == "restic":
        return {
            "init": ["restic", "-r", str(repo), "init"],
            "backup": ["restic", "-r", str(repo), "backup", "--quiet", str(src)],
            "restore": ["restic", "-r", str(repo), "restore", "latest", "--target", str(target)],
        }
    raise SystemExit(f"unknown tool {tool}")


ENV = {
    "VMVAULT_PASSWORD": PASSWORD,
    "BORG_PASSPHRASE": PASSWORD,
    "RESTIC_PASSWORD": PASSWORD,
    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
}


def place(image: Path, work: Path) -> None:
    """Copy an image to the work path, keeping holes (a new mtime, as after a guest ran)."""
    work.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", str(image), str(work)], check=True)


def bench_tool(tool: str, base: Path, changed: Path, scratch: Path, repo_dir: Path | None = None) -> dict[str, float]:
    repo_root = repo_dir or scratch
    repo = repo_root / f"{tool}-repo"
    target = scratch / f"{tool}-restore"
    shutil.rmtree(repo, ignore_errors=True)
    fresh(target)
    src = scratch / "src" / "vm-disk.raw"
    src.parent.mkdir(parents=True, exist_ok=True)
    cmds = tool_commands(tool, repo, src, target)
    timed_child(cmds["init"], env=ENV)
    place(base, src)
    drop_caches()
    full = timed_child(cmds["backup"], env=ENV)
    size1 = du(repo)
    full_disk_floor = fsync_write_seconds(repo_root, size1)
    full_io_floor = fsync_write_seconds(repo_root, size1, reading=[src], read_bytes=du(src))
    place(changed, src)
    drop_caches()
    second = timed_child(cmds["backup"], env=ENV)
    size2 = du(repo)
    drop_caches()
    rest = timed_child(cmds["restore"], env=ENV)
    restored = next(p for p in target.rglob("vm-disk.raw"))
    identical = subprocess.run(["cmp", "-s", str(restored), str(changed)]).returncode == 0
    restored_bytes = du(restored)
    shutil.rmtree(target, ignore_errors=True)  # room for the floor's file on a shared disk
    restore_disk_floor = fsync_write_seconds(scratch, restored_bytes)
    packs = sorted(p for p in repo.rglob("*") if p.is_file())
    restore_io_floor = fsync_write_seconds(scratch, restored_bytes, reading=packs, read_bytes=size2)
    cores = os.cpu_count() or 1
    result = {
        "full_s": full.seconds,
        "full_cpu_s": full.cpu_s,
        "full_disk_floor": full_disk_floor,
        "full_cpu_floor": full.cpu_s / cores,
        "full_io_floor": full_io_floor,
        "restore_cpu_s": rest.cpu_s,
        "restore_disk_floor": restore_disk_floor,
        "restore_cpu_floor": rest.cpu_s / cores,
        "restore_io_floor": restore_io_floor,
        "incr_s": second.seconds,
        "restore_s": rest.seconds,
        "repo_bytes": size2,
        "repo_after_full": size1,
        "growth": size2 - size1,
        "rss_mib": max(full.max_rss_mib, second.max_rss_mib, rest.max_rss_mib),
        "identical": float(identical),
    }
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(repo, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--tools", default="vmvault,borg,restic")
    ap.add_argument("--scratch", default=str(OUT / "compare"))
    ap.add_argument("--write", help="write the results section into this markdown file")
    ap.add_argument("--section", default="comparison", help="the name of that section (<!-- bench:NAME -->)")
    ap.add_argument("--repo-dir", help="put the repositories here, apart from the image and the restore (docstring)")
    args = ap.parse_args()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    repo_dir = Path(args.repo_dir) if args.repo_dir else None
    if repo_dir is not None:
        repo_dir.mkdir(parents=True, exist_ok=True)
    base = OUT / f"vm-{args.size}.raw"
    make_image(base, args.size, seed=1)
    changed = OUT / f"vm-{args.size}-changed.raw"
    if not changed.exists():
        place(base, changed)
        changed_bytes = mutate(changed, args.percent, seed=2)
        (OUT / f"vm-{args.size}-changed.bytes").write_text(str(changed_bytes))
    changed_bytes = int((OUT / f"vm-{args.size}-changed.bytes").read_text())
    results = {}
    load = os.getloadavg()[0]
    for tool in args.tools.split(","):
        if tool != "vmvault" and shutil.which(tool) is None:
            print(f"skipping {tool}: not installed (apt-get install borgbackup restic)", file=sys.stderr)
            continue
        print(f"== {tool}", file=sys.stderr)
        results[tool] = bench_tool(tool, base, changed, scratch, repo_dir)
        print(results[tool], file=sys.stderr)
        load = max(load, os.getloadavg()[0])
    text = render(results, args, changed_bytes, du(base), base.stat().st_size, load)
    print(text)
    if args.write:
        write_section(Path(args.write), args.section, text)


def render(
    results: dict[str, dict[str, float]],
    args: argparse.Namespace,
    changed: int,
    allocated: int,
    size: int,
    load: float,
) -> str:
    v = results.get("vmvault")
    rows = []
    for tool, r in results.items():
        rows.append(
            f"| {tool} | {r['full_s']:.1f} | {r['incr_s']:.1f} | {r['restore_s']:.1f} | {mib(r['repo_after_full'])} | "
            f"{mib(r['growth'])} ({r['growth'] / max(1, changed):.2f}× changed) | {r['rss_mib']:.0f} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    lines = [
        f"Command: `python bench/compare.py --size {args.size} --percent {args.percent} --tools {args.tools}"
        + ("" if args.section == "comparison" else f" --section {args.section}")
        + (f" --repo-dir {args.repo_dir}" if args.repo_dir else "")
        + "`",
        "",
        f"Machine: {machine()}; load average up to {load:.1f} (other work on the same cores)",
        "",
        f"Image: {size / 2**30:.1f} GiB virtual, {mib(allocated)} allocated (make_vm_disk.py, seed 1); "
        f"the guest then overwrote {mib(changed)} ({args.percent} %).",
        "",
        *(
            [
                f"Repositories in {args.repo_dir} ({_fs_type(Path(args.repo_dir))}), apart from the image and the "
                "restore target; the backup's disk floor is written there, the restore's into the target's folder.",
                "",
            ]
            if args.repo_dir
            else []
        ),
        "| tool | full backup (s) | backup after change (s) | restore (s) | repository after full | growth "
        "| peak RSS (MiB) | restore identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    lines += [
        "",
        f"Floors ({os.cpu_count()} cores; module docstring of bench/compare.py): disk = the same bytes written "
        "with fsync into the same folder (the fastest of three), CPU = the step's user + system seconds / cores; "
        "floor = the larger. "
        "Disk, reading too = the same writes while the same disk reads the step's input (a backup the image's "
        "data, a restore the repository's files) at once; floor 2 = the larger of it and the CPU floor.",
        "",
        "| tool | step | time (s) | CPU (s) | CPU floor (s) | disk floor (s) | time / floor "
        "| disk, reading too (s) | time / floor 2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tool, r in results.items():
        for step, key in (("full backup", "full"), ("restore", "restore")):
            floor = max(r[f"{key}_cpu_floor"], r[f"{key}_disk_floor"])
            floor2 = max(r[f"{key}_cpu_floor"], r[f"{key}_io_floor"])
            lines.append(
                f"| {tool} | {step} | {r[f'{key}_s']:.1f} | {r[f'{key}_cpu_s']:.1f} | {r[f'{key}_cpu_floor']:.1f} | "
                f"{r[f'{key}_disk_floor']:.1f} | {r[f'{key}_s'] / floor:.2f}× | {r[f'{key}_io_floor']:.1f} | "
                f"{r[f'{key}_s'] / floor2:.2f}× |"
            )
    if v:
        lines += ["", "Ratios (other tool's time / vmvault's time; higher is better for vmvault):", ""]
        for tool, r in results.items():
            if tool == "vmvault":
                continue
            lines.append(
                f"- {tool}: full backup {r['full_s'] / v['full_s']:.1f}×, backup after change "
                f"{r['incr_s'] / v['incr_s']:.1f}×, restore {r['restore_s'] / v['restore_s']:.1f}×"
            )
    return "\n".join(lines)


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts), or "?"."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    resolved = str(path.resolve())
    best = max(
        (m for m in mounts if len(m) > 2 and (resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/"))),
        key=lambda m: len(m[1]),
        default=None,
    )
    return best[2] if best else "?"


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- bench:NAME -->`` markers (or append it)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        before, rest = doc.split(start, 1)
        _old, after = rest.split(end, 1)
        doc = before + block + after
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


if __name__ == "__main__":
    main()

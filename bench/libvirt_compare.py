"""vmvault against virtnbdbackup on the same libvirt domain: full, incremental, restore, bytes, RSS.

    python bench/libvirt_compare.py --size 4G --write docs/benchmarks.md

Needs root, libvirt (the test suite's private libvirtd: tests/libvirtd.py), virtnbdbackup and
the developers' ``../shared/bench/make_vm_disk.py`` (the benchmark image and its 1 % mutation);
without them it says why and stops.

TCG domains with one virtio qcow2 disk converted from the test image, one per tool and mode
(the same definition and disk): virtnbdbackup refuses to run while another tool's checkpoint
exists, so it cannot share a domain with vmvault's. Each gets a full backup; then the guest
writes exactly what ``make_vm_disk.py mutate --percent 1`` changes in a copy of the image
(the changed 64 KiB clusters, written through the disk's device with HMP ``qemu-io write -s``,
so libvirt's bitmaps see them); then an incremental. Restore of the latest state: ``vmvault
restore latest --format qcow2`` against ``virtnbdrestore``, which replays the full and the
incremental; both restored disks are compared with the mutated image (``qemu-img compare``).
A third domain is backed up by virtnbdbackup with its lz4 compression (``-z``) for the bytes
it stores. Only one domain runs at a time. Every command runs as a child
process (peak RSS of its process tree) and is timed to durability (a final ``sync``).
vmvault's key derivation is the test suite's cheap one (``VMVAULT_TEST_CHEAP_KDF``): it is
not what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from _common import OUT, ROOT, SHARED_MAKER, child_env, drop_caches, du, machine, make_image, mib, mutate

sys.path.insert(0, str(ROOT))

CLUSTER = 64 * 1024


def changed_runs(before: Path, after: Path) -> list[tuple[int, int]]:
    """(offset, length) of the 64 KiB clusters that differ between two images of one size."""
    runs: list[tuple[int, int]] = []
    step = 64 * CLUSTER
    with open(before, "rb") as a, open(after, "rb") as b:
        pos = 0
        while True:
            x, y = a.read(step), b.read(step)
            if not x and not y:
                break
            if x != y:
                for i in range(0, max(len(x), len(y)), CLUSTER):
                    if x[i : i + CLUSTER] != y[i : i + CLUSTER]:
                        off = pos + i
                        if runs and runs[-1][0] + runs[-1][1] == off:
                            runs[-1] = (runs[-1][0], runs[-1][1] + CLUSTER)
                        else:
                            runs.append((off, CLUSTER))
            pos += len(x)
    return runs


def guest_writes(vm: object, image: Path, runs: list[tuple[int, int]], tmp: Path) -> None:
    """Write the changed runs of ``image`` into the running domain through its disk device."""
    piece = tmp / "piece.bin"
    with open(image, "rb") as f:
        for off, length in runs:
            f.seek(off)
            piece.write_bytes(f.read(length))
            reply = vm.hmp(f'qemu-io -d {vm.qdev("vda")} "write -s {piece} {off} {length}"')  # type: ignore[attr-defined]
            if reply.strip():
                raise SystemExit(f"qemu-io refused a write: {reply}")
    piece.unlink()


def same_image(path: Path, fmt: str, expected: Path) -> bool:
    out = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", "raw", str(path), str(expected)], capture_output=True, text=True
    )
    return out.returncode == 0


@dataclass
class Run:
    seconds: float  # wall time, to durability (a final sync)
    cpu: float  # user + system seconds of the command and every child it waited for
    max_rss_mib: float
    stdout: str


def timed_child(cmd: list[str], *, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd``; its wall time to durability, CPU time (from ``wait4``: the command's own
    process tree only, so it does not grow when the machine is busy) and peak RSS."""
    # through bench/_rss.py, a small process that forks the command: a child forked from this
    # (large) process would count this one's pages in its peak RSS
    helper = [sys.executable, str(Path(__file__).with_name("_rss.py")), *cmd]
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(helper, env=child_env(env), stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        os.sync()
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
    last = stderr.strip().splitlines()[-1:] or [""]
    rss = float(last[0].split()[-1]) if last[0].startswith("max_rss_mib") else usage.ru_maxrss / 1024
    return Run(seconds, usage.ru_utime + usage.ru_stime, rss, stdout)


def vmvault(*args: str, env: dict[str, str]) -> Run:
    return timed_child([sys.executable, "-m", "vmvault", *args], env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--scratch", default=str(OUT / "libvirt"))
    ap.add_argument("--write")
    args = ap.parse_args()
    from tests.libvirtd import Disk, Libvirtd, LibvirtVM, libvirt_missing

    if not SHARED_MAKER.exists():
        raise SystemExit(f"skipped: {SHARED_MAKER} is absent (the benchmark image and its mutation come from it)")
    reason = libvirt_missing() or (None if shutil.which("virtnbdbackup") else "virtnbdbackup is not installed")
    if reason:
        raise SystemExit(f"skipped: {reason}")
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    base = OUT / f"vm-{args.size}.raw"
    make_image(base, args.size, seed=1)
    mutated = scratch / "mutated.raw"
    subprocess.run(["cp", "--sparse=always", str(base), str(mutated)], check=True)
    mutate(mutated, args.percent, seed=2)
    runs = changed_runs(base, mutated)
    dirty = sum(n for _, n in runs)
    size = base.stat().st_size
    daemon = Libvirtd(Path(tempfile.mkdtemp(prefix="vmvault-bench-libvirtd-"))).start()
    env = {
        "VMVAULT_REPO": str(scratch / "repo"),
        "VMVAULT_PASSWORD": "benchmark passphrase",
        "VMVAULT_TEST_CHEAP_KDF": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    rows: dict[str, Run] = {}
    bytes_read: dict[str, int] = {}
    stored: dict[str, int] = {}
    vms: list[LibvirtVM] = []

    def domain(name: str) -> LibvirtVM:
        folder = scratch / name
        folder.mkdir()
        vm = LibvirtVM(daemon, folder, name, [Disk("vda", "qcow2", size)])
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), vm.paths["vda"]], check=True)
        vms.append(vm)
        return vm.define().start()

    def virtnbd(level: str, out: Path, *extra: str) -> Run:
        # in the daemon's namespace: virtnbdbackup wants a password for any qemu+... URI
        return timed_child(
            daemon.in_namespace("virtnbdbackup", "-d", vm.name, "-l", level, "-o", str(out), "-n",
                                "-S", str(scratch), *extra)
        )  # fmt: skip

    try:
        # vmvault on one domain, virtnbdbackup on another made from the same image: virtnbdbackup
        # refuses to run while a checkpoint it did not make exists ("Foreign checkpoint found")
        vm = domain("benchA")
        location = f"libvirt:///{vm.name}?uri={quote(daemon.uri, safe='')}&scratch={quote(str(scratch), safe='')}"
        vmvault("init", "-q", env=env)
        repo_empty = du(scratch / "repo")
        drop_caches()
        rows["vmvault full"] = r = vmvault("backup", location, "--json", "-q", env=env)
        doc = json.loads(r.stdout)
        bytes_read["vmvault full"] = doc["bytes_read"]
        stored["vmvault full"] = du(scratch / "repo") - repo_empty
        guest_writes(vm, mutated, runs, scratch)
        before = du(scratch / "repo")
        drop_caches()
        rows["vmvault incremental"] = r = vmvault("backup", location, "--json", "-q", env=env)
        doc = json.loads(r.stdout)
        bytes_read["vmvault incremental"] = doc["bytes_read"]
        if not doc["disks"][0].get("incremental"):
            raise SystemExit(f"vmvault's second backup was not incremental: {doc['warnings']}")
        stored["vmvault incremental"] = du(scratch / "repo") - before
        vm.shutdown()

        vm = domain("benchB")
        drop_caches()
        rows["virtnbdbackup full"] = virtnbd("full", scratch / "vnb")
        stored["virtnbdbackup full"] = du(scratch / "vnb")
        guest_writes(vm, mutated, runs, scratch)
        before = du(scratch / "vnb")
        drop_caches()
        rows["virtnbdbackup incremental"] = virtnbd("inc", scratch / "vnb")
        stored["virtnbdbackup incremental"] = du(scratch / "vnb") - before
        vm.shutdown()

        drop_caches()
        rows["vmvault restore"] = vmvault(
            "restore", "latest", "--target", str(scratch / "r-vmvault"), "--format", "qcow2", "-q", env=env
        )
        drop_caches()
        rows["virtnbdrestore"] = timed_child(
            daemon.in_namespace("virtnbdrestore", "-i", str(scratch / "vnb"), "-o", str(scratch / "r-vnb"), "-n")
        )
        ok_vmvault = same_image(scratch / "r-vmvault" / "vda.qcow2", "qcow2", mutated)
        restored = next((scratch / "r-vnb").glob("vda*"), None) or next((scratch / "r-vnb").glob("*.qcow2"))
        ok_vnb = same_image(restored, "qcow2", mutated)

        vm = domain("benchC")
        drop_caches()
        rows["virtnbdbackup -z full"] = virtnbd("full", scratch / "vnbz", "-z")
        stored["virtnbdbackup -z full"] = du(scratch / "vnbz")
        guest_writes(vm, mutated, runs, scratch)
        before = du(scratch / "vnbz")
        drop_caches()
        rows["virtnbdbackup -z incremental"] = virtnbd("inc", scratch / "vnbz", "-z")
        stored["virtnbdbackup -z incremental"] = du(scratch / "vnbz") - before
    finally:
        for v in vms:
            v.remove()
        daemon.stop()
        shutil.rmtree(daemon.root, ignore_errors=True)

    version = subprocess.run(["virtnbdbackup", "-V"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"Command: `python bench/libvirt_compare.py --size {args.size} --percent {args.percent}`",
        "",
        f"Machine: {machine()}",
        "",
        f"Domain: libvirt 9.0 (tests/libvirtd.py's private libvirtd), TCG, one virtio disk: a {size / 2**30:g} GiB "
        f"qcow2 converted from the test image ({mib(du(base))} allocated). Between the backups the guest wrote "
        f"the {len(runs)} runs of 64 KiB clusters that `make_vm_disk.py mutate --percent {args.percent}` changed "
        f"({mib(dirty)}). virtnbdbackup {version}, stream format.",
        "",
        "| step | time (s) | CPU (s) | peak RSS (MiB) | bytes read | stored |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in rows.items():
        read = mib(bytes_read[name]) if name in bytes_read else ""
        lines.append(
            f"| {name} | {run.seconds:.1f} | {run.cpu:.1f} | {run.max_rss_mib:.0f} | {read} | "
            f"{mib(stored[name]) if name in stored else ''} |"
        )
    full_ratio = rows["vmvault full"].seconds / rows["virtnbdbackup full"].seconds
    inc_ratio = rows["vmvault incremental"].seconds / rows["virtnbdbackup incremental"].seconds
    store_ratio = stored["virtnbdbackup full"] / max(1, stored["vmvault full"])
    store_ratio_z = stored["virtnbdbackup -z full"] / max(1, stored["vmvault full"])
    restore_ratio = rows["vmvault restore"].seconds / rows["virtnbdrestore"].seconds
    lines += [
        "",
        f"* incremental: vmvault / virtnbdbackup time {inc_ratio:.2f} (target ≤ 1.2); vmvault read "
        f"{mib(bytes_read['vmvault incremental'])} for {mib(dirty)} written",
        f"* full: vmvault / virtnbdbackup time {full_ratio:.2f} (target ≤ 2); virtnbdbackup stores "
        f"{store_ratio:.2f}× what vmvault stores, {store_ratio_z:.2f}× with its compression (target ≥ 1.5)",
        f"* restore of the latest state: vmvault / virtnbdrestore time {restore_ratio:.2f} (target < 1); "
        f"restored disks equal the domain's disk: vmvault {'yes' if ok_vmvault else 'NO'}, "
        f"virtnbdrestore {'yes' if ok_vnb else 'NO'}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from compare import write_section

        write_section(Path(args.write), "libvirt-compare", text)


if __name__ == "__main__":
    main()

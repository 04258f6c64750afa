"""``vmvault demo``: the whole job on a sample VM, end to end, with a summary.

Makes a sample VM, initialises an encrypted repository, backs up, changes the VM the way a
running guest does, backs up again, verifies every stored byte, restores the latest snapshot
as a clone into a new folder and compares it with the VM.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shlex
import shutil
import time
from typing import Any

from vmvault.backends.local import LocalBackend
from vmvault.disk import open_image
from vmvault.disk.chain import compare
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import ConfigError, VmvaultError
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository
from vmvault.sample_vm import guest_writes, make_sample_vm

from ._args import whole_number
from ._common import Output, output_options
from .progress import human_bytes

__all__ = ["register", "run_demo"]


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def run_demo(workdir: str, out: Output, *, disk_mib: int = 384) -> dict[str, Any]:
    if os.path.exists(workdir) and os.listdir(workdir):
        raise ConfigError(f"{workdir} is not empty; give another --dir or remove it")
    progress = out.progress()
    vm_dir = os.path.join(workdir, "vm")
    repo_dir = os.path.join(workdir, "repository")
    clone_dir = os.path.join(workdir, "restored-clone")
    timings: dict[str, float] = {}

    t = time.monotonic()
    out.say(f"1. making a sample VM in {vm_dir}")
    vm = make_sample_vm(vm_dir, disk_sizes=(disk_mib << 20, max(64, disk_mib // 3) << 20))
    timings["make_vm"] = time.monotonic() - t
    virtual = 0
    for d in vm.disks:
        with open_image(d) as img:
            virtual += img.size
    allocated = _dir_bytes(vm_dir)

    out.say(f"2. creating an encrypted repository in {repo_dir}")
    passphrase = os.urandom(12).hex()
    pw_file = os.path.join(workdir, "passphrase.txt")
    with open(pw_file, "w") as f:
        f.write(passphrase + "\n")
    os.chmod(pw_file, 0o600)
    repo = Repository.init(LocalBackend(repo_dir), passphrase.encode())

    out.say("3. first backup (full)")
    source = FilesSource(vm_dir)
    first = backup(repo, source, tags=["demo"], progress=progress)
    timings["backup_full"] = first.seconds
    size_after_first = _dir_bytes(repo_dir)

    out.say("4. the guest writes to its disks (about 1 % of each disk)")
    changed = sum(guest_writes(d, percent=1.0, seed=7 + i) for i, d in enumerate(vm.disks))
    with open(vm.config, "a") as f:
        f.write("memory_balloon = on\n")

    out.say("5. second backup (only new chunks are stored)")
    second = backup(repo, source, tags=["demo"], progress=progress)
    timings["backup_incremental"] = second.seconds
    size_after_second = _dir_bytes(repo_dir)

    out.say("6. verifying every stored byte (decrypt and re-hash every chunk)")
    t = time.monotonic()
    verified: dict[str, Any] = {}
    try:
        from vmvault.repo.check import check
    except ImportError:  # pragma: no cover - check lands with the maintenance module
        verified = {"check": "not available"}
    else:
        report = check(Repository.open(LocalBackend(repo_dir), passphrase.encode()), read_data=True, subset=None)
        verified = {"check_ok": report.ok, "problems": len(report.problems)}
        if not report.ok:
            raise VmvaultError(f"check found problems in the demo repository: {report.problems}")
    timings["verify"] = time.monotonic() - t

    out.say(f"7. restoring the latest snapshot as a clone into {clone_dir}")
    repo = Repository.open(LocalBackend(repo_dir), passphrase.encode())
    snap = repo.find_snapshot("latest")
    result = restore(repo, snap, clone_dir, progress=progress)
    timings["restore"] = result.seconds

    out.say("8. comparing the clone with the VM: every disk sector and every file byte")
    mismatches = []
    for path in vm.disks:
        rel = os.path.relpath(path, vm_dir)
        if compare(path, os.path.join(clone_dir, rel)):
            mismatches.append(rel)
    if not filecmp.cmp(vm.config, os.path.join(clone_dir, os.path.relpath(vm.config, vm_dir)), shallow=False):
        mismatches.append(os.path.basename(vm.config))
    if mismatches:
        raise VmvaultError(f"restored files differ from the VM: {', '.join(mismatches)}")

    stored_raw = first.raw_new + second.raw_new
    doc = {
        "workdir": os.path.abspath(workdir),
        "passphrase_file": os.path.abspath(pw_file),
        "vm": {
            "disks": len(vm.disks),
            "formats": [os.path.splitext(d)[1].lstrip(".") for d in vm.disks],
            "virtual_bytes": virtual,
            "allocated_bytes": allocated,
        },
        "backups": [first.to_dict(), second.to_dict()],
        "guest_bytes_changed": changed,
        "repository_bytes": {"after_first": size_after_first, "after_second": size_after_second},
        "dedup_ratio": round((first.bytes_read + second.bytes_read) / max(1, stored_raw), 2),
        "compression_ratio": round(stored_raw / max(1, first.bytes_new + second.bytes_new), 2),
        "verified": verified | {"restore_identical": not mismatches},
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    return doc


def _summary(doc: dict[str, Any]) -> str:
    b1, b2 = doc["backups"]
    repo = doc["repository_bytes"]
    secs = doc["seconds"]
    lines = [
        "",
        "vmvault demo: summary",
        f"  sample VM        {doc['vm']['disks']} disks ({', '.join(doc['vm']['formats'])}), "
        f"{human_bytes(doc['vm']['virtual_bytes'])} virtual, "
        f"{human_bytes(doc['vm']['allocated_bytes'])} allocated",
        f"  backup 1 (full)  read {human_bytes(b1['bytes_read'])}, stored {human_bytes(b1['bytes_added'])}"
        f" in {secs['backup_full']:.1f} s  -> snapshot {b1['snapshot'][:8]}",
        f"  guest changed    {human_bytes(doc['guest_bytes_changed'])}",
        f"  backup 2         read {human_bytes(b2['bytes_read'])}, stored {human_bytes(b2['bytes_added'])}"
        f" in {secs['backup_incremental']:.1f} s  -> snapshot {b2['snapshot'][:8]}",
        f"  repository       {human_bytes(repo['after_first'])} after backup 1, "
        f"{human_bytes(repo['after_second'])} after backup 2 (encrypted, compressed)",
        f"  dedup ratio      {doc['dedup_ratio']}x (bytes read / unique bytes stored)",
        f"  compression      {doc['compression_ratio']}x (unique bytes / stored bytes)",
        f"  verified         every chunk decrypted and re-hashed ({secs['verify']:.1f} s): "
        f"{'OK' if doc['verified'].get('check_ok', True) else 'FAILED'}",
        f"  restore          clone restored in {secs['restore']:.1f} s, identical to the VM (every sector): "
        f"{'yes' if doc['verified']['restore_identical'] else 'NO'}",
        f"  files            {doc['workdir']} (passphrase in {doc['passphrase_file']})",
        "",
        "Try it yourself:",
        f"  export VMVAULT_REPO={shlex.quote(os.path.join(doc['workdir'], 'repository'))} "
        f"VMVAULT_PASSWORD_FILE={shlex.quote(doc['passphrase_file'])}",
        "  vmvault snapshots; vmvault show latest; vmvault check --read-data",
    ]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Output(args)
    workdir = args.dir
    if args.clean and os.path.exists(workdir):
        shutil.rmtree(workdir)
    doc = run_demo(workdir, out, disk_mib=args.disk_mib)
    out.result(doc, _summary(doc))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[output_options(common)], help="back up, verify and restore a sample VM, with a summary"
    )
    p.add_argument("--dir", default="vmvault-demo", help="working folder (default ./vmvault-demo)")
    p.add_argument("--clean", action="store_true", help="remove the working folder first")
    p.add_argument(
        "--disk-mib",
        type=whole_number(16, 16384, what="a size in MiB"),
        default=384,
        help="size of the first sample disk in MiB (16 to 16384)",
    )
    p.set_defaults(func=cmd_demo)

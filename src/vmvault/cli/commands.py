"""Repository and backup commands: init, backup, snapshots, show, restore, key."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vmvault.backends import open_backend
from vmvault.engine.backup import backup
from vmvault.engine.restore import restore
from vmvault.errors import ConfigError, RepositoryError
from vmvault.hypervisors import open_source
from vmvault.repo import keys
from vmvault.repo.immutability import require_full_access
from vmvault.repo.repository import DEFAULT_CHUNK_SIZE, Repository
from vmvault.repo.snapshot import Snapshot

from ._common import Output, open_repository, read_secret, repository_location, table
from .progress import human_bytes

__all__ = ["register"]


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


# ---- init -------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    out = Output(args)
    backend = open_backend(repository_location(args))
    if args.insecure_no_encryption:
        secret = None
        kind = "passphrase"
    elif args.key_file and not os.path.exists(args.key_file):
        secret = os.urandom(32).hex().encode()
        fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret + b"\n")
        kind = "keyfile"
    else:
        secret = read_secret(args, confirm=True)
        kind = "keyfile" if args.key_file else "passphrase"
    repo = Repository.init(
        backend, secret, key_kind=kind, chunk_size=args.chunk_size, immutable_days=args.immutable_days
    )
    doc: dict[str, Any] = {"repository": backend.url, "id": repo.config.id, "encrypted": repo.config.encrypted}
    if args.immutable_days is not None:
        how = (
            "enforced by the storage (S3 Object Lock)"
            if repo.retention_enforced
            else "advisory: vmvault declines deletes, the storage does not refuse them (docs/storage.md)"
        )
        doc["immutable_days"] = args.immutable_days
        doc["retention_enforced"] = repo.retention_enforced
        warning_immutable = f"\nobjects are kept at least {args.immutable_days} days: {how}"
    else:
        warning_immutable = ""
    warning = (
        "Keep the passphrase (or key file) safe: without it the backups cannot be read by anyone, including you."
        if secret is not None
        else "WARNING: this repository is NOT encrypted."
    )
    out.result(doc, f"created vmvault repository {repo.config.id[:8]} at {backend.url}\n{warning}{warning_immutable}")
    return 0


# ---- backup -----------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    progress = out.progress()
    results = []
    if args.allow_crash_consistent:
        # read by connectors that can fall back (Hyper-V when VSS in the guest fails)
        os.environ["VMVAULT_HYPERV_ALLOW_CRASH_CONSISTENT"] = "1"
    for spec in args.source:
        source = open_source(spec)
        out.say(f"backing up {source.location}")
        result = backup(repo, source, tags=args.tag or [], progress=progress, full=args.full)
        results.append(result)
        snap = result.snapshot
        incremental = [d.name for d in snap.disks if d.stats.get("incremental")]
        lines = [
            f"snapshot {snap.short_id} saved ({snap.consistency})",
            f"  read {human_bytes(result.bytes_read)}, added {human_bytes(result.bytes_new)} to the repository "
            f"({result.chunks_new} new chunks) in {result.seconds:.1f} s",
        ]
        if incremental:
            lines.append(f"  changed-block tracking used for: {', '.join(incremental)}")
        for w in result.warnings:
            lines.append(f"  warning: {w}")
        if not out.json:
            out.result(None, "\n".join(lines))
    if out.json:
        out.result([r.to_dict() for r in results] if len(results) > 1 else results[0].to_dict())
    return 0


# ---- snapshots / show -------------------------------------------------------------------


def _snap_row(s: Snapshot) -> list[object]:
    return [
        s.short_id,
        s.time[:19].replace("T", " "),
        s.hostname,
        s.vm.get("name", ""),
        s.consistency,
        human_bytes(s.total_size()),
        ",".join(s.tags),
        s.source.get("location", ""),
    ]


def snapshot_summary(s: Snapshot) -> dict[str, Any]:
    return {
        "id": s.id,
        "short_id": s.short_id,
        "time": s.time,
        "hostname": s.hostname,
        "username": s.username,
        "source": s.source,
        "vm": s.vm.get("name"),
        "consistency": s.consistency,
        "tags": s.tags,
        "parent": s.parent,
        "size": s.total_size(),
        "disks": [{"name": d.name, "size": d.size, "format": d.format, "layer": d.layer} for d in s.disks],
        "files": len(s.files),
        "warnings": s.warnings,
    }


def cmd_snapshots(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    problems: list[str] = []
    snaps = repo.list_snapshots(on_error=lambda sid, exc: problems.append(f"{sid[:8]}: {exc}"))
    if args.source_filter:
        snaps = [s for s in snaps if s.source.get("location") == os.path.abspath(args.source_filter)]
    if args.tag:
        snaps = [s for s in snaps if set(args.tag) <= set(s.tags)]
    if out.json:
        out.result([snapshot_summary(s) for s in snaps])
    else:
        headers = ["ID", "Time", "Host", "VM", "Consistency", "Size", "Tags", "Source"]
        out.result(None, table(headers, [_snap_row(s) for s in snaps]) + f"\n{len(snaps)} snapshots")
    for p in problems:
        out.progress().warn(f"unreadable snapshot {p}")
    return 3 if problems else 0


def cmd_show(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    snap = repo.find_snapshot(args.snapshot)
    if out.json:
        doc = snap.to_dict()
        doc["id"] = snap.id
        for d in doc["disks"]:
            d["index_blocks"] = len(d.pop("index"))
            d.pop("layer_map", None)
        for f in doc["files"]:
            f["chunks"] = len(f["chunks"])
        out.result(doc)
        return 0
    lines = [
        f"snapshot {snap.id}",
        f"  time         {snap.time}",
        f"  host         {snap.hostname} ({snap.username})",
        f"  source       {snap.source.get('kind')}: {snap.source.get('location')}",
        f"  vm           {snap.vm.get('name', '')} {snap.vm.get('id', snap.vm.get('uuid', ''))}",
        f"  consistency  {snap.consistency}",
        f"  parent       {snap.parent or '-'}",
        f"  tags         {', '.join(snap.tags) or '-'}",
        f"  program      {snap.program}",
        "disks:",
    ]
    for d in snap.disks:
        kind = f"layer of {d.parent}" if d.layer else "disk"
        lines.append(
            f"  {d.name}  {d.format}  {human_bytes(d.size)}  {kind}  read {human_bytes(d.stats.get('bytes_read', 0))}"
        )
    if snap.files:
        lines.append("files:")
        for f in snap.files:
            lines.append(f"  {f.name}  {human_bytes(f.size)}  {oct(f.mode)}")
    for w in snap.warnings:
        lines.append(f"warning: {w}")
    out.result(None, "\n".join(lines))
    return 0


# ---- restore ----------------------------------------------------------------------------


def cmd_restore(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    snap = repo.find_snapshot(args.snapshot)
    target = args.target
    if args.as_clone:
        from vmvault.engine.clone import restore_clone

        result = restore_clone(
            repo, snap, target, args.as_clone, format=args.format, flatten=args.flatten, progress=out.progress()
        )
    else:
        result = restore(
            repo,
            snap,
            target,
            format=args.format,
            flatten=args.flatten,
            include=args.include or None,
            progress=out.progress(),
        )
    text = [f"restored snapshot {snap.short_id} to {result.target} in {result.seconds:.1f} s"]
    for d in result.disks:
        text.append(f"  disk {d['path']} ({d['format']}, {human_bytes(d['size'])})")
    doc = result.to_dict()
    if snap.source.get("kind") == "qemu" and not args.include:
        # a runnable definition beside the disks: a QEMU command line and a libvirt domain
        from vmvault.hypervisors.qemu_restore import write_restore_files

        vm = write_restore_files(
            snap.vm,
            {d["name"]: d["path"] for d in result.disks},
            result.target,
            as_clone=args.as_clone,
            formats={d["name"]: d["format"] for d in result.disks},
        )
        doc["vm"] = {"name": vm.name, "uuid": vm.uuid, "script": vm.script, "libvirt_xml": vm.xml, "macs": vm.macs}
        text.append(f"  start it with {vm.script} (or virsh define {vm.xml}); uuid {vm.uuid}")
    text.append(f"  {len(result.files)} files, {human_bytes(result.bytes_written)} written")
    out.result(doc, "\n".join(text))
    return 0


# ---- key --------------------------------------------------------------------------------


def _new_secret(args: argparse.Namespace) -> bytes:
    """The new key's secret: --new-key-file (created when missing), --new-password-file,
    VMVAULT_NEW_PASSWORD, or a prompt (asked twice)."""
    if args.new_key_file:
        if not os.path.exists(args.new_key_file):
            secret = os.urandom(32).hex().encode()
            fd = os.open(args.new_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret + b"\n")
            return secret
        return read_secret(argparse.Namespace(key_file=args.new_key_file))
    if args.new_password_file:
        return read_secret(argparse.Namespace(password_file=args.new_password_file, key_file=None))
    env = os.environ.get("VMVAULT_NEW_PASSWORD")
    if env:
        return env.encode()
    import getpass
    import sys

    if not sys.stdin.isatty():
        raise ConfigError("give the new passphrase with --new-password-file or VMVAULT_NEW_PASSWORD")
    first = getpass.getpass("new passphrase: ")
    if len(first) < 8:
        raise ConfigError("choose a passphrase of at least 8 characters")
    if getpass.getpass("repeat new passphrase: ") != first:
        raise ConfigError("the passphrases differ; nothing was changed")
    return first.encode()


def cmd_key(args: argparse.Namespace) -> int:
    out = Output(args)
    repo = open_repository(args)
    if args.key_command == "list":
        infos = keys.list_keys(repo.backend)
        rows = [
            [("*" if k.id == repo.key_id else " ") + k.id[:8], k.kind, k.role, k.username, k.hostname, k.created]
            for k in infos
        ]
        out.result(
            [vars(k) | {"current": k.id == repo.key_id} for k in infos],
            table(["ID", "Kind", "Role", "User", "Host", "Created"], rows),
        )
        return 0
    if not repo.config.encrypted:
        raise RepositoryError("this repository is not encrypted; it has no keys")
    require_full_access(repo, "key management")
    if args.key_command in ("add", "passwd"):
        secret = _new_secret(args)
        kind = "keyfile" if args.new_key_file else "passphrase"
        role = getattr(args, "role", None) or keys.FULL
        new_id = keys.add_key(repo.backend, repo.key, secret, kind=kind, role=role)
        if args.key_command == "passwd":
            repo.backend.delete(f"keys/{repo.key_id}")
            out.result({"added": new_id, "removed": repo.key_id}, f"changed: new key {new_id[:8]}, old key removed")
        else:
            out.result({"added": new_id}, f"added key {new_id[:8]}")
        return 0
    if args.key_command == "remove":
        keys.remove_key(repo.backend, args.key_id, current=repo.key_id)
        out.result({"removed": args.key_id}, f"removed key {args.key_id}")
        return 0
    raise ConfigError(f"unknown key command {args.key_command}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common], help="create a repository")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE, help="fixed chunk size (default 256K)")
    p.add_argument("--insecure-no-encryption", action="store_true", help="store data unencrypted (not recommended)")
    p.add_argument(
        "--immutable-days",
        type=int,
        metavar="N",
        help="keep data, index and snapshot objects at least N days (S3 Object Lock enforces it; see docs/storage.md)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("backup", parents=[common], help="back up VMs, VM folders or disk images")
    p.add_argument("source", nargs="+", help="image file, VM folder, qemu+unix://SOCKET, hyperv://HOST/VM ...")
    p.add_argument("--tag", action="append", help="tag the snapshot (repeatable)")
    p.add_argument("--full", action="store_true", help="ignore change tracking; read every allocated byte")
    p.add_argument(
        "--allow-crash-consistent",
        action="store_true",
        help="if an application-consistent checkpoint fails, take a crash-consistent one (reported loudly)",
    )
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("snapshots", parents=[common], help="list snapshots")
    p.add_argument("--source", dest="source_filter", help="only snapshots of this source")
    p.add_argument("--tag", action="append", help="only snapshots with this tag")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("show", parents=[common], help="show one snapshot in detail")
    p.add_argument("snapshot", help="snapshot id (prefix) or 'latest'")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("restore", parents=[common], help="restore a snapshot into a folder")
    p.add_argument("snapshot", help="snapshot id (prefix) or 'latest'")
    p.add_argument("--target", required=True, help="folder to restore into (must not hold the same files)")
    p.add_argument("--format", choices=["raw", "vhdx", "vhd", "qcow2"], help="convert disks to this format")
    p.add_argument("--flatten", action="store_true", help="current state only: no checkpoint chain")
    p.add_argument("--as-clone", metavar="NAME", help="restore as a new VM with a new identity beside the original")
    p.add_argument("--include", action="append", help="only this disk or file name (repeatable)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("key", parents=[common], help="manage passphrases and key files")
    ks = p.add_subparsers(dest="key_command", required=True)
    ks.add_parser("list", parents=[common], help="list keys")
    for name, text in (("add", "add a passphrase or key file"), ("passwd", "change the passphrase in use")):
        kp = ks.add_parser(name, parents=[common], help=text)
        kp.add_argument("--new-password-file", help="read the new passphrase from this file")
        kp.add_argument("--new-key-file", help="use (or create) this key file as the new key")
        kp.add_argument(
            "--role",
            choices=list(keys.ROLES),
            default=keys.FULL,
            help="backup-only: the key may back up and restore but not forget/prune (advisory; docs/storage.md)",
        )
    kp = ks.add_parser("remove", parents=[common], help="remove a key")
    kp.add_argument("key_id")
    p.set_defaults(func=cmd_key)

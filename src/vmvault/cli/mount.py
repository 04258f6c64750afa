"""``vmvault mount``: a read-only FUSE view of a repository's snapshots."""

from __future__ import annotations

import argparse
import sys

from vmvault import platform
from vmvault.engine.mountfs import MountView, binding, check_mountpoint, serve
from vmvault.engine.reader import DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD, FAR_CACHE_BYTES, FAR_READAHEAD
from vmvault.errors import ConfigError, SnapshotNotFoundError

from ._args import size, snapshot_ref, whole_number
from ._common import EXIT, Output, add_filter_args, open_repository, pick_snapshot, plural, snapshot_filter
from ._terminal import terminal_safe
from .progress import human_bytes

__all__ = ["register"]


def group_id(text: str) -> int:
    """A group given by name or number."""
    if text.isdigit() and text.isascii():
        return int(text)
    gid = platform.group_id(text)
    if gid is None:
        raise ConfigError(f"--allow-group: no group named {text!r}")
    return gid


def cmd_mount(args: argparse.Namespace) -> int:
    out = Output(args)
    notes: list[str] = []
    group = None if args.allow_group is None else group_id(args.allow_group)
    binding()  # a missing library says so before anything else
    mountpoint = check_mountpoint(args.mountpoint, notes=notes)  # before asking for a passphrase
    repo = open_repository(args)
    if args.snapshot is not None:
        snaps = [pick_snapshot(repo, args.snapshot, args)]
    else:
        problems: list[str] = []
        # summaries: each file opened reads its snapshot whole again (repository-format.md 12.10)
        snaps = repo.list_snapshots(on_error=lambda sid, exc: problems.append(f"{sid[:8]}: {exc}"), summaries=True)
        for p in problems:
            out.progress().warn(f"unreadable snapshot left out: {p}")
        snaps = snapshot_filter(args).select(snaps)
    if not snaps:
        raise SnapshotNotFoundError("no snapshot matches; nothing to mount")
    view = MountView(repo, snaps, cache_bytes=args.cache_size, readahead=args.readahead, group=group)
    for note in notes:
        out.progress().warn(note)
    if args.allow_other and group is None:
        out.progress().warn(f"--allow-other: every user of this host can read the decrypted disks at {mountpoint}")

    def ready() -> None:
        out.say(
            f"mounted {view.snapshots} snapshots of {len(view.root.children['by-vm'].children)} VMs read-only at "
            f"{mountpoint} (cache {human_bytes(view.cache.max_bytes)}); Ctrl-C, SIGTERM or fusermount3 -u unmounts"
        )
        sys.stdout.flush()

    try:
        serve(
            view,
            mountpoint,
            allow_other=args.allow_other or group is not None,
            direct_io=args.direct_io,
            on_ready=ready,
        )
    finally:
        view.close()
    out.say(
        f"unmounted {terminal_safe(mountpoint)} ({plural(view.reads_served, 'read')} answered, "
        f"{human_bytes(view.bytes_served)})"
    )
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "mount",
        parents=[common],
        help="a read-only view of the snapshots as files (FUSE): disks as raw images, the VMs' other files",
        description=(
            "Mount the repository's snapshots read-only at MOUNTPOINT: by-vm/<vm>/<time>_<id>/ holds each disk "
            "as a flat raw image (checkpoint layers resolved, holes as holes) and the VM's other files; "
            "by-vm/<vm>/latest links to the newest. Runs in the foreground until Ctrl-C, SIGTERM or "
            "fusermount3 -u MOUNTPOINT. Needs libfuse 3 (Debian: fuse3) and the mfusepy package (vmvault[mount])."
        ),
    )
    p.add_argument("mountpoint", help="an existing empty folder")
    p.add_argument("snapshot", nargs="?", type=snapshot_ref, help="only this snapshot (id, prefix, or latest)")
    p.add_argument(
        "--cache-size",
        type=size(0, 1 << 40),
        metavar="SIZE",
        help=f"memory for decrypted chunks, shared by every reader (default {DEFAULT_CACHE_BYTES >> 20}M from a "
        f"local repository, {FAR_CACHE_BYTES >> 20}M from SFTP or S3)",
    )
    p.add_argument(
        "--readahead",
        type=whole_number(0, 256, what="a chunk count"),
        metavar="CHUNKS",
        help=f"chunks fetched ahead of a sequential reader, at most (default {DEFAULT_READAHEAD} from a local "
        f"repository, {FAR_READAHEAD} from SFTP or S3, where they come in several reads at once; at most half "
        "the cache; 0: none)",
    )
    p.add_argument(
        "--direct-io",
        action="store_true",
        help="serve every read past the kernel's page cache (FUSE direct_io): whole-disk copies by any program "
        "(cp, rsync) run as fast as with O_DIRECT; small reads lose the kernel's read-ahead, and the files "
        "cannot be memory-mapped",
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--allow-group",
        metavar="GROUP",
        help="let the members of GROUP (name or number, e.g. libvirt-qemu) read the mount, and no other user; "
        "needs user_allow_other in /etc/fuse.conf unless root",
    )
    who.add_argument(
        "--allow-other",
        action="store_true",
        help="let every user of this host read the decrypted disks; needs user_allow_other in /etc/fuse.conf "
        "unless root",
    )
    add_filter_args(p, scope="Only the snapshots matching every option given (with SNAPSHOT: it must match).")
    p.set_defaults(func=cmd_mount)

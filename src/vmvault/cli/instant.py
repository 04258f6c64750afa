"""``vmvault instant-restore``: run a snapshot's VM at once from the repository, copy it to local disks."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from vmvault.backends import open_backend
from vmvault.engine.reader import DEFAULT_CACHE_BYTES, FAR_CACHE_BYTES
from vmvault.errors import ConfigError
from vmvault.repo import secret as secrets
from vmvault.repo.repository import Repository

from ._args import size, snapshot_ref, whole_number
from ._common import EXIT, Output, add_filter_args, given_secret, pick_snapshot, report_warnings, repository_location
from .progress import human_bytes

__all__ = ["register"]


def _secret(args: argparse.Namespace) -> bytes:
    given = given_secret(args)
    return given.value if given is not None else secrets.prompt_passphrase()


def _open(args: argparse.Namespace) -> tuple[str, bytes, Repository]:
    """The repository, and what the export process needs to open it itself."""
    location = repository_location(args)
    secret = _secret(args)
    repo = Repository.open(open_backend(location), secret)
    report_warnings(repo)
    return location, secret, repo


class _Progress:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.reporter = out.progress()
        self.started = False
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.started:
            self.reporter.start("copying to local disks", total)
            self.started = True
        if done > self.done:
            self.reporter.advance(done - self.done)
            self.done = done

    def finish(self) -> None:
        if self.started:
            self.reporter.finish()


def _report(out: Output, state: dict[str, Any], target: Path) -> int:
    phase = state["phase"]
    text = f"{target}: {phase}: {state.get('message', '')}"
    out.result({k: v for k, v in state.items() if k != "qemu"} | {"target": str(target)}, text)
    if phase == "paused":
        return EXIT["error"]
    return EXIT["ok"]


def _follow(out: Output, target: Path) -> int:
    from vmvault.engine import instant  # imported when used: it loads the QEMU and libvirt connectors

    progress = _Progress(out)
    try:
        state = instant.watch(target, on_progress=progress)
    except KeyboardInterrupt:
        progress.finish()
        print(
            f"\nvmvault: stopped watching; the VM and the copy go on. Follow with "
            f"`vmvault instant-restore --status {target}` or `--resume {target}`",
            file=sys.stderr,
        )
        return EXIT["interrupted"]
    progress.finish()
    return _report(out, state, target)


def cmd_instant(args: argparse.Namespace) -> int:
    from vmvault.engine import instant  # imported when used: it loads the QEMU and libvirt connectors

    out = Output(args)
    modes = [m for m in ("status", "resume", "abort") if getattr(args, m) is not None]
    if len(modes) > 1:
        raise ConfigError("give one of --status, --resume, --abort")
    if args.remove_disks and modes != ["abort"]:
        raise ConfigError("--remove-disks goes with --abort")
    if modes:
        if args.snapshot is not None or args.target is not None:
            raise ConfigError(f"--{modes[0]} DIR takes no SNAPSHOT or --target")
        target = Path(getattr(args, modes[0]))
        if modes == ["status"]:
            return _status(out, target)
        if modes == ["abort"]:
            state = instant.abort(target, remove_disks=args.remove_disks)
            out.result(state, f"{target}: {state['message']}")
            return EXIT["ok"]
        location, secret, _repo = _open(args)
        state = instant.resume(location, secret, target, on_event=out.say)
        if state["phase"] in ("done", "aborted"):
            return _report(out, state, target)
        if args.no_wait:
            return _report(out, state, target)
        return _follow(out, target)
    if args.snapshot is None or args.target is None:
        raise ConfigError("give SNAPSHOT and --target DIR (or --status/--resume/--abort DIR)")
    location, secret, repo = _open(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    options = instant.InstantOptions(
        accel=args.accel or ("kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"),
        memory_mb=args.memory,
        cpus=args.cpus,
        qemu_args=args.qemu_arg,
        speed=args.speed,
        cache_bytes=args.cache_size,
        libvirt_uri=args.libvirt_uri,
        qemu_as_root=args.qemu_as_root,
    )
    target = Path(args.target)
    started = time.monotonic()
    instant.start(location, secret, snap, target, options, on_event=out.say)
    out.say(
        f"VM running {time.monotonic() - started:.1f} s after the start; serial console in {target}/serial.log"
        " (its newest MiB, brought up to date whenever vmvault looks at the VM: --status)"
    )
    if args.no_wait:
        return _report(out, instant.load_state(target.absolute()), target)
    return _follow(out, target)


def _status(out: Output, target: Path) -> int:
    from vmvault.engine import instant  # imported when used: it loads the QEMU and libvirt connectors

    state = instant.status(target)
    live = state["live"]
    lines = [f"{target}: {state['phase']}: {state.get('message', '')}"]
    lines.append(f"snapshot {str(state['snapshot'])[:8]}, {len(state['disks'])} disk(s)")
    lines.append(
        f"QEMU {'running' if live['qemu'] else 'not running'}"
        + (f" (VM {live['vm']})" if live.get("vm") else "")
        + f"; NBD export {'running' if live['export'] else 'not running'}"
    )
    if "total" in live:
        pct = 100 * live["copied"] / max(live["total"], 1)
        lines.append(f"copied {human_bytes(live['copied'])} of {human_bytes(live['total'])} ({pct:.0f} %)")
    if live.get("qmp_error"):
        lines.append(f"QMP: {live['qmp_error']}")
    out.result({k: v for k, v in state.items() if k != "qemu"} | {"target": str(target)}, "\n".join(lines))
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "instant-restore",
        parents=[common],
        help="run a snapshot's VM at once from the repository, then move it to local disks",
        description=(
            "Start the VM of a snapshot at once: local qcow2 overlays in DIR (the guest's writes stay there) "
            "whose backing is an NBD export of the repository, a QEMU VM on them, and a background copy "
            "(QEMU block-stream) of every block to the overlays, after which the VM needs the repository no "
            "more. The export and the VM run in processes of their own: stopping this command stops neither. "
            "A read error pauses the VM and the copy; --resume DIR continues, --abort DIR stops."
        ),
    )
    p.add_argument("snapshot", nargs="?", type=snapshot_ref, help="snapshot id (or prefix), or latest")
    p.add_argument("--target", metavar="DIR", help="a new or empty folder for the overlays, sockets, logs and state")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--qemu", action="store_true", help="run the VM in plain QEMU (the default)")
    how.add_argument(
        "--libvirt-uri",
        metavar="URI",
        help="run it as a transient libvirt domain on this connection (QEMU must be able to read DIR)",
    )
    p.add_argument("--status", metavar="DIR", help="show an instant restore's state")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted or paused instant restore")
    p.add_argument("--abort", metavar="DIR", help="stop the VM and the export")
    p.add_argument("--remove-disks", action="store_true", help="with --abort: remove the overlays too")
    p.add_argument("--no-wait", action="store_true", help="return once the VM runs; do not follow the copy")
    p.add_argument("--accel", choices=["tcg", "kvm"], help="QEMU accelerator (default kvm where /dev/kvm is usable)")
    p.add_argument("--memory", type=whole_number(64, 1 << 20), metavar="MIB", help="memory (default: the snapshot's)")
    p.add_argument("--cpus", type=whole_number(1, 64), metavar="N", help="CPUs (default: the snapshot's)")
    p.add_argument(
        "--qemu-arg",
        action="append",
        default=[],
        metavar="ARG",
        help=(
            "an extra QEMU argument (repeat; e.g. --qemu-arg=-vnc --qemu-arg=:1, --qemu-arg=-nic --qemu-arg=user); "
            "QEMU runs in its seccomp sandbox unless these give -sandbox (a bridge or tap helper needs -sandbox off)"
        ),
    )
    p.add_argument(
        "--qemu-as-root",
        action="store_true",
        help=(
            "run plain QEMU as root when vmvault runs as root (by default it runs under transient ids of its own, "
            "with no groups or capabilities: a file --qemu-arg names must then be readable by others)"
        ),
    )
    p.add_argument("--speed", type=size(0, 1 << 40), default=0, metavar="SIZE", help="copy at most SIZE per second")
    p.add_argument(
        "--cache-size",
        type=size(0, 1 << 40),
        metavar="SIZE",
        help=f"the export's chunk cache (default {DEFAULT_CACHE_BYTES >> 20}M from a local repository, "
        f"{FAR_CACHE_BYTES >> 20}M from SFTP or S3)",
    )
    add_filter_args(p, scope="'latest' is the newest snapshot matching every option given (an id must match them).")
    p.set_defaults(func=cmd_instant)

"""``vmvault verify-boot``: boot a snapshot in an isolated, throw-away VM and report whether it came up."""

from __future__ import annotations

import argparse
import os

from vmvault.errors import TargetError

from ._args import size, snapshot_ref, whole_number
from ._common import EXIT, Output, add_filter_args, open_repository, pick_snapshot, signals_interrupt
from .progress import human_bytes

__all__ = ["HEARTBEATS", "register"]

#: what --heartbeat takes: engine/verify_boot.py's HEARTBEATS, kept here so that building the
#: parser does not load the QEMU connector (a test holds the two equal)
HEARTBEATS = ("agent", "marker", "screen")


def cmd_verify_boot(args: argparse.Namespace) -> int:
    # imported when used: it loads the QEMU connector
    from vmvault.engine.verify_boot import VerifyBootOptions, verify_boot, write_screenshot

    out = Output(args)
    shot = args.screenshot
    if shot is not None and os.path.lexists(shot):
        raise TargetError("a file of that name exists; the screenshot is never written over it", path=shot)
    options = VerifyBootOptions(
        timeout=float(args.timeout),
        marker=args.marker,
        heartbeats=tuple(args.heartbeat) if args.heartbeat else None,
        screen_stable=float(args.screen_stable),
        network=args.network,
        accel=args.accel,
        firmware=args.firmware,
        memory=args.memory,
        disk_bus=args.disk_bus,
        boot_disk=args.boot_disk,
        work_dir=args.work_dir,
        max_writes=args.max_writes,
    )
    repo = open_repository(args)
    snap = pick_snapshot(repo, args.snapshot, args)
    out.say(f"booting snapshot {snap.short_id} ({snap.source.get('location', '?')}, {snap.time}) ...")
    with signals_interrupt(then_ignore=True):  # the VM is stopped and its files removed first
        result = verify_boot(repo, snap, options)
    if shot is not None and result.screenshot is not None:
        result.screenshot_path = write_screenshot(result.screenshot, shot)
    doc = result.to_dict()
    vm = doc["vm"]
    hardware = (
        f"{result.accel.upper()}, {vm['firmware'].upper()}, {human_bytes(vm['memory'])}, {vm['disk_bus']} "
        f"disk{'s' if len(vm['disks']) > 1 else ''}, network {vm['network']}"
    )
    if result.passed:
        lines = [f"snapshot {snap.short_id} boots: {result.message} after {result.seconds:.1f} s ({hardware})"]
    else:
        lines = [
            f"snapshot {snap.short_id} did NOT boot ({result.reason}): {result.message} after "
            f"{result.seconds:.1f} s ({hardware})"
        ]
        tail = [line for line in result.serial_tail.splitlines() if line.strip()][-15:]
        if tail:
            lines.append("last lines of the serial console:")
            lines += [f"  {line}" for line in tail]
    if result.screenshot_path:
        lines.append(f"screenshot: {result.screenshot_path}")
    elif shot is not None:
        lines.append("no screenshot: the VM showed no screen before it stopped")
    out.result(doc, "\n".join(lines))
    return EXIT["ok"] if result.passed else EXIT["problems"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "verify-boot",
        parents=[common],
        help="boot a snapshot in an isolated, throw-away VM and check that it comes up",
        description=(
            "Boot the snapshot's disks straight from the repository in an isolated QEMU (throw-away overlays, "
            "no network, sandboxed; nothing is written to the repository) and wait for a heartbeat: the guest "
            "agent answering guest-ping, a marker on the serial console, or (for a VM recorded without a guest "
            "agent) a stable, non-blank screen. Exit status 0: it booted; 3: it did not (the reason is named: "
            "no-bootable-disk, kernel-panic, guest-stopped, qemu-exited, timeout, too-many-writes, damaged-backup)."
        ),
    )
    p.add_argument("snapshot", type=snapshot_ref, help="snapshot id (prefix of 4+ digits) or 'latest'")
    p.add_argument(
        "--timeout",
        type=whole_number(1, 86400, what="a number of seconds"),
        default=300,
        help="seconds to wait for a heartbeat (default 300)",
    )
    p.add_argument("--screenshot", metavar="FILE.png", help="keep the last screen as a PNG file (a new file)")
    p.add_argument("--marker", metavar="TEXT", help="a text the guest prints on its serial console once it is up")
    p.add_argument(
        "--heartbeat",
        action="append",
        choices=HEARTBEATS,
        help="what counts as up (repeatable; default: agent, plus marker with --marker, plus screen for a VM "
        "recorded without a guest agent)",
    )
    p.add_argument(
        "--screen-stable",
        type=whole_number(2, 3600, what="a number of seconds"),
        default=20,
        help="seconds a non-blank screen must stay unchanged for the screen heartbeat (default 20)",
    )
    p.add_argument(
        "--network",
        choices=("none", "restricted"),
        default="none",
        help="none (default): no network card; restricted: a user-mode card that reaches neither host nor network",
    )
    p.add_argument(
        "--accel",
        choices=("auto", "tcg", "kvm"),
        default="auto",
        help="auto (default): KVM when /dev/kvm is usable and the CPU has vmx/svm, else TCG",
    )
    p.add_argument("--firmware", choices=("bios", "uefi"), help="override the firmware the snapshot records")
    p.add_argument("--memory", type=size(128 << 20, 16 << 30), help="override the snapshot's memory (e.g. 2G)")
    p.add_argument("--disk-bus", choices=("virtio", "sata", "ide", "scsi"), help="override the disk bus")
    p.add_argument("--boot-disk", metavar="NAME", help="the disk to boot from (as `vmvault show` names it)")
    p.add_argument("--work-dir", metavar="DIR", help="where the private work folder is made (default: the temp folder)")
    p.add_argument(
        "--max-writes",
        type=size(64 << 20, 1 << 40),
        default=8 << 30,
        help="stop the guest when its throw-away overlays take more than this on the host (default 8G)",
    )
    add_filter_args(p)
    p.set_defaults(func=cmd_verify_boot)

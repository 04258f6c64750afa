"""``vmvault service install|uninstall|status``: ``vmvault daemon`` started at boot, as a
systemd unit on Linux or a Task Scheduler task on Windows (docs/automation.md, "Running as a
service"; why a task and not ``sc.exe create``: :mod:`vmvault.automation.service`)."""

from __future__ import annotations

import argparse
import os

from vmvault.automation.service import (
    KINDS,
    ServiceSpec,
    check_service_files,
    daemon_command,
    default_kind,
    open_service,
)
from vmvault.errors import ConfigError

from ._common import EXIT, Output, output_options

__all__ = ["register"]


def cmd_service(args: argparse.Namespace) -> int:
    out = Output(args)
    service = open_service(args.kind, args.name, unit_dir=getattr(args, "unit_dir", None))
    if args.service_command == "install":
        config = args.config or os.environ.get("VMVAULT_CONFIG")
        if not config:
            raise ConfigError("no configuration given: use --config vmvault.toml or set VMVAULT_CONFIG")
        spec = ServiceSpec(args.name, daemon_command(config, args.executable), args.user)
        if args.print:
            out.result({"kind": args.kind, "definition": service.definition(spec)}, service.definition(spec))
            return EXIT["ok"]
        if args.kind == "systemd":
            check_service_files(spec.command, spec.command[-1], args.user)
        done = service.install(spec, start=not args.no_start, force=args.force)
        out.result({"kind": args.kind, "name": args.name, "done": done}, "\n".join(done))
    elif args.service_command == "uninstall":
        done = service.uninstall()
        out.result({"kind": args.kind, "name": args.name, "done": done}, "\n".join(done))
    else:
        state = service.status()
        out.result({"kind": args.kind, "name": args.name, **state}, "\n".join(f"{k}: {v}" for k, v in state.items()))
        if state["installed"] != "yes":
            return EXIT["problems"]
    return EXIT["ok"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    output = output_options(common)
    p = sub.add_parser(
        "service",
        parents=[output],
        help="run `vmvault daemon` at boot (systemd unit / Windows scheduled task)",
        description="Install, remove or look at the service that starts `vmvault daemon --config FILE` at boot: "
        "a systemd unit on Linux, a Task Scheduler task on Windows.",
    )
    ss = p.add_subparsers(dest="service_command", required=True, metavar="COMMAND")

    def base(name: str, text: str) -> argparse.ArgumentParser:
        q = ss.add_parser(name, parents=[output], help=text)
        q.add_argument("--name", default="vmvault", help="the unit / task name (default: vmvault)")
        q.add_argument("--kind", choices=KINDS, default=default_kind(), help="systemd or task (default: this system's)")
        q.add_argument(
            "--unit-dir", metavar="DIR", help="where systemd units are written (default: /etc/systemd/system)"
        )
        q.set_defaults(func=cmd_service)
        return q

    q = base("install", "write and enable the service, and start it")
    q.add_argument("--config", "-c", metavar="FILE", help="the automation configuration (or VMVAULT_CONFIG)")
    q.add_argument("--user", help="the account it runs as (default: root / SYSTEM)")
    q.add_argument("--executable", metavar="PROGRAM", help="the vmvault program to run (default: this one)")
    q.add_argument("--no-start", action="store_true", help="enable only; it starts at the next boot")
    q.add_argument("--force", action="store_true", help="replace an existing definition of that name")
    q.add_argument("--print", action="store_true", help="print the unit / task XML and install nothing")
    base("uninstall", "stop the service and remove it")
    base("status", "what systemd / the Task Scheduler says of it (exit 3 when not installed)")

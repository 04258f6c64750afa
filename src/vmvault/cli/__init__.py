"""The ``vmvault`` command line.

Conventions follow restic: the repository comes from ``-r/--repo`` or ``VMVAULT_REPO``,
the passphrase from ``VMVAULT_PASSWORD``, ``VMVAULT_PASSWORD_FILE``/``--password-file``,
``--key-file`` or a prompt. ``--json`` prints one JSON document on stdout; progress bars
appear only on a terminal. Exit codes are listed in ``EXIT`` and in the README.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vmvault import __version__
from vmvault.errors import (
    BackendConnectionError,
    BackendError,
    ConfigError,
    FormatError,
    HypervisorError,
    IntegrityError,
    LockedError,
    NotARepositoryError,
    PasswordError,
    SourceError,
    StorageFullError,
    VmvaultError,
)

from ._common import EXIT

__all__ = ["EXIT", "build_parser", "main"]

#: modules that add subcommands: each has ``register(subparsers, common_parser)``
_COMMAND_MODULES = (
    "vmvault.cli.commands",
    "vmvault.cli.maintenance",
    "vmvault.cli.demo",
    "vmvault.cli.disk",
    "vmvault.cli.automation",
    "vmvault.cli.audit",
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("global options")
    g.add_argument("-r", "--repo", default=argparse.SUPPRESS, help="repository location (or VMVAULT_REPO)")
    g.add_argument("--password-file", default=argparse.SUPPRESS, help="read the passphrase from this file")
    g.add_argument("--key-file", default=argparse.SUPPRESS, help="use a key file instead of a passphrase")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress or chatter")

    parser = argparse.ArgumentParser(
        prog="vmvault",
        description="Real backups of virtual machines: deduplicated, encrypted, verified; live or offline.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"vmvault {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # a face not built yet
            raise
        module.register(sub, common)
    return parser


def _exit_code(exc: VmvaultError) -> int:
    if isinstance(exc, NotARepositoryError):
        return EXIT["no_repository"]
    if isinstance(exc, LockedError):
        return EXIT["locked"]
    if isinstance(exc, PasswordError):
        return EXIT["password"]
    if isinstance(exc, StorageFullError):
        return EXIT["storage_full"]
    if isinstance(exc, SourceError | FormatError | HypervisorError):
        return EXIT["source"]
    if isinstance(exc, ConfigError):
        return EXIT["usage"]
    return EXIT["error"]


def _hint(exc: VmvaultError) -> str | None:
    if isinstance(exc, StorageFullError):
        return "free space on the repository's storage and run the backup again; stored data is reused"
    if isinstance(exc, BackendConnectionError):
        return "the storage could not be reached; run the command again when it is back (uploaded data is reused)"
    if isinstance(exc, IntegrityError):
        return "run `vmvault check --read-data` to see what the damage affects"
    if isinstance(exc, BackendError):
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # global options may be given before or after the command; SUPPRESS keeps the later
    # parser from overwriting the earlier one, so fill in what was not given at all
    for name, default in (
        ("repo", None),
        ("password_file", None),
        ("key_file", None),
        ("json", False),
        ("quiet", False),
    ):
        if not hasattr(args, name):
            setattr(args, name, default)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT["usage"]
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("\ninterrupted; nothing half-written is visible, and stored data is reused next time", file=sys.stderr)
        return EXIT["interrupted"]
    except VmvaultError as exc:
        print(f"vmvault: error: {exc}", file=sys.stderr)
        hint = _hint(exc)
        if hint:
            print(f"vmvault: {hint}", file=sys.stderr)
        return _exit_code(exc)
    except BrokenPipeError:
        return EXIT["ok"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``vmvault`` command line.

Conventions follow restic: the repository comes from ``-r/--repo`` or ``VMVAULT_REPO``,
the passphrase from ``VMVAULT_PASSWORD``, ``VMVAULT_PASSWORD_FILE``/``--password-file``,
``--key-file`` or a prompt. ``--json`` prints one JSON document on stdout; progress bars
appear only on a terminal. Exit codes are listed in ``EXIT`` and in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence

from vmvault import __version__, platform, times
from vmvault.errors import (
    BackendConnectionError,
    BackendError,
    BackendUnreachableError,
    CleanupError,
    ConfigError,
    FormatError,
    HypervisorError,
    IntegrityError,
    JobCancelled,
    LockedError,
    NotARepositoryError,
    PasswordError,
    SourceError,
    StorageFullError,
    TargetError,
    TargetFullError,
    VmvaultError,
)

from ._args import Parser, harden
from ._common import EXIT, CommonOptions, signals_interrupt
from ._terminal import install_log_handler, terminal_safe

__all__ = ["EXIT", "build_parser", "main"]

#: modules that add subcommands: each has ``register(subparsers, common_parser)``
_COMMAND_MODULES = (
    "vmvault.cli.commands",
    "vmvault.cli.maintenance",
    "vmvault.cli.inspect",
    "vmvault.cli.tag",
    "vmvault.cli.demo",
    "vmvault.cli.disk",
    "vmvault.cli.files",
    "vmvault.cli.serve",
    "vmvault.cli.mount",
    "vmvault.cli.instant",
    "vmvault.cli.verify_boot",
    "vmvault.cli.automation",
    "vmvault.cli.audit",
    "vmvault.cli.web",
    "vmvault.cli.user",
    "vmvault.cli.service",
    "vmvault.cli.cache",
)

#: the module of ``_COMMAND_MODULES`` that registers each command (tests/cli check it against
#: the registrations): a command's run imports and builds only its own module's parsers, not
#: the whole command line's (0.1-0.3 s of CPU at every start, before any work, measured)
_MODULE_OF = {
    **dict.fromkeys(("init", "backup", "snapshots", "show", "restore", "key"), "vmvault.cli.commands"),
    **dict.fromkeys(("check", "forget", "prune", "unlock", "migrate", "repair"), "vmvault.cli.maintenance"),
    **dict.fromkeys(("ls", "diff", "stats", "dump"), "vmvault.cli.inspect"),
    "tag": "vmvault.cli.tag",
    "demo": "vmvault.cli.demo",
    "disk": "vmvault.cli.disk",
    "files": "vmvault.cli.files",
    "serve": "vmvault.cli.serve",
    "mount": "vmvault.cli.mount",
    "instant-restore": "vmvault.cli.instant",
    "verify-boot": "vmvault.cli.verify_boot",
    **dict.fromkeys(("copy", "daemon", "run", "cancel", "jobs", "history"), "vmvault.cli.automation"),
    "audit": "vmvault.cli.audit",
    "web": "vmvault.cli.web",
    "user": "vmvault.cli.user",
    "service": "vmvault.cli.service",
    "cache": "vmvault.cli.cache",
}
#: commands that handle the stop signals themselves (the others: ``signals_interrupt``)
_OWN_SIGNALS = frozenset(("daemon", "web", "serve", "mount", "instant-restore"))
#: global options that take a value, and those that take none (``build_parser``)
_VALUE_OPTIONS = frozenset(("-r", "--repo", "--password-file", "--password-command", "--key-file"))
_FLAG_OPTIONS = frozenset(("--json", "-q", "--quiet", "--utc"))


def command_module(argv: Sequence[str]) -> str | None:
    """The module that registers the command ``argv`` names, or None when that is not plain to
    see without the whole parser (no command, an unknown one, help, an abbreviated or unknown
    option before it): then every module is loaded, as the parser's messages need."""
    args = iter(argv)
    for arg in args:
        if arg in _VALUE_OPTIONS:
            next(args, None)
        elif arg.startswith("-"):
            if arg not in _FLAG_OPTIONS and arg.split("=", 1)[0] not in _VALUE_OPTIONS:
                return None
        else:
            return _MODULE_OF.get(arg)
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: of every command, or of those of the module ``only``."""
    # two groups of global options; a command's help shows only those it uses: the
    # repository options for commands that open a repository, output options for all
    output = Parser(add_help=False)
    g = output.add_argument_group("output options")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress or chatter")
    g.add_argument(
        "--utc",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show times in UTC instead of local time (or VMVAULT_UTC=1)",
    )
    repository = Parser(add_help=False)
    g = repository.add_argument_group("repository options")
    g.add_argument("-r", "--repo", default=argparse.SUPPRESS, help="repository location (or VMVAULT_REPO)")
    g.add_argument(
        "--password-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read the passphrase from this file (or VMVAULT_PASSWORD_FILE)",
    )
    g.add_argument(
        "--password-command",
        metavar="COMMAND",
        default=argparse.SUPPRESS,
        help="run COMMAND and use what it prints as the passphrase (or VMVAULT_PASSWORD_COMMAND)",
    )
    g.add_argument(
        "--key-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="use a key file instead of a passphrase (or VMVAULT_KEY_FILE)",
    )
    common = CommonOptions(repository, output)

    parser = Parser(
        prog="vmvault",
        description="Real backups of virtual machines: deduplicated, encrypted, verified; live or offline.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"vmvault {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES if only is None else (only,):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # a face not built yet
            raise
        module.register(sub, common)
    harden(parser)  # empty or blank values are usage errors, for every command
    return parser


def _exit_code(exc: VmvaultError) -> int:
    if isinstance(exc, CleanupError):
        return EXIT["incomplete"]
    if isinstance(exc, JobCancelled):
        return EXIT["interrupted"]  # stopped on request, as by Ctrl-C
    if isinstance(exc, NotARepositoryError):
        return EXIT["no_repository"]
    if isinstance(exc, LockedError):
        return EXIT["locked"]
    if isinstance(exc, PasswordError):
        return EXIT["password"]
    if isinstance(exc, StorageFullError):
        return EXIT["storage_full"]
    if isinstance(exc, TargetFullError):
        return EXIT["target_full"]
    if isinstance(exc, TargetError):
        return EXIT["usage"]  # the folder or file to write is not usable as given: choose another or clear it
    if isinstance(exc, SourceError | FormatError | HypervisorError):
        return EXIT["source"]
    if isinstance(exc, ConfigError):
        return EXIT["usage"]
    return EXIT["error"]


def _hint(exc: VmvaultError) -> str | None:
    if isinstance(exc, StorageFullError):
        return "free space on the repository's storage and run the backup again; stored data is reused"
    if isinstance(exc, BackendUnreachableError):
        return None  # the message says it all: nothing was started, nothing to reuse
    if isinstance(exc, TargetFullError):
        return (
            "free space where the files are being written (or choose another target) and run the command "
            "again; nothing half-written was left under a final name"
        )
    if isinstance(exc, BackendConnectionError):
        return "the storage could not be reached; run the command again when it is back (uploaded data is reused)"
    if isinstance(exc, IntegrityError):
        return "run `vmvault check --read-data` to see what the damage affects"
    if isinstance(exc, BackendError):
        return None
    return None


def _tolerant_streams() -> None:
    """Characters the terminal's encoding lacks are written as escapes, not a traceback."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed or exotic stream: leave it
                reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _tolerant_streams()
    platform.keep_freed_memory()
    # every command's threads share one heap (a backup's pipeline, the fetch and decode threads
    # of a restore and of a disk reader): a heap per thread kept its freed buffers apart, so the
    # peak RSS followed the thread count, not what was held (a 1 GiB disk read from S3 30 ms
    # away through a DiskReader 338-348 MiB against 261-265 MiB; a restore from moto 161-231
    # against 136 MiB, no slower; docs/benchmarks.md)
    platform.one_malloc_arena()
    install_log_handler()
    parser = build_parser(command_module(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    # global options may be given before or after the command; SUPPRESS keeps the later
    # parser from overwriting the earlier one, so fill in what was not given at all
    for name, default in (
        ("repo", None),
        ("password_file", None),
        ("key_file", None),
        ("password_command", None),
        ("json", False),
        ("quiet", False),
        ("utc", False),
    ):
        if not hasattr(args, name):
            setattr(args, name, default)
    times.force_utc(True if args.utc else None)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT["usage"]
    try:
        if args.command in _OWN_SIGNALS:
            code: int = args.func(args)
        else:
            with signals_interrupt():
                code = args.func(args)
        return code
    except KeyboardInterrupt:
        print("\ninterrupted; nothing half-written is visible, and stored data is reused next time", file=sys.stderr)
        return EXIT["interrupted"]
    except VmvaultError as exc:
        # one line, whatever the message quotes (names from the storage or a VM folder)
        print(f"vmvault: error: {terminal_safe(str(exc))}", file=sys.stderr)
        hint = _hint(exc)
        if hint:
            print(f"vmvault: {hint}", file=sys.stderr)
        return _exit_code(exc)
    except BrokenPipeError:
        return EXIT["ok"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What every command shares: the repository, the passphrase, output and progress."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from vmvault import platform
from vmvault.backends import open_backend
from vmvault.errors import ConfigError
from vmvault.repo import secret
from vmvault.repo.filters import SnapshotFilter, latest, require_match
from vmvault.repo.repository import Repository
from vmvault.repo.secret import Secret
from vmvault.repo.snapshot import Snapshot

from ._args import Parser
from ._terminal import terminal_safe
from .progress import QuietReporter, TerminalReporter, human_bytes, make_reporter

__all__ = [
    "EXIT",
    "STOP_SIGNALS",
    "CommonOptions",
    "Output",
    "add_filter_args",
    "chosen_credentials",
    "cli_user",
    "given_secret",
    "open_repository",
    "output_options",
    "pick_snapshot",
    "plural",
    "report_warnings",
    "signals_interrupt",
    "snapshot_filter",
    "table",
    "terminal_safe",
]

#: documented exit codes (README, "Exit codes")
EXIT = {
    "ok": 0,
    "error": 1,
    "usage": 2,
    "problems": 3,  # check found damage, audit found problems, compare found differences
    "incomplete": 3,  # backup: some source failed, or a saved snapshot's cleanup on its source did
    "no_repository": 10,
    "locked": 11,
    "password": 12,
    "source": 13,
    "storage_full": 14,
    "target_full": 15,  # the restore target's (or a new image's) file system is full
    "interrupted": 130,
}


class CommonOptions(Parser):
    """The global options as one parent parser (every one of them), with ``output_only``: the
    output options alone, for commands that open no repository (``disk``, ``jobs``, ...), so
    that their help does not offer options they would ignore."""

    def __init__(self, repository: Parser, output: Parser) -> None:
        super().__init__(add_help=False, parents=[repository, output])
        self.output_only = output


def output_options(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parent parser for a command that opens no repository."""
    return common.output_only if isinstance(common, CommonOptions) else common


class Output:
    """Human text on stdout, or one JSON document with ``--json``.

    Human text passes through :func:`terminal_safe` (newlines kept): whatever a command
    quotes from the storage or a VM folder cannot drive the terminal. The JSON document is
    printed exact (JSON escaping makes it inert)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))

    def progress(self) -> TerminalReporter | QuietReporter:
        return make_reporter(quiet=self.quiet, as_json=self.json)

    def result(self, doc: Any, text: str | None = None) -> None:
        if self.json:
            json.dump(doc, sys.stdout, indent=2, sort_keys=False, default=str)
            sys.stdout.write("\n")
        elif text is not None and not (self.quiet and not text.strip()):
            print(terminal_safe(text, newlines=True))

    def say(self, text: str) -> None:
        """Human-only chatter (suppressed by --json and --quiet)."""
        if not self.json and not self.quiet:
            print(terminal_safe(text, newlines=True))


def repository_location(args: argparse.Namespace) -> str:
    loc = getattr(args, "repo", None) or os.environ.get("VMVAULT_REPO")
    if not loc:
        raise ConfigError("no repository given: use -r/--repo LOCATION or set VMVAULT_REPO")
    return str(loc)


#: where a credential may come from, in the order one is chosen: (kind, option, variable)
_CREDENTIALS = (
    ("key_file", "--key-file", "VMVAULT_KEY_FILE"),
    ("password_file", "--password-file", "VMVAULT_PASSWORD_FILE"),
    ("password_command", "--password-command", "VMVAULT_PASSWORD_COMMAND"),
    ("password", None, "VMVAULT_PASSWORD"),
)


def given_credentials(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """Every credential given, as ``(kind, where, value)``: command-line options first, then
    environment variables, each in the order of :data:`_CREDENTIALS`."""
    found = []
    for kind, option, _variable in _CREDENTIALS:
        value = getattr(args, kind, None) if option else None
        if value:
            found.append((kind, str(option), str(value)))
    environment = {
        "VMVAULT_KEY_FILE": os.environ.get("VMVAULT_KEY_FILE"),
        "VMVAULT_PASSWORD_FILE": os.environ.get("VMVAULT_PASSWORD_FILE"),
        "VMVAULT_PASSWORD_COMMAND": os.environ.get("VMVAULT_PASSWORD_COMMAND"),
        "VMVAULT_PASSWORD": os.environ.get("VMVAULT_PASSWORD"),
    }
    for kind, _option, variable in _CREDENTIALS:
        value = environment[variable]
        if value:
            found.append((kind, variable, value))
    return found


def _secret_of(kind: str, where: str, value: str) -> Secret:
    if kind == "password":
        return Secret(value.encode(), secret.PASSPHRASE, where)
    given = secret.given_secret(**{kind: value})
    assert given is not None
    return given


def chosen_credentials(args: argparse.Namespace, *, kinds_allowed: int = 1) -> list[tuple[str, str, str]]:
    """The credentials to use: never one given and silently ignored.

    Two on the command line are a usage error (``init`` allows a key file and a passphrase
    source: ``kinds_allowed=2``); one on the command line wins over the environment, and the
    first variable set (key file, password file, password command, password) over the
    others; whatever is not used is named on stderr."""
    given = given_credentials(args)
    on_line = [g for g in given if g[1].startswith("--")]
    if len(on_line) > 1:
        pair = kinds_allowed == 2 and len(on_line) == 2 and sum(g[0] == "key_file" for g in on_line) == 1
        if not pair:
            allowed = "one key file and one passphrase source" if kinds_allowed == 2 else "one credential"
            raise ConfigError(
                f"give {allowed}, not {' and '.join(g[1] for g in on_line)}: "
                + ("each would become a key" if kinds_allowed == 2 else "the repository is opened with one key")
            )
        chosen = on_line
    else:
        chosen = (on_line or given)[:1]
    ignored = [g for g in given if g not in chosen]
    if chosen and ignored:
        names = ", ".join(g[1] for g in ignored)
        print(
            f"vmvault: note: using {' and '.join(g[1] for g in chosen)}; {names} "
            f"{'is' if len(ignored) == 1 else 'are'} also given and not used",
            file=sys.stderr,
        )
    return chosen


def given_secret(args: argparse.Namespace) -> Secret | None:
    """The secret given without a prompt (see :func:`chosen_credentials`); None when none is."""
    chosen = chosen_credentials(args)
    return _secret_of(*chosen[0]) if chosen else None


def report_warnings(repo: Repository) -> None:
    """What opening found that the user must hear of (repo.warnings), on stderr."""
    for warning in repo.warnings:
        print(f"vmvault: warning: {terminal_safe(warning)}", file=sys.stderr)


def open_repository(args: argparse.Namespace, *, transfer: bool = False) -> Repository:
    """The repository the command names, opened and unlocked. ``transfer``: the command moves
    data (a backup, a restore, a copy, a read of every pack): the backend opens the connections
    its threads will use while the key is derived (``Backend.warm_up``)."""
    backend = open_backend(repository_location(args))
    if transfer:
        backend.warm_up()
    # a secret that was given is passed as bytes: the repository must then be encrypted
    # (Repository.open); only a prompt waits until the repository turns out to need one
    given = given_secret(args)
    repo = Repository.open(backend, given.value if given is not None else secret.prompt_passphrase)
    report_warnings(repo)
    if not (getattr(args, "json", False) or getattr(args, "quiet", False)) and sys.stderr.isatty():
        note_unused_caches()
    return repo


def note_unused_caches() -> None:
    """On a terminal, say when this host keeps caches of repositories unused for 30 days, and
    how to remove them (``vmvault cache clean``), as restic does: they hold about 70 bytes a
    chunk each and nothing else ever removes them."""
    from vmvault.repo.host_cache import CLEAN_AFTER_DAYS, unused_since
    from vmvault.repo.index_cache import cache_root

    try:
        count, size = unused_since(time.time() - CLEAN_AFTER_DAYS * 86400)
    except OSError:
        return
    if count:
        print(
            f"vmvault: note: {plural(count, 'cache')} of repositories unused for {CLEAN_AFTER_DAYS} days "
            f"({human_bytes(size)}) in {terminal_safe(cache_root())}: `vmvault cache clean` removes them",
            file=sys.stderr,
        )


def add_filter_args(parser: argparse.ArgumentParser, *, scope: str | None = None) -> None:
    """``--vm``, ``--host``, ``--tag``, ``--source``: the snapshot filter (repo/filters.py)
    every command that picks snapshots takes. Each is repeatable: values of one option are
    alternatives, different options must all match."""
    g = parser.add_argument_group(
        "snapshot filters",
        (scope or "Only snapshots matching every option given.")
        + " The values of one option are alternatives; 'latest' is the newest matching snapshot.",
    )
    g.add_argument("--vm", dest="filter_vm", action="append", metavar="NAME", help="of this VM (repeatable)")
    g.add_argument(
        "--host", dest="filter_host", action="append", metavar="HOST", help="taken on this host (repeatable)"
    )
    g.add_argument(
        "--tag",
        dest="filter_tag",
        action="append",
        type=_filter_tag,
        metavar="TAG[,TAG]",
        help="with this tag; TAG,TAG: with all of them (repeatable)",
    )
    g.add_argument(
        "--source",
        dest="filter_source",
        action="append",
        metavar="LOCATION",
        help="backed up from this folder, image or URL (repeatable)",
    )


def _filter_tag(text: str) -> str:
    if any(not t.strip() for t in text.split(",")):
        raise argparse.ArgumentTypeError(f"an empty tag in {text!r} (tags are separated by commas)")
    return text


def snapshot_filter(args: argparse.Namespace) -> SnapshotFilter:
    return SnapshotFilter.from_args(args)


def pick_snapshot(repo: Repository, ref: str, args: argparse.Namespace) -> Snapshot:
    """The snapshot ``ref`` names: ``latest`` is the newest matching the command's filters
    (which VM it picked is said on stderr when several match); an id must match them too."""
    flt = snapshot_filter(args)
    if ref == "latest":
        picked = latest(repo.list_snapshots(summaries=True), flt)
        if picked.note and not getattr(args, "quiet", False):
            print(f"vmvault: note: {terminal_safe(picked.note)}", file=sys.stderr)
        return repo.load_snapshot(picked.snapshot.id, listed=True)
    return require_match(repo.find_snapshot(ref), flt)


#: the signals that stop a command: Ctrl-C, ``kill``/``systemctl stop``/``timeout``, a closed terminal
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_interrupt(*, then_ignore: bool = False) -> Iterator[None]:
    """SIGTERM and SIGHUP stop the command as Ctrl-C does (``KeyboardInterrupt``): what it
    began is undone (a live backup's overlays and exports, a restore's partial files) before it
    exits 130; by default SIGTERM ended the process where it stood. A second signal of any of
    them quits at once (what was begun is swept up by the next run), or with ``then_ignore`` is
    ignored, so that the cleanup cannot be cut short (a booted VM stopped, its files removed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        for s in STOP_SIGNALS:  # the next one ends the process, or is ignored
            signal.signal(s, signal.SIG_IGN if then_ignore else signal.SIG_DFL)
        name = signal.Signals(signum).name
        again = "further signals wait for it" if then_ignore else "send it again to quit at once"
        print(f"\nvmvault: {name}: stopping, undoing what was begun ({again})", file=sys.stderr)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def cli_user() -> str:
    """Who runs this command, as the activity log names a person at the command line:
    ``cli:LOGIN`` (``cli:uid N`` where the login has no name, as in some containers)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        uid = platform.current_uid()
        return "cli:?" if uid is None else f"cli:uid {uid}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 snapshot``, ``2 snapshots``, ``0 files`` (``many`` for irregular plurals)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned columns; each cell is escaped whole (a name cannot break its row)."""
    headers = [terminal_safe(h) for h in headers]
    cells = [[terminal_safe(str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)

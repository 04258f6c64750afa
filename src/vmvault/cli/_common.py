"""What every command shares: the repository, the passphrase, output and progress."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from vmvault.backends import open_backend
from vmvault.errors import ConfigError, PasswordError
from vmvault.repo.repository import Repository

from .progress import QuietProgress, TerminalProgress, make_progress

__all__ = ["EXIT", "Output", "open_repository", "read_secret", "table"]

#: documented exit codes (README, "Exit codes")
EXIT = {
    "ok": 0,
    "error": 1,
    "usage": 2,
    "problems": 3,  # check found damage, audit found problems, compare found differences
    "no_repository": 10,
    "locked": 11,
    "password": 12,
    "source": 13,
    "storage_full": 14,
    "interrupted": 130,
}


class Output:
    """Human text on stdout, or one JSON document with ``--json``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))

    def progress(self) -> TerminalProgress | QuietProgress:
        return make_progress(quiet=self.quiet, as_json=self.json)

    def result(self, doc: Any, text: str | None = None) -> None:
        if self.json:
            json.dump(doc, sys.stdout, indent=2, sort_keys=False, default=str)
            sys.stdout.write("\n")
        elif text is not None and not (self.quiet and not text.strip()):
            print(text)

    def say(self, text: str) -> None:
        """Human-only chatter (suppressed by --json and --quiet)."""
        if not self.json and not self.quiet:
            print(text)


def repository_location(args: argparse.Namespace) -> str:
    loc = getattr(args, "repo", None) or os.environ.get("VMVAULT_REPO")
    if not loc:
        raise ConfigError("no repository given: use -r/--repo LOCATION or set VMVAULT_REPO")
    return str(loc)


def read_secret(args: argparse.Namespace, *, confirm: bool = False) -> bytes:
    """The passphrase or key-file secret, from (in order) --key-file, --password-file,
    VMVAULT_PASSWORD_FILE, VMVAULT_PASSWORD, or a prompt on a terminal."""
    key_file = getattr(args, "key_file", None) or os.environ.get("VMVAULT_KEY_FILE")
    if key_file:
        try:
            with open(key_file, "rb") as f:
                return f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {key_file}: {exc.strerror}") from exc
    pw_file = getattr(args, "password_file", None) or os.environ.get("VMVAULT_PASSWORD_FILE")
    if pw_file:
        try:
            with open(pw_file, "rb") as f:
                secret = f.read().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read password file {pw_file}: {exc.strerror}") from exc
        if not secret:
            raise ConfigError(f"password file {pw_file} is empty")
        return secret
    env = os.environ.get("VMVAULT_PASSWORD")
    if env:
        return env.encode()
    if not sys.stdin.isatty():
        raise PasswordError(
            "the repository needs a passphrase: set VMVAULT_PASSWORD or VMVAULT_PASSWORD_FILE, "
            "or use --password-file / --key-file (no terminal to prompt on)"
        )
    first = getpass.getpass("repository passphrase: ")
    if confirm:
        if len(first) < 8:
            raise ConfigError("choose a passphrase of at least 8 characters")
        if getpass.getpass("repeat passphrase: ") != first:
            raise ConfigError("the passphrases differ; nothing was created")
    return first.encode()


def open_repository(args: argparse.Namespace) -> Repository:
    backend = open_backend(repository_location(args))
    return Repository.open(backend, lambda: read_secret(args))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)

"""The command-line reference, ``docs/cli.md``, made from the parser itself.

Every command, option, environment variable and exit code is listed from what the code
defines: the argparse parsers (:func:`vmvault.cli.build_parser`), :data:`EXIT_MEANINGS` for
the exit codes (``EXIT`` names them), and :data:`ENVIRONMENT` for the variables. A test
regenerates the page and compares (``tests/cli/test_reference.py``); after changing an
option, run ``python3 -m vmvault.cli.reference > docs/cli.md``.
"""

from __future__ import annotations

import argparse
import sys

from ._common import EXIT

__all__ = ["ENVIRONMENT", "EXIT_MEANINGS", "render"]

#: what each exit code means (README, "Exit codes", says the same)
EXIT_MEANINGS: dict[int, str] = {
    EXIT["ok"]: "success",
    EXIT["error"]: "the operation failed (nothing half-written is visible; a later run reuses stored data)",
    EXIT["usage"]: "bad usage or configuration (also: a passphrase is needed and none was given without a terminal)",
    EXIT["problems"]: "the command ran and found problems, or did part of what was asked: `check` found damage, "
    "`audit` found issues, `disk compare` differs, `verify-boot`: the snapshot did not boot, `repair` left data "
    "lost or damaged snapshots, `stats` met unreadable snapshots; `backup` is incomplete (a source failed while "
    "others were saved, or a snapshot was "
    "saved but cleaning up on its source failed: what was left is named)",
    EXIT["no_repository"]: "no repository at the location",
    EXIT["locked"]: "the repository is locked by another process (`daemon`: another daemon runs with the same "
    "history; `run`: the job is already running)",
    EXIT["password"]: "wrong passphrase or key file",
    EXIT["source"]: "the source (VM, disk image, hypervisor) could not be read",
    EXIT["storage_full"]: "the repository's storage is full",
    EXIT["target_full"]: "the restore target's file system (or that of an image being written) is full",
    EXIT["interrupted"]: "interrupted",
}

#: every environment variable vmvault reads, and what it gives (README, "Environment variables")
ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("VMVAULT_REPO", "the repository location (`-r/--repo`)"),
    ("VMVAULT_PASSWORD", "the repository passphrase"),
    ("VMVAULT_PASSWORD_FILE", "a file holding the passphrase (`--password-file`)"),
    ("VMVAULT_PASSWORD_COMMAND", "a command that prints the passphrase (`--password-command`), run without a shell"),
    ("VMVAULT_KEY_FILE", "a key file instead of a passphrase (`--key-file`)"),
    ("VMVAULT_UTC", "`1` shows times in UTC instead of local time (`--utc`)"),
    ("VMVAULT_NEW_PASSWORD", "the new passphrase for `key add` / `key passwd` (`--new-password-file`)"),
    ("VMVAULT_FROM_PASSWORD", "the source repository's passphrase for `copy`"),
    ("VMVAULT_FROM_PASSWORD_FILE", "the source repository's password file for `copy` (`--from-password-file`)"),
    ("VMVAULT_FROM_KEY_FILE", "the source repository's key file for `copy` (`--from-key-file`)"),
    (
        "VMVAULT_CONFIG",
        "the automation configuration for `daemon`, `run`, `jobs`, `history`, `web`, `user`, `service install` "
        "(`--config`)",
    ),
    ("VMVAULT_SFTP_KEY", "the SSH key for `sftp://` (`?key=`)"),
    ("VMVAULT_SFTP_KNOWN_HOSTS", "the known_hosts file for `sftp://` (`?known-hosts=`)"),
    (
        "SSH_AUTH_SOCK",
        "the SSH agent `sftp://` may use for its key (handed to the `ssh` child only when the agent is allowed)",
    ),
    ("VMVAULT_S3_ENDPOINT", "an S3 endpoint URL"),
    ("VMVAULT_S3_INSECURE", "`1` allows http to a non-loopback S3 endpoint"),
    ("VMVAULT_HYPERV_USER", "the account for `hyperv://HOST` over PowerShell Remoting"),
    ("VMVAULT_HYPERV_PASSWORD", "that account's password"),
    (
        "LIBVIRT_DEFAULT_URI",
        "the libvirt connection for `libvirt:///DOMAIN` without `?uri=` (default `qemu:///system`)",
    ),
    ("VMVAULT_STATE_DIR", "the state folder (default `$XDG_STATE_HOME/vmvault`, else `~/.local/state/vmvault`)"),
    ("XDG_STATE_HOME", "see `VMVAULT_STATE_DIR`"),
    (
        "VMVAULT_CACHE_DIR",
        "the cache folder: this host's index cache of each repository, rebuilt when missing, and its "
        "copies of the snapshots and index blocks (each checked as a read from the storage is); a cache "
        "folder of another user is not used; `vmvault cache` lists and removes them (default "
        "`$XDG_CACHE_HOME/vmvault`, else `~/.cache/vmvault`)",
    ),
    ("XDG_CACHE_HOME", "see `VMVAULT_CACHE_DIR`"),
    (
        "VMVAULT_CACHE_BLOCKS",
        "the index blocks kept per repository in the cache folder (`blocks/`), least recently used out "
        "past it: bytes, or with K, M, G or T (default 1G, the blocks of 8 TiB of disks; 0 keeps and uses none)",
    ),
    (
        "SQLITE_TMPDIR",
        "where SQLite makes its temporary files (the sorts of `check` and `prune`); default: the cache folder",
    ),
    ("VMVAULT_TEST_CHEAP_KDF", "tests only: `1` makes key derivation cheap (never for real repositories)"),
    ("VMVAULT_LAB_FAULTS", "tests only: faults the `hyperv-lab://` demo host injects"),
    (
        "VMVAULT_PLATFORM_HIDE_POSIX",
        "tests only: `1` makes vmvault use its Windows fallbacks for POSIX-only calls (docs/hyperv.md)",
    ),
)

_HEADER = """# vmvault command-line reference

Made from the command's own definitions (`python3 -m vmvault.cli.reference > docs/cli.md`;
`tests/cli/test_reference.py` checks it is current). The README shows the commands at work.

Options marked *repository* are the repository options every command that opens a repository
takes; *output* options are taken by every command. Times a person reads are local time with
the zone's abbreviation (`--utc` or `VMVAULT_UTC=1` for UTC); JSON documents (`--json`) give
times as ISO 8601 with their offset, sizes in bytes and durations in seconds.

Snapshot filters (`--vm`, `--host`, `--tag`, `--source`) follow restic: the values of one
option are alternatives, different options must all match, `--tag a,b` needs both tags, and
`latest` is the newest matching snapshot (which VM it picked is said when several match).

`--version` (before any command) prints the version; `vmvault COMMAND --help` lists a command's options.
"""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _option_names(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`" + (" …" if action.nargs in ("*", "+") else "")
    metavar = ""
    if action.nargs != 0:
        metavar = " " + str(action.metavar or action.dest.upper())
    return ", ".join(f"`{s}{metavar}`" for s in action.option_strings)


def _group_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    for group in parser._action_groups:
        if action in group._group_actions:
            title = group.title or ""
            if title == "repository options":
                return "repository"
            if title == "output options":
                return "output"
            return "" if title in ("options", "positional arguments") else title
    return ""


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser, str]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                out.append((f"{prefix}{name}", child, helps.get(name, "")))
                out += _commands(child, f"{prefix}{name} ")
    return out


def _option_rows(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        group = _group_of(parser, action)
        if groups is not None and group not in groups:
            continue
        if groups is None and group in ("repository", "output"):
            continue
        text = _escape(formatter._expand_help(action)) if action.help and action.help != argparse.SUPPRESS else ""
        if action.choices:
            text += f" (one of: {', '.join(str(c) for c in action.choices)})"
        where = f" ({group})" if group and groups is None else ""
        rows.append(f"| {_option_names(action)} | {text}{where} |")
    return rows


def render(parser: argparse.ArgumentParser) -> str:
    """docs/cli.md for ``parser``."""
    lines = [_HEADER]
    commands = _commands(parser)
    backup = next(sub for name, sub, _h in commands if name == "backup")
    lines.append("## Global options\n")
    lines.append("Given before or after the command. Each command's section says which of the two groups it takes.\n")
    lines += ["| option | what it does |", "| --- | --- |", *_option_rows(backup, ("repository", "output"))]
    lines.append("\n## Commands\n")
    for name, _sub, help_ in commands:
        lines.append(f"- [`vmvault {name}`](#vmvault-{name.replace(' ', '-')}): {_escape(help_)}")
    for name, sub, help_ in commands:
        lines.append(f"\n### vmvault {name}\n")
        if help_:
            lines.append(f"{help_[0].upper()}{help_[1:]}.\n")
        usage = " ".join(sub.format_usage().split()).removeprefix("usage: ")
        lines.append(f"```\n{usage}\n```\n")
        taken = {_group_of(sub, a) for a in sub._actions} & {"repository", "output"}
        lines.append(
            "Global options: " + (" and ".join(g for g in ("repository", "output") if g in taken) or "none") + ".\n"
        )
        rows = _option_rows(sub, None)
        if rows:
            lines += ["| argument | what it does |", "| --- | --- |", *rows]
    lines.append("\n## Environment variables\n")
    lines += ["A command-line option, where there is one, wins.\n", "| variable | what it gives |", "| --- | --- |"]
    lines += [f"| `{name}` | {_escape(text)} |" for name, text in ENVIRONMENT]
    lines.append("\n## Exit codes\n")
    lines += ["| code | meaning |", "| --- | --- |"]
    lines += [f"| {code} | {_escape(text)} |" for code, text in sorted(EXIT_MEANINGS.items())]
    return "\n".join(lines) + "\n"


def main() -> None:  # pragma: no cover - the test calls render()
    from . import build_parser

    sys.stdout.write(render(build_parser()))


if __name__ == "__main__":  # pragma: no cover
    main()

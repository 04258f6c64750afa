"""Each command's help shows the global options it uses, and only those."""

from __future__ import annotations

import argparse

import pytest

from vmvault.cli import build_parser

REPOSITORY_OPTIONS = {"--repo", "--password-file", "--password-command", "--key-file"}
OUTPUT_OPTIONS = {"--json", "--quiet", "--utc"}
#: commands that open no repository (their own configuration, a disk image, a demo folder)
WITHOUT_REPOSITORY = {"demo", "disk", "daemon", "run", "cancel", "jobs", "history", "web", "user", "service", "cache"}


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out[f"{prefix}{name}"] = child
                out |= commands(child, f"{prefix}{name} ")
    return out


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("name", sorted(commands(build_parser())))
def test_help_shows_the_global_options_the_command_uses(name: str) -> None:
    parser = commands(build_parser())[name]
    given = options(parser)
    assert given >= OUTPUT_OPTIONS, name
    if name.split()[0] in WITHOUT_REPOSITORY:
        assert not given & REPOSITORY_OPTIONS, f"{name} offers repository options it ignores"
        assert "repository options" not in parser.format_help()
    else:
        assert given >= REPOSITORY_OPTIONS, name


# ---- a command's run builds only its own module's parsers ---------------------------------


def test_the_module_of_each_command_is_the_module_that_registers_it() -> None:
    from vmvault import cli

    found = {name: module for module in cli._COMMAND_MODULES for name in _top(build_parser(module))}
    assert found == cli._MODULE_OF
    assert set(_top(build_parser())) == set(found)


def test_the_global_options_are_known_with_or_without_a_value() -> None:
    from vmvault import cli

    parser = build_parser("vmvault.cli.tag")
    takes_value = {s for a in parser._actions if a.nargs != 0 and not a.choices for s in a.option_strings}
    flags = {s for a in parser._actions if a.nargs == 0 for s in a.option_strings} - {"-h", "--help", "--version"}
    assert takes_value == cli._VALUE_OPTIONS and flags == cli._FLAG_OPTIONS


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["backup", "/vm/disk.raw"], "vmvault.cli.commands"),
        (["-q", "-r", "/repo", "--json", "backup", "/vm"], "vmvault.cli.commands"),
        (["-r", "prune", "check"], "vmvault.cli.maintenance"),  # a repository named like a command
        (["--repo=prune", "--password-file", "check", "restore", "latest"], "vmvault.cli.commands"),
        (["instant-restore", "x"], "vmvault.cli.instant"),
        (["--rep", "backup", "check"], None),  # an abbreviation: the whole parser decides
        (["--help"], None),
        (["-h", "backup"], None),
        ([], None),
        (["no-such-command"], None),
        (["-r"], None),
    ],
)
def test_the_command_is_found_before_the_parser_is_built(argv: list[str], module: str | None) -> None:
    from vmvault.cli import command_module

    assert command_module(argv) == module


def test_a_backup_imports_no_other_command_module(tmp_path: object) -> None:
    """The whole parser only when needed: ``vmvault backup`` loads the commands module alone
    (its help is enough to show it: parsed, then exit)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vmvault.cli import main\n"
        "try:\n"
        "    main(['-r', '/nowhere', 'backup', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('vmvault.cli.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = out.strip().splitlines()[-1]
    assert "'vmvault.cli.commands'" in loaded
    for other in ("automation", "web", "mount", "serve", "maintenance", "audit"):
        assert f"'vmvault.cli.{other}'" not in loaded, loaded


def _top(parser: argparse.ArgumentParser) -> list[str]:
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]

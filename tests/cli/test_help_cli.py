"""Each command's help shows the global options it uses, and only those."""

from __future__ import annotations

import argparse

import pytest

from vmvault.cli import build_parser

REPOSITORY_OPTIONS = {"--repo", "--password-file", "--password-command", "--key-file"}
OUTPUT_OPTIONS = {"--json", "--quiet", "--utc"}
#: commands that open no repository (their own configuration, a disk image, a demo folder)
WITHOUT_REPOSITORY = {"demo", "disk", "daemon", "run", "jobs", "history", "web", "user", "service"}


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

"""docs/cli.md lists every command, option, environment variable and exit code, as the code
defines them; the README's tables agree."""

from __future__ import annotations

import re
from pathlib import Path

from vmvault.cli import EXIT, build_parser
from vmvault.cli.reference import ENVIRONMENT, EXIT_MEANINGS, render

from .test_environment_doc import read_by_code

ROOT = Path(__file__).resolve().parents[2]


def test_docs_cli_md_is_made_from_the_parser() -> None:
    current = (ROOT / "docs" / "cli.md").read_text()
    assert current == render(build_parser()), "docs/cli.md is stale: python3 -m vmvault.cli.reference > docs/cli.md"


def test_every_command_and_option_is_in_docs_cli_md() -> None:
    """Independent of render(): walk the parser and look for each name in the page."""
    import argparse

    page = (ROOT / "docs" / "cli.md").read_text()

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    assert f"### vmvault {prefix}{name}\n" in page, f"{prefix}{name}"
                    walk(child, f"{prefix}{name} ")
            elif not isinstance(action, argparse._HelpAction):
                for option in action.option_strings:
                    assert f"`{option}" in page, option

    walk(build_parser(), "")


def test_exit_codes_are_all_documented_here_and_in_the_readme() -> None:
    assert set(EXIT.values()) == set(EXIT_MEANINGS)
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    assert {int(c) for c in re.findall(r"^\| (\d+) \|", section, re.M)} == set(EXIT_MEANINGS)


def test_environment_table_is_every_variable_the_code_reads() -> None:
    assert {name for name, _text in ENVIRONMENT} == read_by_code()

"""A careless administrator's command lines: empty values (an unset shell variable), stray
characters and absurd numbers are usage errors (exit 2) that reach nothing behind the parser.

The cases are derived from ``build_parser()``: every value-taking argument of every
(sub)command, so a command added later is covered without editing this file.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import vmvault.cli
from vmvault.cli import EXIT, build_parser, main
from vmvault.cli._args import MIN_PREFIX, inner_type

# ---- the parser, walked ---------------------------------------------------------------------


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(command words, parser) for every command that runs something (has no subcommands)."""
    sub = _subparsers(parser)
    if sub is None:
        yield path, parser
        return
    seen: set[int] = set()
    for name, child in sub.choices.items():
        if id(child) in seen:
            continue  # an alias
        seen.add(id(child))
        yield from leaf_commands(child, (*path, name))


def value_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, argparse._SubParsersAction)]


#: tried in turn until the argument's own type accepts one (ids, numbers, sizes, group keys ...)
CANDIDATES = ("x", "latest", "abcd1234", "1", "64", "64K", "26h", "location", "1G")


def valid_value(action: argparse.Action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    convert = inner_type(action)
    for text in CANDIDATES:
        try:
            if convert is not None:
                convert(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        return text
    raise AssertionError(f"no candidate value suits {action.dest}: add one to CANDIDATES")


def command_line(
    path: tuple[str, ...], parser: argparse.ArgumentParser, tested: argparse.Action, value: str
) -> list[str]:
    """A command line with every required argument valid and ``tested`` given ``value``."""
    argv = list(path)
    for action in value_actions(parser):
        given = value if action is tested else None
        if action.option_strings:
            if given is None and not action.required:
                continue
            argv += [action.option_strings[-1], given if given is not None else valid_value(action)]
        else:
            argv.append(given if given is not None else valid_value(action))
    return argv


@dataclass(frozen=True)
class Case:
    path: tuple[str, ...]
    dest: str
    option: str

    @property
    def id(self) -> str:
        return " ".join(self.path) + " " + self.option


def all_cases() -> list[Case]:
    cases = []
    for path, parser in leaf_commands(build_parser()):
        for action in value_actions(parser):
            cases.append(Case(path, action.dest, action.option_strings[-1] if action.option_strings else action.dest))
    return cases


CASES = all_cases()


def find(case: Case) -> tuple[argparse.ArgumentParser, argparse.Action]:
    for path, parser in leaf_commands(build_parser()):
        if path == case.path:
            for action in value_actions(parser):
                if action.dest == case.dest:
                    return parser, action
    raise AssertionError(case)


class Engine:
    """Stands in for every command's function: proves whether parsing let a command through."""

    def __init__(self) -> None:
        self.calls: list[argparse.Namespace] = []

    def __call__(self, args: argparse.Namespace) -> int:
        self.calls.append(args)
        return 0


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Engine:
    """``main`` with every command's function replaced by a recorder."""
    recorder = Engine()
    real = build_parser

    def recording_parser(only: str | None = None) -> argparse.ArgumentParser:
        parser = real(only)
        stack = [parser]
        while stack:
            p = stack.pop()
            if p.get_default("func") is not None:
                p.set_defaults(func=recorder)
            sub = _subparsers(p)
            if sub is not None:
                stack.extend(sub.choices.values())
        return parser

    monkeypatch.setattr(vmvault.cli, "build_parser", recording_parser)
    return recorder


def parse_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT["usage"], argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---- every argument, an empty value -----------------------------------------------------------


def test_the_walk_finds_the_commands() -> None:
    paths = {c.path for c in CASES}
    # a sample of what must be there; new commands add themselves
    for path in [("backup",), ("restore",), ("show",), ("forget",), ("check",), ("disk", "info"), ("key", "remove")]:
        assert path in paths
    assert len(CASES) > 60


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_an_empty_value_is_a_usage_error_and_reaches_no_command(
    case: Case, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    parser, action = find(case)
    # the same command line with a valid value runs the command: the refusal below is the
    # empty value's doing, not a missing argument's
    assert main(command_line(case.path, parser, action, valid_value(action))) == 0
    assert len(engine.calls) == 1
    capsys.readouterr()
    for bad in ("", "  "):
        err = parse_fails(command_line(case.path, parser, action, bad), capsys)
        assert "must not be" in err and (case.option in err or (action.metavar or "") in err), err
    assert len(engine.calls) == 1


def test_global_options_before_the_command(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("-r", "--password-file", "--key-file"):
        err = parse_fails([option, "", "snapshots"], capsys)
        assert "must not be empty" in err
    assert engine.calls == []


# ---- numbers ------------------------------------------------------------------------------------


def test_no_argument_is_parsed_by_a_bare_int_or_float() -> None:
    bare = [c.id for c in CASES if inner_type(find(c)[1]) in (int, float)]
    assert bare == [], "give these a validating type from vmvault.cli._args"


BAD_NUMBERS = [
    ["check", "--seed", "-1"],
    ["check", "--seed", str(2**64)],
    ["check", "--seed", "1.5"],
    ["check", "--seed", "9" * 5000],
    ["check", "--subset", "0"],
    ["check", "--subset", "-5%"],
    ["check", "--subset", "101%"],
    ["check", "--subset", "nan"],
    ["check", "--subset", "inf"],
    ["forget", "--keep-last", "-2"],
    ["forget", "--keep-daily", "1e3"],
    ["forget", "--keep-weekly", str(10**12)],
    ["forget", "--keep-last", "1", "--max-unused", "150%"],
    ["forget", "--keep-last", "1", "--group-by", "hots"],
    ["forget", "--keep-last", "1", "--group-by", "location,"],
    ["forget", "--keep-tag", ","],
    ["forget", "--keep-tag", "a,,b"],
    ["prune", "--max-unused", "-1"],
    ["init", "--chunk-size", "1e400K"],
    ["init", "--chunk-size", "3000"],
    ["init", "--chunk-size", "-4K"],
    ["init", "--chunk-size", "128M"],
    ["init", "--chunk-size", "100K"],
    ["init", "--immutable-days", "0"],
    ["init", "--immutable-days", "99999"],
    ["copy", "--from", "a", "--latest", "-1"],
    ["history", "--limit", "0"],
    ["history", "--limit", "-1"],
    ["demo", "--disk-mib", "0"],
    ["demo", "--disk-mib", "1000000"],
    ["audit", "x", "--max-age", "1000000d"],
    ["audit", "x", "--max-age", "-1h"],
    ["backup", "vm", "--tag", "a,b"],
    ["backup", "vm", "--tag", " nightly"],
    ["backup", "vm", "--tag", "night\x1bly"],
]


@pytest.mark.parametrize("argv", BAD_NUMBERS, ids=lambda a: " ".join(a))
def test_absurd_values_are_usage_errors(argv: list[str], engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_fails(argv, capsys)
    assert err.count("\n") <= 8 and "\x1b" not in err
    assert engine.calls == []


GOOD_NUMBERS = [
    (["check", "--seed", str(2**64 - 1)], "seed", 2**64 - 1),
    (["check", "--subset", "0.5%"], "subset", 0.005),
    (["check", "--subset", "100"], "subset", 1.0),
    (["forget", "--keep-last", "-1"], "keep_last", -1),
    (["forget", "--keep-last", "1", "--group-by", "host,tags"], "group_by", ("host", "tags")),
    (["prune", "--max-unused", "0"], "max_unused", 0.0),
    (["init", "--chunk-size", "4MiB"], "chunk_size", 4 << 20),
    (["init", "--chunk-size", "65536"], "chunk_size", 65536),
    (["init", "--chunk-size", "4k"], "chunk_size", 4096),
    (["copy", "--from", "a", "--snapshot", "ABCD12"], "snapshot", ["abcd12"]),
    (["audit", "x", "--max-age", "0s"], "max_age", 0.0),
]


@pytest.mark.parametrize(("argv", "dest", "value"), GOOD_NUMBERS, ids=lambda a: str(a))
def test_sensible_values_still_parse(argv: list[str], dest: str, value: object, engine: Engine) -> None:
    assert main(argv) == 0
    assert getattr(engine.calls[0], dest) == value


# ---- snapshot references --------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["a", "abc", "lates", "zzzz", "latest ", "12345-", "a" * 65])
def test_short_or_mistyped_snapshot_refs_are_refused(
    ref: str, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["show", ref], ["restore", ref, "--target", "t"]):
        if ref == "latest ":  # surrounding blanks are tolerated: the shell's doing, not a choice
            assert main(argv) == 0
            continue
        err = parse_fails(argv, capsys)
        assert "snapshot id" in err


def test_a_prefix_of_the_minimum_length_parses(engine: Engine) -> None:
    assert main(["show", "a" * MIN_PREFIX]) == 0 and engine.calls[-1].snapshot == "a" * MIN_PREFIX
    assert main(["key", "remove", "ABCD"]) == 0 and engine.calls[-1].key_id == "abcd"


def test_a_short_key_id_is_refused(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    assert "key id" in parse_fails(["key", "remove", "ab"], capsys)
    assert engine.calls == []


def test_parser_errors_escape_what_was_typed(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_fails(["snapshots", "\x1b]0;owned\x07\x1b[2J", "\u202eexe.jpg"], capsys)
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert "\\x1b]0;owned" in err and "\\u202e" in err


# ---- end to end: nothing happens -------------------------------------------------------------------


@pytest.fixture
def repo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "disk.raw").write_bytes(os.urandom(64 << 10))
    (tmp_path / "vm" / "vm.conf").write_text("name = vm\n")
    assert main(["init", "-q"]) == 0
    return tmp_path


def snapshot_count(root: Path) -> int:
    folder = root / "repo" / "snapshots"
    return len(os.listdir(folder)) if folder.exists() else 0


def test_empty_arguments_change_nothing(repo_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = repo_env
    parse_fails(["backup", ""], capsys)  # used to back up the current folder
    assert snapshot_count(root) == 0
    assert main(["backup", "vm", "-q"]) == 0
    assert snapshot_count(root) == 1
    parse_fails(["show", ""], capsys)  # an empty prefix used to match the only snapshot
    parse_fails(["restore", "", "--target", "out"], capsys)
    parse_fails(["restore", "latest", "--target", ""], capsys)
    assert not (root / "out").exists()
    parse_fails(["forget", "--keep-tag", ""], capsys)  # used to forget everything
    parse_fails(["forget", "--keep-tag", " , "], capsys)
    parse_fails(["forget", "--keep-last", "1", "--keep-tag", ""], capsys)
    assert snapshot_count(root) == 1
    # a valid prefix that matches nothing is an ordinary error, not a match
    (snap_id,) = os.listdir(root / "repo" / "snapshots")
    other = "0000" if not snap_id.startswith("0000") else "ffff"
    capsys.readouterr()
    assert main(["show", other]) == EXIT["error"]
    assert "no snapshot matches" in capsys.readouterr().err
    assert main(["show", snap_id[:MIN_PREFIX], "-q"]) == 0

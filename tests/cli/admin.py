"""Helpers for the administrator-facing CLI tests: a repository in a temporary folder, small
VM folders, and running ``vmvault`` in-process with its output and exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmvault.cli import main
from vmvault.sample_vm import make_disk

PASSWORD = "correct horse"


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", PASSWORD)
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    for name in ("VMVAULT_PASSWORD_FILE", "VMVAULT_KEY_FILE", "VMVAULT_PASSWORD_COMMAND", "VMVAULT_UTC", "TZ"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def make_vm(root: Path, name: str, *, size: int = 4 << 20, seed: int = 1, conf: str | None = None) -> Path:
    """A VM folder ``root/name`` with one raw disk ``name.raw`` and a configuration file."""
    folder = root / name
    folder.mkdir(parents=True)
    make_disk(str(folder / f"{name}.raw"), size, seed=seed)
    (folder / f"{name}.conf").write_text(conf if conf is not None else f"name = {name}\ndisk = {name}.raw\n")
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``vmvault ARGV``: exit code, stdout, stderr."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refused the arguments (exit 2)
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """``vmvault ARGV --json``: exit code, the parsed document (None when nothing was printed), stderr."""
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out) if out.strip() else None, err

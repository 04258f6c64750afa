"""Credentials: init with a key file and a passphrase creates both keys; none given is never
mistaken for a wrong one; --password-command; nothing given is ignored silently."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vmvault.cli import EXIT

from .admin import PASSWORD, env, make_vm, run, run_json

__all__ = ["env"]


def key_count(env: Path) -> int:
    return len(os.listdir(env / "repo" / "keys"))


def test_init_with_key_file_and_password_file_creates_both(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (env / "pass").write_text("another good passphrase\n")
    code, out, err = run(capsys, "init", "--key-file", str(env / "k.key"), "--password-file", str(env / "pass"))
    assert code == 0 and key_count(env) == 2
    assert f"for key file {env / 'k.key'} (created key file, mode 0600)" in out
    assert f"for the passphrase from password file {env / 'pass'}" in out
    assert "VMVAULT_PASSWORD is also given and not used" in err
    # each opens the repository on its own
    vm = make_vm(env / "vms", "a")
    assert run(capsys, "backup", str(vm), "--key-file", str(env / "k.key"))[0] == 0
    code, doc, _err = run_json(capsys, "snapshots", "--password-file", str(env / "pass"))
    assert code == 0 and len(doc) == 1
    code, doc, _err = run_json(capsys, "key", "list", "--password-file", str(env / "pass"))
    assert sorted(k["kind"] for k in doc) == ["keyfile", "passphrase"]
    assert all(len(k["id"]) == 64 and k["created"].endswith("+00:00") for k in doc)


def test_two_credentials_on_open_are_refused_not_one_ignored(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (env / "pass").write_text(PASSWORD + "\n")
    assert run(capsys, "init", "--key-file", str(env / "k.key"), "--password-file", str(env / "pass"))[0] == 0
    code, _out, err = run(capsys, "snapshots", "--key-file", str(env / "k.key"), "--password-file", str(env / "pass"))
    assert code == EXIT["usage"]
    assert err == (
        "vmvault: error: give one credential, not --key-file and --password-file: "
        "the repository is opened with one key\n"
    )
    code, _out, err = run(
        capsys, "init", "-r", str(env / "r2"), "--password-file", str(env / "pass"), "--password-command", "echo x"
    )
    assert code == EXIT["usage"] and "one key file and one passphrase source" in err
    # a command-line credential wins over the environment, and the environment's is named
    code, _out, err = run(capsys, "snapshots", "--key-file", str(env / "k.key"))
    assert code == 0 and err == "vmvault: note: using --key-file; VMVAULT_PASSWORD is also given and not used\n"


def test_password_command(env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMVAULT_PASSWORD")
    echo = f"{sys.executable} -c 'print(\"{PASSWORD}\")'"
    assert run(capsys, "init", "--password-command", echo)[0] == 0
    code, doc, err = run_json(capsys, "snapshots", "--password-command", echo)
    assert code == 0 and doc == [] and err == ""
    monkeypatch.setenv("VMVAULT_PASSWORD_COMMAND", echo)
    assert run(capsys, "snapshots")[0] == 0
    monkeypatch.delenv("VMVAULT_PASSWORD_COMMAND")
    for command, message in (
        ("false", "failed (exit status 1); no passphrase was read"),
        ("true", "printed nothing"),
        ("/no/such/program", "no program '/no/such/program' found"),
        ("'unbalanced", "cannot be split into words"),
    ):
        code, _out, err = run(capsys, "snapshots", "--password-command", command)
        assert code == EXIT["usage"], command
        assert err.startswith("vmvault: error: password command") and message in err and err.count("\n") == 1
    code, _out, err = run(capsys, "snapshots", "--password-command", "echo wrong-one")
    assert code == EXIT["password"]


def test_no_passphrase_and_no_terminal_is_a_usage_error_naming_the_ways(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "init")[0] == 0
    monkeypatch.delenv("VMVAULT_PASSWORD")
    with open(os.devnull) as null:
        monkeypatch.setattr(sys, "stdin", null)
        code, _out, err = run(capsys, "snapshots")
    assert code == EXIT["usage"]
    for way in ("--password-file", "VMVAULT_PASSWORD_FILE", "--key-file", "--password-command", "VMVAULT_PASSWORD"):
        assert way in err
    assert "wrong" not in err and err.count("\n") == 1

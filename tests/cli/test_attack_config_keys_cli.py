"""The command line against a storage that lies about its config and keys, and against weak
or odd secrets (docs/design/repository-format.md, section 10.1)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmvault.cli import EXIT, main

MARKER = b"PLAINTEXT-MARKER-" * 64


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct-horse-1")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    for name in ("VMVAULT_PASSWORD_FILE", "VMVAULT_KEY_FILE", "VMVAULT_NEW_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture()
def vm(env: Path) -> Path:
    folder = env / "vm"
    (folder / "sub").mkdir(parents=True)
    (folder / "disk.raw").write_bytes(MARKER * 64)
    (folder / "vm.conf").write_bytes(b"name=vm1\n" + MARKER)
    (folder / "sub" / "nvram.bin").write_bytes(b"nv")
    return folder


def vmvault(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real command, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "vmvault", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def files(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def switch_encryption_off(repo: Path) -> None:
    doc = json.loads((repo / "config").read_text())
    doc["encryption"] = "none"
    del doc["mac"]
    (repo / "config").write_text(json.dumps(doc))


def one_clear_error(res: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("vmvault: error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def test_issue_reproduction_encryption_switched_off(env: Path, vm: Path) -> None:
    """Rewrite repo/config with "encryption": "none" and no MAC: the next backup must fail
    clearly and store nothing, encrypted or not; deleting the keys too changes nothing."""
    repo = env / "repo"
    assert vmvault("init", "-q").returncode == 0
    assert vmvault("backup", str(vm), "-q").returncode == 0
    switch_encryption_off(repo)
    before = files(repo)
    res = vmvault("backup", str(vm), "-q")
    assert res.returncode == EXIT["error"]
    assert "holds key objects" in one_clear_error(res)
    assert files(repo) == before
    # keys deleted as well: a passphrase is given, and this host saw the repository encrypted
    for key in (repo / "keys").iterdir():
        key.unlink()
    before = files(repo)
    res = vmvault("backup", str(vm), "-q")
    assert res.returncode == EXIT["error"] and "passphrase or key file was given" in one_clear_error(res)
    res = vmvault("backup", str(vm), "-q", VMVAULT_PASSWORD="")
    assert res.returncode == EXIT["error"] and "encrypted" in one_clear_error(res)
    assert files(repo) == before
    assert not any(MARKER[:32] in data for data in files(repo).values()), "plaintext reached the storage"


def test_daemon_job_against_a_downgraded_repository_fails(env: Path, vm: Path, tmp_path: Path) -> None:
    repo = env / "repo"
    assert main(["init", "-q"]) == 0
    config = tmp_path / "vmvault.toml"
    config.write_text(
        f'[repositories.main]\nlocation = "{repo}"\npassword_env = "VMVAULT_PASSWORD"\n\n'
        f'[sources.vm]\nlocation = "{vm}"\n\n'
        '[jobs.nightly]\ntype = "backup"\nsource = "vm"\nrepository = "main"\nschedule = "0 1 * * *"\n'
        f'\n[daemon]\nhistory = "{tmp_path / "history.sqlite"}"\n'
    )
    switch_encryption_off(repo)
    before = files(repo)
    res = vmvault("run", "nightly", "--config", str(config), "--no-retry")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert files(repo) == before


def test_a_planted_key_object_cannot_hang_or_crash_the_cli(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "-q"]) == 0
    hostile = [
        {"memory_kib": 1024, "iterations": 2**32 - 1, "lanes": 1},
        {"memory_kib": 2**31, "iterations": 1, "lanes": 1},
    ]
    for params in hostile:
        doc = {
            "kind": "passphrase",
            "kdf": "argon2id",
            "kdf_params": params,
            "salt": base64.b64encode(os.urandom(16)).decode(),
            "data": base64.b64encode(os.urandom(92)).decode(),
        }
        raw = json.dumps(doc).encode()
        (env / "repo" / "keys" / hashlib.sha256(raw).hexdigest()).write_bytes(raw)
    # from another host (no key known to open first): both are skipped, the genuine key opens
    res = vmvault("snapshots", VMVAULT_STATE_DIR=str(env / "other-host"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("skipped") == 2 and "outside" in res.stderr
    res = vmvault("snapshots", VMVAULT_STATE_DIR=str(env / "other-host"), VMVAULT_PASSWORD="wrong passphrase")
    assert res.returncode == EXIT["password"] and "2 unusable key objects" in one_clear_error(res)
    capsys.readouterr()
    code = main(["key", "list"])
    assert code == 0 and capsys.readouterr().out.count("unusable key object") == 2


@pytest.mark.parametrize("kind", ["empty", "/dev/null", "/dev/zero", "missing folder", "dangling link", "zeros"])
def test_init_with_a_bad_key_file_is_a_clear_error(env: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = {
        "empty": env / "empty.key",
        "/dev/null": Path("/dev/null"),
        "/dev/zero": Path("/dev/zero"),
        "missing folder": env / "no" / "such" / "k.key",
        "dangling link": env / "dangling.key",
        "zeros": env / "zeros.key",
    }[kind]
    if kind == "empty":
        path.write_bytes(b"")
    if kind == "zeros":
        path.write_bytes(bytes(64))
    if kind == "dangling link":
        path.symlink_to(env / "nowhere")
    assert main(["init", "--key-file", str(path)]) == EXIT["usage"]
    # the passphrase in the environment is named as not used, then the one error line
    note, error = capsys.readouterr().err.splitlines()
    assert "VMVAULT_PASSWORD is also given and not used" in note
    assert error.startswith("vmvault: error:") and str(path) in error
    assert not (env / "repo" / "config").exists()
    assert not (env / "nowhere").exists()


def test_init_creates_its_key_file(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = env / "new.key"
    assert main(["init", "--key-file", str(key)]) == 0
    assert "created key file" in capsys.readouterr().out
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 65
    os.environ.pop("VMVAULT_PASSWORD")
    assert main(["snapshots", "--key-file", str(key)]) == 0
    # the key list says it is a key file
    capsys.readouterr()
    assert main(["key", "list", "--key-file", str(key), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["kind"] == "keyfile"


@pytest.mark.parametrize(
    "argv_env",
    [
        (["init"], {"VMVAULT_PASSWORD": "a"}),
        (["init", "--password-file", "{short}"], {"VMVAULT_PASSWORD": ""}),
        (["key", "add"], {"VMVAULT_NEW_PASSWORD": "short"}),
        (["key", "add", "--new-password-file", "{short}"], {}),
        (["key", "passwd"], {"VMVAULT_NEW_PASSWORD": "1234567"}),
        (["key", "add", "--new-key-file", "{empty}"], {}),
        (["key", "add", "--new-key-file", "/dev/zero"], {}),
        (["init", "--insecure-no-encryption"], {}),
    ],
    ids=[
        "init VMVAULT_PASSWORD",
        "init password file",
        "key add VMVAULT_NEW_PASSWORD",
        "key add password file",
        "key passwd",
        "key add empty key file",
        "key add /dev/zero",
        "unencrypted init with a passphrase set",
    ],
)
def test_weak_new_secrets_are_refused_everywhere(
    env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv_env: tuple[list[str], dict[str, str]],
) -> None:
    argv, extra = argv_env
    (env / "short").write_text("short\n")
    (env / "empty").write_bytes(b"")
    if argv[0] == "key":
        assert main(["init", "-q"]) == 0
    keys_before = sorted((env / "repo" / "keys").iterdir()) if (env / "repo").exists() else []
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main([a.format(short=env / "short", empty=env / "empty") for a in argv])
    assert code == EXIT["usage"]
    err = capsys.readouterr().err
    assert err.startswith("vmvault: error:") and err.count("\n") == 1
    if argv[0] == "key":
        assert sorted((env / "repo" / "keys").iterdir()) == keys_before
    else:
        assert not (env / "repo" / "config").exists()


def test_passwd_to_backup_only_keeps_a_full_key(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "-q"]) == 0
    keys_before = sorted((env / "repo" / "keys").iterdir())
    os.environ["VMVAULT_NEW_PASSWORD"] = "backup host passphrase"
    try:
        assert main(["key", "passwd", "--role", "backup-only"]) == EXIT["error"]
        assert "last key with full rights" in capsys.readouterr().err
        assert sorted((env / "repo" / "keys").iterdir()) == keys_before
        # with a second full key it is allowed; the repository keeps one full key
        assert main(["key", "add"]) == 0
        assert main(["key", "passwd", "--role", "backup-only"]) == 0
    finally:
        del os.environ["VMVAULT_NEW_PASSWORD"]
    capsys.readouterr()
    os.environ["VMVAULT_PASSWORD"] = "backup host passphrase"
    assert main(["key", "list", "--json"]) == 0
    roles = sorted(k["role"] for k in json.loads(capsys.readouterr().out))
    assert roles == ["backup-only", "full"]

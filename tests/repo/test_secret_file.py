"""One reader of passphrase and key files (repo/secret.py), used by the CLI's repository
options, ``copy``'s source options and the daemon's configuration alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmvault.automation.config import RepositoryConfig
from vmvault.cli import EXIT, main
from vmvault.errors import ConfigError
from vmvault.repo.secret import MAX_SECRET_FILE, read_key_file, read_password_file


def test_key_file_is_stripped_password_file_keeps_inner_and_leading_spaces(tmp_path: Path) -> None:
    key = tmp_path / "key"
    hex_key = b"0123456789abcdef" * 4
    key.write_bytes(b"  " + hex_key + b"\n\n")
    assert read_key_file(str(key)) == hex_key
    pw = tmp_path / "pw"
    pw.write_bytes(b"  two words \r\n")
    assert read_password_file(str(pw)) == b"  two words "


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n"])
@pytest.mark.parametrize("key", [True, False])
def test_empty_files_are_refused(tmp_path: Path, content: bytes, key: bool) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="is empty"):
        (read_key_file if key else read_password_file)(str(path), what="the file")


def test_missing_and_oversized_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read key file .*No such file"):
        read_key_file(str(tmp_path / "nope"))
    big = tmp_path / "image.raw"
    big.write_bytes(b"x" * (MAX_SECRET_FILE + 1))
    with pytest.raises(ConfigError, match="not a secret"):
        read_password_file(str(big))


def test_every_caller_refuses_an_empty_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("VMVAULT_PASSWORD", "VMVAULT_PASSWORD_FILE", "VMVAULT_KEY_FILE", "VMVAULT_FROM_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"\n")
    repo = tmp_path / "repo"
    monkeypatch.setenv("VMVAULT_PASSWORD", "a passphrase")
    assert main(["init", "-r", str(repo)]) == EXIT["ok"]
    monkeypatch.delenv("VMVAULT_PASSWORD")
    capsys.readouterr()

    assert main(["snapshots", "-r", str(repo), "--key-file", str(empty)]) == EXIT["usage"]
    assert f"key file {empty} is empty" in capsys.readouterr().err

    monkeypatch.setenv("VMVAULT_PASSWORD", "a passphrase")
    args = ["copy", "--from", str(repo), "--from-key-file", str(empty), "-r", str(tmp_path / "other")]
    assert main(args) == EXIT["usage"]
    assert f"the source repository's key file {empty} is empty" in capsys.readouterr().err

    with pytest.raises(ConfigError, match=f"repository offsite: key file {empty} is empty"):
        RepositoryConfig(name="offsite", location=str(repo), key_file=str(empty)).secret()

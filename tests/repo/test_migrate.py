"""Repositories written in format version 1 (index files without pack lengths) keep working,
and `vmvault migrate` moves them to version 2 (repository-format.md, sections 12.2 and 12.7)."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest

from tests.repo.builders import PASS, Content, backup, disk_image, restore_all
from vmvault.backends.local import LocalBackend
from vmvault.cli import main
from vmvault.errors import ImmutableError, IntegrityError, UnsupportedVersionError
from vmvault.repo import check, forget, prune, repository
from vmvault.repo import config as config_module
from vmvault.repo.config import read_config
from vmvault.repo.crypto import HMAC_SHA256
from vmvault.repo.repository import Repository
from vmvault.repo.retention import RetentionPolicy

INDEX_HEADER = struct.Struct("<4sHHII")


def index_versions(repo: Repository) -> list[int]:
    """The version in the header of every index file in storage (read with the grammar)."""
    out = []
    for obj in repo.backend.list("index/"):
        payload = repo.read_index_payload(bytes.fromhex(obj.name.rsplit("/", 1)[1]))
        out.append(INDEX_HEADER.unpack_from(payload)[1])
    return sorted(out)


def old_repo(path: Path, monkeypatch: pytest.MonkeyPatch, *, encrypted: bool = True) -> Repository:
    """A repository as vmvault wrote it before index format 2: config version 1 (HMAC-SHA-256 ids,
    the only ones then)."""
    with monkeypatch.context() as m:
        m.setattr(repository, "INDEX_V2_VERSION", 1)
        repo = Repository.init(
            LocalBackend(str(path)),
            PASS if encrypted else None,
            chunk_size=4096,
            pack_size=24 << 10,
            chunk_id=HMAC_SHA256,
        )
    assert json.loads((path / "config").read_bytes())["version"] == 1
    return repo


def test_a_version_1_repository_is_written_read_pruned_and_checked_as_version_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = old_repo(tmp_path / "repo", monkeypatch)
    contents = [Content(disks={"d": disk_image(seed, 40)}) for seed in range(4)]
    snaps = [backup(repo, c) for c in contents]
    assert set(index_versions(repo)) == {1}
    forget(repo, RetentionPolicy(last=2))
    prune(repo)
    # prune rewrote index files: still version 1, so earlier vmvault versions keep reading them
    assert set(index_versions(repo)) == {1}
    reopened = Repository.open(LocalBackend(str(tmp_path / "repo")), PASS)
    assert reopened.config.version == 1
    assert check(reopened, read_data=True).ok
    for snap, content in zip(snaps[2:], contents[2:], strict=True):
        assert restore_all(reopened, reopened.load_snapshot(snap.id)) == content


@pytest.mark.parametrize("encrypted", [True, False])
def test_migrate_keeps_the_old_index_files_and_writes_version_2_from_then_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool
) -> None:
    path = tmp_path / "repo"
    repo = old_repo(path, monkeypatch, encrypted=encrypted)
    first = Content(disks={"d": disk_image(1, 40)})
    snap1 = backup(repo, first)
    secret = PASS if encrypted else None
    repo = Repository.open(LocalBackend(str(path)), secret)
    assert repo.migrate()
    assert not repo.migrate()  # once is enough
    config = read_config(LocalBackend(str(path)))
    assert config.config.version == 2 and config.authenticated == encrypted
    # this host opens the rewritten config (its record follows), the old files still read
    repo = Repository.open(LocalBackend(str(path)), secret)
    assert repo.config.version == 2
    second = Content(disks={"d": disk_image(2, 40)})
    snap2 = backup(repo, second)
    assert index_versions(repo)[0] == 1 and index_versions(repo)[-1] == 2
    assert check(repo, read_data=True).ok
    forget(repo, RetentionPolicy(last=1))
    prune(repo)
    assert set(index_versions(repo)) == {2}  # prune replaced the version-1 files it touched
    repo = Repository.open(LocalBackend(str(path)), secret)
    assert restore_all(repo, repo.load_snapshot(snap2.id)) == second
    assert snap1.id not in repo.snapshot_ids()


def test_an_earlier_vmvault_refuses_a_migrated_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "repo"
    old_repo(path, monkeypatch)
    Repository.open(LocalBackend(str(path)), PASS).migrate()
    monkeypatch.setattr(config_module, "FORMAT_VERSION", 1)
    with pytest.raises(UnsupportedVersionError, match="format version 2"):
        Repository.open(LocalBackend(str(path)), PASS)


def test_migrate_needs_full_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = old_repo(tmp_path / "repo", monkeypatch)
    repo.role = "backup-only"
    with pytest.raises(ImmutableError, match="migrate refused"):
        repo.migrate()
    assert read_config(repo.backend).config.version == 1


def test_the_migrate_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "repo"
    old_repo(path, monkeypatch)
    monkeypatch.setenv("VMVAULT_PASSWORD", PASS.decode())
    monkeypatch.setenv("VMVAULT_REPO", str(path))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    monkeypatch.delenv("VMVAULT_KEY_FILE", raising=False)
    capsys.readouterr()
    assert main(["migrate", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["migrate"] == {"from_version": 1, "version": 2, "changed": True}
    assert main(["migrate"]) == 0
    assert "already" in capsys.readouterr().out


class CutsConfigs(LocalBackend):
    """A folder whose next ``cut`` writes of the config keep it 10 bytes short, silently."""

    cut = 0

    def put(self, name: str, data: bytes) -> None:
        if name == "config" and self.cut > 0:
            self.cut -= 1
            data = data[:-10]
        super().put(name, data)


def test_a_config_that_does_not_read_back_is_never_left_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config is the one object every command needs: migrate rewrites it in place, and a
    storage keeping other bytes left a repository no command could open. It is read back: the
    earlier config goes back (the repository as it was), and when even that does not read
    back the error carries its bytes. A new repository whose config does not read back is not
    made at all."""
    path = tmp_path / "repo"
    old_repo(path, monkeypatch)
    original = (path / "config").read_bytes()
    backend = CutsConfigs(str(path))
    backend.cut = 1
    with pytest.raises(IntegrityError, match=r"other bytes read back: .* the earlier config is back, nothing migrated"):
        Repository.open(backend, PASS).migrate()
    assert (path / "config").read_bytes() == original
    assert Repository.open(LocalBackend(str(path)), PASS).config.version == 1
    backend.cut = 2
    with pytest.raises(IntegrityError, match="putting the earlier config back failed too") as caught:
        Repository.open(backend, PASS).migrate()
    assert base64.b64decode(str(caught.value).rsplit(" ", 1)[1]) == original
    new = CutsConfigs(str(tmp_path / "new"))
    new.cut = 1
    with pytest.raises(IntegrityError, match="no repository was made"):
        Repository.init(new, PASS)
    assert list(new.list("")) == []

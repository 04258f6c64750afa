"""`vmvault init --chunk-id`, the id function shown by `init` and `stats`, and `copy` between
repositories with different id functions, through the command line (repository-format.md,
sections 3 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmvault.backends.local import LocalBackend
from vmvault.cli import EXIT
from vmvault.repo.repository import Repository

from .admin import PASSWORD, env, make_vm, run, run_json

__all__ = ["env"]


def test_init_names_and_records_the_chunk_id_function(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err = run_json(capsys, "init", "-r", str(env / "b3"))
    assert code == 0, err
    assert (doc["chunk_id"], doc["version"]) == ("blake3", 3)
    code, out, _err = run(capsys, "init", "-r", str(env / "old"), "--chunk-id", "hmac-sha256")
    assert code == 0 and "format version 2" in out and "chunk ids HMAC-SHA-256" in out
    assert "chunk_id" not in json.loads((env / "old" / "config").read_text())  # as earlier vmvault wrote it
    assert json.loads((env / "b3" / "config").read_text())["chunk_id"] == "blake3"
    for repo, name, label in [("b3", "blake3", "keyed BLAKE3"), ("old", "hmac-sha256", "HMAC-SHA-256")]:
        code, doc, err = run_json(capsys, "stats", "-r", str(env / repo))
        assert code == 0, err
        assert doc["repository"]["chunk_id"] == name and doc["repository"]["encrypted"] is True
        code, out, _err = run(capsys, "stats", "-r", str(env / repo))
        assert f"chunk ids {label}, encrypted" in out


def test_unencrypted_repositories_use_the_unkeyed_hash(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMVAULT_PASSWORD")
    code, out, err = run(capsys, "init", "-r", str(env / "plain"), "--insecure-no-encryption")
    assert code == 0, err
    assert "chunk ids BLAKE3 (unkeyed)" in out
    code, out, err = run(
        capsys, "init", "-r", str(env / "plain-old"), "--insecure-no-encryption", "--chunk-id", "hmac-sha256"
    )
    assert code == 0 and "chunk ids SHA-256 (unkeyed)" in out, err


@pytest.mark.parametrize("value", ["sha256", "BLAKE3", ""])
def test_an_unknown_chunk_id_function_is_a_usage_error(
    env: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, _out, err = run(capsys, "init", "-r", str(env / "x"), "--chunk-id", value)
    assert code == EXIT["usage"] and "--chunk-id" in err and len(err.strip().splitlines()) <= 2
    assert not value or ("hmac-sha256" in err and "blake3" in err)
    assert not (env / "x" / "config").exists()


def test_copy_from_an_hmac_repository_to_blake3_and_back(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = make_vm(env / "vms", "web01", seed=1)
    assert (vm / "web01.raw").read_bytes().count(0) < 3 << 20  # data to name
    old, new = str(env / "old"), str(env / "new")
    monkeypatch.setenv("VMVAULT_FROM_PASSWORD", PASSWORD)
    assert run(capsys, "init", "-r", old, "--chunk-id", "hmac-sha256")[0] == 0
    assert run(capsys, "backup", "-r", old, str(vm))[0] == 0
    assert run(capsys, "init", "-r", new)[0] == 0

    code, doc, err = run_json(capsys, "copy", "--from", old, "--to", new)
    assert code == 0 and len(doc["copied"]) == 1 and doc["chunks_added"] > 0, err
    code, out, err = run(capsys, "check", "-r", new, "--read-data")
    assert code == 0, out + err
    assert run(capsys, "restore", "latest", "-r", new, "--target", str(env / "restored"))[0] == 0
    assert next((env / "restored").rglob("web01.raw")).read_bytes() == (vm / "web01.raw").read_bytes()

    # back into the HMAC repository: every id computed there again is one it holds
    code, doc, err = run_json(capsys, "copy", "--from", new, "--to", old)
    assert code == 0 and len(doc["copied"]) == 1 and doc["chunks_read"] > 0, err
    assert doc["chunks_added"] == doc["blobs_added"] == 0
    code, out, err = run(capsys, "check", "-r", old, "--read-data")
    assert code == 0, out + err
    indexes = {}
    for name in ("old", "new"):
        repo = Repository.open(LocalBackend(str(env / name)), PASSWORD.encode())
        indexes[name] = [[d.index for d in s.disks] for s in repo.list_snapshots()]
    assert len(indexes["old"]) == 2 and indexes["old"][0] == indexes["old"][1] != indexes["new"][0]

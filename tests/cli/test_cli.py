"""The command line as a user meets it: commands, --json, exit codes, clear errors."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vmvault.cli import EXIT, main
from vmvault.repo.format import FORMAT_VERSION
from vmvault.sample_vm import guest_writes, make_disk

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct horse")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    return tmp_path


@pytest.fixture()
def vm(env: Path) -> Path:
    folder = env / "vm"
    folder.mkdir()
    make_disk(str(folder / "disk0.raw"), 16 << 20, seed=1)
    (folder / "vm.conf").write_text("name = vm\n")
    return folder


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    capsys.readouterr()
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_init_backup_snapshots_show_restore(vm: Path, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init"]) == 0
    assert "Keep the passphrase" in capsys.readouterr().out
    code, doc = run_json(capsys, "backup", str(vm), "--tag", "nightly")
    assert code == 0 and isinstance(doc, dict)
    assert doc["bytes_read"] > 0 and doc["consistency"] == "offline"
    guest_writes(str(vm / "disk0.raw"), percent=2, seed=3)
    code, doc2 = run_json(capsys, "backup", str(vm))
    assert code == 0 and isinstance(doc2, dict)
    assert doc2["bytes_added"] < doc["bytes_added"] / 2
    code, snaps = run_json(capsys, "snapshots")
    assert code == 0 and isinstance(snaps, list) and len(snaps) == 2
    assert snaps[0]["tags"] == ["nightly"] and snaps[1]["parent"] == snaps[0]["id"]
    code, shown = run_json(capsys, "show", snaps[0]["short_id"])
    assert code == 0 and isinstance(shown, dict) and shown["disks"][0]["name"] == "disk0.raw"
    assert main(["snapshots"]) == 0
    assert "2 snapshots" in capsys.readouterr().out
    code, _ = run_json(capsys, "restore", "latest", "--target", str(env / "out"))
    assert code == 0
    assert (env / "out" / "disk0.raw").read_bytes() == (vm / "disk0.raw").read_bytes()
    code, _res = run_json(capsys, "restore", "latest", "--target", str(env / "clones"), "--as-clone", "vm2")
    assert code == 0 and (env / "clones" / "vm2" / "disk0.raw").exists()
    assert main(["check", "--read-data"]) == 0


def test_every_command_tunes_malloc_before_it_opens_the_repository(
    vm: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line keeps freed buffers for reuse and has every thread share one heap before
    a command opens the repository (a library caller keeps its own settings: tests/engine)."""
    from vmvault import platform
    from vmvault.repo.repository import Repository

    assert main(["init"]) == 0
    calls: list[str] = []
    monkeypatch.setattr(platform, "keep_freed_memory", lambda *a, **k: calls.append("kept") or True)
    monkeypatch.setattr(platform, "one_malloc_arena", lambda: calls.append("one heap") or True)
    opened = Repository.open
    monkeypatch.setattr(Repository, "open", lambda *a, **k: calls.append("open") or opened(*a, **k))
    for argv in (["backup", str(vm)], ["snapshots"], ["restore", "latest", "--target", str(env / "restored")]):
        calls.clear()
        assert main(argv) == 0
        assert calls[:3] == ["kept", "one heap", "open"], argv


def test_wrong_passphrase_missing_repository_and_usage(
    vm: Path, env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["snapshots"]) == EXIT["no_repository"]
    assert "not a vmvault repository" in capsys.readouterr().err
    assert main(["init"]) == 0
    monkeypatch.setenv("VMVAULT_PASSWORD", "wrong")
    assert main(["snapshots"]) == EXIT["password"]
    assert "wrong passphrase" in capsys.readouterr().err
    monkeypatch.delenv("VMVAULT_REPO")
    assert main(["snapshots"]) == EXIT["usage"]
    assert main([]) == EXIT["usage"]


def test_password_file_and_key_file(
    env: Path, vm: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMVAULT_PASSWORD")
    pw = env / "pw"
    pw.write_text("from a file\n")
    assert main(["init", "--password-file", str(pw)]) == 0
    assert main(["backup", str(vm), "--password-file", str(pw), "-q"]) == 0
    # add a key file, remove the passphrase key; data objects are never rewritten
    data_before = sorted(p.name for p in (env / "repo" / "data").rglob("*") if p.is_file())
    key = env / "keyfile"
    assert main(["key", "add", "--new-key-file", str(key), "--password-file", str(pw)]) == 0
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    code, keys = run_json(capsys, "key", "list", "--key-file", str(key))
    assert code == 0 and isinstance(keys, list) and len(keys) == 2
    old = next(k["id"] for k in keys if not k["current"])
    assert main(["key", "remove", old[:8], "--key-file", str(key)]) == 0
    assert main(["snapshots", "--password-file", str(pw)]) == EXIT["password"]
    assert main(["snapshots", "--key-file", str(key)]) == 0
    assert sorted(p.name for p in (env / "repo" / "data").rglob("*") if p.is_file()) == data_before
    # change the passphrase
    monkeypatch.setenv("VMVAULT_NEW_PASSWORD", "a new passphrase")
    assert main(["key", "passwd", "--key-file", str(key)]) == 0
    monkeypatch.setenv("VMVAULT_PASSWORD", "a new passphrase")
    assert main(["snapshots"]) == 0


def test_newer_format_version_is_refused(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init"]) == 0
    config = env / "repo" / "config"
    doc = json.loads(config.read_text())
    doc["version"] = FORMAT_VERSION + 1
    config.write_text(json.dumps(doc))
    assert main(["snapshots"]) == EXIT["error"]
    assert "Upgrade vmvault" in capsys.readouterr().err


def test_flipped_byte_is_found_named_and_other_snapshots_restore(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = env / "a", env / "b"
    a.mkdir()
    b.mkdir()
    (a / "disk.raw").write_bytes(os.urandom(1 << 20))
    (b / "disk.raw").write_bytes(os.urandom(1 << 20))
    assert main(["init"]) == 0
    assert main(["backup", str(a), "-q"]) == 0
    packs_a = {p for p in (env / "repo" / "data").rglob("*") if p.is_file()}
    assert main(["backup", str(b), "-q"]) == 0
    capsys.readouterr()
    victim = sorted(packs_a)[0]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x01
    victim.write_bytes(bytes(raw))
    code, report = run_json(capsys, "check", "--read-data")
    assert code == EXIT["problems"] and isinstance(report, dict) and not report["ok"]
    affected = [x for p in report["problems"] for x in p["affects"]]
    assert any(x["name"] == "disk.raw" and x["source"]["location"] == str(a) for x in affected)
    assert all(x["source"]["location"] != str(b) for x in affected)
    # the damaged snapshot's restore fails clearly; the other restores fine
    code = main(["restore", report["damaged_snapshots"][0][:8], "--target", str(env / "bad")])
    assert code == EXIT["error"]
    err = capsys.readouterr().err
    assert "authentication failed" in err and "needed by disk disk.raw" in err
    assert not (env / "bad" / "disk.raw").exists(), "no half-restored disk may be left"
    intact = report["intact_snapshots"][0]
    assert main(["restore", intact[:8], "--target", str(env / "good")]) == 0
    assert (env / "good" / "disk.raw").read_bytes() == (b / "disk.raw").read_bytes()


def test_locked_repository_exit_code(env: Path, vm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmvault.backends.local import LocalBackend
    from vmvault.repo.repository import Repository

    assert main(["init"]) == 0
    repo = Repository.open(LocalBackend(str(env / "repo")), b"correct horse")
    with repo.lock(exclusive=True, operation="prune"):
        assert main(["backup", str(vm)]) == EXIT["locked"]
        assert "locked" in capsys.readouterr().err


def test_forget_and_prune(env: Path, vm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init"]) == 0
    for i in range(3):
        guest_writes(str(vm / "disk0.raw"), percent=3, seed=i)
        assert main(["backup", str(vm), "-q"]) == 0
    assert main(["forget"]) == EXIT["usage"]
    code, doc = run_json(capsys, "forget", "--keep-last", "1", "--prune")
    assert code == 0 and isinstance(doc, dict)
    assert len(doc["forget"]["removed"]) == 2 and doc["prune"]["bytes_removed"] > 0
    assert main(["check", "--read-data"]) == 0


def test_no_traceback_for_a_missing_source(env: Path) -> None:
    subprocess.run([sys.executable, "-m", "vmvault", "init"], check=True, capture_output=True, env=os.environ)
    res = subprocess.run(
        [sys.executable, "-m", "vmvault", "backup", str(env / "nope")], capture_output=True, text=True, env=os.environ
    )
    assert res.returncode == EXIT["source"]
    assert "Traceback" not in res.stderr and "no such file" in res.stderr


def test_demo_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    code, doc = run_json(capsys, "demo", "--dir", str(tmp_path / "demo"), "--disk-mib", "48")
    assert code == 0 and isinstance(doc, dict)
    assert doc["verified"]["restore_identical"] and doc["verified"]["check_ok"]
    b1, b2 = doc["backups"]
    assert b2["bytes_added"] < b1["bytes_added"] / 3


def test_the_demo_says_how_to_go_on_from_any_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary's `export` line names absolute paths, quoted for the shell: pasted in
    another folder, `vmvault snapshots` finds the repository and its passphrase."""
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.delenv("VMVAULT_PASSWORD", raising=False)
    (tmp_path / "my demo").mkdir()
    monkeypatch.chdir(tmp_path / "my demo")
    assert main(["demo", "--dir", "run 1", "--disk-mib", "16"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("export ")]
    words = shlex.split(line)
    assert words[0] == "export"
    for assignment in words[1:]:
        key, _, value = assignment.partition("=")
        assert os.path.isabs(value), line
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    assert main(["snapshots", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_a_login_without_a_name_is_named_by_its_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The activity log's name for a person at the command line, also where the login has no
    name (a container's uid without a passwd entry: getpass raises)."""
    from vmvault.cli import _common

    monkeypatch.setattr(_common.getpass, "getuser", lambda: "ada")
    assert _common.cli_user() == "cli:ada"

    def nameless() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(_common.getpass, "getuser", nameless)
    assert _common.cli_user() == f"cli:uid {os.geteuid()}"

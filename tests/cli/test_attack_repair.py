"""The command line after damage: the issue's reproduction, `repair`, `forget ID`, and
`forget` policies that would remove everything (repository-format.md, sections 9 and 10.2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vmvault.cli import EXIT, main


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    monkeypatch.setenv("VMVAULT_PASSWORD", "correct-horse-1")
    monkeypatch.setenv("VMVAULT_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("VMVAULT_PASSWORD_FILE", raising=False)
    return tmp_path


@pytest.fixture()
def vm(env: Path) -> Path:
    """The issue's setup: a qcow2 disk with some data, a config file, a file in a subfolder."""
    folder = env / "vm"
    (folder / "sub").mkdir(parents=True)
    disk = folder / "disk.qcow2"
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x55 0 4M", str(disk)], check=True, capture_output=True)
    else:  # a raw disk does as well for what is tested here
        disk = folder / "disk.raw"
        disk.write_bytes(b"\x55" * (4 << 20) + bytes(12 << 20))
    (folder / "vm.conf").write_text("name=vm1\n")
    (folder / "sub" / "nvram.bin").write_text("nv\n")
    return folder


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


def packs(env: Path) -> list[Path]:
    return sorted(p for p in (env / "repo" / "data").glob("*/*") if p.is_file())


def test_the_issue_reproduction_and_the_way_out(vm: Path, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "-q"]) == 0
    assert main(["backup", str(vm), "-q"]) == 0
    (vm / "vm.conf").write_text("name=vm1\nmemory=2G\n")
    assert main(["backup", str(vm), "-q"]) == 0
    for p in packs(env):
        p.unlink()
    code, doc = run_json(capsys, "check")
    assert code == EXIT["problems"] and len(doc["damaged_snapshots"]) == 2

    # backup (and backup --full) after the loss store the data again, and say so
    code, doc = run_json(capsys, "backup", str(vm))
    assert code == 0 and doc["bytes_added"] > 0 and any("missing from storage" in w for w in doc["warnings"])
    code, doc = run_json(capsys, "backup", str(vm), "--full")
    assert code == 0 and doc["chunks_added"] == 0  # now it is stored: nothing to add, nothing lost
    newest = doc["snapshot"]
    code, doc = run_json(capsys, "check", "--read-data")
    assert newest in doc["intact_snapshots"] and len(doc["damaged_snapshots"]) == 1  # the first vm.conf is gone

    # repair index: drops the missing packs (exit 3: data was lost)
    code, doc = run_json(capsys, "repair", "index", "--dry-run")
    assert code == EXIT["problems"] and doc["dry_run"] and doc["index_files_written"] == 0
    code, doc = run_json(capsys, "repair", "index")
    assert code == EXIT["problems"] and doc["packs_dropped"] and doc["data_lost"]
    code, doc = run_json(capsys, "repair", "index")
    assert code == 0 and not doc["packs_dropped"]  # a second run finds nothing more

    # repair snapshots: a dry run, then the cut, then the originals forgotten
    code, doc = run_json(capsys, "repair", "snapshots", "--dry-run")
    assert code == EXIT["problems"] and [r["action"] for r in doc["repaired"]] == ["would repair"]
    (item,) = doc["repaired"]
    assert {(x["kind"], x["name"]) for x in item["lost"]} == {("file", "vm.conf")}
    capsys.readouterr()
    assert main(["repair", "snapshots"]) == EXIT["problems"]  # the original is kept
    text = capsys.readouterr().out
    assert "file vm.conf" in text and "original kept" in text and "tagged repaired" in text
    code, doc = run_json(capsys, "repair", "snapshots", "--forget")
    assert code == 0 and doc["damaged_remaining"] == 0
    code, doc = run_json(capsys, "check", "--read-data")
    assert code == 0 and doc["ok"]
    assert main(["prune", "-q"]) == 0
    code, snaps = run_json(capsys, "snapshots")
    assert len(snaps) == 4  # type: ignore[arg-type]
    assert sum("repaired" in s["tags"] for s in snaps) == 1  # type: ignore[attr-defined]


def test_forget_by_id_removes_an_unreadable_snapshot(vm: Path, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "-q"]) == 0
    assert main(["backup", str(vm), "-q"]) == 0
    (snap,) = list((env / "repo" / "snapshots").iterdir())
    snap.write_bytes(snap.read_bytes()[:-1] + b"!")
    assert main(["prune"]) == EXIT["error"]
    capsys.readouterr()
    assert main(["repair", "snapshots", "--forget"]) == EXIT["problems"]
    assert f"vmvault forget {snap.name[:12]}" in capsys.readouterr().out and snap.exists()
    code, doc = run_json(capsys, "forget", snap.name[:12], "--dry-run")
    assert code == 0 and doc["forget"]["removed"] == [snap.name] and snap.exists()
    assert main(["forget", snap.name[:12], "--keep-last", "1"]) == EXIT["usage"]
    assert main(["forget", snap.name[:12], "--prune", "-q"]) == 0
    assert not snap.exists()
    assert main(["check", "-q"]) == 0


@pytest.mark.parametrize(
    "policy",
    [
        ["--keep-tag", ""],
        ["--keep-tag", " "],
        ["--keep-tag", "a,"],
        ["--keep-tag", "typo"],  # a tag no snapshot carries
        ["--keep-tag", "typo,nightly"],  # no snapshot carries both
        ["--keep-tag", "nightly", "--group-by", "location,tags"],  # the untagged group would go
    ],
)
def test_forget_that_would_remove_everything_is_refused(
    vm: Path, env: Path, capsys: pytest.CaptureFixture[str], policy: list[str]
) -> None:
    assert main(["init", "-q"]) == 0
    assert main(["backup", str(vm), "-q", "--tag", "nightly"]) == 0
    assert main(["backup", str(vm), "-q"]) == 0
    before = sorted((env / "repo" / "snapshots").iterdir())
    for dry in ([], ["--dry-run"]):
        capsys.readouterr()
        try:
            code = main(["forget", *policy, *dry])
        except SystemExit as exc:  # refused while parsing the arguments
            code = int(exc.code or 0)
        assert code == EXIT["usage"]
        err = capsys.readouterr().err
        assert "empty" in err or "blank" in err or "every snapshot" in err
    assert sorted((env / "repo" / "snapshots").iterdir()) == before


@pytest.mark.parametrize("option", ["last", "hourly", "daily", "weekly", "monthly", "yearly"])
def test_every_keep_option_keeps_the_newest(
    vm: Path, env: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    assert main(["init", "-q"]) == 0
    for _ in range(3):
        assert main(["backup", str(vm), "-q"]) == 0
    code, doc = run_json(capsys, "forget", f"--keep-{option}", "1")
    assert code == 0 and len(doc["forget"]["kept"]) == 1 and len(doc["forget"]["removed"]) == 2
    code, snaps = run_json(capsys, "snapshots")
    assert [s["id"] for s in snaps] == doc["forget"]["kept"]  # type: ignore[index]


def test_forget_with_an_empty_id_is_a_usage_error(vm: Path, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "-q"]) == 0
    assert main(["backup", str(vm), "-q"]) == 0
    for argv in (["forget", ""], ["repair", "snapshots", ""]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == EXIT["usage"]
    assert len(list((env / "repo" / "snapshots").iterdir())) == 1

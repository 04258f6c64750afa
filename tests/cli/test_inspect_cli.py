"""ls, diff, stats, dump and tag: looking into snapshots without restoring them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from vmvault.cli import EXIT
from vmvault.sample_vm import guest_writes, make_disk

from .admin import env, make_vm, run, run_json

__all__ = ["env"]

MIB = 1 << 20


@pytest.fixture()
def two(env: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """web01 backed up, then changed (2 % of its disk, a file edited, one added, one removed)
    and backed up again; db once."""
    web = make_vm(env / "vms", "web01", size=8 * MIB, seed=1)
    (web / "notes.txt").write_text("first\n")
    db = make_vm(env / "vms", "db", size=4 * MIB, seed=2)
    assert run(capsys, "init")[0] == 0
    ids = {}
    ids["web1"] = run_json(capsys, "backup", str(web))[1]["snapshot"]
    guest_writes(str(web / "web01.raw"), percent=2, seed=9)
    (web / "web01.conf").write_text("name = web01\nmemory = 2G\n")
    (web / "notes.txt").unlink()
    (web / "added.txt").write_text("new\n")
    ids["web2"] = run_json(capsys, "backup", str(web))[1]["snapshot"]
    ids["db"] = run_json(capsys, "backup", str(db))[1]["snapshot"]
    return ids


def test_ls(two: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "ls", "latest", "--vm", "web01")
    assert code == 0
    assert out.startswith(f"snapshot {two['web2'][:8]} of VM web01, ")
    assert "web01.raw  raw     8.0 MiB" in out and "added.txt" in out and "notes.txt" not in out
    assert out.rstrip().endswith("1 disk, 0 layers, 2 files")
    code, doc, _err = run_json(capsys, "ls", two["web1"][:8])
    assert doc["snapshot"]["id"] == two["web1"] and doc["disks"][0]["stored_data"] > 0
    assert {f["name"] for f in doc["files"]} == {"web01.conf", "notes.txt"}


def test_ls_shows_a_checkpoint_chain_as_a_tree(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qemu_img = require_tool("qemu-img")
    vm = env / "vms" / "chain"
    vm.mkdir(parents=True)
    make_disk(str(env / "base.raw"), 4 * MIB, seed=3)
    subprocess.run(
        [qemu_img, "convert", "-q", "-O", "qcow2", str(env / "base.raw"), str(vm / "base.qcow2")], check=True
    )
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(vm / "top.qcow2")],
        check=True,
    )
    assert run(capsys, "init")[0] == 0
    assert run(capsys, "backup", str(vm))[0] == 0
    code, out, _err = run(capsys, "ls", "latest")
    assert code == 0
    rows = out.splitlines()
    base = next(i for i, line in enumerate(rows) if line.startswith("base.qcow2 "))
    assert rows[base + 1].startswith("  └ top.qcow2 ") and rows[base + 1].split()[-1] == "layer"
    assert out.rstrip().endswith("1 disk, 1 layer, 0 files")


def test_diff(two: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "diff", two["web1"][:8], two["web2"][:8])
    assert code == 0
    assert re.search(r"^M  disk web01\.raw\s+\d+ chunks? changed \(", out, re.M), out
    assert "+  file added.txt" in out and "-  file notes.txt" in out and "M  file web01.conf" in out
    code, doc, _err = run_json(capsys, "diff", two["web1"][:8], two["web2"][:8])
    disk = doc["disks"][0]
    assert disk["status"] == "changed" and 0 < disk["chunks_changed"] < 32  # 2 % of 8 MiB, 256 KiB chunks
    assert {f["name"]: f["status"] for f in doc["files"]} == {
        "added.txt": "added",
        "notes.txt": "removed",
        "web01.conf": "changed",
    }
    code, doc, _err = run_json(capsys, "diff", two["web2"][:8], two["web2"][:8])
    assert doc["disks"][0]["status"] == "unchanged" and doc["files"] == []
    code, doc, _err = run_json(capsys, "diff", two["web1"][:8], two["db"][:8])
    assert {d["status"] for d in doc["disks"]} == {"added", "removed"}


def test_stats(two: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _err = run_json(capsys, "stats")
    assert code == 0
    rows = {r["name"]: r for r in doc["vms"]}
    assert set(rows) == {"web01", "db"} and rows["web01"]["snapshots"] == 2
    web = rows["web01"]
    # two snapshots of an 8 MiB disk that changed by 2 %: logical ~2x unique
    assert web["logical"] > 1.8 * web["unique"] and web["dedup_ratio"] > 1.8
    assert web["stored"] > 0 and web["compression_ratio"] is not None
    total = doc["total"]
    assert total["logical"] == rows["web01"]["logical"] + rows["db"]["logical"]
    assert total["unique"] <= rows["web01"]["unique"] + rows["db"]["unique"]
    assert doc["storage_bytes"] >= total["stored"]
    code, out, _err = run(capsys, "stats", "--vm", "db")
    assert code == 0 and "\ndb " in out and "web01" not in out and "\nall " in out


def test_dump(two: dict[str, str], env: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "conf"
    code = subprocess.run(
        [sys.executable, "-m", "vmvault", "dump", two["web2"][:8], "web01.conf"],
        stdout=out_file.open("wb"),
        stderr=subprocess.PIPE,
        env=os.environ,
        check=False,
    ).returncode
    assert code == 0 and out_file.read_text() == "name = web01\nmemory = 2G\n"
    raw = tmp_path / "disk.raw"
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "dump", "latest", "web01.raw", "--vm", "web01"],
        stdout=raw.open("wb"),
        stderr=subprocess.PIPE,
        env=os.environ,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert raw.read_bytes() == (env / "vms" / "web01" / "web01.raw").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "dump", "latest", "nosuch.txt"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ,
        check=False,
        text=True,
    )
    assert proc.returncode == EXIT["error"] and "has no file or disk named 'nosuch.txt'" in proc.stderr


def test_tag(two: dict[str, str], capsys: pytest.CaptureFixture[str], env: Path) -> None:
    code, out, _err = run(capsys, "tag", two["web1"][:8], "--add", "keep", "--add", "audit")
    assert code == 0 and "retagged 1 snapshot" in out
    code, snaps, _err = run_json(capsys, "snapshots", "--tag", "keep,audit")
    assert len(snaps) == 1 and snaps[0]["id"] != two["web1"]
    new = snaps[0]["id"]
    assert not (env / "repo" / "snapshots" / two["web1"]).exists()
    code, shown, _err = run_json(capsys, "show", new[:8])
    assert shown["extra"]["original"] == two["web1"]
    # everything else is unchanged, and it still restores
    assert shown["disks"][0]["name"] == "web01.raw" and shown["time"]
    code, doc, _err = run_json(capsys, "tag", "--vm", "web01", "--set", "weekly")
    assert code == 0 and len(doc["changed"]) == 2 and all(c["tags"] == ["weekly"] for c in doc["changed"])
    code, doc, _err = run_json(capsys, "tag", "--vm", "web01", "--remove", "weekly")
    assert len(doc["changed"]) == 2
    code, doc, _err = run_json(capsys, "tag", "--vm", "web01", "--remove", "weekly")
    assert doc["changed"] == [] and len(doc["unchanged"]) == 2
    code, _out, _err = run(capsys, "restore", "latest", "--vm", "web01", "--target", str(env / "r"))
    assert code == 0
    code, snaps, _err = run_json(capsys, "snapshots")
    assert len(snaps) == 3
    code, _out, err = run(capsys, "tag", "--add", "x")
    assert code == EXIT["usage"] and "name the snapshots" in err
    code, _out, err = run(capsys, "tag", two["db"][:8])
    assert code == EXIT["usage"] and "--add" in err
    code, _out, err = run(capsys, "tag", two["db"][:8], "--set", "a", "--add", "b")
    assert code == EXIT["usage"]
    code, _out, err = run(capsys, "tag", two["db"][:8], "--add", "a,b")
    assert code == EXIT["usage"] and "comma" in err

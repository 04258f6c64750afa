"""``vmvault disk ...``: every subcommand, human and --json output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmvault.cli import EXIT, main
from vmvault.disk import create_image, open_image
from vmvault.disk.vhdx import open_vhdx_for_write

MIB = 1024 * 1024
SIZE = 64 * MIB


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code, out, _err = run(capsys, *argv, "--json")
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return code, doc


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "vm.vhdx"
    with create_image(str(path), "vhdx", SIZE) as w:
        w.write(0, b"boot" * 1024)
        w.write(40 * MIB, b"data" * 2048)
    return path


def read_all(path: Path | str) -> bytes:
    with open_image(str(path)) as img:
        return img.read(0, img.size)


def test_info_human_and_json(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "disk", "info", str(disk))
    assert code == 0
    assert "vhdx (dynamic)" in out and "chain of 1 layer" in out and "data write guid" in out
    child = disk.parent / "c.avhdx"
    assert main(["disk", "checkpoint", str(disk), "--name", "c", "-q"]) == 0
    code, doc = run_json(capsys, "disk", "info", str(child))
    assert code == 0
    assert doc["format"] == "vhdx" and doc["subtype"] == "differencing" and doc["depth"] == 2
    assert doc["virtual_size"] == SIZE and doc["block_size"] == 32 * MIB and doc["log"] == "clean"
    layers = doc["layers"]
    assert isinstance(layers, list) and [la["path"] for la in layers] == [str(child), str(disk)]
    assert layers[0]["allocated_bytes"] == 0 and layers[1]["allocated_bytes"] == 64 * MIB
    assert layers[0]["guids"]["virtual_disk_id"] == layers[1]["guids"]["virtual_disk_id"]
    # --parent: the parent moved; the locator cannot find it, the option can
    moved = disk.parent / "moved.vhdx"
    os.rename(disk, moved)
    code, _, err = run(capsys, "disk", "info", str(child))
    assert code == EXIT["source"] and "not found" in err and "Traceback" not in err
    code, doc = run_json(capsys, "disk", "info", str(child), "--parent", str(moved))
    assert code == 0 and doc["depth"] == 2


def test_map_is_json(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "disk", "map", str(disk))
    assert code == 0
    rows = json.loads(out)
    assert rows == [{"offset": 0, "length": SIZE, "kind": "data"}]  # both 32 MiB blocks hold data
    assert main(["disk", "checkpoint", str(disk), "--name", "c", "-q"]) == 0
    child = disk.parent / "c.avhdx"
    with open_vhdx_for_write(str(child)) as w:
        w.write(MIB, b"x" * 4096)
    code, doc = run_json(capsys, "disk", "map", str(child), "--layer")
    assert code == 0
    assert doc["extents"] == [
        {"offset": 0, "length": MIB, "kind": "parent"},
        {"offset": MIB, "length": 4096, "kind": "data"},
        {"offset": MIB + 4096, "length": SIZE - MIB - 4096, "kind": "parent"},
    ]
    assert doc["allocated_bytes"] == 4096 and doc["virtual_size"] == SIZE


def test_check_clean_and_damaged(disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "disk", "check", str(disk))
    assert code == 0 and "no problems found" in out
    code, doc = run_json(capsys, "disk", "check", str(disk))
    assert code == 0 and doc["ok"] is True and doc["bytes_read"] == SIZE
    # both headers damaged: the file cannot be trusted at all
    bad = tmp_path / "bad.vhdx"
    raw = bytearray(disk.read_bytes())
    raw[0x10000 + 100] ^= 0xFF
    raw[0x20000 + 100] ^= 0xFF
    bad.write_bytes(raw)
    before = bad.read_bytes()
    code, out, err = run(capsys, "disk", "check", str(bad))
    assert code == EXIT["problems"] == 3
    assert "header" in out and "0x10000" in out and "Traceback" not in err
    code, doc = run_json(capsys, "disk", "check", str(bad))
    assert code == 3 and doc["ok"] is False
    problems = doc["problems"]
    assert isinstance(problems, list) and problems[0]["structure"] == "header" and problems[0]["offset"] == 0x10000
    assert bad.read_bytes() == before  # check never writes
    # a BAT entry pointing past the end of the file
    trunc = tmp_path / "trunc.vhdx"
    trunc.write_bytes(disk.read_bytes()[: 40 * MIB])
    code, doc = run_json(capsys, "disk", "check", str(trunc))
    assert code == 3 and "past the end" in str(doc["problems"])
    # a missing file is not damage but an unusable source
    code, _, err = run(capsys, "disk", "check", str(tmp_path / "nope.vhdx"))
    assert code == EXIT["source"] and "nope.vhdx" in err


def test_compare_exit_codes(disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy.qcow2"
    assert main(["disk", "convert", str(disk), str(copy), "--to", "qcow2", "-q"]) == 0
    code, out, _ = run(capsys, "disk", "compare", str(disk), str(copy))
    assert code == 0 and "identical" in out
    assert main(["disk", "checkpoint", str(disk), "--name", "c", "-q"]) == 0
    child = tmp_path / "c.avhdx"
    with open_vhdx_for_write(str(child)) as w:
        w.write(5 * MIB, b"\x01" * 1024)
    code, out, _ = run(capsys, "disk", "compare", str(copy), str(child))
    assert code == EXIT["problems"] and "1 range" in out
    code, doc = run_json(capsys, "disk", "compare", str(copy), str(child))
    assert code == 3 and doc["identical"] is False
    assert doc["differences"] == [{"offset": 5 * MIB, "length": 1024}] and doc["differing_bytes"] == 1024


def test_checkpoint_apply_merge(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = read_all(disk)
    code, doc = run_json(capsys, "disk", "checkpoint", str(disk))
    assert code == 0
    child = Path(str(doc["checkpoint"]))
    assert child.suffix == ".avhdx" and child.parent == disk.parent
    with open_vhdx_for_write(str(child)) as w:
        w.write(7 * MIB, b"new" * 100)
    changed = read_all(child)
    # a checkpoint with a checkpoint below it is not discarded without --subtree
    code, doc = run_json(capsys, "disk", "checkpoint", str(child))
    grand = Path(str(doc["checkpoint"]))
    code, _, err = run(capsys, "disk", "apply", str(child))
    assert code == EXIT["usage"] and "below it" in err
    code, doc = run_json(capsys, "disk", "apply", str(grand))
    assert code == 0 and doc["parent"] == str(child) and not grand.exists()
    code, doc = run_json(capsys, "disk", "merge", str(child))
    assert code == 0 and doc["parent"] == str(disk) and not child.exists()
    assert read_all(disk) == changed != original
    # apply: back to the checkpoint's state
    code, out, _ = run(capsys, "disk", "checkpoint", str(disk), "--name", "try")
    assert code == 0 and "checkpoint created" in out
    with open_vhdx_for_write(str(disk.parent / "try.avhdx")) as w:
        w.write(0, b"oops" * 128)
    code, out, _ = run(capsys, "disk", "apply", str(disk.parent / "try.avhdx"))
    assert code == 0 and "discarded" in out
    assert read_all(disk) == changed
    # merge of a base image is refused with a usage error
    code, _, err = run(capsys, "disk", "merge", str(disk))
    assert code == EXIT["usage"] and "no parent" in err


def test_convert_every_format(disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = read_all(disk)
    for fmt in ("raw", "vhdx", "vhd", "qcow2"):
        dest = tmp_path / f"out.{fmt}"
        code, doc = run_json(capsys, "disk", "convert", str(disk), str(dest), "--to", fmt)
        assert code == 0 and doc["format"] == fmt and doc["virtual_size"] == SIZE
        assert read_all(dest) == want
    code, _, err = run(capsys, "disk", "convert", str(disk), str(tmp_path / "out.raw"), "--to", "raw")
    assert code == EXIT["usage"] and "exists" in err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "disk")
    assert code == EXIT["usage"] and "checkpoint" in out
    with pytest.raises(SystemExit) as exc:
        main(["disk", "convert", "a", "b", "--to", "vmdk"])
    assert exc.value.code == 2


def test_entry_point_runs(disk: Path) -> None:
    """The installed command, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "vmvault", "disk", "info", str(disk), "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "vhdx"

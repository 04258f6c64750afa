"""``vmvault disk ...``: every subcommand, human and --json output, exit codes."""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool, small_tmpfs
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
    code, _, err = run(capsys, "disk", "apply", str(child), "--yes")
    assert code == EXIT["usage"] and "below it" in err
    code, doc = run_json(capsys, "disk", "apply", str(grand), "--yes")
    assert code == 0 and doc["parent"] == str(child) and not grand.exists()
    code, doc = run_json(capsys, "disk", "merge", str(child))
    assert code == 0 and doc["parent"] == str(disk) and not child.exists()
    assert read_all(disk) == changed != original
    # apply: back to the checkpoint's state
    code, out, _ = run(capsys, "disk", "checkpoint", str(disk), "--name", "try")
    assert code == 0 and "checkpoint created" in out
    with open_vhdx_for_write(str(disk.parent / "try.avhdx")) as w:
        w.write(0, b"oops" * 128)
    code, out, _ = run(capsys, "disk", "apply", str(disk.parent / "try.avhdx"), "-y")
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


# ---- check: metadata alone, or metadata and data ------------------------------------------


def qemu(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)


def qcow2_with_data(path: Path) -> Path:
    assert qemu("qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M").returncode == 0
    assert qemu("qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 40M 1M", str(path)).returncode == 0
    return path


def first_l2_entry(path: Path, index: int) -> tuple[int, int]:
    raw = path.read_bytes()
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    return l2 + 8 * index, struct.unpack_from(">Q", raw, l2 + 8 * index)[0]


def test_check_metadata_only_agrees_with_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = qcow2_with_data(tmp_path / "clean.qcow2")
    code, out, _ = run(capsys, "disk", "check", "--metadata-only", str(clean))
    assert code == EXIT["ok"] and "no problems found in the metadata" in out and "no data read" in out
    code, doc = run_json(capsys, "disk", "check", "--metadata-only", str(clean))
    assert doc["mode"] == "metadata" and doc["bytes_read"] == 0 and doc["tables_checked"] >= 3
    # a leaked cluster: qemu-img check exits 3 (leaks only); here it is said, and is no damage
    leaky = qcow2_with_data(tmp_path / "leaky.qcow2")
    size = leaky.stat().st_size
    raw = bytearray(leaky.read_bytes()) + bytes(65536)
    rt = struct.unpack_from(">Q", raw, 48)[0]
    block = struct.unpack_from(">Q", raw, rt)[0]
    struct.pack_into(">H", raw, block + 2 * (size // 65536), 1)
    leaky.write_bytes(bytes(raw))
    assert qemu("qemu-img", "check", str(leaky)).returncode == 3
    code, out, _ = run(capsys, "disk", "check", "--metadata-only", str(leaky))
    assert code == EXIT["ok"] and "1 leaked cluster (64.0 KiB)" in out and "no harm" in out
    # a cluster in use with refcount 0: qemu-img check exits 2 (corruptions); here exit 3
    bad = qcow2_with_data(tmp_path / "bad.qcow2")
    raw = bytearray(bad.read_bytes())
    _where, entry = first_l2_entry(bad, 0)
    struct.pack_into(">H", raw, block + 2 * ((entry & 0x00FFFFFFFFFFFE00) // 65536), 0)
    bad.write_bytes(bytes(raw))
    assert qemu("qemu-img", "check", str(bad)).returncode == 2
    code, doc = run_json(capsys, "disk", "check", "--metadata-only", str(bad))
    assert code == EXIT["problems"] and len(doc["problems"]) == 2 and doc["ok"] is False
    assert "refcount is 0" in doc["problems"][0]["message"] and doc["problems"][0]["structure"] == "qcow2 refcounts"
    code, out, _ = run(capsys, "disk", "check", "--metadata-only", str(bad))
    assert code == EXIT["problems"] and out.startswith("damaged: ") and f"({entry & 0x00FFFFFFFFFFFE00:#x})" in out


def test_check_reads_data_unless_told_not_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Compressed clusters whose bytes are garbage: the tables are sound, the data is not."""
    src = qcow2_with_data(tmp_path / "a.qcow2")
    packed = tmp_path / "c.qcow2"
    assert qemu("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(packed)).returncode == 0
    _where, entry = first_l2_entry(packed, 0)
    host = entry & ((1 << 62) - 1) & ((1 << (62 - 8)) - 1)  # 64 KiB clusters: offset in bits 0..53
    raw = bytearray(packed.read_bytes())
    raw[host : host + 64] = b"\xff" * 64
    packed.write_bytes(bytes(raw))
    code, doc = run_json(capsys, "disk", "check", "--metadata-only", str(packed))
    assert code == EXIT["ok"] and doc["bytes_read"] == 0
    code, doc = run_json(capsys, "disk", "check", str(packed))
    assert code == EXIT["problems"] and doc["mode"] == "full" and "compressed" in str(doc["problems"])


def test_check_metadata_of_every_layer(disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["disk", "checkpoint", str(disk), "--name", "c", "-q"]) == 0
    code, doc = run_json(capsys, "disk", "check", "--metadata-only", str(tmp_path / "c.avhdx"))
    assert code == 0 and doc["layers"] == 2 and doc["tables_checked"] >= 4
    # a block of the base that overlaps another one: the base's own check finds it
    raw = bytearray(disk.read_bytes())
    bat = 3 * MIB
    raw[bat + 8 : bat + 16] = raw[bat : bat + 8]
    disk.write_bytes(bytes(raw))
    code, doc = run_json(capsys, "disk", "check", "--metadata-only", str(tmp_path / "c.avhdx"))
    assert code == EXIT["problems"] and "overlaps" in doc["problems"][0]["message"]


# ---- compare: sizes, decimal and hex ---------------------------------------------------------


def test_compare_says_when_sizes_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"x" * MIB + bytes(MIB))
    b.write_bytes(b"x" * MIB)
    code, out, _ = run(capsys, "disk", "compare", str(a), str(b))
    assert code == EXIT["problems"]
    assert f"sizes differ: {a} is 2.0 MiB (2097152 bytes), {b} is 1.0 MiB (1048576 bytes)" in out
    assert "the 1048576 bytes past 1048576 (0x100000) exist in one image only" in out
    assert "the first 1.0 MiB (1048576 bytes) of both are identical" in out
    code, doc = run_json(capsys, "disk", "compare", str(a), str(b))
    assert doc["sizes_differ"] is True and doc["identical"] is False


def test_compare_offsets_in_decimal_and_hex_match_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2_with_data(a)
    shutil.copy(a, b)
    assert qemu("qemu-io", "-c", "write -P 0x55 5243392 1024", "-c", "write -P 0x66 41M 512", str(b)).returncode == 0
    code, out, _ = run(capsys, "disk", "compare", str(a), str(b))
    assert code == EXIT["problems"] and "contents differ in 2 ranges, 1536 bytes:" in out
    assert "  offset 5243392 (0x500200), 1024 bytes (0x400)" in out
    assert f"  offset {41 * MIB} ({41 * MIB:#x}), 512 bytes (0x200)" in out
    theirs = qemu("qemu-img", "compare", str(a), str(b))
    assert theirs.returncode == 1 and "Content mismatch at offset 5243392!" in theirs.stdout


# ---- apply asks first; merge says and checks what room it needs ---------------------------


def on_terminal(argv: list[str], answer: bytes) -> tuple[int, str]:
    """Run ``vmvault ARGV`` with a pseudo-terminal as its stdin, stdout and stderr, answering the
    question it asks with ``answer``."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vmvault", *argv], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""
    try:
        while b"[y/N]" not in seen:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no question asked: {seen!r}"
            seen += os.read(master, 4096)
        os.write(master, answer + b"\n")
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the other side closed (EIO)
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=30), seen.decode(errors="replace")


def test_apply_deletes_only_when_confirmed(disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["disk", "checkpoint", str(disk), "--name", "c", "-q"]) == 0
    child = tmp_path / "c.avhdx"
    assert main(["disk", "checkpoint", str(child), "--name", "g", "-q"]) == 0
    grand = tmp_path / "g.avhdx"
    # no terminal, no --yes: refused, nothing deleted
    code, _, err = run(capsys, "disk", "apply", str(child), "--subtree")
    assert code == EXIT["usage"] and "give --yes to confirm (no terminal to ask on)" in err
    assert f"deletes 2 files ({grand}, {child})" in err and child.exists() and grand.exists()
    # on a terminal: the files are listed and a "no" keeps them
    code, text = on_terminal(["disk", "apply", str(child), "--subtree"], b"n")
    assert code == EXIT["usage"] and str(grand) in text and "not confirmed: nothing was deleted" in text
    assert child.exists() and grand.exists()
    code, text = on_terminal(["disk", "apply", str(grand)], b"y")
    assert code == EXIT["ok"] and f"discarded {grand}" in text and not grand.exists()
    code, doc = run_json(capsys, "disk", "apply", str(child), "--yes")
    assert code == 0 and doc["deleted"] == [str(child)] and not child.exists()


def test_merge_help_states_the_space_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["disk", "merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "needs room for that file" in text and "a fixed-size parent: its full size" in text
    assert "stops before writing anything (exit 13)" in text


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tmpfs", "12m") as mnt:
        yield mnt


@pytest.mark.integration
def test_merge_refuses_a_real_full_disk(tmpfs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmpfs / "base.qcow2"
    with create_image(str(base), "qcow2", SIZE) as w:
        w.write(0, os.urandom(4 * MIB))
    assert main(["disk", "checkpoint", str(base), "--name", "c", "-q"]) == 0
    child = tmpfs / "c.qcow2"
    from vmvault.disk.chain import open_for_write

    with open_for_write(str(child)) as w:
        w.write(4 * MIB, os.urandom(4 * MIB))
    before = {p.name: p.read_bytes() for p in tmpfs.iterdir()}
    code, _, err = run(capsys, "disk", "merge", str(child))
    assert code == EXIT["source"] and "needs up to" in err and "nothing was changed" in err
    assert {p.name: p.read_bytes() for p in tmpfs.iterdir()} == before

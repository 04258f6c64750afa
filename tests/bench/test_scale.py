"""bench/scale.py's commands: the order of ``--ops``, stopping a command whose harness failed,
and one cheap run (N = 0, a 64 MiB disk) of the commands that read one snapshot."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.bench import BENCH, run_bench


@pytest.fixture
def scale(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # scale.py imports its sibling _common
    return importlib.import_module("scale")


def test_ops_run_in_their_fixed_order_and_unknown_ones_are_refused(scale: ModuleType) -> None:
    assert scale.parse_ops("mount, show,files,copy") == ("show", "copy", "files", "mount")
    assert scale.parse_ops("prune,mount,backup") == ("backup", "mount", "prune")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown commands cp"):
        scale.parse_ops("show,cp")


def test_a_failing_harness_stops_the_command_it_started(scale: ModuleType, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    seen: list[int] = []

    def fail(helper: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.extend(int(p) for p in Path(f"/proc/{helper.pid}/task/{helper.pid}/children").read_text().split())
        raise SystemExit("the read through the mount failed")

    cmd = [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(SystemExit, match="the read through the mount failed"):
        scale.timed(cmd, {}, during=fail)
    assert time.monotonic() - started < 30
    assert len(seen) == 1
    assert not os.path.exists(f"/proc/{seen[0]}")  # ended and reaped, not left behind


@pytest.mark.slow
@pytest.mark.integration
def test_show_copy_files_and_mount_measured_at_n0(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("mount is measured through the real FUSE device (/dev/fuse, fusermount3: fuse3)")
    pytest.importorskip("mfusepy", reason="mfusepy is vmvault's mount extra")
    if shutil.which("mke2fs") is None:
        pytest.skip("files needs mke2fs (e2fsprogs) to build its disk")
    args = ["--chunks", "0", "--disk-size", "64M", "--work", str(tmp_path / "w"), "--json"]
    out = run_bench("scale.py", *args, "--ops", "show,copy,files,mount,restore")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ops = result["ops"]
    assert list(ops) == ["show", "copy", "files", "mount", "restore"]
    for name, figures in ops.items():
        assert 20 < figures["peak_rss_mib"] < 2000, name
        assert figures["cpu_seconds"] > 0, name
    files = ops["files"]
    assert files["peak_rss_mib"] == max(files["ls_peak_rss_mib"], files["restore_peak_rss_mib"])
    assert files["seconds"] == pytest.approx(files["ls_seconds"] + files["restore_seconds"], abs=0.02)
    assert 0 < ops["mount"]["read_seconds"] <= ops["mount"]["seconds"]
    assert not (tmp_path / "w").exists()  # no --keep: the scratch folder is gone, no mount left in it

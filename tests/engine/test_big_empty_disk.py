"""An empty disk costs nothing per virtual byte (issue 9, Medium: 64 TiB took 2.1 GB, 1 PiB ran out).

A 1 PiB empty qcow2 made by ``qemu-img create`` is backed up, shown, checked and restored as
a sparse qcow2, each through the real command in its own process, whose peak memory
(``getrusage``) and time are bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIB = 1 << 50
#: peak RSS of one command, in KiB; the measured figures are 60-100 MB (interpreter included)
RSS_LIMIT_KIB = 250 * 1024
#: generous: the measured total is about 15 s on a loaded 2-core machine
TIME_LIMIT = 120.0

# The command runs as the child of a small fresh interpreter, which reports the child's peak
# RSS with getrusage(RUSAGE_CHILDREN): a process's own ru_maxrss would include the memory of
# the process it was forked from (the test runner), carried across exec.
_RUN = """
import json, resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "vmvault", *sys.argv[1:]])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": proc.returncode, "rss_kib": peak}), file=sys.stderr)
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]


def vmvault(env: dict[str, str], *args: str) -> tuple[str, int]:
    """Run one command in a fresh interpreter; returns its stdout and peak RSS (KiB)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, *args], env=env, capture_output=True, text=True, timeout=TIME_LIMIT
    )
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    try:
        result = json.loads(last)
    except ValueError:
        raise AssertionError(f"vmvault {' '.join(args)} failed:\n{proc.stderr}") from None
    assert result["code"] == 0, f"vmvault {' '.join(args)} exited {result['code']}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, int(result["rss_kib"])


def test_a_petabyte_empty_qcow2_is_backed_up_shown_checked_and_restored_in_little_memory(tmp_path: Path) -> None:
    image = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1P"], check=True)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        VMVAULT_TEST_CHEAP_KDF="1",
        VMVAULT_PASSWORD="correct horse battery",
        VMVAULT_REPO=str(tmp_path / "repo"),
    )
    env.pop("VMVAULT_PASSWORD_FILE", None)
    started = time.monotonic()
    vmvault(env, "init", "-q")
    peaks = {}
    out, peaks["backup"] = vmvault(env, "backup", str(image), "--json")
    backed = json.loads(out)
    assert backed["bytes_read"] == 0 and backed["bytes_added"] == 0
    assert backed["disks"][0]["size"] == PIB
    out, peaks["show"] = vmvault(env, "show", "latest", "--json")
    shown = json.loads(out)
    assert shown["disks"][0]["size"] == PIB and shown["disks"][0]["index_blocks"] == PIB // (4096 * 256 * 1024)
    out, peaks["check"] = vmvault(env, "check", "--read-data", "--json")
    assert json.loads(out)["ok"]
    target = tmp_path / "restored"
    out, peaks["restore"] = vmvault(env, "restore", "latest", "--target", str(target), "--format", "qcow2", "--json")
    elapsed = time.monotonic() - started
    restored = target / "big.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(restored)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["virtual-size"] == PIB and info["format"] == "qcow2"
    assert os.stat(restored).st_blocks * 512 < 64 << 20, "restored sparse: only qcow2 metadata is allocated"
    assert all(peak < RSS_LIMIT_KIB for peak in peaks.values()), peaks
    assert elapsed < TIME_LIMIT, f"{elapsed:.1f} s"
    print(f"peak RSS (KiB): {peaks}; {elapsed:.1f} s")

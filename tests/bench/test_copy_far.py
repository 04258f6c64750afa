"""bench/copy_far.py: one cheap run (8 index blocks, 10 ms away) times the copy of each code
given, takes over the blocks that did not change, and restores the last copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.bench import BENCH, run_bench


@pytest.mark.slow
def test_a_copy_into_a_far_sftp_target_is_timed_per_code(tmp_path: Path) -> None:
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        pytest.skip("OpenSSH's server is not installed (apt-get install openssh-server)")
    src = str(BENCH.parent / "src")
    args = ["--rtt-ms", "10", "--blocks", "8", "--runs", "2", "--work", str(tmp_path / "w")]
    out = run_bench("copy_far.py", *args, "--code", src, "--code", src, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ((code, runs),) = result["runs"].items()  # the same folder twice: one code, timed four times
    assert code.endswith(f"({Path(src).resolve()})")
    assert len(runs) == 4
    for run in runs:
        # three of eight blocks change each run: five are taken over, three chunks downloaded
        assert run == {"seconds": run["seconds"], "index_blocks_reused": 5, "chunks_read": 3}
        assert run["seconds"] > 0
    assert not (tmp_path / "w").exists()  # the scratch folder is gone

"""bench/incremental_far.py: one cheap run (8 index blocks, 10 ms away) times an incremental
backup of each code given into a real SFTP server (or a moto S3 server) behind the delaying
relay; with ``--packs`` the parent's chunks fill a pack each, written near the server first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.bench import BENCH, run_bench


@pytest.mark.slow
@pytest.mark.parametrize(
    "packs",
    [[], ["--packs", "16"], ["--backend", "s3", "--packs", "16"]],
    ids=["one-pack", "a-pack-a-chunk", "s3-a-pack-a-chunk"],
)
def test_an_incremental_into_a_far_repository_is_timed_per_code(tmp_path: Path, packs: list[str]) -> None:
    if "s3" not in packs and shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        pytest.skip("OpenSSH's server is not installed (apt-get install openssh-server)")
    src = str(BENCH.parent / "src")
    args = ["--rtt-ms", "10", "--blocks", "8", "--runs", "2", "--work", str(tmp_path / "w"), "--code", src, *packs]
    out = run_bench("incremental_far.py", *args, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ((code, times),) = result["runs"].items()
    assert code.endswith(f"({Path(src).resolve()})")
    assert len(times) == 2 and all(t > 0 for t in times)
    assert result["options"] == " ".join(packs)
    assert "full backup" in out.stderr
    assert not (tmp_path / "w").exists()  # the scratch folder is gone

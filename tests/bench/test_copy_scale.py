"""bench/copy_scale.py: one cheap run (a 64 MiB disk in 16 KiB chunks) measures both copies,
reads only the changed chunks the second time, and restores the changed disk from the copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import run_bench


@pytest.mark.slow
def test_both_copies_measured_on_a_small_disk(tmp_path: Path) -> None:
    args = ["--size", "64M", "--chunk-size", "16K", "--work", str(tmp_path / "w"), "--image-dir", str(tmp_path)]
    out = run_bench("copy_scale.py", *args, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    first, again = result["steps"]["first copy"], result["steps"]["copy after change"]
    assert first["chunks_read"] > 100 and 0 < again["chunks_read"] < first["chunks_read"] // 5
    for step in (first, again):
        assert step["seconds"] > 0 and step["cpu_seconds"] > 0 and 20 < step["peak_rss_mib"] < 2000
    assert not (tmp_path / "w").exists()  # the scratch folder is gone

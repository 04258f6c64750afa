"""Tests of the benchmark scripts in bench/ (their harness, not their figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(script: str, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """``bench/<script> ARGS`` in a child with this checkout's ``src`` first on its path."""
    src = BENCH.parent / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )

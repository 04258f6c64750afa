"""bench/_common.py's measuring of a command: its own wall time, CPU time and peak RSS."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

#: a command that sleeps 0.3 s, then spends CPU and holds about 64 MiB
BUSY = [sys.executable, "-c", "import time; time.sleep(0.3); b = bytearray(64 << 20); sum(range(3_000_000))"]


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("_common")


@pytest.mark.parametrize("helper", ["gnu time", "python"])
def test_a_timed_command_counts_its_own_time_cpu_and_memory(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, helper: str
) -> None:
    if helper == "python":
        monkeypatch.setattr(common, "GNU_TIME", str(tmp_path / "no-such-time"))
    elif not Path(common.GNU_TIME).exists():
        pytest.skip("GNU time is not installed (Debian package time)")
    run = common.timed_child(BUSY)
    assert run.returncode == 0 and run.stderr == ""  # the helper's lines are taken off
    assert 0.3 < run.seconds < 5
    assert 0.05 < run.cpu_s < run.seconds
    assert 64 < run.max_rss_mib < 200


def test_a_failing_command_stops_the_benchmark_with_its_output(common: ModuleType) -> None:
    with pytest.raises(SystemExit, match="No such file or directory"):
        common.timed_child([sys.executable, "-c", "open('/no/such/file')"])

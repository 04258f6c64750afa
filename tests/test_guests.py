"""The bootable test guest (tests/guests.py) boots under TCG, and does not with its boot sector wiped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.guests import MARKER, boot, guest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_guest_boots_prints_its_marker_and_answers_guest_ping(tmp_path: Path) -> None:
    g = guest()
    result = boot(g.disk, tmp_path / "boot")
    assert result.booted, f"no {MARKER} on the serial console:\n{result.serial[-2000:]}\n{result.firmware[-1000:]}"
    assert result.agent_replied, "qemu-guest-agent did not answer guest-ping"
    print(f"\nkernel {g.kernel}: {MARKER} after {result.seconds:.1f} s under TCG")


def test_the_guest_with_its_boot_sector_wiped_does_not_boot(tmp_path: Path) -> None:
    g = guest()
    disk = tmp_path / "wiped.raw"
    shutil.copyfile(g.disk, disk)
    with open(disk, "r+b") as f:
        f.write(bytes(512))
    result = boot(disk, tmp_path / "boot", timeout=120, ping_agent=False)
    assert not result.booted
    assert MARKER not in result.serial
    assert "No bootable device" in result.firmware, result.firmware[-1000:]
    assert result.seconds < 60, "the firmware gives up at once; the test does not wait for a timeout"

"""Quiesce through a real guest agent: a domain booting the test guest (Debian's kernel and
qemu-guest-agent, tests/guests.py) under TCG; the backup asks libvirt to freeze and thaw."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.guests import guest
from tests.libvirtd import Disk, LibvirtVM, libvirtd, make_domain
from vmvault.hypervisors.libvirt import LibvirtSource

__all__ = ["libvirtd", "make_domain"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024


def test_a_real_guest_agent_freezes_and_thaws_around_the_job(
    make_domain: Callable[..., LibvirtVM], tmp_path: Path
) -> None:
    image = guest().disk
    serial = tmp_path / "serial.log"
    vm = make_domain(
        [Disk("vda", "qcow2", 64 * MiB)],
        agent=True,
        start=False,
        memory_mib=256,
        extra_devices=f"<serial type='file'><source path='{serial}'/><target port='0'/></serial>",
    )
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), vm.paths["vda"]], check=True)
    vm.start()
    deadline = time.monotonic() + 120
    while True:
        try:
            vm.agent_command("guest-ping")
            break
        except Exception:
            if time.monotonic() > deadline:
                tail = serial.read_text(errors="replace")[-2000:] if serial.exists() else "(no serial output)"
                pytest.fail(f"the guest agent did not answer within 120 s of the start; serial console:\n{tail}")
            time.sleep(2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    source = LibvirtSource(f"{vm.location}&scratch={quote(str(scratch), safe='')}")
    with source.open_session(None) as session:
        # the agent answered the freeze: the guest (an initramfs) has no file system it can
        # freeze, which it reports as 0 frozen, so the backup says it is crash-consistent
        assert not any("could not freeze" in w for w in session.warnings), session.warnings
        assert any("froze no file system" in w for w in session.warnings), session.warnings
        assert session.consistency == "crash-consistent"
        assert vm.agent_command("guest-fsfreeze-status") == "thawed"
    assert vm.agent_command("guest-fsfreeze-status") == "thawed"
    assert not vm.has_job() and list(scratch.iterdir()) == []

"""Instant recovery into a transient libvirt domain (a real libvirtd in a private namespace,
tests/libvirtd.py): guest writes kept, a damaged chunk pausing the domain and the copy, resume
after repair, abort."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.engine.test_instant import CS, PASS, SIZE, Setup
from tests.libvirtd import Libvirtd, libvirtd
from vmvault.engine import instant

__all__ = ["libvirtd"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _start(setup: Setup, uri: str, **kw: object) -> dict[str, object]:
    options = instant.InstantOptions(accel="tcg", memory_mb=64, libvirt_uri=uri, **kw)  # type: ignore[arg-type]
    return instant.start(str(setup.repo_dir), PASS, setup.snap, setup.target, options)


def _guest_write(libvirtd: Libvirtd, name: str, setup: Setup, offset: int, length: int, byte: int) -> None:
    dom = libvirtd.conn.lookupByName(name)
    cmd = f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P {byte} {offset} {length}"'
    import libvirt_qemu  # type: ignore[import-not-found]

    libvirt_qemu.qemuMonitorCommand(dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    setup.data[offset : offset + length] = bytes([byte]) * length


def _qemu_argv(name: str) -> list[str]:
    """The command line of the QEMU process running the domain ``name``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(name.encode() in a for a in argv):
            return [a.decode(errors="replace") for a in argv]
    raise AssertionError(f"no QEMU runs {name}")


def test_a_libvirt_domain_runs_from_the_repository_and_ends_on_local_disks(libvirtd: Libvirtd, tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    try:
        state = _start(setup, libvirtd.uri, speed=4 << 20)
        name = state["libvirt"]["name"]  # type: ignore[index]
        dom = libvirtd.conn.lookupByName(name)
        assert dom.isActive() and not dom.isPersistent(), "a transient domain: nothing left defined"
        xml = dom.XMLDesc(0)
        assert "rerror_policy='stop'" in xml and "protocol='nbd'" in xml
        # the serial console's file is virtlogd's (libvirt's default stdio_handler), which rotates
        # it: QEMU was handed a descriptor (an fdset), not the file's name, so a guest printing
        # without end cannot fill DIR's file system
        serial = [a for a in _qemu_argv(name) if "serial" in a and a.startswith("file,")]
        assert serial and all("/dev/fdset/" in a for a in serial), serial
        _guest_write(libvirtd, name, setup, 20 << 20, 3 * CS, 0xAA)
        progress: list[tuple[int, int]] = []
        done = instant.watch(setup.target, on_progress=lambda d, t: progress.append((d, t)), timeout=180)
        assert done["phase"] == "done", done
        assert progress[-1] == (SIZE, SIZE)
        assert "protocol='nbd'" not in dom.XMLDesc(0), "the backing is gone from the domain"
        live = instant.status(setup.target)["live"]
        assert live["qemu"] and live["vm"] == "running" and not live["export"]
        instant.abort(setup.target)
        assert name not in [d.name() for d in libvirtd.conn.listAllDomains()]
        assert setup.local_disk() == bytes(setup.data)
    finally:
        if (setup.target / instant.STATE_FILE).exists():
            instant.abort(setup.target)


def test_a_damaged_chunk_pauses_the_domain_and_resume_after_repair(libvirtd: Libvirtd, tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    pack, original = setup.damage_chunk(0)
    try:
        state = _start(setup, libvirtd.uri, cache_bytes=0)
        paused = instant.watch(setup.target, timeout=180)
        assert paused["phase"] == "paused", paused
        dom = libvirtd.conn.lookupByName(state["libvirt"]["name"])  # type: ignore[index]
        # the firmware's read of the boot sector fails: the domain is paused on the I/O error
        deadline = time.monotonic() + 60
        while dom.state(0) != [3, 5] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dom.state(0) == [3, 5], dom.state(0)  # VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_IOERROR
        assert instant.status(setup.target)["live"]["vm"] == "io-error"
        pack.write_bytes(original)  # repaired
        assert instant.resume(str(setup.repo_dir), PASS, setup.target)["phase"] == "copying"
        assert instant.watch(setup.target, timeout=180)["phase"] == "done"
        assert dom.state(0)[0] == 1, "running again"
        instant.abort(setup.target)
        assert setup.local_disk() == bytes(setup.data)
    finally:
        if (setup.target / instant.STATE_FILE).exists():
            instant.abort(setup.target)

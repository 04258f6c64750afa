"""Restoring a VM: the connector that made the snapshot gets its step, with the snapshot's
own names, also for a clone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from vmvault.backends.memory import MemoryBackend
from vmvault.engine.backup import backup
from vmvault.engine.clone import restore_clone, restore_vm
from vmvault.errors import ConfigError
from vmvault.hypervisors import registry
from vmvault.hypervisors.base import RestoredVm, RestoreNote
from vmvault.hypervisors.files import FilesSource
from vmvault.repo.repository import Repository
from vmvault.repo.snapshot import Snapshot

CS = 64 * 1024
SEEN: list[RestoredVm] = []


def record(restored: RestoredVm) -> RestoreNote:
    """An ``after_restore`` for the tests: keeps what it was handed."""
    SEEN.append(restored)
    return RestoreNote(facts={"seen": len(SEEN)}, lines=[f"  recorded {restored.kind}"])


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMVAULT_TEST_CHEAP_KDF", "1")
    SEEN.clear()


@pytest.fixture()
def snap(tmp_path: Path) -> tuple[Repository, Snapshot]:
    vm = tmp_path / "web"
    (vm / "Virtual Machines").mkdir(parents=True)
    (vm / "Virtual Machines" / "0A1B.vmcx").write_bytes(b"config")
    (vm / "web.raw").write_bytes(b"d" * CS)
    (vm / "web.nvram").write_bytes(b"n" * 100)
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    return repo, backup(repo, FilesSource(str(vm))).snapshot


def _recording(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    entry = replace(registry.CONNECTORS[0], name="recording", kinds=(kind,), after_restore=f"{__name__}:record")
    others = tuple(c for c in registry.CONNECTORS if kind not in c.kinds)
    monkeypatch.setattr(registry, "CONNECTORS", (*others, entry))


def test_a_clone_step_sees_the_snapshots_own_names(
    snap: tuple[Repository, Snapshot], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, s = snap
    _recording(monkeypatch, "files")
    done = restore_vm(repo, s, str(tmp_path / "out"), clone_name="web2")
    (restored,) = SEEN
    assert restored.clone_name == "web2" and not restored.partial and restored.kind == "files"
    assert restored.vm["name"] == "web"  # the snapshot's record, not the clone's
    assert restored.folder == str(tmp_path / "out" / "web2")
    # keyed by the stored names, pointing at the renamed files
    assert restored.disks == {"web.raw": str(tmp_path / "out" / "web2" / "web2.raw")}
    assert restored.formats == {"web.raw": "raw"}
    assert restored.files == {
        "Virtual Machines/0A1B.vmcx": str(tmp_path / "out" / "web2" / "Virtual Machines" / "0A1B.vmcx"),
        "web.nvram": str(tmp_path / "out" / "web2" / "web2.nvram"),
    }
    assert done.note.facts == {"seen": 1} and done.note.lines == ["  recorded files"]
    assert Path(restored.disks["web.raw"]).read_bytes() == b"d" * CS


def test_a_partial_plain_restore_says_so(
    snap: tuple[Repository, Snapshot], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, s = snap
    _recording(monkeypatch, "files")
    monkeypatch.chdir(tmp_path)
    restore_vm(repo, s, "p", include=["web.nvram"])  # a relative target: the step gets absolute paths
    (restored,) = SEEN
    assert restored.partial and restored.clone_name is None
    assert restored.disks == {} and restored.files == {"web.nvram": str(tmp_path / "p" / "web.nvram")}


def test_a_kind_no_connector_owns_gets_no_step(snap: tuple[Repository, Snapshot], tmp_path: Path) -> None:
    repo, s = snap
    alien = replace(s, source={"kind": "from-another-program", "location": "x"})
    done = restore_vm(repo, alien, str(tmp_path / "alien"))
    assert done.note == RestoreNote() and SEEN == []
    # restore_clone keeps its signature and returns the plain result
    assert restore_clone(repo, alien, str(tmp_path / "c"), "web3").target == str(tmp_path / "c" / "web3")


def test_a_hyperv_snapshot_says_how_to_register_it(snap: tuple[Repository, Snapshot], tmp_path: Path) -> None:
    """Before the registry a Hyper-V clone silently found no step; now the note names the
    configuration to import, with a new VM ID."""
    repo, s = snap
    hyperv = replace(s, source={"kind": "hyperv", "location": "hyperv://hv01/web"})
    done = restore_vm(repo, hyperv, str(tmp_path / "hv"), clone_name="web-test")
    text = "\n".join(done.note.lines)
    assert "Compare-VM" in text and "-GenerateNewId" in text and "a new VM ID" in text
    assert "Virtual Machines/0A1B.vmcx" in text or "Virtual Machines\\0A1B.vmcx" in text
    assert done.note.facts["configuration"].endswith("0A1B.vmcx")


@pytest.mark.parametrize(
    "vm",
    [
        {"disks": [{"device": "web.raw"}]},
        {"disks": "web.raw"},
        {"disks": [{"device": "web.raw", "node": "n0", "format": "raw", "file": "/f"}], "nics": [{"id": "x"}]},
        {"disks": [{"device": "web.raw", "node": "n0", "format": "raw", "file": "/f"}], "memory": "lots"},
        {"disks": [{"device": "web.raw", "node": "n,file=/etc/shadow", "format": "raw", "file": "/f"}]},
        {"disks": [{"device": "web.raw", "node": "n0", "format": "raw", "file": "/f"}], "cmdline": "qemu -hda /x"},
        {"disks": [{"device": "web.raw", "node": "n0", "format": "raw", "file": "/f"}], "cmdline": [1, 2]},
        {
            "disks": [{"device": "web.raw", "node": "n0", "format": "raw", "file": "/f"}],
            "cmdline": ["q", "-blockdev", "{[}"],
        },
    ],
)
def test_a_malformed_vm_record_is_a_clear_error(
    snap: tuple[Repository, Snapshot], tmp_path: Path, vm: dict[str, object]
) -> None:
    """The record comes from the storage: whatever it holds, the restore ends with a one-line
    error (or a definition), never a traceback."""
    repo, s = snap
    qemu = replace(s, source={"kind": "qemu", "location": "qemu+unix:///x"}, vm=vm)
    try:
        done = restore_vm(repo, qemu, str(tmp_path / "q"))
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert done.note.lines
        for script in (tmp_path / "q").glob("run-*.sh"):
            assert "/etc/shadow" not in script.read_text()


def test_the_hyperv_register_hint_quotes_stored_names_for_powershell(tmp_path: Path) -> None:
    """The hint is a PowerShell line meant to be pasted; the configuration's name comes from the
    storage: a quote in it must not end the string."""
    vm = tmp_path / "web"
    (vm / "Virtual Machines").mkdir(parents=True)
    name = "x'; Remove-Item -Recurse ~; '.vmcx"
    (vm / "Virtual Machines" / name).write_bytes(b"config")
    (vm / "web.raw").write_bytes(b"d" * CS)
    repo = Repository.init(MemoryBackend(), b"passphrase", chunk_size=CS)
    s = backup(repo, FilesSource(str(vm))).snapshot
    hyperv = replace(s, source={"kind": "hyperv", "location": "hyperv://hv01/web"})
    line = "\n".join(restore_vm(repo, hyperv, str(tmp_path / "hv")).note.lines)
    quoted = line.split("Compare-VM -Path ", 1)[1].split(" -Copy", 1)[0]
    assert quoted == "'<copy>\\Virtual Machines/x''; Remove-Item -Recurse ~; ''.vmcx'"
    body = quoted[1:-1]
    assert quoted.startswith("'") and quoted.endswith("'") and "'" not in body.replace("''", "")
